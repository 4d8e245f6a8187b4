"""Images/s of the real pretraining loop (``train.pretrain``) under the ways a step can make its
views, on stand-in data of CIFAR-10's size (speed does not depend on pixel values).

Variants: ``grouped`` (colour jitters per group of images: reads each group's size back from
the device, 16 times a step), ``whole`` (every image through every jitter, no read-back) and
``whole+ahead`` (also the next step's views drawn before this step's loss is read back). The
defaults are ``grouped`` on the CPU and ``whole+ahead`` on GPUs. Each variant runs ``--steps``
steps without monitors after a short warm-up run; the figure is the loop's own images/s.

    python benchmarks/loop_speed.py --preset gpu --device cuda --steps 300
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from selfsup import augment, train
from selfsup.config import make_config
from selfsup.data import ImageData
from selfsup.hardware import describe_machine, select_device

VARIANTS = {"grouped": (True, False), "whole": (False, False), "whole+ahead": (False, True)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="gpu")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--images", type=int, default=50_000)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--model", default=None)
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--view-size", type=int, default=None)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (args.images, 3, 32, 32), generator=g, dtype=torch.uint8)
    data = ImageData(x, None, None, None, [], "stand-in")
    over = {k: v for k, v in (("model", args.model), ("width", args.width),
                              ("view_size", args.view_size)) if v is not None}
    print(describe_machine(select_device(args.device)))
    for name in args.variants.split(","):
        augment.GROUPED_JITTERS, train.views.VIEWS_AHEAD = VARIANTS[name]
        rates = []
        for steps in (20, args.steps):  # a short warm-up run, then the timed one
            cfg = make_config(args.preset, dict(device=args.device, steps=steps, budget="",
                                                knn_every=0, progress=False, **over))
            with tempfile.TemporaryDirectory() as d:
                rates.append(train.pretrain(cfg, data, d).images_per_s)
        print(f"{name:12s} {rates[-1]:8.0f} images/s  ({cfg.model} width {cfg.width}, batch "
              f"{cfg.batch_size}, {args.steps} steps)", flush=True)


if __name__ == "__main__":
    main()
