"""Pretraining: the loop, the time budget, progress and stopping on a signal.

The loop reads top to bottom: take a batch of indices from this epoch's permutation, hand it to
the method (``selfsup.methods``: it makes the views on the device and takes its step), record
the loss. It knows no method by name. A checkpoint is written atomically at the end of every
epoch (and on Ctrl-C); ``resume`` continues from it exactly. Nothing but the command line
imports this module.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from selfsup import dist
from selfsup.checkpoint import (
    CHECKPOINT,
    ENCODER,
    check_state_dict,
    checkpoint_config,
    global_rng_state,
    load_checkpoint,
    save_encoder,
    set_global_rng_state,
)
from selfsup.config import Config, diff_keys, parse_duration
from selfsup.data import ImageData, channel_stats, physical_memory
from selfsup.errors import CheckpointError, ConfigError, Interrupted, SelfsupError
from selfsup.files import save_json, save_npy, save_torch
from selfsup.hardware import select_device, select_precision, sync
from selfsup.methods import METHODS, Method, build_method
from selfsup.models import Encoder, ProjectionHead, build_encoder
from selfsup.optim import lr_at

# --- model construction ---------------------------------------------------------------------


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
    # weights, gradients, momentum, the budget's throw-away copy, and a method's target copies
    need = params * 4 * (4 + 2 * METHODS[cfg.method].target_copies)
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


# --- time budget ----------------------------------------------------------------------------


def measure_step_seconds(method: Method, x_all: torch.Tensor, batch: int, seed: int,
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


def _restore(ck: dict[str, Any], path: Path, method: Method, gen: torch.Generator, rank: int
             ) -> tuple[list[float], int, list[dict[str, float]]]:
    """Load a checkpoint's state into the method and the generators, after checking its fields.

    Returns:
        The loss history, the step and the kNN history.

    Raises:
        CheckpointError: a field missing, of the wrong type or shape (names it).
    """
    what = f"{path} is damaged"
    for name, module in method.networks().items():  # every network and buffer of the method
        part = "projection head" if name == "head" else name.replace("_", " ")
        check_state_dict(ck.get(name), dict(module.state_dict()), what, part)
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
    """Train the configured method's networks on ``data.train_x`` (labels unused).

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
              f"{precision}\nmethod {cfg.method}: saves and evaluates "
              f"{METHODS[cfg.method].evaluated}", flush=True)

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
    method = build_method(cfg, device, x_all.shape[-1], mean, std, peak_lr, amp_dtype, batch)
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
                loss_value = dist.all_mean(float(method.step(x_all[idx], lr, gen, step / total)))
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
