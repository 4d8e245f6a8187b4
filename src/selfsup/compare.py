"""Several methods on the same data, budget and seed: one page that says which to pick.

``selfsup compare`` runs each method as a normal run folder ``<out_dir>/<name>/<method>`` (so it
resumes where it stopped: a finished run is kept, a stopped one resumed, an unevaluated one
evaluated), then reads their results and writes ``compare.json``, ``compare.png`` (loss and kNN
curves over pretraining time) and ``compare.html`` beside them.
"""

from __future__ import annotations

import dataclasses
import html
from pathlib import Path
from typing import Any

import numpy as np

from selfsup.checkpoint import CHECKPOINT, ENCODER
from selfsup.errors import SelfsupError
from selfsup.evaluate import linear_probe
from selfsup.files import atomic_write_text, load_array, read_json, save_json
from selfsup.finetune import stratified_subset
from selfsup.runfolder import read_metrics

CLOSE = 1.0  # points of linear-probe accuracy within which two methods are called a tie


def run_state(run_dir: Path) -> str:
    """What a method's run folder needs: ``new``, ``resume``, ``evaluate`` or ``done``. A
    folder with neither checkpoint nor encoder is ``new``: a run killed before its first
    checkpoint starts again (its leftovers replaced); anything else there is refused, named."""
    if not (run_dir / ENCODER).is_file():
        return "resume" if (run_dir / CHECKPOINT).is_file() else "new"
    if not (run_dir / "metrics.json").is_file() or not (run_dir / "train_emb.npy").is_file():
        return "evaluate"  # evaluation writes the embeddings, labelled data or not
    return "done"


def few_label_probe(run_dir: Path, fraction: float, subsets: int, which: str = "",
                    validation: bool = True) -> tuple[list[float], list[float]] | None:
    """The logistic probe fitted on a stratified ``fraction`` of the training labels, one fit
    per subset (seeds 0..subsets-1), from the run's saved embeddings; ``which="untrained_"``
    for the untrained encoder's.

    Returns:
        Its accuracy on the training images outside the subset (validation: what a choice may
        rank by; empty unless ``validation``) and on the test set (the final figure), one value
        per subset each; None for unlabeled runs.
    """
    lbl = run_dir / "train_lbl.npy"
    if not lbl.is_file() or not (run_dir / "test_lbl.npy").is_file():
        return None
    train_y, test_y = load_array(lbl, 1, "i"), load_array(run_dir / "test_lbl.npy", 1, "i")
    train_f = load_array(run_dir / f"{which}train_emb.npy", 2, "f", len(train_y))
    test_f = load_array(run_dir / f"{which}test_emb.npy", 2, "f", len(test_y))
    if train_f.shape[1] != test_f.shape[1]:
        raise SelfsupError(f"{run_dir}: the training and test embeddings differ in width; run "
                           f"`selfsup evaluate {run_dir}` to write them again")
    val, test = [], []
    for seed in range(subsets):
        idx = stratified_subset(train_y, fraction, seed)
        rest = np.setdiff1d(np.arange(len(train_y)), idx)  # held out of this fit
        fit = (train_f[idx], train_y[idx])
        test.append(linear_probe(*fit, test_f, test_y, seed=seed).accuracy)
        if validation:
            val.append(linear_probe(*fit, train_f[rest], train_y[rest], seed=seed).accuracy
                       if len(rest) else float("nan"))
    return val, test


def _settings_of(method: str) -> tuple[str, ...]:
    """The config fields a method reads that others do not (shown beside its row)."""
    from selfsup.methods import METHODS

    cls = METHODS.get(method)
    own = cls.Settings if cls is not None else None
    return tuple(f.name for f in dataclasses.fields(own)) if own is not None else ()


def _mean(xs: list[float] | None) -> float | None:
    return None if not xs else float(np.mean(xs))


