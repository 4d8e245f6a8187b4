"""The keeper of a run folder: its rules and its record.

A new run goes only into a new or empty folder (or over the leftovers of a run of its name that
stopped before its first checkpoint); one process writes a folder at a time (its lock); a
checkpoint or encoder copied in from another run is refused; ``metrics.json`` is read (checked)
and written here alone (``read_metrics``, ``update_metrics``), and a saved config is read back
by ``checkpoint.config_of``.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Any

from selfsup.checkpoint import (
    CHECKPOINT,
    ENCODER,
    checkpoint_config,
    config_of,
    load_checkpoint,
    load_encoder_file,
)
from selfsup.config import Config, config_from_dict, diff_keys, is_number
from selfsup.errors import CheckpointError, SelfsupError
from selfsup.files import LOCK, folder_lock, read_json, save_json


def checkpoint_config_of(run_dir: Path) -> Config:
    """The config a run's checkpoint was written with (what a resume continues)."""

    if not (run_dir / CHECKPOINT).is_file():
        if not run_dir.is_dir():
            raise CheckpointError(f"cannot resume {run_dir}: no such folder")
        if never_checkpointed(run_dir):
            raise CheckpointError(f"cannot resume {run_dir}: it stopped before its first "
                                  f"checkpoint, so there is nothing to continue. Start it again "
                                  f"with the same options and --name {run_dir.name}: its "
                                  f"leftovers are replaced")
        raise CheckpointError(f"cannot resume {run_dir}: no {CHECKPOINT} there (not a selfsup "
                              f"run)")
    path = run_dir / CHECKPOINT
    saved = load_checkpoint(path, mmap=True)
    cfg = checkpoint_config(saved, path)
    check_same_run(run_dir, cfg, path)
    return cfg


# What a run writes before its first checkpoint: a folder holding only these (and no
# checkpoint or encoder) was stopped early, and a new run of the same name may replace them.
BEFORE_FIRST_CHECKPOINT = frozenset({"config.json", "metrics.jsonl", "tensorboard", ".timing.pt"})


def never_checkpointed(run_dir: Path) -> bool:
    """A run folder left by a run killed before its first checkpoint: nothing in it but what a
    run writes first (a config.json, if any, is a selfsup config), and temporary files."""

    try:
        names = [p.name for p in run_dir.iterdir()]
    except OSError:
        return False
    if not names or not all(n in BEFORE_FIRST_CHECKPOINT or n == LOCK
                            or (n.startswith(".") and n.endswith(".tmp")) for n in names):
        return False
    # someone's own config.json: not a run's leftovers
    return "config.json" not in names or saved_config(run_dir) is not None


def saved_config(run_dir: Path) -> Config | None:
    """The run folder's ``config.json`` as a config; None when it is missing or not a selfsup
    config (the commands that need it name the problem themselves)."""

    try:
        return config_from_dict(read_json(run_dir / "config.json", "a config object", ""))
    except SelfsupError:
        return None


def clear_leftovers(run_dir: Path) -> None:
    """Remove what a run killed before its first checkpoint left (never through a link)."""


    for p in run_dir.iterdir():
        if p.name == LOCK:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def check_same_run(run_dir: Path, cfg: Config, path: Path) -> None:
    """A file's config against the run folder's ``config.json``: a checkpoint or encoder
    copied in from another run (another model, width, data, method) is refused.

    Raises:
        CheckpointError: they differ in a setting that changes the network or the data.
    """
    own = saved_config(run_dir)
    if own is None:  # none, or damaged: the folder check (run_folder) names that
        return
    changed = diff_keys(own, cfg)
    if changed:
        raise CheckpointError(f"{path} does not belong to {run_dir}: its config differs from "
                              f"the run's config.json in {', '.join(changed)} (copied from "
                              f"another run?)")


def check_new_run_dir(run_dir: Path) -> bool:
    """Refuse a run folder that exists and is not empty (or is not a folder); returns whether
    it holds the leftovers of a run of this name killed before its first checkpoint (which the
    new run replaces)."""

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
    if never_checkpointed(run_dir):
        return True
    raise SelfsupError(f"{run_dir} exists and is not empty: a new run writes only into a new "
                       f"or empty folder, so nothing there is overwritten. Choose another "
                       f"--name (or --out-dir), or continue a run with --resume")


def claim(run_dir: Path, resume: bool, stack: contextlib.ExitStack) -> None:
    """Take the run folder's lock for this process (the only writer until it exits); a new
    run's folder is checked again under the lock, since another process may have claimed it
    between the first check and now.

    Raises:
        SelfsupError: another process holds the folder, or it filled up meanwhile.
    """

    created = not run_dir.exists()
    stack.enter_context(folder_lock(run_dir))

    def undo_if_refused(exc_type: Any, *_: Any) -> None:
        """A run refused before writing anything leaves no folder behind."""
        if exc_type is not None and created and [p.name for p in run_dir.iterdir()] == [LOCK]:
            (run_dir / LOCK).unlink()
            run_dir.rmdir()

    stack.push(undo_if_refused)
    if not resume and check_new_run_dir(run_dir):
        print(f"note: {run_dir} holds what a run of this name left when it stopped before its "
              f"first checkpoint; starting it again", flush=True)
        clear_leftovers(run_dir)


