"""Fingerprints of short digits runs, to show that a change to the code left training unchanged.

Pretrains each method on the generated digits data for a few epochs (monitors on, a checkpoint
each epoch) with ``selfsup pretrain`` in a fresh process, and prints one SHA-256 per method over
the loss history (``loss.npy``), the monitors' history and every tensor of the encoder's weights.
Run it at two commits; equal lines mean bit-identical runs.

    python benchmarks/same_run.py [--methods simclr,moco,byol] [--epochs 3] [--out /tmp/same-run]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch


def fingerprint(run: Path) -> str:
    h = hashlib.sha256()
    h.update(np.load(run / "loss.npy").tobytes())
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("knn_history", "quality_history"):
        h.update(json.dumps(metrics.get(key), sort_keys=True).encode())
    state = torch.load(run / "encoder.pt", map_location="cpu", weights_only=True)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    for name in sorted(state):
        value = state[name]
        if isinstance(value, torch.Tensor):
            h.update(name.encode())
            h.update(value.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default="simclr,moco,byol")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--out", default="/tmp/same-run")
    args = ap.parse_args()
    for method in args.methods.split(","):
        name = f"same-{method}"
        shutil.rmtree(Path(args.out) / name, ignore_errors=True)
        subprocess.run(
            [sys.executable, "-m", "selfsup", "pretrain", "--dataset", "digits",
             "--data-dir", str(Path(args.out) / "data"), "--method", method,
             "--epochs", str(args.epochs), "--batch-size", "128", "--knn-every", "1",
             "--checkpoint-every", "1", "--out-dir", args.out, "--name", name,
             "--no-progress", "--threads", "2"],
            check=True, stdout=subprocess.DEVNULL)
        print(method, fingerprint(Path(args.out) / name), flush=True)


if __name__ == "__main__":
    main()
