"""Figures of a run, readable at a glance: title, axis labels, a legend where there are series.

Every text is drawn literally: class names and titles are never read as mathematical markup
(``$``, ``\\``, ``{`` print as themselves). ``plot_run`` draws what a run's data allow and
skips a figure that cannot be drawn (too few points, say) with a note, never the run.
"""

from __future__ import annotations

import functools
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from selfsup.config import Config  # noqa: E402
from selfsup.data import ImageData  # noqa: E402
from selfsup.files import load_array, save_figure  # noqa: E402

F = TypeVar("F", bound=Callable[..., Any])
# Text is text: no mathematical markup, whatever characters a class name holds.
_LITERAL_TEXT: dict[str, Any] = {"text.parse_math": False, "text.usetex": False}


def literal_text(fn: F) -> F:
    """Run a figure function with every text it creates and draws taken literally."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with plt.rc_context(_LITERAL_TEXT):  # type: ignore[arg-type]
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def shown_name(name: str) -> str:
    """A class name as figures show it: undecodable bytes of a folder name as ``\\xNN``."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return os.fsencode(name).decode("utf-8", "backslashreplace")


def _close_and_save(fig: plt.Figure, path: str | Path) -> Path:
    save_figure(fig, path)
    plt.close(fig)
    return Path(path)


