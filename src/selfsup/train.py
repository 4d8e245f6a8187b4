"""Pretraining: device and precision choice, optimiser and schedule, the loop, checkpoints.

The loop reads top to bottom: take a batch of indices from this epoch's permutation, make two
views on the device, embed both in one forward pass, NT-Xent, step. A checkpoint is written
atomically at the end of every epoch (and on Ctrl-C); ``resume`` continues from it exactly.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import pickle
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from selfsup import dist
from selfsup.augment import AugmentParams, normalize, two_views
from selfsup.config import Config, config_from_dict, diff_keys, parse_duration
from selfsup.data import ImageData, channel_stats, physical_memory
from selfsup.dist import gather_with_grad
from selfsup.errors import CheckpointError, ConfigError, Interrupted, SelfsupError
from selfsup.files import save_json, save_npy, save_torch
from selfsup.losses import nt_xent
from selfsup.models import Encoder, ProjectionHead, build_encoder, nhwc_safe_on_cpu

M = TypeVar("M", bound=nn.Module)
CHECKPOINT = "checkpoint.pt"
ENCODER = "encoder.pt"


# --- device and precision -------------------------------------------------------------------


def select_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA, then Apple MPS, then CPU. Otherwise the named device, checked."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SelfsupError(f"--device {name}: CUDA is not available here; use cpu or auto")
    if name == "mps" and not torch.backends.mps.is_available():
        raise SelfsupError("--device mps: Apple MPS is not available here; use cpu or auto")
    return torch.device(name)


def cpu_has_fast_bf16() -> bool:
    """True where the CPU computes bf16 natively (AVX-512 BF16 or AMX)."""
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    return bool(torch.cpu._is_avx512_bf16_supported() or amx())


def select_precision(name: str, device: torch.device) -> tuple[torch.dtype | None, str]:
    """The autocast dtype (None = fp32) and why it was chosen.

    ``auto`` takes bf16 only where the hardware runs it natively: on CPUs with AVX-512 BF16 or
    AMX (elsewhere bf16 is emulated and several times slower than fp32), and on CUDA GPUs that
    support it.
    """
    if name == "fp32":
        return None, "fp32 (asked for)"
    if name == "bf16":
        return torch.bfloat16, "bf16 autocast (asked for)"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "bf16 autocast (auto: this GPU supports bf16)"
        return None, "fp32 (auto: this GPU lacks bf16)"
    if device.type == "cpu":
        cap = torch.backends.cpu.get_cpu_capability()
        if cpu_has_fast_bf16():
            return torch.bfloat16, f"bf16 autocast (auto: CPU has native bf16, {cap})"
        return None, f"fp32 (auto: CPU has no native bf16, {cap}; bf16 would be emulated)"
    return None, f"fp32 (auto: {device.type})"


# --- optimiser and schedule -----------------------------------------------------------------


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratios (You et al. 2017), as used by SimCLR.

    Parameters with one dimension (biases, norm weights) get neither weight decay nor the trust
    ratio, as in the paper's implementation.
    """

    def __init__(self, params: Any, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 0.001) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      eta=eta))

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if p.ndim > 1:
                    d = d.add(p, alpha=group["weight_decay"])
                    w_norm, d_norm = torch.linalg.norm(p), torch.linalg.norm(d)
                    trust = torch.where((w_norm > 0) & (d_norm > 0),
                                        group["eta"] * w_norm / d_norm, torch.ones_like(w_norm))
                    d = d.mul(trust)
                buf = self.state[p].get("momentum_buffer")
                if buf is None:
                    buf = self.state[p]["momentum_buffer"] = torch.clone(d).detach()
                else:
                    buf.mul_(group["momentum"]).add_(d)
                p.add_(buf, alpha=-group["lr"])


