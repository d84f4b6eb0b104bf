"""GPU check: lora-tune against the raw PEFT loop and TRL's defaults on a model of a size that
matters, and the other speed and memory claims of the README, written to one JSON file.

    scripts/gpu_check.sh prepare   # here, with a network: the wheels the GPU machine lacks
    scripts/gpu_check.sh           # on the GPU machine: install them, run everything
    scripts/gpu_check.sh cpu       # tiny sizes on the CPU: checks that the script still runs

On a Llama-shaped model built from a config with random weights (nothing downloaded; on the GPU
0.85B parameters: hidden 2048, 16 layers, a 32,000-token vocabulary), LoRA r=16 on all linear
layers, batches of 8 x 1,024 tokens, in lora-tune's automatic precision (bf16 on the GPU):

  step           the raw PEFT loop, lora-tune and TRL's library defaults, interleaved over rounds
                 (each one's fastest round is kept): step time and peak memory
  liger, compile lora-tune with use_liger_kernel or torch_compile, against lora-tune and TRL
  padding-free   varying lengths: padded batches (SDPA) against padding-free ones with flex
                 attention (and SDPA; flash attention where installed): trained tokens/s, and the
                 per-step losses, which must agree
  qlora          a 4-bit base (bitsandbytes) against the bf16 one
  eval           lora-tune eval's batched, length-sorted pass against a batch-size-1 loop
  merge          lora-tune's streaming merge against merge_and_unload, both verified on the device
  gpu tests      the `gpu`-marked tests
  fsdp2, zero3   one process under configs/fsdp.yaml and configs/deepspeed_zero3.yaml: a few
                 steps, the adapter checked and reloaded with plain PEFT, then resumed

On the GPU each run has a process of its own (clean peaks; Liger patches transformers' classes).
On the CPU they share this one, except torch.compile's. The JSON file (gpu_check.json in $OUT
when set, else in the working directory) is rewritten after each measurement, so a run cut
short by --budget keeps what it measured; a table and the goals are printed at the end.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
LORA = {"r": 16, "lora_alpha": 32, "target_modules": "all-linear", "lora_dropout": 0.0}
LEARNING_RATE = 1e-4
MIB = 2**20
RESULT_MARK = "GPU_CHECK_RESULT "  # the child's result line, among the libraries' output
SIZES = {
    "gpu": {
        "hidden": 2048,
        "layers": 16,
        "intermediate": 5632,
        "heads": 16,
        "kv_heads": 4,
        "vocab": 32000,
        "batch": 8,
        "length": 1024,
        "steps": 10,
        "rounds": 2,
        "eval_rows": 256,
        "distributed_steps": 2,
        "attention": ["flex_attention", "sdpa", "flash_attention_2"],
        "compile_backend": "inductor",
    },
    # Tiny, for the test suite. Flex attention has no backward pass on a CPU, and the eager
    # backend traces the model as torch.compile does without generating code.
    "cpu": {
        "hidden": 64,
        "layers": 2,
        "intermediate": 128,
        "heads": 4,
        "kv_heads": 2,
        "vocab": 0,  # the tiny tokenizer's own
        "batch": 2,
        "length": 32,
        "steps": 3,
        "rounds": 1,
        "eval_rows": 16,
        "distributed_steps": 1,
        "attention": ["sdpa"],
        "compile_backend": "eager",
    },
}


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


def padded_batch(chunk: list[dict], pad_id: int):
    import torch

    width = max(len(r["input_ids"]) for r in chunk)
    ids = torch.full((len(chunk), width), pad_id)
    labels = torch.full((len(chunk), width), -100)
    mask = torch.zeros((len(chunk), width), dtype=torch.long)
    for j, r in enumerate(chunk):
        ids[j, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
        labels[j, : len(r["labels"])] = torch.tensor(r["labels"])
        mask[j, : len(r["input_ids"])] = 1
    return ids, labels, mask


def run_raw(ctx: Context) -> dict:
    """The loop users write: PEFT model, forward, backward, AdamW, in lora-tune's precision."""
    import torch
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


# Running: in this process or a child of its own ------------------------------------------


