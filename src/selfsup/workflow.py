"""The workflow: a run (pretrain, evaluate, plot, report), and the commands on a run folder
(evaluate, plot, finetune, label efficiency, report, embed, export, predict) and across runs
(compare), as library calls. The command line parses its options and calls these; ``compare``
calls ``run`` and ``evaluate`` the same way."""

from __future__ import annotations

import contextlib
import csv
import io
import os
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import selfsup.evaluate  # called through their modules (replaceable)
import selfsup.report
from selfsup import dist
from selfsup.checkpoint import check_resume
from selfsup.compare import method_row, recommend, run_state, write_page
from selfsup.config import PLUGINS, Config, Range, check_number, config_from_dict, make_config
from selfsup.datasets import load_for
from selfsup.errors import ConfigError, SelfsupError
from selfsup.export import export_encoder, read_metadata
from selfsup.files import (
    atomic_write_text,
    check_output,
    folder_lock,
    read_json,
    save_json,
    save_npy,
)
from selfsup.finetune import (
    LABEL_FRACTION_RANGE,
    FinetuneSettings,
    finetune_run,
    parse_fractions,
    settings_from,
)
from selfsup.finetune import label_efficiency as measure_label_efficiency
from selfsup.hardware import machine_info, select_device, select_precision
from selfsup.inference import load_classifier, load_encoder
from selfsup.logs import check_tensorboard
from selfsup.methods import METHODS
from selfsup.quality import collapse_warning
from selfsup.runfolder import (
    check_new_run_dir,
    checkpoint_config_of,
    claim,
    finished_config,
    read_metrics,
    run_folder,
    update_metrics,
)
from selfsup.sizing import check_model_input, check_model_size, photo_side
from selfsup.train import pretrain

SUMMARY_ROWS = (("linear_probe", "linear probe"), ("knn", "kNN"))
# The training options finetune and label-efficiency take (None: the run's or the default)
FINETUNE_OPTIONS = ("epochs", "min_steps", "batch_size", "lr", "encoder_lr_mult", "seed")


def _check_threads(cfg: Config, overrides: dict[str, Any]) -> None:
    """--threads beyond this machine's CPUs oversubscribes them: refused before any work (a
    resumed run's own value from a larger machine is capped, with a note, when it starts)."""

    cpus = os.cpu_count() or 1
    if "threads" in overrides and cfg.threads > cpus:
        raise ConfigError(f"--threads must be in [0, {cpus}] on this machine ({cpus} CPUs; 0 = "
                          f"torch's default), got {cfg.threads}")


def resolve(overrides: dict[str, Any], preset: str | None = None, resume: str | None = None
            ) -> tuple[Config, Path, dict[str, list[Any]]]:
    """The run's config and folder, and for a resumed run the settings it changes.

    A new run goes into a new or empty folder only: a folder that already holds files (a
    finished run, or anything else) is refused before anything is written.
    """
    if resume:
        run_dir = Path(resume)
        old = checkpoint_config_of(run_dir)
        cfg = config_from_dict({**old.to_dict(), **overrides})
        check_resume(old, cfg, run_dir)
        _check_threads(cfg, overrides)
        a, b = old.to_dict(), cfg.to_dict()
        return cfg, run_dir, {k: [a[k], b[k]] for k in sorted(a) if a[k] != b[k]}
    cfg = make_config(preset, overrides)
    _check_threads(cfg, overrides)
    if not cfg.name:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        cfg = config_from_dict({**cfg.to_dict(), "name": f"{cfg.dataset}-{cfg.preset or 'custom'}"
                                                          f"-{stamp}"})
    run_dir = Path(cfg.out_dir) / cfg.name
    check_new_run_dir(run_dir)  # before anything is created there
    return cfg, run_dir, {}


def _load_data(cfg: Config, pretraining: bool = False) -> Any:
    """The run's data; STL-10's unlabeled images only where pretraining uses them."""
    return load_for(cfg, pretraining)


