"""Benchmark: a training step of lora-tune against the raw PyTorch step and the plain TRL script.

    python scripts/bench_train.py            # 25M-parameter Llama, batch 8 x 128 (minutes on a CPU)
    python scripts/bench_train.py --quick    # a tiny model, to check the benchmark still runs

On the same model, data, batch size, sequence length, LoRA (r=16, all linear layers) and seed:
  raw       PEFT model, forward, backward, AdamW step in fp32: the plain baseline
  raw-auto  the same loop in the precision lora-tune picks for this hardware (bf16 autocast on
            GPUs and on CPUs with native bf16, fp32 elsewhere): the practical limit
  trl       the SFTTrainer script from the PEFT/TRL documentation, library defaults
  lora-tune `lora-tune train` with its defaults
each in its own process (--rounds N repeats the four, interleaved, and keeps each one's fastest
round), printing median seconds per step, trained (non-padding) tokens per second, peak RSS (and
on a GPU peak allocated memory) and final loss (both trainers log every step, to report it), and
the ratios lora-tune/raw, lora-tune/raw-auto and trl/lora-tune. Then, on data of varying lengths
and the same samples, its default batches (padded, with SDPA attention) against padding-free and
length-grouped batches, and on a GPU with flash-attn installed, flash attention's padding-free
default. Last, on preference pairs, a DPO step against an SFT step on the same prompts and chosen
answers: peak memory (goal: DPO/SFT <= 1.3, the reference held as the base with the adapter off,
never a second model) and step time.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
LORA = {"r": 16, "lora_alpha": 32, "target_modules": "all-linear", "lora_dropout": 0.0}
LEARNING_RATE = 1e-4


def peak_rss_mb() -> float:
    hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    return int(hwm.split()[1]) / 1024


def build(work: Path, quick: bool, length: int, rows: int) -> None:
    import random

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lora_tune import tiny

    tokenizer = tiny.build_tokenizer("llama")
    # Full size: about 25M parameters with a real model's vocabulary (the tokenizer uses its first ids).
    hidden, layers, inter, vocab = (64, 2, 128, len(tokenizer)) if quick else (256, 8, 688, 32000)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=4 * length,
        bos_token_id=0,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")
    rng = random.Random(0)
    # Fixed length: sentences well past `length` tokens, truncated to it. Varying: 1 to 8 sentences.
    fixed = [
        {"text": " ".join(tiny.sentence(rng) for _ in range(length // 4))} for _ in range(rows)
    ]
    varying = [
        {"text": " ".join(tiny.sentence(rng) for _ in range(rng.randint(1, max(1, length // 16))))}
        for _ in range(rows)
    ]
    tiny.write_jsonl(work / "fixed.jsonl", fixed)
    tiny.write_jsonl(work / "varying.jsonl", varying)
    # Preference pairs of about `length` tokens each side (prompt half, answer half), and the
    # same prompts with the chosen answers as SFT data.
    block = max(1, length // 24)
    pairs = [
        {
            "prompt": " ".join(tiny.sentence(rng) for _ in range(block)),
            "chosen": " " + " ".join(tiny.sentence(rng) for _ in range(block)),
            "rejected": " " + " ".join(tiny.sentence(rng) for _ in range(block)),
        }
        for _ in range(rows)
    ]
    tiny.write_jsonl(work / "pairs.jsonl", pairs)
    tiny.write_jsonl(
        work / "pairs_sft.jsonl",
        [{"prompt": p["prompt"], "completion": p["chosen"]} for p in pairs],
    )


def samples(work: Path, data: str, length: int):
    from lora_tune import data as lt_data
    from lora_tune.models import load_tokenizer
    from lora_tune.recipe import DataSection, ModelSection

    tokenizer = load_tokenizer(ModelSection(id=str(work / "model")))
    rows, _, _ = lt_data.load_datasets(
        DataSection(train=str(work / f"{data}.jsonl"), max_length=length), tokenizer
    )
    return rows, tokenizer


def raw_precision(precision: str):
    """(weights dtype, autocast dtype or None) of the raw loop: fp32, or lora-tune's automatic
    choice on this hardware (models.resolve_dtype's weights, hardware.precision_defaults' autocast)."""
    import torch

    from lora_tune import hardware, models

    if precision == "fp32":
        return torch.float32, None
    chosen = hardware.precision_defaults(cpu=not torch.cuda.is_available())
    autocast = None
    if chosen["bf16"]:
        autocast = torch.bfloat16
    elif chosen["fp16"]:
        autocast = torch.float16
    return models.resolve_dtype("auto"), autocast


def padded_batch(chunk: list[dict], pad_id: int):
    """input ids, labels and attention mask of rows padded on the right to the longest."""
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


def run_raw(
    work: Path, steps: int, batch: int, length: int, data: str, precision: str = "fp32"
) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    rows, tokenizer = samples(work, data, length)
    torch.manual_seed(0)
    dtype, autocast = raw_precision(precision)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(work / "model", dtype=dtype),
        LoraConfig(task_type="CAUSAL_LM", **LORA),
    ).to(device)
    model.train()
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE
    )
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
    times, tokens, loss = [], 0, None
    for step in range(steps):
        chunk = [rows[i] for i in order[step * batch : (step + 1) * batch]]
        ids, labels, mask = padded_batch(chunk, tokenizer.pad_token_id)
        start = time.perf_counter()
        with torch.autocast(device, dtype=autocast or dtype, enabled=autocast is not None):
            out = model(
                input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device)
            )
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        loss = out.loss.item()  # also waits for the GPU
        times.append(time.perf_counter() - start)
        tokens += int(mask.sum())
    return {
        "step_s": statistics.median(times[1:]),
        "tokens_per_step": tokens / steps,
        "loss": loss,
        "precision": describe_precision(dtype, autocast),
    }


SHORT_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def describe_precision(dtype, autocast) -> str:
    """'fp32', or 'bf16 autocast, fp32 weights' and the like."""
    weights = SHORT_DTYPES[str(dtype).removeprefix("torch.")]
    if autocast is None:
        return weights
    return f"{SHORT_DTYPES[str(autocast).removeprefix('torch.')]} autocast, {weights} weights"


def run_trl(work: Path, steps: int, batch: int, length: int, data: str) -> dict:
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    class Clock(TrainerCallback):
        ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    dataset = load_dataset("json", data_files=str(work / f"{data}.jsonl"), split="train")
    args = dict(
        output_dir=str(work / "trl"),
        per_device_train_batch_size=batch,
        max_steps=steps,
        max_length=length,
        learning_rate=LEARNING_RATE,
        report_to="none",
        save_strategy="no",
        seed=0,
        logging_steps=1,
    )
    try:
        config = SFTConfig(**args)
    except (
        ValueError
    ):  # "Your setup doesn't support bf16/gpu": the one change its error message asks for
        config = SFTConfig(use_cpu=True, **args)
    clock = Clock()
    trainer = SFTTrainer(
        model=str(work / "model"),
        args=config,
        train_dataset=dataset,
        peft_config=LoraConfig(task_type="CAUSAL_LM", **LORA),
        callbacks=[clock],
    )
    start = time.perf_counter()
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    gaps = [b - a for a, b in zip([start, *clock.ends], clock.ends, strict=False)]
    return {
        "step_s": statistics.median(gaps[1:]),
        "tokens_per_step": trainer._total_train_tokens / steps,
        "loss": losses[-1],
        "bf16": config.bf16,
        "gradient_checkpointing": config.gradient_checkpointing,
    }


def run_lora_tune(
    work: Path, steps: int, batch: int, length: int, data: str, extra: dict | None = None
) -> dict:
    import torch

    from lora_tune import recipe, train

    extra = dict(extra or {})
    trainer = extra.pop("trainer", "sft")
    training = {
        "output_dir": str(work / f"lt-{data}"),
        "per_device_train_batch_size": batch,
        "max_steps": steps,
        "learning_rate": LEARNING_RATE,
        "seed": 0,
        "logging_steps": 1,
    }
    model = {"id": str(work / "model")}
    data_section = {"train": str(work / f"{data}.jsonl"), "max_length": length}
    for section, values in extra.items():
        {"model": model, "training": training, "data": data_section}[section].update(values)
    path = work / "recipe.yaml"
    sections = {"model": model, "lora": LORA, "data": data_section, "training": training}
    path.write_text(yaml.safe_dump({"trainer": trainer} | sections))
    built = []
    build_trainer = train.build_trainer
    train.build_trainer = lambda *a: built.append(build_trainer(*a)) or built[-1]
    before = peak_rss_mb()
    metrics = train.run(recipe.load(path), resume="never")
    trainer = built[0][0]
    autocast = None
    if trainer.args.bf16 or trainer.args.fp16:
        autocast = torch.bfloat16 if trainer.args.bf16 else torch.float16
    return {
        "precision": describe_precision(trainer.model.get_base_model().dtype, autocast),
        "step_s": metrics["step_time_s"],
        "tokens_per_step": metrics["train_tokens"] / metrics["steps"],
        "loss": metrics["final_loss"],
        "time_to_first_step_s": metrics["time_to_first_step_s"],
        "rss_before_mb": before,
        "first_logged_loss": metrics["method"]["first_logged_loss"],
        # A reference model object, or the adapters on the one base (DPO adds "ref").
        "reference_model": getattr(trainer, "ref_model", None) is not None,
        "adapters": sorted(getattr(trainer.model, "peft_config", {})),
    }


# On a GPU, lora-tune again with one setting changed each time.
GPU_TOGGLES = {
    "bf16 autocast off": {"training": {"bf16": False}},
    "eager attention": {"model": {"attn_implementation": "eager"}},
    "torch.compile": {"training": {"torch_compile": True}},
    "Liger kernels": {"training": {"use_liger_kernel": True}},
}
# On data of varying lengths, the default (padded batches with SDPA) against the alternatives.
BATCHING = {
    "padding-free": {"data": {"padding_free": True}},
    "length-grouped": {"training": {"train_sampling_strategy": "group_by_length"}},
    "flash attention": {
        "model": {"attn_implementation": "flash_attention_2"}
    },  # padding-free by default
}
# On the same pairs: SFT on prompt + chosen against DPO (chosen and rejected, and the reference).
PREFERENCE = {
    "sft on pairs": {"data": {"format": "prompt_completion"}},
    "dpo": {"trainer": "dpo"},
}
VARIANTS = {
    "raw": run_raw,
    "raw-auto": functools.partial(run_raw, precision="auto"),
    "trl": run_trl,
    "lora-tune": run_lora_tune,
    **{
        name: functools.partial(run_lora_tune, extra=extra)
        for name, extra in (GPU_TOGGLES | BATCHING | PREFERENCE).items()
    },
}


def child(args) -> None:
    result = VARIANTS[args.variant](args.workdir, args.steps, args.batch, args.length, args.data)
    result["peak_rss_mb"] = peak_rss_mb()
    import torch

    if torch.cuda.is_available():
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(result))


def measure(variant: str, args, steps: int, data: str) -> dict:
    command = [
        sys.executable,
        __file__,
        "--variant",
        variant,
        "--workdir",
        str(args.workdir),
        "--steps",
        str(steps),
        "--batch",
        str(args.batch),
        "--length",
        str(args.length),
        "--data",
        data,
    ]
    env = os.environ | ({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
    if result.returncode != 0:
        sys.exit(f"{variant} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="tiny model and few steps: checks the script runs"
    )
    parser.add_argument("--steps", type=int, help="steps per variant (default 12)")
    parser.add_argument(
        "--trl-steps", type=int, help="steps of the TRL-defaults variant (default 5: it is slow)"
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument(
        "--length", type=int, help="tokens per sample (default 128, or 32 with --quick)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run raw, raw-auto, trl and lora-tune this many times, interleaved, and keep each "
        "one's fastest round (a busy machine slows some rounds)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="compute threads of each variant (default: torch's, one per core); 1 keeps a "
        "shared machine's other processes from stalling every operation",
    )
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--data", default="fixed", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.length = args.length or (32 if args.quick else 128)
    return args


def main() -> None:
    args = parse_args()
    if args.variant:
        return child(args)
    steps = args.steps or 12
    trl_steps = args.trl_steps or 5
    args.workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-train-"))
    build(args.workdir, args.quick, args.length, rows=max(steps, trl_steps) * args.batch * 2)
    results = compare_step(args, steps, trl_steps)
    compare_batching(args, steps)
    compare_preference(args, steps)
    compare_gpu_settings(args, steps, results["lora-tune"])


MAIN_VARIANTS = ("raw", "raw-auto", "trl", "lora-tune")


def compare_step(args, steps: int, trl_steps: int) -> dict[str, dict]:
    """The four main variants on fixed-length data, interleaved over the rounds; the fastest
    round of each is kept and printed, with the ratios the goals are set on."""
    results: dict[str, dict] = {}
    for _ in range(args.rounds):
        for name in MAIN_VARIANTS:
            r = measure(name, args, trl_steps if name == "trl" else steps, "fixed")
            if name not in results or r["step_s"] < results[name]["step_s"]:
                results[name] = r
    print(
        f"\n{'variant':<10} {'precision':<28} {'s/step':>8} {'tokens/s':>10} "
        f"{'peak RSS MB':>12} {'final loss':>11}"
    )
    for name, r in results.items():
        precision = (
            r.get("precision") or f"bf16={r['bf16']}, checkpointing={r['gradient_checkpointing']}"
        )
        rate = r["tokens_per_step"] / r["step_s"]
        print(
            f"{name:<10} {precision:<28} {r['step_s']:>8.3f} {rate:>10,.0f} "
            f"{r['peak_rss_mb']:>12,.0f} {r['loss']:>11.4f}"
        )
    print_step_ratios(results)
    return results


def print_step_ratios(results: dict[str, dict]) -> None:
    """lora-tune against the fp32 raw loop, the raw loop in lora-tune's precision and TRL."""
    from lora_tune import hardware

    raw, auto, trl, ours = (results[name] for name in MAIN_VARIANTS)
    native = hardware.native_cpu_bf16()
    device = "gpu" if "peak_gpu_mb" in ours else "cpu"
    print(
        f"\nlora-tune / raw fp32 step time: {ours['step_s'] / raw['step_s']:.2f}  (goal <= 0.70 "
        f"on CPUs with native bf16; this CPU {'has' if native else 'lacks'} it)"
    )
    print(
        f"lora-tune / raw step time in the same precision ({auto['precision']}): "
        f"{ours['step_s'] / auto['step_s']:.2f}  (goal <= 1.05)"
    )
    for name, other in (("raw fp32", raw), ("raw-auto", auto)):
        print(
            f"lora-tune / {name} peak RSS: {ours['peak_rss_mb'] / other['peak_rss_mb']:.2f}"
            + gpu_ratio(ours, other)
        )
    print(
        f"trl defaults / lora-tune step time: {trl['step_s'] / ours['step_s']:.2f}  (goal >= 5 on "
        f"CPUs without native bf16; trl ran bf16={trl['bf16']}, gradient_checkpointing="
        f"{trl['gradient_checkpointing']}, on the {device})"
    )
    print(f"trl defaults / lora-tune peak RSS: {trl['peak_rss_mb'] / ours['peak_rss_mb']:.2f}")
    print(f"lora-tune time to first step: {ours['time_to_first_step_s']:.1f} s")


