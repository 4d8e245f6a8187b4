"""The pretraining loop: ``Trainer.run`` reads top to bottom.

Start (a new run, or a resumed one from its checkpoint), fit the budget (when there is one),
then step: views -> update -> log -> monitors -> checkpoint -> replan, until the last step or a
signal; finally save the encoder and the loss history. The method (``selfsup.methods``) makes
the views on the device and takes its step; the loop owns the data order, the learning-rate
schedule, the budget, checkpoints and the monitors, and knows no method by name.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from selfsup import dist
from selfsup.checkpoint import CHECKPOINT, ENCODER, global_rng_state, save_encoder
from selfsup.config import Config, parse_duration, parse_replans
from selfsup.data import ImageData, channel_stats
from selfsup.errors import ConfigError, Interrupted, SelfsupError
from selfsup.files import save_json, save_npy, save_torch
from selfsup.hardware import keep_freed_memory, select_device, select_precision, sync
from selfsup.logs import RunLog
from selfsup.methods import METHODS, build_method
from selfsup.models import Encoder
from selfsup.optim import lr_at, schedule_step
from selfsup.sizing import choose_size
from selfsup.train.budget import (
    CHECKPOINT_SECONDS,
    Replans,
    compare_sizing,
    fit_budget,
    lr_of,
    repeat_options,
)
from selfsup.train.monitors import Monitors
from selfsup.train.progress import Progress, StopOnSignal
from selfsup.train.resume import extension, load_resumable, restore
from selfsup.train.views import Views, views_grid

EMBED_PER_VIEW = 0.8  # embedding an image, against a step's time per view at the same side


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


def _use_threads(threads: int, main: bool) -> None:
    """``threads`` torch threads (0: torch's default), at most the machine's CPUs."""
    if threads:
        cpus = os.cpu_count() or 1
        if threads > cpus and main:
            print(f"note: threads {threads} > this machine's {cpus} CPUs; using {cpus}",
                  flush=True)
        torch.set_num_threads(min(threads, cpus))


def _global_batch(cfg: Config, n: int, world: int, main: bool) -> Config:
    """``cfg`` with a batch no larger than the data (recorded as run: config.json, checkpoints
    and the report).

    Raises:
        ConfigError: a batch the processes cannot share evenly.
    """
    batch = min(cfg.batch_size, n)
    if batch < cfg.batch_size:
        if main:
            print(f"note: batch_size {cfg.batch_size} > {n} images; using {batch}", flush=True)
        cfg = dataclasses.replace(cfg, batch_size=batch)
    if batch % world:
        raise ConfigError(f"batch_size {batch} is not divisible by the {world} processes")
    return cfg


class Trainer:
    """One pretraining run of ``cfg`` on ``data`` into ``run_dir``: ``run()`` does it all.

    Construction sets up the device, the data on it, the encoder's size (a budget's sizing)
    and the method; nothing is written to the run folder before ``run``.
    """

    def __init__(self, cfg: Config, data: ImageData, run_dir: str | Path, resume: bool) -> None:
        self.run_dir, self.resume = Path(run_dir), resume
        keep_freed_memory()
        self.device = dist.setup(select_device(cfg.device), cfg.dist_timeout)
        self.main, self.world, self.rank = dist.is_main(), dist.world_size(), dist.rank()
        _use_threads(cfg.threads, self.main)
        self.amp_dtype, self.precision = select_precision(cfg.precision, self.device)
        if self.main:
            procs = f", {self.world} processes" if self.world > 1 else ""
            print(f"device {self.device}, {torch.get_num_threads()} threads{procs}, precision: "
                  f"{self.precision}\nmethod {cfg.method}: saves and evaluates "
                  f"{METHODS[cfg.method].evaluated}", flush=True)
        if data.pretrain_size < 2:
            raise SelfsupError(f"{data.name} has {data.pretrain_size} training image(s); "
                               f"contrastive pretraining needs at least 2 (each image's "
                               f"negatives are the others)")
        # (N, 3, H, W) uint8, resident: the training images, then any unlabeled ones
        self.x_all = data.pretrain_images().to(self.device)
        self.eval_images = len(data.train_x) + (0 if data.test_x is None else len(data.test_x))
        cfg = _global_batch(cfg, len(self.x_all), self.world, self.main)
        self.batch = cfg.batch_size  # the global batch, over all processes
        self.steps_per_epoch = len(self.x_all) // self.batch
        self.peak_lr = cfg.lr * self.batch / 256
        self.mean, self.std = channel_stats(data.train_x)
        self.t_start = time.perf_counter()  # the budget counts from here: sizing, checks, steps
        self.sizing: dict[str, Any] = {}
        if not resume and cfg.budget and not cfg.steps and cfg.auto_size:
            cfg, self.sizing = choose_size(cfg, self.x_all, self.mean, self.std, self.amp_dtype,
                                           self.batch, parse_duration(cfg.budget), self.main)
        self.cfg = cfg
        self.method = build_method(cfg, self.device, self.x_all.shape[-1], self.mean, self.std,
                                   self.peak_lr, self.amp_dtype, self.batch)
        # Augmentation randomness: its own stream per process, from the seed and the rank.
        self.gen = torch.Generator(device=self.device).manual_seed(cfg.seed + 1_000_003 * self.rank)
        self.monitors = Monitors(data, self.x_all, cfg.knn_every, cfg.knn_monitor_size, cfg.knn_k,
                                 cfg.knn_t, cfg.seed, cfg.eval_batch_size, self.main)
        self.views = Views(self.x_all, self.method, self.gen, cfg.seed, self.batch, self.rank,
                           self.world, self.device)
        self.losses: list[float] = []
        self.step = self.start_step = self.saved_step = 0
        self.saved_at = 0.0  # time.perf_counter() of the last checkpoint (or the start)
        self.total = self.warmup = self.old_total = 0
        self.seconds_per_step = 0.0  # a resumed run's, from its checkpoint
        self.budget: dict[str, Any] = {}
        # Steps taken and not yet logged: (steps done, lr, loss, seconds, seconds making views,
        # seconds of those reading the images).
        self.pending: list[tuple[int, float, float, float, float, float]] = []
        self.views_time = 0.0  # of the steps logged in this invocation: seconds making views
        self.read_time = 0.0  # ... and of those, reading the images
        self.train_time = 0.0  # seconds of the training steps of this invocation
        self.log: RunLog

    # --- the run, top to bottom ---

    def run(self) -> PretrainResult:
        """Pretrain; writes ``config.json`` (at start), ``checkpoint.pt`` (at an epoch's end
        every ``CHECKPOINT_SECONDS`` or so, at the end, on Ctrl-C), ``encoder.pt`` and
        ``loss.npy`` (at the end) into the run folder.

        Raises:
            CheckpointError: a resume without a checkpoint, or one that changes the run.
            SelfsupError: a non-finite loss (names the step).
            Interrupted: after saving a checkpoint on Ctrl-C or SIGTERM.
        """
        self.start()
        self.fit_steps()
        progress = Progress(self.total, self.step, self.cfg.progress and self.main,
                            every=max(1, self.total // 50))
        self.method.train()
        images = (self.step - self.start_step) * self.batch
        replans = Replans(self.budget, self.t_start, self.step, self.warmup,
                           self.steps_per_epoch)
        with StopOnSignal(announce=self.main) as stop:
            try:
                while self.step < self.total:
                    t0 = time.perf_counter()
                    lr = self.take_step(self.step, self.total, self.warmup)
                    self.step += 1
                    gen_state = self.views.state()  # state at the start of the next step
                    sync(self.device)
                    self.train_time += time.perf_counter() - t0
                    images += self.batch
                    self.log_steps(self.step)
                    progress.update(self.step, self.losses[-1], lr,
                                    images / max(self.train_time, 1e-9),
                                    self.views_time / max(self.train_time, 1e-9),
                                    self.read_time / max(self.train_time, 1e-9))
                    self.check_and_save(stop, gen_state)
                    if replans.due(self.step, self.total):
                        self.cfg = replans.replan(self.cfg, self.step, self.total,
                                                  self.run_dir, self.main)
                        self.total = self.cfg.steps
                        progress.set_total(self.total)
            except KeyboardInterrupt:
                progress.close()
                if self.main:
                    print(f"\ninterrupted: checkpoint at step {self.saved_step}/{self.total} in "
                          f"{self.run_dir / CHECKPOINT}; continue with --resume {self.run_dir}",
                          file=sys.stderr, flush=True)
                raise
            finally:
                self.log.close()
        progress.close()
        return self.finish(images)

    # --- the parts ---

    def start(self) -> None:
        """A new run at step 0, or a resumed one at its checkpoint's step; the log opened, the
        untrained encoder's monitor check made and the augmentation grid drawn."""
        if self.resume:
            self.restore()
        self.start_step = self.saved_step = self.step
        self.saved_at = time.perf_counter()
        self.log = RunLog(self.run_dir, self.step, self.cfg.log == "tensorboard", self.main)
        if self.monitors.active and self.step == 0:
            self.check_monitors(0)  # the starting point: the untrained encoder
        if self.step == 0 and self.log.writer is not None:
            self.log.image("augmentations", views_grid(self.x_all, self.method, self.cfg.seed))

    def restore(self) -> None:
        """The checkpoint's state restored, and the config the resumed run continues with."""
        path = self.run_dir / CHECKPOINT
        ck, old = load_resumable(path, self.cfg, self.world)
        self.losses, self.step, knn_history = restore(ck, path, self.method, self.gen, self.rank)
        self.monitors.restore(knn_history, list(ck.get("quality_history", [])))
        self.cfg = extension(self.cfg, old, ck, self.step, self.steps_per_epoch, self.main)
        self.old_total = old.steps or old.epochs * self.steps_per_epoch
        self.seconds_per_step = float(ck.get("seconds_per_step") or 0.0)

    def fit_steps(self) -> None:
        """The run's total steps and warm-up: a budget's timed fit, or the config's; the config
        as run written to ``config.json`` (a resume adds to metrics.json instead)."""
        cfg = self.cfg
        if not self.resume and cfg.budget and not cfg.steps:
            # A second check, timed and dropped: the first carries one-time costs (kernels
            # chosen, memory mapped) that, charged to every check, left a budget unspent.
            check_s = self.monitors.time_one(self.method, self.mean, self.std, self.device) \
                if self.monitors.active else 0.0
            self.cfg, self.step, self.budget = fit_budget(
                cfg, self.method, self.take_step, self.gen, self.losses, self.t_start, check_s,
                self.steps_per_epoch, self.run_dir, self.main)
            self.log_steps(self.step)  # the timed steps the run kept (none when undone)
            self.train_time = self.budget["kept_seconds"]
            if self.main:
                self.say_evaluation(self.budget["step_s"])
        self.total = self.cfg.steps or self.cfg.epochs * self.steps_per_epoch
        self.warmup = min(self.total, round(self.cfg.warmup_epochs * self.steps_per_epoch))
        if self.resume and self.main:
            self.say_resumed()
        if self.main and not self.resume:
            save_json(self.cfg.to_dict(), self.run_dir / "config.json")

    def say_evaluation(self, step_s: float) -> None:
        """What evaluation after the budget will take, estimated from the step: embedding an
        image at the image side costs about ``EMBED_PER_VIEW`` of a training step's share per
        view, scaled by the pixels (BENCHMARKS.md, "Your own photos")."""
        n, side = self.eval_images, int(self.x_all.shape[-1])
        view = self.cfg.view_size or side
        per_image = step_s / (2 * self.batch) * EMBED_PER_VIEW * (side / view) ** 2
        print(f"after the budget, evaluation embeds {n} images of {side} px with the trained and "
              f"the untrained encoder: about {2 * n * per_image / 60:.1f} min of it (estimated "
              f"from the step), then the probes and figures", flush=True)

    def say_resumed(self) -> None:
        step, total, old_total = self.step, self.total, self.old_total
        print(f"resumed {self.run_dir / CHECKPOINT} at step {step}/{total}", flush=True)
        if step >= total:
            print(f"note: nothing to train: the run is at step {step} of {total}; extend it "
                  f"with more --epochs, more --steps or a new --budget (more time)", flush=True)
        elif total != old_total:  # the schedule is stretched (or shortened) to the new total
            lr_new = lr_of(self.cfg, step, total, self.warmup, self.peak_lr)
            lr_old = lr_of(self.cfg, step, old_total, self.warmup, self.peak_lr)
            print(f"the schedule now ends at step {total} (it ended at {old_total}): the "
                  f"learning rate continues from {lr_new:.3g} at step {step} (it was "
                  f"{lr_old:.3g} there) and decays to 0 by step {total}", flush=True)

    def take_step(self, at: int, total: int, warmup: int) -> float:
        """Step ``at`` of ``total`` (its batch, learning rate, views, update); appends the loss
        and returns the learning rate.

        Raises:
            SelfsupError: a non-finite loss.
        """
        where, plan = schedule_step(at, total, parse_replans(self.cfg.replans))
        lr = lr_at(where, plan, warmup, self.peak_lr)
        t0 = time.perf_counter()
        v, marks, views_s, read_s = self.views.take(at)
        loss = self.method.update(v, lr, where / plan)
        del v
        self.views.draw_next(at + 1, total)
        # The global loss (mean over processes); the float() syncs: the guard needs it.
        loss_value = dist.all_mean(float(loss))
        if marks:  # the device's own time for the views (the host's is only their launch)
            views_s = marks[0].elapsed_time(marks[1]) / 1000
        self.pending.append((at + 1, lr, loss_value, time.perf_counter() - t0, views_s, read_s))
        if not math.isfinite(loss_value):
            raise SelfsupError(
                f"loss became {loss_value} at step {at + 1}; the last good checkpoint "
                f"is kept. Try a lower lr (now {self.cfg.lr}) or --precision fp32.")
        self.losses.append(loss_value)
        return lr

    def log_steps(self, upto: int) -> None:
        """Write the pending steps up to ``upto`` steps done to the log; drop the rest (the
        budget's timed steps, when it undoes them)."""
        for done, lr, loss, seconds, views_s, read_s in self.pending:
            if done <= upto:
                self.views_time += views_s
                self.read_time += read_s
                self.log.step(done, done / self.steps_per_epoch, lr, loss,
                              self.batch / max(seconds, 1e-9), views_s / max(seconds, 1e-9),
                              read_s / max(seconds, 1e-9))
        self.pending.clear()

    def check_monitors(self, at: int) -> None:
        self.monitors.check(at, at / self.steps_per_epoch, self.method, self.mean, self.std,
                            self.device, self.log)

    def check_and_save(self, stop: StopOnSignal, gen_state: torch.Tensor) -> None:
        """After a step: the monitors when due, a checkpoint when due (at an epoch's end once
        ``CHECKPOINT_SECONDS`` have passed since the last, or every ``checkpoint_every`` steps;
        at the last step; on a signal), then stop on a signal.

        Raises:
            Interrupted: a signal came before the last step (after the checkpoint).
        """
        step, total, cfg = self.step, self.total, self.cfg
        if self.world > 1:  # Ctrl-C reaches the processes at different steps: agree
            stop.requested = dist.any_true(stop.requested)
        if self.monitors.active and Monitors.due(step, total, self.steps_per_epoch,
                                                 cfg.knn_every):
            self.check_monitors(step)  # embeds in eval mode, then restores train mode
        if cfg.checkpoint_every:
            due = step % cfg.checkpoint_every == 0
        else:
            due = step % self.steps_per_epoch == 0 \
                and dist.any_true(time.perf_counter() - self.saved_at >= CHECKPOINT_SECONDS)
        if due or step == total or stop.requested:
            self.checkpoint(step, gen_state)
        if stop.requested and step < total:
            raise Interrupted(stop.signum)

    def checkpoint(self, at_step: int, gen_state: torch.Tensor) -> None:
        """Every process's state at ``at_step`` into ``checkpoint.pt`` (collective)."""
        self.saved_step = at_step
        self.saved_at = time.perf_counter()
        gen_states = dist.gather_objects(gen_state)  # every process's stream
        rngs = dist.gather_objects(global_rng_state())
        if not self.main:
            return
        per_step = self.train_time / (at_step - self.start_step) if at_step > self.start_step \
            else self.seconds_per_step
        save_torch(dict(self.method.state_dict(), gen_state=gen_states[0], gen_states=gen_states,
                        seconds_per_step=per_step, step=at_step, losses=self.losses,
                        knn_history=self.monitors.knn_history,
                        quality_history=self.monitors.quality_history,
                        config=self.cfg.to_dict(), rng=rngs[0], rng_all=rngs,
                        world_size=self.world), self.run_dir / CHECKPOINT)

    def finish(self, images: int) -> PretrainResult:
        """The encoder and the loss history saved; the budget's use recorded and printed."""
        encoder = self.method.encoder.eval()
        if self.main:
            save_encoder(self.run_dir / ENCODER, encoder, self.cfg, self.mean, self.std,
                         int(self.x_all.shape[-1]))
            save_npy(np.asarray(self.losses, dtype=np.float32), self.run_dir / "loss.npy")
        steps = self.step - self.start_step
        if self.budget:
            budget = self.budget
            budget["size"] = compare_sizing(self.sizing, self.train_time / max(1, steps),
                                            self.main)
            budget["used_s"] = time.perf_counter() - self.t_start
            budget["used_fraction"] = budget["used_s"] / budget["budget_s"]
            if self.main:
                print(f"budget {self.cfg.budget}: pretraining took {budget['used_s'] / 60:.1f} "
                      f"min, {100 * budget['used_fraction']:.1f} % of it; repeat with "
                      f"{repeat_options(self.cfg)}", flush=True)
        return PretrainResult(encoder, self.cfg, self.losses, self.step,
                              self.step / self.steps_per_epoch, self.train_time,
                              images / max(self.train_time, 1e-9), self.precision, self.mean,
                              self.std, self.monitors.knn_history, self.monitors.seconds,
                              self.start_step, self.budget, self.monitors.quality_history)


def pretrain(cfg: Config, data: ImageData, run_dir: str | Path, resume: bool = False
             ) -> PretrainResult:
    """Train the configured method's networks on ``data.train_x`` and ``data.unlabeled_x``
    (labels unused); see ``Trainer``.

    With ``cfg.budget`` and no ``cfg.steps``, the encoder is sized to the machine when
    ``cfg.auto_size`` (``selfsup.sizing``), then the run's first steps are timed and fix the
    number of steps that fits the budget (``budget.fit_budget``); it is written into the saved
    config, so that ``--steps N`` repeats the run exactly.
    """
    return Trainer(cfg, data, run_dir, resume).run()
