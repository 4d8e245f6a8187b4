"""selfsup: image representations learned without labels (SimCLR), measured honestly."""

__version__ = "0.1.0"
