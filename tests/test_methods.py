"""LoRA variants and targets: each one trains, reloads with plain PEFT on the original base,
merges, and the merged model answers exactly as the trained adapter did."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import run_cli, write_recipe
from safetensors.torch import load_file

from lora_tune import data, evaluate
from lora_tune import recipe as recipes
from lora_tune.models import load_tokenizer
from lora_tune.recipe import ModelSection

STEPS = 16
VARIANTS = {
    "dora": {"use_dora": True},
    "rslora": {"use_rslora": True},
    "gaussian": {"init_lora_weights": "gaussian"},
    "orthogonal": {"init_lora_weights": "orthogonal"},
    "pissa": {"init_lora_weights": "pissa"},
    "pissa_niter": {"init_lora_weights": "pissa_niter_4"},
    "olora": {"init_lora_weights": "olora"},
    "corda": {"init_lora_weights": "corda"},
    "eva": {"init_lora_weights": "eva"},
    "mica": {"init_lora_weights": "mica"},
    "patterns": {"rank_pattern": {"q_proj": 4}, "alpha_pattern": {"q_proj": 32}},
    "layers_to_transform": {"layers_to_transform": [1], "target_modules": ["q_proj", "v_proj"]},
    "modules_to_save": {"modules_to_save": ["lm_head"]},
    "regex_targets": {"target_modules": r".*\.(q_proj|v_proj)"},
    "loraplus": {"loraplus_lr_ratio": 16},
    "adalora": {
        "method": "adalora",
        "init_r": 8,
        "target_r": 4,
        "tinit": 2,
        "tfinal": 4,
        "deltaT": 2,
    },
}
# AdaLoRA starts its singular values at zero, from small random A and B: it needs a larger step.
LEARNING_RATES = {"adalora": 3e-2}


def train_variant(tiny, tmp_path, lora: dict, name: str = "run", learning_rate: float = 3e-3):
    out = tmp_path / name
    path = write_recipe(
        tmp_path / f"{name}.yaml",
        tiny,
        out,
        lora=lora,
        data={
            "train": str(tiny / "data" / "pc_train.jsonl"),
            "eval": str(tiny / "data" / "pc_eval.jsonl"),
        },
        training={
            "max_steps": STEPS,
            "logging_steps": 4,
            "eval_strategy": "steps",
            "eval_steps": STEPS,
            "per_device_eval_batch_size": 64,
            "save_strategy": "no",
            "learning_rate": learning_rate,
        },
    )
    assert run_cli("train", path) == 0
    return out


def eval_batches(tiny):
    tokenizer = load_tokenizer(ModelSection(id=str(tiny / "tiny-llama")))
    rows = data.load_eval(str(tiny / "data" / "pc_eval.jsonl"), None, tokenizer)
    return evaluate.batches(rows, 64, tokenizer.pad_token_id, "cpu")


# What each option leaves in the saved adapter_config.json: proof it reached PEFT.
SAVED_FIELDS = {
    "rslora": {"use_rslora": True},
    "gaussian": {"init_lora_weights": "gaussian"},
    "orthogonal": {"init_lora_weights": "orthogonal"},
    "eva": {"init_lora_weights": "eva"},
    "mica": {"init_lora_weights": "mica"},
}


@pytest.fixture(scope="module")
def default_adapter(tiny, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The adapter of the same run with no variant option: what a dropped option would give."""
    out = train_variant(tiny, tmp_path_factory.mktemp("default"), {}, "default")
    return load_file(out / "adapter" / "adapter_model.safetensors")


