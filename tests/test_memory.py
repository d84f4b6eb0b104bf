"""Will it fit? The memory estimate in the plan, the refusal and its advice, the auto batch size,
and the estimate against the measured peak of a real run."""

from __future__ import annotations

import json
import random

import pytest
from helpers import run_cli, write_recipe

from lora_tune import memory, train
from lora_tune import recipe as recipes
from lora_tune.errors import UserError

TERMS = [
    "base weights",
    "LoRA parameters",
    "gradients and optimizer state",
    "activations",
    "logits and loss",
    "fixed overhead",
]


def test_the_dry_run_shows_the_estimate_term_by_term(tiny, tmp_path, capsys):
    path = write_recipe(tmp_path / "r.yaml", tiny, tmp_path / "run")
    assert run_cli("train", path, "--dry-run", "--memory", "24GiB") == 0
    out = capsys.readouterr().out
    plan = train.make_plan(recipes.load(path), memory.parse_size("24GiB"))
    assert list(plan.memory.terms) == TERMS
    assert "memory per process (estimate)" in out
    for name, size in plan.memory.terms.items():
        assert f"│ {name:<29} │ {memory.gib(size):>9} │" in out
    assert f"│ available                     │ {'24.00 GiB':>9} │" in out
    assert "fits" in out and not (tmp_path / "run").exists()
    assert plan.capacity == 24 * 1024**3 and plan.advice == []


