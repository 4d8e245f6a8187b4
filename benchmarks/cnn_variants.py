"""Variants of the ``fast_cnn`` encoder that cost fewer operations a step, as a plugin.

Each is ``fast_cnn`` (conv-max-pool-BN-ReLU at widths w, 2w, 4w, then conv-BN-ReLU at m w and
the mean over the map) with some of its layers made cheaper, for measuring whether the epochs
that buy win back what the layer gave:

- ``fcnn_s2``: the second and third convolutions stride 2 instead of max-pooled after (each a
  quarter of the multiply-adds);
- ``fcnn_s3``: the third alone stride 2;
- ``fcnn_k1``: the last convolution 1x1 instead of 3x3 (on the 2x2 map of 16 px views, a
  quarter of the multiply-adds);
- ``fcnn_s2k1``: both.

They take ``fast_cnn``'s settings (``--feature-mult``, ``--pool``). Load with the plugin
variable, then name one as the model:

    SELFSUP_PLUGINS=benchmarks/cnn_variants.py selfsup run --preset cpu --model fcnn_s2 \\
        --width 32 --view-size 16 --feature-mult 16 --dataset folder --data-dir DIR
    SELFSUP_PLUGINS=benchmarks/cnn_variants.py python benchmarks/throughput.py --model fcnn_k1 \\
        --width 32 --view-size 16

Not part of selfsup: on the AVX2 host neither cheaper layer paid for its epochs (BENCHMARKS.md,
"On the AVX2 host: cheaper layers for more epochs").
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from selfsup.models import Encoder, SmallCNN, SmallCNNSettings, _conv_bn_relu, register

# per layer: "pool" (3x3 conv, 2x2 max-pool), "stride" (3x3 conv, stride 2), "last" (3x3 conv),
# "k1" (1x1 conv); each followed by batch norm and ReLU
VARIANTS = {
    "fcnn_s2": ("pool", "stride", "stride", "last"),
    "fcnn_s3": ("pool", "pool", "stride", "last"),
    "fcnn_k1": ("pool", "pool", "pool", "k1"),
    "fcnn_s2k1": ("pool", "stride", "stride", "k1"),
}


def _layer(cin: int, cout: int, kind: str) -> list[nn.Module]:
    if kind in ("pool", "last"):  # fast_cnn's own layers
        return _conv_bn_relu(cin, cout, pool=kind == "pool", pool_first=True)
    conv = (nn.Conv2d(cin, cout, 3, 2, 1, bias=False) if kind == "stride"
            else nn.Conv2d(cin, cout, 1, bias=False))  # "k1"
    return [conv, nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def _builder(kinds: tuple[str, ...]) -> Callable[[int, SmallCNNSettings], Encoder]:
    def build(width: int, s: SmallCNNSettings) -> Encoder:
        net = SmallCNN(width, pool_first=True, feature_mult=s.feature_mult, pool=s.pool)
        chans = [3, width, 2 * width, 4 * width, s.feature_mult * width]
        net.features = nn.Sequential(*[m for i, kind in enumerate(kinds)
                                       for m in _layer(chans[i], chans[i + 1], kind)])
        return net

    return build


for _name, _kinds in VARIANTS.items():
    register(_name, settings=SmallCNNSettings)(_builder(_kinds))
