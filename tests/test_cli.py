"""The whole loop through the CLI: train -> eval -> merge -> reload with plain transformers."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import free_port, run_cli, write_recipe
from safetensors.torch import load_file, save_file

from lora_tune import evaluate, merge
from lora_tune import recipe as recipes
from lora_tune.tiny import CHAT_TEMPLATE

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tiny, tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("run")
    out = base / "run"
    path = write_recipe(base / "recipe.yaml", tiny, out)
    assert run_cli("train", path, "--set", "training.learning_rate=4e-3") == 0
    return out


def test_run_directory(run_dir, tiny):
    assert {p.name for p in (run_dir / "adapter").iterdir()} >= {
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    weights = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert len(weights) == 2 * 7 * 2  # A and B for 7 linear layers in 2 blocks
    assert all(t.numel() > 0 and torch.isfinite(t).all() for t in weights.values())
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny / "tiny-llama")
    assert (config["r"], config["lora_alpha"]) == (8, 16)
    resolved = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    assert resolved["training"]["learning_rate"] == 4e-3  # the --set override, not the file's 3e-3
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == 150  # 400 samples / batch 8 * 3 epochs
    assert (
        math.isfinite(metrics["final_loss"]) and metrics["final_loss"] < metrics["train_loss"] + 1
    )
    assert metrics["tokens_per_second"] > 0 and metrics["train_tokens"] > 400 * 3 * 8
    assert metrics["peak_rss_bytes"] > 10_000_000 and metrics["wall_time_s"] > 0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert (metrics["device"], metrics["dtype"], metrics["trainable_parameters"]) == (
        device,
        "float32",
        16384,
    )
    assert {"torch", "transformers", "peft", "trl", "datasets", "accelerate"} <= metrics[
        "versions"
    ].keys()
    assert list((run_dir / "checkpoint-150").glob("optimizer.pt"))
    assert list((run_dir / "logs").rglob("events.out.tfevents.*"))

    # The loss curve: one logged loss per 10 steps, falling by far (~5.74 -> ~5.04 as measured).
    losses = [e["loss"] for e in metrics["log_history"] if "loss" in e]
    assert len(losses) == 15 and metrics["final_loss"] == losses[-1]
    assert (
        losses[-1] < losses[0] - 0.4 and losses[-1] < losses[4] - 0.1
    )  # still learning after epoch 1
    assert metrics["train_loss"] == pytest.approx(sum(losses) / len(losses), abs=1e-3)
    # Every B started at zero and was trained; the last checkpoint holds the same adapter at step 150.
    assert all(t.abs().max().item() > 1e-3 for k, t in weights.items() if "lora_B" in k)
    checkpoint = run_dir / "checkpoint-150"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == 150
    assert load_file(checkpoint / "adapter_model.safetensors").keys() == weights.keys()
    assert all(
        torch.equal(load_file(checkpoint / "adapter_model.safetensors")[k], t)
        for k, t in weights.items()
    )
    assert (checkpoint / "optimizer.pt").stat().st_size > (
        run_dir / "adapter" / "adapter_model.safetensors"
    ).stat().st_size
    # The tokenizer saved with the adapter is the base's: the same ids for the same text.
    from transformers import AutoTokenizer

    text = json.loads((tiny / "data" / "text_eval.jsonl").read_text().splitlines()[0])["text"]
    assert (
        AutoTokenizer.from_pretrained(run_dir / "adapter")(text)["input_ids"]
        == AutoTokenizer.from_pretrained(tiny / "tiny-llama")(text)["input_ids"]
    )
    assert sum(p.stat().st_size for p in (run_dir / "logs").rglob("events.out.tfevents.*")) > 1000


def test_eval_compare_shows_improvement_and_merged_equals_adapter(run_dir, tmp_path, capsys):
    report_file = tmp_path / "report.json"
    assert run_cli("eval", run_dir, "--compare", "--json", report_file) == 0
    out = capsys.readouterr().out
    assert "merged vs adapter: equal within tolerance" in out
    report = json.loads(report_file.read_text())
    results = report["results"]
    assert list(results) == ["base", "adapter", "merged"]
    assert report["samples"] == 64
    # Fine-tuning on rule-following text must cut held-out perplexity by far.
    assert results["adapter"]["perplexity"] < 0.6 * results["base"]["perplexity"]
    assert results["adapter"]["token_accuracy"] > results["base"]["token_accuracy"] + 0.3
    assert results["merged"]["loss"] == pytest.approx(results["adapter"]["loss"], abs=1e-5)
    assert report["merged_vs_adapter"]["ok"] and report["merged_vs_adapter"]["max_abs_diff"] < 1e-4


def test_eval_loss_is_token_weighted(run_dir, tiny):
    """Batch size and padding must not change the numbers."""
    from lora_tune import adapters, data

    model, tokenizer, _ = adapters.load_with_adapter(run_dir / "adapter")
    dataset = data.load_eval(str(tiny / "data" / "pc_eval.jsonl"), None, tokenizer)
    one, _ = evaluate.measure(model, evaluate.batches(dataset, 1, tokenizer.pad_token_id, "cpu"))
    seven, _ = evaluate.measure(model, evaluate.batches(dataset, 7, tokenizer.pad_token_id, "cpu"))
    assert (
        one["tokens"]
        == seven["tokens"]
        == sum(sum(label != -100 for label in row[1:]) for row in dataset["labels"])
    )
    assert seven["loss"] == pytest.approx(one["loss"], abs=1e-5)
    assert seven["token_accuracy"] == one["token_accuracy"]


def test_eval_default_is_merged_and_no_merge_is_adapter(run_dir, tiny, tmp_path):
    merged = evaluate.run(str(run_dir), json_file=tmp_path / "m.json")
    unmerged = evaluate.run(
        str(run_dir), merge=False, data_spec=str(tiny / "data" / "text_eval.jsonl")
    )
    assert list(merged["results"]) == ["merged"] and list(unmerged["results"]) == ["adapter"]
    assert merged["results"]["merged"]["loss"] == pytest.approx(
        unmerged["results"]["adapter"]["loss"], abs=1e-5
    )


def test_eval_plain_model_directory(tiny):
    report = evaluate.run(str(tiny / "tiny-opt"), data_spec=str(tiny / "data" / "text_eval.jsonl"))
    assert list(report["results"]) == ["model"]
    # A random model knows nothing: its perplexity is near the vocabulary size.
    assert 200 < report["results"]["model"]["perplexity"] < 800


def test_eval_errors(tiny, tmp_path, capsys):
    assert run_cli("eval", tiny / "tiny-llama", "--compare") == 2
    assert "--compare needs an adapter" in capsys.readouterr().err
    assert run_cli("eval", tiny / "tiny-llama") == 2
    assert "no evaluation data" in capsys.readouterr().err
    assert (
        run_cli("eval", tmp_path / "nothing-here", "--data", tiny / "data" / "text_eval.jsonl") == 2
    )
    assert "model.id: no model directory at" in capsys.readouterr().err


def test_merge_writes_a_plain_transformers_model_with_the_adapters_logits(
    run_dir, tmp_path, capsys
):
    out = tmp_path / "merged"
    assert run_cli("merge", run_dir, "-o", out) == 0
    assert "Merged vs adapter logits: max |diff|" in capsys.readouterr().out
    assert {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "merge_report.json",
    } <= {p.name for p in out.iterdir()}
    report = json.loads((out / "merge_report.json").read_text())
    assert report["ok"] and report["max_abs_diff"] < 1e-4
    assert not list(tmp_path.glob(".merged.*"))

    # Adapter-on-base logits here; the merged model's in a fresh process without peft or lora_tune.
    from lora_tune import adapters

    model, tokenizer, _ = adapters.load_with_adapter(run_dir / "adapter")
    batch = merge.probe_batch(tokenizer, "cpu")
    expected = merge.logits_of(model, batch)
    torch.save(batch, tmp_path / "batch.pt")
    code = f"""
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained({str(out)!r}).eval()
AutoTokenizer.from_pretrained({str(out)!r})
batch = torch.load({str(tmp_path / "batch.pt")!r})
with torch.no_grad():
    torch.save(model(**batch).logits[batch['attention_mask'].bool()], {str(tmp_path / "logits.pt")!r})
