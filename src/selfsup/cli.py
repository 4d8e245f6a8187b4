"""The ``selfsup`` command: run (everything), pretrain, evaluate, plot, finetune,
label-efficiency, report, embed, compare."""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from selfsup.config import (
    CHOICES,
    FIELD_NAMES,
    PRESETS,
    Config,
    config_from_dict,
    diff_keys,
    field_types,
    make_config,
    shown,
)
from selfsup.errors import CheckpointError, ConfigError, Interrupted, SelfsupError
from selfsup.finetune import LABEL_FRACTIONS, FinetuneSettings

SUMMARY_ROWS = (("linear_probe", "linear probe"), ("knn", "kNN"))


def _add_config_options(p: argparse.ArgumentParser) -> None:
    """One --option per config field; only options given on the command line are set."""
    defaults = Config()
    g = p.add_argument_group("configuration (defaults, then --preset, then these)")
    g.add_argument("--preset", choices=list(PRESETS), default=argparse.SUPPRESS,
                   help="named set of defaults: " + "; ".join(
                       f"{k}: {', '.join(f'{a}={b}' for a, b in v.items())}"
                       for k, v in PRESETS.items()))
    for name, typ in field_types().items():
        if name == "preset":
            continue
        flag = "--" + name.replace("_", "-")
        default = getattr(defaults, name)
        if typ is bool:
            g.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                           help=f"(default {default})")
        else:
            g.add_argument(flag, type=str, choices=CHOICES.get(name), default=argparse.SUPPRESS,
                           metavar=None if name in CHOICES else typ.__name__.upper(),
                           help=f"(default {default!r})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="selfsup",
        description="Learn image representations without labels (SimCLR) and measure them "
                    "beside an untrained-encoder baseline.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in (("run", "pretrain, evaluate and plot: the whole job"),
                        ("pretrain", "pretrain only (writes encoder.pt, checkpoint.pt, loss.npy)")):
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--resume", metavar="RUN", default=None,
                       help="continue RUN from its checkpoint (epochs/steps may change)")
        _add_config_options(p)
    runs: dict[str, argparse.ArgumentParser] = {}
    for name, help_ in (("evaluate", "embed with the trained and the untrained encoder; "
                                     "linear probe and kNN for both"),
                        ("plot", "draw the figures of a run"),
                        ("finetune", "train a classifier on a fraction of the labels: fine-tune "
                                     "the encoder, or a linear head on it frozen (--freeze), or "
                                     "the same network from scratch (--from-scratch)"),
                        ("label-efficiency", "probe, fine-tune and train from scratch with 1%, "
                                             "10% and 100% of the labels; table and plot"),
                        ("report", "write RUN/report.html: config, timings, metrics, figures"),
                        ("embed", "embed a folder of images with a run's encoder (.npy)"),
                        ("export", "write a run's encoder, its input normalisation inside, as "
                                   "ONNX, TorchScript or safetensors (runs outside selfsup)")):
        # help is %-formatted by argparse, the description is printed as written
        p = runs[name] = sub.add_parser(name, help=help_.replace("%", "%%"), description=help_)
        p.add_argument("run", metavar="RUN", help="run folder (e.g. runs/NAME)")
        if name not in ("report", "embed", "export"):
            p.add_argument("--data-dir", default=None, help="where the data are now, if moved")
    p = runs["finetune"]
    p.add_argument("--label-fraction", type=float, default=1.0,
                   help="fraction of the training labels, stratified, fixed by the seed "
                        "(default 1.0)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--freeze", action="store_true",
                      help="frozen encoder, linear head trained by SGD with augmentation")
    mode.add_argument("--from-scratch", action="store_true",
                      help="the same network from random weights: the supervised baseline")
    runs["label-efficiency"].add_argument(
        "--fractions", default=",".join(f"{f:g}" for f in LABEL_FRACTIONS),
        help="comma-separated label fractions (default %(default)s)")
    for name in ("finetune", "label-efficiency"):
        g = runs[name].add_argument_group("training (same for every mode)")
        for field, typ, help_ in (("epochs", int, "passes over the labelled images"),
                                  ("min_steps", int, "at least this many steps"),
                                  ("batch_size", int, "images per step"),
                                  ("lr", float, "head learning rate per 128 images"),
                                  ("encoder_lr_mult", float, "fine-tuning: encoder lr / head lr"),
                                  ("seed", int, "label subset, initialisation, order")):
            default = "the run's" if field == "seed" else getattr(FinetuneSettings(), field)
            g.add_argument("--" + field.replace("_", "-"), type=typ, default=None,
                           help=f"{help_} (default {default})")
        g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                       help="a progress bar (default: the run's setting); --no-progress for logs")
    p = sub.add_parser("compare", help="run several methods with the same options, one after "
                                       "the other, and write one page: which to pick",
                       description="Run each method as RUN = OUT_DIR/NAME/METHOD (a finished "
                                   "run is kept, a stopped one resumed), then write "
                                   "OUT_DIR/NAME/compare.html.")
    p.add_argument("--methods", default="simclr,moco,byol",
                   help="comma-separated methods (default %(default)s)")
    p.add_argument("--fraction", type=float, default=0.01,
                   help="label fraction of the few-label probe (default %(default)s)")
    p.add_argument("--subsets", type=int, default=3,
                   help="label subsets the few-label probe averages (default %(default)s)")
    _add_config_options(p)
    p = runs["embed"]
    p.add_argument("--images", required=True, metavar="DIR", help="folder of images (any depth)")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="output .npy (default RUN/embeddings_<DIR name>.npy); the file list "
                        "goes beside it as <name>.files.json (row i is file i)")
    p = sub.add_parser("predict", help="classify a folder of images with a classifier that "
                                       "finetune wrote; a CSV of classes and probabilities",
                       description="Classify every image under --images with RUN/classifier_"
                                   "<mode>_<fraction>.pt (written by selfsup finetune) and "
                                   "write one CSV row per image: the file, the predicted class, "
                                   "its probability and every class's.")
    p.add_argument("classifier", metavar="CLASSIFIER", help="a classifier_*.pt file")
    p.add_argument("--images", required=True, metavar="DIR", help="folder of images (any depth)")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="output .csv (default predictions_<DIR name>.csv beside the classifier)")
    p = runs["export"]
    from selfsup.export import FORMATS, INPUTS

    p.add_argument("--format", required=True, choices=FORMATS,
                   help="onnx (onnxruntime; needs pip install 'selfsup[onnx]'), torchscript "
                        "(torch.jit.load) or safetensors (weights and normalisation)")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="the file to write (default RUN/encoder.onnx, .torchscript.pt or "
                        ".safetensors)")
    p.add_argument("--input", default="uint8", choices=INPUTS,
                   help="onnx: the input's dtype, uint8 in [0, 255] (default) or float32 in "
                        "[0, 1]; torchscript takes either")
    return parser


