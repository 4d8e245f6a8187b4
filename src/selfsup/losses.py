"""Contrastive losses as pure functions."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float,
            gather: Callable[[torch.Tensor], torch.Tensor] = _identity, rank: int = 0
            ) -> torch.Tensor:
    """NT-Xent, the normalised temperature-scaled cross-entropy of SimCLR (eq. 1).

    For the 2N projections z_1..z_2N, where z_k and z_{k+N} come from the two views of image k,

        l(i, j) = -log exp(sim(z_i, z_j)/tau) / sum_{k != i} exp(sim(z_i, z_k)/tau)

    with sim the cosine similarity; the loss is the mean of l over all 2N anchors.

    Across processes, each passes its own n pairs, ``gather`` (``dist.gather_with_grad``) collects
    every process's rows in rank order (N = world * n), and ``rank`` places this process's rows
    in them: the loss is the mean of l over this process's 2n anchors against all 2N projections,
    so its mean over processes is the loss of the global batch. In one process (identity gather,
    rank 0) it is the plain loss above.

    Args:
        z1: (n, D) projections of the first views.
        z2: (n, D) projections of the second views (row k pairs with row k of z1).
        temperature: tau > 0.

    Returns:
        Scalar loss (float32 even when the inputs are lower precision).
    """
    n = z1.shape[0]
    a1, a2 = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)  # (n, D) each
    g1, g2 = gather(a1), gather(a2)  # (N, D) each, this process's rows at rank * n
    big_n = g1.shape[0]
    if big_n == n:  # one process: the anchors are the candidates (keeps the plain computation)
        anchors = candidates = torch.cat((g1, g2))  # (2N, D)
    else:
        own = slice(rank * n, (rank + 1) * n)
        anchors = torch.cat((g1[own], g2[own]))  # (2n, D), with their gradient paths
        candidates = torch.cat((g1, g2))  # (2N, D)
    logits = anchors @ candidates.T / temperature  # (2n, 2N)
    local = torch.arange(n, device=z1.device)
    first = rank * n + local  # global index of this process's first views
    second = big_n + rank * n + local  # and of its second views
    self_idx = torch.cat((first, second))  # (2n,): each anchor's own column
    logits[torch.arange(2 * n, device=z1.device), self_idx] = float("-inf")  # k != i
    targets = torch.cat((second, first))  # the other view of the same image
    return F.cross_entropy(logits, targets)
