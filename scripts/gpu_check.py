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
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from gpu_check_runs import ALWAYS_ISOLATED, RUNS, Context, bounded, build, release, torch_cuda

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


def child(ctx: Context, name: str, arg: str) -> None:
    """Run one measurement in this (child) process and print its result line."""
    try:
        found = RUNS[name](ctx, arg) if arg else RUNS[name](ctx)
    except Exception as exc:  # reported by the parent with the others
        import traceback

        found = {"error": f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-1500:]}"}
    print(RESULT_MARK + json.dumps(found), flush=True)


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
    if "gpu_tests" in m:
        tests = m["gpu_tests"]
        print(f"gpu tests: {tests.get('summary') or tests.get('skipped') or tests.get('error')}")
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