def build_optimizer(modules: list[nn.Module], cfg: Config, lr: float) -> torch.optim.Optimizer:
    """SGD (momentum) or LARS; biases and norm parameters get no weight decay."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for m in modules:
        for p in m.parameters():
            (decay if p.ndim > 1 else no_decay).append(p)
    groups = [dict(params=decay, weight_decay=cfg.weight_decay),
              dict(params=no_decay, weight_decay=0.0)]
    if cfg.optimizer == "lars":
        return LARS(groups, lr=lr, momentum=cfg.momentum)
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum)


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total`` (per step)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# --- model construction ---------------------------------------------------------------------


def init_encoder(cfg: Config) -> Encoder:
    """The encoder at its initial weights: a function of the config's model, width and seed.

    The untrained baseline is this same call, so it is the exact network pretraining started from.
    """
    torch.manual_seed(cfg.seed)
    return build_encoder(cfg.model, cfg.width)


def pretrained_encoder(saved: dict[str, Any], initial: bool = False) -> Encoder:
    """The encoder of an ``encoder.pt`` (as ``load_encoder_file`` checked it), in eval mode; with
    ``initial``, the same architecture at the initial weights pretraining started from (the
    untrained baseline)."""
    encoder = init_encoder(config_from_dict(saved["config"]))
    if not initial:
        try:
            encoder.load_state_dict(saved["state_dict"])
        except (RuntimeError, KeyError) as e:
            raise CheckpointError(f"the encoder weights do not fit the configured model "
                                  f"({str(e).splitlines()[0]})") from None
    return encoder.eval()


def init_head(cfg: Config, feature_dim: int) -> ProjectionHead:
    torch.manual_seed(cfg.seed + 1)
    return ProjectionHead(feature_dim, cfg.proj_hidden, cfg.proj_dim)


def use_channels_last(encoder: nn.Module, requested: bool, device: torch.device,
                      verbose: bool = True) -> bool:
    """NHWC when ``requested``, unless this encoder hits a known CPU kernel fault in NHWC."""
    if requested and device.type == "cpu" and not nhwc_safe_on_cpu(encoder):
        if verbose:
            print("note: channels_last off: this encoder has a strided 1x1 convolution with "
                  "fewer than 16 input channels, which the CPU kernels mishandle in NHWC",
                  flush=True)
        return False
    return requested


def prepare(model: M, device: torch.device, channels_last: bool) -> M:
    """Move a model to the device, in NHWC memory format when ``channels_last``."""
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return model


# --- checkpoints ----------------------------------------------------------------------------


# Lines of the loader's messages that give advice rather than the reason (never passed on).
_LOADER_ADVICE = ("weights_only", "weights only", "documentation", "file an issue", "trusted")


def load_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """Load a checkpoint or encoder file safely (``weights_only=True``: no code runs).

    Args:
        mmap: map the file instead of reading it (for a quick look at a large file's config).

    Raises:
        CheckpointError: missing, damaged, holding objects other than tensors and plain data
            (refused: nothing in it runs), or not a selfsup file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    try:
        with warnings.catch_warnings():  # the loader's warnings about odd files ask for reports
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        if isinstance(e, pickle.UnpicklingError) and any("GLOBAL" in ln for ln in lines):
            # The loader refused an object that is not a tensor or plain data. Its message
            # suggests loading the file unsafely; a file of unknown origin must never be, so
            # that advice is not passed on.
            raise CheckpointError(f"{path} was refused: it holds objects other than tensors "
                                  f"and plain data, which a selfsup file never does (nothing "
                                  f"in it was run)") from None
        detail = [ln for ln in lines if not any(w in ln.lower() for w in _LOADER_ADVICE)]
        why = detail[0][:200] if detail else "not a file selfsup can read"
        raise CheckpointError(f"{path} cannot be loaded: damaged or not a selfsup file "
                              f"({type(e).__name__}: {why})") from None
    if not isinstance(obj, dict) or "config" not in obj:
        raise CheckpointError(f"{path} is not a selfsup checkpoint")
    return obj


def checkpoint_config(saved: dict[str, Any], path: str | Path) -> Config:
    """The validated config inside a checkpoint or encoder file.

    Raises:
        CheckpointError: no config, or one selfsup does not accept (names the problem).
    """
    raw = saved.get("config")
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} is damaged: its config is not a mapping")
    try:
        return config_from_dict(raw)
    except ConfigError as e:
        raise CheckpointError(f"{path} is damaged: its config is invalid ({e})") from None


def _expected_state(cfg: Config) -> tuple[dict[str, torch.Tensor], int]:
    """Parameters and buffers of the config's encoder (shapes and dtypes only), and its feature
    width, made on the meta device: nothing is allocated, however large the config says the
    network is."""
    with torch.device("meta"):
        encoder = build_encoder(cfg.model, cfg.width)
    return dict(encoder.state_dict()), int(encoder.feature_dim)


