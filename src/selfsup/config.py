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
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

from selfsup.errors import ConfigError

S = TypeVar("S")

DATA_DIR_ENV = "SELFSUP_DATA"
MIN_STEPS = 100  # fewer optimiser steps: a run's figures say little about the method


def _default_data_dir() -> str:
    return os.environ.get(DATA_DIR_ENV, "./data")


@dataclass
class Config:
    """Everything that defines a run. Saved as ``config.json`` and inside every checkpoint."""

    # --- data ---
    dataset: str = "cifar10"  # a registered data set (selfsup.datasets); folder: images at data_dir
    data_dir: str = field(default_factory=_default_data_dir)  # $SELFSUP_DATA or ./data
    image_size: int = 0  # images are read at this side (px); 0 = own size (photos: chosen)
    download: bool = True  # fetch CIFAR-10/100 or STL-10 when absent (checked against its MD5)
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
    method: str = "simclr"  # a registered method (selfsup.methods)
    # --- model ---
    # With a budget (and no --steps): choose model, width and view size from this machine's
    # measured speed (selfsup.sizing); off when any of the three is given.
    auto_size: bool = True
    model: str = "small_cnn"  # a registered encoder (selfsup.models)
    width: int = 32  # base channel width of the encoder (small_cnn: first stage)
    proj_hidden: int = 512  # hidden width of the 2-layer projection head
    proj_dim: int = 128  # output width z of the projection head
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
    # torch.compile the online networks' training pass (evaluation stays eager): off | default
    # | reduce-overhead (CUDA graphs too); its first steps compile, inside a budget's time
    compile: str = "off"
    seed: int = 0  # seeds model init, data order and augmentation
    # steps between checkpoints; 0 = at the end of an epoch once 30 s have passed since the last
    checkpoint_every: int = 0
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
    # The settings the plugins declare (methods, data sets, encoders: ``declare``), by name; in
    # config.json and on the command line they sit beside the fields above.
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Every field and every plugin setting, by name (as ``config.json`` holds them)."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "options"}
        values.update(self.options)
        return values

    def of(self, settings: type[S]) -> S:
        """A plugin's settings (a dataclass of ``setting`` fields), read from this config (their
        own defaults where it holds none: a config made without ``config_from_dict``)."""
        return settings_from(settings, self.options)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


CHOICES: dict[str, tuple[str, ...]] = {
    "optimizer": ("sgd", "lars", "adamw"),
    "precision": ("auto", "fp32", "bf16"),
    "compile": ("off", "default", "reduce-overhead"),
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
    # lr 0.12 per 256: it beat 0.06, and held on a validation split (BENCHMARKS.md, "The
    # preset's lr and the sizing's 40-epoch rule, re-checked on validation"). The monitors
    # every 5 epochs: checked at every epoch they took a noticeable share of the budget
    # (BENCHMARKS.md, "Figures that were code comments"). The last convolution 16 w wide
    # (feature_mult; 512-d features at width 32): in 20 minutes it beat 8 w on the linear probe
    # on an AVX2 host (kNN and the 1 % probe level, two seeds each) and an AMX host (kNN and the
    # 1 % probe 0.6-1.1 points under, one run) (BENCHMARKS.md, "A wider last convolution", "On
    # a 2-core AVX2 host"); the sizing times its rungs with it.
    "cpu": dict(model="fast_cnn", width=32, view_size=16, feature_mult=16, batch_size=512,
                budget="20m", lr=0.12, temperature=0.2, warmup_epochs=1.0, crop_scale_min=0.2,
                knn_every=5),
    # The SimCLR authors' CIFAR-10 command (README of google-research/simclr): ResNet-18 with
    # the CIFAR stem, LARS, lr 1.0 per 256 images (linear scaling: 2.0 at batch 512), weight
    # decay 1e-6, temperature 0.5, 10 warm-up epochs then cosine, colour jitter strength 0.5, no
    # blur, 1000 epochs. Differences: the projection head has one hidden layer of the feature
    # width (their code's default has two), and the augmentations are selfsup's batched ones.
    # The monitors every 5 epochs: on an H200 the checks every epoch took 15 s of a 210-s
    # budget (BENCHMARKS.md, "Today's code on the H200").
    "gpu": dict(auto_size=False, model="resnet18", width=64, batch_size=512, epochs=1000,
                optimizer="lars", lr=1.0, weight_decay=1e-6, momentum=0.9, temperature=0.5,
                warmup_epochs=10, crop_scale_min=0.08, jitter_strength=0.5, blur_p=0.0,
                proj_hidden=512, proj_dim=128, eval_batch_size=1024, knn_every=5),
}

