"""SimCLR (Chen et al. 2020): two views of every image in one forward pass, NT-Xent over the
2N projections of the global batch, one update. The encoder f is saved and evaluated. With
``--local-crops L``, multi-crop (SwAV, Caron et al. 2020): L small local views of every image
besides the two, and NT-Xent over every pair of an image's views (``nt_xent_views``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from selfsup import dist
from selfsup.config import Config, Range, setting
from selfsup.losses import nt_xent, nt_xent_views
from selfsup.methods.base import (
    LOCAL_CROPS_HELP,
    LOCAL_SCALE_HELP,
    LOCAL_SIZE_HELP,
    MultiCrop,
    register_method,
)


@dataclass(frozen=True)
class SimCLRSettings:
    temperature: float = setting(0.5, "tau of the loss (NT-Xent; MoCo's InfoNCE)",
                                 Range(0.001, 100))
    local_crops: int = setting(0, LOCAL_CROPS_HELP, Range(0, 64))  # SimCLR's paper: none
    local_size: int = setting(0, LOCAL_SIZE_HELP, Range(0, 4096))
    local_scale_min: float = setting(0.05, LOCAL_SCALE_HELP, Range(0, 1, lo_open=True))
    decoupled: bool = setting(False, "leave the positive out of the loss's denominator "
                              "(the decoupled contrastive loss, DCL)")


@register_method("simclr")
class SimCLR(MultiCrop):
    """Encoder f and projection head g, trained end to end by NT-Xent. Under torchrun the loss
    sees every process's projections (``dist.gather_with_grad``) and batch norm is global."""

    title = "SimCLR"
    loss_name = "NT-Xent"

    @classmethod
    def chance_loss(cls, cfg: Config, batch: int) -> tuple[float, str] | None:
        # each view's positive beside the V(N-1) views of the other images, all equally similar
        s = cfg.of(SimCLRSettings)
        views = 2 + s.local_crops
        if s.decoupled:  # the positive is out of the denominator: -s + log(V(N-1) e^s)
            return math.log(views * (batch - 1)), f"log({views}(N-1)): chance level (DCL)"
        if views == 2:
            return math.log(2 * batch - 1), "log(2N-1): chance level"
        return math.log(1 + views * (batch - 1)), f"log(1+{views}(N-1)): chance level"

    @classmethod
    def loss_title(cls, cfg: Config) -> str:
        return "DCL (decoupled NT-Xent)" if cfg.of(SimCLRSettings).decoupled else cls.loss_name

    progress_free = True
    Settings = SimCLRSettings
    settings: SimCLRSettings
    evaluated = "the encoder f (the projection head g is dropped, SimCLR section 4.2)"

    def loss(self, v: torch.Tensor | list[torch.Tensor], progress: float) -> torch.Tensor:
        tau, gather, rank = self.settings.temperature, dist.gather_with_grad, dist.rank()
        decoupled = self.settings.decoupled
        if isinstance(v, torch.Tensor) or len(v) == 1:  # the two views alone
            pair = v if isinstance(v, torch.Tensor) else v[0]
            b = pair.shape[0] // 2
            z = self.net(pair)  # h: (2B, D) -> z: (2B, proj_dim)
            if not decoupled:
                return nt_xent(z[:b], z[b:], tau, gather, rank)
            return nt_xent_views(z, 2, tau, gather, rank, decoupled)
        z = self.net(v)  # (V B, proj_dim): the global views' rows, then the local views'
        return nt_xent_views(z, z.shape[0] // (v[0].shape[0] // 2), tau, gather, rank, decoupled)
