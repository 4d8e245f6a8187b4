"""Pretraining: the loop, the time budget, progress and stopping on a signal.

The loop reads top to bottom: take a batch of indices from this epoch's permutation, hand it to
the method (``selfsup.methods``: it makes the views on the device and takes its step), record
the loss. It knows no method by name. A checkpoint is written atomically at the end of every
epoch (and on Ctrl-C); ``resume`` continues from it exactly. Nothing but the command line
imports this module.
"""

from __future__ import annotations

import copy
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
from selfsup.config import RANGES, Config, diff_keys, is_number, parse_duration
from selfsup.data import ImageData, Images, channel_stats
from selfsup.errors import CheckpointError, ConfigError, Interrupted, SelfsupError
from selfsup.files import save_json, save_npy, save_torch
from selfsup.hardware import keep_freed_memory, select_device, select_precision, sync
from selfsup.logs import RunLog
from selfsup.methods import METHODS, Method, build_method
from selfsup.models import Encoder
from selfsup.optim import lr_at, parse_replans, schedule_step
from selfsup.sizing import choose_size

# --- time budget ----------------------------------------------------------------------------

# Draw the next step's views before reading back this step's loss (None: on GPUs, where the
# draws' launches overlap the model's work; on the CPU nothing would overlap). Same run either way.
VIEWS_AHEAD: bool | None = None
MONITOR_SHARE = 0.1  # of a budget, the most the monitor checks may take (they are thinned)
BUDGET_MARGIN = 0.97  # of the time left, what the planned steps may take
REPLAN_SHARES = (0.5, 0.8, 0.95)  # a budgeted run replans at these shares of its budget...
REPLAN_TARGET = 0.99  # ... fitting its steps left to this share of the time left
TIMING_SECONDS = 20.0  # the budget times at most about this much of the run's first steps...
TIMING_MAX_STEPS = 200  # ... and at most this many
TIMING_MIN_STEPS = 11  # ... and at least this many; the mean is over the second half


def steps_for_budget(budget_s: float, step_s: float, steps_per_epoch: int,
                     checkpoint_s: float) -> int:
    """The number of steps that fit ``budget_s``, counting one checkpoint per epoch.

    The steps are timed on the run itself (``pretrain``), so a small margin (3 %) is enough for
    the drift of speed over a run.
    """
    per_step = step_s + checkpoint_s / max(1, steps_per_epoch)
    return max(1, int(BUDGET_MARGIN * budget_s / per_step))