SIZE_KEYS = ("model", "width", "view_size")  # what the budget's sizing chooses (auto_size)

# The fields every run has; the plugins' settings (``declare``) join them by name.
CORE_FIELDS = tuple(f.name for f in fields(Config) if f.name != "options")


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


# --- the plugins: methods, data sets and encoders, and the settings each declares ----------


def setting(default: Any, help: str, range: Range | None = None,
            choices: tuple[str, ...] = ()) -> Any:
    """A field of a plugin's settings dataclass: its default, what it means (the command line's
    help) and the values it admits. The name is the option: ``queue_size`` is ``--queue-size``."""
    return field(default=default, metadata=dict(help=help, range=range, choices=choices))


@dataclass(frozen=True)
class Option:
    """A plugin's setting as every config holds it (several plugins may declare one name:
    they share its type and range; each run takes the default of the plugin it selects)."""

    name: str
    default: Any  # the first declaration's; a selected plugin's own default wins
    help: str
    range: Range | None
    choices: tuple[str, ...]
    owners: tuple[str, ...]  # "method moco", ...


PRESET = "<the preset's>"  # in a method's preset_defaults: the preset's own value wins


@dataclass(frozen=True)
class Plugin:
    """A method, data set or encoder by name (``kind``: the config field that selects it).

    ``settings``: a dataclass of ``setting`` fields, its own options; ``defaults``: values of
    other fields it prefers (applied over the preset, under the user's options, for methods;
    under the preset for data sets); ``check``: raises ConfigError for settings it cannot run;
    ``preset_defaults``: for methods, values over ``defaults`` under a named preset (a paper's
    setting scaled to the preset's machine, e.g. a narrower head for ``cpu``); a value
    ``PRESET`` there gives the field back to the preset (its value, or the plain default:
    what it would be without the method's ``defaults``).
    """

    kind: str
    name: str
    settings: type | None = None
    defaults: dict[str, Any] = field(default_factory=dict)
    check: Callable[[Config], None] | None = None
    preset_defaults: dict[str, dict[str, Any]] = field(default_factory=dict)


KINDS = ("method", "dataset", "model")
PLUGINS: dict[str, dict[str, Plugin]] = {kind: {} for kind in KINDS}
OPTIONS: dict[str, Option] = {}


def declare(plugin: Plugin) -> None:
    """Make ``plugin.name`` a valid value of its field, and its settings options of every config.

    Raises:
        TypeError: a setting without a default, named like a field of every run, or declared
            before with another type.
    """
    owner = f"{plugin.kind} {plugin.name}"
    for f in fields(plugin.settings) if plugin.settings is not None else ():
        if f.default is dataclasses.MISSING or f.name in CORE_FIELDS or f.name == "options":
            raise TypeError(f"{owner}: setting {f.name} needs a default and a name of its own")
        old = OPTIONS.get(f.name)
        if old is not None and type(old.default) is not type(f.default):
            raise TypeError(f"{owner}: setting {f.name} is a {type(f.default).__name__}; "
                            f"{', '.join(old.owners)} declared it a {type(old.default).__name__}")
        OPTIONS[f.name] = Option(
            f.name, f.default if old is None else old.default,
            f.metadata.get("help", "") if old is None else old.help,
            f.metadata.get("range") if old is None else old.range,
            tuple(f.metadata.get("choices", ())) if old is None else old.choices,
            tuple(dict.fromkeys((*(old.owners if old else ()), owner))))
    PLUGINS[plugin.kind][plugin.name] = plugin


def settings_from(settings: type[S], options: dict[str, Any]) -> S:
    """A plugin's settings dataclass read from a config's options (its defaults where absent)."""
    return settings(**{f.name: options.get(f.name, f.default)
                       for f in fields(settings)})  # type: ignore[arg-type]


def option_defaults(selected: dict[str, str]) -> dict[str, Any]:
    """Every plugin setting's default for a run that selects ``selected`` (kind -> name): the
    selected plugin's own where it declares the setting, the first declaration's elsewhere."""
    values = {name: opt.default for name, opt in OPTIONS.items()}
    for kind, name in selected.items():
        plugin = PLUGINS.get(kind, {}).get(name)
        if plugin is not None and plugin.settings is not None:
            values.update((f.name, f.default) for f in fields(plugin.settings))
    return values


def field_names() -> tuple[str, ...]:
    """Every config key: the fields of every run, then the plugins' settings."""
    return CORE_FIELDS + tuple(OPTIONS)


