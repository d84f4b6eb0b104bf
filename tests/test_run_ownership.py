"""A run directory has one owner and a clear life: finished runs are left alone, a changed recipe
is refused, --resume never moves the earlier run aside, one process at a time, Ctrl-C says how to go on."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import run_cli, write_recipe

from lora_tune import ownership, runs
from lora_tune.errors import UserError


def snapshot(path: Path) -> dict[str, tuple[int, int]]:
    """Every file under `path` with its size and modification time."""
    return {
        str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in path.rglob("*")
        if p.is_file()
    }


@pytest.fixture
def finished(tiny, tmp_path_factory):
    """A finished 8-step run (checkpoint at step 4 and 8) and its recipe."""
    base = tmp_path_factory.mktemp("owned")
    out = base / "run"
    path = write_recipe(
        base / "r.yaml", tiny, out, training={"max_steps": 8, "save_steps": 4, "logging_steps": 4}
    )
    assert run_cli("train", path) == 0
    return path, out


def test_rerunning_a_finished_run_does_nothing_and_says_so(finished, capsys):
    path, out = finished
    before = snapshot(out)
    capsys.readouterr()
    assert run_cli("train", path) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert f"{out} is complete: 8 steps, final train loss" in said
    assert "Nothing to do." in said and "--resume never" in said and "training.max_steps" in said
    assert snapshot(out) == before  # no extra step, metrics not rewritten
    assert json.loads((out / "metrics.json").read_text())["steps"] == 8
    # Cadence keys (how often it logs and saves) do not make it another run.
    assert run_cli("train", path, "--set", "training.logging_steps=1") == 0
    assert snapshot(out) == before


def test_a_changed_recipe_is_refused_before_anything_is_written(finished, capsys):
    path, out = finished
    before = snapshot(out)
    capsys.readouterr()
    assert run_cli("train", path, "--set", "lora.r=4", "--set", "training.learning_rate=1e-4") == 2
    captured = capsys.readouterr()
    err = " ".join(captured.err.split())
    assert (
        f"error: training.output_dir: {out} holds a run of another recipe; 2 key(s) differ from its recipe.yaml:"
        in err
    )
    assert "- lora.r: 8 -> 4" in err and "- training.learning_rate: 0.003 -> 0.0001" in err
    assert "choose another training.output_dir" in err and "--resume never" in err
    assert "Traceback" not in captured.err + captured.out
    assert snapshot(out) == before  # recipe.yaml included: not overwritten
    # The dry run answers the same, before any weight loads.
    assert run_cli("train", path, "--set", "lora.r=4", "--dry-run") == 2
    assert "- lora.r: 8 -> 4" in capsys.readouterr().err
    assert snapshot(out) == before


def test_a_longer_run_continues_from_the_last_checkpoint(finished, capsys):
    path, out = finished
    capsys.readouterr()
    assert run_cli("train", path, "--set", "training.max_steps=12") == 0
    assert f"Resuming from {out / 'checkpoint-8'}" in capsys.readouterr().out
    assert json.loads((out / "metrics.json").read_text())["steps"] == 12
    assert ownership.saved_recipe(out)["training"]["max_steps"] == 12


def test_a_shorter_run_than_the_one_trained_is_refused(finished, capsys):
    path, out = finished
    before = snapshot(out)
    for setting, change in (
        ("training.max_steps=6", "training.max_steps: 8 -> 6"),
        ("training.max_steps=-1", "training.max_steps: 8 -> -1"),
    ):
        assert run_cli("train", path, "--set", setting) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert f"- {change} (the run has trained 8 steps: nothing more to train)" in err
        assert snapshot(out) == before
    # Trained longer once, the run is no longer the original recipe's.
    assert run_cli("train", path, "--set", "training.max_steps=10") == 0
    capsys.readouterr()
    assert run_cli("train", path) == 2
    assert "- training.max_steps: 10 -> 8 (the run has trained 10 steps" in " ".join(
        capsys.readouterr().err.split()
    )


def test_the_run_directory_may_be_spelled_another_way(finished, capsys):
    path, out = finished
    before = snapshot(out)
    capsys.readouterr()
    assert (
        run_cli(
            "train", path, "--set", f"training.output_dir={out.parent}/../{out.parent.name}/run/"
        )
        == 0
    )
    assert "is complete: 8 steps" in capsys.readouterr().out
    assert snapshot(out) == before


def test_an_unfinished_run_resumes_with_a_new_cadence_and_saves_it(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    path = write_recipe(tmp_path / "r.yaml", tiny, out, training={"max_steps": 8, "save_steps": 4})
    assert run_cli("train", path, "--set", "training.max_steps=4") == 0  # the first half of the run
    (out / "adapter").rename(
        tmp_path / "adapter-of-the-first-half"
    )  # as if stopped after checkpoint-4
    capsys.readouterr()
    assert run_cli("train", path, "--set", "training.logging_steps=2") == 0
    assert f"Resuming from {out / 'checkpoint-4'}" in capsys.readouterr().out
    assert ownership.saved_recipe(out)["training"]["logging_steps"] == 2
    assert json.loads((out / "metrics.json").read_text())["steps"] == 8


@pytest.mark.parametrize("metrics", ["null", '{"steps": 8, "final_loss": null}', "{truncated"])
def test_a_finished_run_with_odd_metrics_is_still_complete(finished, capsys, metrics):
    path, out = finished
    (out / "metrics.json").write_text(metrics)
    capsys.readouterr()
    assert run_cli("train", path) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert f"{out} is complete: " in said and "final train loss ?" in said


def test_a_failed_move_aside_puts_everything_back(finished, capsys, monkeypatch):
    path, out = finished
    before = snapshot(out)
    real = Path.rename
    moved, failed = [], []

    def rename(self, target):  # the third entry cannot move; moving back works
        if len(moved) == 2 and not failed:
            failed.append(self)
            raise OSError(18, "Invalid cross-device link")
        moved.append(self)
        return real(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    assert run_cli("train", path, "--resume", "never") == 2
    err = " ".join(capsys.readouterr().err.split())
    assert (
        f"error: --resume never: cannot move the earlier run in {out} to {out.parent}/run.earlier-"
        in err
    )
    assert "Invalid cross-device link" in err and "move or delete the earlier run yourself" in err
    monkeypatch.undo()
    after = snapshot(out)
    assert after.pop(ownership.LOCK) and before.pop(ownership.LOCK)  # this attempt held the lock
    assert after == before and len(moved) == 4 and len(failed) == 1  # 2 moved, 2 moved back
    assert not list(out.parent.glob("run.earlier-*"))


def test_resume_never_moves_the_earlier_run_aside(finished, capsys):
    path, out = finished
    earlier = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    capsys.readouterr()
    assert (
        run_cli(
            "train", path, "--set", "lora.r=4", "--set", "training.max_steps=4", "--resume", "never"
        )
        == 0
    )
    said = " ".join(capsys.readouterr().out.split())
    aside = [p for p in out.parent.iterdir() if p.name.startswith("run.earlier-")]
    assert len(aside) == 1 and f"Starting over: the earlier run moved to {aside[0]}" in said
    assert "Resuming" not in said
    # The earlier run is whole in its new place; the new one holds only its own checkpoints.
    assert (aside[0] / "adapter" / "adapter_model.safetensors").read_bytes() == earlier
    assert sorted(p.name for p in aside[0].glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]
    assert ownership.saved_recipe(out)["lora"]["r"] == 4
    assert json.loads((out / "metrics.json").read_text())["steps"] == 4
    # Rerun with the new recipe: complete, nothing resumed from the earlier run.
    assert run_cli("train", path, "--set", "lora.r=4", "--set", "training.max_steps=4") == 0
    assert "is complete: 4 steps" in capsys.readouterr().out


def test_a_folder_that_is_not_a_run_is_never_written_into(tiny, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my own file")
    path = write_recipe(tmp_path / "r.yaml", tiny, out, training={"max_steps": 2})
    for extra in ([], ["--resume", "never"]):
        assert run_cli("train", path, *extra) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert (
            f"error: training.output_dir: {out} holds files but no lora-tune run (recipe.yaml is missing)"
            in err
        )
        assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("mine")] == ["mine"]


def test_an_unreadable_saved_recipe_is_a_clear_error(finished, capsys):
    path, out = finished
    (out / "recipe.yaml").write_text("model: [unclosed")
    assert run_cli("train", path) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"error: training.output_dir: {out / 'recipe.yaml'} cannot be read (ParserError)" in err


def train_process(path: Path, cwd: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "lora_tune.cli", "train", str(path), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
    )


def wait_for(condition, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not condition() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert condition(), f"gave up waiting (exit code {process.poll()})"


@pytest.mark.slow
def test_a_second_train_on_the_same_directory_is_refused_with_the_first_ones_pid(
    tiny, tmp_path, capsys
):
    out = tmp_path / "run"
    path = write_recipe(
        tmp_path / "r.yaml", tiny, out, training={"max_steps": 100000, "save_steps": 5}
    )
    first = train_process(path, tmp_path)
    try:
        wait_for(lambda: runs.latest_checkpoint(out) is not None, first)
        assert ownership.holder(out) == f"PID {first.pid} on {os.uname().nodename}"
        before = (out / "recipe.yaml").read_bytes()
        started = time.monotonic()
        assert run_cli("train", path) == 2
        refused_in = time.monotonic() - started
        err = " ".join(capsys.readouterr().err.split())
        assert (
            f"error: training.output_dir: {out} is in use by another `lora-tune train` (PID {first.pid} on "
            in err
        )
        assert "choose another training.output_dir" in err
        assert refused_in < 5, "the second run planned (tokenized data) before it was refused"
        assert run_cli("train", path, "--resume", "never") == 2  # starting over is refused too
        assert (out / "recipe.yaml").read_bytes() == before
        assert not list(tmp_path.glob("run.earlier-*"))
    finally:
        first.kill()
        first.wait()
    # A killed run does not leave the lock stuck: the next one takes the run over.
    assert ownership.holder(out) is None
    capsys.readouterr()
    assert run_cli("train", path, "--dry-run") == 0
    assert "lora-tune plan" in capsys.readouterr().out
    assert run_cli("train", path, "--resume", "never", "--set", "training.max_steps=2") == 0
    assert "Starting over: the earlier run moved to" in capsys.readouterr().out
    assert json.loads((out / "metrics.json").read_text())["steps"] == 2


@pytest.mark.slow
def test_ctrl_c_says_where_the_last_checkpoint_is_and_how_to_resume(tiny, tmp_path):
    out = tmp_path / "run"
    path = write_recipe(
        tmp_path / "r.yaml", tiny, out, training={"max_steps": 100000, "save_steps": 5}
    )
    process = train_process(path, tmp_path)
    wait_for(lambda: runs.latest_checkpoint(out) is not None, process)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130
    assert "Traceback" not in err
    err = " ".join(err.split())
    last = runs.latest_checkpoint(out)
    assert "Interrupted at step " in err
    assert (
        f"The last complete checkpoint is {last} (step {runs.checkpoint_step(last)}): rerun `lora-tune "
        "train` with the same recipe (and without --resume never) to resume from it." in err
    )
    assert not (out / "adapter").exists() and ownership.holder(out) is None


def test_ctrl_c_before_the_first_checkpoint_says_there_is_nothing_to_resume(tmp_path):
    from lora_tune.train import interrupted

    assert interrupted(tmp_path / "run", 3) == (
        "Interrupted at step 3, before the first checkpoint was saved: "
        "nothing to resume. Rerun the same command to start again."
    )


def test_the_lock_is_held_for_the_block_and_released_after(tmp_path):
    out = tmp_path / "run"
    assert ownership.holder(out) is None
    with ownership.lock(out):
        code = (
            "import sys; from pathlib import Path; from lora_tune import ownership; "
            "print(ownership.holder(Path(sys.argv[1])))"
        )
        probe = subprocess.run(
            [sys.executable, "-c", code, str(out)], capture_output=True, text=True, check=True
        )
        assert probe.stdout.strip() == f"PID {os.getpid()} on {os.uname().nodename}"
        busy = f"is in use by another `lora-tune train` \\(PID {os.getpid()} on "
        with pytest.raises(UserError, match=busy), ownership.lock(out):
            pass
    assert ownership.holder(out) is None


def test_adapters_and_checkpoints_get_the_users_file_modes(tiny, tmp_path):
    """safetensors writes through private 0600 files; a run's outputs follow the umask instead."""
    out = tmp_path / "run"
    path = write_recipe(tmp_path / "r.yaml", tiny, out, training={"max_steps": 2, "save_steps": 2})
    previous = os.umask(0o022)
    try:
        assert run_cli("train", path) == 0
    finally:
        os.umask(previous)
    for folder in (out / "adapter", out / "checkpoint-2"):
        modes = {p.name: p.stat().st_mode & 0o777 for p in folder.rglob("*")}
        assert modes["adapter_model.safetensors"] == 0o644, modes
        assert set(modes.values()) <= {0o644, 0o755}, modes


