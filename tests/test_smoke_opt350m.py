"""The shipped opt-350m recipe, end to end, on facebook/opt-350m's real architecture.

Offline it builds the architecture from its config.json (tests/assets) with random weights;
with LORA_TUNE_SMOKE_MODEL=facebook/opt-350m and a network it uses the real checkpoint.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
from helpers import run_cli

from lora_tune import tiny

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_opt_350m_train_eval_merge(tmp_path, capsys):
    model_id = os.environ.get("LORA_TUNE_SMOKE_MODEL")
    if not model_id:
        model_id = str(
            tiny.build_model(
                "opt",
                tmp_path / "opt-350m",
                ROOT / "tests/assets/opt-350m-config.json",
                dtype="float16",
            )
        )
        config = json.loads((tmp_path / "opt-350m" / "config.json").read_text())
        assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (
            1024,
            24,
            50272,
        )
    rng = random.Random(0)
    quotes = tiny.write_jsonl(
        tmp_path / "quotes.jsonl", [{"quote": tiny.sentence(rng)} for _ in range(40)]
    )
    run = tmp_path / "run"
    overrides = [
        f"model.id={model_id}",
        f"data.train={quotes}",
        "data.eval_fraction=0.1",
        "data.max_length=32",
        f"training.output_dir={run}",
        "training.max_steps=2",
        "training.per_device_train_batch_size=2",
    ]
    args = [x for item in overrides for x in ("--set", item)]

    assert run_cli("train", ROOT / "recipes/opt-350m-english-quotes.yaml", *args) == 0
    out = capsys.readouterr().out
    # r=16 on q_proj and v_proj (1024 -> 1024) in 24 layers: 24 * 2 * 16 * (1024 + 1024)
    assert "trainable parameters │ 1,572,864 of 332,769,280 (0.473%)" in out
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["trainable_parameters"] == 1_572_864

    report = tmp_path / "eval.json"
    assert run_cli("eval", run, "--compare", "--json", report) == 0
    results = json.loads(report.read_text())
    assert results["samples"] == 4
    assert results["merged_vs_adapter"]["ok"]

    merged = tmp_path / "merged"
    assert run_cli("merge", run, "-o", merged) == 0
    merge_report = json.loads((merged / "merge_report.json").read_text())
    assert merge_report["ok"] and merge_report["dtype"] == "float16"  # the checkpoint's own dtype
    assert json.loads((merged / "config.json").read_text())["hidden_size"] == 1024
