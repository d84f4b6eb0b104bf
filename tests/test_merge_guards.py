"""Merge never destroys its inputs, and refusals name the real cause: the output over an input,
an adapter of another architecture, remote code, a folder that is no model; and what merge leaves
on disk (no new empty parents after a failure, the user's file modes)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import run_cli, write_recipe
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
OVER_INPUTS = "a merge never replaces its own inputs, even with --force"


def snapshot(root: Path) -> dict[str, tuple[int, bytes | None]]:
    """Every path under root with its mode and (for files) its bytes."""
    return {
        str(p.relative_to(root)): (p.lstat().st_mode, p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    }


def refused(capsys, code: int, *fragments: str) -> str:
    """Assert a user error: exit code 2, the message fragments, no traceback."""
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err
    return err


@pytest.fixture(scope="module")
def workspace(tiny, tmp_path_factory) -> Path:
    """A folder holding its own base model (a copy of tiny-llama) and a short run trained on it."""
    root = tmp_path_factory.mktemp("guards")
    shutil.copytree(tiny / "tiny-llama", root / "models" / "base")
    recipe = write_recipe(
        root / "recipe.yaml",
        tiny,
        root / "runs" / "run",
        model={"id": str(root / "models" / "base")},
        training={"max_steps": 3},
    )
    assert run_cli("train", recipe) == 0
    return root


@pytest.mark.parametrize("force", [False, True])
@pytest.mark.parametrize(
    "output, label",
    [
        ("runs/run", "is the run directory"),
        ("runs/run/adapter", "is the adapter"),
        ("runs/run/adapter/../../run", "is the run directory"),
        ("models/base", "is the base model"),
        ("runs", "contains the run directory"),
        ("models", "contains the base model"),
        (".", "contains the run directory"),
        ("link-to-run", "is the run directory"),
    ],
)
def test_the_output_is_never_an_input_or_a_folder_holding_one(
    output, label, force, workspace, capsys
):
    link = workspace / "link-to-run"
    if not link.exists():
        link.symlink_to(workspace / "runs" / "run")
    before = snapshot(workspace)
    flags = ["--force"] if force else []
    for source in (workspace / "runs" / "run", workspace / "runs" / "run" / "adapter"):
        code = run_cli("merge", source, "-o", workspace / output, *flags)
        refused(
            capsys, code, f"--output {workspace / output} {label} ", OVER_INPUTS, "-o merged/run"
        )
    assert snapshot(workspace) == before


def test_a_bare_adapter_is_never_its_own_output(workspace, tmp_path, capsys):
    adapter = Path(shutil.copytree(workspace / "runs" / "run" / "adapter", tmp_path / "my-adapter"))
    before = snapshot(tmp_path)
    for output in (adapter, tmp_path):
        refused(
            capsys,
            run_cli("merge", adapter, "-o", output, "--force"),
            f"--output {output} ",
            OVER_INPUTS,
            "-o merged/my-adapter",
        )
    assert snapshot(tmp_path) == before


def point_at(adapter: Path, base: Path) -> None:
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(base)
    (adapter / "adapter_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("kind", ["run", "bare adapter"])
def test_an_adapter_of_another_architecture_names_both(kind, workspace, tiny, tmp_path, capsys):
    """A Llama adapter pointed at an OPT base: both model types are named, not 'corrupt'."""
    if kind == "run":
        source = Path(shutil.copytree(workspace / "runs" / "run", tmp_path / "run"))
        adapter = source / "adapter"
    else:
        source = adapter = Path(
            shutil.copytree(workspace / "runs" / "run" / "adapter", tmp_path / "adapter")
        )
    point_at(adapter, tiny / "tiny-opt")
    before = snapshot(tmp_path)
    expected = (
        (
            f"this adapter was trained on llama (LlamaForCausalLM, {workspace / 'models' / 'base'}), "
            f"the base is opt (OPTForCausalLM, {tiny / 'tiny-opt'}): 14 of the 14 layers it changes are not in "
            "the base"
        ),
        f"set base_model_name_or_path in {adapter / 'adapter_config.json'}",
    )
    for method in ("auto", "memory"):
        code = run_cli("merge", source, "-o", tmp_path / "new" / "merged", "--method", method)
        err = refused(capsys, code, *expected)
        assert "corrupt" not in err
    code = run_cli("eval", source, "--data", tiny / "data" / "text_eval.jsonl")
    refused(capsys, code, *expected)
    assert snapshot(tmp_path) == before


def test_a_failed_merge_removes_the_parents_it_created(workspace, tmp_path, capsys):
    adapter = Path(shutil.copytree(workspace / "runs" / "run" / "adapter", tmp_path / "adapter"))
    weights = load_file(adapter / "adapter_model.safetensors")
    name = next(k for k in weights if "lora_B" in k)
    weights[name][0, 0] = float("inf")
    save_file(weights, adapter / "adapter_model.safetensors")
    (tmp_path / "existing").mkdir()
    before = snapshot(tmp_path)
    code = run_cli(
        "merge", adapter, "-o", tmp_path / "existing" / "new" / "deeper" / "merged", "--no-verify"
    )
    refused(capsys, code, "merge refused: the merged tensor", "has NaN or infinite values")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)]
)
@pytest.mark.parametrize("method", ["stream", "memory"])
def test_merged_files_get_the_users_modes(method, umask, file_mode, dir_mode, workspace, tmp_path):
    previous = os.umask(umask)
    try:
        assert (
            run_cli(
                "merge", workspace / "runs" / "run", "-o", tmp_path / "merged", "--method", method
            )
            == 0
        )
    finally:
        os.umask(previous)
    paths = [tmp_path / "merged", *(tmp_path / "merged").rglob("*")]
    assert any(p.name.endswith(".safetensors") for p in paths)
    modes = {p.name: p.stat().st_mode & 0o777 for p in paths}
    assert modes == {p.name: dir_mode if p.is_dir() else file_mode for p in paths}


@pytest.fixture
def remote_code_model(tiny, tmp_path) -> tuple[Path, Path]:
    """(a model folder whose config.json needs its own Python code, the file that code writes when it runs)."""
    model = Path(shutil.copytree(tiny / "tiny-llama", tmp_path / "custom"))
    marker = tmp_path / "the-repository-code-ran"
    config = json.loads((model / "config.json").read_text())
    config |= {
        "model_type": "custom-llama",
        "auto_map": {
            "AutoConfig": "configuration_custom.CustomConfig",
            "AutoModelForCausalLM": "modeling_custom.CustomModel",
        },
    }
    (model / "config.json").write_text(json.dumps(config))
    (model / "configuration_custom.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlamaConfig\n\n\nclass CustomConfig(LlamaConfig):\n    model_type = 'custom-llama'\n"
    )
    (model / "modeling_custom.py").write_text(
        "from transformers import LlamaForCausalLM\n\nfrom .configuration_custom import CustomConfig\n\n\n"
        "class CustomModel(LlamaForCausalLM):\n    config_class = CustomConfig\n"
    )
    return model, marker


def test_remote_code_is_refused_with_the_setting_that_allows_it(
    remote_code_model, tiny, tmp_path, capsys
):
    model, marker = remote_code_model
    before = snapshot(tmp_path)
    refused(
        capsys,
        run_cli("modules", model),
        f"model.id: {model} needs its own Python code to load",
        "set model.trust_remote_code: true",
        "--trust-remote-code",
        "it runs the repository's own Python code on this machine",
    )
    recipe = write_recipe(tmp_path / "r.yaml", tiny, tmp_path / "run", model={"id": str(model)})
    before = snapshot(tmp_path)
    for flags in ([], ["--dry-run"]):
        refused(capsys, run_cli("train", recipe, *flags), "set model.trust_remote_code: true")
    assert snapshot(tmp_path) == before and not marker.exists()


def test_a_dry_run_never_runs_remote_code(remote_code_model, tiny, tmp_path, capsys):
    model, marker = remote_code_model
    recipe = write_recipe(
        tmp_path / "r.yaml",
        tiny,
        tmp_path / "run",
        model={"id": str(model), "trust_remote_code": True},
    )
    before = snapshot(tmp_path)
    refused(
        capsys,
        run_cli("train", recipe, "--dry-run"),
        f"model.id: {model} needs its own Python code (auto_map in config.json), and --dry-run runs no "
        "repository code, so its layers and tokenizer were not checked",
    )
    assert snapshot(tmp_path) == before and not marker.exists()
    # The same model with the code allowed and run (in a child process, whose module cache is its own):
    # the marker shows the code would have run.
    env = os.environ | {"HF_MODULES_CACHE": str(tmp_path / "modules")}
    done = subprocess.run(
        [sys.executable, "-m", "lora_tune", "modules", str(model), "--trust-remote-code"],
        cwd=ROOT,
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "custom-llama" in done.stdout and marker.exists()


@pytest.mark.parametrize("contents", [[], ["notes.txt"]])
def test_a_folder_that_is_no_model_is_named_so(contents, tiny, tmp_path, capsys):
    folder = tmp_path / "folder"
    folder.mkdir()
    for name in contents:
        (folder / name).write_text("not a model\n")
    before = snapshot(tmp_path)
    expected = f"error: {folder}: not a run, adapter or model directory (no config.json, adapter_config.json"
    for command in (
        ["eval", folder, "--data", tiny / "data" / "text_eval.jsonl"],
        ["modules", folder],
        ["serve", folder],
    ):
        err = refused(capsys, run_cli(*command), expected)
        assert "model_type" not in err
    refused(
        capsys,
        run_cli("merge", folder, "-o", tmp_path / "merged"),
        f"error: {folder}: not a run directory or PEFT adapter (no adapter_config.json)",
    )
    assert snapshot(tmp_path) == before


def test_commands_that_do_not_quantize_never_import_bitsandbytes(workspace, tmp_path):
    """bitsandbytes (installed here for the QLoRA tests) loads kernels and prints a line on import."""
    import importlib.metadata

    try:
        importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("bitsandbytes is not installed")
    recipe = workspace / "recipe.yaml"
    script = f"""
import sys
from lora_tune.cli import main

def command(label, *args):
    try:
        main(list(args))
    except SystemExit as exc:
        assert not exc.code, (args, exc.code)
    print(label, "bitsandbytes" in sys.modules and sys.modules["bitsandbytes"] is not None, flush=True)

command("help", "--help")
command("modules", "modules", {str(workspace / "models" / "base")!r})
command("dry-run", "train", {str(recipe)!r}, "--dry-run", "--set", "training.output_dir={tmp_path / "run"}")
command("merge", "merge", {str(workspace / "runs" / "run")!r}, "-o", {str(tmp_path / "merged")!r})
print("QLoRA from here", file=sys.stderr, flush=True)
command("qlora", "train", {str(recipe)!r}, "--dry-run", "--set", "training.output_dir={tmp_path / "qlora"}",
        "--set", "model.quantization.bits=4")
"""
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    imported = dict(
        line.split() for line in done.stdout.splitlines() if line.endswith((" True", " False"))
    )
    assert imported == {
        "help": "False",
        "modules": "False",
        "dry-run": "False",
        "merge": "False",
        "qlora": "True",
    }
    assert "gemm_4bit" not in done.stderr.split("QLoRA from here")[0]
