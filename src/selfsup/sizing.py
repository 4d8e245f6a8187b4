"""Which encoder a time budget buys on this machine, and what fits it at all.

With a budget and no model size named (``auto_size``), a short timing of a ladder of encoders,
cheapest first, picks the largest that still gets ``MIN_EPOCHS`` passes over the training images
in the budget: a fast machine gets a bigger encoder instead of more epochs of a saturated one,
a slow one keeps the small network. The ladder and the threshold come from 20-minute runs on
CIFAR-10 on more than one kind of CPU (BENCHMARKS.md, "An encoder sized to the machine"); the
threshold was lowered from 40 to 35 when the rung it turned down won on a validation split
(BENCHMARKS.md, "The preset's lr and the sizing's 40-epoch rule, re-checked on validation"), and
from 35 to 25 when it happened again on an Intel Xeon, where the rung with 33 epochs beat the
one with 59 and lost to the one with 19 (BENCHMARKS.md, "The sizing's epoch floor").
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from selfsup import dist
from selfsup.config import Config, parse_duration
from selfsup.data import Images, physical_memory, shapes_of
from selfsup.errors import ConfigError
from selfsup.hardware import sync
from selfsup.methods import METHODS, build_method
from selfsup.models import ProjectionHead, build_encoder

# Cheapest first. View sides are for 32 px images and scale with the image side. A side of
# 16-23 px leaves 2x2 maps for the last stage, which runs as a matrix product (``Conv3x3``),
# so 20 px views cost much less than 24 px ones, and 22 px more than 20 px for no better
# encoder (BENCHMARKS.md, "An encoder sized to the machine").
LADDER: tuple[dict[str, Any], ...] = (
    dict(model="fast_cnn", width=32, view_size=16),
    dict(model="fast_cnn", width=48, view_size=20),
    dict(model="fast_cnn", width=64, view_size=20),
    dict(model="fast_cnn", width=80, view_size=20),
    dict(model="fast_cnn", width=96, view_size=20),
)
MIN_EPOCHS = 25.0  # passes over the data the chosen encoder must still get in the budget
# A folder of photos is read at the largest side that still buys this many passes of the
# cheapest rung (``photo_side``): the floor as it was when that rule was measured, which the
# width runs that moved ``MIN_EPOCHS`` did not test (they changed the encoder, not the images).
SIDE_MIN_EPOCHS = 35.0
SIZING_SHARE = 0.9  # of the budget, what the steps get (kNN checks, checkpoints take the rest)
SIZING_MOST = 0.05  # of the budget, the most the sizing's timings may take: no rung is timed after


def device_memory(device: torch.device) -> int | None:
    """Bytes of memory a run on ``device`` has: the GPU's, else the machine's (None: unknown)."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return physical_memory()


def check_model_size(cfg: Config, device: torch.device) -> None:
    """Refuse, before any work, a network whose weights, gradients and optimiser state cannot
    fit in this machine's memory (counted on the meta device: nothing is allocated).

    Raises:
        ConfigError: naming the sizes that make it too large.
    """
    with torch.device("meta"):
        encoder = build_encoder(cfg.model, cfg.width, cfg.options)
        head = ProjectionHead(encoder.feature_dim, cfg.proj_hidden, cfg.proj_dim)
    params = sum(p.numel() for m in (encoder, head) for p in m.parameters())
    # weights, gradients, momentum, the budget's snapshot of them, and a method's target copies
    need = params * 4 * (4 + 2 * METHODS[cfg.method].target_copies)
    total = device_memory(device)
    if total is not None and need > 0.8 * total:
        raise ConfigError(f"{cfg.model} of --width {cfg.width} with a head of --proj-hidden "
                          f"{cfg.proj_hidden} and --proj-dim {cfg.proj_dim} has {params:,} "
                          f"parameters: training them needs about {need / 2**30:.1f} GiB, more "
                          f"than the {total / 2**30:.1f} GiB of {device.type} memory here")


def check_model_input(cfg: Config, image_size: int, device: torch.device | None = None
                      ) -> None:
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
                build_encoder(cfg.model, min(cfg.width, 8), cfg.options)(torch.empty(2, 3, s, s))
            return True
        except RuntimeError:
            return False

    if fits(side):
        check_activations(cfg, side, device)
        return
    smallest = next((s for s in range(side + 1, 257) if fits(s)), None)
    need = f"at least {smallest}x{smallest} px" if smallest else "larger views"
    where = f"--view-size {cfg.view_size}" if cfg.view_size else f"images of {side}x{side} px"
    raise ConfigError(f"{where}: too small for {cfg.model}, which needs {need}; set "
                      f"--view-size (or --image-size for image folders) to at least that")


