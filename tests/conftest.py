"""Shared fixtures: tiny models and data built once per session, offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never reach a hub unless asked to: everything loads from folders built here.
if not (os.environ.get("LORA_TUNE_NETWORK") == "1" or os.environ.get("LORA_TUNE_SMOKE_MODEL")):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Numbers the tests pin or compare exactly (golden losses, two runs that must agree) are fp32
# numbers, whichever CPU runs them: the CPU counts as lacking native bf16 (training stays fp32).
# tests/test_precision.py runs the automatic bf16 choice itself.
os.environ.setdefault("LORA_TUNE_CPU_BF16", "0")

ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(__file__).resolve().parent / "assets"


def pytest_collection_modifyitems(config, items):
    import torch

    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "network" in item.keywords and os.environ.get("LORA_TUNE_NETWORK") != "1":
            item.add_marker(
                pytest.mark.skip(reason="needs the Hugging Face Hub; set LORA_TUNE_NETWORK=1")
            )


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    """A folder with tiny-llama/, tiny-opt/ (random weights, saved with save_pretrained) and data/."""
    from lora_tune import tiny as builder

    out = tmp_path_factory.mktemp("tiny")
    builder.build_model("llama", out / "tiny-llama")
    builder.build_model("opt", out / "tiny-opt")
    builder.write_datasets(out / "data")
    return out
