"""DINO (Caron et al., ICCV 2021, "Emerging properties in self-supervised vision transformers"):
self-distillation with no labels. A student network is trained to give, for every view of an
image, the output distribution a momentum teacher gives for the image's global views; the
teacher's outputs are centred (a running mean subtracted) and sharpened (a low temperature),
which together keep it from collapsing. Multi-crop: two global views and several small local
ones; the teacher sees only the global views. The teacher's encoder is saved and evaluated, as
in the paper.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from selfsup import dist
from selfsup.config import PRESET, Config, Range, setting
from selfsup.losses import fp32_loss
from selfsup.methods.base import (
    LOCAL_CROPS_HELP,
    LOCAL_SCALE_HELP,
    LOCAL_SIZE_HELP,
    MomentumMethod,
    MultiCrop,
    Online,
    cosine_momentum,
    register_method,
)


@dataclass(frozen=True)
class DINOSettings:
    prototypes: int = setting(4096, "DINO: the head's output dimension K (the paper: 65536 on "
                                    "ImageNet; 4096 in CIFAR setups)", Range(2, 1_000_000))
    local_crops: int = setting(8, LOCAL_CROPS_HELP, Range(0, 64))  # the paper's code: 8
    local_size: int = setting(0, LOCAL_SIZE_HELP, Range(0, 4096))
    local_scale_min: float = setting(0.05, LOCAL_SCALE_HELP, Range(0, 1, lo_open=True))
    student_temp: float = setting(0.1, "DINO: the student's softmax temperature",
                                  Range(0.001, 100))
    teacher_temp: float = setting(0.07, "DINO: the teacher's temperature after its warm-up",
                                  Range(0.001, 100))
    warmup_teacher_temp: float = setting(0.04, "DINO: the teacher's temperature at the start",
                                         Range(0.001, 100))
    teacher_temp_warmup: float = setting(0.3, "DINO: fraction of training over which the "
                                              "teacher's temperature rises linearly (the "
                                              "paper: 30 of 100 epochs)", Range(0, 1))
    center_momentum: float = setting(0.9, "DINO: momentum of the running mean subtracted from "
                                          "the teacher's outputs", Range(0, 1))
    head_bn: bool = setting(False, "DINO: batch norm after the head's hidden layers (the "
                                   "paper's code: off by default)")
    teacher_momentum: float = setting(0.996, "DINO: the teacher's moving-average momentum at the "
                                             "start (rises to 1 on a cosine)", Range(0, 1))


class DINOHead(nn.Module):
    """DINO's projection head: a 3-layer MLP with GELU and no batch norm (``in_dim`` ->
    ``hidden`` -> ``hidden`` -> ``bottleneck``), the result L2-normalised, then a linear layer
    to K prototypes whose weight rows are normalised to unit length (the paper's weight-normed
    last layer with its norm fixed to 1), no bias. (B, in_dim) -> (B, K)."""

    def __init__(self, in_dim: int, hidden: int, bottleneck: int, prototypes: int,
                 bn: bool = False) -> None:
        super().__init__()

        def norm() -> list[nn.Module]:
            return [nn.BatchNorm1d(hidden)] if bn else []

        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), *norm(), nn.GELU(),
                                 nn.Linear(hidden, hidden), *norm(), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        for m in self.mlp:
            if isinstance(m, nn.Linear):  # the paper's code: truncated normal, std 0.02
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.prototypes = nn.Parameter(torch.empty(prototypes, bottleneck))
        nn.init.trunc_normal_(self.prototypes, std=0.02)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = F.normalize(self.mlp(h), dim=-1)  # (B, bottleneck) on the unit sphere
        return z @ F.normalize(self.prototypes, dim=-1).T.to(z.dtype)  # (B, K)


class Centre(nn.Module):
    """The running mean C (K,) of the teacher's outputs: a buffer, saved in checkpoints."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.register_buffer("value", torch.zeros(k))

    value: torch.Tensor


@fp32_loss
def dino_loss(student: torch.Tensor, teacher: torch.Tensor, centre: torch.Tensor,
              student_temp: float = 0.1, teacher_temp: float = 0.04) -> torch.Tensor:
    """The DINO loss (the paper's equation 3 over multi-crop, algorithm 1).

    Args:
        student: (V B, K) the student's outputs for V views of B images, view v in rows
            v B .. v B + B - 1; the first two views are the global ones.
        teacher: (2 B, K) the teacher's outputs for the two global views, in the same order.
        centre: (K,) subtracted from the teacher's outputs before its softmax.
    Returns:
        The mean over the pairs (teacher view t, student view s), s != t, of the cross-entropy
        -sum_k P_t log P_s, averaged over the images; P_t = softmax((teacher - C) / teacher_temp),
        P_s = softmax(student / student_temp).
    """
    b = teacher.shape[0] // 2
    views = student.shape[0] // b
    p_t = F.softmax((teacher - centre) / teacher_temp, dim=-1).view(2, b, -1)
    log_p_s = F.log_softmax(student / student_temp, dim=-1).view(views, b, -1)
    # sum over all pairs (t, s) = (P_0 + P_1) . sum_s log P_s, less the two pairs s = t
    every = (p_t.sum(0) * log_p_s.sum(0)).sum()
    same = (p_t * log_p_s[:2]).sum()
    return -(every - same) / (b * (2 * views - 2))


