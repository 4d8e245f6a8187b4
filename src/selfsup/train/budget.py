"""The time budget: how many steps fit it, timed on the run's own first steps, and the replans
that refit the rest of the run to the time left at the run's recent speed.

Every function here is a function of measured times; none takes a step itself except
``fit_budget``, which is handed the loop's step.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from selfsup import dist
from selfsup.checkpoint import global_rng_state, set_global_rng_state
from selfsup.config import MIN_STEPS, RANGES, Config, parse_duration, parse_replans
from selfsup.errors import ConfigError
from selfsup.files import save_json, save_torch
from selfsup.methods import Method
from selfsup.optim import lr_at, schedule_step

MONITOR_SHARE = 0.1  # of a budget, the most the monitor checks may take (they are thinned)
BUDGET_MARGIN = 0.97  # of the time left, what the planned steps may take
REPLAN_SHARES = (0.5, 0.8, 0.95)  # a budgeted run replans at these shares of its budget...
REPLAN_TARGET = 0.99  # ... fitting its steps left to this share of the time left
TIMING_SECONDS = 20.0  # the budget times at most about this much of the run's first steps...
TIMING_SHARE = 0.05  # ... or this share of the budget, when that is less...
TIMING_MAX_STEPS = 200  # ... and at most this many
TIMING_MIN_STEPS = 11  # ... and at least this many; the mean is over the second half
# Unless --checkpoint-every says otherwise, the loop checkpoints at the end of an epoch once
# this many seconds have passed since the last: on a GPU an epoch of CIFAR-10 takes ~2.4 s and
# a checkpoint every epoch (0.16-0.20 s) cost ~6 % of the run (BENCHMARKS.md, "Checkpoints by
# time").
CHECKPOINT_SECONDS = 30.0

# The loop's step: ``take_step(step, total, warmup)`` takes step ``step`` of ``total`` (its
# batch, views, learning rate and update), appends its loss and returns the learning rate.
StepFn = Callable[[int, int, int], float]


def checkpoint_steps(step_s: float, steps_per_epoch: int, checkpoint_every: int) -> int:
    """About how many steps a run takes between checkpoints: ``checkpoint_every``, or (0) the
    whole epochs that last ``CHECKPOINT_SECONDS`` at ``step_s`` seconds a step (the loop
    checkpoints at the first epoch's end that long after the last checkpoint)."""
    if checkpoint_every:
        return checkpoint_every
    epoch_s = max(step_s * steps_per_epoch, 1e-9)
    return max(1, steps_per_epoch) * max(1, math.ceil(CHECKPOINT_SECONDS / epoch_s))


def steps_for_budget(budget_s: float, step_s: float, checkpoint_every: int,
                     checkpoint_s: float) -> int:
    """The number of steps that fit ``budget_s``, counting a checkpoint of ``checkpoint_s``
    seconds every ``checkpoint_every`` steps.

    The steps are timed on the run itself, so a small margin (``BUDGET_MARGIN``) is enough for
    the drift of speed over a run; the replans take care of the rest.
    """
    per_step = step_s + checkpoint_s / max(1, checkpoint_every)
    return max(1, int(BUDGET_MARGIN * budget_s / per_step))


def too_short(budget: str, steps: int, step_s: float, spent_s: float) -> str:
    """The warning for a budget that buys fewer than ``MIN_STEPS`` steps, with the budget
    that would buy them (the time already spent, plus the steps, plus this module's margin)."""
    need = spent_s + MIN_STEPS * step_s / BUDGET_MARGIN / (1 - MONITOR_SHARE)
    return (f"warning: a {budget} budget buys {steps} steps at {1000 * step_s:.0f} ms each, "
            f"after {spent_s:.0f} s of sizing and timing; a run needs at least {MIN_STEPS} for "
            f"its figures to say much: --budget {math.ceil(need / 60)}m or more, or a smaller "
            f"--image-size or --width")


def timed_mean(times: list[float]) -> float:
    """Mean seconds per step over the second half of the timed steps: the first steps of a run
    are slower than the rest (kernels chosen, memory first touched; BENCHMARKS.md measures it
    for a ViT)."""
    kept = times[len(times) // 2:]
    return sum(kept) / len(kept)


def monitored_steps(left: float, step_s: float, ckpt_s: float, ckpt_every: int,
                    steps_per_epoch: int, check_s: float, knn_every: int
                    ) -> tuple[int, int, int]:
    """Steps that fill ``left`` seconds with the monitor checks that will run among them.

    The checks are thinned (every 2, 4, ... times as many epochs) until they take at most
    ``MONITOR_SHARE`` of it: on a small data set an epoch is a step or two, and a check every
    epoch would eat the budget. A checkpoint of ``ckpt_s`` seconds comes every ``ckpt_every``
    steps.

    Returns:
        The steps, the epochs between checks and the number of checks.
    """
    steps = steps_for_budget(left, step_s, ckpt_every, ckpt_s)
    if not check_s:
        return steps, knn_every, 0
    while True:
        every = steps_per_epoch * knn_every
        checks = checks_between(0, steps, every)
        if checks * check_s <= MONITOR_SHARE * left or every >= steps:
            break
        knn_every *= 2
    steps = steps_for_budget(left - checks * check_s, step_s, ckpt_every, ckpt_s)
    return steps, knn_every, checks


def checks_between(after: int, total: int, every: int) -> int:
    """The monitor checks of a run of ``total`` steps that fall after step ``after``: one every
    ``every`` steps and one at the last step (``Monitors.due``)."""
    if total <= after:
        return 0
    return total // every - after // every + (total % every > 0)


def replanned_steps(step: int, left_s: float, per_step: float, check_s: float,
                    every: int, max_checks: int) -> tuple[int, int]:
    """The total that fills ``left_s`` seconds from ``step`` at ``per_step`` seconds a step,
    with the monitor checks (``check_s`` each, one every ``every`` steps and one at the end)
    that fall among the steps charged to it: a longer run crosses more checks, so a total that
    would cross one more than it was charged is refitted with them all charged (and may then
    stop short of it). It crosses at most ``max_checks`` (at least 1: the last step's), so
    that a replan keeps the checks within the share the budget thinned them to.

    Returns:
        The total and the checks after ``step`` it runs.
    """
    def fit(checks: int) -> int:
        return step + max(1, int(REPLAN_TARGET * (left_s - checks * check_s) / per_step))

    if not check_s:
        return fit(0), 0
    total = fit(1)  # the last step's check
    if (crossed := checks_between(step, total, every)) > 1:
        total = fit(crossed)
    total = min(total, (step // every + max(1, max_checks)) * every)
    return total, checks_between(step, total, every)


def _time_first_steps(take_step: StepFn, window: int, warmup: int, seconds: float
                      ) -> list[float]:
    """Take and time up to ``window`` steps (fewer once ``seconds`` have passed, at least
    ``TIMING_MIN_STEPS``); every process takes the same number."""
    times: list[float] = []
    step = 0
    while step < window:  # the total is not known yet: no step here depends on it
        t0 = time.perf_counter()
        take_step(step, 2**62, warmup)
        times.append(time.perf_counter() - t0)
        step += 1
        enough = step >= TIMING_MIN_STEPS and sum(times) >= seconds
        if dist.any_true(enough):
            break
    return times


def _checkpoint_seconds(method: Method, cfg: Config, run_dir: Path, main: bool) -> float:
    """Seconds to write one checkpoint, from a throw-away one (rank 0 writes them)."""
    t1 = time.perf_counter()
    if main:
        save_torch(dict(method.state_dict(), config=cfg.to_dict()), run_dir / ".timing.pt")
        (run_dir / ".timing.pt").unlink()
    return time.perf_counter() - t1


def fit_budget(cfg: Config, method: Method, take_step: StepFn, gen: torch.Generator,
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
        take_step: the loop's step (appends to ``losses``).
        t_start: when the budget started (``time.perf_counter()``).
        check_s: seconds of one monitor check, charged to the budget per check (0: none).
    Returns:
        The config with ``steps`` fixed, the step the run continues from, and the figures of
        the fit (for ``metrics.json``).
    """
    budget_s = parse_duration(cfg.budget)
    warmup_full = round(cfg.warmup_epochs * steps_per_epoch)
    window = min(warmup_full, steps_per_epoch - 1, TIMING_MAX_STEPS)
    keep = method.progress_free and window >= TIMING_MIN_STEPS
    snapshot = (copy.deepcopy(method.state_dict()), gen.get_state(), global_rng_state())
    if main:
        print(f"budget {cfg.budget}: timing the run's first steps", flush=True)
    times = _time_first_steps(take_step, window if keep else TIMING_MIN_STEPS, warmup_full,
                              min(TIMING_SECONDS, TIMING_SHARE * budget_s))
    step, step_s = len(times), timed_mean(times)
    ckpt_s = _checkpoint_seconds(method, cfg, run_dir, main)
    ckpt_every = checkpoint_steps(step_s, steps_per_epoch, cfg.checkpoint_every)

    def fit(left: float) -> tuple[int, int, int]:
        return monitored_steps(left, step_s, ckpt_s, ckpt_every, steps_per_epoch, check_s,
                               cfg.knn_every)

    more, knn_every, checks = fit(budget_s - (time.perf_counter() - t_start))
    total = step + more
    keep = bool(dist.broadcast_object(keep and total >= max(warmup_full, step + 1)))
    if not keep:  # undo the timed steps
        state, gen_state, rng = snapshot
        method.load_state_dict(state)
        gen.set_state(gen_state)
        set_global_rng_state(rng)
        del losses[:]
        step = 0
        total, knn_every, checks = fit(budget_s - (time.perf_counter() - t_start))
    total, knn_every = dist.broadcast_object((total, knn_every))  # rank 0's decides for all
    if knn_every != cfg.knn_every and main:
        print(f"budget {cfg.budget}: monitor checks every {knn_every} epochs, not "
              f"{cfg.knn_every}: at {check_s:.1f} s each they would take more than "
              f"{MONITOR_SHARE:.0%} of the budget", flush=True)
    cfg = budget_steps(cfg, total, step_s, knn_every=knn_every)
    if main:
        print(f"budget {cfg.budget}: {step_s * 1000:.0f} ms per step over the first "
              f"{len(times)} steps ({'kept' if keep else 'undone'}), so {total} steps "
              f"({total / steps_per_epoch:.1f} epochs), replanned from the run's own speed at "
              f"{', '.join(f'{x:.0%}' for x in REPLAN_SHARES)} of the budget", flush=True)
        if total < MIN_STEPS:
            print(too_short(cfg.budget, total, step_s, time.perf_counter() - t_start),
                  file=sys.stderr, flush=True)
    return cfg, step, dict(budget_s=budget_s, timed_steps=len(times), step_s=step_s,
                           check_s=check_s, checks=checks, checkpoint_s=ckpt_s,
                           timed_steps_kept=keep, steps=total, planned_steps=total,
                           kept_seconds=sum(times) if keep else 0.0)


class Replans:
    """A budgeted run's replans: at each of ``REPLAN_SHARES`` of the budget (or of the steps,
    when those come first), the wall time per step since the last fit (monitor checks and
    checkpoints included) refits the steps left to the time left.

    A speed timed over the first seconds of a run drifts over the rest of it (BENCHMARKS.md:
    the budget against the run's own timing): the rest of the schedule is spread over the new
    number of steps (``optim.schedule_step``), and ``cfg.replans`` records where and from what
    total, so that ``--steps N --replans ...`` repeats the run exactly.
    """

    def __init__(self, budget: dict[str, Any], t_start: float, step: int, warmup: int,
                 steps_per_epoch: int) -> None:
        self.budget, self.t_start, self.warmup = budget, t_start, warmup
        self.steps_per_epoch = steps_per_epoch
        self.t_fit, self.fit_step = time.perf_counter(), step

    def due(self, at: int, total: int) -> bool:
        """At the next of ``REPLAN_SHARES`` of the budget (or of the steps, if sooner)."""
        done = len(self.budget.get("replans", []))
        if not self.budget or done == len(REPLAN_SHARES) or not self.warmup <= at < total - 1 \
                or at - self.fit_step < 3:
            return False
        share = REPLAN_SHARES[done]
        return bool(dist.any_true(
            time.perf_counter() - self.t_start >= share * self.budget["budget_s"]
            or at >= share * total))

    def replan(self, cfg: Config, step: int, total: int, run_dir: Path, main: bool) -> Config:
        """``cfg`` with the steps left refitted (unchanged when they stay the same) and the
        replan added to ``replans``; ``budget["replans"]`` gets the record."""
        now = time.perf_counter()
        per_step = (now - self.t_fit) / (step - self.fit_step)
        left_s = self.budget["budget_s"] - (now - self.t_start)
        self.t_fit, self.fit_step = now, step
        every = self.steps_per_epoch * cfg.knn_every if cfg.knn_every else 2**62
        check_s = self.budget["check_s"]
        allowed = int(MONITOR_SHARE * self.budget["budget_s"] / check_s) if check_s else 1
        new_total, _ = replanned_steps(step, left_s, per_step, check_s, every,
                                       max(self.budget["checks"], allowed)
                                       - checks_between(0, step, every))
        new_total = int(dist.broadcast_object(new_total))  # rank 0's decides for all
        self.budget.setdefault("replans", []).append(dict(at_step=step, planned_steps=total,
                                                          steps=new_total, step_s=per_step))
        self.budget["steps"] = new_total
        if check_s:  # the checks the run now takes, the done ones included
            self.budget["checks"] = checks_between(0, new_total, every)
        if new_total == total:
            return cfg
        knots = f"{cfg.replans + ',' if cfg.replans else ''}{step}:{total}"
        cfg = budget_steps(cfg, new_total, per_step, replans=knots)
        if main:
            print(f"budget {cfg.budget}: {per_step * 1000:.0f} ms per step lately (planned at "
                  f"{self.budget['step_s'] * 1000:.0f} ms): the {total - step} steps left "
                  f"become {new_total - step}, the schedule's rest spread over them",
                  flush=True)
            save_json(cfg.to_dict(), run_dir / "config.json")  # the config that repeats the run
        return cfg


def repeat_options(cfg: Config) -> str:
    """The options that repeat a budgeted run without its budget: its steps, its replan and
    the encoder its sizing chose."""
    text = f"--steps {cfg.steps}" + (f" --replans {cfg.replans}" if cfg.replans else "")
    if cfg.auto_size:
        text += f" --model {cfg.model} --width {cfg.width} --view-size {cfg.view_size}"
    return text


def lr_of(cfg: Config, step: int, total: int, warmup: int, peak: float) -> float:
    """The learning rate of step ``step`` of ``total`` on ``cfg``'s schedule (replan included)."""
    return lr_at(*schedule_step(step, total, parse_replans(cfg.replans)), warmup, peak)


def budget_steps(cfg: Config, steps: int, step_s: float, **changes: Any) -> Config:
    """``cfg`` with the steps a budget fitted at ``step_s`` seconds per step (checked by
    ``with_steps``) and the other settings the fit chose."""
    why = f"--budget {cfg.budget} at {step_s * 1000:.3g} ms per step"
    return dataclasses.replace(with_steps(cfg, steps, why), **changes)


def with_steps(cfg: Config, steps: int, why: str) -> Config:
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


def compare_sizing(sizing: dict[str, Any], run_step_s: float, main: bool) -> dict[str, Any]:
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
