"""Where and how to compute: the device, the precision, and the machine facts beside a figure.

Training, evaluation, fine-tuning and inference all choose their device here; every speed
figure is printed with ``describe_machine``.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any

import torch

from selfsup import dist
from selfsup.errors import SelfsupError


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


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


@functools.cache
def keep_freed_memory() -> bool:
    """Have the C allocator keep freed memory for the next allocation (glibc; once per process).

    A training step allocates and frees tens of megabytes of activations. glibc serves blocks
    above its mmap threshold (32 MiB at most) with new mappings and unmaps them when freed, so
    every step faulted all their pages in again, and the kernel's time went into that rather
    than the step (BENCHMARKS.md, "Why the timings missed"). The process keeps its peak heap;
    tensors are freed to it.

    Returns:
        Whether the allocator was set (False without glibc: macOS, musl, Windows).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD,
                                                                        2**31 - 1))
    except (OSError, AttributeError):
        return False


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
        if device.type == "cpu" and not cpu_has_fast_bf16():
            return torch.bfloat16, (
                f"bf16 autocast (asked for). Warning: this CPU has no native bf16 "
                f"({torch.backends.cpu.get_cpu_capability()}), so bf16 is emulated: a user's "
                f"report on a 2-core AVX2 host found the cpu preset's network 12x slower than "
                f"fp32 there (124 against 1,570 images/s; not measured by selfsup's own "
                f"benchmarks). --precision auto (the default) takes fp32 here")
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


def sync(device: torch.device) -> None:
    """Wait for queued device work, so wall-clock times mean something."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


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