AGREE = """
import json, os, sys
from pathlib import Path
from lora_tune import ownership
from lora_tune.errors import UserError

rank, out = os.environ["RANK"], Path(sys.argv[2])

def decide():
    (out / f"decided-on-{rank}").touch()
    if sys.argv[1] == "refuse":
        raise UserError("refused on the main process", ["the fix"])
    return ownership.Decision(ownership.State.RESUME, None)

try:
    answer = {"state": ownership.agreed(decide).state.value}
except UserError as exc:
    answer = {"error": exc.render()}
(out / f"answer-{rank}.json").write_text(json.dumps(answer))  # one file each: their output would interleave
"""


@pytest.mark.slow
@pytest.mark.parametrize("outcome", ["resume", "refuse"])
def test_only_the_main_process_decides_and_every_process_follows(tmp_path, outcome):
    from helpers import free_port

    script = tmp_path / "agree.py"
    script.write_text(AGREE)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(free_port()),
            str(script),
            outcome,
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert [p.name for p in tmp_path.glob("decided-on-*")] == ["decided-on-0"], result.stderr[
        -2000:
    ]
    answers = [json.loads((tmp_path / f"answer-{rank}.json").read_text()) for rank in (0, 1)]
    if outcome == "resume":
        assert answers == [{"state": "resume"}] * 2
    else:
        assert answers == [{"error": "refused on the main process\n  - the fix"}] * 2


