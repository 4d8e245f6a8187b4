"""One typed configuration for a run, named presets, and validation.

Every field has a default and a comment (units, intent). Presets are small named sets of
overrides applied on top of the defaults; explicit overrides win over the preset.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field, fields
from typing import Any

from selfsup.errors import ConfigError

DATA_DIR_ENV = "SELFSUP_DATA"


def _default_data_dir() -> str:
    return os.environ.get(DATA_DIR_ENV, "./data")


@dataclass
class Config:
    """Everything that defines a run. Saved as ``config.json`` and inside every checkpoint."""

    # --- data ---
    dataset: str = "cifar10"  # cifar10 | cifar100 | stl10 | digits | folder (images at data_dir)
    data_dir: str = field(default_factory=_default_data_dir)  # $SELFSUP_DATA or ./data
    image_size: int = 0  # images are resized to this side (px); 0 = own size (folders: the median)
    download: bool = True  # fetch CIFAR-10/100 or STL-10 when absent (checked against its MD5)
    cifar100_labels: str = "fine"  # cifar100: fine (100 classes) | coarse (20 superclasses)
    stl10_unlabeled: bool = True  # stl10: pretrain on the 100,000 unlabeled images too
    stl10_fold: int = -1  # stl10: probe/kNN/fine-tune on predefined fold 0-9 (1,000); -1 = all
    bad_images: str = "skip"  # image folders: skip unreadable or non-image files (counted), or fail
    # --- augmentation (two views per image per step; SimCLR appendix B.9 for CIFAR) ---
    view_size: int = 0  # side of the augmented views during pretraining (px); 0 = image side
    crop_scale_min: float = 0.08  # random resized crop: smallest area fraction
    crop_scale_max: float = 1.0  # random resized crop: largest area fraction
    flip_p: float = 0.5  # horizontal flip probability
    jitter_p: float = 0.8  # probability of colour jitter per view
    jitter_strength: float = 0.5  # s: brightness/contrast/saturation 0.8s, hue 0.2s
    gray_p: float = 0.2  # probability of grayscale per view
    blur_p: float = 0.0  # probability of Gaussian blur per view (off for 32x32 images)
    # --- method (selfsup.methods.METHODS) ---
    method: str = "simclr"  # simclr | moco (MoCo v2) | byol
    queue_size: int = 4096  # moco: negative keys kept, a multiple of batch_size
    target_momentum: float = 0.99  # moco: key encoder EMA momentum; byol: its starting value
    symmetric: bool = False  # moco: also the loss with the views swapped (byol always is)
    pred_hidden: int = 0  # byol: hidden width of the predictor; 0 = proj_hidden
    # --- model ---
    # With a budget (and no --steps): choose model, width and view size from this machine's
    # measured speed (selfsup.sizing); off when any of the three is given.
    auto_size: bool = True
    model: str = "small_cnn"  # encoder name in selfsup.models.ENCODERS
    width: int = 32  # base channel width of the encoder (small_cnn: first stage)
    proj_hidden: int = 512  # hidden width of the 2-layer projection head
    proj_dim: int = 128  # output width z of the projection head
    # --- loss ---
    temperature: float = 0.5  # tau in NT-Xent
    # --- optimisation ---
    optimizer: str = "sgd"  # sgd | lars | adamw (for ViTs)
    lr: float = 0.06  # learning rate per 256 images; peak lr = lr * batch_size / 256
    momentum: float = 0.9
    weight_decay: float = 5e-4  # not applied to biases and norm parameters
    warmup_epochs: float = 1.0  # linear warm-up length, then cosine decay to 0
    epochs: int = 10
    steps: int = 0  # total optimiser steps; 0 = epochs * steps per epoch (overrides epochs)
    budget: str = ""  # pretraining time, e.g. 20m: measure speed, fit steps to it (unless steps)
    # A budget's replans, "R:P,...": until step R the run was planned to end at step P; from
    # there the schedule's rest is spread over the next plan's steps (optim.schedule_step).
    replans: str = ""
    batch_size: int = 512  # images per step (each gives two views)
    precision: str = "auto"  # auto | fp32 | bf16 (autocast); auto picks from the hardware
    device: str = "auto"  # auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps
    threads: int = 0  # CPU threads for torch; 0 = torch's default
    channels_last: bool = True  # NHWC memory format (faster convolutions on CPU)
    seed: int = 0  # seeds model init, data order and augmentation
    checkpoint_every: int = 0  # steps between checkpoints; 0 = at the end of every epoch
    sync_bn: bool = True  # several processes: batch-norm statistics over the global batch
    dist_timeout: float = 300.0  # several processes: seconds before a silent peer is an error
    # --- evaluation ---
    knn_k: int = 200
    knn_t: float = 0.1  # temperature of the kNN vote weights exp(sim / t)
    knn_every: int = 1  # kNN accuracy on a fixed subset every this many epochs (0 = never)
    knn_monitor_size: int = 1000  # test images it classifies (training bank: 5x as many)
    probe_val_frac: float = 0.1  # part of the training set held out to choose regularisation
    tsne_points: int = 2000  # test points shown in the t-SNE map (subsampled, stratified)
    eval_batch_size: int = 128  # images per forward pass when embedding (small: cache-friendly)
    # --- output ---
    out_dir: str = "runs"
    name: str = ""  # run folder name under out_dir; "" = <dataset>-<preset>-<time>
    preset: str = ""  # the preset these values started from (informational)
    progress: bool = True  # show a progress bar (a line per epoch when not on a terminal)
    log: str = "none"  # metrics.jsonl is always written; tensorboard: event files too

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


CHOICES: dict[str, tuple[str, ...]] = {
    "dataset": ("cifar10", "cifar100", "stl10", "digits", "folder"),
    "cifar100_labels": ("fine", "coarse"),
    "optimizer": ("sgd", "lars", "adamw"),
    "precision": ("auto", "fp32", "bf16"),
    "bad_images": ("skip", "fail"),
    "log": ("none", "tensorboard"),
}

PRESETS: dict[str, dict[str, Any]] = {
    # A first look in a minute or two on a laptop CPU.
    "quick": dict(auto_size=False, epochs=3, batch_size=256, width=16, view_size=16,
                  warmup_epochs=0.5, tsne_points=1000),
    # The best linear probe ~20 minutes of a 2-core CPU buys (see BENCHMARKS.md): the budget
    # sizes the encoder to the machine (selfsup.sizing); these three are the smallest rung,
    # used when --steps replaces the budget.
    # lr 0.12 per 256: 76.0 % against 75.7 % at 0.06 in 20 minutes (BENCHMARKS.md, r7 vs r6).
    # The monitors (kNN, RankMe) every 5 epochs: at every epoch their ~2-3 s checks took about a
    # tenth of the budget.
    "cpu": dict(model="fast_cnn", width=32, view_size=16, batch_size=512, budget="20m",
                lr=0.12, temperature=0.2, warmup_epochs=1.0, crop_scale_min=0.2, knn_every=5),
    # The SimCLR authors' CIFAR-10 command (README of google-research/simclr): ResNet-18 with
    # the CIFAR stem, LARS, lr 1.0 per 256 images (linear scaling: 2.0 at batch 512), weight
    # decay 1e-6, temperature 0.5, 10 warm-up epochs then cosine, colour jitter strength 0.5, no
    # blur, 1000 epochs. Differences: the projection head has one hidden layer of the feature
    # width (their code's default has two), and the augmentations are selfsup's batched ones.
    "gpu": dict(auto_size=False, model="resnet18", width=64, batch_size=512, epochs=1000,
                optimizer="lars", lr=1.0, weight_decay=1e-6, momentum=0.9, temperature=0.5,
                warmup_epochs=10, crop_scale_min=0.08, jitter_strength=0.5, blur_p=0.0,
                proj_hidden=512, proj_dim=128, eval_batch_size=1024),
}

# Defaults that suit a data set better than the general ones; presets and options still win.
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    # 1,437 tiny 16x16 digits: smaller batches for more steps; no flips (a mirrored 2 is no 2).
    # MoCo's queue: fewer keys than images, so that no image meets an old key of itself.
    "digits": dict(batch_size=256, epochs=40, flip_p=0.0, crop_scale_min=0.3, queue_size=1024),
}

SIZE_KEYS = ("model", "width", "view_size")  # what the budget's sizing chooses (auto_size)

FIELD_NAMES = tuple(f.name for f in fields(Config))


def field_types() -> dict[str, type]:
    """The Python type of every field (bool, int, float or str)."""
    defaults = Config()
    return {name: type(getattr(defaults, name)) for name in FIELD_NAMES}


@dataclass(frozen=True)
class Range:
    """The values a numeric option admits: ``lo``..``hi``, each end closed unless ``*_open``."""

    lo: float
    hi: float
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, value: float) -> bool:
        above = value > self.lo if self.lo_open else value >= self.lo
        below = value < self.hi if self.hi_open else value <= self.hi
        return bool(above and below)

    def __str__(self) -> str:
        def num(x: float) -> str:
            return f"{x:g}" if isinstance(x, float) and not float(x).is_integer() else f"{int(x)}"

        return (f"{'(' if self.lo_open else '['}{num(self.lo)}, {num(self.hi)}"
                f"{')' if self.hi_open else ']'}")


def option(key: str) -> str:
    """The command-line spelling of a config key: ``batch_size`` -> ``--batch-size``."""
    return "--" + key.replace("_", "-")


# The range of every numeric field: wide enough for any sensible run, narrow enough that nothing
# later overflows, allocates without bound or trains for years. Checked before any work.
SEED_MAX = 2**32 - 1
MIN_SIDE = 8  # px: the smallest image side selfsup resizes to (no encoder takes less)
RANGES: dict[str, Range] = {
    "image_size": Range(0, 4096),  # 0 = the images' own side; else at least MIN_SIDE
    "stl10_fold": Range(-1, 9),  # -1 = every labelled training image
    "view_size": Range(0, 4096),  # 0 = the image side
    "crop_scale_min": Range(0, 1, lo_open=True),
    "crop_scale_max": Range(0, 1, lo_open=True),
    "flip_p": Range(0, 1),
    "jitter_p": Range(0, 1),
    # s: brightness, contrast, saturation 0.8s; hue 0.2s, at most half a turn.
    "jitter_strength": Range(0, 2.5),
    "gray_p": Range(0, 1),
    "blur_p": Range(0, 1),
    "width": Range(1, 1024),
    "proj_hidden": Range(1, 16384),
    "proj_dim": Range(1, 8192),
    "queue_size": Range(1, 1_048_576),
    "target_momentum": Range(0, 1),
    "pred_hidden": Range(0, 16384),  # 0 = proj_hidden
    "temperature": Range(0.001, 100),
    "lr": Range(0, 100, lo_open=True),
    "momentum": Range(0, 1, hi_open=True),
    "weight_decay": Range(0, 1),
    "warmup_epochs": Range(0, 10_000),
    "epochs": Range(1, 1_000_000),
    "steps": Range(0, 1_000_000_000),  # 0 = from epochs
    "batch_size": Range(2, 65536),  # NT-Xent needs at least one negative
    "threads": Range(0, 1024),  # 0 = torch's default
    "seed": Range(0, SEED_MAX),
    "checkpoint_every": Range(0, 1_000_000_000),
    "dist_timeout": Range(0, 7 * 86400, lo_open=True),
    "knn_k": Range(1, 100_000),
    "knn_t": Range(0.001, 100),
    "knn_every": Range(0, 1_000_000),
    "knn_monitor_size": Range(1, 1_000_000),
    "probe_val_frac": Range(0, 1, lo_open=True, hi_open=True),
    "tsne_points": Range(0, 50_000),  # 0 = no t-SNE map
    "eval_batch_size": Range(1, 65536),
}
MAX_BUDGET_S = 30 * 86400.0  # a budget beyond 30 days is a typo
NAME_MAX_BYTES = 200  # a run folder's name, well under the usual 255-byte file-name limit


def shown(value: Any) -> str:
    """A value as a message shows it: a plain string as typed, anything else by its repr."""
    if isinstance(value, str) and value and value.isprintable() and value.strip() == value:
        return value if len(value) <= 60 else value[:60] + "..."
    text = repr(value)
    return text if len(text) <= 60 else text[:60] + "..."


def is_number(x: Any) -> bool:
    """An int or a float read from JSON or a file (a bool is neither, whatever Python says)."""
    return isinstance(x, int | float) and not isinstance(x, bool)


def check_number(key: str, value: Any, typ: type, rng: Range | None) -> Any:
    """``value`` as an int or a finite float inside ``rng``.

    Raises:
        ConfigError: naming the option, the value and the range.
    """
    kind = "an integer" if typ is int else "a number"
    where = f" in {rng}" if rng is not None else ""
    bad = ConfigError(f"{option(key)} must be {kind}{where}, got {shown(value)}")
    if isinstance(value, bool) or (typ is int and isinstance(value, float)
                                   and not value.is_integer()):
        raise bad
    try:
        out = typ(value)
    except (TypeError, ValueError, OverflowError):
        raise bad from None
    if not math.isfinite(out) or (rng is not None and out not in rng):
        raise bad
    return out


def _coerce(key: str, value: Any, typ: type) -> Any:
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{option(key)} must be true or false, got {value!r}")
    if typ in (int, float):
        return check_number(key, value, typ, RANGES.get(key))
    if not isinstance(value, str):
        raise ConfigError(f"{option(key)} must be a string, got {value!r}")
    if "\x00" in value:
        raise ConfigError(f"{option(key)} must not contain a NUL character, got {value!r}")
    return value


def check_run_name(name: str) -> None:
    """A run name is one plain folder name under the runs folder, never a path.

    Raises:
        ConfigError: separators, a name starting with a dot (``.``, ``..``, hidden), control
            characters, or a name too long for a file system.
    """
    bad = None
    if "/" in name or "\\" in name or (os.altsep and os.altsep in name):
        bad = "a name, not a path: no / or \\"
    elif name.startswith("."):
        bad = "a name that does not start with a dot (., .. and hidden names leave or hide)"
    elif any(ord(c) < 32 or ord(c) == 127 for c in name):
        bad = "free of control characters (newlines, tabs, ...)"
    elif len(name.encode("utf-8", "surrogateescape")) > NAME_MAX_BYTES:
        bad = f"at most {NAME_MAX_BYTES} bytes long"
    if bad:
        raise ConfigError(f"--name must be {bad}, got {name!r}")


def make_config(preset: str | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Build and validate a config: defaults, the data set's defaults, the preset, the method's
    own defaults (e.g. MoCo's temperature), the overrides.

    Args:
        preset: name in ``PRESETS`` or None/"" for plain defaults.
        overrides: field name -> value (strings are converted to the field's type).

    Raises:
        ConfigError: unknown preset or key (the message lists the valid ones), ill-typed or
            out-of-range value.
    """
    overrides = overrides or {}
    values: dict[str, Any] = {}
    if preset and preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    preset_values = PRESETS[preset] if preset else {}
    dataset = overrides.get("dataset", preset_values.get("dataset", Config.dataset))
    values.update(DATASET_DEFAULTS.get(dataset, {}))
    values.update(preset_values)
    if preset:
        values["preset"] = preset
    from selfsup.methods import METHODS  # the registry lives with the methods

    method = overrides.get("method", values.get("method", Config.method))
    if method in METHODS:  # an unknown name is refused by validate, with the valid ones
        values.update(METHODS[method].defaults)
    if "auto_size" not in overrides and any(k in overrides for k in SIZE_KEYS):
        values["auto_size"] = False  # the user named a size: theirs wins over the sizing
    values.update(overrides)
    return config_from_dict(values)


