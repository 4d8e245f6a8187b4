"""Pretraining speed of a preset, in three parts, on this machine.

(a) model only: forward, NT-Xent, backward and optimiser step on ready views;
(b) augmentation only: two views of a batch, normalised, in the model's memory format;
(c) the full step: batch indices, gather, augment, forward, loss, backward, step.

Each in images/s (one image = one pair of views), median of repeats after a warm-up, and the
ratio (c)/(a): how much of the model's speed the whole pipeline keeps. Random uint8 images of
the data set's size stand in for the data (speed does not depend on pixel values).

    python benchmarks/throughput.py --preset cpu
    python benchmarks/throughput.py --preset cpu --method dino --set prototypes=2048
    python benchmarks/throughput.py --preset cpu --compile   # the network through torch.compile
    python benchmarks/throughput.py --preset gpu --device cuda --compile reduce-overhead  # graphs
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from selfsup.config import choices_of, make_config
from selfsup.hardware import (
    describe_machine,
    keep_freed_memory,
    select_device,
    select_precision,
    sync,
)
from selfsup.methods import build_method


def _median_rate(fn, batch: int, device: torch.device, warm: int, repeats: int,
                 steps: int) -> float:
    for _ in range(warm):
        fn()
    sync(device)
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        sync(device)
        rates.append(batch * steps / (time.perf_counter() - t0))
    return statistics.median(rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--model", default=None, help="encoder (default: the preset's)")
    ap.add_argument("--method", default="simclr")
    ap.add_argument("--width", type=int, default=None, help="encoder width (default: the preset's)")
    ap.add_argument("--view-size", type=int, default=None, help="view side in px (preset's)")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--precision", default=None, choices=["auto", "fp32", "bf16"])
    ap.add_argument("--device", default=None)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--images", type=int, default=8192, help="images in the stand-in data set")
    ap.add_argument("--warm", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=4, help="steps per repeat")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="any other run setting, a method's own included (repeatable), e.g. "
                         "--set local_crops=0")
    ap.add_argument("--cudnn-benchmark", action="store_true",
                    help="CUDA: let cuDNN time its convolution algorithms for these shapes")
    ap.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                    choices=[c for c in choices_of("compile") if c != "off"],
                    help="the run's --compile MODE: the training pass through torch.compile "
                         "(default: 'default'; 'reduce-overhead' replays CUDA graphs on a GPU); "
                         "its compile time is printed and not counted in the rates")
    args = ap.parse_args()
    over = {k: v for k, v in (("model", args.model), ("batch_size", args.batch_size),
                              ("width", args.width), ("view_size", args.view_size),
                              ("method", args.method), ("compile", args.compile),
                              ("precision", args.precision), ("device", args.device))
            if v is not None}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--set {item}: expected KEY=VALUE")
        try:
            over[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            over[key.replace("-", "_")] = value  # a word: sgd, resnet18
    cfg = make_config(args.preset, over)
    keep_freed_memory()
    device = select_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    amp, why = select_precision(cfg.precision, device)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    b = cfg.batch_size
    g = torch.Generator().manual_seed(0)
    x_all = torch.randint(0, 256, (args.images, 3, args.image_size, args.image_size),
                          generator=g, dtype=torch.uint8).to(device)
    method = build_method(cfg, device, args.image_size, [0.5] * 3, [0.25] * 3, 0.1, amp, b)
    method.train()
    compile_s = 0.0
    if args.compile:  # the method compiled its training pass (Method._adopt)
        t0 = time.perf_counter()
        method.update(method.views(x_all[:b], torch.Generator(device=device).manual_seed(1)),
                      1e-3)  # the first call compiles
        sync(device)
        compile_s = time.perf_counter() - t0
    gen = torch.Generator(device=device).manual_seed(0)
    ready = method.views(x_all[:b], gen)
    order = torch.randperm(args.images, device=device)
    pos = {"i": 0}

    def full() -> None:
        i = pos["i"] = (pos["i"] + b) % (args.images - b)
        method.step(x_all[order[i:i + b]], 1e-3, gen)

    rate = {}
    for name, fn in (("model", lambda: method.update(ready, 1e-3)),
                     ("augment", lambda: method.views(x_all[:b], gen)),
                     ("full", full)):
        rate[name] = _median_rate(fn, b, device, args.warm, args.repeats, args.steps)

    print(describe_machine(device))
    print(f"preset {args.preset}: {cfg.model} width {cfg.width}, views "
          f"{cfg.view_size or args.image_size}px from {args.image_size}px, batch {b}, "
          f"precision {why}{', cudnn.benchmark' if args.cudnn_benchmark else ''}"
          + (f", torch.compile {args.compile} (first step {compile_s:.0f} s)"
             if args.compile else ""))
    print(f"(a) model only        {rate['model']:8.0f} images/s")
    print(f"(b) augmentation only {rate['augment']:8.0f} images/s")
    print(f"(c) full step         {rate['full']:8.0f} images/s")
    print(f"ratio (c)/(a)         {rate['full'] / rate['model']:8.2f}")


if __name__ == "__main__":
    main()
