"""Label-free measures of a representation, for runs without labels.

- **RankMe** (Garrido, Balestriero, Najman & LeCun, ICML 2023, eq. 1): the effective rank of
  the encoder's features, ``exp(-sum_k p_k log p_k)`` with ``p_k = sigma_k / ||sigma||_1 + eps``
  over the singular values ``sigma`` of the (N, D) feature matrix. From 1 (every image gets the
  same direction: a collapsed encoder) to min(N, D) (features spread over every dimension). Across
  checkpoints and hyper-parameters of one method, a higher RankMe went with a better downstream
  accuracy in that paper; it is not comparable between different feature widths without care.
- **Alignment and uniformity** (Wang & Isola, ICML 2020, eqs. 4 and 5) of the L2-normalised
  projections z of two views of each image: alignment ``E ||z1 - z2||^2`` (lower: the two
  views of an image agree), uniformity ``log E exp(-2 ||z_i - z_j||^2)`` over pairs of different
  images (lower: the images spread over the sphere). A collapsed network has alignment 0 and
  uniformity 0 (its maximum).

``QualityMonitor`` measures all three during pretraining on a fixed subset of the training
images, in eval mode, under no_grad, with its own generator for the views: nothing it does
changes the run's weights, batch-norm statistics or random streams.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from selfsup.data import Framed, Images, shapes_of

if TYPE_CHECKING:
    from selfsup.methods import Method

RANKME_EPS = 1e-7  # the paper's epsilon inside the entropy
# what ``measure`` returns (``projection_rankme``: RankMe of the projections z of the views)
SIGNALS = ("rankme", "feature_dim", "alignment", "uniformity", "projection_rankme")
MONITOR_IMAGES = 2048  # the fixed subset: more rows than any encoder here has feature columns
POINT_RANK = 1.5  # projections of effective rank under this after training: collapsed
# Projections whose uniformity stays above this after POINT_STEPS steps lie close to one point
# (within about 30 degrees of one another): collapsed, whatever their rank. An untrained network
# starts there (-0.35 to 0 here); runs that learned ended at -1.4 to -3.7, collapsed ones at
# -0.12 to 0 (BENCHMARKS.md).
POINT_UNIFORMITY = -0.5
POINT_STEPS = 50  # before this many steps a network may not have spread its projections yet
COLLAPSE_FRACTION = 0.05  # effective rank under this share of the feature width: collapsed
# RankMe (of the features or the projections) falling at each of this many checks in a row, to
# under FALLING_BY of the highest it reached since step 0: collapsing. A short healthy run's
# rank may rise and then settle by a fifth to a third (VICReg on digits in fp32: 12.2 to 9.5
# over its last 3 checks, its projections' 11.6 to 8.0, uniformity -1.1 at the end); VICReg
# with its variance term at 2 (of 25) took its projections' from 8.5 to 2.7 (BENCHMARKS.md,
# "The falling-rank rule, against short fp32 runs and runs made to collapse slowly").
FALLING_CHECKS = 3
FALLING_BY = 0.5
COLLAPSE_CAUSES = ("a learning rate too high for the batch, a temperature too low, too weak "
                   "augmentation, for BYOL a target momentum or predictor that lets the two "
                   "networks agree on a constant, or for VICReg or Barlow Twins a variance, "
                   "covariance or redundancy term set too low")


def rankme(features: torch.Tensor | np.ndarray) -> float:
    """The effective rank of (N, D) features (RankMe, Garrido et al. 2023, eq. 1).

    Returns:
        A value in [1, min(N, D)]: 1 for features of one direction (or all zero), near
        min(N, D) when every singular value is alike.
    """
    f = torch.as_tensor(features).double()
    sigma = torch.linalg.svdvals(f)  # (min(N, D),)
    total = sigma.sum()
    if not torch.isfinite(total) or total <= 0:
        return 1.0
    p = sigma / total + RANKME_EPS
    return float(torch.exp(-(p * p.log()).sum()))


def alignment(z1: torch.Tensor, z2: torch.Tensor, alpha: float = 2.0) -> float:
    """Wang & Isola's alignment ``E ||z1_i - z2_i||^alpha`` of L2-normalised pairs (N, D)."""
    return float((z1.double() - z2.double()).norm(dim=1).pow(alpha).mean())


def uniformity(z: torch.Tensor, t: float = 2.0) -> float:
    """Wang & Isola's uniformity ``log E_{i<j} exp(-t ||z_i - z_j||^2)`` of L2-normalised
    z (N, D), N >= 2."""
    d2 = torch.pdist(z.double()).pow(2)  # (N(N-1)/2,) squared distances of distinct pairs
    return float(torch.logsumexp(-t * d2, dim=0) - math.log(len(d2)))


