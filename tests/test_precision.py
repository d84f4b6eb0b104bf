"""Precision from the hardware on a CPU: bf16 autocast where the CPU multiplies bf16 natively,
fp32 elsewhere, the recipe's bf16/fp16 over both."""

from __future__ import annotations

import json
import platform
from types import SimpleNamespace

import pytest
import torch
import yaml
from helpers import run_cli, write_recipe

from lora_tune import hardware
from lora_tune.errors import UserError

# /proc/cpuinfo lines as these CPUs print them (shortened).
ZEN4 = "processor\t: 0\nflags\t\t: fpu sse sse2 avx avx2 avx512f avx512_bf16 avx512_vnni\n"
SAPPHIRE_RAPIDS = "flags\t\t: avx2 avx512f avx512_fp16 amx_bf16 amx_tile amx_int8\n"
SKYLAKE = "flags\t\t: fpu sse sse2 avx avx2 avx512f avx512bw avx512vl\n"
GRAVITON3 = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes sve asimdfhm bf16 svebf16 i8mm\n"
GRAVITON2 = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics\n"


@pytest.mark.parametrize(
    "cpuinfo, native",
    [
        (ZEN4, True),
        (SAPPHIRE_RAPIDS, True),
        (SKYLAKE, False),
        (GRAVITON3, True),
        (GRAVITON2, False),
    ],
)
def test_native_bf16_is_read_from_the_cpu_flags(cpuinfo, native):
    assert hardware.native_bf16_in(cpuinfo) is native


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="torch's probe is x86's")
def test_this_cpus_flags_agree_with_torchs_own_probe(monkeypatch):
    monkeypatch.delenv(hardware.CPU_BF16_VARIABLE, raising=False)
    probed = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert hardware.native_cpu_bf16() is probed


def test_the_variable_forces_the_answer_and_a_bad_value_is_a_user_error(monkeypatch):
    monkeypatch.setenv(hardware.CPU_BF16_VARIABLE, "1")
    assert hardware.native_cpu_bf16() is True
    monkeypatch.setenv(hardware.CPU_BF16_VARIABLE, "0")
    assert hardware.native_cpu_bf16() is False
    monkeypatch.setenv(hardware.CPU_BF16_VARIABLE, "yes")
    with pytest.raises(UserError) as raised:
        hardware.native_cpu_bf16()
    assert str(raised.value) == (
        "LORA_TUNE_CPU_BF16='yes': expected 1 or 0\n"
        "  - LORA_TUNE_CPU_BF16=1 treats this CPU as having native bf16, 0 as lacking it; unset "
        "it to read the CPU's flags"
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's defaults")
@pytest.mark.parametrize("native", ["1", "0"])
def test_cpu_defaults_follow_native_bf16_and_the_recipe_wins(native, monkeypatch):
    monkeypatch.setenv(hardware.CPU_BF16_VARIABLE, native)
    defaults = hardware.hardware_training_defaults({})
    assert defaults["bf16"] is (native == "1") and defaults["fp16"] is False
    assert defaults["use_cpu"] is True and defaults["gradient_checkpointing"] is False
    for key in ("bf16", "fp16"):  # either key in the recipe leaves precision to it
        assert "bf16" not in hardware.hardware_training_defaults({key: False})


@pytest.mark.parametrize(
    "bf16, fp16, use_cpu, native, label",
    [
        (True, False, True, "1", "bf16 mixed (native bf16 on this CPU)"),
        (False, False, True, "1", "fp32 (native bf16 on this CPU)"),
        (False, False, True, "0", "fp32 (no native bf16 on this CPU)"),
        (
            True,
            False,
            True,
            "0",
            "bf16 mixed (no native bf16 on this CPU: many times slower than fp32)",
        ),
        (True, False, False, "0", "bf16 mixed"),
        (False, True, False, "0", "fp16 mixed"),
    ],
)
def test_the_plan_says_what_precision_runs_and_why(bf16, fp16, use_cpu, native, label, monkeypatch):
    monkeypatch.setenv(hardware.CPU_BF16_VARIABLE, native)
    args = SimpleNamespace(bf16=bf16, fp16=fp16, use_cpu=use_cpu)
    assert hardware.precision_label(args) == label


def logged_losses(out) -> list[float]:
    history = json.loads((out / "metrics.json").read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


@pytest.mark.skipif(torch.cuda.is_available(), reason="training on the CPU")
def test_training_runs_in_bf16_autocast_exactly_where_the_cpu_has_it(
    tiny, tmp_path, capsys, monkeypatch
):
    """The same recipe (no bf16/fp16 keys) trains under bf16 autocast when the CPU counts as
    native, in fp32 when not, and in fp32 on a native CPU whose recipe says training.bf16: false.
    bf16 matrix multiplies round, so the first loss differs from fp32's; the weights stay fp32."""
    runs = {}
    for name, native, training in (
        ("auto-native", "1", {}),
        ("auto-emulated", "0", {}),
        ("recipe-fp32", "1", {"bf16": False}),
    ):
        monkeypatch.setenv(hardware.CPU_BF16_VARIABLE, native)
        out = tmp_path / name
        training = {"max_steps": 3, "logging_steps": 1, "save_strategy": "no"} | training
        path = write_recipe(tmp_path / f"{name}.yaml", tiny, out, training=training)
        assert run_cli("train", path) == 0
        plan = capsys.readouterr().out
        assert ("bf16 mixed" in plan) is (name == "auto-native"), name
        runs[name] = logged_losses(out)
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["dtype"] == "float32" and metrics["device"] == "cpu"
        # The choice is made at run time from the hardware, not written into the recipe.
        saved = yaml.safe_load((out / "recipe.yaml").read_text())["training"]
        assert ("bf16" in saved) is (name == "recipe-fp32")
    assert runs["auto-emulated"] == runs["recipe-fp32"]  # both fp32: the same numbers
    assert runs["auto-native"][0] != runs["auto-emulated"][0]
    assert runs["auto-native"][0] == pytest.approx(runs["auto-emulated"][0], rel=1e-2)
