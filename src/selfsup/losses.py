"""Contrastive losses as pure functions, always computed in float32.

A loss is called inside the training step's ``torch.autocast``, which would recast its matrix
products (the similarities) to bf16 or fp16, which moves NT-Xent's gradient measurably
(BENCHMARKS.md, "Figures that were code comments"). Every loss here is wrapped in
``fp32_loss``, which turns autocast off and casts its tensor arguments to float32, so the
similarities, the softmax and the result are float32 whatever the caller's autocast state. A
new loss gets the same by the same decorator.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.nn.functional as F

L = TypeVar("L", bound=Callable[..., Any])


def fp32_loss(fn: L) -> L:
    """Run a loss with autocast off and its tensor arguments in float32 (gradients flow back
    to the callers' lower-precision tensors through the cast)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        def up(v: Any) -> Any:
            return v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v

        devices = {v.device.type for v in (*args, *kwargs.values())
                   if isinstance(v, torch.Tensor)} or {"cpu"}
        with contextlib.ExitStack() as stack:
            for dev in devices:
                stack.enter_context(torch.autocast(dev, enabled=False))
            return fn(*(up(a) for a in args), **{k: up(v) for k, v in kwargs.items()})

    return wrapper  # type: ignore[return-value]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


@fp32_loss
def nt_xent_logits(z1: torch.Tensor, z2: torch.Tensor, temperature: float,
                   gather: Callable[[torch.Tensor], torch.Tensor] = _identity, rank: int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits and targets of NT-Xent (see ``nt_xent``), in float32.

    Returns:
        logits (2n, 2N) float32 (each anchor's own column is -inf), targets (2n,) int64.
    """
    n = z1.shape[0]
    a1, a2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)  # (n, D) each
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
    return logits, torch.cat((second, first))  # targets: the other view of the same image


@fp32_loss
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
        Scalar loss, float32 whatever the inputs' precision and the caller's autocast state.
    """
    logits, targets = nt_xent_logits(z1, z2, temperature, gather, rank)
    return F.cross_entropy(logits, targets)


@fp32_loss
def nt_xent_views(z: torch.Tensor, views: int, temperature: float,
                  gather: Callable[[torch.Tensor], torch.Tensor] = _identity, rank: int = 0,
                  decoupled: bool = False) -> torch.Tensor:
    """NT-Xent over V >= 2 views of each image (multi-crop; the form of the SwAV authors'
    library, which extends SimCLR's loss to every pair of an image's views).

    For each anchor z_i, a view of image k, and each other view z_p of image k,

        l(i, p) = -log exp(s_ip) / (exp(s_ip) + sum_{j of another image} exp(s_ij))

    with s the cosine similarity over tau: the image's other views are neither positive nor
    negative in that term. The loss is the mean of l over every (anchor, positive) pair of every
    image. With V = 2 it is ``nt_xent`` (the denominator then holds the positive and the 2N-2
    views of the other images). Across processes as ``nt_xent``: each passes its own n images'
    rows, ``gather`` joins every process's rows view by view, ``rank`` places this process's.

    ``decoupled``: the decoupled contrastive loss (DCL, Yeh et al. 2022, eq. 6): the positive
    leaves the denominator, l(i, p) = -s_ip + log sum_{j of another image} exp(s_ij), which
    removes the factor that shrinks the gradient when the positive is already the most similar
    (their "negative-positive coupling"). It can be negative.

    Args:
        z: (V n, D) projections, view v of image k in row v n + k (views of any sizes).
        views: V.
        temperature: tau > 0.

    Returns:
        Scalar loss, float32.
    """
    n = z.shape[0] // views
    a = F.normalize(z, dim=1).view(views, n, -1)  # (V, n, D)
    g = torch.stack([gather(a[v]) for v in range(views)])  # (V, N, D)
    big_n = g.shape[1]
    anchors = a if big_n == n else g[:, rank * n:(rank + 1) * n]  # (V, n, D)
    logits = (anchors.reshape(views * n, -1) @ g.reshape(views * big_n, -1).T / temperature
              ).view(views, n, views, big_n)
    k, own = torch.arange(n, device=z.device), rank * n + torch.arange(n, device=z.device)
    pos = logits[:, k, :, own]  # (n, V, V): [k, a, b] = s between views a and b of image k
    others = logits.clone()
    others[:, k, :, own] = float("-inf")  # the image's own views out of the negatives
    neg = torch.logsumexp(others.reshape(views, n, -1), dim=2).T  # (n, V): per anchor
    # (n, V, V): l for anchor a, positive b
    terms = (neg[:, :, None] if decoupled else torch.logaddexp(pos, neg[:, :, None])) - pos
    off = ~torch.eye(views, dtype=torch.bool, device=z.device)
    return terms[:, off].mean()


@fp32_loss
def info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float
             ) -> torch.Tensor:
    """InfoNCE with a queue of negatives, the loss of MoCo (He et al. 2020, eq. 1).

    For a query q with its positive key k+ and the K queued keys k_1..k_K,

        L_q = -log exp(q.k+ / tau) / (exp(q.k+ / tau) + sum_i exp(q.k_i / tau))

    with every vector L2-normalised; the loss is the mean of L_q over the n queries. Keys carry
    no gradient in MoCo (the caller computes them under ``no_grad``); nothing here assumes it.

    Args:
        q: (n, D) queries.
        k: (n, D) positive keys, row i for query i.
        queue: (K, D) negative keys.
        temperature: tau > 0.

    Returns:
        Scalar loss, float32.
    """
    q, k, queue = F.normalize(q, dim=1), F.normalize(k, dim=1), F.normalize(queue, dim=1)
    positive = (q * k).sum(dim=1, keepdim=True)  # (n, 1)
    negative = q @ queue.T  # (n, K)
    logits = torch.cat((positive, negative), dim=1) / temperature  # (n, 1 + K)
    targets = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)  # the positive: column 0
    return F.cross_entropy(logits, targets)


@fp32_loss
def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL's normalised mean squared error (Grill et al. 2020, eq. 2).

        L = || p/|p| - z/|z| ||^2 = 2 - 2 cos(p, z)

    averaged over the batch; in [0, 4]. The symmetrised loss of the paper is
    ``byol_loss(p1, z2) + byol_loss(p2, z1)``.

    Args:
        p: (n, D) online predictions.
        z: (n, D) target projections of the other view (the caller stops their gradient).

    Returns:
        Scalar loss, float32.
    """
    return (2 - 2 * F.cosine_similarity(p, z, dim=1)).mean()
