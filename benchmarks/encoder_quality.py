"""Compare pretrained encoders by what matters with few labels, without touching the test set.

For each run folder: kNN accuracy (all labels of the fitting part), the logistic probe with 1 %
of the labels (mean over a few stratified subsets) and, with ``--full-probe``, the probe with all
of them. By default (``--split val``) everything is fitted on a seeded, class-stratified 90 % of
the training set and scored on the other 10 % (CIFAR-10: 45,000 / 5,000): recipe choices are made
there. ``--split test`` fits on the whole training set and scores on the test set: for the final
figure of a recipe already chosen, once.

    python benchmarks/encoder_quality.py runs/a runs/b --data-dir /work/data/cifar10-jpg
    python benchmarks/encoder_quality.py runs/a --data-dir ... --eval-size 16   # at 16x16
    python benchmarks/encoder_quality.py runs/vit --data-dir ... --counted-positions
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from selfsup import load_encoder
from selfsup.data import resize_images
from selfsup.datasets import load_dataset
from selfsup.evaluate import knn_accuracy, linear_probe, validation_split
from selfsup.finetune import stratified_subset
from selfsup.hardware import describe_machine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--dataset", default="folder")
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--split", choices=("val", "test"), default="val",
                    help="val: 90/10 of the training set (default); test: train vs test")
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument("--fraction", type=float, default=0.01)
    ap.add_argument("--subsets", type=int, default=3, help="label subsets (seeds 0..n-1)")
    ap.add_argument("--full-probe", action="store_true")
    ap.add_argument("--eval-size", type=int, default=0,
                    help="resize the images to this side before embedding (0: as they are)")
    ap.add_argument("--counted-positions", action="store_true",
                    help="a ViT's positions counted in tokens (0, 1, ...: as before commit "
                         "a6b4d40) instead of in image coordinates")
    ap.add_argument("--untrained", action="store_true",
                    help="score the untrained baseline instead: the run's saved "
                         "untrained_{train,test}_emb.npy (with --split test only)")
    args = ap.parse_args()
    if args.untrained and (args.split != "test" or args.eval_size):
        ap.error("--untrained scores the saved embeddings: --split test, no --eval-size")

    torch.manual_seed(0)
    print(describe_machine(torch.device("cpu")), flush=True)
    data = load_dataset(args.dataset, args.data_dir)
    assert data.train_y is not None and data.test_x is not None and data.test_y is not None
    if args.split == "val":
        fit, val = validation_split(data.train_y.numpy(), args.val_fraction, args.split_seed)
        xtr, ytr = data.train_x[fit], data.train_y.numpy()[fit]
        xte, yte = data.train_x[val], data.train_y.numpy()[val]
    else:
        xtr, ytr, xte, yte = data.train_x, data.train_y.numpy(), data.test_x, data.test_y.numpy()
    if args.eval_size:
        xtr, xte = resize_images(xtr, args.eval_size), resize_images(xte, args.eval_size)
    print(f"split {args.split}: fit on {len(ytr)}, scored on {len(yte)} images of "
          f"{xtr.shape[-1]} px", flush=True)
    subsets = [stratified_subset(ytr, args.fraction, s) for s in range(args.subsets)]
    for run in args.runs:
        t0 = time.perf_counter()
        if args.untrained:  # the same network at its initial weights, embedded by the run
            ftr = np.load(f"{run}/untrained_train_emb.npy")
            fte = np.load(f"{run}/untrained_test_emb.npy")
            assert len(ftr) == len(ytr) and len(fte) == len(yte), "not this data set's run"
        else:
            fx = load_encoder(run)
            if args.counted_positions:
                for module in fx.encoder.modules():
                    if hasattr(module, "grid"):
                        module.grid = 0
            ftr, fte = fx.embed(xtr, 1024), fx.embed(xte, 1024)
        knn = knn_accuracy(ftr, ytr, fte, yte)
        few = [linear_probe(ftr[i], ytr[i], fte, yte).accuracy for i in subsets]
        name = f"{run} (untrained)" if args.untrained else run
        line = (f"{name}: kNN {100 * knn:.1f}  probe@{100 * args.fraction:g}% "
                f"{100 * np.mean(few):.1f} (+-{100 * np.std(few):.1f}, {len(few)} subsets)")
        if args.full_probe:
            line += f"  probe@100% {100 * linear_probe(ftr, ytr, fte, yte).accuracy:.1f}"
        print(f"{line}  [{time.perf_counter() - t0:.0f} s]", flush=True)


if __name__ == "__main__":
    main()
