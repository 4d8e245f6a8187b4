"""Encoders by name, and the projection head.

Every encoder maps (B, 3, H, W) images to pooled features h of width ``feature_dim``; the
projection head g maps h to z (SimCLR section 2.1). Register a new encoder with ``@register``,
in this module or in one of your own (``SELFSUP_PLUGINS``, see ``selfsup.plugins``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from selfsup.config import PLUGINS, Config, Plugin, Range, declare, setting, settings_from

# name -> constructor: f(width) -> Encoder, or f(width, settings) for an encoder that declares
# settings of its own (``register(name, settings=...)``)
ENCODERS: dict[str, Callable[..., Encoder]] = {}


class Encoder(nn.Module):
    """Base class: ``forward`` returns pooled features (B, feature_dim)."""

    feature_dim: int

    def set_view_size(self, side: int) -> None:
        """The side of the views it is trained on (0: the images' own), for encoders whose
        features depend on it (a ViT's positions); others ignore it."""


def register(name: str, settings: type | None = None
             ) -> Callable[[Callable[..., Encoder]], Callable[..., Encoder]]:
    """Decorator: make an encoder constructor available by name (``--model name``):
    ``f(width) -> Encoder``, or ``f(width, settings)`` with ``settings`` a dataclass of
    ``config.setting`` fields, its own options (``--patch-size``, ...)."""

    def deco(fn: Callable[..., Encoder]) -> Callable[..., Encoder]:
        ENCODERS[name] = fn
        declare(Plugin("model", name, settings))
        return fn

    return deco


def build_encoder(name: str, width: int, options: dict[str, Any] | None = None) -> Encoder:
    """Construct a registered encoder; ``options``: a config's plugin settings (its own read
    from them; their defaults when None).

    Raises:
        KeyError: unknown name (the message lists the valid ones).
    """
    if name not in ENCODERS:
        raise KeyError(f"unknown model {name!r}; valid models: {', '.join(ENCODERS)}")
    own = PLUGINS["model"][name].settings
    if own is None:
        return ENCODERS[name](width)
    return ENCODERS[name](width, settings_from(own, options or {}))


def init_encoder(cfg: Config) -> Encoder:
    """The encoder at its initial weights: a function of the config's model, width and seed.

    The untrained baseline is this same call, so it is the exact network pretraining started from.
    """
    torch.manual_seed(cfg.seed)
    encoder = build_encoder(cfg.model, cfg.width, cfg.options)
    encoder.set_view_size(cfg.view_size)
    return encoder


@torch.no_grad()
def in_batches(fn: Callable[[torch.Tensor], torch.Tensor], x: Any, batch_size: int,
               device: torch.device, model: nn.Module) -> torch.Tensor | None:
    """``fn`` of ``x`` (N, ...) batch by batch on ``device``, with ``model`` in eval mode (its
    mode restored after), the outputs joined on the CPU; None when ``x`` is empty. The one
    batched eval-mode forward of embedding, prediction and the monitors."""
    was = model.training
    model.eval()
    try:
        out = [fn(x[i:i + batch_size].to(device)).cpu() for i in range(0, len(x), batch_size)]
    finally:
        model.train(was)
    return torch.cat(out) if out else None


def nhwc_safe_on_cpu(model: nn.Module) -> bool:
    """Whether the CPU convolution kernels handle this model in NHWC (channels-last) format.

    The CPU convolution library under PyTorch (oneDNN) computes the weight gradient of a strided
    1x1 convolution in NHWC through a workspace that it overruns when the input has fewer
    channels than its channel block (8 with AVX2, 16 with AVX-512): a hang with 2 threads or a
    crash, seen here with a ResNet-18 of width 4. Such models must stay NCHW on CPU.
    """
    return not any(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.stride != (1, 1)
                   and m.in_channels < 16 for m in model.modules())


class Conv3x3(nn.Conv2d):
    """A 3x3, stride-1, padding-1 convolution without bias, computed as one matrix product when
    the input is at most 2x2.

    At 2x2 every output position sees every input position, so the convolution is x (B, HWC)
    times a (HWC, HWO) matrix gathered from the kernel: 4 of the 9 taps per output position
    instead of 9 with zero padding, and a plain matrix product, whose backward pass the CPU runs
    far faster than the convolution's (BENCHMARKS.md, "Figures that were code comments"). Same
    parameters and state dict as ``nn.Conv2d``; larger inputs take the convolution.
    """

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(cin, cout, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        if h > 2 or w > 2:
            return super().forward(x)
        pos = [(i, j) for i in range(h) for j in range(w)]
        k = self.weight  # (O, C, 3, 3); input q feeds output p through tap q - p + 1
        m = torch.cat([torch.cat([k[:, :, q[0] - p[0] + 1, q[1] - p[1] + 1].t() for p in pos], 1)
                       for q in pos])  # (HW*C, HW*O), rows (q, c), columns (p, o)
        y = x.permute(0, 2, 3, 1).reshape(b, h * w * c) @ m.to(x.dtype)
        return y.view(b, h, w, -1).permute(0, 3, 1, 2)  # (B, O, H, W), channels-last strides


def _conv_bn_relu(cin: int, cout: int, pool: bool, pool_first: bool) -> list[nn.Module]:
    conv, norm = Conv3x3(cin, cout), [nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    if not pool:
        return [conv, *norm]
    return [conv, nn.MaxPool2d(2), *norm] if pool_first else [conv, *norm, nn.MaxPool2d(2)]


class SmallCNN(Encoder):
    """A fast 4-stage CNN: conv-BN-ReLU at widths w, 2w, 4w, m w, max-pool after the first
    three; m = ``feature_mult`` (8 by default) sets the features' dimension m w: the last map's
    mean over its positions, or with ``pool`` "avgmax" its mean and maximum side by side (2 m w;
    the same weights; not better than the mean at equal work on an AVX2 host, BENCHMARKS.md).

    With w=32 and m=8 it has 0.39 M parameters and 256-d features; it is the default model.
    ``pool_first`` (the ``fast_cnn`` model, the ``cpu`` preset's) max-pools each of the first
    three convolutions' outputs before its batch norm and ReLU, so these run on a quarter of the
    values: the same parameters, a different function, and a faster training step on a CPU.
    """

    def __init__(self, width: int = 32, pool_first: bool = False, feature_mult: int = 8,
                 pool: str = "avg") -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            *_conv_bn_relu(3, w, True, pool_first),
            *_conv_bn_relu(w, 2 * w, True, pool_first),
            *_conv_bn_relu(2 * w, 4 * w, True, pool_first),
            *_conv_bn_relu(4 * w, feature_mult * w, False, pool_first),
        )
        self.pool = pool
        self.feature_dim = feature_mult * w * (2 if pool == "avgmax" else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.features(x)  # (B, feature_mult * w, h, w)
        avg = y.mean((2, 3))
        if self.pool == "avgmax":
            return torch.cat([avg, y.amax((2, 3))], 1)  # (B, 2 feature_mult w)
        return avg  # (B, feature_mult * w)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int) -> None:
        super().__init__()
        cout = planes * self.expansion
        self.body = nn.Sequential(
            nn.Conv2d(cin, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes),
            nn.ReLU(inplace=True),
            nn.Conv2d(planes, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout),
        )
        self.short = _shortcut(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.short(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int) -> None:
        super().__init__()
        cout = planes * self.expansion
        self.body = nn.Sequential(
            nn.Conv2d(cin, planes, 1, bias=False), nn.BatchNorm2d(planes), nn.ReLU(inplace=True),
            nn.Conv2d(planes, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes),
            nn.ReLU(inplace=True),
            nn.Conv2d(planes, cout, 1, bias=False), nn.BatchNorm2d(cout),
        )
        self.short = _shortcut(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.short(x))


def _shortcut(cin: int, cout: int, stride: int) -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class CifarResNet(Encoder):
    """ResNet with the CIFAR stem: a 3x3 stride-1 first conv and no max-pool (SimCLR B.9)."""

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: list[int],
                 width: int = 64) -> None:
        super().__init__()
        # CIFAR stem: keeps the 32x32 resolution for the first stage.
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        stages: list[nn.Module] = []
        cin = width
        for i, n in enumerate(layers):
            planes = width * 2**i
            for j in range(n):
                stages.append(block(cin, planes, 2 if (i > 0 and j == 0) else 1))
                cin = planes * block.expansion
        self.stages = nn.Sequential(*stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.feature_dim = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.stages(self.stem(x)))  # (B, feature_dim)


@dataclass(frozen=True)
class SmallCNNSettings:
    feature_mult: int = setting(8, "the last convolution's width as a multiple of --width (the "
                                "features' dimension)", Range(1, 64))
    pool: str = setting("avg", "how the last convolution's map becomes the features: its mean, "
                        "or its mean and maximum side by side (twice the dimension)",
                        choices=("avg", "avgmax"))


@register("small_cnn", settings=SmallCNNSettings)
def small_cnn(width: int, s: SmallCNNSettings) -> Encoder:
    return SmallCNN(width, feature_mult=s.feature_mult, pool=s.pool)


@register("fast_cnn", settings=SmallCNNSettings)
def fast_cnn(width: int, s: SmallCNNSettings) -> Encoder:
    return SmallCNN(width, pool_first=True, feature_mult=s.feature_mult, pool=s.pool)


@register("resnet18")
def resnet18(width: int) -> Encoder:
    return CifarResNet(BasicBlock, [2, 2, 2, 2], width)  # 512-d features at width 64


@register("resnet50")
def resnet50(width: int) -> Encoder:
    return CifarResNet(Bottleneck, [3, 4, 6, 3], width)  # 2048-d features at width 64


def sincos_positions(h: int, w: int, dim: int, device: torch.device, dtype: torch.dtype,
                     grid: int = 0) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embeddings (MAE, MoCo v3) for an h x w grid of tokens.

    Half the channels encode the row, half the column, each as sines and cosines of the position
    at ``dim / 4`` frequencies. Positions are in image coordinates: with ``grid`` (the tokens
    per side of the training views) a token's position is its centre in units of a training
    token, so the 8x8 tokens of a 32 px image lie at -0.25, 0.25, ..., 3.25 across the same
    0-3 span as the 4x4 tokens of the 16 px views it trained on (the fixed-table analogue of
    the interpolated positions of DeiT and FixRes). ``grid`` 0: positions 0, 1, ... as counted.

    Returns:
        (h * w, dim), rows in row-major token order.
    """
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter)
    rows = torch.arange(h, device=device, dtype=torch.float32)
    cols = torch.arange(w, device=device, dtype=torch.float32)
    if grid > 0:
        rows = (rows + 0.5) * (grid / h) - 0.5
        cols = (cols + 0.5) * (grid / w) - 0.5
    ys, xs = torch.meshgrid(rows, cols, indexing="ij")
    parts = []
    for pos in (ys.reshape(-1), xs.reshape(-1)):
        angle = pos[:, None] * omega[None, :]  # (T, dim/4)
        parts += [angle.sin(), angle.cos()]
    emb = torch.cat(parts, dim=1)  # (T, 4 * quarter)
    if emb.shape[1] < dim:  # dim not a multiple of 4: pad with zeros
        emb = torch.nn.functional.pad(emb, (0, dim - emb.shape[1]))
    return emb.to(dtype)


class Block(nn.Module):
    """A pre-norm transformer block: x + MSA(LN(x)), then x + MLP(LN(x)) (ViT, section 3.1)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        a = torch.nn.functional.scaled_dot_product_attention(  # (B, heads, T, d/heads)
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


class ViT(Encoder):
    """A Vision Transformer for small images: non-overlapping ``patch`` x ``patch`` patches
    embedded linearly, fixed 2-D sine-cosine positions, ``depth`` pre-norm blocks, a final
    LayerNorm, and features that are the mean of the token outputs.

    Mean pooling instead of a class token: every token's output feeds the features, which suits
    the few tokens of a 16-24 px view (4x4-6x6 at patch 4) and any token count at evaluation
    time; MoCo v3 and MAE report mean pooling as good as the class token, and it costs no token.
    """

    def __init__(self, dim: int, depth: int, heads: int, patch: int, mlp_ratio: float = 4.0
                 ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"ViT width {dim} is not divisible by its {heads} heads")
        self.patch = patch
        self.grid = 0  # tokens per side of the training views (set_view_size); 0: as counted
        self.embed = nn.Conv2d(3, dim, patch, stride=patch)  # (B, dim, H/p, W/p)
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_ratio) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.feature_dim = dim
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def set_view_size(self, side: int) -> None:
        self.grid = side // self.patch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x)  # (B, D, h, w)
        b, d, h, w = t.shape
        t = t.flatten(2).transpose(1, 2)  # (B, h*w, D)
        t = t + sincos_positions(h, w, d, t.device, t.dtype, self.grid)
        return self.norm(self.blocks(t).mean(dim=1))  # (B, D)


@register("vit_tiny")
def vit_tiny(width: int) -> Encoder:
    """ViT-Tiny (DeiT's: 12 blocks of width 192, 3 heads) at the default width 32 (192 = 6w),
    patch 4: 64 tokens for a 32 px image. A GPU model: on 2 CPU cores a step takes seconds."""
    dim = 6 * width
    return ViT(dim, depth=12, heads=max(1, dim // 64), patch=4)


@register("vit_micro")
def vit_micro(width: int) -> Encoder:
    """The small sibling for CPUs: 6 blocks of width 4w (128 at w=32), heads of 32 channels,
    MLP ratio 2, patch 4 (16 tokens for a 16 px view, 64 for a 32 px image)."""
    dim = 4 * width
    return ViT(dim, depth=6, heads=max(1, dim // 32), patch=4, mlp_ratio=2.0)


class ProjectionHead(nn.Module):
    """g(h) = W2 ReLU(BN(W1 h)): the 2-layer MLP of SimCLR, (B, in_dim) -> (B, out_dim); with
    ``layers`` > 2, that many linear layers, each but the last followed by batch norm and ReLU
    (the 3-layer projectors of Barlow Twins and VICReg)."""

    def __init__(self, in_dim: int, hidden: int = 512, out_dim: int = 128, layers: int = 2
                 ) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        for k in range(layers - 1):
            blocks += [nn.Linear(in_dim if k == 0 else hidden, hidden, bias=False),
                       nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
        self.net = nn.Sequential(*blocks, nn.Linear(hidden if layers > 1 else in_dim, out_dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)