def method_row(run_dir: Path, fraction: float, subsets: int) -> dict[str, Any]:
    """One method's figures from its run folder."""
    m = read_metrics(run_dir)
    cfg = m.get("config") or read_json(run_dir / "config.json", "a config object",
                                       "it is not a selfsup run's")
    pre = m.get("pretrain", {})
    lp, knn = m.get("linear_probe", {}), m.get("knn", {})
    few_val, few = few_label_probe(run_dir, fraction, subsets) or (None, None)
    few_untrained = (few_label_probe(run_dir, fraction, subsets, "untrained_", validation=False)
                     or (None, None))[1]
    return dict(
        method=cfg.get("method", "simclr"), run=str(run_dir), steps=pre.get("steps"),
        budget=cfg.get("budget") or None,
        epochs=pre.get("epochs"), images_per_s=pre.get("images_per_s"),
        train_minutes=(pre.get("train_seconds") or 0.0) / 60,
        linear=lp.get("trained"), linear_untrained=lp.get("untrained"),
        linear_validation=lp.get("trained_validation"),
        knn=knn.get("trained"), knn_untrained=knn.get("untrained"),
        few_labels=few, few_labels_mean=_mean(few),
        few_labels_std=None if not few else float(np.std(few)),
        few_labels_untrained=_mean(few_untrained),
        few_labels_validation=(_mean(few_val) if few_val and not np.isnan(few_val).any()
                               else None),
        settings={k: cfg.get(k) for k in _settings_of(cfg.get("method", "simclr"))},
    )


def recommend(rows: list[dict[str, Any]]) -> str:
    """Which method to pick, by the linear probe's accuracy on a held-out part of the training
    set (the probe's validation split), and the few-label probe's on the training images
    outside its subsets where it disagrees. Never by a test figure: the test set gives the
    final figures of the table, and a pick made on it would be a choice made on the test set.
    """
    labelled = [r for r in rows if isinstance(r.get("linear"), float)]
    if not labelled:
        return ("No labels, so no accuracy to rank the methods by: the losses of different "
                "methods are not comparable numbers. Pick by a downstream task of your own.")
    missing = [r["method"] for r in labelled if not isinstance(r.get("linear_validation"),
                                                               float)]
    if missing:
        return (f"No pick: {', '.join(missing)} has no validation accuracy (too few labelled "
                f"images per class to hold any out, or evaluated by an older selfsup: run "
                f"`selfsup evaluate` on it again). Choosing by the test figures would be a "
                f"choice made on the test set.")
    scored = sorted(labelled, key=lambda r: -r["linear_validation"])
    best = scored[0]
    text = (f"Pick {best['method']}: the highest linear probe on held-out training images "
            f"({best['linear_validation']:.1%}) in this budget.")
    ties = [r["method"] for r in scored[1:]
            if 100 * (best["linear_validation"] - r["linear_validation"]) < CLOSE]
    if ties:
        text += (f" {', '.join(ties)} {'is' if len(ties) == 1 else 'are'} within {CLOSE:g} "
                 f"point: one run each cannot tell them apart.")
    few = [r for r in scored if isinstance(r.get("few_labels_validation"), float)]
    if few:
        top = max(few, key=lambda r: r["few_labels_validation"])
        if top["method"] != best["method"] and isinstance(best.get("few_labels_validation"),
                                                          float):
            text += (f" With few labels {top['method']} leads on held-out training images "
                     f"({top['few_labels_validation']:.1%} against "
                     f"{best['few_labels_validation']:.1%}).")
    return text


def _minutes_per_step(r: dict[str, Any], steps: int) -> tuple[float, str]:
    """Minutes per step for the curves' time axis: from the budget when the run had one (its
    steps were fitted to it, so a run slowed by other work on the machine is not stretched),
    else from the measured training time."""
    from selfsup.config import parse_duration

    budget = r.get("budget")
    if budget:
        return parse_duration(str(budget)) / 60 / max(1, steps), "minutes of the budget"
    return r["train_minutes"] / max(1, steps), "pretraining minutes (measured)"