print('imported:', [m for m in ('peft', 'lora_tune', 'trl') if m in sys.modules])
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "imported: []" in result.stdout
    reloaded = torch.load(tmp_path / "logits.pt")
    assert (reloaded - expected).abs().max().item() < 1e-4
    # And the adapter really changed the model: base logits differ.
    with model.disable_adapter():
        base = merge.logits_of(model, batch)
    assert (base - expected).abs().max().item() > 1e-2


def test_merge_refuses_to_overwrite_without_force(run_dir, tmp_path, capsys):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert run_cli("merge", run_dir, "-o", out) == 2
    assert f"error: {out} already exists" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert run_cli("merge", run_dir, "-o", out, "--force") == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_merge_crash_mid_write_leaves_no_output(run_dir, tmp_path, monkeypatch):
    from lora_tune import stream_merge

    def crash(*args, **kwargs):  # after the weights, before the tokenizer
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(stream_merge, "copy_tokenizer", crash)
    out = tmp_path / "merged"
    with pytest.raises(KeyboardInterrupt):
        merge.run(run_dir, out)
    assert list(tmp_path.iterdir()) == []


def test_merge_refuses_a_broken_adapter(run_dir, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in (run_dir / "adapter").iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    weights = load_file(broken / "adapter_model.safetensors")
    name = next(k for k in weights if "lora_B" in k)
    weights[name][0, 0] = float("nan")
    save_file(weights, broken / "adapter_model.safetensors")
    out = tmp_path / "merged"
    assert run_cli("merge", broken, "-o", out) == 2
    err = capsys.readouterr().err
    assert "merge refused" in err and "Traceback" not in err
    assert not out.exists()


def test_merge_input_errors(tmp_path, capsys):
    assert run_cli("merge", tmp_path, "-o", tmp_path / "out") == 2
    assert "not a run directory or PEFT adapter (no adapter_config.json)" in capsys.readouterr().err


def test_dry_run_prints_the_plan_and_writes_nothing(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    path = write_recipe(
        tmp_path / "r.yaml", tiny, out, lora={"target_modules": ["q_proj", "v_proj"]}
    )
    assert run_cli("train", path, "--dry-run") == 0
    text = capsys.readouterr().out
    # q_proj 64->64 and v_proj 64->32 (2 kv heads) at r=8, in 2 layers: 2 * (8*(64+64) + 8*(64+32))
    assert "3,584 of" in text and "400 (5,332 trained tokens)" in text and "150 (batch 8" in text
    assert not out.exists()


def test_unknown_target_module_lists_the_real_ones(tiny, tmp_path, capsys):
    path = write_recipe(
        tmp_path / "r.yaml", tiny, tmp_path / "run", lora={"target_modules": ["q_proj", "query"]}
    )
    assert run_cli("train", path) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: lora.target_modules: query not found in {tiny / 'tiny-llama'}.",
        "  - its linear layers: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj",
        "  - or use target_modules: all-linear",
    ]
    assert not (tmp_path / "run").exists()


def _train_in_subprocess(*args: str) -> subprocess.Popen:
    # On the CPU (gloo), also where a GPU exists: the launch path is what is tested here.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.Popen(
        [sys.executable, "-m", "lora_tune", "train", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
    )


def _losses_and_adapter(out):
    metrics = json.loads((out / "metrics.json").read_text())
    losses = [e["loss"] for e in metrics["log_history"] if "loss" in e]
    return metrics, losses, load_file(out / "adapter" / "adapter_model.safetensors")


@pytest.mark.slow
def test_two_processes_train_like_one(tiny, tmp_path):
    """DDP over 2 CPU processes (batch 4 each) against 1 process (batch 8), same seed: the same
    samples in each step, so the same loss curve and adapter. Only rank 0 prints and writes."""
    results = {}
    for processes in (1, 2):
        out = tmp_path / f"run{processes}"
        path = write_recipe(
            tmp_path / f"r{processes}.yaml",
            tiny,
            out,
            training={
                "max_steps": 8,
                "per_device_train_batch_size": 8 // processes,
                "logging_steps": 1,
                "save_steps": 4,
            },
        )
        run = _train_in_subprocess(path, "--num-processes", processes)
        stdout, stderr = run.communicate()
        assert run.returncode == 0, stderr[-3000:]
        assert stdout.count("lora-tune plan") == 1 and stdout.count("Final train loss") == 1
        assert stderr.count("Loading weights: 100%") == 1  # the other rank is quiet
        results[processes] = _losses_and_adapter(out)
    (one, one_losses, one_adapter), (two, two_losses, two_adapter) = results[1], results[2]
    assert (two["world_size"], two["steps"], one["steps"]) == (2, 8, 8)
    assert len(one_losses) == 8 and two_losses == pytest.approx(one_losses, abs=1e-4)
    for name, tensor in one_adapter.items():
        assert torch.allclose(two_adapter[name], tensor, atol=1e-4), name
    assert sorted(p.name for p in (tmp_path / "run2").iterdir()) == sorted(
        p.name for p in (tmp_path / "run1").iterdir()
    )


@pytest.mark.slow
def test_two_machines_rendezvous_on_loopback(tiny, tmp_path):
    port = free_port()
    out = tmp_path / "run"
    path = write_recipe(
        tmp_path / "r.yaml", tiny, out, training={"max_steps": 4, "per_device_train_batch_size": 4}
    )
    machines = [
        _train_in_subprocess(
            path,
            "--num-processes",
            2,
            "--num-machines",
            2,
            "--machine-rank",
            rank,
            "--main-process-ip",
            "127.0.0.1",
            "--main-process-port",
            port,
        )
        for rank in (0, 1)
    ]
    outputs = [machine.communicate(timeout=300) for machine in machines]
    for machine, (_, stderr) in zip(machines, outputs, strict=False):
        assert machine.returncode == 0, stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["world_size"], metrics["steps"]) == (2, 4)
    assert "Final train loss" in outputs[0][0] and "Final train loss" not in outputs[1][0]


