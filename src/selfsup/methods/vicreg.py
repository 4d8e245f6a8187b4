"""VICReg (Bardes, Ponce and LeCun, ICLR 2022): the embeddings of two views of an image are
pulled together (invariance), each dimension is kept spread over the batch (variance) and the
dimensions apart from each other (covariance); no negatives, no momentum network, no predictor.
The encoder f is saved and evaluated."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from selfsup import dist
from selfsup.config import PRESET, Range, setting
from selfsup.losses import fp32_loss
from selfsup.methods.base import Method, register_method


@dataclass(frozen=True)
class VICRegSettings:
    sim_coeff: float = setting(25.0, "VICReg: weight of the invariance term (the paper: 25)",
                               Range(0, 1e4))
    std_coeff: float = setting(25.0, "VICReg: weight of the variance term (the paper: 25)",
                               Range(0, 1e4))
    cov_coeff: float = setting(1.0, "VICReg: weight of the covariance term (the paper: 1)",
                               Range(0, 1e4))


def _off_diagonal_squares(z: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """The sum of the squared off-diagonal entries of the covariance z^T z / (N - 1) of centred
    (N, D) embeddings whose per-dimension variances are ``var``: all the squares less the
    diagonal's. For N < D the sum of all squares is taken from the N x N Gram matrix z z^T,
    whose squared entries sum to the same (both are trace((z^T z)^2)) at N/D of the cost: a
    quarter for a batch of 512 and an expander of 2048."""
    n, d = z.shape
    gram = z @ z.T if n < d else z.T @ z
    return gram.pow(2).sum() / (n - 1) ** 2 - var.pow(2).sum()


@fp32_loss
def vicreg_loss(za: torch.Tensor, zb: torch.Tensor, sim: float = 25.0, std: float = 25.0,
                cov: float = 1.0, eps: float = 1e-4) -> torch.Tensor:
    """The VICReg loss of two (N, D) batches of embeddings, row k of each from image k (the
    paper's section 3 and its code): ``sim`` times the mean squared distance of the pairs,
    ``std`` times the mean hinge max(0, 1 - sqrt(Var + eps)) of each dimension over the batch,
    averaged over the two branches, and ``cov`` times the sum of the squared off-diagonal
    covariances divided by D, summed over the two branches."""
    n, d = za.shape
    invariance = F.mse_loss(za, zb)
    za, zb = za - za.mean(dim=0), zb - zb.mean(dim=0)
    var_a, var_b = za.pow(2).sum(dim=0) / (n - 1), zb.pow(2).sum(dim=0) / (n - 1)
    std_a, std_b = torch.sqrt(var_a + eps), torch.sqrt(var_b + eps)
    variance = F.relu(1 - std_a).mean() / 2 + F.relu(1 - std_b).mean() / 2
    covariance = (_off_diagonal_squares(za, var_a) + _off_diagonal_squares(zb, var_b)) / d
    return sim * invariance + std * variance + cov * covariance


@register_method("vicreg")
class VICReg(Method):
    """Encoder f and a 3-layer expander g (each layer but the last with batch norm and ReLU, as
    the paper's), trained by ``vicreg_loss`` with the paper's coefficients 25 / 25 / 1 and the
    paper's optimiser (LARS, lr 0.2 per 256 images, weight decay 1e-6). The expander is
    2048-2048-2048 (solo-learn's CIFAR setting; the paper's ImageNet one is 8192 wide, which a
    CPU cannot afford). Under the ``cpu`` preset: a 1024-wide expander and the preset's SGD
    (``preset_defaults``: measured better in a short CPU budget). Under torchrun the loss sees
    every process's embeddings (``dist.gather_with_grad``), as the paper's code gathers them,
    so the variance and covariance are those of the global batch."""

    title = "VICReg"
    loss_name = "VICReg: 25 invariance + 25 variance + 1 covariance"
    Settings = VICRegSettings
    settings: VICRegSettings
    head_layers = 3
    defaults = dict(proj_hidden=2048, proj_dim=2048, optimizer="lars", lr=0.2,
                    weight_decay=1e-6)
    # On 2 CPU cores in 5 minutes (w32, 16 px, validation split; BENCHMARKS.md): the cpu
    # preset's SGD at lr 0.12 gave 63.4 % linear against 56.0-56.1 % for the paper's LARS at
    # 0.2 (expander 2048 or 1024 alike). At 2048, SGD at 0.12 turned the loss to NaN at step
    # 15; 1024 ran, and costs 272 against 318 ms a step.
    preset_defaults = {"cpu": dict(proj_hidden=1024, proj_dim=1024, optimizer=PRESET, lr=PRESET,
                                   weight_decay=PRESET)}  # the preset's SGD
    progress_free = True
    evaluated = "the encoder f (the expander g is dropped, as in the paper)"

    def loss(self, v: torch.Tensor, progress: float) -> torch.Tensor:
        b = v.shape[0] // 2
        z = self.net(v)  # (2B, proj_dim)
        za, zb = dist.gather_with_grad(z[:b]), dist.gather_with_grad(z[b:])
        s = self.settings
        return vicreg_loss(za, zb, s.sim_coeff, s.std_coeff, s.cov_coeff)