def _overrides(ns: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(ns).items() if k in FIELD_NAMES and k != "preset"}


def _check_threads(cfg: Config, overrides: dict[str, Any]) -> None:
    """--threads beyond this machine's CPUs oversubscribes them: refused before any work (a
    resumed run's own value from a larger machine is capped, with a note, when it starts)."""
    import os

    cpus = os.cpu_count() or 1
    if "threads" in overrides and cfg.threads > cpus:
        raise ConfigError(f"--threads must be in [0, {cpus}] on this machine ({cpus} CPUs; 0 = "
                          f"torch's default), got {cfg.threads}")


def _checkpoint_config(run_dir: Path) -> Config:
    """The config a run's checkpoint was written with (what a resume continues)."""
    from selfsup.checkpoint import CHECKPOINT, checkpoint_config, load_checkpoint

    if not (run_dir / CHECKPOINT).is_file():
        if not run_dir.is_dir():
            raise CheckpointError(f"cannot resume {run_dir}: no such folder")
        if _never_checkpointed(run_dir):
            raise CheckpointError(f"cannot resume {run_dir}: it stopped before its first "
                                  f"checkpoint, so there is nothing to continue. Start it again "
                                  f"with the same options and --name {run_dir.name}: its "
                                  f"leftovers are replaced")
        raise CheckpointError(f"cannot resume {run_dir}: no {CHECKPOINT} there (not a selfsup "
                              f"run)")
    path = run_dir / CHECKPOINT
    saved = load_checkpoint(path, mmap=True)
    cfg = checkpoint_config(saved, path)
    _check_same_run(run_dir, cfg, path)
    return cfg


# What a run writes before its first checkpoint: a folder holding only these (and no
# checkpoint or encoder) was stopped early, and a new run of the same name may replace them.
BEFORE_FIRST_CHECKPOINT = frozenset({"config.json", "metrics.jsonl", "tensorboard", ".timing.pt"})


def _never_checkpointed(run_dir: Path) -> bool:
    """A run folder left by a run killed before its first checkpoint: nothing in it but what a
    run writes first (a config.json, if any, is a selfsup config), and temporary files."""
    from selfsup.files import LOCK

    try:
        names = [p.name for p in run_dir.iterdir()]
    except OSError:
        return False
    if not names or not all(n in BEFORE_FIRST_CHECKPOINT or n == LOCK
                            or (n.startswith(".") and n.endswith(".tmp")) for n in names):
        return False
    # someone's own config.json: not a run's leftovers
    return "config.json" not in names or _saved_config(run_dir) is not None


