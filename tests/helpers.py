"""Helpers for the tests: recipes on the tiny models, and the CLI run in-process."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml


def write_recipe(path: Path, tiny: Path, out: Path, **sections) -> Path:
    """A small recipe on the tiny Llama; keyword sections update the defaults.

    Weights stay float32 on every device so that numbers compare exactly; test_gpu.py covers
    the automatic bf16 choice.
    """
    recipe = {
        "model": {"id": str(tiny / "tiny-llama"), "dtype": "float32"},
        "lora": {"r": 8, "lora_alpha": 16, "target_modules": "all-linear", "lora_dropout": 0.0},
        "data": {
            "train": str(tiny / "data" / "text_train.jsonl"),
            "eval": str(tiny / "data" / "text_eval.jsonl"),
            "max_length": 64,
        },
        "training": {
            "output_dir": str(out),
            "num_train_epochs": 3,
            "per_device_train_batch_size": 8,
            "learning_rate": 3e-3,
            "logging_steps": 10,
            "save_steps": 100,
            "seed": 0,
        },
    }
    for name, values in sections.items():  # trainer="dpo" sets the top-level key
        recipe[name] = {**recipe.get(name, {}), **values} if isinstance(values, dict) else values
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_cli(*args: str) -> int:
    """Run `lora-tune ARGS` in this process; return its exit code."""
    from lora_tune.cli import main

    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        return exc.code or 0
    return 0


@contextlib.contextmanager
def serve_process(*args: str, cwd: Path):
    """`lora-tune serve ARGS` on a free port of 127.0.0.1, on the CPU: yields its /v1 URL once it
    answers, and stops it afterwards."""
    import pytest

    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "lora_tune", "serve", *map(str, args), "--port", str(port)],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{url}/models", timeout=1)
            break
        except OSError:
            if process.poll() is not None:
                pytest.fail(f"the server exited: {process.stdout.read()[-3000:]}")
            time.sleep(0.3)
    try:
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def assert_resumes_to_same_adapter(make_recipe, tiny: Path, tmp_path: Path) -> None:
    """A run cut after its first checkpoint (checkpoint-2 of 4 steps, as a kill leaves it) and
    resumed in a new process ends with the adapter of a run never cut."""
    import json
    import shutil

    from safetensors.torch import load_file

    training = {"max_steps": 4, "save_steps": 2}
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert run_cli("train", make_recipe(tmp_path / "w.yaml", tiny, whole, training=training)) == 0
    path = make_recipe(tmp_path / "c.yaml", tiny, cut, training=training)
    assert run_cli("train", path) == 0
    for later in ("checkpoint-4", "adapter", "metrics.json"):
        target = cut / later
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    result = subprocess.run(
        [sys.executable, "-m", "lora_tune", "train", str(path)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Resuming from {cut / 'checkpoint-2'}" in result.stdout
    got = load_file(cut / "adapter" / "adapter_model.safetensors")
    want = load_file(whole / "adapter" / "adapter_model.safetensors")
    assert got.keys() == want.keys()
    assert max((got[k] - want[k]).abs().max().item() for k in got) < 1e-5
    assert json.loads((cut / "metrics.json").read_text())["steps"] == 4
