"""The checks a run makes of itself as it trains, on one schedule: kNN accuracy on a fixed
subset where there are labels, the label-free signals (RankMe, alignment, uniformity) always.
Each check embeds in eval mode with its own generators: the run's state is not touched."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch

from selfsup.data import ImageData, Images
from selfsup.methods import Method

if TYPE_CHECKING:
    from selfsup.logs import RunLog


class Monitors:
    """The run's monitors and their one history: a record per check, {step, epoch} and the
    values measured (``knn`` where there are labels; ``rankme``, ``feature_dim``,
    ``alignment``, ``uniformity``). The files keep it as the two lists they always held
    (``knn_history``: {step, epoch, accuracy}; ``quality_history``: {step, epoch, rankme,
    feature_dim, alignment, uniformity}).

    ``every`` epochs (0: never), and at the end of the run; only the main process checks.
    """

    def __init__(self, data: ImageData, x_all: Images, every: int, size: int, k: int, t: float,
                 seed: int, batch_size: int, main: bool) -> None:
        self.knn: Any = None
        self.quality: Any = None
        if every and data.labeled and main:
            from selfsup.evaluate import KnnMonitor

            self.knn = KnnMonitor(data, size, k, t, seed, batch_size)
        if every and main:  # the label-free signals, on the same schedule, labels or not
            from selfsup.quality import MONITOR_IMAGES, QualityMonitor

            self.quality = QualityMonitor(x_all, min(MONITOR_IMAGES, len(x_all)), seed,
                                          batch_size)
        self.history: list[dict[str, float]] = []
        self.seconds = 0.0  # spent on checks (and the budget's timing of one)

    @property
    def active(self) -> bool:
        return self.knn is not None or self.quality is not None

    @property
    def knn_history(self) -> list[dict[str, float]]:
        return [dict(step=int(r["step"]), epoch=r["epoch"], accuracy=r["knn"])
                for r in self.history if "knn" in r]

    @property
    def quality_history(self) -> list[dict[str, float]]:
        from selfsup.quality import SIGNALS

        return [dict(step=float(r["step"]), epoch=r["epoch"],
                     **{k: r[k] for k in SIGNALS if k in r})
                for r in self.history if "rankme" in r]

    def restore(self, knn_history: list[dict[str, float]],
                quality_history: list[dict[str, float]]) -> None:
        """The history from a checkpoint's two lists (joined by step)."""
        by_step: dict[float, dict[str, float]] = {}
        for e in knn_history:
            by_step.setdefault(float(e["step"]), dict(step=e["step"], epoch=e["epoch"]))[
                "knn"] = e["accuracy"]
        for e in quality_history:
            record = by_step.setdefault(float(e["step"]), dict(step=e["step"], epoch=e["epoch"]))
            record.update((k, v) for k, v in e.items() if k not in ("step", "epoch"))
        self.history = [by_step[s] for s in sorted(by_step)]

    def measure(self, method: Method, mean: list[float], std: list[float],
                device: torch.device) -> dict[str, float]:
        """The monitors' values now; nothing is recorded."""
        values: dict[str, float] = {}
        if self.knn is not None:
            values["knn"] = self.knn.accuracy(method.encoder, mean, std, device, method.nhwc)
        if self.quality is not None:
            values.update(self.quality.measure(method))
        return values

    def time_one(self, method: Method, mean: list[float], std: list[float],
                 device: torch.device) -> float:
        """Seconds of one check, timed and dropped (what a budget charges per check)."""
        t0 = time.perf_counter()
        self.measure(method, mean, std, device)
        seconds = time.perf_counter() - t0
        self.seconds += seconds
        return seconds

    def check(self, step: int, epoch: float, method: Method, mean: list[float],
              std: list[float], device: torch.device, log: RunLog) -> None:
        """The checks at ``step``, appended to the history and the log."""
        t0 = time.perf_counter()
        values = self.measure(method, mean, std, device)
        self.history.append(dict(step=step, epoch=epoch, **values))
        log.check(step, epoch, {k: v for k, v in values.items() if k != "feature_dim"})
        self.seconds += time.perf_counter() - t0

    @staticmethod
    def due(step: int, total: int, steps_per_epoch: int, every: int) -> bool:
        """At the end of every ``every``-th epoch, and at the last step."""
        epoch_end = step % steps_per_epoch == 0
        return step == total or epoch_end and (step // steps_per_epoch) % every == 0
