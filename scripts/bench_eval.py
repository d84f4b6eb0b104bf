"""Benchmark: lora-tune eval's batched, length-sorted loss pass against a one-sample-at-a-time loop.

    python scripts/bench_eval.py [--quick]

Same model and data, measured in this process one after the other: tokens/s of each, their ratio
(goal >= 3), and the two losses, which must agree (token weighting makes batching exact).
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="a tiny model and few rows: checks the script runs"
    )
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lora_tune import data, evaluate, tiny
    from lora_tune.models import load_tokenizer
    from lora_tune.recipe import DataSection, ModelSection

    work = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    tokenizer = tiny.build_tokenizer("llama")
    hidden, layers, rows = (64, 2, 64) if args.quick else (512, 8, 256)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=512,
        bos_token_id=0,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")
    rng = random.Random(0)
    tiny.write_jsonl(
        work / "eval.jsonl",
        [
            {"text": " ".join(tiny.sentence(rng) for _ in range(rng.randint(1, 8)))}
            for _ in range(rows)
        ],
    )
    tokenizer = load_tokenizer(ModelSection(id=str(work / "model")))
    dataset = data.load_eval(
        str(work / "eval.jsonl"), DataSection(train="unused", max_length=256), tokenizer
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(work / "model").to(device).eval()

    results = {}
    for name, size in (
        ("batch-size-1 loop", 1),
        (f"batched, length-sorted ({args.batch_size})", args.batch_size),
    ):
        batches = evaluate.batches(dataset, size, tokenizer.pad_token_id, device)
        start = time.perf_counter()
        metrics, _ = evaluate.measure(model, batches)
        results[name] = (metrics, time.perf_counter() - start)
    print(
        f"{len(dataset)} samples, {sum(len(ids) for ids in dataset['input_ids']):,} tokens, "
        f"model of {sum(p.numel() for p in model.parameters()):,} parameters, on {device}"
    )
    for name, (metrics, seconds) in results.items():
        print(
            f"{name:<32} {seconds:7.2f} s  loss {metrics['loss']:.6f}  {metrics['tokens_per_second']:,.0f} tokens/s"
        )
    (one, t1), (batched, tb) = results.values()
    print(
        f"speed-up: {t1 / tb:.2f}x (goal >= 3); loss difference {abs(one['loss'] - batched['loss']):.2e}"
    )


if __name__ == "__main__":
    main()
