"""Figures of a run, readable at a glance: title, axis labels, a legend where there are series."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from selfsup.config import Config  # noqa: E402
from selfsup.data import ImageData  # noqa: E402
from selfsup.files import save_figure  # noqa: E402


def _close_and_save(fig: plt.Figure, path: str | Path) -> Path:
    save_figure(fig, path)
    plt.close(fig)
    return Path(path)


def loss_curve(losses: np.ndarray, path: str | Path, steps_per_epoch: int | None = None,
               untrained_floor: float | None = None,
               knn_history: list[dict[str, float]] | None = None) -> Path:
    """NT-Xent per step, with a moving average; ``untrained_floor`` marks log(2N-1).

    ``knn_history`` (``[{"step", "epoch", "accuracy"}, ...]``, from pretraining) adds a panel
    beside the loss: kNN accuracy on a fixed subset against the epoch.
    """
    panels = 2 if knn_history else 1
    fig, axes = plt.subplots(1, panels, figsize=(7 * panels - 1 * (panels - 1), 4), squeeze=False)
    ax = axes[0, 0]
    steps = np.arange(1, len(losses) + 1)
    ax.plot(steps, losses, lw=0.6, alpha=0.4, label="per step")
    w = max(1, len(losses) // 50)
    if w > 1:
        smooth = np.convolve(losses, np.ones(w) / w, mode="valid")
        ax.plot(steps[w - 1:], smooth, lw=1.8, label=f"moving average ({w} steps)")
    if untrained_floor is not None:
        ax.axhline(untrained_floor, ls="--", c="gray", lw=1, label="log(2N-1): chance level")
    ax.set(title="Pretraining loss (NT-Xent)", xlabel="optimiser step", ylabel="loss")
    if steps_per_epoch:
        spe = float(steps_per_epoch)
        top = ax.secondary_xaxis("top", functions=(lambda s: np.asarray(s) / spe,
                                                   lambda e: np.asarray(e) * spe))
        top.set_xlabel("epoch")
    ax.grid(alpha=0.3)
    ax.legend()
    if knn_history:
        ax = axes[0, 1]
        ep = [h["epoch"] for h in knn_history]
        acc = [100 * h["accuracy"] for h in knn_history]
        ax.plot(ep, acc, marker="o", label="kNN accuracy (monitor subset)")
        ax.annotate(f"{acc[-1]:.1f}%", (ep[-1], acc[-1]), textcoords="offset points",
                    xytext=(-10, 6))
        ax.set(title="kNN accuracy during pretraining", xlabel="epoch", ylabel="accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    fig.tight_layout()
    return _close_and_save(fig, path)


def label_efficiency_plot(table: dict[str, Any], path: str | Path) -> Path:
    """Test accuracy against the fraction of training labels (log x-axis), one line per way."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    frac = np.asarray(table["fraction"]) * 100
    for key, label, style in (("finetune", "fine-tuned pretrained encoder", "-o"),
                              ("probe", "linear probe, pretrained encoder (frozen)", "-s"),
                              ("scratch", "same network from scratch (supervised)", "--^"),
                              ("probe_untrained", "linear probe, untrained encoder", ":v")):
        if table.get(key):
            ax.plot(frac, 100 * np.asarray(table[key]), style, label=label)
    ax.set_xscale("log")
    ax.set_xticks(frac)
    ax.set_xticklabels([f"{f:g}%\n({n})" for f, n in zip(frac, table["labels"], strict=True)])
    ax.set(title="Label efficiency: test accuracy vs labels used",
           xlabel="fraction of training labels (images)", ylabel="test accuracy (%)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _close_and_save(fig, path)


def retrieval_grid(queries: np.ndarray, query_labels: np.ndarray | None,
                   neighbours: dict[str, np.ndarray], neighbour_labels: dict[str, np.ndarray],
                   path: str | Path, classes: list[str]) -> Path:
    """For each query image, its nearest training images under each encoder.

    Args:
        queries: (Q, H, W, 3) floats in [0, 1].
        neighbours: encoder name -> (Q, K, H, W, 3) nearest training images, nearest first.
        neighbour_labels: encoder name -> (Q, K) their labels (green frame: same class as the
            query, red: another), or empty when unlabeled.
    """
    names = list(neighbours)
    q, k = neighbours[names[0]].shape[:2]
    rows = q * len(names)
    fig, axes = plt.subplots(rows, k + 1, figsize=(1.1 * (k + 1) + 1.2, 1.15 * rows + 0.8),
                             squeeze=False)
    for i in range(q):
        for j, name in enumerate(names):
            r = i * len(names) + j
            ax = axes[r, 0]
            ax.imshow(queries[i], interpolation="nearest")
            title = "query" if query_labels is None else f"query: {classes[query_labels[i]]}"
            ax.set_ylabel(name, fontsize=8)
            if j == 0:
                ax.set_title(title, fontsize=8)
            for c in range(k):
                ax = axes[r, c + 1]
                ax.imshow(neighbours[name][i, c], interpolation="nearest")
                labels = neighbour_labels.get(name)
                if labels is not None and len(labels) and query_labels is not None:
                    same = labels[i, c] == query_labels[i]
                    for spine in ax.spines.values():
                        spine.set_edgecolor("tab:green" if same else "tab:red")
                        spine.set_linewidth(2.5)
            for ax in axes[r]:
                ax.set_xticks([])
                ax.set_yticks([])
    fig.suptitle(f"Nearest training images (cosine similarity of features), {k} per query; "
                 "frame: green = same class", fontsize=9)
    fig.tight_layout()
    return _close_and_save(fig, path)


def confusion(cm: np.ndarray, classes: list[str], path: str | Path, title: str) -> Path:
    """Counts and row-normalised confusion matrices side by side."""
    n = len(classes)
    side = max(4.5, 0.55 * n + 1.5)
    fig, axes = plt.subplots(1, 2, figsize=(2 * side + 2, side))
    rows = cm.sum(1, keepdims=True).clip(min=1)
    for ax, mat, sub, fmt in ((axes[0], cm, "counts", "d"),
                              (axes[1], cm / rows, "row-normalised (recall)", ".2f")):
        im = ax.imshow(mat, cmap="Blues")
        ax.set(xticks=range(n), yticks=range(n), xlabel="predicted class", ylabel="true class",
               title=sub)
        ax.set_xticklabels(classes, rotation=45, ha="right")
        ax.set_yticklabels(classes)
        if n <= 20:
            hi = mat.max() / 2
            for i in range(n):
                for j in range(n):
                    ax.text(j, i, format(mat[i, j], fmt), ha="center", va="center", fontsize=7,
                            color="white" if mat[i, j] > hi else "black")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(title)
    fig.tight_layout()
    return _close_and_save(fig, path)


def _scatter(xy: np.ndarray, labels: np.ndarray | None, classes: list[str], path: str | Path,
             title: str, xlabel: str, ylabel: str) -> Path:
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    if labels is None:
        ax.scatter(xy[:, 0], xy[:, 1], s=4, alpha=0.6)
    else:
        cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
        for c, name in enumerate(classes):
            m = labels == c
            ax.scatter(xy[m, 0], xy[m, 1], s=4, alpha=0.7, color=cmap(c % cmap.N), label=name)
        ax.legend(markerscale=3, fontsize=8, loc="best", title="class")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    return _close_and_save(fig, path)


def pca_map(features: np.ndarray, labels: np.ndarray | None, classes: list[str],
            path: str | Path, title: str = "PCA of test embeddings") -> Path:
    """First two principal components of the features, coloured by class."""
    x = features - features.mean(0)
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    xy = x @ vt[:2].T
    var = s**2 / (s**2).sum()
    return _scatter(xy, labels, classes, path, f"{title} ({len(x)} points)",
                    f"PC 1 ({var[0]:.0%} of variance)", f"PC 2 ({var[1]:.0%} of variance)")


def subsample(labels: np.ndarray | None, n: int, count: int, seed: int = 0) -> np.ndarray:
    """Indices of ``count`` of ``n`` points (stratified by label when there are labels)."""
    rng = np.random.default_rng(seed)
    if count >= n:
        return np.arange(n)
    if labels is None:
        return np.sort(rng.choice(n, count, replace=False))
    classes = np.unique(labels)
    per = max(1, count // len(classes))
    idx = [rng.permutation(np.flatnonzero(labels == c))[:per] for c in classes]
    return np.sort(np.concatenate(idx))


def tsne_map(features: np.ndarray, labels: np.ndarray | None, classes: list[str],
             path: str | Path, points: int = 2000, seed: int = 0,
             title: str = "t-SNE of test embeddings") -> Path:
    """t-SNE (scikit-learn, PCA init) of a stratified subsample; the title says how many points."""
    from sklearn.manifold import TSNE

    idx = subsample(labels, len(features), points, seed)
    x = features[idx]
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    perplexity = float(min(30, max(2, (len(x) - 1) // 3)))
    xy = TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
    lab = None if labels is None else labels[idx]
    return _scatter(xy, lab, classes, path,
                    f"{title} ({len(idx)} of {len(features)} points)", "t-SNE 1", "t-SNE 2")


def augmentation_grid(originals: np.ndarray, view1: np.ndarray, view2: np.ndarray,
                      path: str | Path) -> Path:
    """Rows of (original, view 1, view 2); arrays are (n, H, W, 3) floats in [0, 1]."""
    n = len(originals)
    fig, axes = plt.subplots(n, 3, figsize=(4.5, 1.5 * n + 0.6), squeeze=False)
    for i in range(n):
        for j, (img, name) in enumerate(((originals[i], "original"), (view1[i], "view 1"),
                                         (view2[i], "view 2"))):
            ax = axes[i, j]
            ax.imshow(img, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name)
    fig.suptitle("Two random views of each image")
    fig.tight_layout()
    return _close_and_save(fig, path)


def plot_run(run_dir: str | Path, cfg: Config, data: ImageData | None = None) -> dict[str, str]:
    """Draw every figure a run's files allow; returns {figure name: file name}.

    ``data`` (the run's data set) is needed only for the augmentation grid.
    """
    import json
    import math

    import torch

    from selfsup.augment import AugmentParams, two_views

    run_dir = Path(run_dir)
    out: dict[str, str] = {}
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    classes = list(metrics.get("classes", []))
    if (run_dir / "loss.npy").is_file():
        losses = np.load(run_dir / "loss.npy")
        train_size = int(metrics.get("train_size", 0))
        batch = min(cfg.batch_size, train_size) if train_size else cfg.batch_size
        steps_per_epoch = train_size // batch if train_size else None
        loss_curve(losses, run_dir / "loss.png", steps_per_epoch, math.log(2 * batch - 1),
                   metrics.get("knn_history"))
        out["loss"] = "loss.png"
    if "confusion" in metrics:
        acc = metrics.get("linear_probe", {}).get("trained")
        title = "Linear probe on the trained encoder, test set"
        if acc is not None:
            title += f" (accuracy {acc:.1%})"
        confusion(np.asarray(metrics["confusion"]), classes, run_dir / "confusion.png", title)
        out["confusion"] = "confusion.png"
    for split in ("test", "train"):
        emb = run_dir / f"{split}_emb.npy"
        if emb.is_file():
            feats = np.load(emb)
            lbl_path = run_dir / f"{split}_lbl.npy"
            labels = np.load(lbl_path) if lbl_path.is_file() else None
            names = classes if labels is not None else []
            pca_map(feats, labels, names, run_dir / "pca.png", f"PCA of {split} embeddings")
            tsne_map(feats, labels, names, run_dir / "tsne.png", cfg.tsne_points, cfg.seed,
                     f"t-SNE of {split} embeddings")
            out.update(pca="pca.png", tsne="tsne.png")
            break
    if "label_efficiency" in metrics:
        label_efficiency_plot(metrics["label_efficiency"], run_dir / "label_efficiency.png")
        out["label_efficiency"] = "label_efficiency.png"
    if data is not None and _retrieval(run_dir, data, cfg.seed):
        out["retrieval"] = "retrieval.png"
    if data is not None:
        g = torch.Generator().manual_seed(cfg.seed)
        x = data.train_x[torch.linspace(0, len(data.train_x) - 1, 8).long()].cpu()  # spread out
        v1, v2 = two_views(x, AugmentParams.from_config(cfg, x.shape[-1]), g)

        def hwc(t: torch.Tensor) -> np.ndarray:
            return t.permute(0, 2, 3, 1).numpy()

        augmentation_grid(hwc(x.float() / 255), hwc(v1), hwc(v2), run_dir / "augmentations.png")
        out["augmentations"] = "augmentations.png"
    return out


def _retrieval(run_dir: Path, data: ImageData, seed: int, queries: int = 6, k: int = 8) -> bool:
    """``retrieval.png`` from the saved embeddings of both encoders; False when they are missing."""
    files = {name: (run_dir / f"{p}train_emb.npy", run_dir / f"{p}test_emb.npy")
             for name, p in (("trained", ""), ("untrained", "untrained_"))}
    if data.test_x is None or not all(f.is_file() for pair in files.values() for f in pair):
        return False
    test_y = None if data.test_y is None else data.test_y.cpu().numpy()
    train_y = None if data.train_y is None else data.train_y.cpu().numpy()
    rng = np.random.default_rng(seed)
    if test_y is not None:  # one query from each of the first classes
        classes = np.unique(test_y)[:queries]
        q_idx = np.array([rng.choice(np.flatnonzero(test_y == c)) for c in classes])
    else:
        q_idx = rng.choice(len(data.test_x), min(queries, len(data.test_x)), replace=False)

    def hwc(x: np.ndarray) -> np.ndarray:
        return np.moveaxis(x, -3, -1).astype(np.float32) / 255

    train_imgs = data.train_x.cpu().numpy()
    neighbours, labels = {}, {}
    for name, (tr_path, te_path) in files.items():
        tr, te = np.load(tr_path), np.load(te_path)[q_idx]
        tr = tr / np.linalg.norm(tr, axis=1, keepdims=True).clip(1e-12)
        te = te / np.linalg.norm(te, axis=1, keepdims=True).clip(1e-12)
        nn_idx = np.argsort(-(te @ tr.T), axis=1)[:, :k]  # (Q, k), nearest first
        neighbours[f"{name} encoder"] = hwc(train_imgs[nn_idx])
        labels[f"{name} encoder"] = train_y[nn_idx] if train_y is not None else np.empty(0)
    names = list(data.classes) if data.classes else []
    retrieval_grid(hwc(data.test_x.cpu().numpy()[q_idx]),
                   None if test_y is None else test_y[q_idx], neighbours, labels,
                   run_dir / "retrieval.png", names)
    return True
