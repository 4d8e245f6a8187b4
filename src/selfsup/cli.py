"""The ``selfsup`` command: run (everything), pretrain, evaluate, plot, finetune,
label-efficiency, report, embed."""

from __future__ import annotations

import argparse
import sys
import time
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
)
from selfsup.errors import CheckpointError, SelfsupError
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
                        ("label-efficiency", "probe, fine-tune and train from scratch with 1%%, "
                                             "10%% and 100%% of the labels; table and plot"),
                        ("report", "write RUN/report.html: config, timings, metrics, figures"),
                        ("embed", "embed a folder of images with a run's encoder (.npy)")):
        p = runs[name] = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("run", metavar="RUN", help="run folder (e.g. runs/NAME)")
        if name not in ("report", "embed"):
            p.add_argument("--data-dir", default=None, help="where the data are now, if moved")
    p = runs["finetune"]
    p.add_argument("--label-fraction", type=float, default=1.0,
                   help="fraction of the training labels, class-balanced, fixed by the seed "
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
            default = getattr(FinetuneSettings(), field)
            g.add_argument("--" + field.replace("_", "-"), type=typ, default=None,
                           help=f"{help_} (default {default}; seed: the run's)")
    p = runs["embed"]
    p.add_argument("--images", required=True, metavar="DIR", help="folder of images (any depth)")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="output .npy (default RUN/embeddings_<DIR name>.npy); the file list "
                        "goes beside it as .txt, one path per row")
    return parser


def _overrides(ns: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(ns).items() if k in FIELD_NAMES and k != "preset"}


def _resolve(ns: argparse.Namespace) -> tuple[Config, Path, bool]:
    """The run's config and folder, for a new run or a resumed one."""
    overrides = _overrides(ns)
    if ns.resume:
        run_dir = Path(ns.resume)
        cfg_path = run_dir / "config.json"
        if not cfg_path.is_file():
            raise CheckpointError(f"cannot resume {run_dir}: no config.json there")
        import json

        old = config_from_dict(json.loads(cfg_path.read_text()))
        cfg = config_from_dict({**old.to_dict(), **overrides})
        changed = diff_keys(old, cfg)
        if changed:
            raise CheckpointError(f"cannot resume {run_dir} with changed {', '.join(changed)}; "
                                  f"only epochs/steps and run-time settings may change")
        return cfg, run_dir, True
    cfg = make_config(getattr(ns, "preset", None), overrides)
    if not cfg.name:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        cfg = config_from_dict({**cfg.to_dict(), "name": f"{cfg.dataset}-{cfg.preset or 'custom'}"
                                                          f"-{stamp}"})
    run_dir = Path(cfg.out_dir) / cfg.name
    if (run_dir / "checkpoint.pt").exists():
        raise SelfsupError(f"{run_dir} already holds a run; continue it with --resume {run_dir} "
                           f"or choose another --name")
    return cfg, run_dir, False


def _load_data(cfg: Config) -> Any:
    from selfsup.data import load_dataset

    return load_dataset(cfg.dataset, cfg.data_dir, cfg.image_size, cfg.download, cfg.bad_images)


def _summary(metrics: dict[str, Any]) -> str:
    lines = [f"{'':16}{'trained':>10}{'untrained':>11}{'gain':>9}"]
    for key, label in SUMMARY_ROWS:
        m = metrics.get(key)
        if m and "trained" in m:
            t, u = m["trained"], m["untrained"]
            lines.append(f"{label:16}{t:>9.1%}{u:>11.1%}{100 * (t - u):>+8.1f}")
    return "\n".join(lines)


def _run_config(run: str, data_dir: str | None) -> Config:
    from selfsup.train import ENCODER, load_checkpoint

    cfg = config_from_dict(load_checkpoint(Path(run) / ENCODER)["config"])
    if data_dir:
        cfg = config_from_dict({**cfg.to_dict(), "data_dir": data_dir})
    return cfg


def cmd_train(ns: argparse.Namespace, everything: bool) -> int:
    from selfsup import dist
    from selfsup.evaluate import read_metrics
    from selfsup.files import save_json
    from selfsup.report import write_report
    from selfsup.train import machine_info, pretrain, select_device

    start = time.perf_counter()
    cfg, run_dir, resume = _resolve(ns)
    # Under torchrun: join the process group; rank 0's run folder and config hold for all.
    device = dist.setup(select_device(cfg.device), cfg.dist_timeout)
    cfg, run_dir, resume = dist.broadcast_object((cfg, run_dir, resume))
    main, world = dist.is_main(), dist.world_size()
    if main:
        print(f"selfsup {ns.command}: run folder {run_dir}\nconfig:\n{cfg.to_json()}", flush=True)
    t0 = time.perf_counter()
    data = _load_data(cfg)
    load_s = time.perf_counter() - t0
    if main:
        print(f"data: {data.name}, {len(data.train_x)} training images "
              f"{tuple(data.train_x.shape[1:])}, "
              f"{0 if data.test_x is None else len(data.test_x)} test images "
              f"({load_s:.1f} s)", flush=True)
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
    metrics.update(
        config=cfg.to_dict(), machine=dict(machine_info(device), world_size=world),
        pretrain=dict(steps=result.steps, epochs=result.epochs, precision=result.precision,
                      images_per_s=result.images_per_s, train_seconds=result.seconds),
        knn_history=result.knn_history,
    )
    metrics.setdefault("time_s", {}).update(load_data=load_s, pretrain=pretrain_s,
                                            knn_monitor=result.knn_seconds)
    save_json(metrics, run_dir / "metrics.json")
    print(f"pretraining: {result.steps} steps ({result.epochs:.2f} epochs) in "
          f"{pretrain_s / 60:.1f} min, {result.images_per_s:.0f} images/s", flush=True)
    if everything:
        _evaluate_and_plot(run_dir, cfg, data, result.encoder)
        metrics = read_metrics(run_dir)
        metrics["time_s"]["total"] = time.perf_counter() - start
        save_json(metrics, run_dir / "metrics.json")
        report = write_report(run_dir)
        print(f"done in {metrics['time_s']['total'] / 60:.1f} min; outputs in {run_dir}; "
              f"open {report}", flush=True)
    return 0


