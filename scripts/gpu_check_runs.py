"""The runs of scripts/gpu_check.py, on the model and data that `build` writes: each trains,
evaluates or merges once and returns its numbers as a dict (gpu_check.py sets them side by side
and judges them). Peaks are measured as lora-tune's metrics.json measures them: the most memory
torch allocated on a GPU, the peak resident memory above a mark on a CPU."""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
LORA = {"r": 16, "lora_alpha": 32, "target_modules": "all-linear", "lora_dropout": 0.0}
LEARNING_RATE = 1e-4


@dataclass
class Context:
    mode: str  # gpu or cpu
    work: Path
    out: Path  # the JSON file
    isolate: bool  # each run in a process of its own
    deadline: float  # time.time() after which no new run starts
    sizes: dict = field(default_factory=dict)

    @property
    def model(self) -> Path:
        return self.work / "model"

    def left(self) -> float:
        return self.deadline - time.time()


# Building the model and data ----------------------------------------------------------------


def build(ctx: Context) -> dict:
    """The model (random weights, bf16 checkpoint), its tokenizer and the data files; returns the
    model's description."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lora_tune import tiny

    s = ctx.sizes
    tokenizer = tiny.build_tokenizer("llama")
    config = LlamaConfig(
        vocab_size=s["vocab"] or len(tokenizer),
        hidden_size=s["hidden"],
        intermediate_size=s["intermediate"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"],
        max_position_embeddings=2 * s["length"],
        bos_token_id=0,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    device = "cuda" if ctx.mode == "gpu" else "cpu"
    with torch.device(device):  # initialising 0.85B weights on the GPU takes seconds, not minutes
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(ctx.model)
    tokenizer.save_pretrained(ctx.model)
    parameters = sum(p.numel() for p in model.parameters())
    del model
    release()
    write_data(ctx)
    return {"parameters": parameters, "config": config.to_diff_dict()}


def write_data(ctx: Context) -> None:
    """fixed.jsonl: rows past `length` tokens (truncated to it); varying.jsonl: 1 sentence (~14
    tokens) to `length` tokens, uniformly; eval.jsonl: varying lengths too."""
    from lora_tune import tiny

    s, rng = ctx.sizes, random.Random(0)
    sentences = max(2, s["length"] // 13)
    rows = s["steps"] * s["batch"] * 2

    def text(n: int) -> dict:
        return {"text": " ".join(tiny.sentence(rng) for _ in range(n))}

    tiny.write_jsonl(ctx.work / "fixed.jsonl", [text(sentences + 2) for _ in range(rows)])
    varying = [text(rng.randint(1, sentences)) for _ in range(rows)]
    tiny.write_jsonl(ctx.work / "varying.jsonl", varying)
    evaluation = [text(rng.randint(1, sentences)) for _ in range(s["eval_rows"])]
    tiny.write_jsonl(ctx.work / "eval.jsonl", evaluation)


# Memory marks: the peak of a run, as lora-tune's metrics.json measures it --------------------


def memory_mark() -> int:
    """Start measuring a run's peak: GPU peak statistics reset, or (CPU) the resident memory now,
    with the peak reset to it."""
    import torch

    from lora_tune import hardware

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return 0
    hardware.reset_peak_resident()
    return hardware.resident_bytes()


def peak_since(mark: int) -> int:
    """The most memory torch allocated on the GPU, or the peak resident memory above `mark`."""
    import torch

    from lora_tune import hardware

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return hardware.resident_bytes("VmHWM") - mark


def automatic_precision() -> tuple:
    """(weights dtype, autocast dtype or None): what lora-tune picks on this hardware."""
    import torch

    from lora_tune import hardware, models

    chosen = hardware.precision_defaults(cpu=not torch.cuda.is_available())
    autocast = None
    if chosen["bf16"]:
        autocast = torch.bfloat16
    elif chosen["fp16"]:
        autocast = torch.float16
    return models.resolve_dtype("auto"), autocast


# The runs: each returns a dict of numbers --------------------------------------------------


def samples(ctx: Context, data: str):
    """The rows lora-tune trains on (its own tokenization), and the tokenizer."""
    from lora_tune import data as lt_data
    from lora_tune.models import load_tokenizer
    from lora_tune.recipe import DataSection, ModelSection

    tokenizer = load_tokenizer(ModelSection(id=str(ctx.model)))
    section = DataSection(train=str(ctx.work / f"{data}.jsonl"), max_length=ctx.sizes["length"])
    rows, _, _ = lt_data.load_datasets(section, tokenizer)
    return rows, tokenizer


def run_raw(ctx: Context) -> dict:
    """The loop users write: PEFT model, forward, backward, AdamW, in lora-tune's precision."""
    import torch
    from bench_train import padded_batch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    rows, tokenizer = samples(ctx, "fixed")
    dtype, autocast = automatic_precision()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    mark = memory_mark()
    model = AutoModelForCausalLM.from_pretrained(ctx.model, dtype=dtype).to(device)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **LORA))
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE
    )
    batch, times, losses, tokens = ctx.sizes["batch"], [], [], 0
    for step in range(ctx.sizes["steps"] + 1):
        ids, labels, mask = padded_batch(
            rows.select(range(step * batch, (step + 1) * batch)), tokenizer.pad_token_id
        )
        start = time.perf_counter()
        with torch.autocast(device, dtype=autocast or dtype, enabled=autocast is not None):
            out = model(
                input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device)
            )
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.loss.item())  # also waits for the GPU
        times.append(time.perf_counter() - start)
        tokens += int(mask.sum()) if step else 0
    return {
        "step_s": statistics.median(times[1:]),
        "tokens_per_step": tokens / ctx.sizes["steps"],
        "peak_bytes": peak_since(mark),
        "losses": losses,
        "precision": precision_name(dtype, autocast),
    }


