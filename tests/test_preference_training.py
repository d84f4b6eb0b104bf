"""Preference tuning (DPO, KTO, ORPO, SimPO) with LoRA: each method trains end to end, DPO from
an SFT adapter uses the SFT model as its reference (loss ln 2 at step 0) without a second copy of
the base, runs resume, and two processes train like one."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from helpers import assert_resumes_to_same_adapter, run_cli, write_recipe
from safetensors.torch import load_file

from lora_tune import runs

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def pref_recipe(path, tiny, out, trainer="dpo", **sections):
    """A preference recipe on the tiny Llama's question/answer pairs."""
    data = {
        "train": str(tiny / "data" / "pref_train.jsonl"),
        "eval": str(tiny / "data" / "pref_eval.jsonl"),
    }
    training = {"max_steps": 4, "logging_steps": 1, "save_steps": 100, "learning_rate": 1e-3}
    sections = {
        "data": data | sections.pop("data", {}),
        "training": training | sections.pop("training", {}),
        **sections,
    }
    return write_recipe(path, tiny, out, trainer=trainer, **sections)


@pytest.fixture(scope="module")
def sft_run(tiny, tmp_path_factory):
    """A short SFT run on the same questions: the start of the preference stage."""
    tmp = tmp_path_factory.mktemp("sft")
    out = tmp / "sft"
    data = {
        "train": str(tiny / "data" / "pc_train.jsonl"),
        "eval": str(tiny / "data" / "pc_eval.jsonl"),
    }
    path = write_recipe(tmp / "sft.yaml", tiny, out, data=data, training={"max_steps": 30})
    assert run_cli("train", path) == 0
    return out


def metrics(out) -> dict:
    return json.loads((out / runs.METRICS).read_text())


def logits(model, tokenizer, text="what colour is the river? the river is"):
    with torch.no_grad():
        return model(**tokenizer(text, return_tensors="pt")).logits


def test_dpo_from_an_sft_adapter_starts_at_ln2_with_the_sft_model_as_reference(
    tiny, tmp_path, sft_run
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "dpo"
    model, training = {"adapter": str(sft_run)}, {"logging_steps": 2}
    path = pref_recipe(tmp_path / "dpo.yaml", tiny, out, model=model, training=training)
    assert run_cli("train", path) == 0
    found = metrics(out)
    # Step 0: the policy is the SFT model; a reference equal to it gives -log sigmoid(0) = ln 2.
    # DPO logs the first step alone (logging_first_step), whatever logging_steps says.
    assert found["trainer"] == "dpo" and found["steps"] == 4
    assert found["method"]["first_logged_step"] == 1
    assert found["method"]["first_logged_loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert {"rewards/accuracies", "rewards/margins"} <= found["method"].keys()
    # The SFT model is not the base: a base reference would not have given ln 2.
    tokenizer = AutoTokenizer.from_pretrained(sft_run / "adapter")
    base = AutoModelForCausalLM.from_pretrained(tiny / "tiny-llama")
    sft = PeftModel.from_pretrained(base, sft_run / "adapter")
    sft_logits = logits(sft, tokenizer)
    with sft.disable_adapter():
        assert (logits(sft, tokenizer) - sft_logits).abs().max() > 0.1
    # The adapter continued the SFT one: same shape and settings, new weights, no reference copy.
    saved = json.loads((out / "adapter" / "adapter_config.json").read_text())
    start = json.loads((sft_run / "adapter" / "adapter_config.json").read_text())
    assert (saved["r"], sorted(saved["target_modules"])) == (
        start["r"],
        sorted(start["target_modules"]),
    )
    assert not (out / "adapter" / "ref").exists()
    trained = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny / "tiny-llama"), out / "adapter"
    )
    assert (logits(trained, tokenizer) - sft_logits).abs().max() > 1e-4
    # merge -> merged equals adapter
    merged = tmp_path / "merged"
    assert run_cli("merge", out, "-o", merged) == 0
    report = json.loads((merged / "merge_report.json").read_text())
    assert report["ok"] and report["max_abs_diff"] < 1e-4


