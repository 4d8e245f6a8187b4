"""How steady one network's step time is on this machine, and what the allocator does to it.

Steps the sizing ladder's first rungs (``fast_cnn`` w32 / 16 px, w48 / 20 px, w64 / 20 px) in
turn, ``--block`` steps each, for ``--seconds``, and prints per network the median of every
block, the median and the mean step, and the process's user and kernel CPU seconds.
``--default-allocator`` leaves glibc's malloc as it starts (freed large blocks unmapped)
instead of ``hardware.keep_freed_memory``; run it in a fresh process each way.

    python benchmarks/step_noise.py --data-dir /work/data/cifar10-jpg [--default-allocator]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time

import torch

from selfsup.config import make_config
from selfsup.data import channel_stats
from selfsup.datasets import load_for
from selfsup.hardware import describe_machine, keep_freed_memory, select_device, select_precision
from selfsup.methods import build_method
from selfsup.sizing import LADDER


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--seconds", type=float, default=80.0)
    ap.add_argument("--block", type=int, default=10)
    ap.add_argument("--default-allocator", action="store_true")
    args = ap.parse_args()
    if not args.default_allocator:
        keep_freed_memory()
    cfg = make_config("cpu", dict(dataset="folder", data_dir=args.data_dir))
    device = select_device(cfg.device)
    data = load_for(cfg, pretraining=True)
    mean, std = channel_stats(data.train_x)
    amp, why = select_precision(cfg.precision, device)
    print(describe_machine(device), f"precision {why}", f"allocator "
          f"{'as it starts' if args.default_allocator else 'keeps freed memory'}", sep="\n")
    x, batch = data.train_x.to(device), cfg.batch_size
    nets = {}
    for rung in LADDER[:3]:
        c = dataclasses.replace(cfg, **rung)
        nets[f"w{c.width}/{c.view_size}px"] = build_method(c, device, 32, mean, std, 0.01, amp,
                                                           batch)
    gen = torch.Generator(device=device).manual_seed(1)
    times: dict[str, list[float]] = {name: [] for name in nets}
    cpu0, end, i = os.times(), time.perf_counter() + args.seconds, 0
    while time.perf_counter() < end:
        for name, net in nets.items():
            net.train()
            for _ in range(args.block):
                start = i * batch % (len(x) - batch)
                i += 1
                t0 = time.perf_counter()
                net.step(x[start:start + batch], 0.01, gen)
                times[name].append(time.perf_counter() - t0)
    cpu1 = os.times()
    for name, t in times.items():
        ms = [1000 * s for s in t[2 * args.block:]]  # the first two blocks are warm-up
        blocks = [statistics.median(ms[k:k + args.block]) for k in range(0, len(ms), args.block)]
        print(f"{name}: {len(ms)} steps, median {statistics.median(ms):.0f} ms, mean "
              f"{statistics.mean(ms):.0f} ms; block medians {min(blocks):.0f}-{max(blocks):.0f} "
              f"ms: {' '.join(f'{b:.0f}' for b in blocks)}")
    print(f"CPU: {cpu1.user - cpu0.user:.1f} s user, {cpu1.system - cpu0.system:.1f} s kernel")


if __name__ == "__main__":
    main()