def _load_to_train(cfg: Config, device: Any) -> tuple[Config, Any]:
    """The data a new run trains on, photos at the side the machine and budget choose
    (``sizing.photo_side``); that side is written into the config (``image_size``), so that
    a resume, ``evaluate`` and ``embed`` read the images as this run did."""
    chosen: list[int] = []

    def side_for(median: int, n: int) -> tuple[int, str]:
        side, why = photo_side(cfg, device, select_precision(cfg.precision, device)[0])(median, n)
        chosen.append(side)
        return side, why

    data = load_for(cfg, pretraining=True, side_for=side_for)
    if chosen:
        cfg = config_from_dict({**cfg.to_dict(), "image_size": chosen[0]})
    return cfg, data


def _label_free_summary(metrics: dict[str, Any]) -> None:
    """Print the label-free signals, untrained (step 0) and now, and record and print a
    collapse warning when they show one."""

    history = metrics.get("quality_history") or []
    metrics.pop("collapse_warning", None)
    if not history:
        return
    first, last = history[0], history[-1]
    width = int(last.get("feature_dim", 0))
    print(f"{'label-free (no labels used)':28}{'step ' + str(int(last['step'])):>12}"
          f"{'step 0':>10}\n"
          f"{f'RankMe (of {width} dims)':28}{last['rankme']:>12.1f}{first['rankme']:>10.1f}\n"
          f"{'alignment (lower better)':28}{last['alignment']:>12.3f}{first['alignment']:>10.3f}\n"
          f"{'uniformity (lower better)':28}{last['uniformity']:>12.3f}"
          f"{first['uniformity']:>10.3f}", flush=True)
    warning = collapse_warning(history)
    if warning:
        metrics["collapse_warning"] = warning
        print(f"warning: {warning}", file=sys.stderr, flush=True)


def _summary(metrics: dict[str, Any]) -> str:
    lines = [f"{'':16}{'trained':>10}{'untrained':>11}{'gain':>9}"]
    for key, label in SUMMARY_ROWS:
        m = metrics.get(key)
        if m and "trained" in m:
            t, u = m["trained"], m["untrained"]
            lines.append(f"{label:16}{t:>9.1%}{u:>11.1%}{100 * (t - u):>+8.1f}")
    return "\n".join(lines)


def _record_pretraining(metrics: dict[str, Any], result: Any, changes: dict[str, list[Any]],
                        resume: bool) -> None:
    """Put this invocation's pretraining into ``metrics``: a new run's figures, or a resume
    added to the record (the first invocation's config and figures are kept)."""

    this = dict(method=result.config.method, evaluated=METHODS[result.config.method].evaluated,
                steps=result.steps, epochs=result.epochs, precision=result.precision,
                images_per_s=result.images_per_s, train_seconds=result.seconds,
                **({"budget": result.budget} if result.budget else {}))
    previous = metrics.get("pretrain")
    if not resume or not isinstance(previous, dict):
        metrics["pretrain"] = this
        return
    metrics.setdefault("resumes", []).append(dict(
        date=datetime.now().isoformat(timespec="seconds"), from_step=result.start_step,
        to_step=result.steps, changed=changes, precision=result.precision,
        images_per_s=result.images_per_s, train_seconds=result.seconds))
    seconds = float(previous.get("train_seconds", 0.0)) + result.seconds
    images = (float(previous.get("images_per_s", 0.0)) * float(previous.get("train_seconds", 0.0))
              + result.images_per_s * result.seconds)
    previous.update(steps=result.steps, epochs=result.epochs, train_seconds=seconds,
                    images_per_s=images / seconds if seconds > 0 else 0.0)


def run(overrides: dict[str, Any], preset: str | None = None, resume: str | None = None,
        everything: bool = True) -> int:
    """A run: pretrain, then (``everything``) evaluate, plot and write the report; a new one
    from ``overrides`` over ``preset``, or ``resume`` (a run folder) continued with them."""

    start = time.perf_counter()
    cfg, run_dir, changes = resolve(overrides, preset, resume)
    if resume:
        read_metrics(run_dir)  # a damaged metrics.json is an error now, not after training
    # Under torchrun: join the process group; rank 0's run folder and config hold for all.
    device = dist.setup(select_device(cfg.device), cfg.dist_timeout)
    with contextlib.ExitStack() as stack:
        refused = ""
        if dist.is_main():
            try:
                claim(run_dir, bool(resume), stack)
            except SelfsupError as e:
                refused = str(e)
        cfg, run_dir, changes, refused = dist.broadcast_object((cfg, run_dir, changes, refused))
        if refused:
            raise SelfsupError(refused)
        return _train(bool(resume), everything, start, cfg, run_dir, changes, device)


