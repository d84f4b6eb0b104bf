"""`lora-tune export`: GGUF files written by llama.cpp's own converter, checked in llama.cpp
against the transformers model they came from, with an Ollama Modelfile beside them."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import run_cli, write_recipe

from lora_tune import gguf_check, llama_cpp, ollama
from lora_tune import tiny as builder

pytest.importorskip("llama_cpp", reason="needs lora-tune[export] (llama-cpp-python)")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def spm(tmp_path_factory, tiny) -> Path:
    """The tiny Llama with a SentencePiece tokenizer (llama.cpp identifies byte-level BPE
    tokenizers by a hash of known ones, so the tests' own BPE tokenizer is not convertible)."""
    return builder.build_model("llama", tmp_path_factory.mktemp("spm") / "tiny-spm", spm=True)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny, spm) -> Path:
    """A trained run on the SentencePiece Llama, prompt/completion data, with a chat template."""
    folder = tmp_path_factory.mktemp("export-run")
    recipe = write_recipe(
        folder / "recipe.yaml",
        tiny,
        folder / "run",
        model={"id": str(spm)},
        data={
            "train": str(tiny / "data" / "pc_train.jsonl"),
            "eval": str(tiny / "data" / "pc_eval.jsonl"),
            "format": "prompt_completion",
            "chat_template": builder.CHAT_TEMPLATE,
        },
        training={"num_train_epochs": 1, "max_steps": 40},
    )
    assert run_cli("train", recipe) == 0
    return folder / "run"


@pytest.fixture(scope="module")
def f16(run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exports") / "f16"
    assert run_cli("export", run, "-o", out, "--quant", "f16") == 0
    return out


def report(folder: Path) -> dict:
    return json.loads((folder / "export_report.json").read_text())


def test_f16_export_of_a_run_matches_the_merged_model(f16, run):
    found = report(f16)
    assert sorted(p.name for p in f16.iterdir()) == [
        "Modelfile",
        "export_report.json",
        "run-f16.gguf",
    ]
    assert found["kind"] == "adapter" and found["architecture"] == "LlamaForCausalLM"
    assert found["merge"]["verified"] is True
    check = found["verification"]
    assert check["ok"] and check["tokenizer"]["ok"] and check["metadata"]["ok"]
    assert check["greedy"]["llama.cpp_text"][0] == "is silver."  # a run's eval sample answered
    # The run's 4 eval samples and the 3 fixed texts tokenize alike in llama.cpp and transformers.
    assert check["tokenizer"]["texts"] == 7
    assert check["logits"]["max_abs_diff"] < check["logits"]["tolerance"] <= 0.02
    assert check["logits"]["top1_agreement"] == 1.0
    assert check["greedy"]["identical"] == check["greedy"]["prompts"] == 4
    # The GGUF carries the run's chat template and special tokens.
    with gguf_check.opened(f16 / "run-f16.gguf", 32) as llm:
        assert llm.metadata["tokenizer.chat_template"] == builder.CHAT_TEMPLATE
        assert (llm.token_bos(), llm.token_eos()) == (1, 2)
        assert int(llm.metadata["general.file_type"]) == 1  # MOSTLY_F16


def test_the_gguf_is_the_trained_model_not_the_base(f16, run, spm):
    """Logits in llama.cpp follow the adapter: the base alone differs by far more than the
    tolerance the export was held to."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spm)
    ids = tokenizer("what colour is the river? the river is")["input_ids"]
    base = gguf_check.hf_logits(AutoModelForCausalLM.from_pretrained(spm).eval(), ids)
    with gguf_check.opened(f16 / "run-f16.gguf", 64) as llm:
        exported = gguf_check.gguf_logits(llm, ids)
    assert np.abs(base - exported).max() > 10 * report(f16)["verification"]["logits"]["tolerance"]


def test_modelfile_carries_template_stops_and_parameters(f16):
    text = (f16 / "Modelfile").read_text()
    assert text.startswith("FROM ./run-f16.gguf\n")
    assert (
        'TEMPLATE """{{- range .Messages }}{{ if eq .Role "system" }}system: {{ .Content }}</s>\n'
        in text
    )
    assert (
        '{{ else if eq .Role "assistant" }}assistant: {{ .Content }}</s>\n{{ end }}{{ end }}assistant: """'
        in text
    )
    assert 'PARAMETER stop "</s>"' in text
    # The model's generation config is greedy, without a repetition penalty (Ollama's is 1.1).
    assert text.endswith("PARAMETER temperature 0\nPARAMETER repeat_penalty 1.0\n")
    assert report(f16)["modelfile"]["chat_template"] == "translated and checked on 5 conversations"


