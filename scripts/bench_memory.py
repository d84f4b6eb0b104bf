"""Benchmark: the memory estimate of a training step against the peak that step reaches.

    python scripts/bench_memory.py            # eleven configurations, 23-58M Llamas (minutes on a CPU)
    python scripts/bench_memory.py --quick    # tiny variants, to check the benchmark still runs

Each configuration is a Llama built from a config with random weights (nothing downloaded) and a
`lora-tune train` run of 3 steps in its own process, LoRA r=16 on all linear layers. From one
base configuration (hidden 256, 8 layers, vocabulary 32,000, batch 8 x 128 tokens, AdamW) one
thing changes at a time: the batch, the sequence length, the vocabulary, the model size,
gradient checkpointing, a 4-bit base (QLoRA), eager attention (at length 256), DPO on preference pairs (chosen and rejected
sequences, the reference as the base with the adapter off; also with half the batch, and with
gradient checkpointing). metrics.json's `memory` section gives
the estimate made before the weights loaded (lora_tune/memory.py) and the measured peak: on a CPU
the process's peak resident memory above its level before the model loaded, on a GPU (bf16) the
most memory torch allocated. The last line is the spread of estimate / measured against the goal
(0.80-1.25 on a CPU, 0.90-1.10 on a GPU); the ratio never fails the benchmark, a failed run does.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
MIB = 1024**2
LORA = {"r": 16, "lora_alpha": 32, "target_modules": "all-linear", "lora_dropout": 0.0}
STEPS = 3
# The base configuration, and a tiny one with the same proportions for --quick.
FULL = {"hidden": 256, "layers": 8, "vocab": 32000, "batch": 8, "length": 128}
QUICK = {"hidden": 64, "layers": 2, "vocab": 2000, "batch": 4, "length": 32}
# Each configuration: what it changes in the base one (a factor on a number, recipe keys, data).
CONFIGS = {
    "base": {},
    "batch x 0.5": {"batch": 0.5},
    "length x 2": {"length": 2},
    "vocab x 0.25": {"vocab": 0.25},
    "hidden x 2": {"hidden": 2},
    "checkpointing": {"recipe": {"training": {"gradient_checkpointing": True}}},
    "qlora 4-bit": {"recipe": {"model": {"quantization": {"bits": 4}}}},
    "eager attention": {"length": 2, "recipe": {"model": {"attn_implementation": "eager"}}},
    "dpo": {"recipe": {"trainer": "dpo"}, "data": "pairs"},
    "dpo batch x 0.5": {"batch": 0.5, "recipe": {"trainer": "dpo"}, "data": "pairs"},
    "dpo checkpointing": {
        "recipe": {"trainer": "dpo", "training": {"gradient_checkpointing": True}},
        "data": "pairs",
    },
}


def sizes(base: dict, change: dict) -> dict:
    """The base configuration's numbers with this configuration's factors applied."""
    return {
        key: int(value * change.get(key, 1)) if key in change else value
        for key, value in base.items()
    }


def build_model(folder: Path, hidden: int, layers: int, vocab: int) -> Path:
    """A Llama of this size with random weights and the tiny tokenizer (its ids are the first ones
    of the vocabulary), saved once per size."""
    if (folder / "config.json").exists():
        return folder
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig
    from transformers.utils import logging

    from lora_tune import tiny

    logging.disable_progress_bar()

    tokenizer = tiny.build_tokenizer("llama")
    heads = max(1, hidden // 64)
    config = LlamaConfig(
        vocab_size=max(vocab, len(tokenizer)),
        hidden_size=hidden,
        intermediate_size=hidden * 688 // 256,  # SwiGLU's 8/3, rounded as Llama does
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=1024,
        bos_token_id=0,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_data(work: Path, longest: int, pair_length: int, rows: int) -> None:
    """Text rows longer than `longest` tokens (truncated to max_length, so every batch is full),
    and preference pairs whose prompt and answers fill about `pair_length` tokens per sequence."""
    from lora_tune import tiny

    rng = random.Random(0)
    # A sentence is about 14 tokens.
    text = [
        {"text": " ".join(tiny.sentence(rng) for _ in range(longest // 8))} for _ in range(rows)
    ]
    tiny.write_jsonl(work / "text.jsonl", text)
    block = max(1, pair_length // 32)  # the prompt a little under half, the answers the rest
    pairs = [
        {
            "prompt": " ".join(tiny.sentence(rng) for _ in range(block)),
            "chosen": " " + " ".join(tiny.sentence(rng) for _ in range(block + 1)),
            "rejected": " " + " ".join(tiny.sentence(rng) for _ in range(block + 1)),
        }
        for _ in range(rows)
    ]
    tiny.write_jsonl(work / "pairs.jsonl", pairs)


def write_recipe(work: Path, name: str, model: Path, numbers: dict, change: dict) -> Path:
    """The run's recipe: bf16 weights on a GPU, fp32 on a CPU (lora-tune's own choices there)."""
    import torch

    extra = change.get("recipe", {})
    slug = name.replace(" ", "-").replace(".", "")
    recipe = {
        "trainer": extra.get("trainer", "sft"),
        "model": {
            "id": str(model),
            "dtype": "bfloat16" if torch.cuda.is_available() else "float32",
            **extra.get("model", {}),
        },
        "lora": LORA,
        "data": {
            "train": str(work / f"{change.get('data', 'text')}.jsonl"),
            "max_length": numbers["length"],
        },
        "training": {
            "output_dir": str(work / f"run-{slug}"),
            "per_device_train_batch_size": numbers["batch"],
            "max_steps": STEPS,
            "logging_steps": 1,
            "save_steps": 100,
            "seed": 0,
            **extra.get("training", {}),
        },
    }
    path = work / f"{slug}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def measure(recipe: Path) -> dict:
    """`lora-tune train RECIPE` in its own process; metrics.json's memory section."""
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "lora_tune", "train", str(recipe), "--resume", "never"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
    if result.returncode != 0:
        sys.exit(f"{recipe.stem}: lora-tune train failed:\n{result.stderr[-3000:]}")
    out = Path(yaml.safe_load(recipe.read_text())["training"]["output_dir"])
    return json.loads((out / "metrics.json").read_text())["memory"]