def gpu_ratio(ours: dict, other: dict) -> str:
    if "peak_gpu_mb" not in ours:
        return ""
    return f"; peak GPU memory: {ours['peak_gpu_mb'] / other['peak_gpu_mb']:.2f}"


def compare_batching(args, steps: int) -> None:
    """Varying lengths, the same samples: padded batches against padding-free and grouped ones."""
    import importlib.util

    import torch

    print("\nvarying lengths, the same samples (length-grouped: batches of similar lengths):")
    names = ["lora-tune", "padding-free", "length-grouped"]
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn"):
        names.append("flash attention")
    varying = {name: measure(name, args, steps, "varying") for name in names}
    base = varying["lora-tune"]["tokens_per_step"] / varying["lora-tune"]["step_s"]
    for name, r in varying.items():
        rate = r["tokens_per_step"] / r["step_s"]
        label = "padded (default)" if name == "lora-tune" else name
        print(
            f"  {label:<16} {rate:>10,.0f} trained tokens/s  {rate / base:.2f}x  "
            f"final loss {r['loss']:.4f}"
        )


def compare_gpu_settings(args, steps: int, ours: dict) -> None:
    """On a GPU, lora-tune with one setting changed each time against its default."""
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        return
    print("\nGPU settings, lora-tune step time against its default (bf16, SDPA):")
    for name in GPU_TOGGLES:
        if name == "Liger kernels" and importlib.util.find_spec("liger_kernel") is None:
            print(f"  {name:<16} skipped (pip install liger-kernel)")
            continue
        toggled = measure(name, args, steps, "fixed")
        print(
            f"  {name:<16} {toggled['step_s']:.4f} s/step  {toggled['step_s'] / ours['step_s']:.2f}x"
        )