def _train(resume: bool, everything: bool, start: float, cfg: Config, run_dir: Path,
           changes: dict[str, list[Any]], device: Any) -> int:
    """``run`` once the run folder is claimed."""
    main, world = dist.is_main(), dist.world_size()
    if main:
        command = "run" if everything else "pretrain"
        print(f"selfsup {command}: run folder {run_dir}\nconfig:\n{cfg.to_json()}", flush=True)

        own = PLUGINS["dataset"][cfg.dataset].defaults
        if own and not resume:
            print(f"the {cfg.dataset} data set's own defaults, under --preset and your options: "
                  + ", ".join(f"{k}={v}" for k, v in own.items()), flush=True)
    if cfg.log == "tensorboard":

        check_tensorboard()  # a clear error now, not after loading the data
    check_model_size(cfg, device)  # before the data are loaded
    if cfg.view_size:
        check_model_input(cfg, cfg.view_size, device)
    t0 = time.perf_counter()
    cfg, data = _load_to_train(cfg, device)
    load_s = time.perf_counter() - t0
    if main:
        extra = data.pretrain_size - len(data.train_x)
        print(f"data: {data.name}, {len(data.train_x)} training images "
              f"{tuple(data.train_x.shape[1:])}"
              f"{f' (+{extra} unlabeled, for pretraining only)' if extra else ''}, "
              f"{0 if data.test_x is None else len(data.test_x)} test images "
              f"({load_s:.1f} s)", flush=True)
    check_model_input(cfg, int(data.train_x.shape[-1]), device)
    t0 = time.perf_counter()
    try:
        result = pretrain(cfg, data, run_dir, resume=resume)
    finally:
        dist.cleanup()  # evaluation runs in rank 0 alone
    pretrain_s = time.perf_counter() - t0
    cfg = result.config  # steps fixed when a budget chose them
    if not main:
        return 0
    metrics = read_metrics(run_dir)
    _record_pretraining(metrics, result, changes, resume)
    metrics.update(config=cfg.to_dict(), machine=dict(machine_info(device), world_size=world),
                   knn_history=result.knn_history, pretrain_size=data.pretrain_size,
                   quality_history=result.quality_history)
    _label_free_summary(metrics)
    times = metrics.get("time_s", {})
    metrics["time_s"] = dict(times, load_data=load_s, knn_monitor=result.knn_seconds,
                             pretrain=pretrain_s + (float(times.get("pretrain", 0.0))
                                                    if resume else 0.0))
    update_metrics(run_dir, **metrics)
    print(f"pretraining: {result.steps} steps ({result.epochs:.2f} epochs) in "
          f"{pretrain_s / 60:.1f} min, {result.images_per_s:.0f} images/s", flush=True)
    if everything:
        with _say_what_is_saved_on_interrupt(run_dir):
            _evaluate_and_plot(run_dir, cfg, data, result.encoder)
        total = time.perf_counter() - start
        update_metrics(run_dir, time_s=dict(total=total))
        report = selfsup.report.write_report(run_dir)
        print(f"done in {total / 60:.1f} min; outputs in {run_dir}; open {report}", flush=True)
    return 0


@contextlib.contextmanager
def _say_what_is_saved_on_interrupt(run_dir: Path) -> Iterator[None]:
    """Ctrl-C (or SIGTERM) during evaluation or plotting: say what is kept and what to run."""
    try:
        yield
    except KeyboardInterrupt:
        print(f"\ninterrupted during evaluation: the pretrained encoder is saved "
              f"({run_dir / 'encoder.pt'}); measure and draw it with `selfsup evaluate "
              f"{run_dir}`", file=sys.stderr, flush=True)
        raise


