"""Choices made from this machine's hardware: whether there is a GPU, which device to run on,
and the training settings that follow from it."""

from __future__ import annotations

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
