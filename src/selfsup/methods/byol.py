"""BYOL (Grill et al. 2020): an online network f, g, q predicts the target projection of the
other view, made by a moving-average target f', g'; no negatives. The online encoder is saved
and evaluated, as in the paper."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from selfsup.config import Config, Range, setting
from selfsup.losses import byol_loss
from selfsup.methods.base import MomentumMethod, cosine_momentum, register_method
from selfsup.models import ProjectionHead


@dataclass(frozen=True)
class BYOLSettings:
    target_momentum: float = setting(0.99, "the target's moving-average momentum at the start "
                                           "(moco: constant; byol: rises to 1)", Range(0, 1))
    pred_hidden: int = setting(0, "hidden width of the predictor; 0 = proj_hidden",
                               Range(0, 16384))


@register_method("byol")
class BYOL(MomentumMethod):
    """Online encoder f, projector g and predictor q (both MLPs with batch norm, as in the paper,
    but narrower: g is ``proj_hidden``-``proj_dim`` (512-128 by default; the paper 4096-256) and
    the optimiser the preset's, not the paper's LARS; the paper's, ``--proj-hidden 4096
    --proj-dim 256 --pred-hidden 4096 --optimizer lars --lr 0.2 --weight-decay 1.5e-6``, gave
    51.1 % linear against 56.1 % in 5 minutes on 2 CPU cores, judged on validation:
    BENCHMARKS.md),
    target f', g' with momentum rising from ``target_momentum`` to 1 on a cosine over the run,
    symmetrised loss ``byol_loss(p1, z'2) + byol_loss(p2, z'1)`` (in [0, 8]).

    Starting momentum 0.99 rather than the paper's 0.996: like MoCo's, the paper's value is for
    ImageNet-length runs; 0.99 is what CIFAR-10 setups use (solo-learn). Both views pass through
    each network in one batch.
    """

    title = "BYOL"
    loss_name = "BYOL: 2 - 2 cos(p, z'), summed over both views"  # no chance level: none drawn
    Settings = BYOLSettings
    settings: BYOLSettings
    evaluated = "the online encoder f"

    def predictor(self, cfg: Config) -> nn.Module | None:
        torch.manual_seed(cfg.seed + 2)
        hidden = cfg.of(BYOLSettings).pred_hidden or cfg.proj_hidden
        return ProjectionHead(cfg.proj_dim, hidden, cfg.proj_dim)

    def momentum(self, progress: float) -> float:
        return cosine_momentum(self.settings.target_momentum, progress)

    def loss(self, v: torch.Tensor, progress: float) -> torch.Tensor:
        b = v.shape[0] // 2
        p = self.net(v)  # (2B, proj_dim) predictions q(g(f(v)))
        with torch.no_grad():
            z = self.target(v)  # (2B, proj_dim) target projections g'(f'(v))
        return byol_loss(p[:b], z[b:]) + byol_loss(p[b:], z[:b])
