"""Barlow Twins (Zbontar, Jing, Misra, LeCun and Deny, ICML 2021): the cross-correlation
matrix of the two views' embeddings, each dimension standardised over the batch, is pushed to
the identity: equal on the diagonal (invariance), zero off it (redundancy reduction); no
negatives, no momentum network. The encoder f is saved and evaluated."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from selfsup import dist
from selfsup.config import PRESET, Range, setting
from selfsup.losses import fp32_loss
from selfsup.methods.base import Method, register_method


@dataclass(frozen=True)
class BarlowSettings:
    barlow_lambda: float = setting(0.0051, "Barlow Twins: weight of the off-diagonal terms "
                                           "(the paper: 5e-3; solo-learn's CIFAR: 0.0051)",
                                   Range(0, 10))
    barlow_scale: float = setting(0.1, "Barlow Twins: the loss's scale (solo-learn's CIFAR "
                                       "setting; the paper: 1)", Range(1e-6, 100))


@fp32_loss
def barlow_loss(za: torch.Tensor, zb: torch.Tensor, lam: float = 0.0051, eps: float = 1e-5
                ) -> torch.Tensor:
    """The Barlow Twins loss of two (N, D) batches of embeddings, row k of each from image k
    (the paper's equation 1): C = za_n^T zb_n / N with each dimension standardised over the
    batch (batch norm without its affine part, biased variance + ``eps``);
    sum_i (1 - C_ii)^2 + lam * sum_{i != j} C_ij^2. For N < D the sum of all C_ij^2 comes from
    the two N x N Gram matrices (trace(C^T C) = trace(a a^T b b^T) / N^2), at 2N/D of the cost
    of C itself."""
    n, d = za.shape

    def standardise(z: torch.Tensor) -> torch.Tensor:
        return (z - z.mean(dim=0)) / torch.sqrt(z.var(dim=0, unbiased=False) + eps)

    a, b = standardise(za), standardise(zb)
    diagonal = (a * b).sum(dim=0) / n  # C_ii
    if n < d:  # sum_ij C_ij^2 = sum((a a^T) * (b b^T)) / N^2: two N x N products, not N x D x D
        squares = ((a @ a.T) * (b @ b.T)).sum() / n ** 2
    else:
        squares = (a.T @ b / n).pow(2).sum()  # C: (D, D)
    return (diagonal - 1).pow(2).sum() + lam * (squares - diagonal.pow(2).sum())


@register_method("barlow")
class BarlowTwins(Method):
    """Encoder f and a 3-layer projector g (each layer but the last with batch norm and ReLU,
    as the paper's), trained by ``barlow_lambda`` = 0.0051 and the loss scaled by 0.1
    (solo-learn's CIFAR setting); the projector is 2048-2048-2048 (solo-learn's CIFAR; the
    paper's ImageNet one is 8192 wide, which a CPU cannot afford) and the optimiser the paper's
    LARS at lr 0.2 per 256 images, weight decay 1.5e-6 (not its lower rate for biases). Under
    the ``cpu`` preset: a 1024-wide projector and the preset's SGD, as for VICReg. Under
    torchrun the embeddings
    of every process are gathered before the batch statistics and C are taken (with their
    gradients: an all-reduce of C, as the paper's code does, would have no backward)."""

    title = "Barlow Twins"
    loss_name = "Barlow Twins: invariance + lambda redundancy (scaled)"
    Settings = BarlowSettings
    settings: BarlowSettings
    head_layers = 3
    defaults = dict(proj_hidden=2048, proj_dim=2048, optimizer="lars", lr=0.2,
                    weight_decay=1.5e-6)
    # On 2 CPU cores in 5 minutes (w32, 16 px, validation split; BENCHMARKS.md): 59.4 % linear
    # against 53.1 % for the paper's LARS with a 2048-wide projector, 56.9 % for 2048 wide
    # with SGD, 56.6 % for the paper's loss scale 1.
    preset_defaults = {"cpu": dict(proj_hidden=1024, proj_dim=1024, optimizer=PRESET, lr=PRESET,
                                   weight_decay=PRESET)}  # the preset's SGD
    progress_free = True
    evaluated = "the encoder f (the projector g is dropped, as in the paper)"

    def loss(self, v: torch.Tensor, progress: float) -> torch.Tensor:
        b = v.shape[0] // 2
        z = self.net(v)  # (2B, proj_dim)
        za, zb = dist.gather_with_grad(z[:b]), dist.gather_with_grad(z[b:])
        return self.settings.barlow_scale * barlow_loss(za, zb, self.settings.barlow_lambda)
