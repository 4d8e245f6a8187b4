"""MoCo v2 (He et al. 2020; Chen et al. 2020, "Improved baselines with momentum contrastive
learning"): a query encoder trained by InfoNCE against the key of the other view, made by a
moving-average key encoder, and a queue of earlier keys as negatives. The query encoder is
saved and evaluated, as in the papers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from selfsup import dist
from selfsup.config import Config, Range, setting
from selfsup.errors import ConfigError
from selfsup.losses import info_nce
from selfsup.methods.base import MomentumMethod, Online, register_method


@dataclass(frozen=True)
class MoCoSettings:
    temperature: float = setting(0.2, "tau in InfoNCE", Range(0.001, 100))
    target_momentum: float = setting(0.99, "the target network's moving-average momentum "
                                           "(moco: constant; byol: rises from it to 1)",
                                     Range(0, 1))
    queue_size: int = setting(4096, "negative keys kept, a multiple of batch_size (of twice "
                                    "batch_size with --symmetric)", Range(1, 1_048_576))
    symmetric: bool = setting(False, "also the loss with the views swapped; both views' keys "
                                     "join the queue")
    paper_head: bool = setting(False, "MoCo v2's own head: Linear-ReLU-Linear without batch "
                                      "norm, the hidden layer as wide as the features")


class KeyQueue(nn.Module):
    """A first-in first-out queue of K normalised keys (K, D), filled a whole global batch at a
    time; K is a multiple of the batch, so a batch never wraps. Starts as random unit vectors,
    as in MoCo's code. Buffers only: saved in checkpoints, never trained."""

    def __init__(self, length: int, dim: int, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("keys", F.normalize(torch.randn(length, dim, generator=g), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    keys: torch.Tensor
    ptr: torch.Tensor

    @torch.no_grad()
    def push(self, k: torch.Tensor) -> None:
        """Replace the oldest rows by ``k`` (B, D), B dividing K. The pointer stays on the
        device (reading it back would make a GPU step wait here)."""
        b, length = k.shape[0], self.keys.shape[0]
        rows = (self.ptr + torch.arange(b, device=self.ptr.device)) % length
        self.keys.index_copy_(0, rows, F.normalize(k.float(), dim=1).to(self.keys.dtype))
        self.ptr.add_(b).remainder_(length)


@register_method("moco")
class MoCo(MomentumMethod):
    """Query network f_q, g_q (trained) and key network f_k, g_k (the moving average, no
    gradient), InfoNCE with temperature 0.2 against a queue of ``queue_size`` keys. The heads
    are the shared projection head (batch norm, ``proj_hidden`` wide); ``paper_head`` gives
    MoCo v2's code's instead, Linear-ReLU-Linear without batch norm and as wide as the
    features (in 5 minutes on 2 CPU cores, judged on validation, it gave 62.6 % linear against
    63.8 % for the shared head: BENCHMARKS.md, so the shared head stays the default).

    Momentum: ``target_momentum`` (0.99 by default). The papers' 0.999 is for ImageNet, where
    200 epochs are 250,000 steps; a 20-minute CPU run takes a few thousand, over which a key
    encoder at 0.999 would trail the query encoder by about a thousand steps (a quarter of the
    run). 0.99 (a 100-step horizon) is what the CIFAR-10 setups of MoCo's code and solo-learn use.

    Batch norm: the query and key batches are separate forward passes, each normalised over the
    whole global batch (global batch norm under torchrun, as for SimCLR; in one process, the plain
    batch); no process normalises a sub-batch of its own, so nothing leaks between the views.
    ``symmetric`` adds the loss with the views swapped (MoCo v2+) and enqueues the keys of both
    views, as MoCo's CIFAR demo does (2B keys a step: the queue is a multiple of twice the
    batch); one-way, the keys of the second views. Either way gathered from every process.
    """

    defaults = dict(temperature=0.2)
    title = "MoCo v2"
    loss_name = "InfoNCE over the queue"

    @classmethod
    def chance_loss(cls, cfg: Config, batch: int) -> tuple[float, str] | None:
        # the key among K queued negatives, all equally similar
        return math.log(cfg.of(MoCoSettings).queue_size + 1), "log(K+1): chance level"
    progress_free = True
    Settings = MoCoSettings
    settings: MoCoSettings
    evaluated = "the query encoder f_q (the key encoder is a moving average of it)"

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        s = cfg.of(MoCoSettings)
        per_step = cfg.batch_size * (2 if s.symmetric else 1)
        if s.queue_size % per_step:
            near = max(1, round(s.queue_size / per_step)) * per_step
            what = ("twice --batch-size" if s.symmetric else "--batch-size")
            raise ConfigError(f"--queue-size ({s.queue_size}) must be a multiple of {what} "
                              f"({per_step}): the queue takes the keys of a whole global batch"
                              f"{' (both views)' if s.symmetric else ''} per step; e.g. {near}")

    def make_head(self, cfg: Config, feature_dim: int) -> nn.Module:
        if not cfg.of(MoCoSettings).paper_head:
            return super().make_head(cfg, feature_dim)
        return nn.Sequential(nn.Linear(feature_dim, feature_dim), nn.ReLU(inplace=True),
                             nn.Linear(feature_dim, cfg.proj_dim))

    def build(self, online: Online) -> dict[str, nn.Module]:
        nets = super().build(online)
        length, per_step = self.settings.queue_size, self.batch * (2 if self.settings.symmetric
                                                                 else 1)
        if length % per_step:  # the batch was clipped to a small data set
            length = max(1, length // per_step) * per_step
            if dist.is_main():
                print(f"note: queue of {length} keys (a multiple of the {per_step} keys a "
                      f"step enqueues)", flush=True)
        nets["queue"] = KeyQueue(length, self.cfg.proj_dim, self.cfg.seed + 3).to(self.device)
        return nets

    @property
    def queue(self) -> KeyQueue:
        return self.nets["queue"]  # type: ignore[return-value]

    def loss(self, v: torch.Tensor, progress: float) -> torch.Tensor:
        b = v.shape[0] // 2
        if self.settings.symmetric:  # queries of both views, each against the other view's key
            q = self.net(v)  # (2B, D)
            with torch.no_grad():
                k = self.target(torch.cat((v[b:], v[:b])))  # (2B, D)
        else:
            q = self.net(v[:b])  # (B, D) queries of the first views
            with torch.no_grad():
                k = self.target(v[b:])  # (B, D) keys of the second views
        self._new_keys = k.detach()  # the keys of the second views, then (symmetric) the first
        return info_nce(q, k, self.queue.keys, self.settings.temperature)

    def after_step(self, progress: float) -> None:
        super().after_step(progress)  # the key encoder follows the updated query encoder
        with torch.no_grad():
            self.queue.push(dist.gather_with_grad(self._new_keys))  # (global B, D), rank order