def _check_state_dict(state: Any, expected: dict[str, torch.Tensor], what: str,
                      part: str = "encoder") -> None:
    """The weights of ``part`` a file holds against the network's: names, shapes, kinds of
    number, and finite values."""
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise CheckpointError(f"{what}: the {part} weights are not a mapping of names to tensors")
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state)
                   if state[k].shape != expected[k].shape
                   or state[k].is_floating_point() != expected[k].is_floating_point()
                   or state[k].is_complex())
    if missing or extra or wrong:
        parts = [f"{name} {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}"
                 for name, keys in (("missing", missing), ("unexpected", extra),
                                    ("wrong shape or type", wrong)) if keys]
        raise CheckpointError(f"{what}: the {part} weights do not fit the configured model "
                              f"({'; '.join(parts)})")
    bad = sorted(k for k, v in state.items() if v.is_floating_point() and not
                 bool(torch.isfinite(v).all()))
    if bad:
        raise CheckpointError(f"{what}: non-finite weights (NaN or Inf) in the {part}: "
                              f"{', '.join(bad[:3])}"
                              f"{', ...' if len(bad) > 3 else ''}")


def _check_stats(saved: dict[str, Any], key: str, what: str, positive: bool) -> None:
    v = saved.get(key)
    ok = (isinstance(v, list | tuple) and len(v) == 3
          and all(isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)
                  and (x > 0 if positive else True) for x in v))
    if not ok:
        raise CheckpointError(f"{what}: '{key}' must be 3 finite numbers (one per colour "
                              f"channel{', each > 0' if positive else ''}), got {v!r:.80}")


def load_encoder_file(path: str | Path) -> dict[str, Any]:
    """An ``encoder.pt``, with every field checked against its config before any network is
    built: the weights' names and shapes, the feature width, the input normalisation and the
    image side.

    Raises:
        CheckpointError: missing, damaged, or a field that does not fit (names it).
    """
    saved = load_checkpoint(path)
    what = str(path)
    cfg = checkpoint_config(saved, path)
    shapes, feature_dim = _expected_state(cfg)
    _check_state_dict(saved.get("state_dict"), shapes, what)
    if saved.get("feature_dim") != feature_dim or isinstance(saved.get("feature_dim"), bool):
        raise CheckpointError(f"{what}: feature_dim {saved.get('feature_dim')!r:.40} does not "
                              f"match the model's {feature_dim}")
    _check_stats(saved, "mean", what, positive=False)
    _check_stats(saved, "std", what, positive=True)
    size = saved.get("image_size", 32)
    if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= 4096:
        raise CheckpointError(f"{what}: image_size must be an integer in [1, 4096], got "
                              f"{size!r:.40}")
    return saved


def check_model_size(cfg: Config, device: torch.device) -> None:
    """Refuse, before any work, a network whose weights, gradients and optimiser state cannot
    fit in this machine's memory (counted on the meta device: nothing is allocated).

    Raises:
        ConfigError: naming the sizes that make it too large.
    """
    with torch.device("meta"):
        encoder = build_encoder(cfg.model, cfg.width)
        head = ProjectionHead(encoder.feature_dim, cfg.proj_hidden, cfg.proj_dim)
    params = sum(p.numel() for m in (encoder, head) for p in m.parameters())
    need = params * 4 * 4  # weights, gradients, momentum, and the budget's throw-away copy
    total = (torch.cuda.get_device_properties(device).total_memory if device.type == "cuda"
             else physical_memory())
    if total is not None and need > 0.8 * total:
        raise ConfigError(f"{cfg.model} of --width {cfg.width} with a head of --proj-hidden "
                          f"{cfg.proj_hidden} and --proj-dim {cfg.proj_dim} has {params:,} "
                          f"parameters: training them needs about {need / 2**30:.1f} GiB, more "
                          f"than the {total / 2**30:.1f} GiB of {device.type} memory here")


def check_model_input(cfg: Config, image_size: int) -> None:
    """Refuse, before any work, views too small for the encoder (each pooling halves them).

    Tried on the meta device (nothing computed or allocated); the message names the smallest
    side that works.

    Raises:
        ConfigError: the views are too small.
    """
    side = cfg.view_size or image_size

    def fits(s: int) -> bool:
        try:
            with torch.device("meta"):
                build_encoder(cfg.model, min(cfg.width, 8))(torch.empty(2, 3, s, s))
            return True
        except RuntimeError:
            return False

    if fits(side):
        return
    smallest = next((s for s in range(side + 1, 257) if fits(s)), None)
    need = f"at least {smallest}x{smallest} px" if smallest else "larger views"
    where = f"--view-size {cfg.view_size}" if cfg.view_size else f"images of {side}x{side} px"
    raise ConfigError(f"{where}: too small for {cfg.model}, which needs {need}; set "
                      f"--view-size (or --image-size for image folders) to at least that")


