"""DINO: the loss against a naive implementation written from the paper's equations, the
multi-crop views, the centre and the teacher's temperature and momentum, the teacher as the
evaluated network, and a run that collapses on purpose (no centring) caught by the warning."""

from __future__ import annotations

import math

import pytest
import torch

from selfsup.config import PRESETS, make_config
from selfsup.methods import METHODS, build_method
from selfsup.methods.base import local_side
from selfsup.methods.dino import DINOSettings, dino_loss


def naive_dino(student, teacher, centre, ts=0.1, tt=0.04):
    """Caron et al. 2021, equations (1)-(3) over multi-crop: for each image, each teacher
    (global) view t and each student view s != t, H(P_t, P_s) = -sum_k P_t(k) log P_s(k),
    P_t = softmax((g_t - C) / tt), P_s = softmax(g_s / ts); averaged over pairs and images."""
    b = teacher.shape[0] // 2
    views = student.shape[0] // b
    total, pairs = 0.0, 0
    for i in range(b):
        for t in range(2):
            logits = [(float(teacher[t * b + i, k]) - float(centre[k])) / tt
                      for k in range(teacher.shape[1])]
            top = max(logits)
            e = [math.exp(v - top) for v in logits]
            p_t = [v / sum(e) for v in e]
            for s in range(views):
                if s == t:
                    continue
                row = [float(student[s * b + i, k]) / ts for k in range(student.shape[1])]
                top = max(row)
                log_z = top + math.log(sum(math.exp(v - top) for v in row))
                total += -sum(p * (v - log_z) for p, v in zip(p_t, row, strict=True))
                pairs += 1
    return total / pairs


@pytest.mark.parametrize("views,seed", [(2, 0), (5, 1), (3, 2)])
def test_dino_loss_is_the_paper_s(views, seed):
    g = torch.Generator().manual_seed(seed)
    b, k = 4, 7
    student = torch.randn(views * b, k, generator=g, dtype=torch.float64)
    teacher = torch.randn(2 * b, k, generator=g, dtype=torch.float64)
    centre = 0.3 * torch.randn(k, generator=g, dtype=torch.float64)
    for ts, tt in ((0.1, 0.04), (0.5, 0.2)):
        assert float(dino_loss(student, teacher, centre, ts, tt)) == pytest.approx(
            naive_dino(student, teacher, centre, ts, tt), rel=1e-6)  # computed in float32


