"""On a CUDA GPU: the automatic precision choice, and merge/eval tolerances in bf16."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import run_cli, write_recipe

pytestmark = pytest.mark.gpu


def test_auto_precision_train_eval_merge_on_gpu(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    path = write_recipe(tmp_path / "r.yaml", tiny, out, model={"dtype": "auto"})
    assert run_cli("train", path) == 0
    bf16 = torch.cuda.is_bf16_supported()
    plan = capsys.readouterr().out
    assert (
        "bf16 mixed" if bf16 else "fp16 mixed"
    ) in plan and "│ device               │ cuda" in plan
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["device"] == "cuda" and metrics["dtype"] == ("bfloat16" if bf16 else "float16")
    assert metrics["peak_gpu_bytes"] > 0

    report = tmp_path / "eval.json"
    assert run_cli("eval", out, "--compare", "--json", report) == 0
    results = json.loads(report.read_text())
    assert results["device"] == "cuda"
    assert (
        results["results"]["adapter"]["perplexity"] < 0.8 * results["results"]["base"]["perplexity"]
    )
    assert results["merged_vs_adapter"]["ok"]

    merged = tmp_path / "merged"
    assert run_cli("merge", out, "-o", merged, "--dtype", "bfloat16") == 0
    merge_report = json.loads((merged / "merge_report.json").read_text())
    assert merge_report["ok"] and merge_report["dtype"] == "bfloat16"
    assert 0 < merge_report["max_abs_diff"] <= merge_report["tolerance"]


def test_the_memory_estimate_matches_the_gpu_peak(tmp_path):
    """On a GPU (bf16), the plan's estimate within 10% of torch's peak allocation."""
    from test_memory import medium_model

    data = medium_model(tmp_path)
    path = tmp_path / "r.yaml"
    path.write_text(
        json.dumps(
            {
                "model": {"id": str(tmp_path / "model")},
                "lora": {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"},
                "data": {"train": str(data), "max_length": 128},
                "training": {
                    "output_dir": str(tmp_path / "run"),
                    "per_device_train_batch_size": 8,
                    "max_steps": 3,
                    "save_steps": 100,
                },
            }
        )
    )
    assert run_cli("train", path) == 0
    recorded = json.loads((tmp_path / "run" / "metrics.json").read_text())["memory"]
    assert 0.9 <= recorded["estimate_bytes"] / recorded["measured_bytes"] <= 1.1, recorded
