"""``report.html``: one self-contained page about a run (images embedded as data URIs).

The page shows the config, the machine and timings, the metrics table (trained encoder beside
the untrained baseline: linear probe, kNN, fine-tuning and the label-efficiency table when they
were run) and every figure selfsup drew (by name: no other file of the folder). It needs no
network and no other file. Every value from the run's files is escaped, and the page's
Content-Security-Policy lets only its own small inline script run: it marks on ``<body>`` how
many images decoded (``data-images-shown="n/m"``) and how many script errors occurred
(``data-errors``), so that a browser test can check the page.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from selfsup.config import is_number
from selfsup.errors import SelfsupError
from selfsup.files import atomic_write_text

# Figures in the order the page shows them: (file, heading); ``captions`` says what each shows.
FIGURES = (
    ("loss.png", "Pretraining"),
    ("label_efficiency.png", "Label efficiency"),
    ("confusion.png", "Confusion matrix"),
    ("retrieval.png", "Nearest neighbours"),
    ("tsne.png", "t-SNE map"),
    ("pca.png", "PCA map"),
    ("augmentations.png", "Augmentations"),
)
LABEL_FREE_READING = (
    "RankMe is the effective rank of the encoder's features (1: every image maps to one "
    "direction, a collapsed encoder; up to the feature width: the features use every "
    "dimension); within one method, a higher value has gone with better accuracy after "
    "training, but it is not an accuracy and can rise with noise. Alignment (lower: two views of "
    "an image agree) and uniformity (lower: images spread over the sphere) are measured on the "
    "projections of two views; both are 0 for a collapsed network.")


def captions(m: dict[str, Any]) -> dict[str, str]:
    """What each figure shows, as ``selfsup.plots`` draws it for this run's metrics: the loss
    panels that exist, the split the maps show, whether there are classes and frames."""
    labelled = bool(m.get("classes"))
    has_test = bool(m.get("test_size"))
    split = "test" if has_test else "training"
    colour = "coloured by class" if labelled else "not coloured (no labels)"
    beside = []
    if m.get("knn_history"):
        beside.append("kNN accuracy on a fixed subset of labelled images")
    if m.get("quality_history"):
        beside.append("the label-free signals on a fixed subset of training images (RankMe; "
                      "alignment and uniformity of two views)")
    loss = ("Pretraining loss per step" + (", and beside it " + " and ".join(beside)
                                           + ", against the epoch" if beside else "") + ".")
    if has_test:
        queries = "a few test images (one per class)" if labelled else "a few test images"
    else:
        queries = "a few training images (each left out of its own neighbours)"
    frames = ("; a green frame marks a neighbour of the query's class, a red one another class"
              if labelled else "; unframed: there are no labels to compare")
    return {
        "loss.png": loss,
        "label_efficiency.png": "Test accuracy against the fraction of labels used.",
        "confusion.png": "Linear probe on the trained encoder, test set.",
        "retrieval.png": (f"Training images nearest (cosine) to {queries}, under the trained "
                          f"encoder and under the untrained one{frames}."),
        "tsne.png": f"t-SNE of the {split} embeddings of the trained encoder, {colour}.",
        "pca.png": (f"First two principal components of the {split} embeddings of the trained "
                    f"encoder, {colour}."),
        "augmentations.png": "Two random views of a few training images.",
    }

_CHECK_SCRIPT = """
window.__errors = 0;
window.addEventListener('error', function () { window.__errors += 1; }, true);
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var shown = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute('data-images-shown', shown + '/' + imgs.length);
  document.body.setAttribute('data-errors', String(window.__errors));
});
"""

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em;
       color: #222; }
h1 { margin-bottom: 0.2em; } .sub { color: #666; margin-top: 0; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.8em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #f2f2f2; }
.gain { color: #1a7f37; font-weight: 600; } .loss { color: #b42318; font-weight: 600; }
figure { margin: 1em 0 2em; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; }
details pre { background: #f7f7f7; padding: 1em; overflow-x: auto; font-size: 0.85em; }
"""


def esc(value: Any) -> str:
    """Any value as HTML text: every value from a file reaches the page through this (or
    ``pct``/``num``), so that nothing in ``metrics.json`` can add markup or script."""
    return html.escape(str(value), quote=True)


def text(x: Any, spec: str) -> str:
    """A number formatted by ``spec``; anything else as it is (plain text, not yet escaped)."""
    return format(x, spec) if is_number(x) else str(x)


def num(x: Any, spec: str) -> str:
    """A number formatted by ``spec``; anything else as escaped text."""
    return esc(text(x, spec))


