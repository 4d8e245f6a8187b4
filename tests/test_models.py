import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from selfsup.models import ENCODERS, Conv3x3, ProjectionHead, build_encoder, nhwc_safe_on_cpu

WIDTHS = {"small_cnn": 8, "fast_cnn": 8, "resnet18": 8, "resnet50": 4, "vit_tiny": 4,
          "vit_micro": 8}


@pytest.mark.parametrize("name", list(ENCODERS))
def test_forward_backward_every_parameter(name):
    torch.manual_seed(0)
    enc = build_encoder(name, WIDTHS.get(name, 8))
    head = ProjectionHead(enc.feature_dim, 32, 16)
    x = torch.randn(4, 3, 32, 32)
    h = enc(x)
    assert h.shape == (4, enc.feature_dim)
    z = head(h)
    assert z.shape == (4, 16)
    z.pow(2).sum().backward()
    for n, p in list(enc.named_parameters()) + list(head.named_parameters()):
        assert p.grad is not None, n
        assert torch.isfinite(p.grad).all(), n
    assert any(p.grad.abs().sum() > 0 for p in enc.parameters())


def test_feature_widths():
    assert build_encoder("small_cnn", 32).feature_dim == 256
    assert build_encoder("resnet18", 64).feature_dim == 512
    assert build_encoder("resnet50", 64).feature_dim == 2048


def test_cifar_stem_keeps_resolution():
    enc = build_encoder("resnet18", 8)
    conv = enc.stem[0]
    assert conv.kernel_size == (3, 3) and conv.stride == (1, 1)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in enc.modules())


def test_small_inputs_work():
    enc = build_encoder("small_cnn", 8)
    assert enc(torch.randn(2, 3, 16, 16)).shape == (2, 64)


def test_unknown_model():
    with pytest.raises(KeyError, match="valid models"):
        build_encoder("vit", 8)


@pytest.mark.parametrize("name,width,safe", [
    ("small_cnn", 4, True),    # no 1x1 convolutions
    ("resnet18", 64, True),    # strided 1x1 shortcuts see 64 and 128 channels
    ("resnet18", 16, True),    # 16 and 32 channels at the strided shortcuts
    ("resnet18", 8, False),    # 8 channels: below the AVX-512 channel block
    ("resnet18", 4, False),    # 4 -> 8 channels, stride 2: the hang seen with AVX2
    ("resnet50", 2, False),    # layer2's shortcut sees 4 * 2 = 8 channels
])
def test_nhwc_guard_finds_small_strided_1x1(name, width, safe):
    enc = build_encoder(name, width)
    assert nhwc_safe_on_cpu(enc) is safe
    from selfsup.methods import use_channels_last

    cpu = torch.device("cpu")
    assert use_channels_last(enc, True, cpu, verbose=False) is safe
    assert use_channels_last(enc, False, cpu, verbose=False) is False
    assert use_channels_last(enc, True, torch.device("meta"), verbose=False) is True


