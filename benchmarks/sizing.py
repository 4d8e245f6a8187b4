"""Which encoder ``--budget`` would choose on this machine for a data set, without training.

Runs the sizing of ``selfsup.sizing.choose_size`` (each rung of the ladder timed on the real
images, cheapest first) ``--repeats`` times and prints the timings and the choice each time.

    python benchmarks/sizing.py --data-dir /work/data/cifar10-jpg [--budget 20m] [--method byol]
"""

from __future__ import annotations

import argparse

from selfsup import sizing
from selfsup.config import make_config, parse_duration
from selfsup.data import channel_stats
from selfsup.datasets import load_for
from selfsup.hardware import describe_machine, keep_freed_memory, select_device, select_precision


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--method", default="simclr")
    ap.add_argument("--dataset", default="folder")
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--budget", default="20m")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    cfg = make_config(args.preset, dict(dataset=args.dataset, data_dir=args.data_dir,
                                        budget=args.budget, method=args.method))
    keep_freed_memory()
    device = select_device(cfg.device)
    data = load_for(cfg, pretraining=True)
    mean, std = channel_stats(data.train_x)
    amp, why = select_precision(cfg.precision, device)
    print(describe_machine(device), f"precision {why}", sep="\n")
    x = data.train_x.to(device)
    for _ in range(args.repeats):
        sizing.choose_size(cfg, x, mean, std, amp, min(cfg.batch_size, len(x)),
                           parse_duration(cfg.budget), True)


if __name__ == "__main__":
    main()
