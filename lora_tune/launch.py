"""`lora-tune train --num-processes N`: relaunch the same command under `accelerate launch`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def should_launch(num_processes: int, config_file: Path | None) -> bool:
    """True when the user asked for a launch and this process is not already one of its workers."""
    return (num_processes > 1 or config_file is not None) and "LOCAL_RANK" not in os.environ


def command(recipe: Path, overrides: list[str], num_processes: int, config_file: Path | None,
            resume: str) -> list[str]:
    """The accelerate launch command line that runs `lora-tune train` in every process."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if config_file is not None:
        cmd += ["--config_file", str(config_file)]
    if num_processes > 1 or config_file is None:
        cmd += ["--num_processes", str(num_processes)]
    if config_file is None:
        # --multi_gpu means DDP; on a machine without CUDA it runs over gloo on the CPU.
        cmd += ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += ["-m", "lora_tune.cli", "train", str(recipe), "--resume", resume]
    for item in overrides:
        cmd += ["--set", item]
    return cmd


def relaunch(recipe: Path, overrides: list[str], num_processes: int, config_file: Path | None,
             resume: str) -> int:
    """Run the training under accelerate; return its exit code."""
    return subprocess.run(command(recipe, overrides, num_processes, config_file, resume)).returncode