def differs(weights: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> bool:
    """Another shape (EVA reallocates ranks) or values apart by more than rounding."""
    return weights.keys() != other.keys() or any(
        weights[k].shape != other[k].shape or (weights[k] - other[k]).abs().max().item() > 1e-3
        for k in weights
    )


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_trains_reloads_and_merges(variant, tiny, tmp_path, capsys, request):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = train_variant(
        tiny, tmp_path, VARIANTS[variant], learning_rate=LEARNING_RATES.get(variant, 3e-3)
    )
    metrics = json.loads((out / "metrics.json").read_text())
    batches = eval_batches(tiny)
    base = AutoModelForCausalLM.from_pretrained(tiny / "tiny-llama").eval()
    base_loss = evaluate.measure(base, batches)[0]["loss"]

    # Plain PEFT on the untouched base reproduces the model as it was at the end of training.
    reloaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny / "tiny-llama"), out / "adapter"
    ).eval()
    adapter_metrics, adapter_logits = evaluate.measure(reloaded, batches)
    assert adapter_metrics["loss"] == pytest.approx(metrics["eval_loss"], abs=1e-4)
    assert adapter_metrics["loss"] < base_loss - 0.05  # it learned something

    assert run_cli("merge", out, "-o", tmp_path / "merged") == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    merged_metrics, merged_logits = evaluate.measure(merged, batches)
    assert (merged_logits - adapter_logits).abs().max() < 1e-4
    assert merged_metrics["loss"] == pytest.approx(adapter_metrics["loss"], abs=1e-5)

    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    weights = load_file(out / "adapter" / "adapter_model.safetensors")
    text = capsys.readouterr().out
    if variant == "dora":
        assert any("lora_magnitude_vector" in k for k in weights) and "DoRA" in text
    if (
        variant in SAVED_FIELDS
    ):  # the option reached PEFT: saved, and the adapter is not the default one
        assert {key: config[key] for key in SAVED_FIELDS[variant]} == SAVED_FIELDS[variant]
        assert differs(weights, request.getfixturevalue("default_adapter"))
    if variant in ("pissa", "pissa_niter", "olora", "corda"):
        # Converted for the original base: twice the rank, and the initial state kept in the run.
        assert config["r"] == 16 and config["init_lora_weights"] is True
        assert (out / "initial-adapter" / "adapter_model.safetensors").is_file()
    if variant == "patterns":
        assert (
            weights["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape[0] == 4
        )
        assert (
            weights["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"].shape[0] == 8
        )
    if variant == "layers_to_transform":
        assert weights and all(".layers.1." in k for k in weights)
    if variant == "modules_to_save":
        assert "base_model.model.lm_head.weight" in weights
    if variant == "regex_targets":
        assert {k.split(".")[-3] for k in weights} == {"q_proj", "v_proj"}
    if variant == "adalora":
        assert config["peft_type"] == "ADALORA" and any("lora_E" in k for k in weights)
        assert config["rank_pattern"]  # ranks were reallocated during training
        assert "Merging in memory with merge_and_unload (not streamed: ADALORA adapters)" in text


def test_loraplus_trains_b_faster_than_a(tiny, tmp_path):
    """LoRA+ gives B a learning rate 16 times A's: B (zero at the start) moves about 16 times further."""
    norms = {}
    for name, lora in (("plain", {}), ("loraplus", {"loraplus_lr_ratio": 16})):
        weights = load_file(
            train_variant(tiny, tmp_path, lora, name) / "adapter" / "adapter_model.safetensors"
        )
        norms[name] = {
            part: sum(w.norm() ** 2 for k, w in weights.items() if f"lora_{part}" in k) ** 0.5
            for part in "AB"
        }
    assert norms["loraplus"]["B"] / norms["plain"]["B"] > 6
    assert norms["loraplus"]["A"] / norms["plain"]["A"] < 2


@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_modules_lists_layers_and_suggests_targets(kind, tiny, capsys):
    assert run_cli("modules", tiny / f"tiny-{kind}", "-r", "8") == 0
    text = capsys.readouterr().out
    if kind == "llama":
        assert (
            "model.layers.*.self_attn.k_proj │  64 -> 32 │     2 │                  1,536" in text
        )
        assert (
            "attention only: target_modules: [q_proj, k_proj, v_proj, o_proj]  ->  7,168 trainable"
            in text
        )
        assert "all linear layers: target_modules: all-linear  ->  16,384 trainable" in text
        assert "model.embed_tokens, lm_head" in text
    else:
        assert "model.decoder.layers.*.fc1" in text and "128 -> 64" in text
        assert (
            "attention only: target_modules: [k_proj, v_proj, q_proj, out_proj]  ->  8,192 trainable"
            in text
        )
        assert "all linear layers: target_modules: all-linear  ->  14,336 trainable" in text


def test_method_and_option_errors(tiny, tmp_path, capsys):
    cases = {
        "bad method": (
            {"method": "vera"},
            "lora.method: expected one of lora, adalora, got 'vera'.",
        ),
        "typo": (
            {"loraplus_lr_ratoi": 16},
            "lora.loraplus_lr_ratoi: unknown key. Did you mean 'loraplus_lr_ratio'?",
        ),
        "ratio": (
            {"loraplus_lr_ratio": -1},
            "lora.loraplus_lr_ratio: expected a positive number, got -1.",
        ),
        "loftq": (
            {"init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 4}},
            "lora.init_lora_weights: loftq fits the adapter to a base that is quantized afterwards",
        ),
        "adalora field on lora": ({"init_r": 12}, "lora.init_r: unknown key."),
        "adalora too short": (
            {"method": "adalora", "tinit": 10, "tfinal": 10},
            "lora: The supplied schedule values don't allow for a budgeting phase. Decrease `tfinal`/`tinit` or "
            "increase `total_step`. (this run trains 16 steps)",
        ),
    }
    for name, (lora, message) in cases.items():
        path = write_recipe(
            tmp_path / "r.yaml", tiny, tmp_path / "run", lora=lora, training={"max_steps": 16}
        )
        assert run_cli("train", path, "--dry-run") == 2, name
        assert message in capsys.readouterr().err, name


@pytest.mark.parametrize("saved_as", ["token rows", "whole layers"])
def test_added_tokens_are_trained_saved_and_merged(saved_as, tiny, tmp_path, capsys):
    """By default only the new tokens' rows train (trainable_token_indices); with the embedding
    layers in modules_to_save, the whole resized layers train and are saved."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_tune import adapters, models

    rows = [
        json.loads(line) for line in (tiny / "data" / "pc_train.jsonl").read_text().splitlines()
    ]
    train = tmp_path / "train.jsonl"
    train.write_text(
        "".join(
            json.dumps({"prompt": "<|q|> " + r["prompt"], "completion": r["completion"] + " stop!"})
            + "\n"
            for r in rows
        )
    )
    out = tmp_path / "run"
    path = write_recipe(
        tmp_path / "r.yaml",
        tiny,
        out,
        lora={"modules_to_save": ["embed_tokens", "lm_head"]} if saved_as == "whole layers" else {},
        data={
            "train": str(train),
            "eval_fraction": 0.1,
            "eval": None,
            "add_tokens": ["stop!"],
            "add_special_tokens": ["<|q|>"],
        },
        training={
            "max_steps": 30,
            "eval_strategy": "steps",
            "eval_steps": 30,
            "per_device_eval_batch_size": 64,
            "save_strategy": "no",
        },
    )
    assert run_cli("train", path) == 0
    base_size = len(AutoTokenizer.from_pretrained(tiny / "tiny-llama"))
    tokenizer = AutoTokenizer.from_pretrained(out / "adapter")
    new_ids = tokenizer.convert_tokens_to_ids(["stop!", "<|q|>"])
    assert len(tokenizer) == base_size + 2 and new_ids == [base_size, base_size + 1]
    ids = tokenizer("<|q|> stop!", add_special_tokens=False)["input_ids"]
    assert (ids[0], ids[-1]) == (new_ids[1], new_ids[0])  # each is one token
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    weights = load_file(out / "adapter" / "adapter_model.safetensors")
    if saved_as == "token rows":  # only the new rows are saved, not the whole layers
        assert config["trainable_token_indices"] == {"embed_tokens": new_ids, "lm_head": new_ids}
        token_rows = [w for k, w in weights.items() if "trainable_tokens" in k]
        assert len(token_rows) == 2 and all(w.shape == (2, 64) for w in token_rows)
        assert not any(w.shape[0] >= base_size for w in weights.values())
    else:
        assert config["trainable_token_indices"] is None
        assert (
            sorted(w.shape for w in weights.values() if w.shape[0] >= base_size)
            == [(base_size + 2, 64)] * 2
        )

    # lora-tune's loader grows the base to the adapter's vocabulary and reproduces the trained model.
    model, tokenizer, _ = adapters.load_with_adapter(out / "adapter", "float32")
    rows = data.load_datasets(recipes.load(path).data, tokenizer)[1]
    batches = evaluate.batches(rows, 64, tokenizer.pad_token_id, "cpu")
    adapter_metrics, adapter_logits = evaluate.measure(model, batches)
    assert adapter_metrics["loss"] == pytest.approx(
        json.loads((out / "metrics.json").read_text())["eval_loss"], abs=1e-4
    )

    assert run_cli("merge", out, "-o", tmp_path / "merged") == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert merged.config.vocab_size == base_size + 2
    assert len(AutoTokenizer.from_pretrained(tmp_path / "merged")) == base_size + 2
    merged_logits = evaluate.measure(merged, batches)[1]
    assert (merged_logits - adapter_logits).abs().max() < 1e-4
    # The new rows were trained: they moved away from where they started.
    start = AutoModelForCausalLM.from_pretrained(tiny / "tiny-llama")
    models.fit_vocabulary(start, tokenizer)
    for layer in ("get_input_embeddings", "get_output_embeddings"):
        moved = getattr(merged, layer)().weight[new_ids] - getattr(start, layer)().weight[new_ids]
        assert moved.abs().max() > 1e-2, layer
        kept = (
            getattr(merged, layer)().weight[:base_size] - getattr(start, layer)().weight[:base_size]
        )
        assert (kept.abs().max().item() == 0) is (saved_as == "token rows"), (
            layer
        )  # whole layers train every row


def test_pissa_run_resumes_to_the_same_adapter(tiny, tmp_path):
    """Resuming re-creates the same PiSSA residual base (TRL seeds it) and keeps the first initial state."""
    adapters = {}
    for name in ("straight", "resumed"):
        out = tmp_path / name
        path = write_recipe(
            tmp_path / f"{name}.yaml",
            tiny,
            out,
            lora={"init_lora_weights": "pissa_niter_2"},
            training={"max_steps": 16, "save_steps": 8, "lr_scheduler_type": "constant"},
        )
        if name == "resumed":
            assert run_cli("train", path, "--set", "training.max_steps=8") == 0
            initial = (out / "initial-adapter" / "adapter_model.safetensors").read_bytes()
        assert run_cli("train", path) == 0
        if name == "resumed":
            assert (out / "initial-adapter" / "adapter_model.safetensors").read_bytes() == initial
        adapters[name] = load_file(out / "adapter" / "adapter_model.safetensors")
    for key, tensor in adapters["straight"].items():
        assert torch.allclose(adapters["resumed"][key], tensor, atol=1e-5), key


def test_quantization_needs_bitsandbytes(tiny, tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "bitsandbytes" else real(name, *a),
    )
    path = write_recipe(
        tmp_path / "r.yaml", tiny, tmp_path / "run", model={"quantization": {"bits": 4}}
    )
    assert run_cli("train", path, "--dry-run") == 2
    assert (
        "model.quantization: the bitsandbytes package is not installed" in capsys.readouterr().err
    )


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_trains_and_merges_into_the_full_precision_base(bits, tiny, tmp_path, capsys):
    """On CUDA, or on the CPU with a bitsandbytes that supports it (0.50 does)."""
    pytest.importorskip("bitsandbytes")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    path = write_recipe(
        tmp_path / "r.yaml",
        tiny,
        out,
        model={"dtype": "auto", "quantization": {"bits": bits}},
        training={"max_steps": 40},
    )
    assert run_cli("train", path) == 0
    assert f"{bits}-bit" in capsys.readouterr().out
    assert any(".weight.absmax" in k or "SCB" in k for k in _quantized_state(out, tiny, bits))
    metrics = json.loads((out / "metrics.json").read_text())
    losses = [e["loss"] for e in metrics["log_history"] if "loss" in e]
    assert losses[-1] < losses[0] - 0.1

    merged = tmp_path / "merged"
    assert run_cli("merge", out, "-o", merged, "--dtype", "float32") == 0
    assert (
        f"was trained on a {bits}-bit base: loading the full-precision" in capsys.readouterr().out
    )
    assert json.loads((merged / "merge_report.json").read_text())["ok"]
    # The merged model is a plain full-precision model: the adapter on the unquantized base,
    # which still does better than the base on held-out data.
    model = AutoModelForCausalLM.from_pretrained(merged).eval()
    assert model.dtype == torch.float32 and not getattr(model, "is_loaded_in_4bit", False)
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny / "tiny-llama"), out / "adapter"
    )
    batches = eval_batches(tiny)
    merged_metrics, merged_logits = evaluate.measure(model, batches)
    assert (merged_logits - evaluate.measure(reference.eval(), batches)[1]).abs().max() < 1e-4
    base = AutoModelForCausalLM.from_pretrained(tiny / "tiny-llama").eval()
    assert merged_metrics["loss"] < evaluate.measure(base, batches)[0]["loss"] - 0.05


def _quantized_state(out, tiny, bits):
    """The state dict keys of the base as lora-tune loads it for this run: quantized ones included."""
    from lora_tune import models

    model = models.load_model(recipes.load(out / "recipe.yaml").model, torch.float32)
    return list(model.state_dict())
