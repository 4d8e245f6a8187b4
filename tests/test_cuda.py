"""The CUDA path against the CPU one: the augmentations, a training step of every method, a
pretraining run and its resume, the command line and torchrun with NCCL.

Skipped where no CUDA GPU is visible (CI has none); ``benchmarks/gpu_check.sh`` runs them on a
GPU machine.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from selfsup import augment, checkpoint, train
from selfsup.augment import AugmentParams
from selfsup.config import make_config
from selfsup.methods import METHODS, build_method
from tests.helpers import SRC_ENV, interrupt_at, torchrun

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")

CUDA = torch.device("cuda")
CPU = torch.device("cpu")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64, on the CPU."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@pytest.fixture
def strict_fp32():
    """fp32 arithmetic on the GPU without TF32 (its default for convolutions), for comparisons
    with the CPU at fp32 rounding."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def test_colour_and_normalisation_match_cpu(strict_fp32):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(512, 3, 24, 24, generator=g)
    factors = torch.cat([0.6 + 0.8 * torch.rand(512, 3, generator=g),
                         0.2 * torch.rand(512, 1, generator=g) - 0.1], dim=1)
    orders = torch.rand(512, 4, generator=g).argsort(dim=1)
    active = torch.rand(512, generator=g) < 0.8
    cpu = augment.apply_jitters(x, factors, orders, active=active)
    gpu = augment.apply_jitters(x.to(CUDA), factors.to(CUDA), orders.to(CUDA),
                                active=active.to(CUDA))
    assert not torch.equal(cpu, x) and _rel(gpu, cpu) < 1e-5
    assert _rel(augment.grayscale(x.to(CUDA)), augment.grayscale(x)) < 1e-6
    mean, std = torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.2, 0.25, 0.3])
    for fmt in (torch.contiguous_format, torch.channels_last):
        out = augment.normalize_into(x.to(CUDA), mean.to(CUDA), std.to(CUDA), fmt)
        assert out.is_contiguous(memory_format=fmt)
        assert _rel(out, augment.normalize(x, mean, std)) < 1e-6


def test_crop_resampling_matches_cpu(strict_fp32):
    """Whole-image boxes (scale and ratio 1) make the crop deterministic: the GPU's bilinear
    resampling, flips and the stacking of an image's views equal the CPU's."""
    x = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for flip in (0.0, 1.0):
        p = AugmentParams(out_size=20, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=flip)
        cpu = augment.crop_flip(x, p, torch.Generator().manual_seed(0), views=2)
        gpu = augment.crop_flip(x.to(CUDA), p, torch.Generator(CUDA).manual_seed(0), views=2)
        assert gpu.shape == (128, 3, 20, 20) and _rel(gpu, cpu) < 1e-5
        assert _rel(gpu[:64], gpu[64:]) < 1e-6  # both views of an image: the same whole box


