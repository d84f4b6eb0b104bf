"""The run directory: the contract between train, merge and eval.

runs/NAME/
  recipe.yaml     the resolved recipe
  adapter/        PEFT adapter (adapter_config.json, adapter_model.safetensors) + tokenizer
  checkpoint-*/   trainer checkpoints, for resume; COMPLETE marks one whose writing finished
  metrics.json    final metrics, throughput, memory, wall time, versions
  logs/           TensorBoard event files
  eval_history.jsonl  one line per `lora-tune eval` of the run
  lora-tune.lock  held by the `train` process that writes the run (ownership.py)
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

RECIPE = "recipe.yaml"
ADAPTER = "adapter"
INITIAL_ADAPTER = (
    "initial-adapter"  # PiSSA/OLoRA/CorDA runs: the adapter before training, for conversion
)
METRICS = "metrics.json"
LOGS = "logs"
COMPLETE = "lora-tune-complete"


def is_adapter(path: Path) -> bool:
    return (path / "adapter_config.json").is_file()


def is_run(path: Path) -> bool:
    return is_adapter(path / ADAPTER)


def adapter_dir(path: Path) -> Path | None:
    """The adapter inside a run directory, the directory itself if it is an adapter, else None."""
    if is_run(path):
        return path / ADAPTER
    return path if is_adapter(path) else None


def adapter_config(adapter: Path) -> dict:
    """adapter_config.json as a dict (read without importing peft). Raises UserError if unreadable."""
    from .errors import UserError

    try:
        return json.loads((adapter / "adapter_config.json").read_text())
    except (OSError, ValueError) as exc:
        raise UserError(
            f"{adapter}: unreadable adapter_config.json: {exc}",
            ["restore the file from the run, or retrain"],
        ) from None


def run_recipe(adapter: Path):
    """The recipe of the run an adapter belongs to, or None for a bare adapter."""
    from . import recipe

    path = adapter.parent / RECIPE
    return recipe.load(path) if adapter.name == ADAPTER and path.is_file() else None


def checkpoint_step(path: Path) -> int | None:
    match = re.fullmatch(r"checkpoint-(\d+)", path.name)
    return int(match.group(1)) if match else None


def is_complete_checkpoint(path: Path) -> bool:
    """True for a checkpoint whose saving finished: the marker is written after everything else."""
    return checkpoint_step(path) is not None and (path / COMPLETE).is_file()


def latest_checkpoint(run: Path) -> Path | None:
    """The complete checkpoint with the highest step; one cut short by a crash is never chosen."""
    done = (
        [p for p in run.glob("checkpoint-*") if is_complete_checkpoint(p)] if run.is_dir() else []
    )
    return max(done, key=checkpoint_step, default=None)


def give_umask_modes(folder: Path) -> None:
    """Give the files under `folder` the modes the user's umask asks for (0644 and 0755 under
    022): safetensors writes each file through a private 0600 temporary file."""
    umask = current_umask()
    for path in [folder, *folder.rglob("*")]:
        if path.is_symlink():
            continue
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def current_umask() -> int:
    """The process's umask, read without changing it where the system says it (Linux): setting
    it to read it would give files other threads create meanwhile the modes of umask 0."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o077)  # elsewhere: briefly the strictest common umask, never a looser one
    os.umask(umask)
    return umask


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def versions() -> dict[str, str]:
    """Versions of the libraries a result depends on."""
    import importlib.metadata as md
    import platform

    names = ["lora-tune", "torch", "transformers", "peft", "trl", "datasets", "accelerate"]
    found = {"python": platform.python_version()}
    for name in names:
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            found[name] = "not installed"
    return found
