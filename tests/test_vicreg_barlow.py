"""VICReg and Barlow Twins: each loss against a naive implementation written from its paper's
equations (loops over dimensions and images), and each method through a short run, where
switching off what holds the representation apart makes it collapse, and the collapse warning
says so."""

from __future__ import annotations

import itertools

import pytest
import torch

from selfsup.methods import METHODS
from selfsup.methods.barlow import barlow_loss
from selfsup.methods.vicreg import vicreg_loss


def _pairs(n=12, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    za = torch.randn(n, d, generator=g, dtype=torch.float64)
    return za, 0.7 * za + 0.5 * torch.randn(n, d, generator=g, dtype=torch.float64)


def naive_vicreg(za, zb, lam=25.0, mu=25.0, nu=1.0, eps=1e-4):
    """Bardes et al. 2022, equations (1)-(6), written out term by term."""
    n, d = za.shape

    def v(z):  # (1): the mean over dimensions of the hinge on the standard deviation
        total = 0.0
        for j in range(d):
            mean = sum(z[i, j] for i in range(n)) / n
            var = sum((z[i, j] - mean) ** 2 for i in range(n)) / (n - 1)
            total += max(0.0, 1.0 - float((var + eps) ** 0.5))
        return total / d

    def c(z):  # (3)-(4): the squared off-diagonal covariances over d
        mean = [sum(z[i, j] for i in range(n)) / n for j in range(d)]
        total = 0.0
        for a, b in itertools.product(range(d), range(d)):
            if a != b:
                cov = sum((z[i, a] - mean[a]) * (z[i, b] - mean[b]) for i in range(n)) / (n - 1)
                total += float(cov) ** 2
        return total / d

    s = sum(float((za[i, j] - zb[i, j]) ** 2) for i in range(n) for j in range(d)) / (n * d)
    # (6): the variance terms of the two branches averaged, as the paper's code does
    return lam * s + mu * (v(za) + v(zb)) / 2 + nu * (c(za) + c(zb))


def naive_barlow(za, zb, lam=0.0051, eps=1e-5):
    """Zbontar et al. 2021, equation (1) with (2): C over the batch-standardised embeddings."""
    n, d = za.shape

    def std(z):
        out = torch.empty_like(z)
        for j in range(d):
            mean = sum(z[i, j] for i in range(n)) / n
            var = sum((z[i, j] - mean) ** 2 for i in range(n)) / n
            for i in range(n):
                out[i, j] = (z[i, j] - mean) / (var + eps) ** 0.5
        return out

    a, b = std(za), std(zb)
    loss = 0.0
    for i, j in itertools.product(range(d), range(d)):
        cij = sum(float(a[k, i] * b[k, j]) for k in range(n)) / n
        loss += (1 - cij) ** 2 if i == j else lam * cij ** 2
    return loss


# (12, 6): more images than dimensions, the D x D matrices; (5, 9): fewer, the N x N Gram form
SHAPES = [(12, 6, 0), (12, 6, 1), (5, 9, 2)]


@pytest.mark.parametrize("n,d,seed", SHAPES)
def test_vicreg_loss_is_the_paper_s(n, d, seed):
    za, zb = _pairs(n, d, seed)
    assert float(vicreg_loss(za, zb)) == pytest.approx(naive_vicreg(za, zb), rel=1e-5)
    # each term alone, and small embeddings (std under 1: the hinge is active)
    for coeffs in ((1, 0, 0), (0, 1, 0), (0, 0, 1)):
        assert float(vicreg_loss(0.3 * za, zb, *coeffs)) == pytest.approx(
            naive_vicreg(0.3 * za, zb, *coeffs), rel=1e-5, abs=1e-9)


@pytest.mark.parametrize("n,d,seed", SHAPES)
def test_barlow_loss_is_the_paper_s(n, d, seed):
    za, zb = _pairs(n, d, seed)
    assert float(barlow_loss(za, zb)) == pytest.approx(naive_barlow(za, zb), rel=1e-5)
    assert float(barlow_loss(za, zb, 0.5)) == pytest.approx(naive_barlow(za, zb, 0.5), rel=1e-5)
    # perfectly correlated, decorrelated dimensions: C is the identity, the loss 0
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(64, 8, generator=g, dtype=torch.float64))
    z = (q - q.mean(0)) * 8
    assert float(barlow_loss(z, z)) < 0.05


