"""The ``selfsup`` command: run (everything), pretrain, evaluate, plot, finetune,
label-efficiency, report, embed, export, compare, predict. It parses the options and calls the
workflow (``selfsup.workflow``), which does the work."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from selfsup import workflow
from selfsup.config import (
    OPTIONS,
    PRESETS,
    Config,
    choices_of,
    config_from_dict,
    field_names,
    field_types,
    option_defaults,
    shown,
)
from selfsup.errors import Interrupted, SelfsupError
from selfsup.finetune import LABEL_FRACTIONS, FinetuneSettings


def _add_config_options(p: argparse.ArgumentParser) -> None:
    """One --option per config field and plugin setting; only options given on the command
    line are set."""
    defaults = config_from_dict({}).to_dict()
    g = p.add_argument_group("configuration (defaults, then --preset, then these)")
    g.add_argument("--preset", choices=list(PRESETS), default=argparse.SUPPRESS,
                   help="named set of defaults: " + "; ".join(
                       f"{k}: {', '.join(f'{a}={b}' for a, b in v.items())}"
                       for k, v in PRESETS.items()))
    for name, typ in field_types().items():
        if name == "preset":
            continue
        flag = "--" + name.replace("_", "-")
        default = defaults[name]
        about, shown_default = "", f"{default}" if typ is bool else f"{default!r}"
        if name in OPTIONS:  # a plugin's setting: whose, what it means, each one's default
            owners = [o.split(" ", 1) for o in OPTIONS[name].owners]
            about = f"{', '.join(p for _, p in owners)}: {OPTIONS[name].help} "
            own = [(p, option_defaults({kind: p})[name]) for kind, p in owners]
            shown_default += "".join(f"; {p}: {d!r}" for p, d in own if d != default)
        if typ is bool:
            g.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                           help=f"{about}(default {shown_default})")
        else:
            choices = choices_of(name) or None
            g.add_argument(flag, type=str, choices=choices, default=argparse.SUPPRESS,
                           metavar=None if choices else typ.__name__.upper(),
                           help=f"{about}(default {shown_default})".replace("%", "%%"))


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
    names = field_names()
    return {k: v for k, v in vars(ns).items() if k in names and k != "preset"}


def _finetune_options(ns: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(ns, k) for k in workflow.FINETUNE_OPTIONS}


def _mode(ns: argparse.Namespace) -> str:
    return "linear" if ns.freeze else "scratch" if ns.from_scratch else "finetune"


# Each command: its options, as the workflow's call takes them.
COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": lambda ns: workflow.run(_overrides(ns), getattr(ns, "preset", None), ns.resume),
    "pretrain": lambda ns: workflow.run(_overrides(ns), getattr(ns, "preset", None), ns.resume,
                                        everything=False),
    "evaluate": lambda ns: workflow.evaluate(ns.run, ns.data_dir),
    "plot": lambda ns: workflow.plot(ns.run, ns.data_dir),
    "finetune": lambda ns: workflow.finetune(ns.run, ns.data_dir, ns.label_fraction, _mode(ns),
                                             _finetune_options(ns), ns.progress),
    "label-efficiency": lambda ns: workflow.label_efficiency(
        ns.run, ns.data_dir, ns.fractions, _finetune_options(ns), ns.progress),
    "report": lambda ns: workflow.report(ns.run),
    "embed": lambda ns: workflow.embed(ns.run, ns.images, ns.out),
    "export": lambda ns: workflow.export(ns.run, ns.format, ns.out, ns.input),
    "compare": lambda ns: workflow.compare(_overrides(ns), getattr(ns, "preset", None),
                                           ns.methods, ns.fraction, ns.subsets),
    "predict": lambda ns: workflow.predict(ns.classifier, ns.images, ns.out),
}


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
            if ns.command in ("run", "pretrain", "compare"):  # they claim their own folders
                return COMMANDS[ns.command](ns)
            with workflow.writer_of(ns.command, getattr(ns, "run", None), getattr(ns, "out", None),
                                    getattr(ns, "classifier", None), getattr(ns, "images", None)):
                return COMMANDS[ns.command](ns)
        except SelfsupError as e:
            print(f"selfsup: error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as e:
            return 128 + (e.signum if isinstance(e, Interrupted) else 2)


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
