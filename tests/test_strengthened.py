"""Options whose effect is observable from outside: precision, launch configs, --debug, per-source
data settings and seeded sampling in serve."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml
from helpers import run_cli, serve_process, write_recipe
from safetensors.torch import load_file

from lora_tune.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def logged_losses(out: Path) -> list[float]:
    metrics = json.loads((out / "metrics.json").read_text())
    return [entry["loss"] for entry in metrics["log_history"] if "loss" in entry]


def test_bf16_true_on_cpu_trains_under_bf16_autocast(tiny, tmp_path, capsys):
    """training.bf16=true is honoured on the CPU: the plan says so, the losses carry bf16 rounding
    (they differ from an fp32 run of the same samples, yet stay close), and the adapter is still
    saved in float32 (mixed precision keeps float32 master weights)."""
    runs = {}
    for bf16 in (True, False):
        out = tmp_path / f"bf16-{bf16}"
        path = write_recipe(
            tmp_path / f"{bf16}.yaml",
            tiny,
            out,
            training={
                "max_steps": 2,
                "logging_steps": 1,
                "bf16": bf16,
                "fp16": False,
                "save_strategy": "no",
            },
        )
        assert run_cli("train", path) == 0
        plan = capsys.readouterr().out
        assert ("bf16 mixed" in plan) is bf16 and ("│ fp32" in plan) is not bf16
        runs[bf16] = logged_losses(out)
        weights = load_file(out / "adapter" / "adapter_model.safetensors")
        assert {str(t.dtype) for t in weights.values()} == {"torch.float32"}
        assert yaml.safe_load((out / "recipe.yaml").read_text())["training"]["bf16"] is bf16
    mixed, full = runs[True], runs[False]
    assert len(mixed) == len(full) == 2
    assert mixed[0] != full[0]  # bf16 matmuls round: the same first batch gives another loss
    assert mixed[0] == pytest.approx(full[0], abs=0.05)


def test_debug_shows_the_traceback_of_a_user_error(tiny, tmp_path, capsys):
    path = write_recipe(tmp_path / "r.yaml", tiny, tmp_path / "run", lora={"r": 0})
    assert run_cli("train", path) == 2
    assert "lora.r: the rank must be a positive integer, got 0." in capsys.readouterr().err
    with pytest.raises(UserError) as info:
        run_cli("--debug", "train", path)
    assert "lora.r: the rank must be a positive integer, got 0." in info.value.render()
    # The flag does not stick: the next command without it is a plain message again.
    assert run_cli("train", path) == 2
    assert not (tmp_path / "run").exists()


def test_debug_from_the_command_line_prints_a_traceback(tiny, tmp_path):
    path = write_recipe(tmp_path / "r.yaml", tiny, tmp_path / "run", lora={"r": 0})
    result = subprocess.run(
        [sys.executable, "-m", "lora_tune", "--debug", "train", str(path)],
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr and "UserError" in result.stderr
    assert "lora.r: the rank must be a positive integer, got 0." in result.stderr


@pytest.mark.slow
def test_accelerate_config_sets_the_launch(tiny, tmp_path):
    """The shipped DDP config, with 2 processes instead of 8, launches 2 processes on the CPU
    (gloo) without any --num-processes flag: the config file alone decides."""
    config = yaml.safe_load((ROOT / "configs" / "ddp.yaml").read_text())
    config["num_processes"] = 2
    config_file = tmp_path / "ddp2.yaml"
    config_file.write_text(yaml.safe_dump(config))
    out = tmp_path / "run"
    path = write_recipe(
        tmp_path / "r.yaml",
        tiny,
        out,
        training={"max_steps": 2, "per_device_train_batch_size": 4, "save_strategy": "no"},
    )
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lora_tune",
            "train",
            str(path),
            "--accelerate-config",
            str(config_file),
        ],
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["world_size"], metrics["distributed_type"], metrics["steps"]) == (
        2,
        "MULTI_CPU",
        2,
    )
    assert "2 process(es)" in result.stdout and result.stdout.count("Final train loss") == 1


def _folder_with_splits(folder: Path) -> Path:
    folder.mkdir()
    for split, count in (("train", 6), ("test", 3)):
        rows = "".join(
            json.dumps({"text": f"the {split} row number {i} is here."}) + "\n"
            for i in range(count)
        )
        (folder / f"{split}.jsonl").write_text(rows)
    return folder


def test_each_local_source_reads_its_own_split(tiny, tmp_path, capsys):
    folder = _folder_with_splits(tmp_path / "splits")
    sources = [
        {"path": str(folder), "split": "test"},
        {"path": str(folder), "split": "train[:2]"},
        str(folder),
    ]
    path = write_recipe(
        tmp_path / "r.yaml", tiny, tmp_path / "run", data={"train": sources, "eval": None}
    )
    assert run_cli("train", path, "--dry-run") == 0
    # 3 test rows + the first 2 train rows + all 6 train rows (data.split, the default 'train').
    assert "│ train samples        │ 11 (" in capsys.readouterr().out
    path = write_recipe(
        tmp_path / "r.yaml",
        tiny,
        tmp_path / "run",
        data={"train": sources, "eval": None, "split": "test"},
    )
    assert run_cli("train", path, "--dry-run") == 0
    assert (
        "│ train samples        │ 8 (" in capsys.readouterr().out
    )  # the bare source now reads test (3)
    assert not (tmp_path / "run").exists()


def test_each_hub_source_passes_its_own_subset_and_split(tiny, tmp_path, capsys, monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, subset=None, split=None, revision=None, **kwargs):
        calls.append((name, subset, split, revision))
        return datasets.Dataset.from_list([{"text": f"{name} says the sky is blue."}] * 4)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    sources = [
        {"path": "org/first", "subset": "small", "split": "validation", "revision": "v1"},
        "org/second",
    ]
    path = write_recipe(
        tmp_path / "r.yaml",
        tiny,
        tmp_path / "run",
        data={"train": sources, "eval": None, "subset": "default", "split": "train"},
    )
    assert run_cli("data", path, "-n", "0") == 0
    assert calls == [
        ("org/first", "small", "validation", "v1"),
        ("org/second", "default", "train", None),
    ]
    assert "│ train │ 8 " in capsys.readouterr().out


@pytest.fixture(scope="module")
def base_server(tiny):
    with serve_process(tiny / "tiny-llama", "--base-name", "base", cwd=ROOT) as url:
        yield url


def _complete(url: str, **body) -> str:
    request = urllib.request.Request(
        f"{url}/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())["choices"][0]["text"]


def test_sampling_with_a_seed_repeats_and_another_seed_differs(base_server):
    """A random-weight model samples nearly uniformly over its vocabulary: 16 tokens drawn with
    two seeds differ, and the same seed gives the same text, also after other requests."""
    body = {
        "model": "base",
        "prompt": "what colour is the meadow?",
        "max_tokens": 16,
        "temperature": 1.0,
    }
    first = _complete(base_server, **body, seed=7)
    other = _complete(base_server, **body, seed=8)
    unseeded = _complete(base_server, **body)
    assert _complete(base_server, **body, seed=7) == first
    assert first != other and first.strip() and unseeded.strip()