@pytest.mark.parametrize(
    "trainer, first_loss",
    [("dpo", math.log(2)), ("kto", 0.5), ("orpo", None), ("simpo", None)],
)
def test_each_method_trains_reloads_and_merges(tiny, tmp_path, trainer, first_loss):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / trainer
    path = pref_recipe(tmp_path / "r.yaml", tiny, out, trainer=trainer)
    assert run_cli("train", path) == 0
    found = metrics(out)
    losses = [e["loss"] for e in found["log_history"] if "loss" in e]
    assert found["trainer"] == trainer and found["steps"] == 4 and len(losses) == 4
    assert all(math.isfinite(loss) for loss in losses)
    if first_loss is not None:  # a fresh adapter (B = 0) is its own reference at step 0
        assert losses[0] == pytest.approx(first_loss, abs=1e-3)
        import trl.trainer.utils

        from lora_tune import train

        # On a CPU the reference-based trainers score tokens in small chunks (memory).
        assert trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE == train.CPU_LOG_PROB_ROWS
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny / "tiny-llama"), out / "adapter"
    )
    b = [p for name, p in model.named_parameters() if "lora_B" in name]
    assert b and max(p.abs().max().item() for p in b) > 0  # it trained
    merged = tmp_path / "merged"
    assert run_cli("merge", out, "-o", merged) == 0
    assert json.loads((merged / "merge_report.json").read_text())["ok"]


def test_dry_run_plan_names_the_method_and_its_reference(tiny, tmp_path, sft_run, capsys):
    from lora_tune import recipe as recipes
    from lora_tune import train

    out = tmp_path / "dpo"
    model = {"adapter": str(sft_run)}
    path = pref_recipe(tmp_path / "r.yaml", tiny, out, model=model, training={"beta": 0.2})
    assert run_cli("train", path, "--dry-run") == 0
    assert "│ trainer " in capsys.readouterr().out and not out.exists()
    plan = train.make_plan(recipes.load(path))
    assert train.describe_trainer(plan) == (
        f"dpo (beta=0.2, loss_type=sigmoid), continuing "
        f"{sft_run / 'adapter'}, reference: the starting adapter, as a frozen second adapter on "
        "the same base"
    )
    assert train.plan_rows(plan)[2] == (
        "method",
        "LoRA r=8, alpha=16, targets=[down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, "
        "v_proj]",
    )
    rows = dict(train.plan_rows(plan))
    assert rows["train pairs"].startswith("400 (") and rows["eval pairs"].startswith("64 (")
    path = pref_recipe(tmp_path / "r2.yaml", tiny, out, trainer="orpo")
    assert train.describe_trainer(train.make_plan(recipes.load(path))) == "orpo (beta=0.1)"
    path = pref_recipe(tmp_path / "r3.yaml", tiny, out)
    assert train.describe_trainer(train.make_plan(recipes.load(path))).endswith(
        ", reference: the base with the adapter switched off"
    )


def test_a_killed_dpo_run_resumes_to_the_same_adapter(tiny, tmp_path):
    assert_resumes_to_same_adapter(pref_recipe, tiny, tmp_path)


