"""Resuming a run: the checkpoint checked against the run asked for, its state restored, and
the steps the resumed run continues to (more epochs, more steps or more time)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from selfsup.checkpoint import (
    check_resume,
    check_state_dict,
    checkpoint_config,
    load_checkpoint,
    set_global_rng_state,
)
from selfsup.config import Config, is_number, parse_duration
from selfsup.errors import CheckpointError, ConfigError
from selfsup.methods import Method
from selfsup.train.budget import BUDGET_MARGIN, with_steps


def load_resumable(path: Path, cfg: Config, world: int) -> tuple[dict[str, Any], Config]:
    """The checkpoint at ``path`` and the config it was written with, after checking that
    resuming it with ``cfg`` in ``world`` processes continues the same run.

    Raises:
        CheckpointError: the config differs in a setting that changes the run, or the number
            of processes differs (each process's augmentation stream is part of the state).
    """
    ck = load_checkpoint(path)
    old = checkpoint_config(ck, path)
    check_resume(old, cfg, path)
    saved_world = ck.get("world_size", 1)
    if saved_world != world:
        raise CheckpointError(
            f"cannot resume {path} with {world} process(es): it was written by "
            f"{saved_world!r:.20}, and each process's augmentation stream is part of the "
            f"state. Resume with {saved_world!r:.20} process(es) (the same global batch).")
    return ck, old


def restore(ck: dict[str, Any], path: Path, method: Method, gen: torch.Generator, rank: int
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


def extension(cfg: Config, old: Config, ck: dict[str, Any], step: int, steps_per_epoch: int,
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
        return with_steps(cfg, step + more, f"--budget {cfg.budget} at this run's "
                                             f"{per_step * 1000:.3g} ms per step")
    if cfg.epochs != old.epochs:
        return dataclasses.replace(cfg, steps=0)
    if not cfg.steps and old.steps:  # a budgeted run keeps the steps it chose
        return dataclasses.replace(cfg, steps=old.steps)
    return cfg