def test_q8_0_export_agrees_at_the_top_token(run, f16, tmp_path):
    out = tmp_path / "q8"
    assert run_cli("export", run, "-o", out, "--quant", "q8_0") == 0
    check = report(out)["verification"]
    assert check["ok"] and check["logits"]["min_top1_agreement"] == 0.9
    assert "tolerance" not in check["logits"]  # quantized: judged by top-1 agreement
    assert check["logits"]["top1_agreement"] >= 0.95
    assert check["greedy"]["identical"] >= 3
    assert (out / "run-q8_0.gguf").stat().st_size < 0.7 * (f16 / "run-f16.gguf").stat().st_size


def test_k_quant_goes_through_llama_cpp_quantizer(run, tmp_path, capsys):
    out = tmp_path / "q4"
    assert run_cli("export", run, "-o", out, "--quant", "q4_k_m") == 0
    found = report(out)
    # The tiny model's rows (64 values) are shorter than a k-quant block (256): llama.cpp
    # gives those tensors another type, and the report says how many.
    assert found["fallback_tensors"] == 15 and found["tensors"] == 21
    assert "15 of 21 tensors are not q4_k_m" in capsys.readouterr().out
    assert found["verification"]["logits"]["top1_agreement"] >= 0.9
    assert sorted(p.name for p in out.iterdir()) == [
        "Modelfile",
        "export_report.json",
        "run-q4_k_m.gguf",
    ]


def test_adapter_only_gguf_on_the_base_gguf_matches_the_merged_export(run, f16, tmp_path):
    out = tmp_path / "lora"
    assert run_cli("export", run, "-o", out, "--adapter-only") == 0
    found = report(out)
    assert set(found["files"]) == {"run-lora-f16.gguf", "base-f16.gguf"}
    logits = found["verification"]["logits"]
    assert found["verification"]["ok"] and logits["max_abs_diff"] < logits["tolerance"]
    merged = report(f16)["verification"]["greedy"]["llama.cpp"]
    assert found["verification"]["greedy"]["llama.cpp"] == merged
    modelfile = (out / "Modelfile").read_text().splitlines()
    assert modelfile[:2] == ["FROM ./base-f16.gguf", "ADAPTER ./run-lora-f16.gguf"]
    # The base GGUF is converted with the adapter's tokenizer: it carries the trained template.
    assert found["verification"]["metadata"]["found"]["chat_template"] == builder.CHAT_TEMPLATE
    assert found["verification"]["metadata"]["differing"] == []
    # Given a base GGUF, only the LoRA file is written, and the Modelfile points at that base.
    again = tmp_path / "lora-on-given-base"
    base = out / "base-f16.gguf"
    assert run_cli("export", run, "-o", again, "--adapter-only", "--base-gguf", base) == 0
    assert set(report(again)["files"]) == {"run-lora-f16.gguf"}
    assert (again / "Modelfile").read_text().startswith(f"FROM {base.resolve()}\nADAPTER ")
    assert report(again)["verification"]["greedy"]["llama.cpp"] == merged
    # --force never deletes the base GGUF it is given.
    inside = out / "base-f16.gguf"
    assert (
        run_cli("export", run, "-o", out, "--adapter-only", "--base-gguf", inside, "--force") == 2
    )
    assert inside.is_file()


def test_opt_is_refused_before_any_work(tiny, tmp_path, capsys):
    out = tmp_path / "opt"
    assert run_cli("export", tiny / "tiny-opt", "-o", out) == 2
    err = capsys.readouterr().err
    assert "llama.cpp's converter does not support OPTForCausalLM models, so no GGUF can be" in err
    assert "nothing was done" in err and "Llama, " in err and "Qwen2, " in err
    assert not out.exists() and list(tmp_path.iterdir()) == []
    # From an adapter, the merged transformers model is offered instead.
    adapter = lora_adapter(tiny / "tiny-opt", tmp_path / "opt-adapter")
    assert run_cli("export", adapter, "-o", out) == 2
    assert f"lora-tune merge {adapter} -o merged/opt-adapter" in capsys.readouterr().err
    assert not out.exists()