@pytest.mark.parametrize("size", [(1, 1), (1, 2), (2, 1), (2, 2), (3, 3), (5, 4)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv3x3_equals_the_convolution(size, channels_last):
    """The matrix-product path (inputs up to 2x2) gives the convolution's output and gradients."""
    torch.manual_seed(0)
    conv = Conv3x3(6, 10)
    x = torch.randn(4, 6, *size)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    w_ref = conv.weight.detach().clone().requires_grad_(True)
    y, y_ref = conv(x), F.conv2d(x_ref, w_ref, padding=1)
    assert y.shape == y_ref.shape == (4, 10, *size)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y_ref)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(conv.weight.grad, w_ref.grad, rtol=1e-5, atol=1e-5)


def test_conv3x3_is_a_drop_in_conv2d():
    conv, ref = Conv3x3(3, 8), nn.Conv2d(3, 8, 3, padding=1, bias=False)
    assert conv.state_dict().keys() == ref.state_dict().keys()
    ref.load_state_dict(conv.state_dict())  # old checkpoints load into it and back


def test_fast_cnn_pools_before_norm():
    """fast_cnn: same parameters as small_cnn, each max-pool before its batch norm and ReLU."""
    slow, fast = build_encoder("small_cnn", 8), build_encoder("fast_cnn", 8)
    count = [sum(p.numel() for p in m.parameters()) for m in (slow, fast)]
    assert count[0] == count[1]
    kinds = [type(m).__name__ for m in fast.features]
    assert kinds[:4] == ["Conv3x3", "MaxPool2d", "BatchNorm2d", "ReLU"]
    assert [type(m).__name__ for m in slow.features][:4] == ["Conv3x3", "BatchNorm2d", "ReLU",
                                                            "MaxPool2d"]
    assert fast.feature_dim == 64 and fast(torch.randn(2, 3, 16, 16)).shape == (2, 64)


def test_vit_attention_equals_the_naive_computation():
    from selfsup.models import Block

    torch.manual_seed(0)
    blk = Block(dim=12, heads=3, mlp_ratio=2.0)
    x = torch.randn(2, 5, 12)
    b, t, d, nh = 2, 5, 12, 3
    qkv = blk.qkv(blk.norm1(x)).view(b, t, 3, nh, d // nh)
    out = torch.zeros(b, t, d)
    for i in range(b):
        for h in range(nh):
            q, k, v = qkv[i, :, 0, h], qkv[i, :, 1, h], qkv[i, :, 2, h]  # (T, d/heads)
            a = torch.softmax(q @ k.t() / (d // nh) ** 0.5, dim=-1)
            out[i, :, h * 4:(h + 1) * 4] = a @ v
    y = x + blk.proj(out)
    y = y + blk.mlp(blk.norm2(y))
    torch.testing.assert_close(blk(x), y, rtol=1e-5, atol=1e-5)


def test_vit_positions_fixed_and_any_image_size():
    from selfsup.models import sincos_positions

    pos = sincos_positions(4, 4, 32, torch.device("cpu"), torch.float32)
    assert pos.shape == (16, 32) and len({tuple(r.tolist()) for r in pos}) == 16
    # The rows of a 4x4 grid are those of an 8x8 grid at the same (row, column).
    big = sincos_positions(8, 8, 32, torch.device("cpu"), torch.float32).view(8, 8, 32)
    torch.testing.assert_close(pos.view(4, 4, 32), big[:4, :4])
    enc = build_encoder("vit_micro", 8)
    assert not any("pos" in k for k in enc.state_dict())  # nothing tied to one grid size
    for side in (12, 16, 20, 32):
        assert enc(torch.randn(2, 3, side, side)).shape == (2, 32)
    assert build_encoder("vit_micro", 32).feature_dim == 128
    assert build_encoder("vit_tiny", 32).feature_dim == 192


def test_vit_positions_are_in_image_coordinates():
    """Issue 28: positions were counted in tokens, so a ViT trained on 16 px views (4x4 tokens
    at patch 4) met positions 4-7 it never saw on 32 px images, and position 3 meant another
    place in the image. Now each token's position is its centre in training-token units."""
    from selfsup.config import make_config
    from selfsup.models import init_encoder, sincos_positions

    enc = init_encoder(make_config(None, {"model": "vit_micro", "view_size": 16}))
    assert enc.grid == 4
    d, cpu = enc.feature_dim, torch.device("cpu")

    def rows_at(table: torch.Tensor, side: int, pos: torch.Tensor) -> bool:
        # The row channels' first frequency (1 rad per unit) holds sin and cos of the position.
        first = table.view(side, side, d)[:, 0]  # one token per row
        return bool(torch.allclose(first[:, 0], pos.sin(), atol=1e-5)
                    and torch.allclose(first[:, d // 4], pos.cos(), atol=1e-5))

    own = sincos_positions(4, 4, d, cpu, torch.float32, enc.grid)
    assert torch.equal(own, sincos_positions(4, 4, d, cpu, torch.float32))  # views: unchanged
    assert rows_at(own, 4, torch.arange(4.0))
    big = sincos_positions(8, 8, d, cpu, torch.float32, enc.grid)
    assert rows_at(big, 8, torch.arange(8.0) / 2 - 0.25)  # -0.25, 0.25, ..., 3.25
    x = torch.rand(2, 3, 32, 32)
    plain = init_encoder(make_config(None, {"model": "vit_micro", "view_size": 0}))
    assert plain.grid == 0 and not torch.allclose(plain(x), enc(x))  # the encoder uses them


def test_avgmax_pool_puts_the_last_map_s_mean_and_maximum_side_by_side():
    """--pool avgmax: the features are the last convolution's map averaged and maxed over its
    positions (2 m w of them), from the same weights as the mean alone (the default, which is
    the network's output as before: its last map averaged)."""
    from selfsup.config import make_config
    from selfsup.models import init_encoder

    for name in ("small_cnn", "fast_cnn"):
        plain = init_encoder(make_config(None, {"model": name, "width": 8})).eval()
        both = init_encoder(make_config(None, {"model": name, "width": 8, "pool": "avgmax"}))
        both.eval()
        assert plain.state_dict().keys() == both.state_dict().keys()
        both.load_state_dict(plain.state_dict())
        x = torch.randn(3, 3, 32, 32)
        last = plain.features(x)  # (3, 64, 4, 4): a map with positions to pool over
        assert last.shape[1:] == (64, 4, 4) and both.feature_dim == 128
        torch.testing.assert_close(plain(x), torch.nn.functional.adaptive_avg_pool2d(last, 1)
                                   .flatten(1))
        torch.testing.assert_close(both(x), torch.cat([last.mean((2, 3)), last.amax((2, 3))], 1))


def test_feature_mult_widens_the_last_convolution_only():
    """--feature-mult m: small_cnn and fast_cnn end in m w channels (m w features); the first
    three stages, and the default (8), stay as they were."""
    from selfsup.config import make_config
    from selfsup.models import init_encoder

    for name in ("small_cnn", "fast_cnn"):
        plain = init_encoder(make_config(None, {"model": name, "width": 8}))
        wide = init_encoder(make_config(None, {"model": name, "width": 8, "feature_mult": 16}))
        assert (plain.feature_dim, wide.feature_dim) == (64, 128)
        assert wide(torch.randn(2, 3, 20, 20)).shape == (2, 128)
        ps, ws = plain.state_dict(), wide.state_dict()
        assert ps.keys() == ws.keys()
        differ = {k for k in ps if ps[k].shape != ws[k].shape}
        last = [k for k in ps if ps[k].dim() == 4][-1].rsplit(".", 1)[0]  # the last conv
        assert differ and all(k.startswith(last) or ws[k].shape[0] == 128 for k in differ)
        assert ws[f"{last}.weight"].shape == (128, 32, 3, 3)


def test_benchmark_cnn_variants_make_the_named_layers_cheaper(monkeypatch):
    """benchmarks/cnn_variants.py (a plugin for measuring cheaper layers) builds what it names:
    fast_cnn's feature dimension, with the second and third convolutions strided and no pooling
    after them, or a 1x1 last convolution; and fewer multiply-adds on 16 px views."""
    from pathlib import Path

    from selfsup import config, models, plugins

    monkeypatch.setattr(models, "ENCODERS", dict(models.ENCODERS))  # the registry left as found
    monkeypatch.setitem(config.PLUGINS, "model", dict(config.PLUGINS["model"]))
    monkeypatch.delitem(sys.modules, "selfsup_plugin_cnn_variants", raising=False)
    plugins._import_file(Path(__file__).parents[1] / "benchmarks" / "cnn_variants.py")

    def macs(enc: nn.Module) -> int:
        total = 0

        def count(m, _inp, out):
            nonlocal total
            total += out[0].numel() * m.in_channels * m.kernel_size[0] * m.kernel_size[1]

        hooks = [m.register_forward_hook(count) for m in enc.modules() if isinstance(m, nn.Conv2d)]
        enc(torch.randn(1, 3, 16, 16))
        for h in hooks:
            h.remove()
        return total

    base = build_encoder("fast_cnn", 8, {"feature_mult": 16})
    convs = {}
    for name in ("fcnn_s2", "fcnn_s3", "fcnn_k1", "fcnn_s2k1"):
        enc = models.build_encoder(name, 8, {"feature_mult": 16})
        assert enc.feature_dim == base.feature_dim == 128
        assert enc(torch.randn(2, 3, 16, 16)).shape == (2, 128)
        assert macs(enc) < macs(base)
        convs[name] = [m for m in enc.modules() if isinstance(m, nn.Conv2d)]
        pools = sum(isinstance(m, nn.MaxPool2d) for m in enc.modules())
        strided = [m.stride == (2, 2) for m in convs[name]]
        assert pools + sum(strided) == 3, name  # every variant halves the map three times
    assert [c.stride for c in convs["fcnn_s2"]] == [(1, 1), (2, 2), (2, 2), (1, 1)]
    assert [c.stride for c in convs["fcnn_s3"]] == [(1, 1), (1, 1), (2, 2), (1, 1)]
    assert [c.kernel_size for c in convs["fcnn_k1"]] == [(3, 3)] * 3 + [(1, 1)]
    assert [(c.stride, c.kernel_size) for c in convs["fcnn_s2k1"]][1:] == [
        ((2, 2), (3, 3)), ((2, 2), (3, 3)), ((1, 1), (1, 1))]
    assert "fcnn_s2" not in ENCODERS  # imported into the test's copy of the registry only