@register_method("dino")
class DINO(MultiCrop, MomentumMethod):
    """Student f, g and a teacher f', g' that follows it as a moving average (momentum
    ``teacher_momentum`` = 0.996 rising to 1 on a cosine, the paper's), with the paper's head
    (``DINOHead``: MLP 2048-2048-256 without batch norm, K prototypes), ``dino_loss`` at student
    temperature 0.1 and a teacher temperature rising from 0.04 to 0.07 over the first 30 % of
    training, the centre a running mean (momentum 0.9) of the teacher's outputs over the
    global batch. Views: 2 global ones (crops of ``crop_scale_min``..1 of the image, at the
    training side) and ``local_crops`` = 8 local ones (``local_scale_min``..``crop_scale_min``,
    at 96/224 of that side), and SGD at lr 0.03 per 256 images with weight decay 1e-4: the
    paper's code's command for its ResNet-50 (crop scales 0.14 and 0.05).

    Departures: K = 4,096 prototypes instead of 65,536 (the CIFAR setups' number; 65,536 would
    make the last layer 16 times the cost), the views' augmentations are the run's (the same
    colour jitter, grey and blur for every view; the paper blurs its views with different
    probabilities and solarises one), the run's optimiser without gradient clipping, and the
    last layer is not held fixed in the first epoch. Under the ``cpu`` preset: a smaller head
    with batch norm, the two global views alone, a teacher at momentum 0.99 and the preset's
    learning rate (``preset_defaults``), measured better in a few CPU minutes.
    """

    title = "DINO"
    loss_name = "DINO: cross-entropy, teacher to student, over multi-crop"
    Settings = DINOSettings
    settings: DINOSettings
    defaults = dict(proj_hidden=2048, proj_dim=256, crop_scale_min=0.14, optimizer="sgd",
                    lr=0.03, weight_decay=1e-4)
    evaluated = "the teacher's encoder f' (a moving average of the student's), as in the paper"
    # On 2 CPU cores (w32, 16 px, batch 512; BENCHMARKS.md) the paper's head over 2 + 8 views
    # cost about 1 s a step, 5 times SimCLR's: the MLP runs on every view's row whatever its
    # size. The CIFAR setups' head (512-512-64, 2,048 prototypes) and 4 local views: about
    # 0.3 s. Batch norm in the head: 46.3 against 44.0 % linear (validation, 4 minutes), and
    # the projections of the head without it had nearly collapsed (uniformity -0.04 vs -1.4).
    # In 4 minutes, that head's teacher hardly left its start (momentum 0.996): with 0.99 and
    # the preset's lr 0.12, 48.9 %, and without the local views (a step 0.14 s rather than
    # 0.24) 59.2 % against 46.5 % (validation, one run each).
    preset_defaults = {"cpu": dict(proj_hidden=512, proj_dim=64, prototypes=2048,
                                   local_crops=0, head_bn=True, teacher_momentum=0.99,
                                   lr=PRESET)}

    @classmethod
    def chance_loss(cls, cfg: Config, batch: int) -> tuple[float, str] | None:
        # teacher and student both uniform over the K prototypes
        return math.log(cfg.of(DINOSettings).prototypes), "log(K): uniform outputs"

    def make_head(self, cfg: Config, feature_dim: int) -> nn.Module:
        s = cfg.of(DINOSettings)
        return DINOHead(feature_dim, cfg.proj_hidden, cfg.proj_dim, s.prototypes, s.head_bn)

    def build(self, online: Online) -> dict[str, nn.Module]:
        nets = super().build(online)
        nets["centre"] = Centre(self.settings.prototypes).to(self.device)
        return nets

    def _adopt(self, nets: nn.ModuleDict) -> None:
        super()._adopt(nets)
        self.encoder = self.target.encoder  # what is saved and evaluated: the teacher's
        self.head = self.target.head

    def networks(self) -> dict[str, nn.Module]:
        return dict(encoder=self.target.encoder, head=self.target.head,
                    student_encoder=self.online.encoder, student_head=self.online.head,
                    centre=self.nets["centre"])

    @property
    def centre(self) -> torch.Tensor:
        return self.nets["centre"].value  # type: ignore[return-value]

    def momentum(self, progress: float) -> float:
        return cosine_momentum(self.settings.teacher_momentum, progress)

    def teacher_temp(self, progress: float) -> float:
        s = self.settings
        rise = min(1.0, progress / s.teacher_temp_warmup) if s.teacher_temp_warmup else 1.0
        return s.warmup_teacher_temp + rise * (s.teacher_temp - s.warmup_teacher_temp)

    def loss(self, v: list[torch.Tensor], progress: float) -> torch.Tensor:
        s = self.net(v)  # (V B, K): the global views' rows first, then the local views'
        with torch.no_grad():
            t = self.target(v[0])  # (2B, K)
            # the centre's next value: the mean over the global batch (every process's rows)
            mean = dist.all_sum_with_grad(t.float().sum(0)) / (t.shape[0] * dist.world_size())
            self._next_centre = mean
        return dino_loss(s, t, self.centre, self.settings.student_temp,
                         self.teacher_temp(progress))

    def after_step(self, progress: float) -> None:
        super().after_step(progress)  # the teacher follows the updated student
        with torch.no_grad():
            m = self.settings.center_momentum
            self.centre.mul_(m).add_(self._next_centre, alpha=1 - m)