def run_folder(run: str) -> Path:
    """A run folder given to a command: it must exist and hold a selfsup run's config.json.

    Raises:
        SelfsupError: no such folder, or not a run (never write into someone else's folder).
    """

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


def finished_config(run: str, data_dir: str | None) -> Config:
    """The config of a run that finished pretraining (from its checked ``encoder.pt``)."""

    run_dir = run_folder(run)
    if not (run_dir / ENCODER).is_file() and (run_dir / CHECKPOINT).is_file():
        raise SelfsupError(f"{run} has not finished pretraining (it has a checkpoint but no "
                           f"{ENCODER} yet); finish it with `selfsup run --resume {run}`")
    cfg = config_of(load_encoder_file(run_dir / ENCODER))
    check_same_run(run_dir, cfg, run_dir / ENCODER)
    if data_dir is not None:
        cfg = config_from_dict({**cfg.to_dict(), "data_dir": data_dir})
    return cfg


METRICS = "metrics.json"
# The type of each section of metrics.json that selfsup reads back.
_METRIC_SECTIONS: dict[str, type] = {
    "config": dict, "machine": dict, "pretrain": dict, "time_s": dict, "linear_probe": dict,
    "knn": dict, "finetune": dict, "label_efficiency": dict, "knn_history": list,
    "classes": list, "confusion": list, "resumes": list, "caveats": list,
    "quality_history": list,
}


def read_metrics(run_dir: str | Path) -> dict[str, Any]:
    """The run's ``metrics.json``, or an empty dict when there is none.

    Raises:
        SelfsupError: the file is damaged (not JSON, not an object, a section of the wrong type):
            names it and how to recover.
    """
    path = Path(run_dir) / METRICS
    if not path.exists():
        return {}
    fix = (f"move it aside and run `selfsup evaluate {Path(run_dir)}` to measure the run "
           f"again")
    m = read_json(path, "a JSON object", fix)
    for key, typ in _METRIC_SECTIONS.items():
        if key in m and not isinstance(m[key], typ):
            raise SelfsupError(f"{path} is damaged ({key} is not a {typ.__name__}); {fix}")
    wrong = _not_numbers(m)
    if wrong:
        raise SelfsupError(f"{path} is damaged ({wrong} is not a number); {fix}")
    return m  # type: ignore[no-any-return]


# The figures of metrics.json that selfsup computes with or formats as numbers, where present:
# a field of a section, every field of a section (``*``), every record of a list or a table.
_NUMBERS = {
    "": ("train_size", "test_size", "pretrain_size", "feature_dim", "image_size"),
    "pretrain": ("steps", "epochs", "images_per_s", "train_seconds"),
    "linear_probe": ("trained", "untrained", "trained_validation", "untrained_validation"),
    "knn": ("trained", "untrained", "k"),
    "time_s": ("*",),
}
_RECORDS = {"knn_history": ("step", "epoch", "accuracy"),
            "quality_history": ("step", "epoch", "rankme", "alignment", "uniformity",
                                "feature_dim"),
            "resumes": ("from_step", "to_step")}
_TABLES = {"finetune": ("labels", "steps", "accuracy", "seconds"),
           "label_efficiency": ("fraction", "labels", "probe", "probe_untrained", "finetune",
                                "scratch", "steps")}


def _not_numbers(m: dict[str, Any]) -> str | None:
    """The first field of ``m`` that must be a number and is not (``knn.k``), or None."""
    for section, keys in _NUMBERS.items():
        part = m.get(section, {}) if section else m
        for k in part if keys == ("*",) else keys:
            if k in part and not is_number(part[k]):
                return f"{section}.{k}" if section else k
    for key, fields in _RECORDS.items():
        for i, entry in enumerate(m.get(key) or []):
            bad = [f for f in fields if not isinstance(entry, dict)
                   or (f in entry and not is_number(entry[f]))]
            if bad:
                return f"{key}[{i}].{bad[0]}"
    ft = m.get("finetune") or {}
    for tag, row in ft.items():
        bad = [f for f in _TABLES["finetune"] if not isinstance(row, dict)
               or not is_number(row.get(f))]
        if bad:
            return f"finetune.{tag}.{bad[0]}"
    le = m.get("label_efficiency") or {}
    n = len(le.get("fraction") or [])
    for f in _TABLES["label_efficiency"] if le else ():
        col = le.get(f)
        if not isinstance(col, list) or len(col) != n or not all(is_number(x) for x in col):
            return f"label_efficiency.{f}"
    return None


def update_metrics(run_dir: str | Path, **sections: Any) -> dict[str, Any]:
    """Merge ``sections`` into the run's ``metrics.json`` (top-level keys replaced; ``time_s``
    merged key by key) and write it atomically; returns the whole record."""
    metrics = read_metrics(run_dir)
    times = sections.pop("time_s", None)
    metrics.update(sections)
    if times:
        metrics.setdefault("time_s", {}).update(times)
    save_json(metrics, Path(run_dir) / METRICS)
    return metrics