def _evaluate_and_plot(run_dir: Path, cfg: Config, data: Any, encoder: Any = None) -> None:
    from selfsup.plots import plot_run

    metrics = selfsup.evaluate.evaluate_run(run_dir, data, encoder)
    if data.labeled:
        print(_summary(metrics), flush=True)
    else:
        print("unlabeled data: embeddings written, no probe or kNN", flush=True)
    for caveat in metrics.get("caveats", []):
        print(f"note: {caveat}", flush=True)
    t = metrics["time_s"]
    print("evaluation: " + ", ".join(f"{k} {t[k]:.1f} s" for k in ("embed", "linear_probe", "knn")
                                     if k in t), flush=True)
    t0 = time.perf_counter()
    plot_run(run_dir, cfg, data)
    seconds = time.perf_counter() - t0
    update_metrics(run_dir, time_s=dict(plots=seconds))
    print(f"plots: {seconds:.1f} s", flush=True)


def evaluate(run: str, data_dir: str | None = None) -> int:

    cfg = finished_config(run, data_dir)
    read_metrics(run)  # damaged: an error before the work, not after
    with _say_what_is_saved_on_interrupt(Path(run)):
        _evaluate_and_plot(Path(run), cfg, _load_data(cfg))
    # the page follows what was measured and drawn
    print(f"report {selfsup.report.write_report(run)}")
    return 0


def plot(run: str, data_dir: str | None = None) -> int:
    from selfsup.plots import plot_run

    cfg = finished_config(run, data_dir)
    read_metrics(run)
    try:
        data = _load_data(cfg)
    except SelfsupError as e:
        print(f"note: no augmentation grid ({e})", file=sys.stderr)
        data = None

    made = plot_run(Path(run), cfg, data)
    print("wrote " + ", ".join(str(Path(run) / f) for f in made.values())
          + f"; report {selfsup.report.write_report(run)}")
    return 0


def _settings(given: dict[str, Any], cfg: Config) -> FinetuneSettings:

    return settings_from(cfg, **{k: given.get(k) for k in FINETUNE_OPTIONS})


def finetune(run: str, data_dir: str | None, label_fraction: float, mode: str,
             settings: dict[str, Any], progress: bool | None) -> int:
    """A classifier on ``label_fraction`` of the labels: ``mode`` finetune, linear (frozen
    encoder) or scratch; ``settings``: the training's options given (``FINETUNE_OPTIONS``)."""

    fraction = check_number("label_fraction", label_fraction, float, LABEL_FRACTION_RANGE)
    cfg = finished_config(run, data_dir)
    chosen = _settings(settings, cfg)
    read_metrics(run)
    r = finetune_run(run, _load_data(cfg), mode, fraction, chosen,
                     cfg.progress if progress is None else progress)
    page = selfsup.report.write_report(run)
    print(f"{mode}, {fraction:g} of the labels ({r.labels} images), {r.steps} steps: "
          f"test accuracy {r.accuracy:.1%} ({r.seconds:.0f} s); report {page}")
    return 0


def label_efficiency(run: str, data_dir: str | None, fractions: str, settings: dict[str, Any],
                     progress: bool | None) -> int:

    chosen = parse_fractions(fractions)
    cfg = finished_config(run, data_dir)
    read_metrics(run)
    measure_label_efficiency(run, _load_data(cfg), chosen, _settings(settings, cfg),
                             cfg.progress if progress is None else progress)
    print(f"wrote {Path(run) / 'label_efficiency.png'}, {selfsup.report.write_report(run)}")
    return 0


def report(run: str) -> int:

    run_dir = run_folder(run)
    if not (run_dir / "metrics.json").is_file():
        raise SelfsupError(f"{run} has no metrics.json: run `selfsup evaluate {run}` "
                           f"first")
    read_metrics(run_dir)
    print(f"wrote {selfsup.report.write_report(run_dir)}")
    return 0


def _folder_name(images: str) -> str:
    """The name an output file takes from a folder of images (``.`` is the folder's own)."""
    return Path(images).resolve().name or "root"


def _embed_outputs(run: str, images: str, given: str | None) -> tuple[Path, Path]:
    """Where ``embed`` writes: the features (.npy) and, beside them, the file list (.json).

    Raises:
        SelfsupError: an --out that does not end in .npy, or whose folder does not exist.
    """

    if given is None:
        out = Path(run) / f"embeddings_{_folder_name(images)}.npy"
    else:
        out = Path(given)
        if out.suffix != ".npy" or not out.stem:
            raise SelfsupError(f"--out must name a .npy file (the file list goes beside it as "
                               f".files.json), got {given!r}")
    listing = out.with_name(out.stem + ".files.json")

    def fits(name: str) -> bool:
        return name.startswith("embeddings_")

    check_output(listing, "--out", _is_file_list, "embeddings_*", fits)
    check_output(out, "--out", lambda p: _is_file_list(listing), "embeddings_*.npy", fits)
    return out, listing


