"""The benchmarks keep working: each runs in its quick mode (these runs judge no speed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize(
    "script, expected",
    [
        (
            "bench_train.py",
            [
                "lora-tune / raw fp32 step time:",
                "lora-tune / raw step time in the same precision",
                "lora-tune / raw-auto peak RSS:",
                "trl defaults / lora-tune step time:",
                "varying lengths, the same samples",
                "padding-free",
                "dpo / sft peak RSS:",
                "dpo reference: no second model",
            ],
        ),
        ("bench_eval.py", ["speed-up:", "loss difference"]),
        ("bench_merge.py", ["stream", "max |stream - baseline| over all merged weights: 0"]),
        (
            "bench_memory.py",
            [
                "estimate/measured",
                "checkpointing",
                "qlora 4-bit",
                "dpo",
                "estimate / measured: min",
            ],
        ),
    ],
)
def test_benchmark_runs(script, expected, tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), "--quick"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for text in expected:
        assert text in result.stdout