def compare_preference(args, steps: int) -> None:
    """DPO against SFT on the same pairs: peak memory (process, and above the level before the
    model loaded) and step time; DPO's reference is an adapter on the same base, not a model."""
    sft = measure("sft on pairs", args, steps, "pairs_sft")
    dpo = measure("dpo", args, steps, "pairs")
    print("\npreference pairs, the same prompts (sft: prompt + chosen; dpo: chosen and rejected):")
    for name, r in (("sft", sft), ("dpo", dpo)):
        print(
            f"  {name:<4} {r['step_s']:.3f} s/step  peak RSS {r['peak_rss_mb']:,.0f} MB "
            f"({r['peak_rss_mb'] - r['rss_before_mb']:,.0f} MB above the start)"
        )
    grown = (dpo["peak_rss_mb"] - dpo["rss_before_mb"]) / (
        sft["peak_rss_mb"] - sft["rss_before_mb"]
    )
    print(f"dpo / sft peak RSS: {dpo['peak_rss_mb'] / sft['peak_rss_mb']:.2f}  (goal <= 1.30)")
    print(f"dpo / sft peak RSS above the start: {grown:.2f}")
    print(f"dpo / sft step time: {dpo['step_s'] / sft['step_s']:.2f}")
    print(
        f"dpo reference: {'a second model' if dpo['reference_model'] else 'no second model'}, "
        f"adapters on the one base: {', '.join(dpo['adapters'])}; first loss "
        f"{dpo['first_logged_loss']:.6f} (ln 2 = 0.693147)"
    )


if __name__ == "__main__":
    main()
