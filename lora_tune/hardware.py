"""Choices made from this machine's hardware: whether there is a GPU, which device to run on,
and the training settings that follow from it."""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch

from .errors import UserError

# CPU feature flags under which bf16 matrix multiplies run natively (oneDNN uses them): AVX-512
# BF16 and AMX on x86 (/proc/cpuinfo `flags`), the BF16 extensions on Arm (`Features`: bf16,
# svebf16). Without them bf16 is emulated, and a bf16 step took 13x an fp32 one.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16", "svebf16"})
# 1 or 0: the CPU counts as having native bf16 or not, whatever its flags say.
CPU_BF16_VARIABLE = "LORA_TUNE_CPU_BF16"


def has_cuda() -> bool:
    return torch.cuda.is_available()


def device() -> str:
    """The device one process computes on: the GPU where there is one, else the CPU."""
    return "cuda" if has_cuda() else "cpu"


def cpu_flags(cpuinfo: str) -> set[str]:
    """The feature flags in /proc/cpuinfo text: x86's `flags` lines and Arm's `Features` lines."""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return flags


def native_cpu_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively: LORA_TUNE_CPU_BF16 (1 or 0) when set,
    else its flags in /proc/cpuinfo (False where there is none, as on macOS).

    Raises UserError for a LORA_TUNE_CPU_BF16 other than 0 or 1."""
    forced = os.environ.get(CPU_BF16_VARIABLE, "").strip()
    if forced:
        if forced not in ("0", "1"):
            raise UserError(
                f"{CPU_BF16_VARIABLE}={forced!r}: expected 1 or 0",
                [
                    f"{CPU_BF16_VARIABLE}=1 treats this CPU as having native bf16, 0 as lacking "
                    "it; unset it to read the CPU's flags"
                ],
            )
        return forced == "1"
    try:
        with open("/proc/cpuinfo") as info:
            return native_bf16_in(info.read())
    except OSError:
        return False


def native_bf16_in(cpuinfo: str) -> bool:
    """Whether /proc/cpuinfo text names a flag of native bf16 matrix multiplies."""
    return bool(cpu_flags(cpuinfo) & NATIVE_BF16_FLAGS)


def precision_defaults(cpu: bool) -> dict[str, bool]:
    """bf16 autocast where the hardware computes in bf16 natively (GPUs that support it, CPUs
    with native bf16), fp16 autocast on other GPUs, fp32 on other CPUs."""
    if cpu:
        return {"bf16": native_cpu_bf16(), "fp16": False}
    bf16 = torch.cuda.is_bf16_supported()
    return {"bf16": bf16, "fp16": not bf16}


def hardware_training_defaults(training: dict[str, Any]) -> dict[str, Any]:
    """SFTConfig values chosen from the hardware; the recipe's own values win over these.

    TRL defaults to bf16 autocast and gradient checkpointing. On a CPU without native bf16 that
    makes each step many times slower, and checkpointing trades speed for memory that small
    LoRA runs do not need, so checkpointing is opt-in and precision follows the hardware.
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
    cpu = bool(training.get("use_cpu")) or not has_cuda()
    if "bf16" not in training and "fp16" not in training:
        defaults |= precision_defaults(cpu)
    if not has_cuda():
        defaults["use_cpu"] = True
    return defaults


def precision_label(args) -> str:
    """The plan's precision row for a training config: 'bf16 mixed', 'fp16 mixed' or 'fp32', and
    on a CPU whether it has native bf16 (bf16 without it is many times slower than fp32)."""
    label = "fp32"
    if args.bf16:
        label = "bf16 mixed"
    elif args.fp16:
        label = "fp16 mixed"
    if not args.use_cpu:
        return label
    if not native_cpu_bf16():
        slow = ": many times slower than fp32" if args.bf16 else ""
        return f"{label} (no native bf16 on this CPU{slow})"
    return f"{label} (native bf16 on this CPU)"


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