def _saved_config(run_dir: Path) -> Config | None:
    """The run folder's ``config.json`` as a config; None when it is missing or not a selfsup
    config (the commands that need it name the problem themselves)."""
    from selfsup.files import read_json

    try:
        return config_from_dict(read_json(run_dir / "config.json", "a config object", ""))
    except SelfsupError:
        return None


def _clear_leftovers(run_dir: Path) -> None:
    """Remove what a run killed before its first checkpoint left (never through a link)."""
    import shutil

    from selfsup.files import LOCK

    for p in run_dir.iterdir():
        if p.name == LOCK:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def _check_same_run(run_dir: Path, cfg: Config, path: Path) -> None:
    """A file's config against the run folder's ``config.json``: a checkpoint or encoder
    copied in from another run (another model, width, data, method) is refused.

    Raises:
        CheckpointError: they differ in a setting that changes the network or the data.
    """
    own = _saved_config(run_dir)
    if own is None:  # none, or damaged: the folder check (_run_dir) names that
        return
    changed = diff_keys(own, cfg)
    if changed:
        raise CheckpointError(f"{path} does not belong to {run_dir}: its config differs from "
                              f"the run's config.json in {', '.join(changed)} (copied from "
                              f"another run?)")


def _resolve(ns: argparse.Namespace) -> tuple[Config, Path, dict[str, list[Any]]]:
    """The run's config and folder, and for a resumed run the settings it changes.

    A new run goes into a new or empty folder only: a folder that already holds files (a
    finished run, or anything else) is refused before anything is written.
    """
    overrides = _overrides(ns)
    if ns.resume:
        run_dir = Path(ns.resume)
        old = _checkpoint_config(run_dir)
        cfg = config_from_dict({**old.to_dict(), **overrides})
        changed = diff_keys(old, cfg)
        if changed:
            raise CheckpointError(f"cannot resume {run_dir} with changed {', '.join(changed)}; "
                                  f"only epochs/steps and run-time settings may change")
        _check_threads(cfg, overrides)
        a, b = old.to_dict(), cfg.to_dict()
        return cfg, run_dir, {k: [a[k], b[k]] for k in sorted(a) if a[k] != b[k]}
    cfg = make_config(getattr(ns, "preset", None), overrides)
    _check_threads(cfg, overrides)
    if not cfg.name:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        cfg = config_from_dict({**cfg.to_dict(), "name": f"{cfg.dataset}-{cfg.preset or 'custom'}"
                                                          f"-{stamp}"})
    run_dir = Path(cfg.out_dir) / cfg.name
    _check_new_run_dir(run_dir)  # before anything is created there
    return cfg, run_dir, {}


def _check_new_run_dir(run_dir: Path) -> bool:
    """Refuse a run folder that exists and is not empty (or is not a folder); returns whether
    it holds the leftovers of a run of this name killed before its first checkpoint (which the
    new run replaces)."""
    from selfsup.checkpoint import CHECKPOINT
    from selfsup.files import LOCK

    if (run_dir / CHECKPOINT).exists():
        raise SelfsupError(f"{run_dir} already holds a run; continue it with --resume {run_dir} "
                           f"or choose another --name")
    if not (run_dir.exists() or run_dir.is_symlink()):
        return False
    if not run_dir.is_dir():
        raise SelfsupError(f"{run_dir} exists and is not a folder; choose another --name")
    try:
        empty = all(p.name == LOCK for p in run_dir.iterdir())
    except OSError as e:
        raise SelfsupError(f"{run_dir} cannot be read ({e.strerror}); choose another --name"
                           ) from None
    if empty:
        return False
    if _never_checkpointed(run_dir):
        return True
    raise SelfsupError(f"{run_dir} exists and is not empty: a new run writes only into a new "
                       f"or empty folder, so nothing there is overwritten. Choose another "
                       f"--name (or --out-dir), or continue a run with --resume")


