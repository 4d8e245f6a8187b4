"""Using labels after pretraining: fine-tuning, a linear head trained by SGD, and training from
scratch, on a stratified fraction of the labels; and the label-efficiency table.

The three modes train the same classifier (the run's encoder architecture and a linear layer)
with the same optimiser, schedule, augmentation and number of steps; only the starting weights
and what is trained differ:

- ``finetune``: starts from the pretrained encoder; everything is trained, the encoder with a
  learning rate ``encoder_lr_mult`` times the head's.
- ``linear``: the pretrained encoder frozen (eval mode, no gradient); a linear head on its
  features, after a batch norm without affine parameters (a fixed rescaling once trained), is
  trained by SGD with augmentation: the SimCLR paper's linear-evaluation protocol.
- ``scratch``: the same architecture from its random initial weights, everything trained: the
  supervised baseline.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from selfsup.augment import AugmentParams, augment, normalize, to_float
from selfsup.config import SEED_MAX, Config, Range, check_number
from selfsup.data import ImageData
from selfsup.errors import ConfigError
from selfsup.files import load_array
from selfsup.models import Encoder, in_batches
from selfsup.optim import decay_groups, lr_at

LABEL_FRACTION_RANGE = Range(0, 1, lo_open=True)
MODES = ("finetune", "linear", "scratch")
# What each fine-tuning setting admits; checked when settings are made, before any work.
FINETUNE_RANGES: dict[str, Range] = {
    "epochs": Range(1, 100_000),
    "min_steps": Range(0, 10_000_000),
    "batch_size": Range(1, 65536),
    "lr": Range(0, 100, lo_open=True),
    "encoder_lr_mult": Range(0, 100),
    "weight_decay": Range(0, 1),
    "crop_scale_min": Range(0, 1, lo_open=True),
    "flip_p": Range(0, 1),
    "seed": Range(0, SEED_MAX),
}


@dataclass(frozen=True)
class FinetuneSettings:
    """How a classifier is trained on the labelled subset (shared by all modes)."""

    epochs: int = 30  # passes over the labelled subset ...
    min_steps: int = 300  # ... but at least this many steps (tiny subsets)
    batch_size: int = 128
    lr: float = 0.05  # head learning rate per 128 images (SGD, Nesterov momentum 0.9, cosine)
    encoder_lr_mult: float = 0.1  # fine-tuning: encoder lr = this x head lr
    weight_decay: float = 5e-4  # on weights with 2+ dims, not in the linear mode
    crop_scale_min: float = 0.5  # random resized crop, area in [this, 1], and horizontal flip
    # Flip probability; None = the run's own (its data set's default: digits are never flipped,
    # a mirrored 2 is no 2). ``finetune_run`` resolves it; ``train_classifier`` takes 0.5.
    flip_p: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for name, rng in FINETUNE_RANGES.items():
            value = getattr(self, name)
            if value is not None or name != "flip_p":
                typ = int if isinstance(getattr(FinetuneSettings, name), int) else float
                check_number(name, value, typ, rng)

    def steps_for(self, n: int) -> int:
        return max(self.min_steps, math.ceil(self.epochs * n / self.batch_size))


@dataclass
class FinetuneResult:
    mode: str
    label_fraction: float
    labels: int  # labelled training images used
    accuracy: float  # test accuracy in [0, 1]
    steps: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def stratified_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Indices of a stratified ``fraction`` of the labelled images, fixed by ``seed``.

    Stratified, not balanced: each class keeps ``round(fraction * its count)`` images, at least
    one, so the subset has the class proportions of the whole (a 900/100 data set gives 90/10 at
    10 %). The subsets are nested: a smaller fraction's subset lies inside a larger one's (same
    seed).

    Raises:
        ConfigError: a fraction outside (0, 1].
    """
    check_number("label_fraction", fraction, float, LABEL_FRACTION_RANGE)
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        keep.append(idx[:max(1, int(round(fraction * len(idx))))])
    return np.sort(np.concatenate(keep))


class Classifier(nn.Module):
    """Encoder features -> (optional non-affine batch norm) -> linear layer -> class logits."""

    def __init__(self, encoder: Encoder, num_classes: int, feature_norm: bool) -> None:
        super().__init__()
        self.encoder = encoder
        # Cumulative statistics (momentum None): exact over the batches seen, even in a short
        # run, where an exponential average would still be near its initial variance of 1.
        self.norm = (nn.BatchNorm1d(encoder.feature_dim, affine=False, momentum=None)
                     if feature_norm else nn.Identity())
        self.fc = nn.Linear(encoder.feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(self.encoder(x)))


def _param_groups(model: Classifier, mode: str, lr: float, s: FinetuneSettings
                  ) -> list[dict[str, Any]]:
    wd = 0.0 if mode == "linear" else s.weight_decay
    enc_lr = lr * (s.encoder_lr_mult if mode == "finetune" else 1.0)
    parts = [(model.fc, lr)] if mode == "linear" else [(model.fc, lr), (model.encoder, enc_lr)]
    groups = [g for module, group_lr in parts
              for g in decay_groups([module], wd, lr=group_lr, base_lr=group_lr)]
    return [g for g in groups if g["params"]]