@literal_text
def loss_curve(losses: np.ndarray, path: str | Path, steps_per_epoch: int | None = None,
               reference: tuple[float, str] | None = None,
               knn_history: list[dict[str, float]] | None = None,
               quality_history: list[dict[str, float]] | None = None,
               loss_name: str = "loss") -> Path:
    """The method's loss per step, with a moving average; ``reference`` (value, label) marks
    the method's own chance level where its loss has one (``Method.chance_loss``).

    ``knn_history`` (``[{"step", "epoch", "accuracy"}, ...]``, from pretraining) adds a panel
    beside the loss: kNN accuracy on a fixed subset against the epoch. ``quality_history``
    (``selfsup.quality``) adds one of the label-free signals: RankMe, alignment, uniformity.
    """
    panels = 1 + bool(knn_history) + bool(quality_history)
    fig, axes = plt.subplots(1, panels, figsize=(7 * panels - 1 * (panels - 1), 4), squeeze=False)
    ax = axes[0, 0]
    steps = np.arange(1, len(losses) + 1)
    ax.plot(steps, losses, lw=0.6, alpha=0.4, label="per step")
    w = max(1, len(losses) // 50)
    if w > 1:
        smooth = np.convolve(losses, np.ones(w) / w, mode="valid")
        ax.plot(steps[w - 1:], smooth, lw=1.8, label=f"moving average ({w} steps)")
    if reference is not None:
        ax.axhline(reference[0], ls="--", c="gray", lw=1, label=reference[1])
    ax.set(title=f"Pretraining loss ({loss_name})", xlabel="optimiser step", ylabel="loss")
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
    if quality_history:
        ax = axes[0, panels - 1]
        ep = [h["epoch"] for h in quality_history]
        width = int(quality_history[-1].get("feature_dim", 0))
        ax.plot(ep, [h["rankme"] for h in quality_history], marker="o", c="C2",
                label=f"RankMe (effective rank of {width} dims)")
        ax.set(title="Label-free signals during pretraining", xlabel="epoch",
               ylabel="RankMe (higher: features use more dimensions)")
        ax.grid(alpha=0.3)
        right = ax.twinx()
        right.plot(ep, [h["alignment"] for h in quality_history], ls="--", c="C3",
                   label="alignment of two views (lower: agree)")
        right.plot(ep, [h["uniformity"] for h in quality_history], ls=":", c="C4",
                   label="uniformity (lower: spread out)")
        right.set_ylabel("alignment, uniformity")
        lines = ax.get_lines() + right.get_lines()
        ax.legend(lines, [str(ln.get_label()) for ln in lines], fontsize=8, loc="best")
    fig.tight_layout()
    return _close_and_save(fig, path)


@literal_text
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


@literal_text
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
    h, w = queries.shape[1:3]
    # One image of every cell, drawn in one axes (an axes per cell took 2.7 s per run): each
    # cell an image inside a frame of b px, g px apart; a wider gap after the query column.
    b, g = max(1, round(max(h, w) / 12)), max(1, round(max(h, w) / 6))
    ch, cw = h + 2 * b + g, w + 2 * b + g
    canvas = np.ones((rows * ch, (k + 1) * cw + g, 3), dtype=np.float32)
    colours = {True: (0.17, 0.63, 0.17), False: (0.84, 0.15, 0.16)}  # tab:green, tab:red

    def put(r: int, c: int, image: np.ndarray, same: bool | None) -> None:
        y, x = r * ch, c * cw + (g if c else 0)
        if same is not None:
            canvas[y:y + h + 2 * b, x:x + w + 2 * b] = colours[same]
        canvas[y + b:y + b + h, x + b:x + b + w] = image

    labels_y = []
    for i in range(q):
        for j, name in enumerate(names):
            r = i * len(names) + j
            put(r, 0, queries[i], None)
            labels = neighbour_labels.get(name)
            compare = labels is not None and len(labels) and query_labels is not None
            for c in range(k):
                put(r, c + 1, neighbours[name][i, c],
                    bool(labels[i, c] == query_labels[i]) if compare else None)  # type: ignore[index]
            query = "" if query_labels is None or j else f"query: {classes[query_labels[i]]}\n"
            labels_y.append(f"{query}{name}")
    fig, ax = plt.subplots(figsize=(1.1 * (k + 1) + 1.2, 1.15 * rows + 0.8))
    ax.imshow(canvas, interpolation="nearest")
    ax.set_yticks([r * ch + (h + 2 * b) / 2 for r in range(rows)], labels_y, fontsize=8)
    ax.set_xticks([c * cw + (g if c else 0) + (w + 2 * b) / 2 for c in range(k + 1)],
                  ["query", *(str(c + 1) for c in range(k))], fontsize=8)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    framed = query_labels is not None and any(len(v) for v in neighbour_labels.values())
    fig.suptitle(f"Nearest training images (cosine similarity of features), {k} per query"
                 + ("; frame: green = same class" if framed else ""), fontsize=9)
    fig.tight_layout()
    return _close_and_save(fig, path)


@literal_text
def confusion(cm: np.ndarray, classes: list[str], path: str | Path, title: str) -> Path:
    """Counts and row-normalised confusion matrices side by side."""
    n = len(classes)
    side = min(12.0, max(4.5, 0.55 * n + 1.5))  # 100 classes: a readable page, not 56 inches
    every = max(1, math.ceil(n / 25))  # the classes named on the axes: at most 25
    fig, axes = plt.subplots(1, 2, figsize=(2 * side + 2, side))
    rows = cm.sum(1, keepdims=True).clip(min=1)
    for ax, mat, sub, fmt in ((axes[0], cm, "counts", "d"),
                              (axes[1], cm / rows, "row-normalised (recall)", ".2f")):
        im = ax.imshow(mat, cmap="Blues")
        ticks = range(0, n, every)
        ax.set(xticks=ticks, yticks=ticks, xlabel="predicted class", ylabel="true class",
               title=sub if every == 1 else f"{sub}; every {every}th class named")
        ax.set_xticklabels([classes[i] for i in ticks], rotation=45, ha="right")
        ax.set_yticklabels([classes[i] for i in ticks])
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


MAX_LEGEND_CLASSES = 20  # more classes than distinct colours: a colour scale instead


def _scatter(xy: np.ndarray, labels: np.ndarray | None, classes: list[str], path: str | Path,
             title: str, xlabel: str, ylabel: str) -> Path:
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    if labels is None:
        ax.scatter(xy[:, 0], xy[:, 1], s=4, alpha=0.6)
    elif len(classes) > MAX_LEGEND_CLASSES:  # too many for a legend: a colour scale of labels
        points = ax.scatter(xy[:, 0], xy[:, 1], s=4, alpha=0.7, c=labels, cmap="turbo",
                            vmin=0, vmax=len(classes) - 1)
        fig.colorbar(points, ax=ax, label=f"class (0-{len(classes) - 1}, in the order of "
                                          f"the data set's class list)")
    else:
        cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
        for c, name in enumerate(classes):
            m = labels == c
            ax.scatter(xy[m, 0], xy[m, 1], s=4, alpha=0.7, color=cmap(c % cmap.N), label=name)
        ax.legend(markerscale=3, fontsize=8, loc="best", title="class")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    return _close_and_save(fig, path)


@literal_text
def pca_map(features: np.ndarray, labels: np.ndarray | None, classes: list[str],
            path: str | Path, title: str = "PCA of test embeddings") -> Path:
    """First two principal components of the features, coloured by class."""
    x = features - features.mean(0)
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    xy = x @ vt[:2].T  # (N, 2); callers make sure of 2 points and 2 features
    var = s**2 / max(float((s**2).sum()), 1e-30)
    return _scatter(xy, labels, classes, path, f"{title} ({len(x)} points)",
                    f"PC 1 ({var[0]:.0%} of variance)", f"PC 2 ({var[1]:.0%} of variance)")


def subsample(labels: np.ndarray | None, n: int, count: int, seed: int = 0) -> np.ndarray:
    """Indices of ``count`` of ``n`` points (stratified by label when there are labels)."""
    rng = np.random.default_rng(seed)
    if count >= n:
        return np.arange(n)
    classes = np.unique(labels) if labels is not None else np.empty(0)
    if labels is None or count < len(classes):
        return np.sort(rng.choice(n, count, replace=False))
    per = max(1, count // len(classes))
    idx = [rng.permutation(np.flatnonzero(labels == c))[:per] for c in classes]
    return np.sort(np.concatenate(idx))


TSNE_MIN_POINTS = 7  # perplexity 2 needs a few neighbours per point


@literal_text
def tsne_map(features: np.ndarray, labels: np.ndarray | None, classes: list[str],
             path: str | Path, points: int = 2000, seed: int = 0,
             title: str = "t-SNE of test embeddings") -> Path:
    """t-SNE (scikit-learn, PCA init) of a stratified subsample; the title says how many points."""
    from sklearn.manifold import TSNE

    idx = subsample(labels, len(features), points, seed)
    x = features[idx]
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    if len(x) < TSNE_MIN_POINTS:
        raise ValueError(f"t-SNE needs at least {TSNE_MIN_POINTS} points, got {len(x)}")
    perplexity = float(min(30, max(2, (len(x) - 1) // 3)))
    xy = TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
    lab = None if labels is None else labels[idx]
    return _scatter(xy, lab, classes, path,
                    f"{title} ({len(idx)} of {len(features)} points)", "t-SNE 1", "t-SNE 2")


@literal_text
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

    ``data`` (the run's data set) is needed only for the retrieval and augmentation figures. A
    figure the data cannot give (too few points, say) is skipped with a note on stderr; one
    figure that fails never stops the others.
    """
    from selfsup.runfolder import read_metrics

    run_dir = Path(run_dir)
    metrics = read_metrics(run_dir)
    out: dict[str, str] = {}
    for name, draw in _figures(run_dir, cfg, data, metrics):
        try:
            made = draw()
        except Exception as e:  # noqa: BLE001 - a figure is never worth the run
            print(f"note: no {name} figure ({type(e).__name__}: "
                  f"{str(e).splitlines()[0][:160] if str(e) else ''})", file=sys.stderr,
                  flush=True)
            continue
        if made:
            out[name] = made.name
    return out


def _figures(run_dir: Path, cfg: Config, data: ImageData | None, metrics: dict[str, Any]
             ) -> list[tuple[str, Callable[[], Path | None]]]:
    """(name, function that draws it) for every figure ``plot_run`` tries, in order."""

    import torch

    from selfsup.augment import AugmentParams, two_views

    classes = [shown_name(str(c)) for c in metrics.get("classes", [])]

    def loss() -> Path | None:
        if not (run_dir / "loss.npy").is_file():
            return None
        losses = load_array(run_dir / "loss.npy", 1, "f")
        if len(losses) == 0:
            raise ValueError("no pretraining steps recorded")
        train_size = int(metrics.get("pretrain_size") or metrics.get("train_size", 0))
        batch = min(cfg.batch_size, train_size) if train_size else cfg.batch_size
        steps_per_epoch = train_size // batch if train_size else None
        from selfsup.methods import METHODS

        method = METHODS[cfg.method]
        return loss_curve(losses, run_dir / "loss.png", steps_per_epoch,
                          method.chance_loss(cfg, batch), metrics.get("knn_history"),
                          metrics.get("quality_history"), method.loss_title(cfg))

    def confusion_figure() -> Path | None:
        if "confusion" not in metrics:
            return None
        acc = metrics.get("linear_probe", {}).get("trained")
        title = "Linear probe on the trained encoder, test set"
        if isinstance(acc, float):
            title += f" (accuracy {acc:.1%})"
        return confusion(np.asarray(metrics["confusion"]), classes, run_dir / "confusion.png",
                         title)

    def embeddings() -> tuple[str, np.ndarray, np.ndarray | None] | None:
        for split in ("test", "train"):
            emb = run_dir / f"{split}_emb.npy"
            if emb.is_file():
                lbl = run_dir / f"{split}_lbl.npy"
                feats = load_array(emb, 2, "f")
                return split, feats, (load_array(lbl, 1, "i", len(feats)) if lbl.is_file()
                                      else None)
        return None

    def pca() -> Path | None:
        found = embeddings()
        if found is None:
            return None
        split, feats, labels = found
        if len(feats) < 2 or feats.shape[1] < 2:
            raise ValueError(f"a 2-D map needs 2 points and 2 features, got {feats.shape}")
        return pca_map(feats, labels, classes if labels is not None else [],
                       run_dir / "pca.png", f"PCA of {split} embeddings")

    def tsne() -> Path | None:
        found = embeddings()
        if found is None:
            return None
        if cfg.tsne_points == 0:
            print("note: no t-SNE map (--tsne-points 0)", file=sys.stderr, flush=True)
            return None
        split, feats, labels = found
        return tsne_map(feats, labels, classes if labels is not None else [],
                        run_dir / "tsne.png", cfg.tsne_points, cfg.seed,
                        f"t-SNE of {split} embeddings")

    def label_eff() -> Path | None:
        if "label_efficiency" not in metrics:
            return None
        return label_efficiency_plot(metrics["label_efficiency"],
                                     run_dir / "label_efficiency.png")

    def retrieval() -> Path | None:
        if data is None:
            return None
        return run_dir / "retrieval.png" if _retrieval(run_dir, data, cfg.seed) else None

    def augmentations() -> Path | None:
        if data is None:
            return None
        g = torch.Generator().manual_seed(cfg.seed)
        x = data.train_x[torch.linspace(0, len(data.train_x) - 1, 8).long()].cpu()  # spread out
        v1, v2 = two_views(x, AugmentParams.from_config(cfg, x.shape[-1]), g)

        def hwc(t: torch.Tensor) -> np.ndarray:
            return t.permute(0, 2, 3, 1).numpy()

        return augmentation_grid(hwc(x.float() / 255), hwc(v1), hwc(v2),
                                 run_dir / "augmentations.png")

    return [("loss", loss), ("confusion", confusion_figure), ("pca", pca), ("tsne", tsne),
            ("label_efficiency", label_eff), ("retrieval", retrieval),
            ("augmentations", augmentations)]


def _retrieval(run_dir: Path, data: ImageData, seed: int, queries: int = 6, k: int = 8) -> bool:
    """``retrieval.png`` from the saved embeddings of both encoders; False when they are missing.

    The queries are test images (one per class when labelled), or, without a test split,
    training images, each left out of its own neighbours."""
    has_test = data.test_x is not None
    splits = ("train", "test") if has_test else ("train",)
    files = {name: [run_dir / f"{p}{s}_emb.npy" for s in splits]
             for name, p in (("trained", ""), ("untrained", "untrained_"))}
    if not all(f.is_file() for paths in files.values() for f in paths):
        return False
    query_x = data.test_x if data.test_x is not None else data.train_x
    query_y_all = data.test_y if has_test else data.train_y
    query_y = None if query_y_all is None else query_y_all.cpu().numpy()
    train_y = None if data.train_y is None else data.train_y.cpu().numpy()
    rng = np.random.default_rng(seed)
    if query_y is not None:  # one query from each of the first classes
        classes = np.unique(query_y)[:queries]
        q_idx = np.array([rng.choice(np.flatnonzero(query_y == c)) for c in classes])
    else:
        q_idx = rng.choice(len(query_x), min(queries, len(query_x)), replace=False)

    def hwc(x: np.ndarray) -> np.ndarray:
        return np.moveaxis(x, -3, -1).astype(np.float32) / 255

    train_imgs = data.train_x.cpu().numpy()
    neighbours, labels = {}, {}
    for name, paths in files.items():
        tr = load_array(paths[0], 2, "f", len(train_imgs))
        te = (load_array(paths[1], 2, "f") if has_test else tr)[q_idx]
        tr = tr / np.linalg.norm(tr, axis=1, keepdims=True).clip(1e-12)
        te = te / np.linalg.norm(te, axis=1, keepdims=True).clip(1e-12)
        sim = te @ tr.T  # (Q, N)
        if not has_test:
            sim[np.arange(len(q_idx)), q_idx] = -np.inf  # a query is not its own neighbour
        nn_idx = np.argsort(-sim, axis=1)[:, :k]  # (Q, k), nearest first
        neighbours[f"{name} encoder"] = hwc(train_imgs[nn_idx])
        labels[f"{name} encoder"] = train_y[nn_idx] if train_y is not None else np.empty(0)
    names = [shown_name(c) for c in data.classes] if data.classes else []
    retrieval_grid(hwc(query_x.cpu().numpy()[q_idx]),
                   None if query_y is None else query_y[q_idx], neighbours, labels,
                   run_dir / "retrieval.png", names)
    return True
