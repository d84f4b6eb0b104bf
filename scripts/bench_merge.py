"""Benchmark: streaming merge vs merge_and_unload on an opt-350m-architecture model.

    python scripts/bench_merge.py [--shard-size 100MB] [--workdir DIR]

Builds facebook/opt-350m's architecture (tests/assets config, random fp16 weights, sharded) and
an r=16 LoRA adapter on q_proj/v_proj, then merges it, each way in its own process:
  baseline  the script users write: from_pretrained, PeftModel, merge_and_unload, save_pretrained
  stream    lora-tune merge --method stream --no-verify
  verified  lora-tune merge --method stream (adds the logit check, which loads the model)
and prints peak RSS and wall time of each, the ratios against the baseline, and the largest
difference between the baseline's and the streamed merged weights.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Peak RSS from VmHWM: getrusage's ru_maxrss would carry over the parent's peak across fork and exec.
MEASURE = """
import json, sys, time
start = time.perf_counter()
{body}
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({{"wall_s": time.perf_counter() - start, "peak_rss_mb": int(hwm.split()[1]) / 1024}}))
"""
BASELINE = """
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
base, adapter, out = sys.argv[1:4]
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype="auto"), adapter)
model.merge_and_unload().save_pretrained(out, max_shard_size=sys.argv[4])
AutoTokenizer.from_pretrained(adapter).save_pretrained(out)
"""
STREAM = """
from pathlib import Path
from lora_tune import merge
merge.run(Path(sys.argv[2]), Path(sys.argv[3]), method="stream", verify={verify}, max_shard_size=sys.argv[4])
"""


def build(work: Path, shard_size: str, quick: bool) -> tuple[Path, Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from lora_tune import tiny

    base, adapter = work / "opt-350m", work / "adapter"
    config = AutoConfig.from_pretrained(ROOT / "tests" / "assets" / "opt-350m-config.json")
    if quick:  # the same architecture, scaled down
        config.update(
            {
                "hidden_size": 64,
                "ffn_dim": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "word_embed_proj_dim": 64,
                "vocab_size": 512,
            }
        )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    model.save_pretrained(base, max_shard_size=shard_size)
    tokenizer = tiny.build_tokenizer("opt")
    tokenizer.save_pretrained(base)
    lora = get_peft_model(
        model,
        LoraConfig(
            r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False
        ),
    )
    lora.peft_config["default"].base_model_name_or_path = str(base)
    lora.save_pretrained(adapter)
    tokenizer.save_pretrained(adapter)
    return base, adapter


def measure(name: str, body: str, base: Path, adapter: Path, out: Path, shard_size: str) -> dict:
    code = MEASURE.format(body=body)
    result = subprocess.run(
        [sys.executable, "-c", code, str(base), str(adapter), str(out), shard_size],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    if result.returncode != 0:
        sys.exit(f"{name} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def max_difference(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    def tensors(folder):
        merged = {}
        for path in folder.glob("*.safetensors"):
            merged |= load_file(path)
        return merged

    left, right = tensors(a), tensors(b)
    return max((left[k].float() - right[k].float()).abs().max().item() for k in left)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shard-size", default="100MB", help="shard size of the base and merged checkpoints"
    )
    parser.add_argument("--workdir", type=Path, help="where to build (default: a temporary folder)")
    parser.add_argument(
        "--quick", action="store_true", help="a scaled-down model: checks the script runs"
    )
    args = parser.parse_args()
    if args.quick:
        args.shard_size = "50KB"
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-merge-"))
    base, adapter = build(work, args.shard_size, args.quick)
    results = {
        "baseline": measure(
            "baseline", BASELINE, base, adapter, work / "baseline", args.shard_size
        ),
        "stream": measure(
            "stream", STREAM.format(verify=False), base, adapter, work / "stream", args.shard_size
        ),
        "verified": measure(
            "verified",
            STREAM.format(verify=True),
            base,
            adapter,
            work / "verified",
            args.shard_size,
        ),
    }
    base_rss, base_wall = results["baseline"]["peak_rss_mb"], results["baseline"]["wall_s"]
    print(f"opt-350m architecture, fp16, shards of {args.shard_size}; r=16 LoRA on q_proj, v_proj")
    print(f"{'method':<10} {'peak RSS MB':>12} {'wall s':>8} {'RSS ratio':>10} {'wall ratio':>11}")
    for name, r in results.items():
        print(
            f"{name:<10} {r['peak_rss_mb']:>12.0f} {r['wall_s']:>8.2f} {r['peak_rss_mb'] / base_rss:>10.2f} "
            f"{r['wall_s'] / base_wall:>11.2f}"
        )
    print(
        f"max |stream - baseline| over all merged weights: {max_difference(work / 'stream', work / 'baseline'):.3g}"
    )


if __name__ == "__main__":
    main()
