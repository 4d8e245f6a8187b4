"""Measuring a frozen representation: embeddings, linear probe, kNN.

Integrity rules kept in code: the encoder is in eval mode under ``torch.inference_mode`` with
no augmentation; the probe's regularisation is chosen on a held-out part of the *training* set,
then refit on all of it; the test set is touched once, for the final accuracy.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from selfsup.augment import normalize, to_float
from selfsup.config import MIN_STEPS, Config
from selfsup.data import ImageData
from selfsup.files import save_json, save_npy
from selfsup.models import Encoder, in_batches

# Regularisation strengths tried by the probe (L2 penalty on the weights, per sample).
PROBE_WEIGHT_DECAYS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
MIN_PER_CLASS_TO_VALIDATE = 10
# Training sets smaller than this choose the penalty by k-fold cross-validation: one held-out
# tenth of a few hundred images is too small a sample to rank penalties by.
PROBE_CV_BELOW = 5000
PROBE_CV_FOLDS = 5


@torch.inference_mode()
def embed(encoder: nn.Module, x: torch.Tensor, mean: list[float], std: list[float],
          batch_size: int = 1024, device: torch.device | None = None,
          channels_last: bool = False) -> np.ndarray:
    """Features h of uint8 images (N, 3, H, W) from a frozen encoder in eval mode.

    Returns:
        (N, feature_dim) float32 array.
    """
    dev = device or next(encoder.parameters()).device
    m = torch.tensor(mean, device=dev)
    s = torch.tensor(std, device=dev)
    mem = torch.channels_last if channels_last else torch.contiguous_format

    def features(b: torch.Tensor) -> torch.Tensor:  # (b, D)
        return encoder(normalize(to_float(b), m, s).contiguous(memory_format=mem)).float()

    out = in_batches(features, x, batch_size, dev, encoder)
    return out.numpy() if out is not None else np.zeros((0, 0), np.float32)


@dataclass
class ProbeResult:
    accuracy: float  # test accuracy in [0, 1]
    weight_decay: float  # chosen on held-out parts of the training set
    val_accuracy: dict[float, float]  # held-out accuracy per weight decay tried (over all folds)
    predictions: np.ndarray  # (M,) predicted test labels


@torch.no_grad()
def logreg_loss_and_grad(x: torch.Tensor, onehot: torch.Tensor, w: torch.Tensor,
                         b: torch.Tensor, weight_decay: float
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean cross-entropy + weight_decay * ||W||^2 of softmax(x W + b), and its gradients.

    Written out by hand: (g^T x)^T is several times faster on a CPU than autograd's x^T g.

    Args:
        x: (N, D) features; onehot: (N, C) targets; w: (D, C); b: (C,).
    Returns:
        loss (scalar), dL/dW (D, C), dL/db (C,).
    """
    n = x.shape[0]
    logp = torch.log_softmax(torch.addmm(b, x, w), dim=1)  # (N, C)
    loss = -(logp * onehot).sum() / n + weight_decay * w.pow(2).sum()
    g = (logp.exp() - onehot) / n  # (N, C): dL/dlogits
    grad_w = ((g.T.contiguous() @ x).T + 2 * weight_decay * w).contiguous()  # (D, C)
    return loss, grad_w, g.sum(0)