def activation_bytes(cfg: Config, side: int, images: int) -> int:
    """Bytes of the encoder's activations kept for the backward pass of ``images`` views of
    ``side`` px, in float32: the outputs of its layers, counted on the meta device."""
    total = 0

    def count(module: torch.nn.Module, inputs: Any, output: Any) -> None:
        nonlocal total
        if isinstance(output, torch.Tensor) and not list(module.children()) \
                and not getattr(module, "inplace", False):  # in place: shares its input's
            total += output.numel() * 4

    with torch.device("meta"):
        encoder = build_encoder(cfg.model, cfg.width, cfg.options)
        hooks = [m.register_forward_hook(count) for m in encoder.modules()]
        encoder(torch.empty(2, 3, side, side))  # two: batch norm refuses one in training
        for h in hooks:
            h.remove()
    return total // 2 * images


def check_activations(cfg: Config, side: int, device: torch.device | None = None) -> None:
    """Refuse, before any work, views whose activations for one batch of two views cannot fit
    in this machine's memory (counted on the meta device: nothing is allocated).

    Raises:
        ConfigError: naming the view side and batch, and the memory they would need.
    """
    device = device or torch.device("cpu")
    need = sum(activation_bytes(cfg, s, k * cfg.batch_size)
               for s, k in METHODS[cfg.method].view_sizes(cfg, side))
    total = device_memory(device)
    if total is not None and need > 0.8 * total:
        what = f"--view-size {cfg.view_size}" if cfg.view_size else f"images of {side} px"
        raise ConfigError(f"{what} at --batch-size {cfg.batch_size}: {cfg.model} of width "
                          f"{cfg.width} keeps about {need / 2**30:.1f} GiB of activations per "
                          f"step (two views of every image), more than the "
                          f"{total / 2**30:.1f} GiB of memory here; choose a smaller "
                          f"--view-size or --batch-size")


def describe_size(cfg: Config) -> str:
    """The encoder and views a config trains, e.g. "fast_cnn width 32 (512-d features), 16 px
    views" (the dimension shows options such as ``--feature-mult``)."""
    with torch.device("meta"):
        dim = build_encoder(cfg.model, cfg.width, cfg.options).feature_dim
    return f"{cfg.model} width {cfg.width} ({dim}-d features), {cfg.view_size or 'full-size'} " \
        f"px views"


def _fits(cfg: Config, image_size: int, device: torch.device) -> bool:
    try:
        check_model_size(cfg, device)
        check_model_input(cfg, image_size, device)
    except ConfigError:
        return False
    return True


SETTLED = 0.05  # two windows of steps whose medians differ by at most this: a speed settled
WINDOW = 4  # steps per window
TIMING_MOST_S = 6.0  # after this long, the last windows are taken as they are


def time_step(cfg: Config, x_all: Images, mean: list[float], std: list[float],
              amp_dtype: torch.dtype | None, batch: int) -> float:
    """Seconds of one training step of ``cfg``'s networks once their speed has settled, built
    apart for this (their own seeded weights and generator: nothing of the run's state or
    random streams is used).

    The first steps of a new network are slow (kernels chosen, memory mapped), for a number of
    steps that differs by network and machine: a fixed few steps of warm-up read a network
    slower than the run then ran it, and the sizing chose one rung too small (BENCHMARKS.md,
    issue 28). Steps are taken in windows of ``WINDOW``; the first is warm-up, and once the
    medians of the last two windows agree within ``SETTLED`` (or ``TIMING_MOST_S`` has passed)
    the timing is the mean of their steps: what a run's steps then take is a mean, and a
    step's time is skewed (a median of the same steps reads low).
    """
    device = x_all.device
    method = build_method(cfg, device, int(x_all.shape[-1]), mean, std, 1e-6, amp_dtype, batch)
    method.train()
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 7919)
    local = batch // dist.world_size()
    times: list[float] = []
    t_start = time.perf_counter()
    while True:
        for _ in range(WINDOW):
            t0 = time.perf_counter()
            start = len(times) * local % max(1, len(x_all) - local)
            rows = slice(start, start + local)
            method.step(x_all[rows], 1e-6, gen, shape=shapes_of(x_all, rows))
            sync(device)
            times.append(time.perf_counter() - t0)
        if len(times) < 3 * WINDOW:
            continue
        last = statistics.median(times[-WINDOW:])
        before = statistics.median(times[-2 * WINDOW:-WINDOW])
        done = abs(last / before - 1) <= SETTLED or time.perf_counter() - t_start >= TIMING_MOST_S
        if dist.any_true(done):  # every process takes the same steps
            return float(statistics.mean(times[-2 * WINDOW:]))  # the run's figure is a mean