def save_encoder(path: str | Path, encoder: Encoder, cfg: Config, mean: list[float],
                 std: list[float], image_size: int) -> None:
    """``encoder.pt``: weights, config, feature width, the input normalisation and the side of
    the images it was trained on."""
    from selfsup import __version__

    save_torch(dict(state_dict=encoder.state_dict(), config=cfg.to_dict(),
                    feature_dim=encoder.feature_dim, mean=mean, std=std, image_size=image_size,
                    version=__version__), path)


# --- the method -----------------------------------------------------------------------------


class _EncoderAndHead(nn.Module):
    """f then g as one module (what DDP wraps): views -> projections z."""

    def __init__(self, encoder: Encoder, head: nn.Module) -> None:
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(v))  # type: ignore[no-any-return]


class SimCLR:
    """The SimCLR method: two views of every image, one forward pass, NT-Xent, one update.

    Holds the encoder f, the projection head g and their optimiser; the loop around it owns the
    data order, the schedule and the checkpoints. In several processes (torchrun) the pair is
    wrapped in DistributedDataParallel, its batch norms are global (``sync_bn``) and the loss
    sees every process's projections (``dist.gather_with_grad``); each process passes its own
    share of the global batch.
    """

    def __init__(self, cfg: Config, device: torch.device, image_size: int, mean: list[float],
                 std: list[float], peak_lr: float, amp_dtype: torch.dtype | None) -> None:
        encoder = init_encoder(cfg)
        self.nhwc = use_channels_last(encoder, cfg.channels_last, device,
                                      verbose=dist.is_main())
        pair = _EncoderAndHead(prepare(encoder, device, self.nhwc),
                               prepare(init_head(cfg, encoder.feature_dim), device, False))
        if dist.world_size() > 1 and cfg.sync_bn:
            pair = dist.convert_batchnorm(pair, device)  # type: ignore[assignment]
        self.cfg, self.peak_lr = cfg, peak_lr
        self._adopt(pair)
        self.aug = AugmentParams.from_config(cfg, image_size)
        self.mean = torch.tensor(mean, device=device)
        self.std = torch.tensor(std, device=device)
        self.mem = torch.channels_last if self.nhwc else torch.contiguous_format
        self.temperature = cfg.temperature
        self.amp_dtype = amp_dtype
        self.device = device

    def _adopt(self, pair: _EncoderAndHead) -> None:
        self.pair = pair
        self.encoder, self.head = pair.encoder, pair.head
        self.opt = build_optimizer([self.encoder, self.head], self.cfg, self.peak_lr)
        self.net: nn.Module = pair
        if dist.world_size() > 1:
            from torch.nn.parallel import DistributedDataParallel

            dev = next(pair.parameters()).device
            self.net = DistributedDataParallel(pair, device_ids=[dev] if dev.type == "cuda"
                                               else None)

    def clone(self) -> SimCLR:
        """A throw-away copy (own weights, optimiser state and DDP wrapper) for timing steps."""
        new = copy.copy(self)
        new._adopt(copy.deepcopy(self.pair))
        new.opt.load_state_dict(self.opt.state_dict())
        return new

    def views(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """(B, 3, H, W) uint8 -> (2B, 3, S, S) normalised views; rows k and k+B pair up."""
        v1, v2 = two_views(x, self.aug, gen)  # 2 x (B, 3, S, S) in [0, 1]
        return normalize(torch.cat((v1, v2)), self.mean, self.std).contiguous(
            memory_format=self.mem)

    def update(self, v: torch.Tensor, lr: float) -> torch.Tensor:
        """One optimiser step on ready views (2B, 3, S, S); returns the detached loss."""
        for g in self.opt.param_groups:
            g["lr"] = lr
        b = v.shape[0] // 2
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            z = self.net(v)  # h: (2B, D) -> z: (2B, proj_dim)
            loss = nt_xent(z[:b], z[b:], self.temperature, gather_with_grad, dist.rank())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.detach()

    def step(self, x: torch.Tensor, lr: float, gen: torch.Generator) -> torch.Tensor:
        """Augment a uint8 batch (B, 3, H, W) and take one step; returns the detached loss."""
        return self.update(self.views(x, gen), lr)

    def train(self, mode: bool = True) -> None:
        self.encoder.train(mode)
        self.head.train(mode)

    def state_dict(self) -> dict[str, Any]:
        return dict(encoder=self.encoder.state_dict(), head=self.head.state_dict(),
                    optimizer=self.opt.state_dict())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.encoder.load_state_dict(state["encoder"])
        self.head.load_state_dict(state["head"])
        self.opt.load_state_dict(state["optimizer"])


def sync(device: torch.device) -> None:
    """Wait for queued device work, so wall-clock times mean something."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


# --- time budget ----------------------------------------------------------------------------


def measure_step_seconds(method: SimCLR, x_all: torch.Tensor, batch: int, seed: int,
                         warm: int = 3, timed: int = 8) -> float:
    """Median wall time of one full training step, on a throw-away copy of the method.

    The copy has its own random generator, so the real run's weights and random streams are
    exactly those of a run without the measurement.
    """
    probe = method.clone()
    probe.train()
    gen = torch.Generator(device=x_all.device).manual_seed(seed + 7919)
    idx = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(seed))
    times = []
    for i in range(warm + timed):
        j = idx[(i * batch) % max(1, len(x_all) - batch):][:batch].to(x_all.device)
        t0 = time.perf_counter()
        probe.step(x_all[j], 1e-6, gen)
        sync(x_all.device)
        if i >= warm:
            times.append(time.perf_counter() - t0)
    return float(sorted(times)[len(times) // 2])


def steps_for_budget(budget_s: float, step_s: float, steps_per_epoch: int,
                     checkpoint_s: float) -> int:
    """The number of steps that fit ``budget_s``, counting one checkpoint per epoch.

    A 6 % margin absorbs drift in speed over the run (seen here: a 2-core CPU measured at
    1,418 images/s for the first steps averaged 1,339 over 20 minutes).
    """
    per_step = step_s + checkpoint_s / max(1, steps_per_epoch)
    return max(1, int(0.94 * budget_s / per_step))


# --- the loop -------------------------------------------------------------------------------


@dataclass
class PretrainResult:
    encoder: Encoder
    config: Config  # the config as run (with steps fixed when a budget chose them)
    losses: list[float]
    steps: int
    epochs: float  # passes over the data completed
    seconds: float  # wall time of the training steps (this invocation)
    images_per_s: float  # images (pairs of views) per second over those steps
    precision: str
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    knn_history: list[dict[str, float]] = field(default_factory=list)  # {step, epoch, accuracy}
    knn_seconds: float = 0.0  # spent on those kNN checks (not in seconds or images_per_s)
    start_step: int = 0  # the step this invocation started from (> 0 when resumed)


class _Progress:
    """A tqdm bar on a terminal; a line every ``every`` steps elsewhere (logs stay readable)."""

    def __init__(self, total: int, initial: int, enabled: bool, every: int) -> None:
        self.tty = sys.stderr.isatty()
        self.enabled, self.every, self.total = enabled, every, total
        self.bar = None
        if enabled and self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
        self.t0, self.s0 = time.perf_counter(), initial

    def update(self, step: int, loss: float, lr: float, ips: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.3g}", img_s=f"{ips:.0f}")
        elif step % self.every == 0 or step == self.total:
            left = (self.total - step) * (time.perf_counter() - self.t0) / max(1, step - self.s0)
            print(f"step {step}/{self.total}  loss {loss:.4f}  lr {lr:.3g}  {ips:.0f} img/s  "
                  f"{left / 60:.1f} min left", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _StopOnSignal:
    """First Ctrl-C or SIGTERM: finish the current step, save, stop. A second one: stop at once.

    Stopping between steps keeps the checkpoint consistent (a step cut in half would leave
    batch-norm statistics or half the weights updated). SIGTERM is what ``timeout``, job
    schedulers and container runtimes send before they kill a job.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, announce: bool) -> None:
        self.requested = False
        self.signum: int = signal.SIGINT
        self.announce = announce
        self.previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise Interrupted(signum)
        self.requested, self.signum = True, signum
        if self.announce:
            name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            print(f"\n{name}: stopping after this step and saving ({name} again to abort)",
                  file=sys.stderr, flush=True)

    def __enter__(self) -> _StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handler) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def global_rng_state() -> dict[str, Any]:
    """Python's, NumPy's, torch's and the GPUs' global random states, in types that load with
    ``weights_only=True``. selfsup draws from its own seeded generators; these are saved so that
    code added around it (or a library) that draws from the global ones resumes exactly too."""
    import random

    _, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)  # type: ignore[misc]
    state: dict[str, Any] = dict(
        python=[list(t) if isinstance(t, tuple) else t for t in random.getstate()],
        numpy=dict(keys=torch.from_numpy(np.asarray(keys, dtype=np.int64)), pos=int(pos),
                   has_gauss=int(has_gauss), gauss=float(gauss)),
        torch=torch.get_rng_state())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_global_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``global_rng_state`` saved."""
    import random

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _restore(ck: dict[str, Any], path: Path, method: SimCLR, gen: torch.Generator, rank: int
             ) -> tuple[list[float], int, list[dict[str, float]]]:
    """Load a checkpoint's state into the method and the generators, after checking its fields.

    Returns:
        The loss history, the step and the kNN history.

    Raises:
        CheckpointError: a field missing, of the wrong type or shape (names it).
    """
    what = f"{path} is damaged"
    _check_state_dict(ck.get("encoder"), dict(method.encoder.state_dict()), what)
    _check_state_dict(ck.get("head"), dict(method.head.state_dict()), what, "projection head")
    step, losses = ck.get("step"), ck.get("losses")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"{what}: step must be a non-negative integer, got {step!r:.40}")
    if not isinstance(losses, list) or len(losses) != step or not all(
            isinstance(x, float | int) for x in losses):
        raise CheckpointError(f"{what}: the loss history does not hold one number per step")
    states = ck.get("gen_states") or [ck.get("gen_state")]
    if not isinstance(states, list) or len(states) <= rank or not isinstance(
            states[rank], torch.Tensor) or states[rank].dtype != torch.uint8:
        raise CheckpointError(f"{what}: no augmentation generator state for process {rank}")
    knn_history = ck.get("knn_history", [])
    if not isinstance(knn_history, list):
        raise CheckpointError(f"{what}: knn_history is not a list")
    try:
        method.load_state_dict(ck)
        gen.set_state(states[rank])
        rngs = ck.get("rng_all") or ([ck["rng"]] if "rng" in ck else [])
        if rngs:
            set_global_rng_state(rngs[rank])
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
        raise CheckpointError(f"{what}: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
                              ) from None
    return [float(x) for x in losses], step, list(knn_history)


def _epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The permutation of the data for one epoch: a function of (seed, epoch) only."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def pretrain(cfg: Config, data: ImageData, run_dir: str | Path, resume: bool = False
             ) -> PretrainResult:
    """Train encoder + projection head with NT-Xent on ``data.train_x`` (labels unused).

    With ``cfg.budget`` and no ``cfg.steps``, a short measurement on a throw-away copy picks the
    number of steps that fits the budget; it is written into the saved config, so that
    ``--steps N`` repeats the run exactly.

    Writes ``config.json`` (at start), ``checkpoint.pt`` (every epoch, on Ctrl-C),
    ``encoder.pt`` and ``loss.npy`` (at the end) into ``run_dir``.

    Raises:
        CheckpointError: ``resume`` without a checkpoint, or with a config that changes the run.
        SelfsupError: a non-finite loss (names the step).
        Interrupted: after saving a checkpoint on Ctrl-C or SIGTERM.
    """
    run_dir = Path(run_dir)
    device = dist.setup(select_device(cfg.device), cfg.dist_timeout)
    if cfg.threads:
        cpus = os.cpu_count() or 1
        if cfg.threads > cpus and dist.is_main():
            print(f"note: threads {cfg.threads} > this machine's {cpus} CPUs; using {cpus}",
                  flush=True)
        torch.set_num_threads(min(cfg.threads, cpus))
    amp_dtype, precision = select_precision(cfg.precision, device)
    main, world, rank = dist.is_main(), dist.world_size(), dist.rank()
    if main:
        procs = f", {world} processes" if world > 1 else ""
        print(f"device {device}, {torch.get_num_threads()} threads{procs}, precision: "
              f"{precision}", flush=True)

    if len(data.train_x) < 2:
        raise SelfsupError(f"{data.name} has {len(data.train_x)} training image(s); contrastive "
                           f"pretraining needs at least 2 (each image's negatives are the others)")
    x_all = data.train_x.to(device)  # (N, 3, H, W) uint8, resident
    n = x_all.shape[0]
    batch = min(cfg.batch_size, n)  # the global batch, over all processes
    if batch < cfg.batch_size and main:
        print(f"note: batch_size {cfg.batch_size} > {n} images; using {batch}", flush=True)
    if batch % world:
        raise ConfigError(f"batch_size {batch} is not divisible by the {world} processes")
    local = batch // world  # this process's share of every batch
    steps_per_epoch = n // batch
    peak_lr = cfg.lr * batch / 256
    mean, std = channel_stats(data.train_x)
    method = SimCLR(cfg, device, x_all.shape[-1], mean, std, peak_lr, amp_dtype)
    # Augmentation randomness: its own stream per process, derived from the seed and the rank.
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 1_000_003 * rank)
    losses: list[float] = []
    knn_history: list[dict[str, float]] = []
    step = 0
    monitor = None
    if cfg.knn_every and data.labeled:
        from selfsup.evaluate import KnnMonitor

        monitor = KnnMonitor(data, cfg.knn_monitor_size, cfg.knn_k, cfg.knn_t, cfg.seed,
                             cfg.eval_batch_size)
    monitor_s = 0.0

    def check_knn(at_step: int) -> float:
        """Append the monitor's kNN accuracy at ``at_step``; returns the seconds it took."""
        assert monitor is not None
        t0 = time.perf_counter()
        acc = monitor.accuracy(method.encoder, mean, std, device, method.nhwc)
        knn_history.append(dict(step=at_step, epoch=at_step / steps_per_epoch, accuracy=acc))
        return time.perf_counter() - t0

    ckpt_path = run_dir / CHECKPOINT
    if resume:
        ck = load_checkpoint(ckpt_path)
        old = checkpoint_config(ck, ckpt_path)
        changed = diff_keys(old, cfg)
        if changed:
            raise CheckpointError(
                f"cannot resume {ckpt_path}: the config differs in {', '.join(changed)} "
                f"(only epochs/steps and run-time settings may change)")
        saved_world = ck.get("world_size", 1)
        if saved_world != world:
            raise CheckpointError(
                f"cannot resume {ckpt_path} with {world} process(es): it was written by "
                f"{saved_world!r:.20}, and each process's augmentation stream is part of the "
                f"state. Resume with {saved_world!r:.20} process(es) (the same global batch).")
        losses, step, knn_history = _restore(ck, ckpt_path, method, gen, rank)
        if not cfg.steps and old.steps:  # a budgeted run keeps the steps it chose
            cfg = dataclasses.replace(cfg, steps=old.steps)
    if monitor is not None and step == 0 and main:
        monitor_s += check_knn(0)  # the starting point: the untrained encoder
    if not resume and cfg.budget and not cfg.steps:
        budget_s = parse_duration(cfg.budget) - monitor_s
        t0 = time.perf_counter()
        step_s = measure_step_seconds(method, x_all, batch, cfg.seed)
        t1 = time.perf_counter()
        if main:  # only rank 0 writes; its figures decide
            save_torch(dict(method.state_dict(), config=cfg.to_dict()), run_dir / ".timing.pt")
            (run_dir / ".timing.pt").unlink()
        ckpt_s = time.perf_counter() - t1
        left = budget_s - (time.perf_counter() - t0)
        steps = steps_for_budget(left, step_s, steps_per_epoch, ckpt_s)
        if monitor is not None:  # the kNN checks come out of the budget too
            checks = steps // (steps_per_epoch * cfg.knn_every)
            steps = steps_for_budget(left - checks * monitor_s, step_s, steps_per_epoch, ckpt_s)
        steps = dist.broadcast_object(steps)  # rank 0's measurement decides for all
        cfg = dataclasses.replace(cfg, steps=steps)
        if main:
            print(f"budget {cfg.budget}: {step_s * 1000:.0f} ms per step measured, so {steps} "
                  f"steps ({steps / steps_per_epoch:.1f} epochs); repeat with --steps {steps}",
                  flush=True)
    total = cfg.steps or cfg.epochs * steps_per_epoch
    warmup = min(total, round(cfg.warmup_epochs * steps_per_epoch))
    start_step = step
    if resume and main:
        print(f"resumed {ckpt_path} at step {step}/{total}", flush=True)
        if step >= total:
            print(f"note: nothing to train: the run is at step {step} of {total}; give more "
                  f"--epochs or --steps to extend it", flush=True)
    if main and not resume:  # the record of what was asked for; a resume adds to metrics.json
        save_json(cfg.to_dict(), run_dir / "config.json")

    saved_step = step if resume else 0

    def checkpoint(at_step: int, gen_state: torch.Tensor) -> None:
        nonlocal saved_step
        saved_step = at_step
        gen_states = dist.gather_objects(gen_state)  # every process's stream (collective)
        rngs = dist.gather_objects(global_rng_state())
        if main:
            save_torch(dict(method.state_dict(), gen_state=gen_states[0], gen_states=gen_states,
                            step=at_step, losses=losses, knn_history=knn_history,
                            config=cfg.to_dict(), rng=rngs[0], rng_all=rngs,
                            world_size=world), ckpt_path)

    progress = _Progress(total, step, cfg.progress and main, every=max(1, total // 50))
    method.train()
    train_time, images, order_epoch = 0.0, 0, -1
    order = torch.empty(0, dtype=torch.long)
    gen_state = gen.get_state()  # state at the start of step `step`
    with _StopOnSignal(announce=main) as stop:
        try:
            while step < total:
                epoch, i = divmod(step, steps_per_epoch)
                if epoch != order_epoch:
                    order, order_epoch = _epoch_order(cfg.seed, epoch, n).to(device), epoch
                t0 = time.perf_counter()
                lr = lr_at(step, total, warmup, peak_lr)
                idx = order[i * batch:(i + 1) * batch]  # (B,) the global batch
                idx = idx[rank * local:(rank + 1) * local]  # this process's share
                # The global loss (mean over processes); the float() syncs: the guard needs it.
                loss_value = dist.all_mean(float(method.step(x_all[idx], lr, gen)))
                if not math.isfinite(loss_value):
                    raise SelfsupError(
                        f"loss became {loss_value} at step {step + 1}; the last good checkpoint "
                        f"is kept. Try a lower lr (now {cfg.lr}) or --precision fp32.")
                losses.append(loss_value)
                step += 1
                gen_state = gen.get_state()  # state at the start of step `step`
                sync(device)
                train_time += time.perf_counter() - t0
                images += batch
                progress.update(step, loss_value, lr, images / max(train_time, 1e-9))
                epoch_end = step % steps_per_epoch == 0
                if world > 1:  # Ctrl-C reaches the processes at different steps: agree
                    stop.requested = dist.any_true(stop.requested)
                periodic = bool(cfg.checkpoint_every) and step % cfg.checkpoint_every == 0
                if monitor is not None and main and (step == total or epoch_end and (
                        step // steps_per_epoch) % cfg.knn_every == 0):
                    monitor_s += check_knn(step)  # embeds in eval mode, then restores train
                if epoch_end or periodic or step == total or stop.requested:
                    checkpoint(step, gen_state)
                if stop.requested and step < total:
                    raise Interrupted(stop.signum)
        except KeyboardInterrupt:
            progress.close()
            if main:
                print(f"\ninterrupted: checkpoint at step {saved_step}/{total} in {ckpt_path}; "
                      f"continue with --resume {run_dir}", file=sys.stderr, flush=True)
            raise
    progress.close()
    encoder = method.encoder.eval()
    if main:
        save_encoder(run_dir / ENCODER, encoder, cfg, mean, std, int(x_all.shape[-1]))
        save_npy(np.asarray(losses, dtype=np.float32), run_dir / "loss.npy")
    return PretrainResult(encoder, cfg, losses, step, step / steps_per_epoch, train_time,
                          images / max(train_time, 1e-9), precision, mean, std, knn_history,
                          monitor_s, start_step)


def machine_info(device: torch.device) -> dict[str, Any]:
    """What a speed figure depends on: CPU model and capability, threads, GPU, torch version."""
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info: dict[str, Any] = dict(
        cpu=cpu, cpu_capability=torch.backends.cpu.get_cpu_capability(),
        cpu_native_bf16=cpu_has_fast_bf16(), threads=torch.get_num_threads(),
        torch=torch.__version__, device=str(device), world_size=dist.world_size(),
    )
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def describe_machine(device: torch.device) -> str:
    """``machine_info`` as the line a benchmark prints beside its figures."""
    info = machine_info(device)
    return (f"machine: {info['cpu']}, capability {info['cpu_capability']}, native bf16 "
            f"{info['cpu_native_bf16']}, {info['threads']} threads, torch {info['torch']}, "
            f"device {device}{', ' + info['gpu'] if 'gpu' in info else ''}")
