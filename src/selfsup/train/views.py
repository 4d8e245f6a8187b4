"""The views each step trains on: the step's batch of indices from its epoch's permutation,
this process's share of it, and the method's views of those images, drawn ahead of time on a
GPU. One object, so that the loop asks for "step k's views" and nothing else."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from selfsup.data import Framed, Images, shapes_of
from selfsup.methods import Method

# Draw the next step's views before reading back this step's loss (None: on GPUs, where the
# draws' launches overlap the model's work; on the CPU nothing would overlap). Same run either way.
VIEWS_AHEAD: bool | None = None


def epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The permutation of the data for one epoch: a function of (seed, epoch) only."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


class Views:
    """Step ``k``'s views: ``take(k, total)``.

    On a GPU the next step's views are drawn while the device still runs this step's update
    (``draw_next``, before the loss is read back, which waits for it): their launches, a few
    hundred small kernels, then overlap the model's work instead of adding to it. The draws
    from ``gen`` come in the same order either way, so the run is the same; the views ahead are
    used only for that step and that generator state (the budget's undo resets both).
    """

    def __init__(self, x_all: Images, method: Method, gen: torch.Generator, seed: int,
                 batch: int, rank: int, world: int, device: torch.device) -> None:
        self.x_all, self.method, self.gen, self.seed = x_all, method, gen, seed
        self.batch, self.rank, self.local = batch, rank, batch // world
        self.steps_per_epoch = len(x_all) // batch
        self.device = device
        self.ahead_enabled = VIEWS_AHEAD if VIEWS_AHEAD is not None else device.type != "cpu"
        self.order: dict[int, torch.Tensor] = {}
        self.ahead: dict[str, Any] = {}

    def draw(self, at: int) -> tuple[torch.Tensor, list[Any], float, float]:
        """Step ``at``'s views; the CUDA events around them (none elsewhere); host seconds, of
        all of it and of reading the images (a memory-mapped store's pages included)."""
        epoch, i = divmod(at, self.steps_per_epoch)
        if epoch not in self.order:  # one permutation per epoch, a function of (seed, epoch)
            self.order.clear()
            self.order[epoch] = epoch_order(self.seed, epoch, len(self.x_all)).to(self.device)
        idx = self.order[epoch][i * self.batch:(i + 1) * self.batch]  # (B,) the global batch
        idx = idx[self.rank * self.local:(self.rank + 1) * self.local]  # this process's share
        t0 = time.perf_counter()
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(2)] \
            if self.device.type == "cuda" else []
        if marks:
            marks[0].record()
        x, shape = self.x_all[idx], shapes_of(self.x_all, idx)
        read_s = time.perf_counter() - t0
        v = self.method.views(x, self.gen, shape)
        if marks:
            marks[1].record()
        return v, marks, time.perf_counter() - t0, read_s

    def take(self, at: int) -> tuple[torch.Tensor, list[Any], float, float]:
        """Step ``at``'s views: those drawn ahead when they are still current, else drawn now."""
        if self.ahead.get("step") == at and self.ahead_is_current():
            drawn = self.ahead["views"]
        else:
            drawn = self.draw(at)
        self.ahead.clear()
        return drawn  # type: ignore[no-any-return]

    def draw_next(self, at: int, total: int) -> None:
        """Draw step ``at``'s views now, ahead of their step (only where that overlaps work)."""
        if self.ahead_enabled and at < total:
            before = self.gen.get_state()
            self.ahead.update(step=at, views=self.draw(at), before=before,
                              after=self.gen.get_state())

    def ahead_is_current(self) -> bool:
        """Views were drawn ahead and the stream is where drawing them left it."""
        return bool(self.ahead) and torch.equal(self.ahead["after"], self.gen.get_state())

    def state(self) -> torch.Tensor:
        """The augmentation stream's state at the start of the next step to take."""
        return self.ahead["before"] if self.ahead_is_current() else self.gen.get_state()


def views_grid(x_all: Images, method: Method, seed: int, n: int = 8) -> np.ndarray:
    """(H, W, 3) image in [0, 1]: ``n`` training images (top row) and two views of each
    (``method.pair_views``), drawn with their own generator (the run's streams are not
    touched)."""
    pick = torch.linspace(0, len(x_all) - 1, n).long().to(x_all.device)
    x = x_all[pick]  # (n, 3, H, W)
    g = torch.Generator(device=method.device).manual_seed(seed + 37)
    mean, std = method.mean.view(1, 3, 1, 1), method.std.view(1, 3, 1, 1)
    a, b = (v.float() * std + mean
            for v in method.pair_views(x.to(method.device), g, shapes_of(x_all, pick)))
    side = a.shape[-1]
    shown = x_all.centre[pick.to(x_all.centre.device)] if isinstance(x_all, Framed) else x
    orig = torch.nn.functional.interpolate(shown.float().cpu() / 255, size=(side, side),
                                           mode="bilinear", antialias=True, align_corners=False)
    rows = [torch.cat(list(r.cpu()), dim=2) for r in (orig, a, b)]  # (3, S, n*S) each
    return torch.cat(rows, dim=1).permute(1, 2, 0).clamp(0, 1).numpy()  # (3S, nS, 3)