def test_a_run_past_the_memory_stops_before_any_weight_loads(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    path = write_recipe(tmp_path / "r.yaml", tiny, out, training={"max_steps": 2})
    plan = train.make_plan(recipes.load(path), memory.parse_size("10MiB"))
    assert run_cli("train", path, "--memory", "10MiB") == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == (
        f"error: the estimated peak memory per process, {memory.gib(plan.memory.total)}, "
        "exceeds the 10 MiB available (see the plan's memory table)"
    )
    changes = [change for change, _ in plan.advice]
    assert changes[0] == (
        "training.per_device_train_batch_size: 4 with gradient_accumulation_steps twice as high "
        "(the same effective batch)"
    )
    assert changes[1] == "training.gradient_checkpointing: true"
    lengths = [len(r["input_ids"]) for r in plan.train]
    half = max(lengths) // 2
    assert changes[2] == (
        f"data.max_length: {half} (truncates {sum(n > half for n in lengths):,} of "
        f"{len(lengths):,} samples)"
    )
    assert all(peak < plan.memory.total for _, peak in plan.advice)
    assert err[-1] == "  - or pass --force to train anyway (the estimate may be pessimistic)"
    assert not out.exists()
    assert run_cli("train", path, "--memory", "10MiB", "--force") == 0
    recorded = json.loads((out / "metrics.json").read_text())["memory"]
    assert recorded["estimate_bytes"] == plan.memory.total and recorded["measured_bytes"] > 0


def test_auto_batch_picks_the_largest_that_fits(tiny, tmp_path):
    def plan_for(batch, capacity=None):
        training = {"per_device_train_batch_size": batch, "output_dir": str(tmp_path / "run")}
        path = write_recipe(tmp_path / f"r{batch}.yaml", tiny, tmp_path / "run", training=training)
        return train.make_plan(recipes.load(path), capacity)

    four, eight = plan_for(4).memory.total, plan_for(8).memory.total
    between = int((four + eight) / 2 / memory.TIGHT)  # batch 4 fits this, batch 8 does not
    plan = plan_for("auto", between)
    assert plan.training_config.per_device_train_batch_size == 4
    assert plan.memory.total == four and plan.steps == plan_for(4).steps
    assert plan.recipe.to_dict()["training"]["per_device_train_batch_size"] == "auto"
    steps = dict(train.plan_rows(plan))["steps"]
    assert steps.endswith("; batch size auto: the largest that fits)")
    assert plan_for("auto", 10 * 1024**3).training_config.per_device_train_batch_size == 256


def medium_model(folder):
    """A Llama of about 6M parameters (hidden 256, 2 layers, 8k vocabulary) and 64 rows of text
    longer than 128 tokens: big enough that the step, not the process, sets the peak."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lora_tune import tiny

    tokenizer = tiny.build_tokenizer("llama")
    config = LlamaConfig(
        vocab_size=8000,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        bos_token_id=0,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    rng = random.Random(0)
    rows = [{"text": " ".join(tiny.sentence(rng) for _ in range(32))} for _ in range(64)]
    return tiny.write_jsonl(folder / "data.jsonl", rows)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_estimate_is_within_a_quarter_of_the_measured_peak(tmp_path, checkpointing):
    data = medium_model(tmp_path)
    path = tmp_path / "r.yaml"
    path.write_text(
        json.dumps(
            {
                "model": {"id": str(tmp_path / "model"), "dtype": "float32"},
                "lora": {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"},
                "data": {"train": str(data), "max_length": 128},
                "training": {
                    "output_dir": str(tmp_path / "run"),
                    "per_device_train_batch_size": 8,
                    "max_steps": 3,
                    "gradient_checkpointing": checkpointing,
                    "save_steps": 100,
                },
            }
        )
    )
    assert run_cli("train", path) == 0
    recorded = json.loads((tmp_path / "run" / "metrics.json").read_text())["memory"]
    ratio = recorded["estimate_bytes"] / recorded["measured_bytes"]
    assert 0.8 <= ratio <= 1.25, recorded
    assert sum(recorded["terms"].values()) == recorded["estimate_bytes"]


def test_memory_options_reach_every_launched_process(tmp_path):
    from lora_tune import launch

    how = launch.Launch(2, None, 1, 0, None, None)
    command = launch.command(tmp_path / "r.yaml", [], how, "auto", False, ["--memory", "8GiB"])
    assert command[-4:] == ["--resume", "auto", "--memory", "8GiB"]
    assert memory.parse_size("8GiB") == memory.parse_size("8GB") == 8 * 1024**3
    assert memory.parse_size("1.5 TiB") == int(1.5 * 1024**4)
    with pytest.raises(UserError) as info:
        memory.parse_size("lots")
    assert info.value.headline == "--memory: cannot read 'lots' as a memory size"


def test_packed_rows_are_estimated_at_max_length(tiny, tmp_path):
    def plan(packing):
        data = {"packing": packing, "max_length": 64}
        path = write_recipe(tmp_path / f"r{packing}.yaml", tiny, tmp_path / "run", data=data)
        return train.make_plan(recipes.load(path))

    packed, padded = plan(True), plan(False)
    longest = max(len(r["input_ids"]) for r in padded.train)
    ratio = packed.memory.terms["activations"] / padded.memory.terms["activations"]
    assert longest < 64 and ratio == pytest.approx(64 / longest, rel=1e-6)


def test_shapes_of_other_architectures_and_optimizer_state():
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, MambaConfig

    with torch.device("meta"):
        gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_layer=2, n_embd=64, n_head=4))
        mamba = AutoModelForCausalLM.from_config(
            MambaConfig(num_hidden_layers=2, hidden_size=64, vocab_size=100)
        )
    shape = memory.shape_of(gpt2)  # GPT-2 keeps its blocks under transformer.h, as Conv1D
    assert (shape.layers, shape.hidden, shape.mlp, shape.heads) == (2, 64, 256, 4)
    assert shape.quantizable == 2 * (64 * 192 + 64 * 64 + 64 * 256 + 256 * 64)
    assert memory.shape_of(mamba).heads == 0  # no attention heads: no crash
    assert [memory.optimizer_bytes(o) for o in ("adamw_torch", "adamw_bnb_8bit", "sgd")] == [
        8,
        2,
        4,
    ]


def test_auto_batch_with_flash_attention_plans(tiny, tmp_path):
    training = {"per_device_train_batch_size": "auto"}
    model = {"attn_implementation": "flash_attention_2"}
    path = write_recipe(tmp_path / "r.yaml", tiny, tmp_path / "run", training=training, model=model)
    recipe = recipes.load(path)
    assert train.choose_padding_free(recipe, train.check_model(recipe)) is True


def test_a_resumed_run_keeps_the_batch_auto_chose(tiny, tmp_path):
    out = tmp_path / "run"

    def recipe_for(batch, steps):
        training = {"per_device_train_batch_size": batch, "max_steps": steps, "save_steps": 2}
        return write_recipe(tmp_path / f"r{batch}{steps}.yaml", tiny, out, training=training)

    four = train.make_plan(recipes.load(recipe_for(4, 4))).memory.total
    eight = train.make_plan(recipes.load(recipe_for(8, 4))).memory.total
    between = int((four + eight) / 2 / memory.TIGHT)  # batch 4 fits, 8 does not
    assert run_cli("train", recipe_for("auto", 4), "--memory", str(between)) == 0
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["train_batch_size"] == 4
    longer = recipes.load(recipe_for("auto", 6))  # train longer, on a machine with more memory
    assert train.make_plan(longer, 10 * 1024**3).training_config.per_device_train_batch_size == 4
    fresh = train.make_plan(longer, 10 * 1024**3, "never")
    assert fresh.training_config.per_device_train_batch_size == 256