@pytest.mark.slow
def test_slurm_script_on_two_simulated_nodes(tiny, tmp_path):
    """scripts/slurm_multi_node.sh as written, with stand-ins for srun (one task per node, here
    on this machine) and scontrol (the first node is 127.0.0.1), one CPU process per node."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\necho 127.0.0.1\n")
    (bin_dir / "srun").write_text(
        "#!/usr/bin/env bash\nshift  # --ntasks-per-node=1\npids=()\n"
        'for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_NODEID=$i "$@" & pids+=($!); done\n'
        'rc=0; for p in "${pids[@]}"; do wait "$p" || rc=1; done; exit $rc\n'
    )
    for tool in ("scontrol", "srun"):
        (bin_dir / tool).chmod(0o755)
    port = free_port()
    out = tmp_path / "run"
    path = write_recipe(
        tmp_path / "r.yaml", tiny, out, training={"max_steps": 4, "per_device_train_batch_size": 4}
    )
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
        "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "node[1-2]",
        "GPUS_PER_NODE": "1",
        "MAIN_PORT": str(port),
        "CUDA_VISIBLE_DEVICES": "",
    }
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "slurm_multi_node.sh"), str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["world_size"], metrics["steps"], metrics["distributed_type"]) == (
        2,
        4,
        "MULTI_CPU",
    )
    assert result.stdout.count("Final train loss") == 1


def test_train_resumes_from_the_latest_checkpoint(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    path = write_recipe(
        tmp_path / "r.yaml", tiny, out, training={"max_steps": 20, "save_steps": 10}
    )
    assert run_cli("train", path) == 0
    first = json.loads((out / "metrics.json").read_text())
    capsys.readouterr()
    assert run_cli("train", path, "--set", "training.max_steps=30") == 0
    assert f"Resuming from {out / 'checkpoint-20'} (epoch 0.40)" in capsys.readouterr().out
    second = json.loads((out / "metrics.json").read_text())
    assert second["steps"] == 30 and second["epochs"] == pytest.approx(0.6)
    # Tokens of this invocation only: 10 steps, half of the first run's 20.
    assert second["train_tokens"] == pytest.approx(first["train_tokens"] / 2, rel=0.1)
    assert (
        run_cli(
            "train",
            path,
            "--set",
            "training.max_steps=30",
            "--resume",
            "never",
            "--set",
            "training.save_strategy='no'",
        )
        == 0
    )
    assert json.loads((out / "metrics.json").read_text())["train_tokens"] == pytest.approx(
        first["train_tokens"] * 1.5, rel=0.1
    )


@pytest.mark.parametrize("name", ["text", "pc", "chat", "alpaca"])
def test_each_format_trains_evaluates_and_merges(tiny, tmp_path, name):
    from transformers import AutoTokenizer

    out = tmp_path / "run"
    data_section = {
        "train": str(tiny / "data" / f"{name}_train.jsonl"),
        "eval": str(tiny / "data" / f"{name}_eval.jsonl"),
        "max_length": 96,
    }
    if name == "chat":
        data_section["chat_template"] = CHAT_TEMPLATE
    path = write_recipe(
        tmp_path / "r.yaml", tiny, out, data=data_section, training={"max_steps": 40}
    )
    assert run_cli("train", path) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"]["train"]["samples"] == 400 and metrics["data"]["train"]["skipped"] == {}
    report = evaluate.run(str(out), compare=True)
    results = report["results"]
    assert results["adapter"]["loss"] < results["base"]["loss"] - 0.2
    assert report["merged_vs_adapter"]["ok"]
    merged = tmp_path / "merged"
    merge.run(out, merged)
    if (
        name == "chat"
    ):  # the template used in training travels with the adapter and the merged model
        assert AutoTokenizer.from_pretrained(out / "adapter").chat_template == CHAT_TEMPLATE
        assert AutoTokenizer.from_pretrained(merged).chat_template == CHAT_TEMPLATE


def test_packed_training(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    path = write_recipe(
        tmp_path / "r.yaml", tiny, out, data={"packing": True}, training={"num_train_epochs": 1}
    )
    assert run_cli("train", path) == 0
    text = capsys.readouterr().out
    # 400 samples of 15 tokens on average fill about 90 rows of 64 tokens: 12 steps of batch 8.
    assert "400 (5,332 trained tokens), packed" in text
    metrics = json.loads((out / "metrics.json").read_text())
    assert 10 <= metrics["steps"] <= 13
    path = write_recipe(
        tmp_path / "opt.yaml",
        tiny,
        out,
        model={"id": str(tiny / "tiny-opt")},
        data={"packing": True},
    )
    assert run_cli("train", path, "--dry-run") == 2
    assert "cannot keep samples in one row apart" in capsys.readouterr().err


def test_padding_free_batches_train_exactly_like_padded_ones(tiny, tmp_path, capsys):
    """Padding-free batches (the default with flash attention, on for SDPA here) keep samples apart in
    Llama: the same samples in the same steps give the losses and adapter of padded batches.
    OPT would mix them, so it is refused there."""

    runs = {}
    for padding_free in (True, False):
        out = tmp_path / f"run-{padding_free}"
        path = write_recipe(
            tmp_path / "r.yaml",
            tiny,
            out,
            data={
                "train": str(tiny / "data" / "pc_train.jsonl"),
                "eval": None,
                "padding_free": padding_free,
            },
            training={"max_steps": 8, "logging_steps": 1},
        )
        assert run_cli("train", path) == 0
        runs[padding_free] = (
            json.loads((out / "metrics.json").read_text()),
            load_file(out / "adapter" / "adapter_model.safetensors"),
        )
    assert re.search(
        r"400 \([\d,]+ trained tokens\), padding-free batches", capsys.readouterr().out
    )
    (free, free_adapter), (padded, padded_adapter) = runs[True], runs[False]
    losses = [[e["loss"] for e in m["log_history"] if "loss" in e] for m in (free, padded)]
    assert len(losses[0]) == 8 and losses[0] == pytest.approx(losses[1], abs=1e-4)
    assert losses[0][-1] < losses[0][0] - 0.1
    for name, tensor in padded_adapter.items():
        assert torch.allclose(free_adapter[name], tensor, atol=1e-4), name
    for attention, default in (
        ("sdpa", False),
        ("flash_attention_2", True),
    ):  # the plan loads no weights
        path = write_recipe(
            tmp_path / "a.yaml", tiny, tmp_path / "a", model={"attn_implementation": attention}
        )
        assert run_cli("train", path, "--dry-run") == 0
        assert ("padding-free batches" in capsys.readouterr().out) is default, attention
    path = write_recipe(
        tmp_path / "opt.yaml",
        tiny,
        tmp_path / "opt",
        model={"id": str(tiny / "tiny-opt")},
        data={"padding_free": True},
    )
    assert run_cli("train", path, "--dry-run") == 2
    assert "data.padding_free: " in capsys.readouterr().err


def test_data_preview(tiny, tmp_path, capsys):
    from lora_tune import preview
    from lora_tune.models import load_tokenizer
    from lora_tune.recipe import ModelSection

    path = write_recipe(
        tmp_path / "r.yaml",
        tiny,
        tmp_path / "run",
        data={"train": str(tiny / "data" / "pc_train.jsonl"), "eval": None, "max_length": 12},
    )
    assert run_cli("data", path, "-n", "2") == 0
    out = capsys.readouterr().out
    assert out.count("sample ") == 2 and "what colour is the" in out
    assert "│ train │ 400  │ 400     │ 0       │ " in out  # rows, samples, nothing skipped
    assert not (tmp_path / "run").exists()
    stats = preview.run(recipes.load(path), n=0)
    assert stats["train"]["truncated"] > 0 and stats["train"]["length"]["max"] == 12

    tokenizer = load_tokenizer(ModelSection(id=str(tiny / "tiny-llama")))
    text = preview.render_sample(tokenizer, [0, 264, 395, 2], [-100, -100, 395, 2])
    styles = [(text.plain[span.start : span.end], span.style) for span in text.spans]
    assert styles[:2] == [("<s>", preview.MASKED), (tokenizer.decode([264]), preview.MASKED)]
    assert styles[2:] == [(tokenizer.decode([395]), preview.TRAINED), ("</s>", preview.TRAINED)]


def test_gradient_accumulation_matches_a_full_batch(tiny, tmp_path):
    """Loss is normalized by the tokens of the whole accumulated batch: 1 x 8 and 2 x 4 agree."""
    adapters = {}
    for name, batch, accumulation in (("full", 8, 1), ("accumulated", 4, 2)):
        out = tmp_path / name
        path = write_recipe(
            tmp_path / f"{name}.yaml",
            tiny,
            out,
            data={"train": str(tiny / "data" / "pc_train.jsonl")},
            training={
                "max_steps": 1,
                "per_device_train_batch_size": batch,
                "gradient_accumulation_steps": accumulation,
                "train_sampling_strategy": "sequential",
                "learning_rate": 1.0,
                "optim": "sgd",  # SGD: unlike Adam's first step, scale-sensitive
                "bf16": False,
                "fp16": False,
            },
        )  # exact arithmetic on GPUs too
        assert run_cli("train", path) == 0
        adapters[name] = load_file(out / "adapter" / "adapter_model.safetensors")
    moved = max((adapters["full"][k]).abs().max().item() for k in adapters["full"] if "lora_B" in k)
    assert moved > 1e-4  # one step really changed the adapter
    assert (
        max(
            (adapters["full"][k] - adapters["accumulated"][k]).abs().max().item()
            for k in adapters["full"]
        )
        < 1e-6
    )
