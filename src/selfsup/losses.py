"""Contrastive losses as pure functions."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent, the normalised temperature-scaled cross-entropy of SimCLR (eq. 1).

    For the 2N projections z_1..z_2N, where z_k and z_{k+N} come from the two views of image k,

        l(i, j) = -log exp(sim(z_i, z_j)/tau) / sum_{k != i} exp(sim(z_i, z_k)/tau)

    with sim the cosine similarity; the loss is the mean of l over all 2N anchors.

    Args:
        z1: (N, D) projections of the first views.
        z2: (N, D) projections of the second views (row k pairs with row k of z1).
        temperature: tau > 0.

    Returns:
        Scalar loss (float32 even when the inputs are lower precision).
    """
    n = z1.shape[0]
    z = F.normalize(torch.cat((z1, z2)).float(), dim=1)  # (2N, D), unit rows
    logits = z @ z.T / temperature  # (2N, 2N)
    logits.fill_diagonal_(float("-inf"))  # k != i
    targets = torch.cat((torch.arange(n, 2 * n), torch.arange(0, n))).to(z.device)  # (2N,)
    return F.cross_entropy(logits, targets)