def timed_mean(times: list[float]) -> float:
    """Mean seconds per step over the second half of the timed steps: the first steps of a run
    are slower than the rest, for a ViT by 9 % over its first 21 (BENCHMARKS.md)."""
    kept = times[len(times) // 2:]
    return sum(kept) / len(kept)


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
    knn_seconds: float = 0.0  # spent on the kNN and quality checks (not in seconds or images/s)
    start_step: int = 0  # the step this invocation started from (> 0 when resumed)
    budget: dict[str, Any] = field(default_factory=dict)  # how the budget was fitted and used
    # {step, epoch, rankme, feature_dim, alignment, uniformity} (selfsup.quality)
    quality_history: list[dict[str, float]] = field(default_factory=list)


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

    def update(self, step: int, loss: float, lr: float, ips: float, views: float) -> None:
        """``views``: the share of step time spent making the views (the augmentation): near 1,
        the CPU's augmentation is the bottleneck; near 0, the model is."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.3g}", img_s=f"{ips:.0f}",
                                 views=f"{views:.0%}")
        elif step % self.every == 0 or step == self.total:
            left = (self.total - step) * (time.perf_counter() - self.t0) / max(1, step - self.s0)
            print(f"step {step}/{self.total}  loss {loss:.4f}  lr {lr:.3g}  {ips:.0f} img/s  "
                  f"views {views:.0%} of step time  {left / 60:.1f} min left", file=sys.stderr,
                  flush=True)

    def set_total(self, total: int) -> None:
        self.total = total
        if self.bar is not None:
            self.bar.total = total
            self.bar.refresh()

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
    for key, fields in (("knn_history", ("step", "epoch", "accuracy")),
                        ("quality_history", ("step", "epoch", "rankme", "alignment",
                                             "uniformity", "feature_dim"))):
        history = ck.get(key, [])
        if not isinstance(history, list) or not all(
                isinstance(e, dict) and all(is_number(e.get(f)) for f in fields)
                for e in history):
            raise CheckpointError(f"{what}: {key} is not a list of records of numbers "
                                  f"({', '.join(fields)})")
    knn_history = ck.get("knn_history", [])
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


def _fit_budget(cfg: Config, method: Method, take_step: Any, gen: torch.Generator,
                losses: list[float], t_start: float, check_s: float, steps_per_epoch: int,
                run_dir: Path, main: bool) -> tuple[Config, int, dict[str, Any]]:
    """Fix the number of steps that fills ``cfg.budget``, timed on the run's own first steps.

    The first steps of warm-up (inside the first epoch) take the same batches, views and
    learning rates whatever the total, and no checkpoint or kNN check falls among them; for a
    method whose steps do not read ``progress`` they are the run's first steps and are kept.
    Otherwise (a momentum schedule over the run, no warm-up, a total that ends inside the
    window) the timed steps are undone, state and random streams included. Either way the run
    equals ``--steps N`` with the N printed and saved.

    Args:
        take_step: ``take_step(step, total, warmup)``, the loop's step (appends to ``losses``).
        t_start: when the budget started (``time.perf_counter()``).
        check_s: seconds of one monitor check (kNN, label-free signals), charged to the budget
            per check (0: no monitor).
    Returns:
        The config with ``steps`` fixed, the step the run continues from, and the figures of
        the fit (for ``metrics.json``).
    """
    budget_s = parse_duration(cfg.budget)
    warmup_full = round(cfg.warmup_epochs * steps_per_epoch)
    window = min(warmup_full, steps_per_epoch - 1, TIMING_MAX_STEPS)
    keep = method.progress_free and window >= TIMING_MIN_STEPS
    if not keep:
        window = TIMING_MIN_STEPS
    snapshot = (copy.deepcopy(method.state_dict()), gen.get_state(), global_rng_state())
    if main:
        print(f"budget {cfg.budget}: timing the run's first steps", flush=True)
    times: list[float] = []
    step = 0
    while step < window:  # the total is not known yet: no step here depends on it
        t0 = time.perf_counter()
        take_step(step, 2**62, warmup_full)
        times.append(time.perf_counter() - t0)
        step += 1
        enough = step >= TIMING_MIN_STEPS and sum(times) >= TIMING_SECONDS
        if dist.any_true(enough):  # every process takes the same steps
            break
    step_s = timed_mean(times)
    t1 = time.perf_counter()
    if main:  # the time of one checkpoint, from a throw-away one
        save_torch(dict(method.state_dict(), config=cfg.to_dict()), run_dir / ".timing.pt")
        (run_dir / ".timing.pt").unlink()
    ckpt_s = time.perf_counter() - t1

    knn_every, checks = cfg.knn_every, 0

    def fit(left: float) -> int:
        """Steps that fill ``left`` seconds with the monitor checks that will run among them;
        the checks are thinned (every 2, 4, ... times as many epochs) until they take at most
        ``MONITOR_SHARE`` of it: on a small data set an epoch is a step or two, and a check
        every epoch would eat the budget."""
        nonlocal knn_every, checks
        steps = steps_for_budget(left, step_s, steps_per_epoch, ckpt_s)
        if check_s:  # the monitor checks that will run come out of the budget too
            knn_every = cfg.knn_every
            while True:
                every = steps_per_epoch * knn_every
                checks = steps // every + (steps % every > 0)
                if checks * check_s <= MONITOR_SHARE * left or every >= steps:
                    break
                knn_every *= 2
            steps = steps_for_budget(left - checks * check_s, step_s, steps_per_epoch, ckpt_s)
        return steps

    total = step + fit(budget_s - (time.perf_counter() - t_start))
    keep = bool(dist.broadcast_object(keep and total >= max(warmup_full, step + 1)))
    if not keep:  # undo the timed steps
        state, gen_state, rng = snapshot
        method.load_state_dict(state)
        gen.set_state(gen_state)
        set_global_rng_state(rng)
        del losses[:]
        step = 0
        total = fit(budget_s - (time.perf_counter() - t_start))
    total, knn_every = dist.broadcast_object((total, knn_every))  # rank 0's decides for all
    if knn_every != cfg.knn_every and main:
        print(f"budget {cfg.budget}: monitor checks every {knn_every} epochs, not "
              f"{cfg.knn_every}: at {check_s:.1f} s each they would take more than "
              f"{MONITOR_SHARE:.0%} of the budget", flush=True)
    cfg = _budget_steps(cfg, total, step_s, knn_every=knn_every)
    if main:
        print(f"budget {cfg.budget}: {step_s * 1000:.0f} ms per step over the first "
              f"{len(times)} steps ({'kept' if keep else 'undone'}), so {total} steps "
              f"({total / steps_per_epoch:.1f} epochs), replanned from the run's own speed at "
              f"{', '.join(f'{x:.0%}' for x in REPLAN_SHARES)} of the budget", flush=True)
    return cfg, step, dict(budget_s=budget_s, timed_steps=len(times), step_s=step_s,
                           check_s=check_s, checks=checks,
                           checkpoint_s=ckpt_s, timed_steps_kept=keep, steps=total,
                           planned_steps=total,
                           kept_seconds=sum(times) if keep else 0.0)


def _replan(cfg: Config, budget: dict[str, Any], step: int, total: int, per_step: float,
            left_s: float, run_dir: Path, main: bool) -> Config:
    """Refit the steps left to the time left, at the run's own recent speed.

    A speed timed over the first seconds of a run drifts over the rest of it: on a 2-core
    virtual machine the hypervisor took from nothing to half of the CPU time for minutes at a
    time, single epochs of one run differed by half, and budgets fitted on the first steps
    alone ended between 88 and 107 %. At each of ``REPLAN_SHARES`` of the budget (or of the
    steps, when those come first), the wall time per step since the last fit (monitor checks
    and checkpoints included) fits the rest; the schedule's remaining part is spread over the
    new number of steps (``optim.schedule_step``), and ``cfg.replans`` records where and from
    what total, so that ``--steps N --replans ...`` repeats the run exactly.

    Args:
        per_step: wall seconds per step since the last fit.
        left_s: the budget left, less what the end of the run still takes.
    Returns:
        ``cfg`` with the new ``steps`` and the replan added to ``replans`` (unchanged when the
        steps left stay the same); ``budget["replans"]`` gets the record.
    """
    new_total = step + max(1, int(REPLAN_TARGET * left_s / per_step))
    new_total = int(dist.broadcast_object(new_total))  # rank 0's decides for all
    budget.setdefault("replans", []).append(dict(at_step=step, planned_steps=total,
                                                 steps=new_total, step_s=per_step))
    budget["steps"] = new_total
    if new_total == total:
        return cfg
    knots = f"{cfg.replans + ',' if cfg.replans else ''}{step}:{total}"
    cfg = _budget_steps(cfg, new_total, per_step, replans=knots)
    if main:
        print(f"budget {cfg.budget}: {per_step * 1000:.0f} ms per step lately (planned at "
              f"{budget['step_s'] * 1000:.0f} ms): the {total - step} steps left become "
              f"{new_total - step}, the schedule's rest spread over them", flush=True)
        save_json(cfg.to_dict(), run_dir / "config.json")  # the config that repeats the run
    return cfg


def _views_grid(x_all: Images, method: Method, seed: int, n: int = 8) -> np.ndarray:
    """(H, W, 3) image in [0, 1]: ``n`` training images (top row) and two views of each,
    drawn with their own generator (the run's streams are not touched)."""
    from selfsup.augment import augment

    x = x_all[torch.linspace(0, len(x_all) - 1, n).long().to(x_all.device)].cpu()  # (n,3,H,W)
    g = torch.Generator().manual_seed(seed + 37)
    v = augment(x, method.aug, g, views=2).float()  # (2n, 3, S, S) in [0, 1]
    side = v.shape[-1]
    orig = torch.nn.functional.interpolate(x.float() / 255, size=(side, side), mode="bilinear",
                                           antialias=True, align_corners=False)
    rows = [torch.cat(list(r), dim=2) for r in (orig, v[:n], v[n:])]  # (3, S, n*S) each
    return torch.cat(rows, dim=1).permute(1, 2, 0).clamp(0, 1).numpy()  # (3S, nS, 3)


def _compare_sizing(sizing: dict[str, Any], run_step_s: float, main: bool) -> dict[str, Any]:
    """The sizing's timing of the encoder it chose beside the run's own timing of the same
    network (the mean of all its steps), printed and recorded: the sizing's choice is only as
    good as its timings, so their agreement is part of the record."""
    chosen = [r for r in sizing.get("rows", []) if r.get("size") == sizing.get("chosen")]
    if not chosen:
        return sizing
    rung_s = float(chosen[0]["step_s"])
    ratio = rung_s / run_step_s if run_step_s > 0 else float("nan")
    if main:
        print(f"sizing timed {sizing['chosen']} at {1000 * rung_s:.1f} ms per step; the run's "
              f"own steps took {1000 * run_step_s:.1f} ms on average ({100 * (ratio - 1):+.1f} "
              f"%)", flush=True)
    return dict(sizing, run_step_s=run_step_s, rung_over_run=ratio)


def repeat_options(cfg: Config) -> str:
    """The options that repeat a budgeted run without its budget: its steps, its replan and
    the encoder its sizing chose."""
    text = f"--steps {cfg.steps}" + (f" --replans {cfg.replans}" if cfg.replans else "")
    if cfg.auto_size:
        text += f" --model {cfg.model} --width {cfg.width} --view-size {cfg.view_size}"
    return text


def _lr(cfg: Config, step: int, total: int, warmup: int, peak: float) -> float:
    """The learning rate of step ``step`` of ``total`` on ``cfg``'s schedule (replan included)."""
    return lr_at(*schedule_step(step, total, parse_replans(cfg.replans)), warmup, peak)


def _budget_steps(cfg: Config, steps: int, step_s: float, **changes: Any) -> Config:
    """``cfg`` with the steps a budget fitted at ``step_s`` seconds per step (checked by
    ``_with_steps``) and the other settings the fit chose."""
    why = f"--budget {cfg.budget} at {step_s * 1000:.3g} ms per step"
    return dataclasses.replace(_with_steps(cfg, steps, why), **changes)


def _with_steps(cfg: Config, steps: int, why: str) -> Config:
    """``cfg`` with ``steps`` fixed, checked against the range a config accepts (so that the
    checkpoint written with it loads again).

    Raises:
        ConfigError: more steps than a run may take (says what bought them).
    """
    top = int(RANGES["steps"].hi)
    if steps > top:
        raise ConfigError(f"{why} buys {steps:,} steps, more than the {top:,} a run may take; "
                          f"give a shorter --budget, or --steps")
    return dataclasses.replace(cfg, steps=steps)


def _extension(cfg: Config, old: Config, ck: dict[str, Any], step: int, steps_per_epoch: int,
               main: bool) -> Config:
    """The config a resumed run continues with: ``--steps`` given wins; a new ``--budget`` adds
    that much time at the run's own seconds per step; ``--epochs`` given counts epochs (a
    budgeted run's fixed steps included); otherwise the run keeps the steps it had.

    Raises:
        ConfigError: a new budget for a checkpoint that does not record its step time.
    """
    if cfg.steps != old.steps:
        return cfg
    if cfg.budget and cfg.budget != old.budget:
        per_step = ck.get("seconds_per_step")
        if not isinstance(per_step, float) or per_step <= 0:
            raise ConfigError(f"--budget {cfg.budget}: this checkpoint does not record its "
                              f"step time (written by an older selfsup); extend the run with "
                              f"--steps or --epochs")
        more = max(1, int(BUDGET_MARGIN * parse_duration(cfg.budget) / per_step))
        if main:
            print(f"budget {cfg.budget} more: {more} steps at this run's {per_step * 1000:.0f} "
                  f"ms per step", flush=True)
        return _with_steps(cfg, step + more, f"--budget {cfg.budget} at this run's "
                                             f"{per_step * 1000:.3g} ms per step")
    if cfg.epochs != old.epochs:
        return dataclasses.replace(cfg, steps=0)
    if not cfg.steps and old.steps:  # a budgeted run keeps the steps it chose
        return dataclasses.replace(cfg, steps=old.steps)
    return cfg


def _epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The permutation of the data for one epoch: a function of (seed, epoch) only."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def pretrain(cfg: Config, data: ImageData, run_dir: str | Path, resume: bool = False
             ) -> PretrainResult:
    """Train the configured method's networks on ``data.train_x`` and ``data.unlabeled_x``
    (labels unused).

    With ``cfg.budget`` and no ``cfg.steps``, the encoder is sized to the machine when
    ``cfg.auto_size`` (``selfsup.sizing``), then the run's first steps are timed and fix the
    number of steps that fits the budget (``_fit_budget``); it is written into the saved
    config, so that ``--steps N`` repeats the run exactly.

    Writes ``config.json`` (at start), ``checkpoint.pt`` (every epoch, on Ctrl-C),
    ``encoder.pt`` and ``loss.npy`` (at the end) into ``run_dir``.

    Raises:
        CheckpointError: ``resume`` without a checkpoint, or with a config that changes the run.
        SelfsupError: a non-finite loss (names the step).
        Interrupted: after saving a checkpoint on Ctrl-C or SIGTERM.
    """
    run_dir = Path(run_dir)
    keep_freed_memory()
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

    if data.pretrain_size < 2:
        raise SelfsupError(f"{data.name} has {data.pretrain_size} training image(s); contrastive "
                           f"pretraining needs at least 2 (each image's negatives are the others)")
    # (N, 3, H, W) uint8, resident: the training images, then any unlabeled ones
    x_all = data.pretrain_images().to(device)
    n = x_all.shape[0]
    batch = min(cfg.batch_size, n)  # the global batch, over all processes
    if batch < cfg.batch_size:  # recorded as run: config.json, checkpoints and the report
        if main:
            print(f"note: batch_size {cfg.batch_size} > {n} images; using {batch}", flush=True)
        cfg = dataclasses.replace(cfg, batch_size=batch)
    if batch % world:
        raise ConfigError(f"batch_size {batch} is not divisible by the {world} processes")
    local = batch // world  # this process's share of every batch
    steps_per_epoch = n // batch
    peak_lr = cfg.lr * batch / 256
    mean, std = channel_stats(data.train_x)
    t_start = time.perf_counter()  # the budget counts from here: sizing, kNN checks, steps
    sizing: dict[str, Any] = {}
    if not resume and cfg.budget and not cfg.steps and cfg.auto_size:
        cfg, sizing = choose_size(cfg, x_all, mean, std, amp_dtype, batch,
                                  parse_duration(cfg.budget), main)
    method = build_method(cfg, device, x_all.shape[-1], mean, std, peak_lr, amp_dtype, batch)
    # Augmentation randomness: its own stream per process, derived from the seed and the rank.
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 1_000_003 * rank)
    losses: list[float] = []
    knn_history: list[dict[str, float]] = []
    step = 0
    monitor = quality = None
    if cfg.knn_every and data.labeled and main:
        from selfsup.evaluate import KnnMonitor

        monitor = KnnMonitor(data, cfg.knn_monitor_size, cfg.knn_k, cfg.knn_t, cfg.seed,
                             cfg.eval_batch_size)
    if cfg.knn_every and main:  # the label-free signals, on the same schedule, labels or not
        from selfsup.quality import MONITOR_IMAGES, QualityMonitor

        quality = QualityMonitor(x_all, min(MONITOR_IMAGES, n), cfg.seed, cfg.eval_batch_size)
    monitored = monitor is not None or quality is not None
    monitor_s = 0.0

    def measure_monitors() -> dict[str, float]:
        """The monitors' values now: kNN accuracy where there are labels, the label-free
        signals always. Eval mode, no_grad and their own generators: the run's state is not
        touched, and nothing is recorded."""
        values: dict[str, float] = {}
        if monitor is not None:
            values["knn"] = monitor.accuracy(method.encoder, mean, std, device, method.nhwc)
        if quality is not None:
            values.update(quality.measure(method))
        return values

    def check_knn(at_step: int) -> float:
        """The monitors' checks at ``at_step``, appended to their histories and the log;
        returns the seconds taken."""
        t0 = time.perf_counter()
        epoch = at_step / steps_per_epoch
        values = measure_monitors()
        if monitor is not None:
            knn_history.append(dict(step=at_step, epoch=epoch, accuracy=values["knn"]))
        if quality is not None:
            quality.record(at_step, epoch, values)
        log.check(at_step, epoch, {k: v for k, v in values.items() if k != "feature_dim"})
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
        if quality is not None:
            quality.history = list(ck.get("quality_history", []))
        cfg = _extension(cfg, old, ck, step, steps_per_epoch, main)
        old_total = old.steps or old.epochs * steps_per_epoch
        seconds_per_step = float(ck.get("seconds_per_step") or 0.0)
    else:
        old_total, seconds_per_step = 0, 0.0
    log = RunLog(run_dir, step, cfg.log == "tensorboard", main)
    if monitored and step == 0:
        monitor_s += check_knn(0)  # the starting point: the untrained encoder
    if step == 0 and log.writer is not None:
        log.image("augmentations", _views_grid(x_all, method, cfg.seed))
    order_cache: dict[int, torch.Tensor] = {}
    # Steps taken and not yet logged: (steps done, lr, loss, seconds, seconds making views).
    pending: list[tuple[int, float, float, float, float]] = []

    # On a GPU the next step's views are drawn while the device still runs this step's update
    # (before the loss is read back, which waits for it): their launches, a few hundred small
    # kernels, then overlap the model's work instead of adding to it. The draws from ``gen``
    # come in the same order either way, so the run is the same; the views ahead are used only
    # for that step and that generator state (the budget's undo resets both).
    ahead: dict[str, Any] = {}
    draw_ahead = VIEWS_AHEAD if VIEWS_AHEAD is not None else device.type != "cpu"

    def draw_views(at: int) -> tuple[torch.Tensor, list[Any], float]:
        """Step ``at``'s views; the CUDA events around them (none elsewhere); host seconds."""
        epoch, i = divmod(at, steps_per_epoch)
        if epoch not in order_cache:  # one permutation per epoch, a function of (seed, epoch)
            order_cache.clear()
            order_cache[epoch] = _epoch_order(cfg.seed, epoch, n).to(device)
        idx = order_cache[epoch][i * batch:(i + 1) * batch]  # (B,) the global batch
        idx = idx[rank * local:(rank + 1) * local]  # this process's share
        t0 = time.perf_counter()
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(2)] \
            if device.type == "cuda" else []
        if marks:
            marks[0].record()
        v = method.views(x_all[idx], gen)  # (2B, 3, S, S)
        if marks:
            marks[1].record()
        return v, marks, time.perf_counter() - t0

    def ahead_is_current() -> bool:
        """Views were drawn ahead and the stream is where drawing them left it."""
        return bool(ahead) and torch.equal(ahead["after"], gen.get_state())

    def state_at_step() -> torch.Tensor:
        """The augmentation stream's state at the start of the next step to take."""
        return ahead["before"] if ahead_is_current() else gen.get_state()

    def take_step(at: int, total: int, warmup: int) -> float:
        """Step ``at`` of ``total`` (its batch, learning rate, views, update); appends the loss.

        Raises:
            SelfsupError: a non-finite loss.
        """
        where, plan = schedule_step(at, total, parse_replans(cfg.replans))
        lr = lr_at(where, plan, warmup, peak_lr)
        t0 = time.perf_counter()
        if ahead.get("step") == at and ahead_is_current():
            v, marks, views_s = ahead["views"]
        else:
            v, marks, views_s = draw_views(at)
        ahead.clear()
        loss = method.update(v, lr, where / plan)
        del v
        if draw_ahead and at + 1 < total:
            before = gen.get_state()
            ahead.update(step=at + 1, views=draw_views(at + 1), before=before,
                         after=gen.get_state())
        # The global loss (mean over processes); the float() syncs: the guard needs it.
        loss_value = dist.all_mean(float(loss))
        if marks:  # the device's own time for the views (the host's is only their launch)
            views_s = marks[0].elapsed_time(marks[1]) / 1000
        pending.append((at + 1, lr, loss_value, time.perf_counter() - t0, views_s))
        if not math.isfinite(loss_value):
            raise SelfsupError(
                f"loss became {loss_value} at step {at + 1}; the last good checkpoint "
                f"is kept. Try a lower lr (now {cfg.lr}) or --precision fp32.")
        losses.append(loss_value)
        return lr

    views_time = 0.0  # of the steps logged in this invocation: seconds spent making views

    def log_steps(upto: int) -> None:
        """Write the pending steps up to ``upto`` steps done to the log; drop the rest (the
        budget's timed steps, when it undoes them)."""
        nonlocal views_time
        for done, lr_, loss_, seconds, views_s in pending:
            if done <= upto:
                views_time += views_s
                log.step(done, done / steps_per_epoch, lr_, loss_, batch / max(seconds, 1e-9),
                         views_s / max(seconds, 1e-9))
        pending.clear()

    start_step = step
    budget: dict[str, Any] = {}
    if not resume and cfg.budget and not cfg.steps:
        check_s = 0.0
        if monitored:
            # A second check, timed and dropped: the first carries one-time costs (kernels
            # chosen, memory mapped) that charged to every check left 8 % of a budget unspent.
            t0 = time.perf_counter()
            measure_monitors()
            check_s = time.perf_counter() - t0
            monitor_s += check_s
        cfg, step, budget = _fit_budget(cfg, method, take_step, gen, losses, t_start, check_s,
                                        steps_per_epoch, run_dir, main)
        log_steps(step)  # the timed steps the run kept (none when undone)
    total = cfg.steps or cfg.epochs * steps_per_epoch
    warmup = min(total, round(cfg.warmup_epochs * steps_per_epoch))
    if resume and main:
        print(f"resumed {ckpt_path} at step {step}/{total}", flush=True)
        if step >= total:
            print(f"note: nothing to train: the run is at step {step} of {total}; extend it "
                  f"with more --epochs, more --steps or a new --budget (more time)", flush=True)
        elif total != old_total:  # the schedule is stretched (or shortened) to the new total
            print(f"the schedule now ends at step {total} (it ended at {old_total}): the "
                  f"learning rate continues from {_lr(cfg, step, total, warmup, peak_lr):.3g} "
                  f"at step {step} (it was {_lr(cfg, step, old_total, warmup, peak_lr):.3g} "
                  f"there) and "
                  f"decays to 0 by step {total}", flush=True)
    if main and not resume:  # the record of what was asked for; a resume adds to metrics.json
        save_json(cfg.to_dict(), run_dir / "config.json")

    saved_step = step if resume else 0

    def checkpoint(at_step: int, gen_state: torch.Tensor) -> None:
        nonlocal saved_step
        saved_step = at_step
        gen_states = dist.gather_objects(gen_state)  # every process's stream (collective)
        rngs = dist.gather_objects(global_rng_state())
        if main:
            per_step = train_time / max(1, at_step - start_step) if at_step > start_step \
                else float(seconds_per_step)
            save_torch(dict(method.state_dict(), gen_state=gen_states[0], gen_states=gen_states,
                            seconds_per_step=per_step,
                            step=at_step, losses=losses, knn_history=knn_history,
                            quality_history=[] if quality is None else quality.history,
                            config=cfg.to_dict(), rng=rngs[0], rng_all=rngs,
                            world_size=world), ckpt_path)

    progress = _Progress(total, step, cfg.progress and main, every=max(1, total // 50))
    method.train()
    train_time = budget.get("kept_seconds", 0.0)  # the timed steps the run kept
    images = (step - start_step) * batch
    gen_state = state_at_step()  # state at the start of step `step`
    t_fit, fit_step = time.perf_counter(), step  # a budget's replan times the steps since

    def replan_due(at: int, total: int) -> bool:
        """At the next of ``REPLAN_SHARES`` of the budget (or of the steps, if sooner)."""
        done = len(budget.get("replans", []))
        if not budget or done == len(REPLAN_SHARES) or not warmup <= at < total - 1 \
                or at - fit_step < 3:
            return False
        share = REPLAN_SHARES[done]
        return bool(dist.any_true(time.perf_counter() - t_start >= share * budget["budget_s"]
                                  or at >= share * total))

    with _StopOnSignal(announce=main) as stop:
        try:
            while step < total:
                t0 = time.perf_counter()
                lr = take_step(step, total, warmup)
                loss_value = losses[-1]
                step += 1
                gen_state = state_at_step()  # state at the start of step `step`
                sync(device)
                train_time += time.perf_counter() - t0
                images += batch
                log_steps(step)
                progress.update(step, loss_value, lr, images / max(train_time, 1e-9),
                                views_time / max(train_time, 1e-9))
                epoch_end = step % steps_per_epoch == 0
                if world > 1:  # Ctrl-C reaches the processes at different steps: agree
                    stop.requested = dist.any_true(stop.requested)
                periodic = bool(cfg.checkpoint_every) and step % cfg.checkpoint_every == 0
                if monitored and (step == total or epoch_end and (
                        step // steps_per_epoch) % cfg.knn_every == 0):
                    monitor_s += check_knn(step)  # embeds in eval mode, then restores train
                if epoch_end or periodic or step == total or stop.requested:
                    checkpoint(step, gen_state)
                if stop.requested and step < total:
                    raise Interrupted(stop.signum)
                if replan_due(step, total):
                    now = time.perf_counter()
                    left = budget["budget_s"] - (now - t_start) - budget["check_s"]
                    cfg = _replan(cfg, budget, step, total, (now - t_fit) / (step - fit_step),
                                  left, run_dir, main)
                    t_fit, fit_step = now, step
                    total = cfg.steps
                    progress.set_total(total)
        except KeyboardInterrupt:
            progress.close()
            if main:
                print(f"\ninterrupted: checkpoint at step {saved_step}/{total} in {ckpt_path}; "
                      f"continue with --resume {run_dir}", file=sys.stderr, flush=True)
            raise
        finally:
            log.close()
    progress.close()
    encoder = method.encoder.eval()
    if main:
        save_encoder(run_dir / ENCODER, encoder, cfg, mean, std, int(x_all.shape[-1]))
        save_npy(np.asarray(losses, dtype=np.float32), run_dir / "loss.npy")
    if budget:
        budget["size"] = _compare_sizing(sizing, train_time / max(1, step - start_step), main)
        budget["used_s"] = time.perf_counter() - t_start
        budget["used_fraction"] = budget["used_s"] / budget["budget_s"]
        if main:
            print(f"budget {cfg.budget}: pretraining took {budget['used_s'] / 60:.1f} min, "
                  f"{100 * budget['used_fraction']:.1f} % of it; repeat with "
                  f"{repeat_options(cfg)}", flush=True)
    return PretrainResult(encoder, cfg, losses, step, step / steps_per_epoch, train_time,
                          images / max(train_time, 1e-9), precision, mean, std, knn_history,
                          monitor_s, start_step, budget,
                          [] if quality is None else quality.history)
