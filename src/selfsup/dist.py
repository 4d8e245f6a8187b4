"""Process-group helpers with one code path: in a single process they fall back to rank 0 of 1."""

from __future__ import annotations

import torch.distributed as td


def is_dist() -> bool:
    return td.is_available() and td.is_initialized()


def rank() -> int:
    return td.get_rank() if is_dist() else 0


def world_size() -> int:
    return td.get_world_size() if is_dist() else 1


def is_main() -> bool:
    """Only the main process logs and writes files."""
    return rank() == 0