def _claim(run_dir: Path, resume: bool, stack: contextlib.ExitStack) -> None:
    """Take the run folder's lock for this process (the only writer until it exits); a new
    run's folder is checked again under the lock, since another process may have claimed it
    between the first check and now.

    Raises:
        SelfsupError: another process holds the folder, or it filled up meanwhile.
    """
    from selfsup.files import LOCK, folder_lock

    created = not run_dir.exists()
    stack.enter_context(folder_lock(run_dir))

    def undo_if_refused(exc_type: Any, *_: Any) -> None:
        """A run refused before writing anything leaves no folder behind."""
        if exc_type is not None and created and [p.name for p in run_dir.iterdir()] == [LOCK]:
            (run_dir / LOCK).unlink()
            run_dir.rmdir()

    stack.push(undo_if_refused)
    if not resume and _check_new_run_dir(run_dir):
        print(f"note: {run_dir} holds what a run of this name left when it stopped before its "
              f"first checkpoint; starting it again", flush=True)
        _clear_leftovers(run_dir)


def _load_data(cfg: Config, pretraining: bool = False) -> Any:
    """The run's data; STL-10's unlabeled images only where pretraining uses them."""
    from selfsup.datasets import load_dataset

    return load_dataset(cfg.dataset, cfg.data_dir, cfg.image_size, cfg.download, cfg.bad_images,
                        cifar100_labels=cfg.cifar100_labels,
                        stl10_unlabeled=cfg.stl10_unlabeled and pretraining,
                        stl10_fold=cfg.stl10_fold)


def _label_free_summary(metrics: dict[str, Any]) -> None:
    """Print the label-free signals, untrained (step 0) and now, and record and print a
    collapse warning when they show one."""
    from selfsup.quality import collapse_warning

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


def _run_dir(run: str) -> Path:
    """A run folder given to a command: it must exist and hold a selfsup run's config.json.

    Raises:
        SelfsupError: no such folder, or not a run (never write into someone else's folder).
    """
    from selfsup.files import read_json

    run_dir = Path(run)
    if not run_dir.is_dir():
        raise SelfsupError(f"{run} is not a run folder (no such folder, nor "
                           f"{Path(Config().out_dir) / run}); runs are written to "
                           f"{Config().out_dir}/<name> by default: give that path or the name")
    path = run_dir / "config.json"
    if not path.is_file():
        raise SelfsupError(f"{run} is not a selfsup run folder (no config.json)")
    try:
        config_from_dict(read_json(path, "a config object", "it is not a selfsup run's"))
    except SelfsupError as e:
        raise SelfsupError(f"{run} is not a usable selfsup run folder: {e}") from None
    return run_dir


def _run_config(run: str, data_dir: str | None) -> Config:
    """The config of a run that finished pretraining (from its checked ``encoder.pt``)."""
    from selfsup.checkpoint import CHECKPOINT, ENCODER, load_encoder_file

    run_dir = _run_dir(run)
    if not (run_dir / ENCODER).is_file() and (run_dir / CHECKPOINT).is_file():
        raise SelfsupError(f"{run} has not finished pretraining (it has a checkpoint but no "
                           f"{ENCODER} yet); finish it with `selfsup run --resume {run}`")
    cfg = config_from_dict(load_encoder_file(run_dir / ENCODER)["config"])
    _check_same_run(run_dir, cfg, run_dir / ENCODER)
    if data_dir is not None:
        cfg = config_from_dict({**cfg.to_dict(), "data_dir": data_dir})
    return cfg


def _record_pretraining(metrics: dict[str, Any], result: Any, changes: dict[str, list[Any]],
                        resume: bool) -> None:
    """Put this invocation's pretraining into ``metrics``: a new run's figures, or a resume
    added to the record (the first invocation's config and figures are kept)."""
    from selfsup.methods import METHODS

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


def cmd_train(ns: argparse.Namespace, everything: bool) -> int:
    from selfsup import dist
    from selfsup.evaluate import read_metrics
    from selfsup.hardware import select_device

    start = time.perf_counter()
    cfg, run_dir, changes = _resolve(ns)
    resume = bool(ns.resume)
    if resume:
        read_metrics(run_dir)  # a damaged metrics.json is an error now, not after training
    # Under torchrun: join the process group; rank 0's run folder and config hold for all.
    device = dist.setup(select_device(cfg.device), cfg.dist_timeout)
    with contextlib.ExitStack() as stack:
        refused = ""
        if dist.is_main():
            try:
                _claim(run_dir, resume, stack)
            except SelfsupError as e:
                refused = str(e)
        cfg, run_dir, changes, refused = dist.broadcast_object((cfg, run_dir, changes, refused))
        if refused:
            raise SelfsupError(refused)
        return _train(ns, everything, start, cfg, run_dir, changes, device)