@pytest.mark.slow
def test_two_processes_leave_a_finished_run_alone_and_start_over_together(tiny, tmp_path):
    out = tmp_path / "run"
    path = write_recipe(
        tmp_path / "r.yaml",
        tiny,
        out,
        training={"max_steps": 4, "per_device_train_batch_size": 4, "save_steps": 2},
    )
    command = [sys.executable, "-m", "lora_tune.cli", "train", str(path), "--num-processes", "2"]
    first = subprocess.run(
        command, capture_output=True, text=True, cwd=tmp_path, timeout=300, check=False
    )
    assert first.returncode == 0, first.stderr[-3000:]
    again = subprocess.run(
        command, capture_output=True, text=True, cwd=tmp_path, timeout=300, check=False
    )
    assert again.returncode == 0 and again.stdout.count(f"{out} is complete: 4 steps") == 1
    assert "lora-tune plan" not in again.stdout  # decided before any process was launched
    over = subprocess.run(
        [*command, "--resume", "never", "--set", "lora.r=4"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
        check=False,
    )
    assert over.returncode == 0, over.stderr[-3000:]
    assert over.stdout.count("Starting over: the earlier run moved to") == 1
    assert len(list(tmp_path.glob("run.earlier-*"))) == 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["world_size"], metrics["steps"]) == (2, 4)
    assert ownership.saved_recipe(out)["lora"]["r"] == 4