def run(ctx: Context, name: str, arg: str = "") -> dict:
    """One run's numbers, or {"error": ...} or {"skipped": ...}; never raises, so that one
    failure leaves the other measurements standing."""
    if ctx.left() < 10:
        return {"skipped": "the time budget (--budget) ran out"}
    started = time.perf_counter()
    try:
        if ctx.isolate or name in ALWAYS_ISOLATED:
            found = in_child(ctx, name, arg)
        else:
            found = RUNS[name](ctx, arg) if arg else RUNS[name](ctx)
            release()
    except Exception as exc:  # a failed run is a result to report, not the end of the check
        found = {"error": f"{type(exc).__name__}: {exc}"[-2000:]}
    found["wall_s"] = time.perf_counter() - started
    label = f"{name} {arg}".strip()
    state = found.get("error") or found.get("skipped") or "done"
    print(
        f"[{time.strftime('%H:%M:%S')}] {label}: {state[:200]} ({found['wall_s']:.0f} s)",
        flush=True,
    )
    return found


def in_child(ctx: Context, name: str, arg: str) -> dict:
    command = [sys.executable, __file__, "--child", name, "--arg", arg, "--mode", ctx.mode]
    command += ["--workdir", str(ctx.work), "--out", str(ctx.out), "--budget", str(ctx.left())]
    returncode, stdout, stderr = bounded(ctx, command)
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line.removeprefix(RESULT_MARK))
    return {"error": f"exit {returncode}: {(stdout + stderr)[-2000:]}"}


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


def child(ctx: Context, name: str, arg: str) -> None:
    """Run one measurement in this (child) process and print its result line."""
    try:
        found = RUNS[name](ctx, arg) if arg else RUNS[name](ctx)
    except Exception as exc:  # reported by the parent with the others
        import traceback

        found = {"error": f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-1500:]}"}
    print(RESULT_MARK + json.dumps(found), flush=True)


def release() -> None:
    """Free what a run left behind, so that the next one's peak is its own."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# Measurements: runs put side by side ---------------------------------------------------------


def fastest(found: list[dict]) -> dict:
    timed = [r for r in found if r.get("step_s")]
    return min(timed, key=lambda r: r["step_s"]) if timed else found[0]


def measure_step(ctx: Context) -> dict:
    """raw, lora-tune and TRL's defaults in turn, `rounds` times; each one's fastest round."""
    rounds: dict[str, list[dict]] = {"raw": [], "lora-tune": [], "trl": []}
    for i in range(ctx.sizes["rounds"]):
        for name, found in rounds.items():
            found.append(run(ctx, name, f"r{i}" if name == "lora-tune" else ""))
    step_times = {name: [r.get("step_s") for r in found] for name, found in rounds.items()}
    return {name: fastest(found) for name, found in rounds.items()} | {"rounds": step_times}


def measure_kernels(ctx: Context) -> dict:
    return {"liger": run(ctx, "liger"), "compile": run(ctx, "compile")}


def measure_padding(ctx: Context) -> dict:
    """Varying lengths: padded batches against padding-free ones with each attention; the
    per-step losses of each against the padded run's (relative, largest)."""
    found = {"padded": run(ctx, "padded")}
    for attention in ctx.sizes["attention"]:
        free = run(ctx, "padding-free", attention)
        if "losses" in free and "losses" in found["padded"]:
            free["loss_difference"] = relative_difference(found["padded"]["losses"], free["losses"])
        found[f"padding-free {attention}"] = free
    return found


def relative_difference(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(x) for x, y in zip(a, b, strict=True))


def measure_merge(ctx: Context) -> dict:
    found = {method: run(ctx, "merge", method) for method in ("stream", "memory")}
    if all("out" in r for r in found.values()):
        found["max_abs_weight_diff"] = weight_difference(
            Path(found["stream"]["out"]), Path(found["memory"]["out"])
        )
    return found