def _train(ns: argparse.Namespace, everything: bool, start: float, cfg: Config, run_dir: Path,
           changes: dict[str, list[Any]], device: Any) -> int:
    """``cmd_train`` once the run folder is claimed."""
    from selfsup import dist
    from selfsup.evaluate import read_metrics
    from selfsup.files import save_json
    from selfsup.hardware import machine_info
    from selfsup.report import write_report
    from selfsup.sizing import check_model_input, check_model_size
    from selfsup.train import pretrain

    resume = bool(ns.resume)
    main, world = dist.is_main(), dist.world_size()
    if main:
        print(f"selfsup {ns.command}: run folder {run_dir}\nconfig:\n{cfg.to_json()}", flush=True)
        from selfsup.config import DATASET_DEFAULTS

        own = DATASET_DEFAULTS.get(cfg.dataset, {})
        if own and not resume:
            print(f"the {cfg.dataset} data set's own defaults, under --preset and your options: "
                  + ", ".join(f"{k}={v}" for k, v in own.items()), flush=True)
    if cfg.log == "tensorboard":
        from selfsup.logs import check_tensorboard

        check_tensorboard()  # a clear error now, not after loading the data
    check_model_size(cfg, device)  # before the data are loaded
    if cfg.view_size:
        check_model_input(cfg, cfg.view_size, device)
    t0 = time.perf_counter()
    data = _load_data(cfg, pretraining=True)
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
    times = metrics.setdefault("time_s", {})
    times.update(load_data=load_s, knn_monitor=result.knn_seconds,
                 pretrain=pretrain_s + (float(times.get("pretrain", 0.0)) if resume else 0.0))
    save_json(metrics, run_dir / "metrics.json")
    print(f"pretraining: {result.steps} steps ({result.epochs:.2f} epochs) in "
          f"{pretrain_s / 60:.1f} min, {result.images_per_s:.0f} images/s", flush=True)
    if everything:
        with _say_what_is_saved_on_interrupt(run_dir):
            _evaluate_and_plot(run_dir, cfg, data, result.encoder)
        metrics = read_metrics(run_dir)
        metrics["time_s"]["total"] = time.perf_counter() - start
        save_json(metrics, run_dir / "metrics.json")
        report = write_report(run_dir)
        print(f"done in {metrics['time_s']['total'] / 60:.1f} min; outputs in {run_dir}; "
              f"open {report}", flush=True)
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
    from selfsup.evaluate import evaluate_run, read_metrics
    from selfsup.files import save_json
    from selfsup.plots import plot_run

    metrics = evaluate_run(run_dir, data, encoder)
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
    metrics = read_metrics(run_dir)
    metrics["time_s"]["plots"] = time.perf_counter() - t0
    save_json(metrics, run_dir / "metrics.json")
    print(f"plots: {metrics['time_s']['plots']:.1f} s", flush=True)


def cmd_evaluate(ns: argparse.Namespace) -> int:
    from selfsup.evaluate import read_metrics
    from selfsup.report import write_report

    cfg = _run_config(ns.run, ns.data_dir)
    read_metrics(ns.run)  # damaged: an error before the work, not after
    with _say_what_is_saved_on_interrupt(Path(ns.run)):
        _evaluate_and_plot(Path(ns.run), cfg, _load_data(cfg))
    print(f"report {write_report(ns.run)}")  # the page follows what was measured and drawn
    return 0


def cmd_plot(ns: argparse.Namespace) -> int:
    from selfsup.evaluate import read_metrics
    from selfsup.plots import plot_run

    cfg = _run_config(ns.run, ns.data_dir)
    read_metrics(ns.run)
    try:
        data = _load_data(cfg)
    except SelfsupError as e:
        print(f"note: no augmentation grid ({e})", file=sys.stderr)
        data = None
    from selfsup.report import write_report

    made = plot_run(Path(ns.run), cfg, data)
    print("wrote " + ", ".join(str(Path(ns.run) / f) for f in made.values())
          + f"; report {write_report(ns.run)}")
    return 0


def _settings(ns: argparse.Namespace, cfg: Config) -> FinetuneSettings:
    from selfsup.finetune import settings_from

    return settings_from(cfg, **{k: getattr(ns, k) for k in (
        "epochs", "min_steps", "batch_size", "lr", "encoder_lr_mult", "seed")})


def cmd_finetune(ns: argparse.Namespace) -> int:
    from selfsup.config import check_number
    from selfsup.evaluate import read_metrics
    from selfsup.finetune import LABEL_FRACTION_RANGE, finetune_run
    from selfsup.report import write_report

    fraction = check_number("label_fraction", ns.label_fraction, float, LABEL_FRACTION_RANGE)
    cfg = _run_config(ns.run, ns.data_dir)
    settings = _settings(ns, cfg)
    read_metrics(ns.run)
    mode = "linear" if ns.freeze else "scratch" if ns.from_scratch else "finetune"
    progress = cfg.progress if ns.progress is None else ns.progress
    r = finetune_run(ns.run, _load_data(cfg), mode, fraction, settings, progress)
    print(f"{mode}, {fraction:g} of the labels ({r.labels} images), {r.steps} steps: "
          f"test accuracy {r.accuracy:.1%} ({r.seconds:.0f} s); report {write_report(ns.run)}")
    return 0