def curves_figure(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Loss (relative to its first steps) and kNN accuracy of every method over pretraining
    time, overlaid. Losses of different methods differ in scale, hence the ratio."""
    from selfsup.plots import _close_and_save, literal_text, plt

    @literal_text
    def draw() -> Path | None:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        xlabel = "pretraining minutes"
        drawn = False
        for r in rows:
            run = Path(r["run"])
            if not (run / "loss.npy").is_file() or not r.get("steps"):
                continue
            losses = load_array(run / "loss.npy", 1, "f").astype(np.float64)
            per_step, xlabel = _minutes_per_step(r, len(losses))
            k = max(1, len(losses) // 100)  # a running mean over 1 % of the run
            smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
            start = float(np.mean(losses[:k])) or 1.0
            ax1.plot(np.arange(len(smooth)) * per_step, smooth / start, label=r["method"])
            hist = read_metrics(run).get("knn_history") or []
            if hist:
                ax2.plot([h["step"] * per_step for h in hist],
                         [100 * h["accuracy"] for h in hist], marker=".", label=r["method"])
            drawn = True
        if not drawn:
            plt.close(fig)
            return None
        ax1.set(xlabel=xlabel, ylabel="loss / its value at the start", title="loss (smoothed)")
        ax2.set(xlabel=xlabel, ylabel="kNN accuracy (%)", title="kNN monitor (fixed subset)")
        for ax in (ax1, ax2):
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend()
        fig.tight_layout()
        return _close_and_save(fig, path)

    return draw()


def write_page(folder: Path, rows: list[dict[str, Any]], facts: dict[str, Any]) -> Path:
    """``compare.json``, ``compare.png`` and ``compare.html`` in ``folder``."""
    from selfsup.config import parse_duration
    from selfsup.report import STYLE, csp, esc, figure_html, html_table, method_title, num, pct

    pick = recommend(rows)
    save_json(dict(facts, methods=rows, recommendation=pick), folder / "compare.json")
    figure = curves_figure(rows, folder / "compare.png")
    frac = facts["fraction"]
    body = []
    for r in rows:
        few = ("–" if r["few_labels_mean"] is None else
               f"{pct(r['few_labels_mean'])} ± {num(100 * r['few_labels_std'], '.1f')}")
        settings = ", ".join(f"{k} {v}" for k, v in r["settings"].items())
        cells = [f"<b>{esc(method_title(str(r['method'])))}</b>",
                 f"{esc(r['steps'])} ({num(r['epochs'], '.1f')} ep.)" if r["steps"] else "–",
                 num(r["images_per_s"], ".0f") if r["images_per_s"] else "–",
                 f"{pct(r.get('linear_validation'))} / "
                 f"{pct(r.get('few_labels_validation'))}",
                 f"{pct(r['linear'])} / {pct(r['linear_untrained'])}",
                 f"{pct(r['knn'])} / {pct(r['knn_untrained'])}",
                 f"{few} / {pct(r['few_labels_untrained'])}",
                 html.escape(settings) or "–"]
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    table = html_table(["method", "steps", "images/s",
                        f"held-out training images: linear probe / {frac:.0%}-label probe "
                        f"(used to pick)", "linear probe (trained / untrained)",
                    "kNN (trained / untrained)",
                    f"probe with {frac:.0%} of labels, {facts['subsets']} subsets "
                    f"(trained / untrained)", "method settings"], body)
    slow = [f"{r['method']} trained {r['train_minutes']:.1f} min for a budget of {r['budget']}"
            for r in rows if r.get("budget") and r["train_minutes"] * 60 > 1.1 * parse_duration(
                str(r["budget"]))]
    if slow:  # the steps were fitted at the start; something else took the machine later
        table += ("<p><b>Note:</b> " + html.escape("; ".join(slow)) + ": the machine was busy "
                  "with other work during these runs, so their images/s are low. Their steps "
                  "were fitted to the budget at the start, so their accuracy is what the budget "
                  "buys.</p>")
    title = f"selfsup compare {folder.name}"
    fig_html = (figure_html(figure, "Loss and kNN over pretraining time",
                        "Each method's loss divided by its starting value (the losses are "
                        "different functions), and the kNN monitor's accuracy on its fixed "
                        "subset, against time: with a budget, each step at its share of the "
                        "budget (the steps were fitted to it).") if figure else "")
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
{csp()}
<title>{html.escape(title)}</title><style>{STYLE}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p class="sub">{html.escape(str(facts['data']))}; every method with the same options
({html.escape(str(facts['options']))}), one after the other on {html.escape(str(facts['machine']))}.
Each run is a normal run folder with its own report.</p>
<h2>Which to pick</h2><p><b>{html.escape(pick)}</b></p>
<p>The pick is made on held-out parts of the training set only: the linear probe's validation
split (the images it holds out to choose its weight decay) and, for the few-label probe, the
training images outside its subsets. The test set gives the final figures of the table and
chooses nothing.</p>
<h2>Results</h2>
{table}
<p>Held-out training images: the accuracies the pick uses (trained encoder). Linear probe and
kNN: the run's evaluation on the test set. The few-label probe: logistic regression on a
stratified {frac:.0%} of the training labels (mean ± standard deviation over
{facts['subsets']} subsets), scored on the test set. Untrained: the same network at its initial
weights.</p>
{fig_html}
<h2>Runs</h2><ul>{''.join(f'<li><a href="{html.escape(Path(r["run"]).name)}/report.html">'
                          f'{html.escape(r["method"])}</a></li>' for r in rows)}</ul>
</body></html>
"""
    path = folder / "compare.html"
    atomic_write_text(page, path)
    return path