def pct(x: Any) -> str:
    if x is None:
        return "–"
    return f"{100 * x:.1f}%" if is_number(x) else esc(x)


def _gain(t: Any, u: Any) -> str:
    if not (is_number(t) and is_number(u)):
        return "<td>–</td>"
    d = 100 * (t - u)
    return f'<td class="{"gain" if d >= 0 else "loss"}">{d:+.1f}</td>'


def html_table(head: list[str], rows: list[str]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _metrics_table(m: dict[str, Any]) -> str:
    rows = []
    for key, label in (("linear_probe", "Linear probe (logistic regression)"),
                       ("knn", f"kNN (k={esc(m.get('knn', {}).get('k', '?'))})")):
        r = m.get(key)
        if r and "trained" in r:
            rows.append(f"<tr><td>{label}</td><td>{pct(r['trained'])}</td>"
                        f"<td>{pct(r['untrained'])}</td>{_gain(r['trained'], r['untrained'])}"
                        "</tr>")
    if not rows and "train_size" not in m:  # evaluate_run has not measured this run
        run = html.escape(str(m.get("_run_dir", "RUN")))
        return (f"<p>This run is pretrained but not evaluated yet: no accuracy, no embeddings. "
                f"Measure it with <code>selfsup evaluate {run}</code>.</p>")
    if not rows:
        return ("<p>No labels: no accuracy. The label-free signals below and the nearest "
                "neighbours further down show what the encoder learned.</p>")
    return html_table(["test accuracy", "trained encoder", "untrained encoder", "gain (points)"],
                  rows)


def _caveats(m: dict[str, Any]) -> str:
    """What makes this run's figures mean less than they seem (``evaluate.caveats``)."""
    items = [c for c in m.get("caveats") or [] if isinstance(c, str)]
    if not items:
        return ""
    return ("<p><b>Read with care:</b></p><ul>"
            + "".join(f"<li>{html.escape(c)}</li>" for c in items) + "</ul>")


def _label_free_table(m: dict[str, Any]) -> str:
    """RankMe, alignment and uniformity at the end of pretraining beside step 0 (the untrained
    networks), with how to read them, and the collapse warning when there is one."""
    h = m.get("quality_history")
    if not isinstance(h, list) or not h or not all(isinstance(e, dict) for e in h):
        return ""
    first, last = h[0], h[-1]
    rows = [f"<tr><td>{label}</td><td>{num(last.get(k), fmt)}</td>"
            f"<td>{num(first.get(k), fmt)}</td></tr>"
            for k, label, fmt in (
                ("rankme", f"RankMe (effective rank, of {num(last.get('feature_dim', 0), '.0f')} "
                           f"feature dimensions)", ".1f"),
                ("alignment", "alignment of two views (lower: better)", ".3f"),
                ("uniformity", "uniformity (lower: better)", ".3f"))]
    warning = m.get("collapse_warning")
    note = (f'<p class="loss">Warning: {html.escape(str(warning))}</p>' if warning else "")
    return ("<h3>Label-free signals (no labels used)</h3>" + note
            + html_table(["measure", f"trained (step {num(last.get('step', 0), '.0f')})",
                          "untrained (step 0)"], rows)
            + f"<p>{html.escape(LABEL_FREE_READING)}</p>")


def _finetune_table(m: dict[str, Any]) -> str:
    ft = m.get("finetune")
    if not ft:
        return ""
    rows = [f"<tr><td>{esc(k)}</td><td>{esc(r['labels'])}</td><td>{esc(r['steps'])}</td>"
            f"<td>{pct(r['accuracy'])}</td><td>{num(r['seconds'], '.0f')}</td></tr>"
            for k, r in sorted(ft.items())]
    return "<h3>Classifiers trained with labels</h3>" + html_table(
        ["mode and label fraction", "labels", "steps", "test accuracy", "seconds"], rows)


def _label_efficiency_table(m: dict[str, Any]) -> str:
    """Each way of using the labels against training from scratch, on its own: picking the
    better of two test accuracies would be a choice made on the test set."""
    le = m.get("label_efficiency")
    if not le:
        return ""
    rows = []
    for i, f in enumerate(le["fraction"]):
        cells = "".join(f"<td>{pct(le[k][i])}</td>"
                        for k in ("probe", "finetune", "scratch", "probe_untrained"))
        rows.append(f"<tr><td>{num(100 * f, 'g')}% ({esc(le['labels'][i])})</td>{cells}"
                    f"{_gain(le['probe'][i], le['scratch'][i])}"
                    f"{_gain(le['finetune'][i], le['scratch'][i])}</tr>")
    return "<h3>Label efficiency</h3>" + html_table(
        ["labels used (stratified)", "probe (pretrained)", "fine-tuned", "from scratch",
         "probe (untrained)", "probe vs scratch", "fine-tuned vs scratch"], rows)


def _resumes_table(m: dict[str, Any]) -> str:
    """The resumes of the run, in order: when, from which step to which, what changed."""
    resumes = m.get("resumes")
    if not resumes:
        return ""
    rows = []
    for r in resumes:
        if not isinstance(r, dict):
            continue
        changes = r.get("changed")
        changes = changes if isinstance(changes, dict) else {}
        changed = "; ".join(f"{k}: {v[0]} -> {v[1]}" for k, v in changes.items()
                            if isinstance(v, list) and len(v) == 2) or "nothing"
        rows.append(f"<tr><td>{html.escape(str(r.get('date', '?')))}</td>"
                    f"<td>{html.escape(str(r.get('from_step', '?')))}</td>"
                    f"<td>{html.escape(str(r.get('to_step', '?')))}</td>"
                    f"<td>{html.escape(changed)}</td></tr>")
    return ("<h3>Resumed</h3><p>The configuration below is the run's latest; "
            "<code>config.json</code> keeps the one it started with.</p>"
            + html_table(["resumed at", "from step", "to step", "settings changed"], rows))


def _data_text(m: dict[str, Any], cfg: dict[str, Any]) -> str:
    """The data set, its image size and what each part was used for."""
    name, size = m.get("dataset", cfg.get("dataset", "?")), m.get("image_size")
    if "train_size" not in m:
        pre = m.get("pretrain_size")
        return (f"{name}" + (f": {pre} images for pretraining" if isinstance(pre, int) else "")
                + "; not evaluated yet")
    train, extra = m.get("train_size", "?"), 0
    if isinstance(train, int) and isinstance(m.get("pretrain_size"), int):
        extra = m["pretrain_size"] - train
    return (f"{name}{f', {size}x{size} px' if size else ''}: {train} training images"
            f"{f' (and {extra} unlabeled ones for pretraining only)' if extra > 0 else ''}, "
            f"{m.get('test_size', '?')} test images")


def _facts(m: dict[str, Any]) -> str:
    cfg, mach, pre = m.get("config", {}), m.get("machine", {}), m.get("pretrain", {})
    t = m.get("time_s", {})
    items = [
        ("data", _data_text(m, cfg)),
        ("method", f"{cfg.get('method', 'simclr')}: evaluates "
                   f"{pre.get('evaluated', 'the encoder f')}"),
        ("encoder", f"{cfg.get('model', '?')} width {cfg.get('width', '?')}"
                    + (f", features {m['feature_dim']}" if "feature_dim" in m else "")),
        ("pretraining", f"{pre.get('steps', '?')} steps ({text(pre.get('epochs', 0), '.1f')} "
                        f"epochs), batch {cfg.get('batch_size', '?')}, "
                        f"{pre.get('precision', '?')}, {text(pre.get('images_per_s', 0), '.0f')} "
                        f"images/s"),
        *([("budget", _budget_text(cfg, pre["budget"]))] if isinstance(pre.get("budget"), dict)
          else []),
        ("machine", f"{mach.get('cpu', '?')} ({mach.get('cpu_capability', '?')}), "
                    f"{mach.get('threads', '?')} threads, device {mach.get('device', '?')}"
                    + (f", {mach['gpu']}" if mach.get("gpu") else "")
                    + f", torch {mach.get('torch', '?')}"),
        ("time", ", ".join(f"{k.replace('_', ' ')} {text(v, '.1f')} s" for k, v in t.items())),
    ]
    # plain text above: each whole value is escaped once, here
    lis = "".join(f"<li><b>{k}</b>: {esc(v)}</li>" for k, v in items)
    return f"<ul>{lis}</ul>"


def _budget_text(cfg: dict[str, Any], b: dict[str, Any]) -> str:
    """How a time budget was fitted and how much of it pretraining used."""
    try:
        raw = b.get("size")
        size: dict[str, Any] = raw if isinstance(raw, dict) else {}
        chosen = (f"; encoder chosen for this machine: {size['chosen']}"
                  if size.get("chosen") else "")
        replans = b.get("replans")
        replans = (f", replanned {len(replans)} times at the run's own speed"
                   if isinstance(replans, list) and replans else "")
        ratio = size.get("rung_over_run")
        if chosen and isinstance(ratio, float):
            chosen += f" (the sizing's timing of it {100 * (ratio - 1):+.0f} % from the run's own)"
        return (f"{cfg.get('budget', '?')} given, {float(b['used_s']) / 60:.1f} min used "
                f"({100 * float(b['used_fraction']):.1f} %); {int(b['steps'])} steps: "
                f"{int(b.get('planned_steps', b['steps']))} planned from {int(b['timed_steps'])} "
                f"timed at {1000 * float(b['step_s']):.0f} ms{replans}{chosen}")
    except (KeyError, TypeError, ValueError):
        return "recorded, but its figures are incomplete"


def method_title(name: str) -> str:
    """A method's name as its paper writes it (``moco`` -> MoCo v2); unknown names as given."""
    from selfsup.methods import METHODS

    cls = METHODS.get(name)
    return cls.title if cls is not None else name


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FIGURE_MAX_BYTES = 64 << 20


def figure_html(path: Path, heading: str, caption: str) -> str:
    """A figure the run drew, embedded: a regular PNG file inside its folder (a link that
    leads elsewhere, or a file that is not a PNG, is named and not embedded)."""
    from selfsup.files import confined, read_regular

    try:
        blob = read_regular(confined(path.parent, path.name), FIGURE_MAX_BYTES)
        if not blob.startswith(PNG_MAGIC):
            raise OSError(0, "not a PNG image")
        data = base64.b64encode(blob).decode("ascii")
    except (OSError, SelfsupError) as e:
        why = getattr(e, "strerror", None) or "a link that leads out of the run folder"
        return (f"<h2>{esc(heading)}</h2><p>{esc(path.name)} is not shown ({esc(why)}).</p>")
    return (f"<h2>{html.escape(heading)}</h2><figure><img alt=\"{html.escape(heading)}\" "
            f"src=\"data:image/png;base64,{data}\"><figcaption>{html.escape(caption)}"
            "</figcaption></figure>")


def csp(script: str = "") -> str:
    """The page's Content-Security-Policy: no script but ``script`` (by its hash), no
    network, images from data URIs only. Even markup that reached the page unescaped could not
    run or fetch anything."""
    import hashlib

    allowed = (f"'sha256-{base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()}'"
               if script else "'none'")
    return ('<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
            f"img-src data:; style-src 'unsafe-inline'; script-src {allowed}; "
            "base-uri 'none'; form-action 'none'\">")


def build_report(run_dir: str | Path) -> str:
    """The HTML page of a run, from its ``metrics.json``, ``config.json`` and figures."""
    from selfsup.files import read_json
    from selfsup.runfolder import read_metrics

    run_dir = Path(run_dir)
    m = read_metrics(run_dir)
    cpath = run_dir / "config.json"
    cfg = m.get("config") or (read_json(cpath, "a config object", "it is not a selfsup run's")
                              if cpath.is_file() else {})
    m.setdefault("config", cfg)
    m["_run_dir"] = str(run_dir)  # for the commands the page names
    text = captions(m)
    # Only the figures selfsup draws, by name: any other file in the folder stays out.
    figures = [figure_html(run_dir / f, h, text[f]) for f, h in FIGURES
               if (run_dir / f).exists() or (run_dir / f).is_symlink()]
    title = f"selfsup run {run_dir.name}"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
{csp(_CHECK_SCRIPT)}
<title>{html.escape(title)}</title><style>{STYLE}</style>
<script>{_CHECK_SCRIPT}</script></head>
<body>
<h1>{html.escape(title)}</h1>
<p class="sub">{html.escape(method_title(str(cfg.get("method", "simclr"))))} pretraining
without labels; every accuracy beside the same network at its initial weights (untrained),
probed the same way.</p>
{_facts(m)}
<h2>Results</h2>
{_metrics_table(m)}
{_caveats(m)}
{_label_free_table(m)}
{_finetune_table(m)}
{_label_efficiency_table(m)}
{_resumes_table(m)}
{''.join(figures)}
<h2>Configuration</h2>
<details><summary>config.json</summary><pre>{html.escape(json.dumps(cfg, indent=2,
                                                             sort_keys=True))}</pre></details>
</body></html>
"""


def write_report(run_dir: str | Path) -> Path:
    """Write ``run_dir/report.html`` (atomically) and return its path."""
    path = Path(run_dir) / "report.html"
    try:
        page = build_report(run_dir)
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
        # Sections of the right type holding values of the wrong one: written by hand, or
        # damaged. Say which file, not where in this module it failed.
        raise SelfsupError(f"{Path(run_dir) / 'metrics.json'} holds values selfsup did not "
                           f"write ({type(e).__name__}: {str(e)[:120]}); move it aside and run "
                           f"`selfsup evaluate {run_dir}` to measure the run again") from None
    atomic_write_text(page, path)
    return path
