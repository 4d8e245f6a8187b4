"""Several processes with PyTorch's own distributed engine, and one code path for one process.

Started by ``torchrun`` (which sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``...),
``setup`` joins the process group: gloo on CPUs, NCCL on CUDA with one GPU per process. Without
those variables everything falls back to rank 0 of 1, and every helper is the identity.

The pieces SimCLR needs across processes:

- ``gather_with_grad``: every process's rows, in rank order, with gradients flowing back to the
  process that made them (the global NT-Xent needs every negative);
- ``GlobalBatchNorm``: batch norm with statistics over the global batch (the paper's global BN;
  per-process statistics let the model tell which views were normalised together). On CUDA
  torch's ``SyncBatchNorm`` does this; it does not run on CPUs, so this module does it there;
- ``broadcast_object`` / ``all_mean`` / ``gather_objects`` for decisions and logs.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from typing import Any, NoReturn

import torch
import torch.distributed as td
from torch import nn


def is_dist() -> bool:
    return td.is_available() and td.is_initialized()


def rank() -> int:
    return td.get_rank() if is_dist() else 0


def world_size() -> int:
    return td.get_world_size() if is_dist() else 1


def is_main() -> bool:
    """Only the main process logs and writes files."""
    return rank() == 0


def launched() -> bool:
    """Whether a launcher (torchrun, or SLURM through it) started several processes."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def setup(device: torch.device, timeout_s: float = 300.0) -> torch.device:
    """Join the process group when launched by torchrun; returns this process's device.

    A process that stops answering makes the others fail with a timeout error after
    ``timeout_s`` instead of waiting forever (torchrun also stops the others when one exits
    with an error).
    """
    if not launched() or is_dist():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    td.init_process_group(backend, timeout=timedelta(seconds=timeout_s),
                          device_id=device if device.type == "cuda" else None)
    return device


def cleanup() -> None:
    if is_dist():
        td.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """End a process of a launched group now, with ``code``, skipping interpreter teardown.

    A process that has finished its work and destroyed its process group sometimes aborts while
    the interpreter shuts down ("terminate called without an active exception"; seen here with
    torch 2.13 and gloo, once in 28 and once in 45 two-process runs on a loaded CPU, after both
    processes had left ``destroy_process_group``). torchrun then reports a finished run as
    failed. Leaving through ``os._exit`` after flushing the output skips that teardown (no abort
    in 70 runs under the same load). Files are written and closed before this point.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def barrier() -> None:
    if is_dist():
        td.barrier()


class _AllGather(torch.autograd.Function):
    """Forward: every process's rows in rank order. Backward: the gradients reaching those rows
    are summed over processes, and each process keeps the part for its own rows."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(td.get_world_size())]
        td.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        td.all_reduce(grad)
        n = grad.shape[0] // td.get_world_size()
        return grad[td.get_rank() * n:(td.get_rank() + 1) * n]


class _AllSum(torch.autograd.Function):
    """Forward: the sum over processes. Backward: the sum of the gradients over processes."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        td.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        td.all_reduce(grad)
        return grad


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(n, D) rows of every process, concatenated in rank order: (world * n, D).

    The backward pass sums, over processes, the gradients that reach each process's rows and
    hands them to the process that made them; with DDP averaging parameter gradients over
    processes, every process then holds the gradient of the mean of the processes' losses.
    In one process this is the identity.
    """
    if world_size() == 1:
        return x
    return _AllGather.apply(x)  # type: ignore[no-any-return]


def all_sum_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over processes, differentiable (backward: the sum of the gradients)."""
    if world_size() == 1:
        return x
    return _AllSum.apply(x)  # type: ignore[no-any-return]


def _all_sum(value: float) -> float:
    """The sum of a number over processes (on the GPU where the backend is NCCL)."""
    t = torch.tensor([value], dtype=torch.float64)
    if td.get_backend() == "nccl":
        t = t.cuda()
    td.all_reduce(t)
    return float(t.item())


def all_mean(value: float) -> float:
    """The mean of a number over processes (for logs: the global loss)."""
    if world_size() == 1:
        return value
    return _all_sum(value) / world_size()


def any_true(flag: bool) -> bool:
    """Whether ``flag`` is true in any process (e.g. a Ctrl-C that reached only some)."""
    if world_size() == 1:
        return flag
    return _all_sum(1.0 if flag else 0.0) > 0


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from process ``src`` on every process (e.g. a step count chosen on rank 0)."""
    if world_size() == 1:
        return obj
    box = [obj]
    td.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj``, in rank order, on every process."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    td.all_gather_object(out, obj)
    return out


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm over the batch of every process (any device, any backend).

    In training, per-channel sums and sums of squares are added over processes (differentiably),
    so the normalisation, its gradient and the running statistics are those of one batch holding
    every process's samples. In eval mode, or in one process, it is ``BatchNorm``.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input, got {x.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or world_size() == 1:
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))  # all but channels
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float()
        local = torch.cat([xf.sum(dims), (xf * xf).sum(dims),
                           torch.tensor([x.numel() / x.shape[1]], device=x.device)])
        total = all_sum_with_grad(local)
        c = x.shape[1]
        count = total[-1]
        mean = total[:c] / count
        var = (total[c:2 * c] / count - mean * mean).clamp_min(0)  # biased, for normalising
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 0.1
                assert self.running_var is not None and self.num_batches_tracked is not None
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                unbiased = var.detach() * count / (count - 1).clamp_min(1)
                self.running_var.mul_(1 - m).add_(unbiased, alpha=m)
                self.num_batches_tracked.add_(1)
        y = (xf - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every batch norm in ``module`` made global over processes: torch's ``SyncBatchNorm`` on
    CUDA, ``GlobalBatchNorm`` elsewhere. Parameters and running statistics are kept."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and \
            not isinstance(module, GlobalBatchNorm):
        out = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats)
        if module.affine:
            with torch.no_grad():
                out.weight.copy_(module.weight)
                out.bias.copy_(module.bias)
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, convert_batchnorm(child, device))
    return out