def lora_adapter(base: Path, out: Path, **lora) -> Path:
    """An untrained adapter with random B (so it changes the model), saved by PEFT."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    config = LoraConfig(init_lora_weights=False, **({"r": 4, "lora_alpha": 8} | lora))
    get_peft_model(AutoModelForCausalLM.from_pretrained(base), config).save_pretrained(out)
    return out


def test_rslora_adapter_is_rescaled_for_llama_cpp(spm, tmp_path):
    """llama.cpp scales a LoRA by alpha / r; rsLoRA means alpha / sqrt(r). Without the
    rescaled alpha the adapter-only export would answer differently, and be refused."""
    adapter = lora_adapter(spm, tmp_path / "rslora", r=16, lora_alpha=4, use_rslora=True)
    out = tmp_path / "out"
    assert run_cli("export", adapter, "-o", out, "--adapter-only", "--quant", "f32") == 0
    logits = report(out)["verification"]["logits"]
    assert logits["max_abs_diff"] < logits["tolerance"] == pytest.approx(1e-3, rel=0.5)
    assert json.loads((adapter / "adapter_config.json").read_text())["use_rslora"] is True


def test_a_gguf_that_answers_differently_is_refused(spm, tmp_path, capsys, monkeypatch):
    """Written without the rsLoRA rescaling, the LoRA file scales the adapter wrongly in
    llama.cpp: the comparison catches it and nothing is written."""
    from lora_tune import export

    adapter = lora_adapter(spm, tmp_path / "rslora", r=16, lora_alpha=4, use_rslora=True)
    monkeypatch.setattr(export, "plain_scaling", lambda adapter, work: adapter)
    out = tmp_path / "out"
    assert run_cli("export", adapter, "-o", out, "--adapter-only", "--quant", "f32") == 2
    err = capsys.readouterr().err
    assert "export refused: the GGUF does not answer as the model it came from in llama.cpp" in err
    assert "next-token logits differ by up to" in err and "(tolerance 0.001" in err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_merge_keeps_the_sentencepiece_model(run, spm, tmp_path):
    """transformers saves the tokenizer as tokenizer.json alone; llama.cpp's converter needs the
    merge scores in tokenizer.model, so a merged model keeps the base's."""
    out = tmp_path / "merged"
    assert run_cli("merge", run, "-o", out) == 0
    assert (out / "tokenizer.model").read_bytes() == (spm / "tokenizer.model").read_bytes()
    assert not (run / "adapter" / "tokenizer.model").exists()


def test_dora_adapter_only_is_refused(spm, tmp_path, capsys):
    adapter = lora_adapter(spm, tmp_path / "dora", use_dora=True)
    assert run_cli("export", adapter, "-o", tmp_path / "out", "--adapter-only") == 2
    err = capsys.readouterr().err
    assert "llama.cpp's LoRA files cannot hold DoRA's magnitude vectors" in err
    assert "export the merged model instead (drop --adapter-only)" in err
    assert not (tmp_path / "out").exists()