def _is_file_list(path: Path) -> bool:
    """Whether ``path`` is a file list that ``embed`` wrote (so its .npy is embed's too)."""
    try:
        return {"images", "rows", "files"} <= set(read_json(path, "", ""))
    except SelfsupError:
        return False


def embed(run: str, images: str, out: str | None) -> int:
    """Embed a folder of images with a run's encoder: a .npy and its file list."""


    cfg = finished_config(run, None)
    target, listing = _embed_outputs(run, images, out)
    fx = load_encoder(run, select_device(cfg.device))
    feats, paths = fx.embed_folder(images, cfg.eval_batch_size, cfg.bad_images)
    save_npy(feats, target)
    # JSON keeps every path intact (newlines, any character; undecodable bytes as \udcXX
    # escapes, which os.fsencode turns back into the same bytes). Row i of the .npy is file i.
    save_json(dict(images=os.path.abspath(images), rows=len(paths),
                   files=[os.path.abspath(p) for p in paths]), listing)  # they resolve anywhere
    print(f"embedded {len(paths)} images -> {out} {feats.shape}; file list {listing}")
    return 0


def _compare_methods(given: str, overrides: dict[str, Any]) -> list[str]:

    if "method" in overrides:
        raise ConfigError("--method: compare takes --methods (comma-separated)")
    methods = [m.strip() for m in str(given).split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if not methods or unknown or len(set(methods)) != len(methods):
        raise ConfigError(f"--methods must name distinct methods among {', '.join(METHODS)}, "
                          f"got {given!r}")
    return methods


def compare(overrides: dict[str, Any], preset: str | None, methods: str, fraction: float,
            subsets: int) -> int:
    """Each of ``methods`` (comma-separated) run with the same options, one after the other
    (a finished run kept, a stopped one resumed), and one page: which to pick."""

    if dist.launched():
        raise SelfsupError("compare runs the methods one after the other in one process; under "
                           "torchrun, run each with `selfsup run --method M --out-dir DIR/NAME "
                           "--name M`, then `selfsup compare --out-dir DIR --name NAME` with the "
                           "same options collects them")
    names = _compare_methods(methods, overrides)
    fraction = check_number("fraction", fraction, float, LABEL_FRACTION_RANGE)
    subsets = check_number("subsets", subsets, int, Range(1, 100))
    base = make_config(preset, overrides)
    name = base.name or f"compare-{base.dataset}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    folder = Path(base.out_dir) / name
    if folder.exists() and not folder.is_dir():
        raise SelfsupError(f"{folder} exists and is not a folder; choose another --name")
    for m in names:  # every method's config is valid before the first one trains
        make_config(preset, {**overrides, "method": m, "out_dir": str(folder), "name": m})

    with folder_lock(folder):  # one compare of this name at a time
        return _compare(names, fraction, subsets, overrides, preset, base, folder)


def _compare(methods: list[str], fraction: float, subsets: int, overrides: dict[str, Any],
             preset: str | None, base: Config, folder: Path) -> int:
    """``compare`` once its folder is locked."""
    for m in methods:
        run_dir = folder / m
        state = run_state(run_dir)
        print(f"compare: {m} ({run_dir}): {state}", flush=True)
        if state == "new":
            code = run({**overrides, "method": m, "out_dir": str(folder), "name": m}, preset)
        elif state == "resume":
            keep = {k: v for k, v in overrides.items() if k in ("progress", "threads")}
            code = run(keep, resume=str(run_dir))
        elif state == "evaluate":
            with folder_lock(run_dir):
                code = evaluate(str(run_dir))
        else:
            code = 0
        if code:
            return code
        side = int(finished_config(str(run_dir), None).image_size)
        if side and not overrides.get("image_size"):  # photos: every method at the first's side
            overrides = {**overrides, "image_size": side}
    rows = [method_row(folder / m, fraction, subsets) for m in methods]
    first = read_metrics(folder / methods[0])
    shown = ([f"--preset {preset}"] if preset else []) + [
        f"--{k.replace('_', '-')} {v}" for k, v in overrides.items()
        if k not in ("out_dir", "name", "progress", "data_dir")]
    mach = first.get("machine", {})
    facts = dict(
        data=f"{first.get('dataset', base.dataset)}: {first.get('train_size', '?')} training, "
             f"{first.get('test_size', '?')} test images",
        options=" ".join(shown) or "defaults", fraction=fraction, subsets=subsets,
        machine=f"{mach.get('cpu', '?')} ({mach.get('cpu_capability', '?')}), "
                f"{mach.get('threads', '?')} threads, device {mach.get('device', '?')}")
    page = write_page(folder, rows, facts)
    for r in rows:
        if r["linear"] is not None:
            print(f"{r['method']:>8}: linear probe {r['linear']:.1%}, kNN {r['knn']:.1%}, "
                  f"{r['steps']} steps")
    print(recommend(rows))
    print(f"wrote {page}")
    return 0


def predict(classifier: str, images: str, out: str | None) -> int:
    """Classify a folder of images with a classifier ``finetune`` wrote: one CSV row each."""


    path = Path(classifier)
    if path.is_dir():
        found = sorted(p.name for p in path.glob("classifier_*.pt"))
        raise SelfsupError(f"{path} is a folder, not a classifier: give one of its "
                           f"classifier_*.pt files ({', '.join(found[:6]) or 'it has none; '}"
                           f"{'' if found else f'selfsup finetune {path} writes one'})")
    if not path.is_file():
        raise SelfsupError(f"{path} does not exist; selfsup finetune writes "
                           f"RUN/classifier_<mode>_<fraction>.pt")
    target = predict_output(classifier, images, out)
    if target.suffix != ".csv" or not target.stem:
        raise SelfsupError(f"--out must name a .csv file, got {out!r}")
    check_output(target, "--out", _is_predictions, "predictions_*.csv",
                 lambda name: name.startswith("predictions_"))
    clf = load_classifier(path)
    paths, labels, probs = clf.predict_folder(images)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["file", "class", "probability", *clf.classes])
    for p, k, row in zip(paths, labels, probs, strict=True):
        w.writerow([os.path.abspath(p), clf.classes[int(k)], f"{row[k]:.6f}",
                    *(f"{v:.6f}" for v in row)])
    atomic_write_text(buf.getvalue(), target)
    print(f"classified {len(paths)} images -> {target}")
    return 0