def weight_difference(a: Path, b: Path) -> float:
    """The largest difference between two merged checkpoints, tensor by tensor."""
    from safetensors import safe_open

    def tensors(folder: Path) -> dict:
        found = {}
        for path in sorted(folder.glob("*.safetensors")):
            with safe_open(path, framework="pt") as f:
                found |= {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
        return found

    left, right = tensors(a), tensors(b)
    return max((left[k].float() - right[k].float()).abs().max().item() for k in left)


MEASUREMENTS = {
    "step": measure_step,
    "kernels": measure_kernels,
    "padding": measure_padding,
    "qlora": lambda ctx: run(ctx, "qlora"),
    "eval": lambda ctx: run(ctx, "eval"),
    "merge": measure_merge,
    "gpu_tests": lambda ctx: run(ctx, "gpu-tests"),
    "distributed": lambda ctx: {name: run(ctx, "distributed", name) for name in ("fsdp2", "zero3")},
}


# Goals, the table and the JSON file ---------------------------------------------------------


def ratio(a: dict, b: dict, key: str, invert: bool = False) -> float | None:
    """a[key] / b[key] (or b/a), None where either run has no such number."""
    x, y = a.get(key), b.get(key)
    if not x or not y:
        return None
    return y / x if invert else x / y


def goals(m: dict) -> list[dict]:
    """The issue's goals, each with its measured value (None where the run did not happen)."""
    step, kernels, padding = m.get("step", {}), m.get("kernels", {}), m.get("padding", {})
    raw, ours, trl = step.get("raw", {}), step.get("lora-tune", {}), step.get("trl", {})
    found = [("lora-tune / raw step time", ratio(ours, raw, "step_s"), "<=", 1.05)]
    for name in ("liger", "compile"):
        run_ = kernels.get(name, {})
        found.append((f"trl / {name} step time", ratio(trl, run_, "step_s"), ">=", 1.2))
        found.append((f"{name} / trl peak memory", ratio(run_, trl, "peak_bytes"), "<=", 0.7))
    padded = padding.get("padded", {})
    for key, free in padding.items():
        if key.startswith("padding-free"):
            rate = ratio(tokens_per_second(free), tokens_per_second(padded), "rate")
            found.append((f"{key} / padded tokens/s", rate, ">=", 1.5))
    batched = m.get("eval", {})
    speed = ratio(batched.get("batch 1", {}), batched.get("batched", {}), "seconds")
    found.append(("eval batched / batch 1 speed", speed, ">=", 10))
    return [goal(*item) for item in found]


def goal(name: str, value: float | None, sense: str, target: float) -> dict:
    met = None if value is None else (value <= target if sense == "<=" else value >= target)
    return {"name": name, "value": value, "goal": f"{sense} {target}", "met": met}


def tokens_per_second(r: dict) -> dict:
    if not r.get("step_s"):
        return {}
    return {"rate": r["tokens_per_step"] / r["step_s"]}


def training_rows(m: dict) -> list[tuple[str, dict]]:
    """Every training run, named for the table."""
    rows = [(name, m.get("step", {}).get(name, {})) for name in ("raw", "lora-tune", "trl")]
    rows += list(m.get("kernels", {}).items()) + list(m.get("padding", {}).items())
    rows.append(("qlora 4-bit", m.get("qlora", {})))
    return rows


def print_table(results: dict) -> None:
    m = results["measurements"]
    print(f"\n{results['environment'].get('device', '')}; model: {results['model_summary']}")
    print(
        f"{'run':<28} {'precision':<26} {'s/step':>8} {'tokens/s':>10} {'peak MiB':>9} {'loss':>7}"
    )
    for name, r in training_rows(m):
        if not r.get("step_s"):
            print(f"{name:<28} {(r.get('skipped') or r.get('error') or 'not run')[:90]}")
            continue
        rate = r["tokens_per_step"] / r["step_s"]
        print(
            f"{name:<28} {r.get('precision', '')[:26]:<26} {r['step_s']:>8.3f} {rate:>10,.0f} "
            f"{r['peak_bytes'] / MIB:>9,.0f} {r['losses'][-1]:>7.3f}"
        )
    print_others(m)
    print("\ngoal                                      value   goal     met")
    for g in results["goals"]:
        value = "-" if g["value"] is None else f"{g['value']:.2f}"
        met = {True: "yes", False: "NO", None: "-"}[g["met"]]
        print(f"{g['name']:<40} {value:>7}   {g['goal']:<8} {met}")


def print_others(m: dict) -> None:
    """eval, merge, the gpu tests and the distributed runs, a line each."""
    e = m.get("eval", {})
    if "batched" in e:
        print(
            f"\neval: batch 1 {e['batch 1']['seconds']:.2f} s, batched {e['batched']['seconds']:.2f} s; "
            f"losses {e['batch 1']['loss']:.6f} / {e['batched']['loss']:.6f}"
        )
    merge = m.get("merge", {})
    for method in ("stream", "memory"):
        r = merge.get(method, {})
        if "seconds" in r:
            print(
                f"merge {method:<6}: {r['seconds']:.1f} s, peak RSS {r['peak_rss_bytes'] / MIB:,.0f} MiB, "
                f"verified {r['ok']} (max |logit diff| {r['max_abs_diff']:.2g})"
            )
    if "max_abs_weight_diff" in merge:
        print(
            f"merge: max |stream - memory| over the merged weights {merge['max_abs_weight_diff']:.3g}"
        )
    tests = m.get("gpu_tests", {})
    print(f"gpu tests: {tests.get('summary') or tests.get('skipped') or tests.get('error', '')}")
    for name, r in m.get("distributed", {}).items():
        state = r.get("skipped") or r.get("error")
        if state is None:
            state = (
                f"{r['distributed_type']}: adapter check {r['adapter_check']}, PEFT reload "
                f"{r['peft_reload']}, resumed {r['resumed']} to step {r['steps']}"
            )
        print(f"{name}: {state[:200]}")


def environment(mode: str) -> dict:
    import importlib.metadata

    import torch

    found = {"python": platform.python_version(), "torch": torch.__version__, "mode": mode}
    for package in (
        "transformers", "trl", "peft", "datasets", "accelerate",
        "liger-kernel", "bitsandbytes", "deepspeed", "flash-attn",
    ):  # fmt: skip
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    if torch.cuda.is_available():
        found["device"] = torch.cuda.get_device_name()
        found["cuda"] = torch.version.cuda
    else:
        found["device"] = (
            f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
        )
    return found


def write(ctx: Context, results: dict) -> None:
    results["goals"] = goals(results["measurements"])
    ctx.out.parent.mkdir(parents=True, exist_ok=True)
    ctx.out.write_text(json.dumps(results, indent=2, default=str))


def errors(value, path: str = "") -> list[str]:
    """Where the results hold an error: 'padding/padding-free sdpa: ...'."""
    if isinstance(value, dict):
        if "error" in value:
            return [f"{path}: {str(value['error'])[:300]}"]
        return [e for k, v in value.items() for e in errors(v, f"{path}/{k}".strip("/"))]
    return []


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=list(SIZES), help="default: gpu where CUDA is, else cpu")
    parser.add_argument("--out", type=Path, help="the JSON file (default: $OUT/gpu_check.json)")
    parser.add_argument("--workdir", type=Path, help="where to build (default: a temporary folder)")
    parser.add_argument(
        "--budget",
        type=float,
        default=420,
        help="seconds from the start; no run starts after them, a child running then is stopped "
        "(default 420: with the installation, the check takes under 8 minutes)",
    )
    parser.add_argument(
        "--only", help=f"comma-separated measurements, of: {', '.join(MEASUREMENTS)}"
    )
    parser.add_argument(
        "--isolate",
        action=argparse.BooleanOptionalAction,
        help="each run in a process of its own (default: on the GPU)",
    )
    parser.add_argument("--child", choices=list(RUNS), help=argparse.SUPPRESS)
    parser.add_argument("--arg", default="", help=argparse.SUPPRESS)
    return parser.parse_args()