def test_random_views_on_the_gpu_are_seeded_and_distributed_as_on_the_cpu():
    cfg = make_config(None, dict(dataset="digits"))
    p = AugmentParams.from_config(cfg, 32)
    x = torch.randint(0, 256, (2048, 3, 32, 32), generator=torch.Generator().manual_seed(2),
                      dtype=torch.uint8)
    xg = x.to(CUDA)
    a = augment.augment(xg, p, torch.Generator(CUDA).manual_seed(0), views=2)
    b = augment.augment(xg, p, torch.Generator(CUDA).manual_seed(0), views=2)
    c = augment.augment(xg, p, torch.Generator(CUDA).manual_seed(1), views=2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    cpu = augment.augment(x, p, torch.Generator().manual_seed(0), views=2)
    # Other random streams, the same distributions: per-channel means and spreads agree.
    for stat in (lambda t: t.mean(dim=(0, 2, 3)), lambda t: t.std(dim=(0, 2, 3))):
        assert torch.allclose(stat(a).cpu(), stat(cpu), atol=0.01)


def _cfg(**kw):
    base = dict(dataset="digits", width=8, proj_hidden=32, proj_dim=16, batch_size=128,
                epochs=2, view_size=12, progress=False, warmup_epochs=0.5, queue_size=512,
                knn_every=0)
    return make_config(None, {**base, **kw})


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_training_step_on_the_gpu_equals_the_cpu_step(method, strict_fp32):
    """The same initial networks and views: the loss and the weights after one step agree at
    fp32 rounding; under bf16 autocast the loss stays within bf16's precision."""
    cfg = _cfg(method=method)
    x = torch.randint(0, 256, (128, 3, 16, 16), generator=torch.Generator().manual_seed(3),
                      dtype=torch.uint8)
    mean, std = [0.5] * 3, [0.25] * 3
    cpu = build_method(cfg, CPU, 16, mean, std, 0.1, None, 128)
    gpu = build_method(cfg, CUDA, 16, mean, std, 0.1, None, 128)
    bf16 = build_method(cfg, CUDA, 16, mean, std, 0.1, torch.bfloat16, 128)
    for m in (cpu, gpu, bf16):
        m.train()
    v = cpu.views(x, torch.Generator().manual_seed(0))  # a batch, or a list (multi-crop)
    on_gpu = [t.to(CUDA) for t in v] if isinstance(v, list) else v.to(CUDA)
    losses = [float(cpu.update(v, 0.1)), float(gpu.update(on_gpu, 0.1)),
              float(bf16.update(on_gpu, 0.1))]
    assert abs(losses[1] - losses[0]) < 1e-4 * abs(losses[0])
    assert abs(losses[2] - losses[0]) < 3e-2 * abs(losses[0])
    for name, net in cpu.networks().items():
        ref = net.state_dict()
        for k, t in gpu.networks()[name].state_dict().items():
            if t.is_floating_point():
                assert _rel(t, ref[k]) < 1e-4, (name, k)


def test_pretrain_on_the_gpu_resumes_and_loads_on_the_cpu(digits, tmp_path, monkeypatch):
    cfg = _cfg(device="cuda")
    full = train.pretrain(cfg, digits, tmp_path / "full")
    assert full.steps == 2 * (1437 // 128)
    assert all(torch.isfinite(torch.tensor(full.losses)))
    real = interrupt_at(monkeypatch, 7)
    with pytest.raises(KeyboardInterrupt):
        train.pretrain(cfg, digits, tmp_path / "cut")
    assert checkpoint.load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["step"] == 7
    monkeypatch.setattr(METHODS["simclr"], "loss", real)
    resumed = train.pretrain(cfg, digits, tmp_path / "cut", resume=True)
    assert resumed.steps == full.steps
    # The same steps from the same state: equal up to the GPU's non-deterministic reductions.
    assert resumed.losses[0] == full.losses[0]
    assert max(abs(a - b) for a, b in zip(resumed.losses, full.losses, strict=True)) < 1e-2

    import selfsup

    on_cpu = selfsup.load_encoder(tmp_path / "full", device="cpu")
    on_gpu = selfsup.load_encoder(tmp_path / "full", device="cuda")
    images = digits.train_x[:256]
    a = on_cpu(images)
    b = on_gpu(images.to(CUDA))
    assert b.device.type == "cuda" and _rel(b, a) < 1e-2


def _selfsup(*args, cwd):
    return subprocess.run([sys.executable, "-m", "selfsup", *args], capture_output=True,
                          text=True, env=SRC_ENV, cwd=cwd, timeout=300)


def test_cli_run_and_budget_on_the_gpu(tmp_path):
    p = _selfsup("run", "--dataset", "digits", "--device", "cuda", "--epochs", "3",
                 "--out-dir", str(tmp_path), "--name", "g", "--no-progress", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "bf16 autocast (auto: this GPU supports bf16)" in p.stdout
    m = json.loads((tmp_path / "g" / "metrics.json").read_text())
    assert m["machine"]["gpu"] == torch.cuda.get_device_name(0)
    assert 0.5 < m["linear_probe"]["trained"] <= 1 and m["linear_probe"]["untrained"] > 0
    # The budget's sizing and timing on the GPU (CUDA events for the views' share).
    p = _selfsup("run", "--dataset", "digits", "--device", "cuda", "--budget", "20s",
                 "--out-dir", str(tmp_path), "--name", "b", "--no-progress", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "budget 20s: pretraining took" in p.stdout
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    assert cfg["steps"] > 0


def test_torchrun_with_nccl_on_one_gpu(tmp_path):
    p = subprocess.run([*torchrun(), "--standalone", "--nproc_per_node", "1", "-m", "selfsup",
                        "run", "--dataset", "digits", "--device", "cuda", "--epochs", "2",
                        "--out-dir", str(tmp_path), "--name", "t", "--no-progress"],
                       capture_output=True, text=True, env=SRC_ENV, cwd=tmp_path, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (tmp_path / "t" / "encoder.pt").is_file()


def test_an_image_stack_on_the_gpu_indexes_like_the_concatenation():
    """STL-10's labelled and unlabeled images as one stack, on the GPU: indexed there without
    a read-back (``ImageStack.gather``), the same images as the concatenation."""
    from selfsup.data import ImageStack

    parts = [torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8) for n in (50, 7, 130)]
    stack, whole = ImageStack(parts).to(CUDA), torch.cat(parts)
    idx = torch.randperm(len(whole), generator=torch.Generator().manual_seed(0))[:64]
    got = stack[idx.to(CUDA)]
    assert got.device.type == "cuda" and torch.equal(got.cpu(), whole[idx])