def _evaluate_and_plot(run_dir: Path, cfg: Config, data: Any, encoder: Any = None) -> None:
    from selfsup.evaluate import evaluate_run, read_metrics
    from selfsup.files import save_json
    from selfsup.plots import plot_run

    metrics = evaluate_run(run_dir, data, encoder)
    if data.labeled:
        print(_summary(metrics), flush=True)
    else:
        print("unlabeled data: embeddings written, no probe or kNN", flush=True)
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
    cfg = _run_config(ns.run, ns.data_dir)
    _evaluate_and_plot(Path(ns.run), cfg, _load_data(cfg))
    return 0


def cmd_plot(ns: argparse.Namespace) -> int:
    from selfsup.plots import plot_run

    cfg = _run_config(ns.run, ns.data_dir)
    try:
        data = _load_data(cfg)
    except SelfsupError as e:
        print(f"note: no augmentation grid ({e})", file=sys.stderr)
        data = None
    made = plot_run(Path(ns.run), cfg, data)
    print("wrote " + ", ".join(str(Path(ns.run) / f) for f in made.values()))
    return 0


def _settings(ns: argparse.Namespace, cfg: Config) -> FinetuneSettings:
    from selfsup.finetune import settings_from

    return settings_from(cfg, **{k: getattr(ns, k) for k in (
        "epochs", "min_steps", "batch_size", "lr", "encoder_lr_mult", "seed")})


def cmd_finetune(ns: argparse.Namespace) -> int:
    from selfsup.finetune import finetune_run

    cfg = _run_config(ns.run, ns.data_dir)
    mode = "linear" if ns.freeze else "scratch" if ns.from_scratch else "finetune"
    r = finetune_run(ns.run, _load_data(cfg), mode, ns.label_fraction, _settings(ns, cfg),
                     cfg.progress)
    print(f"{mode}, {ns.label_fraction:g} of the labels ({r.labels} images), {r.steps} steps: "
          f"test accuracy {r.accuracy:.1%} ({r.seconds:.0f} s)")
    return 0


def cmd_label_efficiency(ns: argparse.Namespace) -> int:
    from selfsup.errors import ConfigError
    from selfsup.finetune import label_efficiency
    from selfsup.report import write_report

    try:
        fractions = tuple(float(f) for f in ns.fractions.split(",") if f.strip())
    except ValueError:
        raise ConfigError(f"--fractions must be numbers separated by commas, got "
                          f"{ns.fractions!r}") from None
    cfg = _run_config(ns.run, ns.data_dir)
    label_efficiency(ns.run, _load_data(cfg), fractions, _settings(ns, cfg), cfg.progress)
    print(f"wrote {Path(ns.run) / 'label_efficiency.png'}, {write_report(ns.run)}")
    return 0


def cmd_report(ns: argparse.Namespace) -> int:
    from selfsup.report import write_report

    if not (Path(ns.run) / "metrics.json").is_file():
        raise SelfsupError(f"{ns.run} has no metrics.json: run `selfsup evaluate {ns.run}` "
                           f"first")
    print(f"wrote {write_report(ns.run)}")
    return 0


def cmd_embed(ns: argparse.Namespace) -> int:
    from selfsup.files import atomic_write_text, save_npy
    from selfsup.inference import load_encoder
    from selfsup.train import select_device

    cfg = _run_config(ns.run, None)
    fx = load_encoder(ns.run, select_device(cfg.device))
    feats, paths = fx.embed_folder(ns.images, cfg.eval_batch_size)
    out = Path(ns.out) if ns.out else Path(ns.run) / f"embeddings_{Path(ns.images).name}.npy"
    save_npy(feats, out)
    atomic_write_text("".join(f"{p}\n" for p in paths), out.with_suffix(".txt"))
    print(f"embedded {len(paths)} images -> {out} {feats.shape}; "
          f"file list {out.with_suffix('.txt')}")
    return 0


COMMANDS = {"evaluate": cmd_evaluate, "plot": cmd_plot, "finetune": cmd_finetune,
            "label-efficiency": cmd_label_efficiency, "report": cmd_report, "embed": cmd_embed}


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 user error, 130 interrupted).

    Run as the command in a process of a torchrun group, it ends that process itself
    (``dist.exit_process``: the interpreter's teardown can abort after a finished run).
    """
    code = _main(argv)
    if argv is None:
        from selfsup import dist

        if dist.launched():
            dist.exit_process(code)
    return code


def _main(argv: list[str] | None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        if ns.command in ("run", "pretrain"):
            return cmd_train(ns, everything=ns.command == "run")
        return COMMANDS[ns.command](ns)
    except SelfsupError as e:
        print(f"selfsup: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
