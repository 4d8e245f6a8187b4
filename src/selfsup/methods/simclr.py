"""SimCLR (Chen et al. 2020): two views of every image in one forward pass, NT-Xent over the
2N projections of the global batch, one update. The encoder f is saved and evaluated."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from selfsup import dist
from selfsup.config import Config, Range, setting
from selfsup.losses import nt_xent
from selfsup.methods.base import Method, register_method


@dataclass(frozen=True)
class SimCLRSettings:
    temperature: float = setting(0.5, "tau of the loss (NT-Xent; MoCo's InfoNCE)",
                                 Range(0.001, 100))


@register_method("simclr")
class SimCLR(Method):
    """Encoder f and projection head g, trained end to end by NT-Xent. Under torchrun the loss
    sees every process's projections (``dist.gather_with_grad``) and batch norm is global."""

    title = "SimCLR"
    loss_name = "NT-Xent"

    @classmethod
    def chance_loss(cls, cfg: Config, batch: int) -> tuple[float, str] | None:
        # each view's positive among 2N-1 others, all equally similar
        return math.log(2 * batch - 1), "log(2N-1): chance level"
    progress_free = True
    Settings = SimCLRSettings
    settings: SimCLRSettings
    evaluated = "the encoder f (the projection head g is dropped, SimCLR section 4.2)"

    def loss(self, v: torch.Tensor, progress: float) -> torch.Tensor:
        b = v.shape[0] // 2
        z = self.net(v)  # h: (2B, D) -> z: (2B, proj_dim)
        return nt_xent(z[:b], z[b:], self.settings.temperature, dist.gather_with_grad, dist.rank())