class QualityMonitor:
    """RankMe of the encoder's features and alignment/uniformity of the projections of two
    views, on ``size`` training images chosen once from ``seed``.

    The features are those of the un-augmented images (as the encoder is used afterwards); the
    views come from a generator seeded the same way at every check, so two checks differ only
    by the networks.
    """

    def __init__(self, x_all: Images, size: int, seed: int, batch_size: int) -> None:
        n = len(x_all)
        pick = torch.from_numpy(np.random.default_rng(seed + 29).permutation(n)[:size])
        self.x = x_all[pick.to(x_all.device)]  # what the views are drawn from
        self.shape = shapes_of(x_all, pick.to(x_all.device))
        # what the features are of: the images as evaluation sees them
        self.plain = x_all.centre[pick.to(x_all.centre.device)] if isinstance(x_all, Framed) \
            else self.x
        self.seed, self.batch_size = seed, batch_size

    @torch.no_grad()
    def measure(self, method: Method) -> dict[str, float]:
        """RankMe, alignment and uniformity of ``method``'s networks now (they are left as
        they were: training mode restored, no state changed)."""
        from selfsup.evaluate import embed

        was_training = method.nets.training
        method.nets.eval()
        try:
            h = embed(method.encoder, self.plain, method.mean.tolist(), method.std.tolist(),
                      self.batch_size, method.device, method.nhwc)  # (n, D)
            gen = torch.Generator(device=method.device).manual_seed(self.seed + 31)
            z1s, z2s = [], []
            for i in range(0, len(self.x), self.batch_size):
                b = self.x[i:i + self.batch_size].to(method.device)
                shape = None if self.shape is None else self.shape[i:i + self.batch_size]
                v = torch.cat(method.pair_views(b, gen, shape))  # (2b, 3, S, S): k and k+b pair up
                z = F.normalize(method.head(method.encoder(v)).float(), dim=1)  # (2b, d)
                z1s.append(z[:len(b)].cpu())
                z2s.append(z[len(b):].cpu())
        finally:
            method.nets.train(was_training)
        z1, z2 = torch.cat(z1s), torch.cat(z2s)
        return dict(rankme=rankme(h), feature_dim=float(h.shape[1]),
                    alignment=alignment(z1, z2),
                    uniformity=(uniformity(z1) + uniformity(z2)) / 2,
                    projection_rankme=rankme(torch.cat([z1, z2])))


def _falling(checks: list[dict[str, Any]], key: str) -> tuple[float, float] | None:
    """(last, peak) when ``key`` fell at each of the last ``FALLING_CHECKS`` checks to under
    ``FALLING_BY`` of its highest since step 0 (an untrained network's value is no peak)."""
    values = [float(e[key]) for e in checks]
    tail = values[-(FALLING_CHECKS + 1):]
    peak = max((float(e[key]) for e in checks if e.get("step", 0) > 0), default=0.0)
    falling = all(b < a for a, b in zip(tail[:-1], tail[1:], strict=True))
    if len(tail) == FALLING_CHECKS + 1 and falling and tail[-1] < FALLING_BY * peak:
        return tail[-1], peak
    return None


def collapse_warning(history: list[dict[str, Any]]) -> str | None:
    """A warning when RankMe says the representation collapsed or is collapsing, else None.

    Collapsed: the last effective rank is under ``COLLAPSE_FRACTION`` of the feature width.
    Collapsing: it, or the projections' rank, fell at each of the last ``FALLING_CHECKS``
    checks, to under ``FALLING_BY`` of the highest it reached after step 0 (in runs made to
    collapse slowly the projections' rank falls while the features' holds or rises).
    Also collapsed, whatever the rank of the features: the projections z of the views have
    an effective rank under ``POINT_RANK`` after training (one point, or two opposite ones):
    the loss is then met by a constant, as when nothing in a non-contrastive loss holds the
    images apart; the encoder's features may keep their rank for a while after it. Or, after
    ``POINT_STEPS`` steps, their uniformity is still above ``POINT_UNIFORMITY``: they lie close
    to one point, each spread a little in its own direction (their rank says nothing then), as
    BYOL's are without its predictor.
    """
    ranks = [float(e["rankme"]) for e in history if "rankme" in e]
    if len(ranks) < 2:
        return None
    step = float(history[-1].get("step", 0))  # of the last check
    last_z = history[-1].get("projection_rankme")
    if last_z is not None and step > 0 and last_z < POINT_RANK:
        return (f"the representation has collapsed: the projections of different images have "
                f"an effective rank (RankMe) of {float(last_z):.2f}, all on one line. Usual "
                f"causes: {COLLAPSE_CAUSES}.")
    last_u = history[-1].get("uniformity")
    if last_u is not None and step >= POINT_STEPS and last_u > POINT_UNIFORMITY:
        return (f"the representation has collapsed: the projections of different images lie "
                f"close to one point (uniformity {float(last_u):.2f}, at step 0 "
                f"{float(history[0].get('uniformity', 0)):.2f}; networks that tell images apart "
                f"reach -1 or lower). Usual causes: {COLLAPSE_CAUSES}.")
    width = float(history[-1].get("feature_dim", 0)) or None
    last = ranks[-1]
    if width and last < COLLAPSE_FRACTION * width:
        return (f"the representation has collapsed: its effective rank (RankMe) is {last:.1f} "
                f"of {width:.0f} feature dimensions (it started at {ranks[0]:.1f}). Usual causes: "
                f"{COLLAPSE_CAUSES}.")
    for key, what in (("rankme", "its effective rank (RankMe)"),
                      ("projection_rankme", "the effective rank (RankMe) of its projections")):
        fall = _falling([e for e in history if key in e], key)
        if fall is not None:
            return (f"the representation may be collapsing: {what} fell at each of the last "
                    f"{FALLING_CHECKS} checks, to {fall[0]:.1f}, under {FALLING_BY:.0%} of the "
                    f"{fall[1]:.1f} it reached. Usual causes: {COLLAPSE_CAUSES}.")
    return None
