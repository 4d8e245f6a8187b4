"""The optimisers (SGD with momentum, LARS, AdamW) and the per-step learning-rate schedule."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from selfsup.config import Config


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


def decay_groups(modules: list[nn.Module], weight_decay: float, **extra: Any
                 ) -> list[dict[str, Any]]:
    """Parameter groups: weights with weight decay, biases and norm parameters (one dimension)
    without; ``extra`` (a learning rate, ...) in both."""
    params = [p for m in modules for p in m.parameters()]
    return [dict(params=[p for p in params if p.ndim > 1], weight_decay=weight_decay, **extra),
            dict(params=[p for p in params if p.ndim <= 1], weight_decay=0.0, **extra)]


def build_optimizer(modules: list[nn.Module], cfg: Config, lr: float) -> torch.optim.Optimizer:
    """SGD (momentum), LARS or AdamW (decoupled weight decay, as transformers are trained);
    biases and norm parameters get no weight decay."""
    groups = decay_groups(modules, cfg.weight_decay)
    if cfg.optimizer == "lars":
        return LARS(groups, lr=lr, momentum=cfg.momentum)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999))
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum)


def lr_at(step: float, total: int, warmup: int, peak: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total`` (per step)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def schedule_step(step: int, total: int, replans: list[tuple[int, int]]) -> tuple[float, int]:
    """Where step ``step`` of ``total`` lies on the run's schedule: ``(where, plan)`` with the
    schedules then read at ``lr_at(where, plan, ...)`` and ``progress = where / plan``.

    A budgeted run replans (``selfsup.train``): each ``(R, P)`` says that until step ``R`` the
    run was planned to end at step ``P``. From each replan the schedule's rest is spread
    evenly over the steps up to the next plan's end, so the learning rate goes on from where it
    was and reaches 0 at ``total``. ``plan`` is the first plan's total; without replans a step
    is itself and ``plan`` is ``total``.
    """
    if not replans or step <= replans[0][0]:
        return float(step), (replans[0][1] if replans else total)
    starts = [at for at, _ in replans]
    ends = [planned for _, planned in replans[1:]] + [total]  # each plan's end after its replan
    done = starts[0] / replans[0][1]  # the fraction of the schedule done at the first replan
    for k, (start, end) in enumerate(zip(starts, ends, strict=True)):
        upto = min(step, starts[k + 1]) if k + 1 < len(starts) else step
        done += (upto - start) * (1 - done) / (end - start)
        if upto == step:
            break
    return done * replans[0][1], replans[0][1]