def precision_name(dtype, autocast) -> str:
    short = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}
    if autocast is None:
        return short[str(dtype)]
    return f"{short[str(autocast)]} autocast, {short[str(dtype)]} weights"


def run_trl(ctx: Context) -> dict:
    """The SFTTrainer script of the PEFT/TRL documentation, with TRL's library defaults."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    class Clock(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    settings = {
        "output_dir": str(ctx.work / "runs" / "trl"),
        "per_device_train_batch_size": ctx.sizes["batch"],
        "max_steps": ctx.sizes["steps"] + 1,
        "max_length": ctx.sizes["length"],
        "learning_rate": LEARNING_RATE,
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": 1,
        "seed": 0,
    }
    if not torch.cuda.is_available():
        settings["use_cpu"] = True  # the one change TRL's error message asks for on a CPU
    config, clock = SFTConfig(**settings), Clock()
    mark = memory_mark()
    trainer = SFTTrainer(
        model=str(ctx.model),
        args=config,
        train_dataset=load_dataset("json", data_files=str(ctx.work / "fixed.jsonl"), split="train"),
        peft_config=LoraConfig(task_type="CAUSAL_LM", **LORA),
        callbacks=[clock],
    )
    trainer.train()
    gaps = [b - a for a, b in itertools.pairwise(clock.ends)]
    return {
        "step_s": statistics.median(gaps),
        "tokens_per_step": trainer._total_train_tokens / (ctx.sizes["steps"] + 1),
        "peak_bytes": peak_since(mark),
        "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
        "precision": f"bf16={config.bf16}, gradient checkpointing={config.gradient_checkpointing}",
        "weights": str(trainer.model.get_base_model().dtype),
    }


def run_lora_tune(
    ctx: Context,
    name: str,
    data: str = "fixed",
    model: dict | None = None,
    training: dict | None = None,
    data_options: dict | None = None,
) -> dict:
    """`lora-tune train` on a recipe of its defaults plus the given sections' keys."""
    from lora_tune import recipe, train

    out = ctx.work / "runs" / name
    sections = {
        "model": {"id": str(ctx.model)} | (model or {}),
        "lora": LORA,
        "data": {"train": str(ctx.work / f"{data}.jsonl"), "max_length": ctx.sizes["length"]}
        | (data_options or {}),
        "training": {
            "output_dir": str(out),
            "per_device_train_batch_size": ctx.sizes["batch"],
            "max_steps": ctx.sizes["steps"] + 1,
            "learning_rate": LEARNING_RATE,
            "logging_steps": 1,  # a loss each step: the steps are synchronised, as in the raw loop
            "save_strategy": "no",
            "seed": 0,
        }
        | (training or {}),
    }
    path = ctx.work / "recipes" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(sections, sort_keys=False))
    memory_mark()
    metrics = train.run(recipe.load(path), resume="never")
    return {
        "step_s": metrics["step_time_s"],
        "tokens_per_step": metrics["train_tokens"] / metrics["steps"],
        "peak_bytes": metrics["memory"]["measured_bytes"],
        "estimate_bytes": metrics["memory"]["estimate_bytes"],
        "time_to_first_step_s": metrics["time_to_first_step_s"],
        "losses": [e["loss"] for e in metrics["log_history"] if "loss" in e],
        "precision": lora_tune_precision(sections["training"]),
        "run": str(out),
    }


