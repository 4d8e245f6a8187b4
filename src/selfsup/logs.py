"""A run's log as it goes: ``metrics.jsonl`` always, TensorBoard event files on request.

``metrics.jsonl`` holds one JSON object per line, flushed as it is written (``tail -f`` shows
a run live): one per optimiser step (``step``, ``epoch``, ``lr``, ``loss``, ``images_per_s``,
``views_share``: the share of the step's time spent making the two views) and one per monitor
check (``step``, ``epoch`` and ``knn``, ``rankme``, ``alignment``, ``uniformity`` where
measured). A resumed run first drops the lines after its checkpoint's step (written before a
crash, and about to be written again), so every step appears once.

``--log tensorboard`` writes the same scalars as TensorBoard event files under
``RUN/tensorboard`` (``tensorboard --logdir runs`` shows every run), and the augmentation grid as
an image. It needs the ``tensorboard`` package (``pip install 'selfsup[tensorboard]'``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from selfsup.errors import ConfigError, SelfsupError
from selfsup.files import atomic_write_text, confined, write_failure

JSONL = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
LOG_CHOICES = ("none", "tensorboard")


def check_tensorboard() -> None:
    """Raise ConfigError, saying how to install it, when TensorBoard's writer cannot load."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise ConfigError("--log tensorboard needs the tensorboard package: pip install "
                          "'selfsup[tensorboard]' (or pip install tensorboard)") from None


def _kept_lines(path: Path, last_step: int) -> list[str]:
    """The lines of an existing log up to ``last_step`` (a torn last line is dropped)."""
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("step"), int | float) \
                and entry["step"] <= last_step:
            kept.append(line)
    return kept


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: such a value is written as null."""
    return value if not isinstance(value, float) or math.isfinite(value) else None


class RunLog:
    """Writes ``metrics.jsonl`` (and TensorBoard events) for one invocation of pretraining.

    Args:
        run_dir: the run folder.
        start_step: the step the run starts from (a resume: its checkpoint's).
        tensorboard: also write TensorBoard event files.
        enabled: False in processes other than the first: nothing is written.
    """

    def __init__(self, run_dir: Path, start_step: int, tensorboard: bool, enabled: bool) -> None:
        self.enabled = enabled
        self.writer: Any = None
        self.file: Any = None
        if not enabled:
            return
        self.path = path = confined(run_dir, JSONL)
        kept = _kept_lines(path, start_step) if start_step and path.is_file() else []
        atomic_write_text("".join(line + "\n" for line in kept), path)
        try:  # the file just written in its place: a regular file, never a link
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
        except OSError as e:
            raise SelfsupError(f"cannot write {path} ({e.strerror})") from None
        self.file = open(fd, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # Events after the checkpoint's step, from before a crash, are purged.
            self.writer = SummaryWriter(str(confined(run_dir, TENSORBOARD_DIR)),
                                        purge_step=start_step + 1 if start_step else None)

    def _write(self, entry: dict[str, Any]) -> None:
        """One line, flushed; a full or read-only disk stops the run with a message (the last
        checkpoint, written atomically, stays whole)."""
        try:
            self.file.write(json.dumps({k: _finite(v) for k, v in entry.items()}) + "\n")
            self.file.flush()
        except OSError as e:
            self._drop()
            raise SelfsupError(f"cannot write {self.path}: {write_failure(e)}. The last "
                               f"checkpoint is kept whole: free some space, then continue "
                               f"with --resume {self.path.parent}") from None
        if self.writer is not None:
            step = int(entry["step"])
            for key, value in entry.items():
                if key not in ("step", "epoch") and isinstance(value, int | float) \
                        and math.isfinite(value):
                    self.writer.add_scalar(f"pretrain/{key}", value, step)

    def step(self, step: int, epoch: float, lr: float, loss: float, images_per_s: float,
             views_share: float, read_share: float = 0.0) -> None:
        """One optimiser step (``step`` counts from 1: the steps done); ``read_share``: of the
        step, the part of ``views_share`` spent reading the images (the data's wait)."""
        if self.enabled:
            self._write(dict(step=step, epoch=epoch, lr=lr, loss=loss, images_per_s=images_per_s,
                             views_share=views_share, read_share=read_share))

    def check(self, step: int, epoch: float, values: dict[str, float]) -> None:
        """The monitors' values after ``step`` steps (0: the untrained networks)."""
        if self.enabled and values:
            self._write(dict(step=step, epoch=epoch, **values))

    def image(self, tag: str, grid: np.ndarray, step: int = 0) -> None:
        """An (H, W, 3) image in [0, 1] for TensorBoard (nothing for the JSON log)."""
        if self.enabled and self.writer is not None:
            self.writer.add_image(tag, np.clip(grid, 0, 1), step, dataformats="HWC")

    def _drop(self) -> None:
        """Close the log file, dropping what a full disk would not take."""
        if self.file is not None:
            with contextlib.suppress(OSError):
                self.file.close()
            self.file = None

    def close(self) -> None:
        if self.file is not None:
            try:
                self.file.close()
            except OSError as e:
                self.file = None
                raise SelfsupError(f"cannot write {self.path} ({e.strerror})") from None
            self.file = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None
