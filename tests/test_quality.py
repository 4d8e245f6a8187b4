"""The label-free signals: RankMe, alignment and uniformity, the monitor and the warning."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from selfsup import quality, train
from selfsup.config import make_config


def _naive_rankme(f: np.ndarray, eps: float = 1e-7) -> float:
    """Garrido et al. 2023, eq. 1, written out: p_k = sigma_k / sum(sigma) + eps."""
    sigma = np.linalg.svd(f.astype(np.float64), compute_uv=False)
    p = [s / sum(sigma) + eps for s in sigma]
    return math.exp(-sum(pk * math.log(pk) for pk in p))


def test_rankme_matches_the_paper_s_formula():
    rng = np.random.default_rng(0)
    for shape in [(50, 8), (8, 50), (200, 32)]:
        f = rng.normal(size=shape) @ np.diag(rng.uniform(0.1, 3, shape[1]))
        assert quality.rankme(f) == pytest.approx(_naive_rankme(f), rel=1e-9)


def test_rankme_of_equal_features_is_one_and_of_gaussian_is_near_full():
    same = np.tile(np.random.default_rng(1).normal(size=(1, 64)), (500, 1))
    assert quality.rankme(same) == pytest.approx(1.0, abs=1e-3)
    assert quality.rankme(np.zeros((10, 4))) == 1.0
    gauss = np.random.default_rng(2).normal(size=(8192, 64))  # rows >> columns
    assert quality.rankme(gauss) > 0.97 * 64
    low = gauss[:, :4] @ np.random.default_rng(3).normal(size=(4, 64))  # rank 4 in 64 dims
    assert quality.rankme(low) < 4.01


def test_alignment_and_uniformity_match_a_naive_loop():
    g = torch.Generator().manual_seed(0)
    z1 = F.normalize(torch.randn(40, 6, generator=g), dim=1)
    z2 = F.normalize(z1 + 0.3 * torch.randn(40, 6, generator=g), dim=1)
    align = sum(float((z1[i] - z2[i]).norm() ** 2) for i in range(40)) / 40
    pairs = [float(torch.exp(-2 * (z1[i] - z1[j]).norm() ** 2))
             for i in range(40) for j in range(i + 1, 40)]
    assert quality.alignment(z1, z2) == pytest.approx(align, rel=1e-6)
    assert quality.uniformity(z1) == pytest.approx(math.log(sum(pairs) / len(pairs)), rel=1e-6)
    # A collapsed network: every projection the same. Alignment 0, uniformity 0 (its maximum).
    one = F.normalize(torch.ones(10, 6), dim=1)
    assert quality.alignment(one, one) == 0 and quality.uniformity(one) == pytest.approx(0)


def _history(ranks, width=64):
    return [dict(step=float(i), rankme=r, feature_dim=float(width)) for i, r in enumerate(ranks)]


def test_collapse_warning():
    assert quality.collapse_warning(_history([20, 30, 35, 36])) is None
    assert quality.collapse_warning(_history([30])) is None
    collapsed = quality.collapse_warning(_history([30, 20, 2.5]))
    assert collapsed and "collapsed" in collapsed and "2.5 of 64" in collapsed
    assert "learning rate" in collapsed
    falling = quality.collapse_warning(_history([30, 40, 33, 26, 18]))
    assert falling and "fell at each of the last 3 checks, to 18.0, under 50% of the 40.0" \
        in falling
    assert quality.collapse_warning(_history([40, 39, 38.5, 38])) is None  # slight


def test_a_rank_that_settles_after_a_rise_is_no_collapse():
    """A short healthy run: the features' rank rises, then falls at each of the last checks by a
    fifth (VICReg on digits in fp32, its figures): no warning; the same fall to under half the
    highest rank since step 0 is one. The untrained network's rank (step 0) is no peak."""
    assert quality.collapse_warning(_history([14.5, 3.9, 7.9, 12.2, 11.0, 9.8, 9.5])) is None
    assert quality.collapse_warning(_history([14.5, 3.9, 7.9, 12.2, 9.0, 7.0, 5.9])) is not None
    assert quality.collapse_warning(_history([60.0, 20.0, 25.0, 24.0, 22.0, 20.0])) is None


def test_projections_whose_rank_falls_while_the_features_keep_theirs_may_be_collapsing():
    """VICReg on digits with its variance term at 2 (of 25), its first 6 epochs: the features'
    rank rises, the projections' falls from 8.5 to 2.7 at each of the last 3 checks (it went
    on to 2.5, uniformity -0.49). The healthy fp32 run's projections (12.2 to 8.0): none."""
    h = _history([14.5, 3.7, 7.5, 13.5, 15.6, 15.7, 15.6])
    for e, z in zip(h, (1.1, 3.9, 6.5, 8.5, 5.0, 2.9, 2.7), strict=True):
        e["projection_rankme"] = z
    warning = quality.collapse_warning(h)
    assert warning and "the effective rank (RankMe) of its projections fell at each of the " \
        "last 3 checks, to 2.7, under 50% of the 8.5" in warning
    h = _history([14.5, 3.9, 7.9, 12.2, 11.0, 9.8, 9.5])
    for e, z in zip(h, (1.1, 7.3, 12.2, 11.6, 9.6, 8.1, 8.0), strict=True):
        e["projection_rankme"] = z
    assert quality.collapse_warning(h) is None