def chat_probes(run: Path, tiny: Path, folder: Path) -> Path:
    """A copy of the run whose eval data are chats: the tiny template puts </s> mid-text."""
    copy = folder / "chat-run"
    shutil.copytree(run, copy)
    recipe = yaml.safe_load((copy / "recipe.yaml").read_text())
    recipe["data"] |= {
        "train": str(tiny / "data" / "chat_train.jsonl"),
        "eval": str(tiny / "data" / "chat_eval.jsonl"),
        "format": "messages",
    }
    (copy / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return copy


def test_tokenizer_differences_are_refused_unless_accepted(run, tiny, tmp_path, capsys):
    """After a special token llama.cpp's SentencePiece tokenizer inserts a space that
    transformers does not: the chat probes come out as other token ids."""
    copy, out = chat_probes(run, tiny, tmp_path), tmp_path / "out"
    assert run_cli("export", copy, "-o", out) == 2
    err = capsys.readouterr().err
    assert "export refused: the GGUF does not answer as the model it came from" in err
    assert "llama.cpp tokenizes 4 of 7 probe texts differently, e.g. 'user: " in err
    assert "nothing was written" in err and "--allow-token-differences" in err
    assert list(tmp_path.iterdir()) == [copy]  # no output, no partial folder
    assert run_cli("export", copy, "-o", out, "--allow-token-differences") == 0
    check = report(out)["verification"]
    assert (
        check["ok"] and not check["tokenizer"]["ok"] and len(check["tokenizer"]["differing"]) == 4
    )
    first = check["tokenizer"]["differing"][0]
    assert len(first["llama.cpp"]) > len(first["transformers"])


def test_existing_output_is_refused_and_kept(run, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert run_cli("export", run, "-o", out) == 2
    assert f"{out} already exists" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert run_cli("export", run, "-o", run, "--force") == 2
    assert (
        f"--output {run} is the export source {run}; an export never replaces its own inputs"
        in (capsys.readouterr().err)
    )
    assert (run / "adapter" / "adapter_config.json").is_file()


def test_a_killed_export_leaves_no_complete_looking_output(run, tmp_path):
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "lora_tune", "export", str(run), "-o", str(out)]
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 120
    while not list(tmp_path.glob(".killed.partial-*/*.gguf")) and time.time() < deadline:
        assert process.poll() is None, "the export ended before it could be killed"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # the converter too
    process.wait()
    assert not out.exists()
    assert run_cli("export", run, "-o", out) == 0
    assert report(out)["verification"]["ok"]


def test_chat_templates_become_ollama_templates(spm):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spm)
    chatml = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
        "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
        "{% endif %}"
    )
    turns = ollama.read_turns(tokenizer, chatml)
    assert turns.before["user"] == "<|im_start|>user\n" and turns.after["user"] == "<|im_end|>\n"
    assert turns.generation == "<|im_start|>assistant\n" and turns.start == ""
    gemma = (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system') }}"
        "{% endif %}{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('alternate') }}{% endif %}{% set role = 'model' if m['role'] == "
        "'assistant' else m['role'] %}{{ '<start_of_turn>' + role + '\\n' + m['content'] | trim + "
        "'<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}"
        "{% endif %}"
    )
    turns = ollama.read_turns(tokenizer, gemma)
    assert turns.start == "<s>" and "system" not in turns.before  # llama.cpp adds BOS itself
    assert turns.before["assistant"] == "<start_of_turn>model\n"
    assert turns.go_template() == (
        '{{- range .Messages }}{{ if eq .Role "user" }}<start_of_turn>user\n{{ .Content }}'
        '<end_of_turn>\n{{ else if eq .Role "assistant" }}<start_of_turn>model\n{{ .Content }}'
        "<end_of_turn>\n{{ end }}{{ end }}<start_of_turn>model\n"
    )
    # A default system prompt when none is given is not a role-tagged turn: left to Ollama.
    default_system = (
        "{% if messages[0]['role'] != 'system' %}SYSTEM: be brief\n{% endif %}" + chatml
    )
    assert ollama.read_turns(tokenizer, default_system) is None


def test_without_llama_cpp_export_says_what_to_install(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(llama_cpp, "installed_version", lambda: None)
    assert run_cli("export", tiny / "tiny-llama", "-o", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "GGUF export needs llama.cpp (llama-cpp-python), which is not installed" in err
    assert "pip install 'lora-tune[export]'" in err


def test_converters_unpack_from_the_source_distribution(tmp_path):
    import tarfile

    source = tmp_path / "src" / "llama_cpp_python-9.9" / "vendor" / "llama.cpp"
    for name in ("convert_hf_to_gguf.py", "conversion/__init__.py", "gguf-py/gguf/x.py", "ggml.c"):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_text(name)
    (source / "conversion" / "__init__.py").write_text(
        'TEXT_MODEL_MAP: dict[str, str] = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen"}'
    )
    archive = tmp_path / "sdist.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "llama_cpp_python-9.9", arcname="llama_cpp_python-9.9")
    root = tmp_path / "cache" / "llama.cpp-9.9"
    llama_cpp.unpack(archive, root)
    assert sorted(p.name for p in root.iterdir()) == [
        "conversion",
        "convert_hf_to_gguf.py",
        "gguf-py",
    ]
    assert llama_cpp.supported_architectures(root) == ["LlamaForCausalLM", "Qwen2ForCausalLM"]
    assert not list(root.parent.glob(".*partial*"))