def _fit_logreg(x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float,
                init: tuple[torch.Tensor, torch.Tensor] | None = None, max_iter: int = 100
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression by full-batch L-BFGS.

    Minimises mean cross-entropy + weight_decay * ||W||^2 over W (D, C) and b (C,). The
    iteration cap keeps a 50k x 256 probe near a minute on two CPU cores; beyond it accuracy
    moves by a few tenths of a point.
    """
    d = x.shape[1]
    w = init[0].clone() if init else torch.zeros(d, num_classes)
    b = init[1].clone() if init else torch.zeros(num_classes)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-6, tolerance_change=1e-9,
                            line_search_fn="strong_wolfe")
    params = {id(w), id(b)}
    # The probe's optimiser sees only the probe: never the encoder.
    assert all(id(p) in params for g in opt.param_groups for p in g["params"])
    onehot = F.one_hot(y, num_classes).to(x.dtype)  # (N, C)

    def closure() -> torch.Tensor:
        loss, w.grad, b.grad = logreg_loss_and_grad(x, onehot, w, b, weight_decay)
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def _stratified_split(y: np.ndarray, frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        val.append(idx[: max(1, int(round(frac * len(idx))))])
    val_idx = np.sort(np.concatenate(val))
    mask = np.ones(len(y), dtype=bool)
    mask[val_idx] = False
    return np.flatnonzero(mask), val_idx


def validation_split(labels: np.ndarray, fraction: float = 0.1, seed: int = 0
                     ) -> tuple[np.ndarray, np.ndarray]:
    """A seeded, class-stratified (fit, validation) split of a training set's indices: for
    choosing recipes and settings without looking at the test set (CIFAR-10 at 0.1: 45,000 /
    5,000, 500 of each class held out)."""
    return _stratified_split(labels, fraction, seed)


def _stratified_folds(y: np.ndarray, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """k (fit, held-out) index pairs; each class is spread evenly over the k held-out parts."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(y), dtype=np.int64)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        fold[idx[rng.permutation(len(idx))]] = np.arange(len(idx)) % k
    return [(np.flatnonzero(fold != i), np.flatnonzero(fold == i)) for i in range(k)]


def _standardise(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    mu = train.mean(0, keepdim=True)
    sd = train.std(0, keepdim=True).clamp_min(1e-6)
    return [(t - mu) / sd for t in (train, *others)]


def linear_probe(train_f: np.ndarray, train_y: np.ndarray, test_f: np.ndarray,
                 test_y: np.ndarray, val_frac: float = 0.1, seed: int = 0,
                 weight_decays: tuple[float, ...] = PROBE_WEIGHT_DECAYS) -> ProbeResult:
    """Logistic-regression probe on standardised frozen features.

    The weight decay is chosen by accuracy on a stratified ``val_frac`` part of the training set
    (standardised with the rest's statistics), or, for training sets under ``PROBE_CV_BELOW``
    images, by ``PROBE_CV_FOLDS``-fold cross-validation; the probe is then refit on the whole
    training set and scored once on the test set. With fewer than ``MIN_PER_CLASS_TO_VALIDATE``
    images in some class nothing is held out and the strongest penalty is used.

    Args:
        train_f: (N, D) features; train_y: (N,) int labels.
        test_f: (M, D) features; test_y: (M,) int labels.
    """
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    val_acc: dict[float, float] = {}
    if np.unique(train_y, return_counts=True)[1].min() < MIN_PER_CLASS_TO_VALIDATE:
        best = max(weight_decays)  # too few labels to hold any out: the strongest penalty
    else:
        splits = (_stratified_folds(train_y, PROBE_CV_FOLDS, seed)
                  if len(train_y) < PROBE_CV_BELOW
                  else [_stratified_split(train_y, val_frac, seed)])
        correct = dict.fromkeys(weight_decays, 0)
        for fit_idx, val_idx in splits:
            xf, xv = _standardise(torch.from_numpy(train_f[fit_idx]).float(),
                                  torch.from_numpy(train_f[val_idx]).float())
            yf = torch.from_numpy(train_y[fit_idx]).long()
            yv = torch.from_numpy(train_y[val_idx]).long()
            init = None
            # From strongest to weakest penalty, each fit warm-started from the previous one.
            for wd in sorted(weight_decays, reverse=True):
                init = _fit_logreg(xf, yf, num_classes, wd, init)
                correct[wd] += int(((xv @ init[0] + init[1]).argmax(1) == yv).sum())
        held_out = sum(len(v) for _, v in splits)
        val_acc = {wd: correct[wd] / held_out for wd in weight_decays}
        best = max(val_acc, key=lambda k: (val_acc[k], k))  # ties: the stronger penalty
    xtr, xte = _standardise(torch.from_numpy(train_f).float(), torch.from_numpy(test_f).float())
    w, b = _fit_logreg(xtr, torch.from_numpy(train_y).long(), num_classes, best, max_iter=150)
    pred = (xte @ w + b).argmax(1).numpy()
    return ProbeResult(float((pred == test_y).mean()), best, val_acc, pred)


def knn_predict(train_f: torch.Tensor, train_y: torch.Tensor, query_f: torch.Tensor,
                num_classes: int, k: int = 200, t: float = 0.1, chunk: int = 1024
                ) -> torch.Tensor:
    """Weighted kNN on cosine similarity (Wu et al. 2018): each of the k nearest training
    points votes for its class with weight exp(sim / t).

    Args:
        train_f: (N, D) features; train_y: (N,) labels.
        query_f: (M, D) features.
    Returns:
        (M,) predicted labels.
    """
    bank = F.normalize(train_f.float(), dim=1)  # (N, D)
    k = min(k, bank.shape[0])
    preds = []
    for i in range(0, len(query_f), chunk):
        q = F.normalize(query_f[i:i + chunk].float(), dim=1)  # (m, D)
        sim, idx = (q @ bank.T).topk(k, dim=1)  # (m, k)
        votes = torch.zeros(len(q), num_classes)
        votes.scatter_add_(1, train_y[idx], (sim / t).exp())
        preds.append(votes.argmax(1))
    return torch.cat(preds)


def knn_accuracy(train_f: np.ndarray, train_y: np.ndarray, test_f: np.ndarray,
                 test_y: np.ndarray, k: int = 200, t: float = 0.1) -> float:
    """Test accuracy of ``knn_predict`` in [0, 1]."""
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    pred = knn_predict(torch.from_numpy(train_f), torch.from_numpy(train_y).long(),
                       torch.from_numpy(test_f), num_classes, k, t)
    return float((pred.numpy() == test_y).mean())


class KnnMonitor:
    """kNN accuracy during pretraining on a fixed subset: ``size`` test images (or, without a
    test split, held-out training images) classified against a bank of ``5 * size`` training
    images. Chosen once from ``seed``; classifying does not touch any random state."""

    def __init__(self, data: ImageData, size: int, k: int, t: float, seed: int,
                 batch_size: int) -> None:
        assert data.train_y is not None
        rng = np.random.default_rng(seed + 17)
        n = len(data.train_x)
        perm = torch.from_numpy(rng.permutation(n))
        if data.test_x is not None and data.test_y is not None:
            q = torch.from_numpy(rng.permutation(len(data.test_x))[:size])
            self.query_x, self.query_y = data.test_x[q], data.test_y[q]
        else:
            q, perm = perm[:min(size, n // 2)], perm[min(size, n // 2):]
            self.query_x, self.query_y = data.train_x[q], data.train_y[q]
        bank = perm[:5 * size]
        self.bank_x, self.bank_y = data.train_x[bank], data.train_y[bank].cpu()
        self.num_classes = len(data.classes)
        self.k, self.t, self.batch_size = k, t, batch_size

    def accuracy(self, encoder: nn.Module, mean: list[float], std: list[float],
                 device: torch.device, channels_last: bool) -> float:
        f = {name: torch.from_numpy(embed(encoder, x, mean, std, self.batch_size, device,
                                          channels_last))
             for name, x in (("bank", self.bank_x), ("query", self.query_x))}
        pred = knn_predict(f["bank"], self.bank_y.long(), f["query"], self.num_classes,
                           min(self.k, len(self.bank_y)), self.t)
        return float((pred == self.query_y.cpu()).float().mean())


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) counts; row = true class, column = predicted class."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    return cm


def evaluate_run(run_dir: str | Path, data: ImageData, encoder: Encoder | None = None
                 ) -> dict[str, Any]:
    """Embed the data with the trained encoder and the untrained one, probe and kNN both.

    Writes ``train_emb.npy``, ``train_lbl.npy``, ``test_emb.npy``, ``test_lbl.npy`` (trained
    encoder's features h) and ``untrained_*_emb.npy``, and merges the results into
    ``metrics.json``. Unlabeled data get embeddings only.

    Args:
        run_dir: a run folder holding ``encoder.pt``.
        data: the run's data set.
        encoder: the trained encoder, when already in memory (else loaded from ``encoder.pt``).

    Returns:
        The metrics written.
    """
    from selfsup.checkpoint import ENCODER, config_of, load_encoder_file, pretrained_encoder
    from selfsup.hardware import select_device
    from selfsup.methods import prepare, use_channels_last

    run_dir = Path(run_dir)
    saved = load_encoder_file(run_dir / ENCODER)
    cfg = config_of(saved)
    device = select_device(cfg.device)
    if encoder is None:
        encoder = pretrained_encoder(saved)
    # The untrained baseline: the exact network pretraining started from (same seed, same init).
    encoders = {"trained": encoder, "untrained": pretrained_encoder(saved, initial=True)}
    from selfsup.runfolder import read_metrics, update_metrics

    metrics = read_metrics(run_dir)
    times = metrics.setdefault("time_s", {})
    results: dict[str, dict[str, Any]] = {"linear_probe": {}, "knn": {}}
    feats: dict[str, dict[str, np.ndarray]] = {}
    t0 = time.perf_counter()
    nhwc = use_channels_last(encoder, cfg.channels_last, device, verbose=False)
    for which, enc in encoders.items():
        enc = prepare(enc, device, nhwc)
        feats[which] = {
            split: embed(enc, x, saved["mean"], saved["std"], cfg.eval_batch_size, device, nhwc)
            for split, x in (("train", data.train_x), ("test", data.test_x)) if x is not None
        }
    times["embed"] = time.perf_counter() - t0
    for which, prefix in (("trained", ""), ("untrained", "untrained_")):
        for split, emb in feats[which].items():
            save_npy(emb, run_dir / f"{prefix}{split}_emb.npy")
    for split, names in data.files.items():  # row i of {split}_emb.npy is file i
        if split in feats["trained"] and len(names) == len(feats["trained"][split]):
            save_json(dict(rows=len(names), files=names), run_dir / f"{split}_files.json")
    if data.train_y is not None:
        save_npy(data.train_y.cpu().numpy(), run_dir / "train_lbl.npy")
    if data.test_y is not None:
        save_npy(data.test_y.cpu().numpy(), run_dir / "test_lbl.npy")
    metrics.update(dataset=data.name, classes=data.classes, feature_dim=int(saved["feature_dim"]),
                   train_size=len(data.train_x), image_size=int(data.train_x.shape[-1]),
                   test_size=0 if data.test_x is None else len(data.test_x))
    if data.labeled:
        ytr = data.train_y.cpu().numpy()  # type: ignore[union-attr]
        yte = data.test_y.cpu().numpy()  # type: ignore[union-attr]
        t0 = time.perf_counter()
        for which, f in feats.items():
            probe = linear_probe(f["train"], ytr, f["test"], yte, cfg.probe_val_frac, cfg.seed)
            results["linear_probe"][which] = probe.accuracy
            results["linear_probe"][f"{which}_weight_decay"] = probe.weight_decay
            if probe.val_accuracy:  # held-out part of the training set: what choices rank by
                results["linear_probe"][f"{which}_validation"] = \
                    probe.val_accuracy[probe.weight_decay]
            if which == "trained":
                metrics["confusion"] = confusion_matrix(yte, probe.predictions,
                                                        len(data.classes)).tolist()
        times["linear_probe"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for which, f in feats.items():
            results["knn"][which] = knn_accuracy(f["train"], ytr, f["test"], yte, cfg.knn_k,
                                                 cfg.knn_t)
        results["knn"].update(k=cfg.knn_k, t=cfg.knn_t)
        times["knn"] = time.perf_counter() - t0
        metrics.update(results)
    metrics["caveats"] = caveats(metrics, cfg)
    return update_metrics(run_dir, **metrics)


MIN_TEST = 1000  # fewer test images: an accuracy's 95 % interval is wider than +-3 points


def caveats(m: dict[str, Any], cfg: Config) -> list[str]:
    """What makes a run's figures mean less than they seem (too little data or training), in
    words for the summary and the report; empty for a run of ordinary size."""
    out = []
    train, test = int(m.get("train_size", 0)), int(m.get("test_size", 0))
    steps = (m.get("pretrain") or {}).get("steps")
    if isinstance(steps, int) and steps < MIN_STEPS:
        out.append(f"only {steps} pretraining steps: too few for the accuracies to say much "
                   f"about the method")
    if m.get("knn") and train and cfg.knn_k >= train / 2:
        out.append(f"kNN votes over k={cfg.knn_k} neighbours among only {train} training "
                   f"images: each test image is voted on by much of the training set "
                   f"(--knn-k to change k)")
    if m.get("linear_probe") and 0 < test < MIN_TEST:
        half = 100 * 1.96 * (0.25 / test) ** 0.5
        out.append(f"only {test} test images: an accuracy is known to about +-{half:.0f} "
                   f"points (95 %)")
    return out


