"""Pretraining: the loop (``loop.Trainer``), the time budget (``budget``), the views each step
trains on (``views``), the monitors (``monitors``), resuming (``resume``), progress and signals
(``progress``). Nothing but the workflow imports this package."""

from selfsup.train.budget import MONITOR_SHARE, repeat_options, steps_for_budget, timed_mean
from selfsup.train.loop import PretrainResult, Trainer, pretrain

__all__ = ["MONITOR_SHARE", "PretrainResult", "Trainer", "pretrain", "repeat_options",
           "steps_for_budget", "timed_mean"]