def field_types() -> dict[str, type]:
    """The Python type of every config key (bool, int, float or str)."""
    defaults = Config()
    types = {name: type(getattr(defaults, name)) for name in CORE_FIELDS}
    types.update((name, type(opt.default)) for name, opt in OPTIONS.items())
    return types


def choices_of(key: str) -> tuple[str, ...]:
    """The values a string field or setting admits (empty: any)."""
    if key in KINDS:
        return tuple(PLUGINS[key])
    return CHOICES.get(key) or (OPTIONS[key].choices if key in OPTIONS else ())


def range_of(key: str) -> Range | None:
    return RANGES.get(key) or (OPTIONS[key].range if key in OPTIONS else None)


# The range of every numeric field: wide enough for any sensible run, narrow enough that nothing
# later overflows, allocates without bound or trains for years. Checked before any work.
SEED_MAX = 2**32 - 1
MIN_SIDE = 8  # px: the smallest image side selfsup resizes to (no encoder takes less)
RANGES: dict[str, Range] = {
    "image_size": Range(0, 4096),  # 0 = the images' own side; else at least MIN_SIDE
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
        return check_number(key, value, typ, range_of(key))
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
    """Build and validate a config: defaults (a selected plugin's own for its settings), the
    data set's preferred values, the preset, the method's preferred values (e.g. MoCo's
    temperature) and its values for this preset (VICReg's narrower head on ``cpu``), the
    overrides.

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
    values.update(_plugin("dataset", dataset).defaults)
    values.update(preset_values)
    if preset:
        values["preset"] = preset
    method = _plugin("method", overrides.get("method", values.get("method", Config.method)))
    before = dict(values)  # the data set's and the preset's
    values.update(method.defaults)
    for key, value in method.preset_defaults.get(preset or "", {}).items():
        if value != PRESET:
            values[key] = value
        elif key in before:
            values[key] = before[key]
        else:
            values.pop(key, None)  # the plain default
    if "auto_size" not in overrides and any(k in overrides for k in SIZE_KEYS):
        values["auto_size"] = False  # the user named a size: theirs wins over the sizing
    values.update(overrides)
    return config_from_dict(values)


def _plugin(kind: str, name: Any) -> Plugin:
    """The registered plugin, or an empty one for a name ``validate`` will refuse."""
    found = PLUGINS[kind].get(name) if isinstance(name, str) else None
    return found if found is not None else Plugin(kind, str(name))


def config_from_dict(values: dict[str, Any]) -> Config:
    """Validate a mapping of field values into a Config (missing keys take defaults: for a
    plugin's setting, the selected plugin's own)."""
    types = field_types()
    unknown = sorted(set(values) - set(types))
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(unknown)}; valid keys: "
                          f"{', '.join(types)}")
    given = {k: _coerce(k, v, types[k]) for k, v in values.items()}
    selected = {kind: given.get(kind, getattr(Config, kind)) for kind in KINDS}
    options = option_defaults(selected)
    options.update((k, v) for k, v in given.items() if k in OPTIONS)
    cfg = Config(**{k: v for k, v in given.items() if k not in OPTIONS}, options=options)
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


def parse_replans(text: str) -> list[tuple[int, int]]:
    """``"R1:P1,R2:P2"`` -> ``[(R1, P1), (R2, P2)]``: a budgeted run's replans (``Config``).

    Raises:
        ValueError: anything else.
    """
    if not text:
        return []
    knots = []
    for part in text.split(","):
        at, _, planned = part.partition(":")
        knots.append((int(at), int(planned)))
    return knots


def _replans_ok(cfg: Config) -> bool:
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
    values = cfg.to_dict()
    for kind in ("model", "method"):  # a name of a registry: the message lists the valid ones
        if values[kind] not in PLUGINS[kind]:
            raise ConfigError(f"{option(kind)}: unknown {kind} {values[kind]!r}; valid {kind}s: "
                              f"{', '.join(PLUGINS[kind])}")
    for key in (*CHOICES, "dataset", *(k for k, o in OPTIONS.items() if o.choices)):
        allowed = choices_of(key)
        if values[key] not in allowed:
            raise ConfigError(f"{option(key)} must be one of {', '.join(allowed)}, got "
                              f"{values[key]!r}")
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
    for kind in KINDS:  # each selected plugin's own relations between fields
        check = PLUGINS[kind][getattr(cfg, kind)].check
        if check is not None:
            check(cfg)
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
