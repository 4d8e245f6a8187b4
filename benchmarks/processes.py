"""Pretraining speed with one process against several (torchrun), at the same global batch.

    python benchmarks/processes.py --data-dir DIR [--dataset folder] [--steps 60] [--procs 2]

Runs `selfsup pretrain --preset cpu` for a fixed number of steps (a) in one process with all
threads, (b) in N processes under torchrun with global batch norm, (c) the same without it
(its cost), and prints images/s of each (the global batch per second of training, from the
run's metrics.json) beside the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def _run(cmd: list[str], env: dict[str, str]) -> None:
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--dataset", default="folder")
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--procs", type=int, default=2)
    args = ap.parse_args()
    threads = os.cpu_count() or 1
    torchrun = Path(sys.executable).parent / "torchrun"
    launcher = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m",
                                                          "torch.distributed.run"]
    common = ["pretrain", "--preset", args.preset, "--dataset", args.dataset, "--data-dir",
              args.data_dir, "--steps", str(args.steps), "--knn-every", "0", "--no-progress"]
    per_proc = max(1, threads // args.procs)
    configs = [
        (f"1 process x {threads} threads", [sys.executable, "-m", "selfsup"],
         ["--threads", str(threads)]),
        (f"{args.procs} processes x {per_proc} thread(s), global BN",
         launcher + ["--standalone", f"--nproc_per_node={args.procs}", "-m", "selfsup"],
         ["--threads", str(per_proc)]),
        (f"{args.procs} processes x {per_proc} thread(s), per-process BN",
         launcher + ["--standalone", f"--nproc_per_node={args.procs}", "-m", "selfsup"],
         ["--threads", str(per_proc), "--no-sync-bn"]),
    ]
    from selfsup.hardware import machine_info

    info = machine_info(torch.device("cpu"))
    print(f"CPU {info['cpu']} ({info['cpu_capability']}, native bf16: "
          f"{info['cpu_native_bf16']}), {threads} cores, torch {info['torch']}")
    print(f"selfsup {' '.join(common)}")
    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, launch, extra) in enumerate(configs):
            _run(launch + common + extra + ["--out-dir", tmp, "--name", f"r{i}"], env)
            m = json.loads((Path(tmp) / f"r{i}" / "metrics.json").read_text())
            pre = m["pretrain"]
            print(f"{label:45} {pre['images_per_s']:8.0f} images/s  ({pre['steps']} steps of "
                  f"{m['config']['batch_size']}, {pre['precision']})", flush=True)


if __name__ == "__main__":
    main()