def config_from_dict(values: dict[str, Any]) -> Config:
    """Validate a mapping of field values into a Config (missing keys take defaults)."""
    types = field_types()
    unknown = sorted(set(values) - set(types))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(unknown)}; valid keys: {', '.join(FIELD_NAMES)}"
        )
    cfg = Config(**{k: _coerce(k, v, types[k]) for k, v in values.items()})
    validate(cfg)
    return cfg


def parse_duration(text: str) -> float:
    """'20m', '90s', '1.5h' -> seconds.

    Raises:
        ConfigError: anything else.
    """
    units = {"s": 1.0, "m": 60.0, "h": 3600.0}
    t = text.strip().lower()
    try:
        value = float(t[:-1])
        if t[-1:] not in units or not value > 0 or not value * units[t[-1]] <= MAX_BUDGET_S:
            raise ValueError
    except ValueError:
        raise ConfigError(f"--budget must be a positive number with a unit s, m or h (e.g. 20m), "
                          f"at most {MAX_BUDGET_S / 3600:g}h, got {shown(text)}") from None
    return value * units[t[-1]]


DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:[0-9]{1,3})?")


def _replans_ok(cfg: Config) -> bool:
    from selfsup.optim import parse_replans

    try:
        knots = parse_replans(cfg.replans)
    except ValueError:
        return False
    if not knots:
        return True
    ends = [at for at, _ in knots[1:]] + [cfg.steps or 2**62]
    return all(0 < at < planned and at < end for (at, planned), end in zip(knots, ends,
                                                                             strict=True))