def cmd_label_efficiency(ns: argparse.Namespace) -> int:
    from selfsup.evaluate import read_metrics
    from selfsup.finetune import label_efficiency, parse_fractions
    from selfsup.report import write_report

    fractions = parse_fractions(ns.fractions)
    cfg = _run_config(ns.run, ns.data_dir)
    settings = _settings(ns, cfg)
    read_metrics(ns.run)
    label_efficiency(ns.run, _load_data(cfg), fractions, settings,
                     cfg.progress if ns.progress is None else ns.progress)
    print(f"wrote {Path(ns.run) / 'label_efficiency.png'}, {write_report(ns.run)}")
    return 0


def cmd_report(ns: argparse.Namespace) -> int:
    from selfsup.evaluate import read_metrics
    from selfsup.report import write_report

    run_dir = _run_dir(ns.run)
    if not (run_dir / "metrics.json").is_file():
        raise SelfsupError(f"{ns.run} has no metrics.json: run `selfsup evaluate {ns.run}` "
                           f"first")
    read_metrics(run_dir)
    print(f"wrote {write_report(run_dir)}")
    return 0


def _folder_name(images: str) -> str:
    """The name an output file takes from a folder of images (``.`` is the folder's own)."""
    return Path(images).resolve().name or "root"


def _embed_outputs(ns: argparse.Namespace) -> tuple[Path, Path]:
    """Where ``embed`` writes: the features (.npy) and, beside them, the file list (.json).

    Raises:
        SelfsupError: an --out that does not end in .npy, or whose folder does not exist.
    """
    from selfsup.files import check_output

    if ns.out is None:
        out = Path(ns.run) / f"embeddings_{_folder_name(ns.images)}.npy"
    else:
        out = Path(ns.out)
        if out.suffix != ".npy" or not out.stem:
            raise SelfsupError(f"--out must name a .npy file (the file list goes beside it as "
                               f".files.json), got {ns.out!r}")
    listing = out.with_name(out.stem + ".files.json")

    def fits(name: str) -> bool:
        return name.startswith("embeddings_")

    check_output(listing, "--out", _is_file_list, "embeddings_*", fits)
    check_output(out, "--out", lambda p: _is_file_list(listing), "embeddings_*.npy", fits)
    return out, listing


def _is_file_list(path: Path) -> bool:
    """Whether ``path`` is a file list that ``embed`` wrote (so its .npy is embed's too)."""
    from selfsup.files import read_json

    try:
        return {"images", "rows", "files"} <= set(read_json(path, "", ""))
    except SelfsupError:
        return False


def cmd_embed(ns: argparse.Namespace) -> int:
    import os

    from selfsup.files import save_json, save_npy
    from selfsup.hardware import select_device
    from selfsup.inference import load_encoder

    cfg = _run_config(ns.run, None)
    out, listing = _embed_outputs(ns)
    fx = load_encoder(ns.run, select_device(cfg.device))
    feats, paths = fx.embed_folder(ns.images, cfg.eval_batch_size, cfg.bad_images)
    save_npy(feats, out)
    # JSON keeps every path intact (newlines, any character; undecodable bytes as \udcXX
    # escapes, which os.fsencode turns back into the same bytes). Row i of the .npy is file i.
    save_json(dict(images=os.path.abspath(ns.images), rows=len(paths),
                   files=[os.path.abspath(p) for p in paths]), listing)  # they resolve anywhere
    print(f"embedded {len(paths)} images -> {out} {feats.shape}; file list {listing}")
    return 0


