"""selfsup: image representations learned without labels (SimCLR), measured honestly.

``selfsup.load_encoder(path)`` loads a trained encoder for use in Python, and
``selfsup.load_classifier(path)`` a classifier trained by ``selfsup finetune`` (see
``selfsup.inference``).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["load_classifier", "load_encoder", "__version__"]


from selfsup import plugins  # noqa: E402  (the methods, data sets and encoders, registered)

plugins.load()


def load_encoder(path: Any, device: Any = "cpu") -> Any:
    """A run's trained encoder with its input normalisation: see ``inference.load_encoder``."""
    from selfsup.inference import load_encoder as _load

    return _load(path, device)


def load_classifier(path: Any, device: Any = "cpu") -> Any:
    """A classifier ``selfsup finetune`` wrote: see ``inference.load_classifier``."""
    from selfsup.inference import load_classifier as _load

    return _load(path, device)