@contextlib.contextmanager
def writer_of(command: str, run: str | None, out: str | None, classifier: str | None,
              images: str | None) -> Iterator[None]:
    """A command that writes into a run folder holds its lock while it runs (one writer at a
    time); ``embed`` and ``export`` with ``--out`` elsewhere only read the run; ``predict``
    locks the run folder it writes its CSV into, if it writes into one."""
    if command == "predict":  # writes beside its classifier, in a run folder or elsewhere
        folder = predict_output(str(classifier), str(images), out).parent
        run = str(folder) if (folder / "config.json").is_file() else None
    if run is None or (command in ("embed", "export") and out is not None
                       and Path(out).resolve().parent != Path(run).resolve()):
        yield
        return
    with folder_lock(run_folder(run)):
        yield


def predict_output(classifier: str, images: str, out: str | None) -> Path:
    """Where ``predict`` writes its CSV: ``out``, or beside the classifier."""
    if out:
        return Path(out)
    return Path(classifier).parent / f"predictions_{_folder_name(images)}.csv"


def _is_predictions(path: Path) -> bool:
    """Whether ``path`` is a CSV that ``predict`` wrote."""
    try:
        with open(path, "rb") as f:
            return f.read(32).startswith(b"file,class,probability")
    except OSError:
        return False


def export(run: str, form: str, out: str | None, input_type: str) -> int:
    """A run's encoder as ONNX, TorchScript or safetensors."""
    finished_config(run, None)  # a finished run (says so when it is not)
    path = export_encoder(run, form, out, input_type)
    meta = read_metadata(path)
    print(f"wrote {path} ({form}; {meta['model']} width {meta['width']}, "
          f"{meta['feature_dim']} features per image of {meta['image_size']}x"
          f"{meta['image_size']} px, input {meta['input']})")
    return 0