def _cfg(**kw):
    base = dict(dataset="digits", width=4, proj_hidden=16, proj_dim=8, batch_size=128, epochs=2,
                view_size=8, progress=False, warmup_epochs=0.5)
    return make_config(None, {**base, **kw})


@pytest.mark.slow
def test_monitor_changes_nothing_and_records_each_check(digits, tmp_path):
    with_it = train.pretrain(_cfg(knn_every=1), digits, tmp_path / "a")
    without = train.pretrain(_cfg(knn_every=0), digits, tmp_path / "b")
    a, b = with_it.encoder.state_dict(), without.encoder.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # batch-norm statistics included
    assert with_it.losses == without.losses and without.quality_history == []
    h = with_it.quality_history
    assert [e["step"] for e in h] == [0, 11, 22]  # step 0 (untrained), then each epoch
    assert all(1 <= e["rankme"] <= e["feature_dim"] for e in h)
    assert all(0 <= e["alignment"] <= 4 and e["uniformity"] <= 0 for e in h)
    # Unlabeled data: no kNN, the label-free signals still.
    unlabeled = dataclasses.replace(digits, train_y=None, test_x=None, test_y=None)
    r = train.pretrain(_cfg(knn_every=1), unlabeled, tmp_path / "c")
    assert r.knn_history == [] and len(r.quality_history) == 3
    c = r.encoder.state_dict()  # labels are never used in pretraining: the same weights
    assert all(torch.equal(a[k], c[k]) for k in a)
    assert [e["rankme"] for e in r.quality_history] == [e["rankme"] for e in h]


@pytest.mark.slow
def test_monitor_history_survives_a_resume(digits, tmp_path):
    first = train.pretrain(_cfg(epochs=1), digits, tmp_path / "r")
    more = train.pretrain(_cfg(epochs=2), digits, tmp_path / "r", resume=True)
    assert [e["step"] for e in first.quality_history] == [0, 11]
    assert [e["step"] for e in more.quality_history] == [0, 11, 22]


def test_projections_on_one_line_are_a_collapse_whatever_the_features_rank():
    """The features keep their rank, the projections have fallen to one direction: collapsed.
    Untrained (step 0) or with projections of rank 2 or more: no warning from this rule."""
    h = _history([30, 31, 32])
    for e, z in zip(h, (12.0, 6.0, 1.1), strict=True):
        e["projection_rankme"] = z
    assert "effective rank (RankMe) of 1.10" in quality.collapse_warning(h)
    h[-1]["projection_rankme"] = 2.5
    assert quality.collapse_warning(h) is None
    h = _history([30, 31])
    h[-1]["step"] = 0.0
    h[-1]["projection_rankme"] = 1.0
    assert quality.collapse_warning(h) is None


def test_projections_near_one_point_are_a_collapse_whatever_their_rank():
    """Projections that stay within a few degrees of one another after training (uniformity
    near 0, each spread a little in its own direction, so their rank is no help): collapsed.
    Spread ones, or a run too short to have spread them, get no warning from this rule."""
    h = _history([30, 31, 32])
    for e, u, z in zip(h, (-0.03, -0.02, -0.05), (1.4, 2.0, 3.3), strict=True):
        e.update(uniformity=u, projection_rankme=z)
    h[-1]["step"] = 66.0
    assert "close to one point (uniformity -0.05, at step 0 -0.03" in quality.collapse_warning(h)
    h[-1]["uniformity"] = -1.4
    assert quality.collapse_warning(h) is None
    h[-1].update(uniformity=-0.05, step=float(quality.POINT_STEPS - 1))
    assert quality.collapse_warning(h) is None


@pytest.mark.slow
def test_byol_without_its_predictor_collapses_and_is_caught(digits, tmp_path, monkeypatch):
    """BYOL's known collapse (its paper: no predictor, no learning): the projections gather
    near one point while their rank and the features' stay; the warning says so. With its
    predictor the same run spreads them and gets none."""
    from selfsup.methods.byol import BYOL

    cfg = make_config(None, dict(dataset="digits", method="byol", width=8, proj_hidden=64,
                                 proj_dim=64, batch_size=128, epochs=6, view_size=12,
                                 progress=False, knn_every=2, warmup_epochs=0.5, lr=0.5,
                                 optimizer="sgd", weight_decay=5e-4))
    kept = train.pretrain(cfg, digits, tmp_path / "kept")
    monkeypatch.setattr(BYOL, "predictor", lambda self, cfg: None)
    cut = train.pretrain(cfg, digits, tmp_path / "cut")
    assert "close to one point" in quality.collapse_warning(cut.quality_history)
    assert quality.collapse_warning(kept.quality_history) is None, kept.quality_history
    assert cut.quality_history[-1]["uniformity"] > -0.3 > kept.quality_history[-1]["uniformity"]
    assert cut.quality_history[-1]["projection_rankme"] > quality.POINT_RANK  # rank: no help
