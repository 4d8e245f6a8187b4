"""Where one pretraining step spends its time: torch's profiler over a few steps of a preset.

Prints the operators by their own time, split by input shape (so each layer shows apart), after
a warm-up. Random uint8 images stand in for the data, as in ``throughput.py``.

    python benchmarks/profile_step.py --preset cpu [--model small_cnn]
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from selfsup.config import make_config
from selfsup.hardware import describe_machine, keep_freed_memory, select_device, select_precision
from selfsup.methods import build_method


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--model", default=None, help="encoder (default: the preset's)")
    ap.add_argument("--width", type=int, default=None, help="encoder width (default: preset's)")
    ap.add_argument("--view-size", type=int, default=None, help="view side in px (preset's)")
    ap.add_argument("--method", default="simclr")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--warm", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rows", type=int, default=25)
    args = ap.parse_args()
    over = dict(method=args.method, **{k: v for k, v in (("model", args.model),
                                                         ("width", args.width),
                                                         ("view_size", args.view_size)) if v})
    cfg = make_config(args.preset, over)
    keep_freed_memory()  # as a run does: freed activations kept, not faulted in again
    device = select_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    amp, why = select_precision(cfg.precision, device)
    b = cfg.batch_size
    x = torch.randint(0, 256, (b, 3, args.image_size, args.image_size), dtype=torch.uint8,
                      generator=torch.Generator().manual_seed(0)).to(device)
    method = build_method(cfg, device, args.image_size, [0.5] * 3, [0.25] * 3, 0.1, amp, b)
    method.train()
    gen = torch.Generator(device=device).manual_seed(0)
    for _ in range(args.warm):
        method.step(x, 1e-3, gen)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts, record_shapes=True) as prof:
        for _ in range(args.steps):
            method.step(x, 1e-3, gen)
    print(describe_machine(device))
    print(f"preset {args.preset}: {cfg.model} width {cfg.width}, batch {b}, precision {why}; "
          f"{args.steps} steps profiled (totals are over all of them)")
    table = prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=40,
        max_shapes_column_width=60)
    print(table)


if __name__ == "__main__":
    main()