def lora_tune_precision(training: dict) -> str:
    """What `lora-tune train` runs in: the recipe's bf16/fp16, else the hardware's choice."""
    import torch

    from lora_tune import hardware

    chosen = hardware.precision_defaults(cpu=not torch.cuda.is_available())
    if "bf16" in training or "fp16" in training:
        chosen = {"bf16": training.get("bf16", False), "fp16": training.get("fp16", False)}
    if chosen["bf16"] or chosen["fp16"]:
        return "bf16 mixed" if chosen["bf16"] else "fp16 mixed"
    return "fp32"


def run_liger(ctx: Context) -> dict:
    if not torch_cuda():
        return {"skipped": "Liger's kernels are Triton GPU kernels: needs a CUDA GPU"}
    if importlib.util.find_spec("liger_kernel") is None:
        return {"skipped": "liger-kernel is not installed"}
    return run_lora_tune(ctx, "liger", training={"use_liger_kernel": True})


def run_compile(ctx: Context) -> dict:
    backend = ctx.sizes["compile_backend"]
    training = {"torch_compile": True, "torch_compile_backend": backend}
    return run_lora_tune(ctx, "compile", training=training) | {"backend": backend}


def run_padded(ctx: Context) -> dict:
    return run_lora_tune(ctx, "padded", data="varying")


def run_padding_free(ctx: Context, attention: str) -> dict:
    if attention == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        return {"skipped": "flash-attn is not installed"}
    return run_lora_tune(
        ctx,
        f"padding-free-{attention}",
        data="varying",
        model={"attn_implementation": attention},
        data_options={"padding_free": True},
    )


def run_qlora(ctx: Context) -> dict:
    if importlib.util.find_spec("bitsandbytes") is None:
        return {"skipped": "bitsandbytes is not installed"}
    return run_lora_tune(ctx, "qlora", model={"quantization": {"bits": 4}})


def torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def run_eval(ctx: Context) -> dict:
    """lora-tune eval's loss pass, batched and length-sorted against one sample at a time, on
    the base model in lora-tune's precision: seconds, tokens/s and the two losses."""
    import torch
    from transformers import AutoModelForCausalLM

    from lora_tune import data, evaluate
    from lora_tune.models import load_tokenizer
    from lora_tune.recipe import DataSection, ModelSection

    tokenizer = load_tokenizer(ModelSection(id=str(ctx.model)))
    section = DataSection(train="unused", max_length=ctx.sizes["length"])
    dataset = data.load_eval(str(ctx.work / "eval.jsonl"), section, tokenizer)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype, _ = automatic_precision()
    model = AutoModelForCausalLM.from_pretrained(ctx.model, dtype=dtype).to(device).eval()
    found = {}
    for name, size in (("batch 1", 1), ("batched", 16)):
        batches = evaluate.batches(dataset, size, tokenizer.pad_token_id, device)
        start = time.perf_counter()
        metrics, _ = evaluate.measure(model, batches)
        found[name] = {
            "seconds": time.perf_counter() - start,
            "tokens_per_second": metrics["tokens_per_second"],
            "loss": metrics["loss"],
        }
    return found | {"rows": len(dataset), "dtype": str(dtype)}


def run_merge(ctx: Context, method: str) -> dict:
    """`lora-tune merge --method METHOD` of the plain lora-tune run (verified on the device):
    wall time, peak resident memory and GPU peak."""
    from lora_tune import hardware, merge

    out = ctx.work / "merged" / method
    mark = memory_mark()
    hardware.reset_peak_resident()
    start = time.perf_counter()
    report = merge.run(ctx.work / "runs" / "lora-tune-r0", out, method=method, force=True)
    return {
        "seconds": time.perf_counter() - start,
        "peak_rss_bytes": hardware.resident_bytes("VmHWM"),
        "peak_bytes": peak_since(mark),
        "max_abs_diff": report.get("max_abs_diff"),
        "ok": report.get("ok"),
        "out": str(out),
    }


def run_gpu_tests(ctx: Context) -> dict:
    """pytest -m gpu: the tests that run only where CUDA is."""
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"]
    returncode, stdout, stderr = bounded(ctx, [*command, "tests/test_gpu.py"])
    lines = stdout.strip().splitlines()
    return {
        "returncode": returncode,
        "summary": lines[-1] if lines else "",
        "output_tail": "" if returncode == 0 else (stdout + stderr)[-3000:],
    }


