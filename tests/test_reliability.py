"""Reliability: kills and resume, a corpus of bad recipes, faults, and what is never loaded."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import run_cli, write_recipe
from safetensors.torch import load_file

from lora_tune import merge, runs
from lora_tune import tiny as builder

ROOT = Path(__file__).resolve().parents[1]


def files_under(path: Path) -> set[Path]:
    return {p for p in path.rglob("*")}


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(tiny, tmp_path):
    training = {
        "max_steps": 300,
        "save_steps": 10,
        "logging_steps": 50,
        "lr_scheduler_type": "cosine",
    }
    killed = tmp_path / "killed"
    path = write_recipe(tmp_path / "killed.yaml", tiny, killed, training=training)
    command = [sys.executable, "-m", "lora_tune.cli", "train", str(path)]
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path
    )
    deadline = time.monotonic() + 120
    while (
        runs.latest_checkpoint(killed) is None
        and process.poll() is None
        and time.monotonic() < deadline
    ):
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    reached = runs.checkpoint_step(runs.latest_checkpoint(killed))
    assert reached is not None and reached < 300, "the kill came too late to test anything"
    assert not (killed / "adapter").exists()
    # A checkpoint cut short by a crash (no completion marker) must never be resumed from.
    partial = killed / "checkpoint-295"
    partial.mkdir()
    (partial / "trainer_state.json").write_text("{ truncated")

    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    resumed_from = runs.latest_checkpoint(killed)  # now the final one
    assert f"Resuming from {killed}/checkpoint-" in result.stdout
    assert "checkpoint-295" not in result.stdout and resumed_from.name == "checkpoint-300"

    reference = tmp_path / "reference"
    assert (
        run_cli(
            "train", write_recipe(tmp_path / "reference.yaml", tiny, reference, training=training)
        )
        == 0
    )
    got = load_file(killed / "adapter" / "adapter_model.safetensors")
    want = load_file(reference / "adapter" / "adapter_model.safetensors")
    assert got.keys() == want.keys()
    assert max((got[k] - want[k]).abs().max().item() for k in got) < 1e-5
    assert json.loads((killed / "metrics.json").read_text())["steps"] == 300


def test_explicit_resume_path_must_be_a_complete_checkpoint(tiny, tmp_path, capsys):
    path = write_recipe(tmp_path / "r.yaml", tiny, tmp_path / "run")
    partial = tmp_path / "checkpoint-5"
    partial.mkdir()
    assert run_cli("train", path, "--resume", partial) == 2
    assert (
        f"error: --resume: {partial} is not a complete lora-tune checkpoint"
        in capsys.readouterr().err
    )
    assert not (tmp_path / "run").exists()


def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(
    tiny, tmp_path, capsys
):
    out = tmp_path / "run"
    path = write_recipe(
        tmp_path / "r.yaml",
        tiny,
        out,
        training={"learning_rate": 1e30, "max_steps": 30, "save_steps": 1, "logging_steps": 1},
    )
    assert run_cli("train", path) == 2
    err = capsys.readouterr().err
    assert "error: training stopped at step " in err
    assert "the loss became nan" in err or "the adapter weights are no longer finite" in err
    last = runs.latest_checkpoint(out)
    assert last is not None and f"Last good checkpoint: {last}" in err.replace("\n", "")
    stopped_at = int(err.split("training stopped at step ")[1].split(":")[0])
    assert runs.checkpoint_step(last) < stopped_at
    assert not [p for p in out.glob("checkpoint-*") if runs.checkpoint_step(p) >= stopped_at]
    weights = load_file(last / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert not (out / "adapter").exists() and not (out / "metrics.json").exists()


@pytest.mark.parametrize(
    "fault, symptom",
    [
        ("empty", "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight is empty [0]"),
        (
            "rank",
            "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight has rank 7, adapter_config.json says 8",
        ),
    ],
)
def test_an_unusable_adapter_is_never_written(fault, symptom, tiny, tmp_path, capsys, monkeypatch):
    """What DeepSpeed ZeRO-3 does without gathering (empty tensors), or a rank that disagrees with
    the config, stops the save: no adapter/ appears and the one from an earlier run is kept."""
    import peft.peft_model

    real = peft.peft_model.get_peft_model_state_dict

    def broken(*args, **kwargs):
        state = real(*args, **kwargs)
        return {
            k: (v.new_empty(0) if fault == "empty" else v[:-1]) if "lora_A" in k else v
            for k, v in state.items()
        }

    out = tmp_path / "run"
    path = write_recipe(tmp_path / "r.yaml", tiny, out, training={"max_steps": 4})
    assert run_cli("train", path) == 0
    earlier = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    monkeypatch.setattr(peft.peft_model, "get_peft_model_state_dict", broken)
    assert (
        run_cli("train", path, "--set", "training.max_steps=6") == 2
    )  # the same run, trained longer
    err = " ".join(capsys.readouterr().err.split())
    assert (
        f"error: the adapter was not saved: 14 of its tensors are unusable, e.g. {symptom}; it would load"
        in err
    )
    assert "zero3_save_16bit_model: true" in err
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == earlier
    assert not (out / "adapter.partial").exists()


# --- a corpus of bad recipes -------------------------------------------------------------------


def _set(section, key, value):
    def mutate(recipe, case):
        recipe.setdefault(section, {})[key] = value(case) if callable(value) else value

    return mutate


def _drop(section, key=None):
    def mutate(recipe, case):
        if key is None:
            del recipe[section]
        else:
            del recipe[section][key]

    return mutate


def _file(name, text):
    def make(case):
        (case / name).write_text(text)
        return str(case / name)

    return make


BAD_RECIPES = {
    "yaml syntax": ("model: {id: [unclosed\n", "the recipe is not valid YAML"),
    "tab indent": ("model:\n\tid: x\n", "found character '\\t' that cannot start any token"),
    "not a mapping": ("- model\n- lora\n", "a recipe is a mapping with sections"),
    "empty file": ("", "model: required section missing."),
    "misspelt section": (
        _set("trainig", "output_dir", "x"),
        "trainig: unknown section. Did you mean 'training'?",
    ),
    "misspelt model key": (
        _set("model", "dtyp", "float32"),
        "model.dtyp: unknown key. Did you mean 'dtype'?",
    ),
    "misspelt lora key": (
        _set("lora", "lora_alpa", 16),
        "lora.lora_alpa: unknown key. Did you mean 'lora_alpha'?",
    ),
    "misspelt data key": (
        _set("data", "text_feild", "text"),
        "data.text_feild: unknown key. Did you mean 'text_field'?",
    ),
    "misspelt training key": (
        _set("training", "learnig_rate", 1e-4),
        "training.learnig_rate: unknown key. Did you mean 'learning_rate'?",
    ),
    "rank as text": (_set("lora", "r", "eight"), "lora.r: expected an integer, got 'eight'."),
    "epochs as text": (
        _set("training", "num_train_epochs", "three"),
        "training.num_train_epochs: expected a number",
    ),
    "zero rank": (_set("lora", "r", 0), "lora.r: the rank must be a positive integer, got 0."),
    "negative rank": (
        _set("lora", "r", -4),
        "lora.r: the rank must be a positive integer, got -4.",
    ),
    "negative alpha": (
        _set("lora", "lora_alpha", -16),
        "lora.lora_alpha: must be positive, got -16.",
    ),
    "dropout of one": (
        _set("lora", "lora_dropout", 1.0),
        "lora.lora_dropout: must be in [0, 1), got 1.0.",
    ),
    "negative dropout": (
        _set("lora", "lora_dropout", -0.1),
        "lora.lora_dropout: must be in [0, 1), got -0.1.",
    ),
    "absent target modules": (
        _set("lora", "target_modules", ["query", "value"]),
        "lora.target_modules: query, value not found in",
    ),
    "regex matching nothing": (
        _set("lora", "target_modules", ".*attention.*"),
        "lora.target_modules: the pattern '.*attention.*' matches no layer of",
    ),
    "missing model directory": (
        _set("model", "id", lambda case: str(case / "no-such-model")),
        "model.id: no model directory at",
    ),
    "bad dtype": (
        _set("model", "dtype", "float64"),
        "model.dtype: Input should be 'auto', 'float32'",
    ),
    "missing data file": (
        _set("data", "train", lambda case: str(case / "nope.jsonl")),
        "data.train: file not found:",
    ),
    "unsupported data file": (
        _set("data", "train", _file("rows.xlsx", "x")),
        "data.train: cannot read '.xlsx' files",
    ),
    "absent text field": (
        _set("data", "text_field", "quote"),
        "data.text_field: column 'quote' not found in data.train",
    ),
    "empty data file": (_set("data", "train", _file("empty.jsonl", "")), "data.train: cannot load"),
    "only empty rows": (
        _set("data", "train", _file("blank.jsonl", '{"text": ""}\n{"text": "  "}\n')),
        "data.train: no usable rows in",
    ),
    "unknown format": (
        _set("data", "format", "sharegpt"),
        "data.format: Input should be 'auto', 'text'",
    ),
    "messages without template": (
        _set("data", "format", "messages"),
        "data.chat_template: the tokenizer of",
    ),
    "eval and eval_fraction": (
        _set("data", "eval_fraction", 0.1),
        "set either data.eval or data.eval_fraction",
    ),
    "eval_fraction above one": (
        _set("data", "eval_fraction", 1.5),
        "data.eval_fraction: Input should be less than 1",
    ),
    "max_length too small": (
        _set("data", "max_length", 4),
        "data.max_length: Input should be greater than or equal to 8",
    ),
    "bf16 and fp16": (
        lambda r, c: r["training"].update(bf16=True, fp16=True),
        "At most one of fp16 and bf16 can be True",
    ),
    "max_length in training": (
        _set("training", "max_length", 128),
        "training.max_length: not set here; set data.max_length",
    ),
    "packing in training": (
        _set("training", "packing", True),
        "training.packing: not set here; set data.packing",
    ),
    "token in recipe": (
        _set("training", "hub_token", "hf_abc"),
        "training.hub_token: not set here; never put a token",
    ),
    "bare no": (
        _set("training", "save_strategy", False),
        "YAML reads a bare no/yes/off/on as false/true",
    ),
    "bad scheduler": (
        _set("training", "lr_scheduler_type", "cosin"),
        "training.lr_scheduler_type: cosin is not a valid",
    ),
    "missing output_dir": (
        _drop("training", "output_dir"),
        "training.output_dir: required key missing.",
    ),
    "missing model section": (_drop("model"), "model: required section missing."),
    "output_dir is a file": (
        _set("training", "output_dir", _file("taken", "x")),
        "training.output_dir: ",
    ),
    "output_dir under a file": (
        _set("training", "output_dir", lambda case: _file("blocker", "x")(case) + "/run"),
        "training.output_dir: cannot write",
    ),
    "eval strategy without eval data": (
        lambda r, c: (r["data"].pop("eval"), r["training"].update(eval_strategy="steps")),
        "training.eval_strategy: steps evaluation needs eval data",
    ),
    "packing on OPT": (
        lambda r, c: (
            r["model"].update(id=r["model"]["id"].replace("llama", "opt")),
            r["data"].update(packing=True),
        ),
        "data.packing: ",
    ),
}


# How each message says to fix the mistake (None: the message names the mistake only, see
# test_a_missing_section_says_how_to_add_it).
FIXES = {
    "yaml syntax": "indent with spaces (never tabs) and quote values containing ':' or '#'",
    "tab indent": "indent with spaces (never tabs) and quote values containing ':' or '#'",
    "not a mapping": "start from a recipe in recipes/: top-level keys model:, lora:, data: and training:",
    "empty file": "Add the model to tune, e.g. model: {id: facebook/opt-350m}.",
    "misspelt section": "Did you mean 'training'? Valid sections: model, lora, data, training.",
    "misspelt model key": "Did you mean 'dtype'?",
    "misspelt lora key": "Did you mean 'lora_alpha'? lora accepts the fields of peft.LoraConfig.",
    "misspelt data key": "Did you mean 'text_field'?",
    "misspelt training key": "Did you mean 'learning_rate'? training accepts the fields of trl.SFTConfig.",
    "rank as text": "expected an integer, got 'eight'.",
    "epochs as text": "expected a number, got 'three'.",
    "zero rank": "Typical values: 8, 16, 64.",
    "negative rank": "Typical values: 8, 16, 64.",
    "negative alpha": "A common choice is 2 * r.",
    "dropout of one": "Typical values: 0 to 0.1.",
    "negative dropout": "Typical values: 0 to 0.1.",
    "absent target modules": "its linear layers: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj "
    "- or use target_modules: all-linear",
    "regex matching nothing": "its linear layers: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj "
    "- or use target_modules: all-linear",
    "missing model directory": "give a local directory written by save_pretrained, or a hub id such as "
    "facebook/opt-350m",
    "bad dtype": "Input should be 'auto', 'float32', 'bfloat16' or 'float16'; got 'float64'.",
    "missing data file": "give an existing .jsonl/.json/.csv/.parquet/.txt file or folder, or a hub dataset name",
    "unsupported data file": "use one of .jsonl, .json, .csv, .parquet, .txt",
    "absent text field": "its columns: text - set data.text_field to one of its columns",
    "empty data file": "add rows to the file, or remove it from the data",
    "only empty rows": "check the data, the field names and data.max_length",
    "unknown format": "Input should be 'auto', 'text', 'prompt_completion', 'messages', 'alpaca', 'preference', 'unpaired' or 'prompt_only'; got 'sharegpt'.",
    "messages without template": "set data.chat_template to the Jinja template the model will be served with",
    "eval and eval_fraction": "set either data.eval or data.eval_fraction, not both",
    "eval_fraction above one": "Input should be less than 1; got 1.5.",
    "max_length too small": "Input should be greater than or equal to 8; got 4.",
    "bf16 and fp16": "At most one of fp16 and bf16 can be True",
    "max_length in training": "set data.max_length instead.",
    "packing in training": "set data.packing instead.",
    "token in recipe": "set the HF_TOKEN environment variable instead.",
    "bare no": 'quote it, e.g. "no".',
    "bad scheduler": "please select one of ['linear', 'cosine',",
    "missing output_dir": "Where the run is written, e.g. runs/my-run.",
    "missing model section": "Add the model to tune, e.g. model: {id: facebook/opt-350m}.",
    "output_dir is a file": "choose a directory path",
    "output_dir under a file": "choose a directory on a writable disk with free space, or fix its permissions",
    "eval strategy without eval data": "set data.eval or data.eval_fraction, or remove training.eval_strategy",
    "packing on OPT": "set data.packing: false",
}


@pytest.mark.parametrize("name", list(BAD_RECIPES))
def test_bad_recipe(name, tiny, tmp_path, capsys):
    mutation, expected = BAD_RECIPES[name]
    case = tmp_path / "case"
    case.mkdir()
    path = case / "recipe.yaml"
    if isinstance(mutation, str):
        path.write_text(mutation)
    else:
        write_recipe(path, tiny, case / "run")
        recipe = yaml.safe_load(path.read_text())
        mutation(recipe, case)
        path.write_text(yaml.safe_dump(recipe))
    before = files_under(case)
    assert run_cli("train", path) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err.replace("\n", " ").replace("  - ", ""), err
    assert "Traceback" not in err
    # Every message says how to fix it: a suggestion line, a did-you-mean, or what is expected.
    assert (
        "\n  - " in err
        or "Did you mean" in err
        or "expected" in err
        or "Input should" in err
        or "set " in err
    )
    if (
        FIXES[name] is not None
    ):  # this case's own advice, not any message that happens to say "set "
        assert " ".join(FIXES[name].split()) in " ".join(err.split()), err
    assert files_under(case) == before  # nothing created


def test_every_bad_recipe_has_its_fix_listed():
    assert FIXES.keys() == BAD_RECIPES.keys()
    assert [name for name, fix in FIXES.items() if fix is None] == []


def test_a_missing_section_says_how_to_add_it(tiny, tmp_path, capsys):
    path = write_recipe(tmp_path / "r.yaml", tiny, tmp_path / "run")
    recipe = yaml.safe_load(path.read_text())
    del recipe["model"]
    path.write_text(yaml.safe_dump(recipe))
    assert run_cli("train", path) == 2
    err = " ".join(capsys.readouterr().err.split())
    # Like training.output_dir's "required key missing. Where the run is written, e.g. runs/my-run.":
    # the line goes on to say what the section holds.
    assert re.search(r"model: required section missing\. \S", err), err


def test_the_corpus_is_large():
    assert len(BAD_RECIPES) >= 30


# --- faults after training ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("trained")
    out = base / "run"
    assert (
        run_cli("train", write_recipe(base / "r.yaml", tiny, out, training={"max_steps": 20})) == 0
    )
    return out


def copy_adapter(run: Path, to: Path) -> Path:
    shutil.copytree(run / "adapter", to)
    return to


def test_corrupt_adapter_file(trained, tiny, tmp_path, capsys):
    adapter = copy_adapter(trained, tmp_path / "adapter")
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    for command in (
        ["merge", adapter, "-o", tmp_path / "merged"],
        ["eval", adapter, "--data", tiny / "data" / "text_eval.jsonl"],
    ):
        assert run_cli(*command) == 2
        err = capsys.readouterr().err
        assert f"error: {adapter}: cannot read the adapter" in err and "Traceback" not in err
    assert not (tmp_path / "merged").exists()


def test_adapter_for_another_base(trained, tiny, tmp_path, capsys):
    config = json.loads((tiny / "tiny-llama" / "config.json").read_text())
    config.update(hidden_size=32, intermediate_size=64)
    (tmp_path / "config.json").write_text(json.dumps(config))
    other = builder.build_model(
        "llama", tmp_path / "narrow-llama", config_file=tmp_path / "config.json"
    )
    adapter = copy_adapter(trained, tmp_path / "adapter")
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = str(other)
    (adapter / "adapter_config.json").write_text(json.dumps(adapter_config))
    assert run_cli("merge", adapter, "-o", tmp_path / "merged") == 2
    err = capsys.readouterr().err
    assert (
        f"error: {adapter}: the adapter does not fit its base {other}: " in err
        and "size mismatch" in err
    )


def test_corrupt_base_model_file(trained, tiny, tmp_path, capsys):
    base = Path(shutil.copytree(tiny / "tiny-llama", tmp_path / "base"))
    weights = base / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    adapter = copy_adapter(trained, tmp_path / "adapter")
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = str(base)
    (adapter / "adapter_config.json").write_text(json.dumps(adapter_config))
    assert run_cli("merge", adapter, "-o", tmp_path / "merged") == 2
    assert f"error: model.id: cannot load the weights of {base}" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["stream", "memory"])
def test_merge_crash_with_force_keeps_the_previous_output(trained, tmp_path, monkeypatch, method):
    from transformers import PreTrainedModel

    from lora_tune import stream_merge

    out = tmp_path / "merged"
    merge.run(trained, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing weights")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", crash)
    monkeypatch.setattr(stream_merge, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        merge.run(trained, out, force=True, method=method)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


# --- security ----------------------------------------------------------------------------------


def test_pickle_weights_are_refused_unless_allowed(tiny, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny / "tiny-llama", pickled)
    (pickled / "model.safetensors").unlink()
    model = AutoModelForCausalLM.from_pretrained(tiny / "tiny-llama")
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    out = tmp_path / "run"
    path = write_recipe(
        tmp_path / "r.yaml", tiny, out, model={"id": str(pickled)}, training={"max_steps": 2}
    )
    assert run_cli("train", path) == 2
    assert f"error: model.id: {pickled} has no .safetensors weights" in capsys.readouterr().err
    assert not out.exists()
    assert run_cli("train", path, "--set", "model.allow_pickle=true") == 0
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert not list((out / "adapter").glob("*.bin"))  # the adapter itself is pickle-free


def test_remote_code_is_announced(tiny, tmp_path, capsys):
    path = write_recipe(
        tmp_path / "r.yaml", tiny, tmp_path / "run", model={"trust_remote_code": True}
    )
    assert run_cli("train", path, "--dry-run") == 0
    assert "ALLOWED: the model repository's own Python code runs" in capsys.readouterr().out
    path = write_recipe(tmp_path / "r.yaml", tiny, tmp_path / "run")
    assert run_cli("train", path, "--dry-run") == 0
    assert "remote code" not in capsys.readouterr().out


def test_train_writes_only_inside_the_reported_output_dir(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    path = write_recipe(
        tmp_path / "r.yaml", tiny, Path("runs/../elsewhere/run"), training={"max_steps": 5}
    )
    before = files_under(tmp_path)
    assert run_cli("train", path) == 0
    reported = (tmp_path / "elsewhere" / "run").resolve()
    assert f"Adapter: {reported / 'adapter'}" in capsys.readouterr().out
    assert all(
        reported in p.resolve().parents
        for p in files_under(tmp_path) - before
        if p != reported and p != reported.parent
    )


def test_pickle_adapters_are_refused_unless_allowed(trained, tmp_path, capsys):
    adapter = copy_adapter(trained, tmp_path / "adapter")
    torch.save(load_file(adapter / "adapter_model.safetensors"), adapter / "adapter_model.bin")
    (adapter / "adapter_model.safetensors").unlink()
    assert run_cli("merge", adapter, "-o", tmp_path / "merged") == 2
    assert f"error: {adapter}: no adapter_model.safetensors" in capsys.readouterr().err
    assert run_cli("merge", adapter, "-o", tmp_path / "merged", "--allow-pickle") == 0
    assert json.loads((tmp_path / "merged" / "merge_report.json").read_text())["ok"]