@torch.inference_mode()
def predict(model: nn.Module, x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
            batch_size: int, device: torch.device) -> np.ndarray:
    """Predicted classes (N,) of uint8 images (N, 3, H, W), model in eval mode."""
    model.eval()  # and left so
    out = in_batches(lambda b: model(normalize(to_float(b), mean, std)).argmax(1), x,
                     batch_size, device, model)
    return out.numpy() if out is not None else np.zeros(0, np.int64)


def train_classifier(encoder: Encoder, mode: str, data: ImageData, mean: list[float],
                     std: list[float], label_fraction: float, settings: FinetuneSettings,
                     device: torch.device, progress: bool = False
                     ) -> tuple[Classifier, FinetuneResult]:
    """Train a classifier on a stratified ``label_fraction`` of the training labels; test it.

    Args:
        encoder: pretrained weights for ``finetune``/``linear``, initial weights for ``scratch``
            (modified in place except in ``linear`` mode).
        mean, std: the input normalisation the encoder was pretrained with.

    Raises:
        ConfigError: unknown mode, or data without labels.
    """
    if mode not in MODES:
        raise ConfigError(f"unknown mode {mode!r}; valid modes: {', '.join(MODES)}")
    if not data.labeled or data.test_x is None:
        raise ConfigError(f"{data.name} has no labels (or no test split): nothing to fine-tune on")
    s = settings
    ytr = data.train_y.cpu().numpy()  # type: ignore[union-attr]
    subset = torch.from_numpy(stratified_subset(ytr, label_fraction, s.seed))
    x = data.train_x[subset].to(device)  # (n, 3, H, W) uint8
    y = data.train_y[subset].to(device)  # type: ignore[index]
    n = len(subset)
    batch = min(s.batch_size, n)
    steps = s.steps_for(n)
    torch.manual_seed(s.seed)
    model = Classifier(encoder, len(data.classes), feature_norm=True).to(device)
    if mode == "linear":
        model.encoder.requires_grad_(False)
    lr = s.lr * batch / 128
    opt = torch.optim.SGD(_param_groups(model, mode, lr, s), lr=lr, momentum=0.9, nesterov=True)
    flip_p = 0.5 if s.flip_p is None else s.flip_p
    aug = AugmentParams(out_size=x.shape[-1], scale=(s.crop_scale_min, 1.0), flip_p=flip_p,
                        jitter_p=0.0, gray_p=0.0, blur_p=0.0)
    m = torch.tensor(mean, device=device)
    sd = torch.tensor(std, device=device)
    gen = torch.Generator(device=device).manual_seed(s.seed)
    order_gen = torch.Generator().manual_seed(s.seed)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, desc=f"{mode} {label_fraction:g}", unit="step", leave=False)
    t0 = time.perf_counter()
    model.train()
    if mode == "linear":
        model.encoder.eval()  # frozen: batch-norm statistics stay the pretrained ones
    order = torch.empty(0, dtype=torch.long)
    pos = 0
    for step in range(steps):
        if pos + batch > len(order):
            order, pos = torch.randperm(n, generator=order_gen).to(device), 0
        idx = order[pos:pos + batch]
        pos += batch
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, 0, g["base_lr"])  # cosine to 0
        v = normalize(augment(x[idx], aug, gen), m, sd)
        loss = F.cross_entropy(model(v), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    pred = predict(model, data.test_x, m, sd, 256, device)
    acc = float((pred == data.test_y.cpu().numpy()).mean())  # type: ignore[union-attr]
    return model, FinetuneResult(mode, label_fraction, n, acc, steps, time.perf_counter() - t0)


def settings_from(cfg: Config, **overrides: Any) -> FinetuneSettings:
    """Fine-tuning settings: the defaults, the run's seed, then the given overrides."""
    known = FinetuneSettings.__dataclass_fields__
    bad = [k for k in overrides if k not in known]
    if bad:
        raise ConfigError(f"unknown fine-tuning setting(s) {', '.join(bad)}; valid: "
                          f"{', '.join(known)}")
    base = dict(seed=cfg.seed)
    base.update({k: v for k, v in overrides.items() if v is not None})
    return FinetuneSettings(**base)


def finetune_run(run_dir: str | Path, data: ImageData, mode: str, label_fraction: float,
                 settings: FinetuneSettings, progress: bool = True) -> FinetuneResult:
    """Train one classifier from a run's encoder (or from scratch), save it, record the result.

    Writes ``classifier_<mode>_<fraction>.pt`` (mode ``finetune``, ``linear`` for
    ``--freeze``, ``scratch`` for ``--from-scratch``; ``..._seed<S>.pt`` for a seed other than
    the run's; ``selfsup.load_classifier`` reads it) and adds the result under that name in
    ``finetune`` in ``metrics.json``.
    """
    from selfsup.checkpoint import ENCODER, config_of, load_encoder_file, pretrained_encoder
    from selfsup.files import save_torch
    from selfsup.hardware import select_device
    from selfsup.runfolder import read_metrics, update_metrics

    run_dir = Path(run_dir)
    saved = load_encoder_file(run_dir / ENCODER)
    cfg = config_of(saved)
    if settings.flip_p is None:  # the run's own augmentation: its data set's default
        settings = replace(settings, flip_p=cfg.flip_p)
    device = select_device(cfg.device)
    encoder = pretrained_encoder(saved, initial=mode == "scratch")
    model, result = train_classifier(encoder, mode, data, saved["mean"], saved["std"],
                                     label_fraction, settings, device, progress)
    # Another seed draws another subset and initialisation: its own name, so that runs with
    # several seeds keep every classifier and every result.
    tag = f"{mode}_{label_fraction:g}" + (f"_seed{settings.seed}" if settings.seed != cfg.seed
                                          else "")
    save_torch(dict(state_dict=model.state_dict(), mode=mode, classes=data.classes,
                    mean=saved["mean"], std=saved["std"], config=saved["config"],
                    image_size=int(saved.get("image_size", 32)),
                    settings=asdict(settings), result=result.to_dict()),
               run_dir / f"classifier_{tag}.pt")
    done = dict(read_metrics(run_dir).get("finetune", {}))
    done[tag] = dict(result.to_dict(), settings=asdict(settings))
    update_metrics(run_dir, finetune=done)
    return result


LABEL_FRACTIONS = (0.01, 0.1, 1.0)


def parse_fractions(text: str) -> tuple[float, ...]:
    """``"0.01,0.1,1"`` -> the label fractions, sorted, without repeats.

    Raises:
        ConfigError: an empty list, or an item that is not a number in (0, 1].
    """
    items = [t.strip() for t in text.split(",")]
    if not any(items):
        raise ConfigError(f"--fractions must list at least one label fraction in "
                          f"{LABEL_FRACTION_RANGE}, separated by commas, got {text!r}")
    out = set()
    for item in items:
        if item:
            out.add(check_number("fractions", item, float, LABEL_FRACTION_RANGE))
    return tuple(sorted(out))


def label_efficiency(run_dir: str | Path, data: ImageData, fractions: tuple[float, ...],
                     settings: FinetuneSettings, progress: bool = True) -> dict[str, Any]:
    """Test accuracy against the fraction of labels used, for each way of using them.

    For every fraction (the same stratified subset for all rows): the logistic probe on the
    trained encoder's frozen features and on the untrained encoder's, fine-tuning, and training
    the same architecture from scratch with the same steps. The table goes under
    ``label_efficiency`` in ``metrics.json``; ``label_efficiency.png`` plots it.
    """
    from selfsup.evaluate import evaluate_run, linear_probe
    from selfsup.plots import label_efficiency_plot
    from selfsup.runfolder import update_metrics

    run_dir = Path(run_dir)
    if not data.labeled or data.test_y is None:
        raise ConfigError(f"{data.name} has no labels: no label-efficiency table")
    if not (run_dir / "untrained_train_emb.npy").is_file():
        evaluate_run(run_dir, data)
    ytr = data.train_y.cpu().numpy()  # type: ignore[union-attr]
    yte = data.test_y.cpu().numpy()
    rows_of = {"train": len(ytr), "test": len(yte)}
    feats = {w: {s: load_array(run_dir / f"{p}{s}_emb.npy", 2, "f", rows_of[s])
                 for s in ("train", "test")}
             for w, p in (("trained", ""), ("untrained", "untrained_"))}
    rows: dict[str, list[Any]] = {k: [] for k in ("fraction", "labels", "probe",
                                                  "probe_untrained", "finetune", "scratch",
                                                  "steps", "seconds")}
    for frac in fractions:
        idx = stratified_subset(ytr, frac, settings.seed)
        rows["fraction"].append(frac)
        rows["labels"].append(len(idx))
        t0 = time.perf_counter()
        for which, key in (("trained", "probe"), ("untrained", "probe_untrained")):
            f = feats[which]
            rows[key].append(linear_probe(f["train"][idx], ytr[idx], f["test"], yte,
                                          seed=settings.seed).accuracy)
        seconds = {"probes": time.perf_counter() - t0}
        for mode in ("finetune", "scratch"):
            r = finetune_run(run_dir, data, mode, frac, settings, progress)
            rows[mode].append(r.accuracy)
            seconds[mode] = r.seconds
        rows["steps"].append(r.steps)
        rows["seconds"].append(seconds)
        print(f"labels {frac:g} ({len(idx)}): probe {rows['probe'][-1]:.1%} (untrained "
              f"{rows['probe_untrained'][-1]:.1%}), fine-tune {rows['finetune'][-1]:.1%}, "
              f"scratch {rows['scratch'][-1]:.1%}", flush=True)
    table = dict(rows, settings=asdict(settings))
    update_metrics(run_dir, label_efficiency=table)
    label_efficiency_plot(table, run_dir / "label_efficiency.png")
    return table