def validate(cfg: Config) -> None:
    """Check ranges and names; raise ConfigError saying what is allowed."""
    from selfsup.methods import METHODS
    from selfsup.models import ENCODERS  # registry lives with the models

    for key, allowed in CHOICES.items():
        if getattr(cfg, key) not in allowed:
            value = getattr(cfg, key)
            raise ConfigError(f"{option(key)} must be one of {', '.join(allowed)}, got {value!r}")
    if cfg.model not in ENCODERS:
        raise ConfigError(f"--model: unknown model {cfg.model!r}; valid models: "
                          f"{', '.join(ENCODERS)}")
    if cfg.method not in METHODS:
        raise ConfigError(f"--method: unknown method {cfg.method!r}; valid methods: "
                          f"{', '.join(METHODS)}")
    # Per-field ranges are checked when the values are read (``check_number``); these relate
    # several fields or check names.
    checks = [
        (cfg.crop_scale_min <= cfg.crop_scale_max,
         f"--crop-scale-min ({cfg.crop_scale_min}) must not exceed --crop-scale-max "
         f"({cfg.crop_scale_max})"),
        (DEVICE_PATTERN.fullmatch(cfg.device) is not None,
         f"--device must be auto, cpu, cuda, cuda:N or mps, got {cfg.device!r}"),
        (cfg.image_size == 0 or cfg.image_size >= MIN_SIDE,
         f"--image-size must be 0 (the images' own side) or an integer in [{MIN_SIDE}, "
         f"{int(RANGES['image_size'].hi)}], got {cfg.image_size}"),
        (_replans_ok(cfg), f"--replans must be R:P,... (until step R the run was planned to "
                           f"end at step P), with each R above 0, below its P and below the "
                           f"next R, and --steps above the last R; got {shown(cfg.replans)}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    METHODS[cfg.method].check_config(cfg)  # the method's own relations between fields
    if cfg.name:
        check_run_name(cfg.name)
    if cfg.budget:
        parse_duration(cfg.budget)  # raises ConfigError with the allowed form


# Keys that may differ when resuming a run: they do not change what is being trained.
RESUMABLE_KEYS = ("epochs", "steps", "budget", "auto_size", "progress", "log", "device",
                  "threads", "out_dir", "name", "eval_batch_size", "tsne_points", "knn_k", "knn_t",
                  "probe_val_frac", "knn_every", "knn_monitor_size", "bad_images",
                  "checkpoint_every", "dist_timeout")


def diff_keys(old: Config, new: Config, allowed: tuple[str, ...] = RESUMABLE_KEYS) -> list[str]:
    """Keys whose values differ between two configs, ignoring the ``allowed`` ones."""
    a, b = old.to_dict(), new.to_dict()
    return sorted(k for k in a if k not in allowed and a[k] != b[k])