def test_the_losses_run_in_float32_under_autocast_and_have_gradients():
    za, zb = (t.float().requires_grad_() for t in _pairs())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for loss in (vicreg_loss(za, zb), barlow_loss(za, zb)):
            assert loss.dtype == torch.float32
            loss.backward()
    assert za.grad is not None and torch.isfinite(za.grad).all() and za.grad.abs().sum() > 0


def test_both_are_registered_with_their_papers_settings():
    from selfsup.config import PRESETS, make_config

    for name, title in (("vicreg", "VICReg"), ("barlow", "Barlow Twins")):
        cfg = make_config(None, {"method": name})
        assert METHODS[name].title == title and METHODS[name].head_layers == 3
        assert (cfg.proj_hidden, cfg.proj_dim, cfg.optimizer, cfg.lr) == (2048, 2048, "lars",
                                                                          0.2)
        # scaled for the cpu preset: its own optimiser and learning rate, a narrower head
        cpu = make_config("cpu", {"method": name})
        assert (cpu.proj_hidden, cpu.optimizer, cpu.lr) == (1024, "sgd", PRESETS["cpu"]["lr"])
        assert cpu.weight_decay == make_config(None, {}).weight_decay  # the plain default's
        assert make_config("cpu", {"method": name, "proj_hidden": 512}).proj_hidden == 512
        assert make_config("gpu", {"method": name}).proj_hidden == 2048
    from selfsup.methods.barlow import BarlowSettings
    from selfsup.methods.vicreg import VICRegSettings

    v = make_config(None, {"method": "vicreg"}).of(VICRegSettings)
    assert (v.sim_coeff, v.std_coeff, v.cov_coeff) == (25.0, 25.0, 1.0)
    b = make_config(None, {"method": "barlow", "barlow_lambda": 0.005}).of(BarlowSettings)
    assert (b.barlow_lambda, b.barlow_scale) == (0.005, 0.1)


@pytest.mark.slow
def test_vicreg_with_nothing_holding_it_apart_collapses_and_is_caught(digits, tmp_path):
    """Invariance alone (VICReg without its variance and covariance terms): the projections
    become one point, the label-free monitor sees their rank fall to 1 (the encoder's features
    keep theirs for a while) and the collapse warning fires; with the paper's terms it does
    not."""
    from selfsup import train
    from selfsup.config import make_config
    from selfsup.quality import collapse_warning

    # the machine's precision: in fp32 (AVX2 hosts) the kept run's feature rank rises from 3.9
    # to 12.2 and settles to 9.5 over the last three checks, no collapse (test_quality.py)
    base = dict(dataset="digits", method="vicreg", width=8, proj_hidden=64, proj_dim=64,
                batch_size=128, epochs=6, view_size=12, progress=False, knn_every=1,
                warmup_epochs=0.5, lr=0.5, optimizer="sgd", weight_decay=5e-4)
    kept = train.pretrain(make_config(None, base), digits, tmp_path / "kept")
    cut = train.pretrain(make_config(None, {**base, "std_coeff": 0.0, "cov_coeff": 0.0}),
                         digits, tmp_path / "cut")
    assert "collapsed" in collapse_warning(cut.quality_history)
    assert collapse_warning(kept.quality_history) is None, kept.quality_history
    assert cut.quality_history[-1]["projection_rankme"] < 1.5
    assert kept.quality_history[-1]["projection_rankme"] > 5
