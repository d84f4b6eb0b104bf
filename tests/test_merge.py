"""The streaming merge equals PEFT's merge_and_unload tensor by tensor, for every adapter kind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import run_cli, write_recipe
from safetensors.torch import load_file

from lora_tune import merge, runs, stream_merge
from lora_tune import tiny as builder


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory) -> Path:
    """A tiny GPT-2: its Conv1D layers store weights transposed (fan_in_fan_out)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    out = tmp_path_factory.mktemp("gpt2") / "tiny-gpt2"
    tokenizer = builder.build_tokenizer("opt")
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=128,
        bos_token_id=2,
        eos_token_id=2,
        pad_token_id=1,
    )
    GPT2LMHeadModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def make_adapter(base: Path, out: Path, **lora) -> Path:
    """A LoRA adapter with random (non-zero) B and perturbed extra tensors, saved like a trained one."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        LoraConfig(init_lora_weights=False, **({"r": 4, "lora_alpha": 8} | lora)),
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if (
                param.requires_grad
                and "lora_A" not in name
                and "lora_B" not in name
                and "embedding" not in name
            ):
                param.add_(
                    torch.randn_like(param) * 0.1
                )  # modules_to_save, biases, DoRA magnitudes
    model.save_pretrained(out)
    return out


def merged_by_peft(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(adapter))
    return {k: v for k, v in model.merge_and_unload().state_dict().items()}


def merged_by_streaming(
    base: Path, adapter: Path, out: Path, max_bytes=None
) -> dict[str, torch.Tensor]:
    out.mkdir()
    stream_merge.merge(stream_merge.plan(adapter, base), base, out, None, max_bytes)
    tensors = {}
    for path in out.glob("*.safetensors"):
        tensors |= load_file(path)
    return tensors


KINDS = {
    "plain": ("tiny-llama", {"target_modules": ["q_proj", "v_proj"]}),
    "rslora": ("tiny-llama", {"target_modules": "all-linear", "use_rslora": True}),
    "rank and alpha patterns": (
        "tiny-llama",
        {
            "target_modules": "all-linear",
            "rank_pattern": {"q_proj": 2},
            "alpha_pattern": {"layers.1.mlp.down_proj": 32},
        },
    ),
    "layers_to_transform": (
        "tiny-llama",
        {"target_modules": ["q_proj"], "layers_to_transform": [1]},
    ),
    "fan_in_fan_out": ("tiny-gpt2", {"target_modules": ["c_attn", "c_fc"], "fan_in_fan_out": True}),
    "bias all": ("tiny-opt", {"target_modules": ["q_proj", "fc1"], "bias": "all"}),
    "lora_bias": ("tiny-opt", {"target_modules": ["q_proj", "fc1"], "lora_bias": True}),
    "modules_to_save": (
        "tiny-llama",
        {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]},
    ),
    "dora": ("tiny-llama", {"target_modules": "all-linear", "use_dora": True}),
    "dora fan_in_fan_out": (
        "tiny-gpt2",
        {"target_modules": ["c_attn"], "fan_in_fan_out": True, "use_dora": True},
    ),
    "embedding": ("tiny-llama", {"target_modules": ["embed_tokens", "q_proj"]}),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_streaming_equals_merge_and_unload(kind, tiny, gpt2, tmp_path):
    name, lora = KINDS[kind]
    base = gpt2 if name == "tiny-gpt2" else tiny / name
    adapter = make_adapter(base, tmp_path / "adapter", **lora)
    expected = merged_by_peft(base, adapter)
    got = merged_by_streaming(base, adapter, tmp_path / "merged")
    tied = {
        k for k in expected.keys() - got.keys() if k == "lm_head.weight"
    }  # tied to the embeddings
    assert got.keys() == expected.keys() - tied
    changed = [k for k in got if not torch.equal(got[k], load_base(base)[k])]
    assert changed, "the adapter changed nothing: the test would prove nothing"
    worst = max((got[k] - expected[k]).abs().max().item() for k in got)
    assert worst <= 1e-6, f"{kind}: max abs diff {worst}"


def load_base(base: Path) -> dict[str, torch.Tensor]:
    return load_file(base / "model.safetensors")


def test_sharded_output_and_cli_report(tiny, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    adapter = make_adapter(tiny / "tiny-llama", tmp_path / "adapter", target_modules="all-linear")
    out = tmp_path / "merged"
    assert run_cli("merge", adapter, "-o", out, "--max-shard-size", "100KB") == 0
    assert "Merged vs adapter logits: max |diff|" in capsys.readouterr().out
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and all((out / s).is_file() for s in shards)
    report = json.loads((out / "merge_report.json").read_text())
    assert (report["method"], report["verified"], report["ok"]) == ("stream", True, True)
    assert report["max_abs_diff"] < 1e-4
    card = (out / "README.md").read_text()
    assert (
        f"base_model: {tiny / 'tiny-llama'}" in card
        and "Verification: merged and adapter-on-base logits" in card
    )
    AutoModelForCausalLM.from_pretrained(out)  # loads the index and every shard


def test_fallback_verification_and_no_verify(gpt2, tmp_path, capsys):
    # A pickle adapter cannot be streamed (safetensors only): merged in memory, saying why.
    plain = make_adapter(gpt2, tmp_path / "plain", target_modules=["c_attn"], fan_in_fan_out=True)
    pickled = Path(shutil.copytree(plain, tmp_path / "pickled"))
    torch.save(load_file(pickled / "adapter_model.safetensors"), pickled / "adapter_model.bin")
    (pickled / "adapter_model.safetensors").unlink()
    assert run_cli("merge", pickled, "-o", tmp_path / "merged", "--allow-pickle") == 0
    assert (
        "Merging in memory with merge_and_unload (not streamed: the adapter has no safetensors file)"
        in capsys.readouterr().out
    )
    assert json.loads((tmp_path / "merged" / "merge_report.json").read_text())["method"] == "memory"
    assert (
        run_cli("merge", pickled, "-o", tmp_path / "forced", "--method", "stream", "--allow-pickle")
        == 2
    )
    assert "--method stream: cannot stream this merge" in capsys.readouterr().err

    # LoRA on GPT-2's lm_head, which is tied to the embeddings: no lm_head.weight to stream into,
    # and merge_and_unload would fold the delta into the shared weight, changing the embeddings
    # too. Verification catches it and nothing is written.
    tied = make_adapter(
        gpt2, tmp_path / "tied", target_modules=["c_attn", "lm_head"], fan_in_fan_out=True
    )
    assert run_cli("merge", tied, "-o", tmp_path / "tied-merged") == 2
    captured = capsys.readouterr()
    assert "not streamed: no tensor lm_head.weight in the base checkpoint" in captured.out
    assert "merge refused: the merged model's logits differ from adapter-on-base" in captured.err
    assert "tie_word_embeddings: false" in captured.err and not (tmp_path / "tied-merged").exists()

    assert run_cli("merge", plain, "-o", tmp_path / "unverified", "--no-verify") == 0
    assert "Verification skipped (--no-verify)." in capsys.readouterr().out
    assert (
        json.loads((tmp_path / "unverified" / "merge_report.json").read_text())["verified"] is False
    )


def test_nan_in_a_merged_weight_names_the_tensor(tiny, tmp_path, capsys):
    from safetensors.torch import save_file

    adapter = make_adapter(tiny / "tiny-llama", tmp_path / "adapter", target_modules=["q_proj"])
    weights = load_file(adapter / "adapter_model.safetensors")
    weights["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"][0, 0] = float("inf")
    save_file(weights, adapter / "adapter_model.safetensors")
    assert run_cli("merge", adapter, "-o", tmp_path / "merged", "--no-verify") == 2
    assert (
        "merge refused: the merged tensor model.layers.1.self_attn.q_proj.weight has NaN or infinite values"
        in capsys.readouterr().err
    )
    assert not (tmp_path / "merged").exists()


def test_several_adapters(tiny, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = tiny / "tiny-llama"
    first = make_adapter(base, tmp_path / "a", target_modules=["q_proj"])
    second = make_adapter(base, tmp_path / "b", target_modules=["q_proj", "v_proj"], r=8)
    out = tmp_path / "merged"
    assert run_cli("merge", first, second, "--weights", "0.7", "0.3", "-o", out) == 0
    assert (
        "Merging in memory with merge_and_unload (several adapters are combined)"
        in capsys.readouterr().out
    )
    report = json.loads((out / "merge_report.json").read_text())
    assert report["ok"] and report["weights"] == [0.7, 0.3] and report["combination"] == "cat"
    # cat combines exactly: the merged q_proj is W + 0.7 * delta_a + 0.3 * delta_b.
    merged = load_file(out / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"]
    w = load_base(base)["model.layers.0.self_attn.q_proj.weight"]
    delta = {}
    for name, path in (("a", first), ("b", second)):
        plan = stream_merge.plan(path, base)
        delta[name] = plan.deltas["model.layers.0.self_attn.q_proj.weight"].weight()
    assert (merged - (w + 0.7 * delta["a"] + 0.3 * delta["b"])).abs().max().item() < 1e-6

    combined = tmp_path / "combined"
    assert (
        run_cli("merge", first, second, "--weights", "0.7,0.3", "-o", combined, "--adapter-only")
        == 0
    )
    assert (combined / "adapter_config.json").is_file() and (
        combined / "adapter_model.safetensors"
    ).is_file()
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(combined))
    assert torch.allclose(
        reloaded.merge_and_unload().state_dict()["model.layers.0.self_attn.q_proj.weight"],
        merged,
        atol=1e-6,
    )

    other = make_adapter(tiny / "tiny-opt", tmp_path / "c", target_modules=["q_proj"])
    assert run_cli("merge", first, other, "-o", tmp_path / "mixed") == 2
    assert "the adapters were trained on different base models" in capsys.readouterr().err


def test_probe_inputs_come_from_the_runs_eval_data(tiny, tmp_path):
    out = tmp_path / "run"
    assert (
        run_cli("train", write_recipe(tmp_path / "r.yaml", tiny, out, training={"max_steps": 5}))
        == 0
    )
    from lora_tune.models import load_tokenizer
    from lora_tune.recipe import ModelSection

    tokenizer = load_tokenizer(ModelSection(id=str(tiny / "tiny-llama")))
    samples = merge.probe_samples(runs.run_recipe(out / "adapter"), tokenizer)
    first_eval_text = json.loads((tiny / "data" / "text_eval.jsonl").read_text().splitlines()[0])[
        "text"
    ]
    assert (
        len(samples) == 4
        and tokenizer.decode(samples[0], skip_special_tokens=True) == first_eval_text
    )


@pytest.mark.parametrize("combination, extra", [("linear", []), ("ties", ["--density", "0.5"])])
def test_other_combinations_are_peft_s(combination, extra, tiny, tmp_path, capsys):
    """--combination reaches PEFT's add_weighted_adapter: the merged weights are PEFT's, and not cat's."""
    from peft import PeftModel
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    base = tiny / "tiny-llama"
    first = make_adapter(base, tmp_path / "a", target_modules=["q_proj", "v_proj"])
    second = make_adapter(base, tmp_path / "b", target_modules=["q_proj", "v_proj"])
    torch.manual_seed(5)  # the same seed made the same tensors: make the second adapter another one
    weights = {
        k: v + torch.randn_like(v) * 0.1
        for k, v in load_file(second / "adapter_model.safetensors").items()
    }
    save_file(weights, second / "adapter_model.safetensors")

    out = tmp_path / combination
    assert (
        run_cli(
            "merge",
            first,
            second,
            "--weights",
            "0.7",
            "0.3",
            "--combination",
            combination,
            *extra,
            "-o",
            out,
        )
        == 0
    )
    assert f"Merged model written to {out}" in capsys.readouterr().out
    report = json.loads((out / "merge_report.json").read_text())
    assert report["ok"] and report["combination"] == combination
    merged = load_file(out / "model.safetensors")

    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base), str(first), adapter_name="a"
    )
    model.load_adapter(str(second), adapter_name="b")
    density = {"density": 0.5} if extra else {}
    for name, kind in (("expected", combination), ("cat", "cat")):
        model.add_weighted_adapter(["a", "b"], [0.7, 0.3], name, combination_type=kind, **density)
    key = "model.layers.1.self_attn.v_proj.weight"
    expected, cat = {}, {}
    for name, into in (("expected", expected), ("cat", cat)):
        model.set_adapter(name)
        layer = model.base_model.model.model.layers[1].self_attn.v_proj
        into[key] = layer.get_base_layer().weight + layer.get_delta_weight(name)
    assert (merged[key] - expected[key]).abs().max().item() < 1e-6
    assert (merged[key] - cat[key]).abs().max().item() > 1e-3


def test_unknown_combination_is_refused(tiny, tmp_path, capsys):
    base = tiny / "tiny-llama"
    first = make_adapter(base, tmp_path / "a", target_modules=["q_proj"])
    second = make_adapter(base, tmp_path / "b", target_modules=["q_proj"])
    assert (
        run_cli("merge", first, second, "--combination", "average", "-o", tmp_path / "merged") == 2
    )
    err = capsys.readouterr().err
    assert (
        "--combination: unknown combination 'average'" in err
        and "use one of " in err
        and "cat" in err
    )
    assert not (tmp_path / "merged").exists()
