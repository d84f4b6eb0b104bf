"""The run directory: the contract between train, merge and eval.

    runs/NAME/
      recipe.yaml     the resolved recipe
      adapter/        PEFT adapter (adapter_config.json, adapter_model.safetensors) + tokenizer
      checkpoint-*/   trainer checkpoints, for resume
      metrics.json    final metrics, throughput, memory, wall time, versions
      logs/           TensorBoard event files
"""

from __future__ import annotations

import json
from pathlib import Path

RECIPE = "recipe.yaml"
ADAPTER = "adapter"
METRICS = "metrics.json"
LOGS = "logs"


def is_adapter(path: Path) -> bool:
    return (path / "adapter_config.json").is_file()


def is_run(path: Path) -> bool:
    return is_adapter(path / ADAPTER)


def adapter_dir(path: Path) -> Path | None:
    """The adapter inside a run directory, the directory itself if it is an adapter, else None."""
    if is_run(path):
        return path / ADAPTER
    return path if is_adapter(path) else None


def run_recipe(adapter: Path):
    """The recipe of the run an adapter belongs to, or None for a bare adapter."""
    from . import recipe

    path = adapter.parent / RECIPE
    return recipe.load(path) if adapter.name == ADAPTER and path.is_file() else None


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