def context(args) -> Context:
    mode = args.mode or ("gpu" if torch_cuda() else "cpu")
    if mode == "cpu":
        import torch

        # Tiny matrices gain nothing from a second thread, and on a busy machine each operation
        # would wait for a thread that another process holds.
        torch.set_num_threads(1)
    out = args.out or Path(os.environ.get("OUT") or ".") / "gpu_check.json"
    return Context(
        mode=mode,
        work=args.workdir or Path(tempfile.mkdtemp(prefix="gpu-check-")),
        out=out.resolve(),
        isolate=mode == "gpu" if args.isolate is None else args.isolate,
        deadline=time.time() + args.budget,
        sizes=SIZES[mode],
    )


def main() -> int:
    args = parse_args()
    ctx = context(args)
    if args.child:
        child(ctx, args.child, args.arg)
        return 0
    selected = args.only.split(",") if args.only else list(MEASUREMENTS)
    unknown = set(selected) - set(MEASUREMENTS)
    if unknown:
        sys.exit(
            f"--only: unknown measurement(s) {sorted(unknown)}; choose from {list(MEASUREMENTS)}"
        )
    started = time.time()
    results = {"environment": environment(ctx.mode), "sizes": ctx.sizes, "measurements": {}}
    model = build(ctx)
    results["model"] = model
    results["model_summary"] = (
        f"Llama, {model['parameters'] / 1e6:,.1f}M parameters, vocabulary {model['config']['vocab_size']:,}, "
        f"batch {ctx.sizes['batch']} x {ctx.sizes['length']} tokens, LoRA r=16 on all linear layers"
    )
    for name in selected:
        results["measurements"][name] = MEASUREMENTS[name](ctx)
        results["elapsed_s"] = time.time() - started
        write(ctx, results)
    print_table(results)
    print(f"\nresults: {ctx.out} ({results['elapsed_s']:.0f} s)")
    failed = errors(results["measurements"])
    for line in failed:
        print(f"error in {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