def describe(numbers: dict) -> str:
    return (
        f"hidden {numbers['hidden']}, vocab {numbers['vocab']:,}, "
        f"batch {numbers['batch']} x {numbers['length']}"
    )


def report(results: dict[str, tuple[dict, dict]], gpu: bool, terms: bool) -> None:
    """The table of estimate against measured, the terms where asked, and the spread line."""
    print(
        f"\n{'config':<17} {'model and batch':<38} {'estimate MiB':>12} {'measured MiB':>12} "
        f"{'estimate/measured':>17}"
    )
    ratios = []
    for name, (numbers, memory) in results.items():
        measured = memory["measured_bytes"]  # 0 where nothing could be measured
        ratio = memory["estimate_bytes"] / measured if measured > 0 else float("inf")
        ratios.append(ratio)
        print(
            f"{name:<17} {describe(numbers):<38} {memory['estimate_bytes'] / MIB:>12,.1f} "
            f"{measured / MIB:>12,.1f} {ratio:>17.2f}"
        )
        if terms:
            print("    " + ", ".join(f"{k} {v / MIB:,.1f}" for k, v in memory["terms"].items()))
    goal = "0.90-1.10 on a GPU" if gpu else "0.80-1.25 on a CPU"
    print(f"\nestimate / measured: min {min(ratios):.2f}, max {max(ratios):.2f} (goal {goal})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="tiny models and batches: checks the script runs"
    )
    parser.add_argument("--only", nargs="+", choices=list(CONFIGS), help="these configurations")
    parser.add_argument("--terms", action="store_true", help="print each estimate's terms (MiB)")
    parser.add_argument("--workdir", type=Path, help="where models, data and runs go")
    args = parser.parse_args()
    import torch

    gpu = torch.cuda.is_available()
    base = QUICK if args.quick else FULL
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    runs = {name: CONFIGS[name] for name in args.only or CONFIGS}
    longest = max(sizes(base, change)["length"] for change in runs.values())
    build_data(work, longest, base["length"], rows=STEPS * base["batch"] * 4)
    results = {}
    for name, change in runs.items():
        numbers = sizes(base, change)
        model = build_model(
            work / f"llama-h{numbers['hidden']}-v{numbers['vocab']}",
            numbers["hidden"],
            numbers["layers"],
            numbers["vocab"],
        )
        print(f"{name}: {describe(numbers)} ...", flush=True)
        results[name] = (numbers, measure(write_recipe(work, name, model, numbers, change)))
    print(f"\nmeasured on {'the GPU (bf16)' if gpu else 'the CPU (fp32)'}, {STEPS} steps each")
    report(results, gpu, args.terms)


if __name__ == "__main__":
    main()