def run_distributed(ctx: Context, name: str) -> dict:
    """One process under the shipped FSDP2 or ZeRO-3 config: train a few steps, check the
    adapter as lora-tune does, reload it with plain PEFT, then resume to twice the steps."""
    source = {"fsdp2": "fsdp.yaml", "zero3": "deepspeed_zero3.yaml"}[name]
    if name == "zero3" and not torch_cuda():
        return {"skipped": "DeepSpeed needs a GPU"}
    if name == "zero3" and importlib.util.find_spec("deepspeed") is None:
        return {"skipped": "deepspeed is not installed"}
    config = yaml.safe_load((ROOT / "configs" / source).read_text()) | {"num_processes": 1}
    launch = ctx.work / f"accelerate-{source}"
    launch.write_text(yaml.safe_dump(config))
    steps, out = ctx.sizes["distributed_steps"], ctx.work / "runs" / name
    recipe = ctx.work / "recipes" / f"{name}.yaml"
    recipe.parent.mkdir(parents=True, exist_ok=True)
    recipe.write_text(yaml.safe_dump(distributed_recipe(ctx, out, steps)))
    first = launch_train(ctx, recipe, launch, [])
    if first["returncode"] != 0:
        return {"error": f"train exited with {first['returncode']}: {first['output']}"}
    found = adapter_checks(ctx, out / "adapter")
    found["distributed_type"] = json.loads((out / "metrics.json").read_text())["distributed_type"]
    if not torch_cuda():  # accelerate runs the FSDP config as plain processes on a CPU
        found["note"] = "no GPU: nothing was sharded; this checks the steps of the check only"
    second = launch_train(ctx, recipe, launch, [f"training.max_steps={2 * steps}"])
    metrics = json.loads((out / "metrics.json").read_text())
    found["resumed"] = second["returncode"] == 0 and "Resuming from" in second["output"]
    found |= {"steps": metrics["steps"], "step_s": metrics["step_time_s"]}
    if not found["resumed"]:
        found["resume_output"] = second["output"]
    return found


def distributed_recipe(ctx: Context, out: Path, steps: int) -> dict:
    return {
        "model": {"id": str(ctx.model)},
        "lora": LORA,
        "data": {"train": str(ctx.work / "fixed.jsonl"), "max_length": ctx.sizes["length"]},
        "training": {
            "output_dir": str(out),
            "per_device_train_batch_size": ctx.sizes["batch"],
            "max_steps": steps,
            "save_steps": steps,
            "logging_steps": 1,
            "learning_rate": LEARNING_RATE,
            "seed": 0,
        },
    }


def launch_train(ctx: Context, recipe: Path, config: Path, overrides: list[str]) -> dict:
    command = [sys.executable, "-m", "lora_tune", "train", str(recipe)]
    command += ["--accelerate-config", str(config)]
    for item in overrides:
        command += ["--set", item]
    env = os.environ | ({"OMP_NUM_THREADS": "1"} if ctx.mode == "cpu" else {})
    returncode, stdout, stderr = bounded(ctx, command, env)
    return {"returncode": returncode, "output": (stdout + stderr)[-3000:]}


def adapter_checks(ctx: Context, adapter: Path) -> dict:
    """lora-tune's own adapter check, then plain PEFT: the adapter loads on the base and its
    B matrices moved from their zero start (it was trained)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lora_tune import train
    from lora_tune.errors import UserError

    try:
        train.check_adapter(adapter)
        check = "ok"
    except UserError as exc:
        check = str(exc)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ctx.model), adapter)
    moved = max(float(p.abs().max()) for n, p in model.named_parameters() if "lora_B" in n)
    return {"adapter_check": check, "peft_reload": moved > 0, "lora_b_max": moved}


RUNS = {
    "raw": run_raw,
    "trl": run_trl,
    "lora-tune": lambda ctx, tag: run_lora_tune(ctx, f"lora-tune-{tag}"),
    "liger": run_liger,
    "compile": run_compile,
    "padded": run_padded,
    "padding-free": run_padding_free,
    "qlora": run_qlora,
    "eval": run_eval,
    "merge": run_merge,
    "gpu-tests": run_gpu_tests,
    "distributed": run_distributed,
}
# torch.compile keeps its caches and settings in the process: it always runs in its own.
ALWAYS_ISOLATED = {"compile"}


def bounded(ctx: Context, command: list[str], env: dict | None = None) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of a command run from the repository root, stopped with every
    process it started (an accelerate launch has workers) when the time budget runs out."""
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, to stop as a whole
    )
    try:
        stdout, stderr = process.communicate(timeout=max(ctx.left(), 1))
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        stderr += "\nstopped: the time budget (--budget) ran out"
    return process.returncode, stdout, stderr


def release() -> None:
    """Free what a run left behind, so that the next one's peak is its own."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
