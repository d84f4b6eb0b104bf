"""`lora-tune train --num-processes N`: relaunch the same command under `accelerate launch`."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Launch:
    """How many processes on how many machines; each flag is passed to `accelerate launch`."""

    num_processes: int = 1  # in total, over every machine
    config_file: Path | None = None
    num_machines: int = 1
    machine_rank: int = 0
    main_process_ip: str | None = None
    main_process_port: int | None = None

    def relaunch_needed(self) -> bool:
        """True when the user asked for a launch and this process is not already one of its workers."""
        asked = self.num_processes > 1 or self.num_machines > 1 or self.config_file is not None
        return asked and "LOCAL_RANK" not in os.environ


def command(
    recipe: Path,
    overrides: list[str],
    launch: Launch,
    resume: str,
    debug: bool = False,
    options: list[str] = (),
) -> list[str]:
    """The accelerate launch command line that runs `lora-tune train` in every process."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if launch.config_file is not None:
        cmd += ["--config_file", str(launch.config_file)]
    if launch.num_processes > 1 or launch.config_file is None:
        cmd += ["--num_processes", str(launch.num_processes)]
    if launch.config_file is None:
        # --multi_gpu means DDP; on a machine without CUDA it runs over gloo on the CPU.
        cmd += ["--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no"]
    if launch.num_machines > 1 or launch.config_file is None:
        cmd += ["--num_machines", str(launch.num_machines)]
    if launch.num_machines > 1 or launch.machine_rank:
        cmd += ["--machine_rank", str(launch.machine_rank)]
    if launch.main_process_ip:
        cmd += ["--main_process_ip", launch.main_process_ip]
    if launch.main_process_port:
        cmd += ["--main_process_port", str(launch.main_process_port)]
    cmd += [
        "-m",
        "lora_tune",
        *(["--debug"] if debug else []),
        "train",
        str(recipe),
        "--resume",
        resume,
    ]
    for item in overrides:
        cmd += ["--set", item]
    return cmd + list(options)  # train's own options, such as --memory and --force


def relaunch(
    recipe: Path,
    overrides: list[str],
    launch: Launch,
    resume: str,
    debug: bool = False,
    options: list[str] = (),
) -> int:
    """Run the training under accelerate; return its exit code."""
    return subprocess.run(command(recipe, overrides, launch, resume, debug, options)).returncode


def quiet_worker() -> None:
    """Silence the library logging, warnings and progress bars of every process but the main one."""
    import warnings

    import datasets
    import transformers

    warnings.simplefilter("ignore")
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
