"""Against the real Hugging Face Hub (opt in: LORA_TUNE_NETWORK=1)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.network
def test_shipped_opt_350m_recipe_plans_against_the_hub(tmp_path, capsys):
    recipe = ROOT / "recipes" / "opt-350m-english-quotes.yaml"
    assert (
        run_cli("train", recipe, "--dry-run", "--set", f"training.output_dir={tmp_path / 'run'}")
        == 0
    )
    out = capsys.readouterr().out
    assert "1,572,864 of 332,769,280" in out  # r=16 on q_proj and v_proj of facebook/opt-350m
    assert "from Abirate/english_quotes" in out
    assert "memory per process (estimate)" in out and "│ verdict " in out
    assert not (tmp_path / "run").exists()


@pytest.mark.network
def test_shipped_dpo_recipe_plans_against_the_hub(tmp_path):
    from lora_tune import recipe as recipes
    from lora_tune import train

    path = ROOT / "recipes" / "qwen2-0.5b-dpo-ultrafeedback.yaml"
    plan = train.make_plan(recipes.load(path, [f"training.output_dir={tmp_path / 'run'}"]))
    assert train.describe_trainer(plan).startswith("dpo (beta=0.1, loss_type=")
    assert set(plan.train.column_names) == {"prompt", "chosen", "rejected"}
    assert plan.data_stats["train"]["samples"] > 50_000  # UltraFeedback's binarized train split
    assert plan.steps == 1000 and not (tmp_path / "run").exists()
    assert plan.memory.terms["logits and loss"] > 0  # the fused head's chunks, not the batch


@pytest.mark.network
def test_shipped_grpo_recipe_plans_against_the_hub(tmp_path):
    from lora_tune import recipe as recipes
    from lora_tune import train

    path = ROOT / "recipes" / "qwen2.5-0.5b-grpo-gsm8k.yaml"
    plan = train.make_plan(recipes.load(path, [f"training.output_dir={tmp_path / 'run'}"]))
    assert train.describe_trainer(plan) == (
        "grpo (num_generations=8, max_completion_length=256, temperature=1.0, beta=0.0, "
        "loss_type=dapo), no reference (beta=0)"
    )
    assert set(plan.train.column_names) == {"prompt", "answer"}  # question renamed to prompt
    assert plan.data_stats["train"]["samples"] == 7473  # GSM8K's train split, every question
    assert plan.data_stats["eval"]["samples"] == 1319
    assert dict(train.plan_rows(plan))["rewards"] == "number_match (answer) x1"
    assert plan.steps == 500 and not (tmp_path / "run").exists()