def _compare_methods(ns: argparse.Namespace) -> list[str]:
    from selfsup.methods import METHODS

    if "method" in vars(ns):
        raise ConfigError("--method: compare takes --methods (comma-separated)")
    methods = [m.strip() for m in str(ns.methods).split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if not methods or unknown or len(set(methods)) != len(methods):
        raise ConfigError(f"--methods must name distinct methods among {', '.join(METHODS)}, "
                          f"got {ns.methods!r}")
    return methods


def cmd_compare(ns: argparse.Namespace) -> int:
    from selfsup import dist
    from selfsup.config import Range, check_number
    from selfsup.finetune import LABEL_FRACTION_RANGE

    if dist.launched():
        raise SelfsupError("compare runs the methods one after the other in one process; under "
                           "torchrun, run each with `selfsup run --method M --out-dir DIR/NAME "
                           "--name M`, then `selfsup compare --out-dir DIR --name NAME` with the "
                           "same options collects them")
    methods = _compare_methods(ns)
    fraction = check_number("fraction", ns.fraction, float, LABEL_FRACTION_RANGE)
    subsets = check_number("subsets", ns.subsets, int, Range(1, 100))
    overrides = _overrides(ns)
    preset = getattr(ns, "preset", None)
    base = make_config(preset, overrides)
    name = base.name or f"compare-{base.dataset}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    folder = Path(base.out_dir) / name
    if folder.exists() and not folder.is_dir():
        raise SelfsupError(f"{folder} exists and is not a folder; choose another --name")
    for m in methods:  # every method's config is valid before the first one trains
        make_config(preset, {**overrides, "method": m, "out_dir": str(folder), "name": m})
    from selfsup.files import folder_lock

    with folder_lock(folder):  # one compare of this name at a time
        return _compare(ns, methods, fraction, subsets, overrides, preset, base, folder)


def _compare(ns: argparse.Namespace, methods: list[str], fraction: float, subsets: int,
             overrides: dict[str, Any], preset: str | None, base: Config, folder: Path) -> int:
    """``cmd_compare`` once its folder is locked."""
    from selfsup.compare import method_row, recommend, run_state, write_page
    from selfsup.evaluate import read_metrics
    from selfsup.files import folder_lock

    for m in methods:
        run_dir = folder / m
        state = run_state(run_dir)
        print(f"compare: {m} ({run_dir}): {state}", flush=True)
        if state == "new":
            code = cmd_train(argparse.Namespace(**{**vars(ns), "method": m, "out_dir": str(folder),
                                                   "name": m, "resume": None, "command": "run"}),
                             everything=True)
        elif state == "resume":
            keep = {k: v for k, v in overrides.items() if k in ("progress", "threads")}
            code = cmd_train(argparse.Namespace(command="run", resume=str(run_dir), **keep),
                             everything=True)
        elif state == "evaluate":
            with folder_lock(run_dir):
                code = cmd_evaluate(argparse.Namespace(run=str(run_dir), data_dir=None))
        else:
            code = 0
        if code:
            return code
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


def cmd_predict(ns: argparse.Namespace) -> int:
    import csv
    import io
    import os

    from selfsup.files import atomic_write_text, check_output
    from selfsup.inference import load_classifier

    path = Path(ns.classifier)
    if path.is_dir():
        found = sorted(p.name for p in path.glob("classifier_*.pt"))
        raise SelfsupError(f"{path} is a folder, not a classifier: give one of its "
                           f"classifier_*.pt files ({', '.join(found[:6]) or 'it has none; '}"
                           f"{'' if found else f'selfsup finetune {path} writes one'})")
    if not path.is_file():
        raise SelfsupError(f"{path} does not exist; selfsup finetune writes "
                           f"RUN/classifier_<mode>_<fraction>.pt")
    out = _predict_output(ns)
    if out.suffix != ".csv" or not out.stem:
        raise SelfsupError(f"--out must name a .csv file, got {ns.out!r}")
    check_output(out, "--out", _is_predictions, "predictions_*.csv",
                 lambda name: name.startswith("predictions_"))
    clf = load_classifier(path)
    paths, labels, probs = clf.predict_folder(ns.images)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["file", "class", "probability", *clf.classes])
    for p, k, row in zip(paths, labels, probs, strict=True):
        w.writerow([os.path.abspath(p), clf.classes[int(k)], f"{row[k]:.6f}",
                    *(f"{v:.6f}" for v in row)])
    atomic_write_text(buf.getvalue(), out)
    print(f"classified {len(paths)} images -> {out}")
    return 0


def _predict_output(ns: argparse.Namespace) -> Path:
    """Where ``predict`` writes its CSV: ``--out``, or beside the classifier."""
    if ns.out:
        return Path(ns.out)
    return Path(ns.classifier).parent / f"predictions_{_folder_name(ns.images)}.csv"


def _is_predictions(path: Path) -> bool:
    """Whether ``path`` is a CSV that ``predict`` wrote."""
    try:
        with open(path, "rb") as f:
            return f.read(32).startswith(b"file,class,probability")
    except OSError:
        return False