def test_dino_loss_runs_in_float32_under_autocast_and_has_gradients():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(12, 16, generator=g).requires_grad_()
    teacher = torch.randn(6, 16, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = dino_loss(student, teacher, torch.zeros(16))
    assert loss.dtype == torch.float32
    loss.backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    # uniform outputs everywhere: the cross-entropy of two uniform distributions, log K
    flat = dino_loss(torch.zeros(12, 16), torch.zeros(6, 16), torch.zeros(16))
    assert float(flat) == pytest.approx(math.log(16))


def _dino(**over):
    cfg = make_config(None, dict(method="dino", dataset="digits", width=8, proj_hidden=32,
                                 proj_dim=16, prototypes=64, batch_size=8, view_size=16,
                                 **over))
    return build_method(cfg, torch.device("cpu"), 16, [0.5] * 3, [0.25] * 3, 0.05, None, 8)


def test_multi_crop_views_and_the_settings_of_the_paper():
    cfg = make_config(None, {"method": "dino"})
    s = cfg.of(DINOSettings)
    assert (cfg.proj_hidden, cfg.proj_dim, cfg.crop_scale_min) == (2048, 256, 0.14)
    assert (cfg.optimizer, cfg.lr, cfg.weight_decay) == ("sgd", 0.03, 1e-4)
    cpu = make_config("cpu", {"method": "dino"})
    assert make_config(None, {"method": "dino"}).lr == 0.03  # the method's over the default
    # the cpu preset's own learning rate, the two global views alone, a shorter teacher horizon
    c = cpu.of(DINOSettings)
    assert (cpu.lr, c.local_crops, c.teacher_momentum) == (PRESETS["cpu"]["lr"], 0, 0.99)
    assert (cpu.proj_hidden, cpu.proj_dim, c.head_bn) == (512, 64, True)  # scaled for the cpu
    assert (s.local_crops, s.local_scale_min, s.student_temp) == (8, 0.05, 0.1)
    assert (s.warmup_teacher_temp, s.teacher_temp, s.center_momentum) == (0.04, 0.07, 0.9)
    assert [local_side(224, 0), local_side(32, 0), local_side(16, 0), local_side(32, 12)] == \
        [96, 16, 8, 12]
    assert METHODS["dino"].view_sizes(cfg, 32) == [(32, 2), (16, 8)]
    m = _dino(local_crops=3)
    x = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    glob, loc = m.views(x, torch.Generator().manual_seed(0))
    assert glob.shape == (16, 3, 16, 16) and loc.shape == (24, 3, 8, 8)
    assert m.local_aug.scale == (0.05, 0.14) and m.aug.scale == (0.14, 1.0)
    a, b = m.pair_views(x, torch.Generator().manual_seed(0))
    assert torch.equal(torch.cat([a, b]), glob)  # the monitor compares the global views
    assert len(_dino(local_crops=0).views(x, torch.Generator().manual_seed(0))) == 1


def test_a_step_moves_the_centre_the_teacher_and_the_temperature():
    torch.manual_seed(0)
    m = _dino(local_crops=2)
    m.train()
    assert m.encoder is m.target.encoder  # the teacher is what is saved and evaluated
    assert [m.teacher_temp(p) for p in (0.0, 0.15, 0.3, 1.0)] == pytest.approx(
        [0.04, 0.055, 0.07, 0.07])
    assert m.momentum(0.0) == pytest.approx(0.996) and m.momentum(1.0) == pytest.approx(1.0)
    x = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    gen = torch.Generator().manual_seed(0)
    v = m.views(x, gen)
    with torch.no_grad():
        expected_mean = m.target(v[0]).mean(0)  # the teacher's outputs before the step
    student0 = [p.detach().clone() for p in m.online.encoder.parameters()]
    teacher0 = [p.detach().clone() for p in m.target.encoder.parameters()]
    m.update(v, 0.05, 0.0)
    assert torch.allclose(m.centre, 0.1 * expected_mean, atol=1e-6)
    for t0, s0, t1, s1 in zip(teacher0, student0, m.target.encoder.parameters(),
                              m.online.encoder.parameters(), strict=True):
        assert torch.allclose(t1, 0.996 * t0 + 0.004 * s1, atol=1e-6)
        assert not torch.equal(s0, s1) or s0.numel() == 0
    names = set(m.state_dict())
    assert {"encoder", "head", "student_encoder", "student_head", "centre"} <= names


@pytest.mark.slow
def test_dino_collapse_is_caught_and_a_head_with_batch_norm_holds(digits, tmp_path):
    """On a tiny data set in 84 steps: without centring (sharpening alone) every image goes to
    one prototype (the loss falls to 0); with centring but no batch norm in the head (the
    paper's head) the teacher's outputs flatten to the uniform distribution (the loss rises to
    log K). Both are collapses, and the warning says so; with batch norm in the head's hidden
    layers (the paper's code's option) the projections keep their rank."""
    from selfsup import train
    from selfsup.quality import collapse_warning

    base = dict(dataset="digits", method="dino", width=8, proj_hidden=64, proj_dim=32,
                prototypes=64, local_crops=2, batch_size=128, epochs=6, view_size=12,
                progress=False, knn_every=1, warmup_epochs=0.5)
    runs = {name: train.pretrain(make_config(None, {**base, **over}), digits, tmp_path / name)
            for name, over in (("one_hot", dict(center_momentum=1.0, teacher_temp=0.01,
                                                 warmup_teacher_temp=0.01)),
                               ("uniform", {}), ("kept", dict(head_bn=True)))}
    for name in ("one_hot", "uniform"):
        warning = collapse_warning(runs[name].quality_history)
        assert warning is not None and "collapsed" in warning, runs[name].quality_history
    assert runs["one_hot"].losses[-1] < 0.1
    assert runs["uniform"].losses[-1] == pytest.approx(math.log(64), abs=0.2)
    assert collapse_warning(runs["kept"].quality_history) is None
    assert runs["kept"].quality_history[-1]["projection_rankme"] > 5