@pytest.mark.slow
def test_two_processes_train_dpo_like_one(tiny, tmp_path):
    """DDP over 2 CPU processes (2 pairs each) against 1 process (4 pairs), same seed: the same
    pairs in each step, so the same losses and adapter."""
    results = {}
    for processes in (1, 2):
        out = tmp_path / f"run{processes}"
        training = {"per_device_train_batch_size": 4 // processes}
        path = pref_recipe(tmp_path / f"r{processes}.yaml", tiny, out, training=training)
        command = [sys.executable, "-m", "lora_tune", "train", str(path)]
        command += ["--num-processes", str(processes)]
        env = {**__import__("os").environ, "CUDA_VISIBLE_DEVICES": ""}
        run = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
        assert run.returncode == 0, run.stderr[-3000:]
        found = metrics(out)
        losses = [e["loss"] for e in found["log_history"] if "loss" in e]
        results[processes] = found, losses, load_file(out / "adapter" / "adapter_model.safetensors")
    (one, one_losses, one_adapter), (two, two_losses, two_adapter) = results[1], results[2]
    assert (two["world_size"], two["steps"], one["steps"]) == (2, 4, 4)
    assert len(one_losses) == 4 and two_losses == pytest.approx(one_losses, abs=1e-4)
    for name, tensor in one_adapter.items():
        assert torch.allclose(two_adapter[name], tensor, atol=1e-4), name


def test_a_starting_adapter_is_checked_before_any_weight_loads(tiny, tmp_path, sft_run, capsys):
    out = tmp_path / "dpo"
    cases = [
        (
            {"model": {"adapter": str(sft_run)}, "lora": {"r": 4}},
            f"error: lora: the starting adapter {sft_run / 'adapter'} has its own settings, and the "
            "lora section contradicts them: lora.r: 4, the adapter has 8",
        ),
        (
            {"model": {"adapter": str(tmp_path)}},
            f"error: model.adapter: {tmp_path} is not a run or adapter directory (no "
            "adapter_config.json)",
        ),
        (
            {"model": {"adapter": str(sft_run), "id": str(tiny / "tiny-opt")}},
            f"error: model.adapter: {sft_run / 'adapter'} was trained on "
            f"'{tiny / 'tiny-llama'}', model.id is '{tiny / 'tiny-opt'}'",
        ),
    ]
    for sections, message in cases:  # the default lora section agrees with the adapter's
        path = pref_recipe(tmp_path / "r.yaml", tiny, out, **sections)
        assert run_cli("train", path, "--dry-run") == 2
        assert capsys.readouterr().err.splitlines()[0] == message
        assert not out.exists()


def test_a_dpo_run_is_served_beside_its_sft_start(tiny, tmp_path, sft_run):
    """`lora-tune serve` on the DPO run with the SFT run as a second adapter: each name answers
    as its adapter does through PEFT directly (greedy)."""
    import openai
    from helpers import serve_process
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "dpo"
    model = {"adapter": str(sft_run)}
    path = pref_recipe(tmp_path / "r.yaml", tiny, out, model=model, training={"max_steps": 8})
    assert run_cli("train", path) == 0
    prompt = "what does the river do?"
    wanted = {}
    for name, run in (("dpo", out), ("sft", sft_run)):
        tokenizer = AutoTokenizer.from_pretrained(run / "adapter")
        peft_model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(tiny / "tiny-llama"), run / "adapter"
        ).eval()
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            generated = peft_model.generate(ids, max_new_tokens=6, do_sample=False)
        wanted[name] = tokenizer.decode(generated[0, ids.shape[1] :], skip_special_tokens=True)
    with serve_process(out, "--adapter", f"sft={sft_run}", cwd=ROOT) as url:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
        served = {
            name: client.completions.create(model=name, prompt=prompt, max_tokens=6, temperature=0)
            .choices[0]
            .text
            for name in ("dpo", "sft")
        }
    assert served == wanted


def test_kto_needs_two_rows_and_dpo_refuses_an_adalora_start(tiny, tmp_path, capsys):
    from lora_tune.errors import UserError
    from lora_tune.recipe import validate

    recipe = {"trainer": "kto", "model": {"id": "m"}, "data": {"train": "x.jsonl"}}
    with pytest.raises(UserError) as info:
        validate(recipe | {"training": {"output_dir": "o", "per_device_train_batch_size": 1}})
    assert info.value.problems == [
        "training.per_device_train_batch_size: trainer kto needs at least 2 rows per device and "
        "step (its KL term pairs each completion with another row's prompt); got 1."
    ]
    adalora = tmp_path / "adalora"
    lora = {"method": "adalora", "init_r": 8, "target_r": 4, "tinit": 2, "tfinal": 2}
    data = {"train": str(tiny / "data" / "pc_train.jsonl"), "eval": None}
    path = write_recipe(
        tmp_path / "a.yaml", tiny, adalora, lora=lora, data=data, training={"max_steps": 12}
    )
    assert run_cli("train", path) == 0
    model, lora = {"adapter": str(adalora)}, {"target_modules": "all-linear"}
    path = pref_recipe(tmp_path / "d.yaml", tiny, tmp_path / "dpo", model=model)
    text = path.read_text().replace("lora_alpha: 16\n", "").replace("  r: 8\n", "")
    path.write_text(text.replace("  lora_dropout: 0.0\n", ""))
    capsys.readouterr()
    assert run_cli("train", path, "--dry-run") == 2
    assert capsys.readouterr().err.splitlines()[0] == (
        f"error: model.adapter: {adalora / 'adapter'} is an AdaLoRA adapter; trainer dpo keeps "
        "its reference as a second adapter, which AdaLoRA does not allow"
    )