def choose_size(cfg: Config, x_all: Images, mean: list[float], std: list[float],
                amp_dtype: torch.dtype | None, batch: int, budget_s: float, main: bool
                ) -> tuple[Config, dict[str, Any]]:
    """The config with the ladder's largest encoder that gets ``MIN_EPOCHS`` in ``budget_s``.

    Each rung is timed in turn until one falls short; rungs that do not fit the images or the
    memory are passed over. When even the first falls short, the first is taken. Under torchrun
    rank 0's timings decide for every process.

    Returns:
        The config (``cfg`` unchanged when no rung fits) and the record: every rung timed, with
        its step time and epochs, and the one chosen.
    """
    side = int(x_all.shape[-1])
    steps_per_epoch = max(1, len(x_all) // batch)
    rows: list[dict[str, Any]] = []
    chosen: Config | None = None
    torch_state = torch.random.get_rng_state()
    t0 = time.perf_counter()
    for rung in LADDER:
        view = max(1, round(rung["view_size"] * side / 32))
        c = dataclasses.replace(cfg, model=rung["model"], width=rung["width"], view_size=view)
        if not _fits(c, side, x_all.device):
            continue
        if chosen is not None and dist.any_true(time.perf_counter() - t0 >= SIZING_MOST * budget_s):
            rows.append(dict(size=describe_size(c), step_s=0.0, epochs=0.0,
                             untimed=f"not timed: the sizing had taken its "
                                     f"{SIZING_MOST:.0%} of the budget"))
            break
        step_s = float(dist.broadcast_object(time_step(c, x_all, mean, std, amp_dtype, batch)))
        epochs = SIZING_SHARE * budget_s / step_s / steps_per_epoch
        rows.append(dict(size=describe_size(c), step_s=step_s, epochs=epochs))
        if epochs < MIN_EPOCHS:
            chosen = chosen or c
            break
        chosen = c
    torch.random.set_rng_state(torch_state)  # building the networks seeded torch's stream
    if chosen is None:
        return cfg, dict(rows=rows, chosen="")
    if main:
        lines = "\n".join(f"  {r['size']}: " + (r.get("untimed") or
                                                 f"{1000 * r['step_s']:.0f} ms per step, "
                                                 f"{r['epochs']:.0f} epochs") for r in rows)
        print(f"encoder for a {cfg.budget} budget on this machine (the largest with at least "
              f"{MIN_EPOCHS:.0f} epochs):\n{lines}\n  chosen: {describe_size(chosen)}; "
              f"--model, --width or --view-size choose it yourself", flush=True)
    return chosen, dict(rows=rows, chosen=describe_size(chosen))


PHOTO_SIDES = (32, 48, 64, 96, 128, 160, 192, 224)  # the sides a folder of photos may be read at
PHOTO_SIDE_UNTIMED = {"cpu": 64}  # without a budget to fit (or under torchrun); others: 128


def photo_side(cfg: Config, device: torch.device, amp_dtype: torch.dtype | None
               ) -> Callable[[int, int], tuple[int, str]]:
    """The rule a folder of photos (images larger than ``data.AUTO_OWN_MOST``) is read by:
    ``(median shorter side, images) -> (side, why)``.

    With a budget: the ladder's cheapest rung is timed once at 32 px (on random images: the
    time does not depend on what they show), a step at side s is taken to cost (s / 32)^2 of
    that (its pixels), and the side is the largest (at most the images' own) at which the
    budget still buys ``SIDE_MIN_EPOCHS`` passes over the images: the encoder is then sized at
    that side. Without a budget, or under torchrun (every process must read the same side, and the
    processes have not met yet), ``PHOTO_SIDE_UNTIMED`` by device."""

    def rule(median: int, n: int) -> tuple[int, str]:
        sides = [s for s in PHOTO_SIDES if s <= median] or [PHOTO_SIDES[0]]
        if not cfg.budget or cfg.steps or dist.launched():
            side = PHOTO_SIDE_UNTIMED.get(device.type, 128)
            side = max(s for s in sides if s <= side) if min(sides) <= side else sides[0]
            why = "under torchrun" if dist.launched() else "no --budget to fit"
            return side, f"{why}: {side} px on {device.type}"
        rung = LADDER[0]
        c = dataclasses.replace(cfg, model=rung["model"], width=rung["width"],
                                view_size=rung["view_size"])
        batch = max(2, cfg.batch_size)
        x = torch.randint(0, 256, (batch + 1, 3, 32, 32), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(cfg.seed)).to(device)
        torch_state = torch.random.get_rng_state()
        step_s = time_step(c, x, [0.5] * 3, [0.25] * 3, amp_dtype, batch)
        torch.random.set_rng_state(torch_state)
        budget_s = SIZING_SHARE * parse_duration(cfg.budget)
        steps_per_epoch = max(1, n // batch)

        def epochs(s: int) -> float:
            return budget_s / (step_s * (s / 32) ** 2 * steps_per_epoch)

        side = max([s for s in sides if epochs(s) >= SIDE_MIN_EPOCHS] or [sides[0]])
        timed = f"from a {1000 * step_s:.0f} ms step at 32 px"
        if epochs(side) < SIDE_MIN_EPOCHS:
            return side, (f"the smallest side: a {cfg.budget} budget buys {epochs(side):.1f} "
                          f"epochs of {n} images at {side} px, {timed}")
        return side, (f"the largest side at which a {cfg.budget} budget buys "
                      f"{SIDE_MIN_EPOCHS:.0f} epochs of {n} images: {epochs(side):.0f} at "
                      f"{side} px, {timed}")

    return rule
