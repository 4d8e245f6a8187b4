import pytest
import torch

from selfsup.models import ENCODERS, ProjectionHead, build_encoder, nhwc_safe_on_cpu

WIDTHS = {"small_cnn": 8, "resnet18": 8, "resnet50": 4}


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
    from selfsup.train import use_channels_last

    cpu = torch.device("cpu")
    assert use_channels_last(enc, True, cpu, verbose=False) is safe
    assert use_channels_last(enc, False, cpu, verbose=False) is False
    assert use_channels_last(enc, True, torch.device("meta"), verbose=False) is True
