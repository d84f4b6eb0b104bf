"""Choices made from this machine's hardware: whether there is a GPU, which device to run on,
and the training settings that follow from it."""

from __future__ import annotations

import contextlib
from typing import Any

import torch


def has_cuda() -> bool:
    return torch.cuda.is_available()


def device() -> str:
    """The device one process computes on: the GPU where there is one, else the CPU."""
    return "cuda" if has_cuda() else "cpu"


def hardware_training_defaults(training: dict[str, Any]) -> dict[str, Any]:
    """SFTConfig values chosen from the hardware; the recipe's own values win over these.

    TRL defaults to bf16 autocast and gradient checkpointing. On a CPU without native bf16 that
    makes each step many times slower, and checkpointing trades speed for memory that small
    LoRA runs do not need, so both are opt-in here.
    """
    # Every LoRA parameter takes part in each forward pass, so DDP need not search for unused
    # ones (the search costs a graph traversal per step).
    # A NaN loss must show in the logs (and stop the run), not be averaged away.
    defaults: dict[str, Any] = {
        "gradient_checkpointing": False,
        "report_to": "tensorboard",
        "ddp_find_unused_parameters": False,
        "logging_nan_inf_filter": False,
    }
    if "bf16" not in training and "fp16" not in training:
        bf16 = has_cuda() and torch.cuda.is_bf16_supported()
        defaults |= {"bf16": bf16, "fp16": has_cuda() and not bf16}
    if not has_cuda():
        defaults["use_cpu"] = True
    return defaults


def memory_size(gpu: bool = True) -> int | None:
    """Bytes one process may use: the GPU's memory (unless `gpu` is False: a CPU run on a GPU
    machine), else the RAM available now (None if unknown)."""
    if gpu and has_cuda():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    try:
        with open("/proc/meminfo") as info:
            line = next(line for line in info if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None
    return int(line.split()[1]) * 1024


def resident_bytes(field: str = "VmRSS") -> int:
    """This process's resident memory now (VmRSS) or at its peak (VmHWM), from /proc."""
    try:
        with open("/proc/self/status") as status:
            line = next(line for line in status if line.startswith(f"{field}:"))
    except (OSError, StopIteration):
        return 0
    return int(line.split()[1]) * 1024


def reset_peak_resident() -> None:
    """Start this process's peak resident memory (VmHWM) afresh from now, where Linux allows it,
    after handing memory freed earlier back to the system (glibc keeps it resident otherwise, and
    new allocations would reuse it unseen): a run inside a longer-lived process measures its own
    peak."""
    import ctypes
    import ctypes.util

    with contextlib.suppress(OSError, AttributeError, TypeError):
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        pass
