"""Compare pretrained encoders by what matters with few labels.

For each run folder: kNN accuracy (all training labels), the logistic probe with 1 % of the labels
(mean over a few stratified subsets) and, with ``--full-probe``, the probe with all labels.
Used to choose recipes; the numbers are test accuracies on the data set's test split.

    python benchmarks/encoder_quality.py runs/a runs/b --data-dir /work/data/cifar10-jpg
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from selfsup import load_encoder
from selfsup.data import load_dataset
from selfsup.evaluate import knn_accuracy, linear_probe
from selfsup.finetune import stratified_subset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--dataset", default="folder")
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--fraction", type=float, default=0.01)
    ap.add_argument("--subsets", type=int, default=3, help="label subsets (seeds 0..n-1)")
    ap.add_argument("--full-probe", action="store_true")
    args = ap.parse_args()

    torch.manual_seed(0)
    data = load_dataset(args.dataset, args.data_dir)
    assert data.train_y is not None and data.test_x is not None and data.test_y is not None
    ytr, yte = data.train_y.numpy(), data.test_y.numpy()
    subsets = [stratified_subset(ytr, args.fraction, s) for s in range(args.subsets)]
    for run in args.runs:
        t0 = time.perf_counter()
        fx = load_encoder(run)
        ftr, fte = fx.embed(data.train_x, 1024), fx.embed(data.test_x, 1024)
        knn = knn_accuracy(ftr, ytr, fte, yte)
        few = [linear_probe(ftr[i], ytr[i], fte, yte).accuracy for i in subsets]
        line = (f"{run}: kNN {100 * knn:.1f}  probe@{100 * args.fraction:g}% "
                f"{100 * np.mean(few):.1f} (+-{100 * np.std(few):.1f}, {len(few)} subsets)")
        if args.full_probe:
            line += f"  probe@100% {100 * linear_probe(ftr, ytr, fte, yte).accuracy:.1f}"
        print(f"{line}  [{time.perf_counter() - t0:.0f} s]", flush=True)


if __name__ == "__main__":
    main()
