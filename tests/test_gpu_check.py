"""scripts/gpu_check.sh keeps working while no GPU is at hand: its CPU mode runs every
measurement at tiny sizes; the wheels it carries are the versions tested here and fit the
device tool's limit."""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import gpu_check  # noqa: E402
import gpu_check_wheels  # noqa: E402


@pytest.mark.slow
def test_cpu_mode_measures_everything_and_writes_one_json_file(tmp_path):
    env = os.environ | {"OUT": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "cpu"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    m = results["measurements"]
    assert list(m) == list(gpu_check.MEASUREMENTS)
    assert gpu_check.errors(m) == []
    for name in ("raw", "lora-tune", "trl"):
        run = m["step"][name]
        assert run["step_s"] > 0 and run["peak_bytes"] > 0 and run["tokens_per_step"] > 0
        assert all(math.isfinite(loss) for loss in run["losses"])
    assert len(m["step"]["rounds"]["raw"]) == 1
    assert m["kernels"]["compile"]["backend"] == "eager" and m["kernels"]["compile"]["step_s"] > 0
    assert "Triton" in m["kernels"]["liger"]["skipped"]
    free = m["padding"]["padding-free sdpa"]
    # The same samples in the same order: padding-free batches give the padded run's losses.
    assert free["loss_difference"] < 1e-2
    assert m["qlora"]["step_s"] > 0
    assert m["eval"]["batch 1"]["loss"] == pytest.approx(m["eval"]["batched"]["loss"], rel=1e-5)
    assert m["merge"]["stream"]["ok"] and m["merge"]["memory"]["ok"]
    assert m["merge"]["max_abs_weight_diff"] < 1e-2
    assert re.fullmatch(r"2 skipped in [\d.]+s", m["gpu_tests"]["summary"])
    # FSDP's config runs as a plain process on a CPU: its steps are checked, not the sharding.
    fsdp = m["distributed"]["fsdp2"]
    assert fsdp["distributed_type"] == "MULTI_CPU" and fsdp["adapter_check"] == "ok"
    assert fsdp["peft_reload"] and fsdp["lora_b_max"] > 0
    assert fsdp["resumed"] and fsdp["steps"] == 2 * results["sizes"]["distributed_steps"]
    assert m["distributed"]["zero3"]["skipped"] == "DeepSpeed needs a GPU"
    names = [goal["name"] for goal in results["goals"]]
    assert names[0] == "lora-tune / raw step time" and "eval batched / batch 1 speed" in names
    assert "padding-free sdpa / padded tokens/s" in names
    assert "goal" in done.stdout and "lora-tune / raw step time" in done.stdout
    assert results["environment"]["mode"] == "cpu"


def test_goals_are_the_ratios_of_the_runs():
    m = {
        "step": {
            "raw": {"step_s": 1.0, "peak_bytes": 100},
            "lora-tune": {"step_s": 1.02, "peak_bytes": 100},
            "trl": {"step_s": 2.0, "peak_bytes": 200},
        },
        "kernels": {"liger": {"step_s": 1.5, "peak_bytes": 120}, "compile": {"error": "x"}},
        "padding": {
            "padded": {"step_s": 1.0, "tokens_per_step": 1000},
            "padding-free flex_attention": {"step_s": 1.0, "tokens_per_step": 1600},
        },
        "eval": {"batch 1": {"seconds": 20.0}, "batched": {"seconds": 1.0}},
    }
    found = {g["name"]: (g["value"], g["met"]) for g in gpu_check.goals(m)}
    assert found["lora-tune / raw step time"] == (pytest.approx(1.02), True)
    assert found["trl / liger step time"] == (pytest.approx(2.0 / 1.5), True)
    assert found["liger / trl peak memory"] == (pytest.approx(0.6), True)
    assert found["trl / compile step time"] == (None, None)  # the run failed: no value, no verdict
    assert found["padding-free flex_attention / padded tokens/s"] == (pytest.approx(1.6), True)
    assert found["eval batched / batch 1 speed"] == (pytest.approx(20.0), True)


def carried() -> dict[str, str]:
    """The name==version pins of gpu_check.sh's WHEELS and DEEPSPEED."""
    text = (ROOT / "scripts" / "gpu_check.sh").read_text()
    block = re.search(r"WHEELS=\((.*?)\)", text, re.S).group(1)
    pins = re.findall(r"([A-Za-z0-9_.-]+)==([0-9][^\s]*)", block)
    return dict(pins)


def test_the_carried_wheels_are_the_versions_the_tests_run_here():
    pins = carried()
    assert {"transformers", "trl", "peft", "datasets", "liger-kernel", "bitsandbytes"} <= set(pins)
    for name in ("transformers", "trl", "peft", "datasets", "pydantic", "bitsandbytes"):
        assert pins[name] == importlib.metadata.version(name), name


def fake_wheel(path: Path) -> Path:
    files = {
        "bitsandbytes/__init__.py": b"",
        "bitsandbytes/libbitsandbytes_cpu.so": b"cpu",
        "bitsandbytes/libbitsandbytes_cuda118.so": b"x" * 1000,
        "bitsandbytes/libbitsandbytes_cuda130.so": b"y" * 100,
        "bitsandbytes/libbitsandbytes_rocm64.so": b"z" * 1000,
        "bitsandbytes-9.9.dist-info/WHEEL": b"Wheel-Version: 1.0\nRoot-Is-Purelib: false\nTag: py3-none-any\n",
        "bitsandbytes-9.9.dist-info/METADATA": b"Metadata-Version: 2.1\nName: bitsandbytes\nVersion: 9.9\n",
    }
    record = "".join(f"{name},,\n" for name in files) + "bitsandbytes-9.9.dist-info/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as wheel:
        for name, data in files.items():
            wheel.writestr(name, data)
        wheel.writestr("bitsandbytes-9.9.dist-info/RECORD", record)
    return path


def test_slimming_keeps_one_cuda_release_and_pip_still_installs_it(tmp_path):
    wheel = fake_wheel(tmp_path / "bitsandbytes-9.9-py3-none-any.whl")
    removed = gpu_check_wheels.slim(wheel, "cuda13")
    assert sorted(removed) == [
        "bitsandbytes/libbitsandbytes_cuda118.so",
        "bitsandbytes/libbitsandbytes_rocm64.so",
    ]
    with zipfile.ZipFile(wheel) as slimmed:
        names = set(slimmed.namelist())
        record = slimmed.read("bitsandbytes-9.9.dist-info/RECORD").decode()
    assert "bitsandbytes/libbitsandbytes_cuda130.so" in names
    assert {line.split(",")[0] for line in record.splitlines()} == names
    target = tmp_path / "site"
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps"]
    done = subprocess.run(
        [*command, "--target", str(target), str(wheel)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    installed = sorted(p.name for p in (target / "bitsandbytes").glob("*.so"))
    assert installed == ["libbitsandbytes_cpu.so", "libbitsandbytes_cuda130.so"]


def test_a_run_past_the_budget_is_skipped_and_a_child_is_stopped_with_its_own(tmp_path):
    ctx = gpu_check.Context("cpu", tmp_path, tmp_path / "out.json", False, time.time() - 1)
    assert gpu_check.run(ctx, "eval")["skipped"] == "the time budget (--budget) ran out"
    ctx.deadline = time.time() + 3
    spawn = "import subprocess, time; print(subprocess.Popen(['sleep', '60']).pid, flush=True); time.sleep(60)"
    started = time.time()
    returncode, stdout, stderr = gpu_check.bounded(ctx, [sys.executable, "-c", spawn])
    assert time.time() - started < 20 and returncode == -9
    assert stderr.endswith("stopped: the time budget (--budget) ran out")
    assert gone(int(stdout))  # the process the child started went with it


def gone(pid: int) -> bool:
    """Whether a process has ended (a kill takes effect soon after it is sent, not at once)."""
    for _ in range(50):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split()[2]
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state == "Z" or b"sleep" not in command:  # ended, or the number reused since
            return True
        time.sleep(0.1)
    return False