def cmd_export(ns: argparse.Namespace) -> int:
    from selfsup.export import export_encoder, read_metadata

    _run_config(ns.run, None)  # a finished run (says so when it is not)
    path = export_encoder(ns.run, ns.format, ns.out, ns.input)
    meta = read_metadata(path)
    print(f"wrote {path} ({ns.format}; {meta['model']} width {meta['width']}, "
          f"{meta['feature_dim']} features per image of {meta['image_size']}x"
          f"{meta['image_size']} px, input {meta['input']})")
    return 0


COMMANDS = {"compare": cmd_compare, "evaluate": cmd_evaluate, "plot": cmd_plot,
            "finetune": cmd_finetune, "label-efficiency": cmd_label_efficiency,
            "report": cmd_report, "embed": cmd_embed, "export": cmd_export,
            "predict": cmd_predict}


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 user error, 130 Ctrl-C, 143 SIGTERM).

    Run as the command in a process of a torchrun group, it ends that process itself
    (``dist.exit_process``: the interpreter's teardown can abort after a finished run).
    """
    code = _main(argv)
    if argv is None:
        from selfsup import dist

        if dist.launched():
            dist.exit_process(code)
    return code


def _check_paths(ns: argparse.Namespace) -> None:
    """Paths given to a command: a NUL character cannot be in any file name, and no name in
    the path may be longer than the file system allows (checking such a path raises instead of
    answering "no such file")."""
    from selfsup.files import NAME_MAX

    for key in ("run", "resume", "images", "out", "data_dir", "out_dir", "classifier"):
        value = getattr(ns, key, None)
        if not isinstance(value, str):
            continue
        flag = key.upper() if key == "run" else "--" + key.replace("_", "-")
        if "\x00" in value:
            if key == "out_dir":  # a config field: its own check names it
                continue
            raise SelfsupError(f"{flag} must be a path without NUL characters, got {value!r}")
        longest = max(len(part.encode("utf-8", "surrogateescape")) for part in value.split("/"))
        if longest > NAME_MAX:
            raise SelfsupError(f"{flag} holds a name of {longest} bytes; file systems allow at "
                               f"most {NAME_MAX}, got {shown(value)}")


def _find_runs(ns: argparse.Namespace) -> None:
    """A run given by its name alone (``selfsup evaluate pt1``) is the run of that name in the
    runs folder (``runs/pt1``), when there is no such folder here."""
    for key in ("run", "resume"):
        value = getattr(ns, key, None)
        if not isinstance(value, str) or not value or Path(value).exists() \
                or "/" in value or "\\" in value:
            continue
        candidate = Path(Config().out_dir) / value
        if candidate.is_dir():
            setattr(ns, key, str(candidate))


def _warning_line(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  line: str | None = None) -> str:
    """A warning as the command prints it: what happened, not where in selfsup's source."""
    return f"warning: {message}\n"


def _main(argv: list[str] | None) -> int:
    import warnings

    warnings.formatwarning = _warning_line
    for stream in (sys.stdout, sys.stderr):  # a file name's undecodable bytes print escaped
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            with contextlib.suppress(ValueError, OSError, TypeError):
                reconfigure(errors="backslashreplace")
    ns = build_parser().parse_args(argv)
    from selfsup.hardware import keep_freed_memory

    keep_freed_memory()  # before the data and the networks are allocated
    with _sigterm_interrupts():
        try:
            _check_paths(ns)
            _find_runs(ns)
            if ns.command in ("run", "pretrain"):
                return cmd_train(ns, everything=ns.command == "run")
            with _writer_of(ns):
                return COMMANDS[ns.command](ns)
        except SelfsupError as e:
            print(f"selfsup: error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as e:
            return 128 + (e.signum if isinstance(e, Interrupted) else 2)


@contextlib.contextmanager
def _writer_of(ns: argparse.Namespace) -> Iterator[None]:
    """A command that writes into a run folder holds its lock while it runs (one writer at a
    time); ``embed`` and ``export`` with ``--out`` elsewhere only read the run; ``predict``
    locks the run folder it writes its CSV into, if it writes into one."""
    from selfsup.files import folder_lock

    run = getattr(ns, "run", None)
    if ns.command == "predict":  # writes beside its classifier, in a run folder or elsewhere
        folder = _predict_output(ns).parent
        run = str(folder) if (folder / "config.json").is_file() else None
    if run is None or (ns.command in ("embed", "export") and ns.out is not None
                       and Path(ns.out).resolve().parent != Path(run).resolve()):
        yield
        return
    with folder_lock(_run_dir(run)):
        yield


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """While a command runs, SIGTERM stops it as Ctrl-C does (``Interrupted``): pretraining
    finishes its step and saves a checkpoint; a file being written is left as it was."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Interrupted(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
