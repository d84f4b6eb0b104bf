"""Who owns a run directory, and what a new `lora-tune train` may do with it.

A run directory belongs to one recipe and one process at a time:
- one `train` holds OUT/lora-tune.lock (an flock: the kernel releases it when the process dies,
  so a killed run never leaves it stuck); a second one is refused with the first one's PID;
- a finished run is left alone; a rerun of an unfinished one resumes it;
- a changed recipe is refused, except for the keys that continue the same run (a longer run,
  gradient clipping, how often it logs and saves);
- `--resume never` moves the earlier run aside, so its checkpoints are never resumed later.

With several processes only the main one reads and changes the run directory; the others
receive its decision (`agreed`), so that all of them train, or stop, together.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
import warnings
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import yaml

from . import runs
from .errors import UserError
from .yaml_reader import parse_yaml, shown

LOCK = "lora-tune.lock"
UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)  # filesystems without flock
# Keys a rerun may change and still continue the same run from its checkpoint: a longer run
# (with the defaults they have when unset), gradient clipping, and how often it logs and saves.
# The learning rate is not one: a resumed scheduler restores the old one, so a new value would
# be silently ignored.
LENGTH = {"training.max_steps": -1, "training.num_train_epochs": 3.0}
CADENCE = {
    "training.max_grad_norm",
    "training.logging_steps",
    "training.save_steps",
    "training.save_total_limit",
    "training.eval_steps",
    "training.report_to",
}
NOT_COMPARED = {"training.output_dir"}  # the same folder may be spelled in many ways
MISSING = object()  # a key that one of the two recipes does not set


class State(Enum):
    NEW = "new"  # nothing there yet: train from the start
    RESUME = "resume"  # the same run, not finished: continue it
    COMPLETE = "complete"  # the same run, finished: nothing to do


@dataclass
class Decision:
    """What every process of a `train` does: the run's state, the checkpoint to resume from, and
    where `--resume never` moved the earlier run."""

    state: State
    checkpoint: Path | None = None
    aside: Path | None = None


# --- the lock --------------------------------------------------------------------------------------


def holder(out: Path) -> str | None:
    """'PID 1234 on host' of the process that holds the run's lock, or None when it is free."""
    path = out / LOCK
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except OSError as exc:
        if exc.errno in UNSUPPORTED:
            return None
        if exc.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        return describe_holder(path)
    finally:
        os.close(fd)


def describe_holder(path: Path) -> str:
    pid, _, host = path.read_text().strip().partition(" ")
    return f"PID {pid} on {host}" if pid.isdigit() else "another process"


def busy(out: Path, who: str) -> UserError:
    return UserError(
        f"training.output_dir: {out} is in use by another `lora-tune train` ({who})",
        [
            (
                "wait for it to finish, stop it (a stopped run resumes when rerun), "
                "or choose another training.output_dir"
            )
        ],
    )


def check_free(out: Path) -> None:
    """Raise UserError when another process is training into `out` (read-only: takes nothing)."""
    who = holder(out)
    if who:
        raise busy(out, who)


@contextlib.contextmanager
def lock(out: Path):
    """Hold the run's lock while the block runs. Raises UserError when another process holds it."""
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise busy(out, describe_holder(out / LOCK)) from None
        except OSError as exc:  # some network filesystems refuse locks: train, but say so
            if exc.errno not in UNSUPPORTED:
                raise
            warnings.warn(
                f"{out}: this filesystem cannot lock files ({exc.strerror}); make sure no other "
                "`lora-tune train` writes to this run directory",
                stacklevel=2,
            )
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        yield
    finally:
        os.close(fd)  # releases the lock


# --- what a rerun may do ---------------------------------------------------------------------------


def flatten(data: dict, prefix: str = "") -> dict:
    """{'training': {'seed': 0}} -> {'training.seed': 0}."""
    flat = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat |= flatten(value, path + ".")
        else:
            flat[path] = value
    return flat


def differences(saved: dict, current: dict) -> dict[str, tuple]:
    """Key path -> (saved value, current value) for every compared key whose value differs."""
    before, after = flatten(saved), flatten(current)
    keys = sorted((before.keys() | after.keys()) - NOT_COMPARED)
    return {
        key: (before.get(key, MISSING), after.get(key, MISSING))
        for key in keys
        if before.get(key, MISSING) != after.get(key, MISSING)
    }


def describe_change(key: str, old, new, note: str = "") -> str:
    """'training.learning_rate: 0.003 -> 0.001', long values cut."""

    def show(value):
        return "(not set)" if value is MISSING else shown(value)

    return f"{key}: {show(old)} -> {show(new)}{note}"


def grows(key: str, old, new, trained_steps: int) -> bool:
    """Whether a new training length goes beyond the run's: only then is there more to train."""
    old = LENGTH[key] if old is MISSING else old
    new = LENGTH[key] if new is MISSING else new
    if not all(isinstance(v, (int, float)) for v in (old, new)):
        return False
    if key == "training.max_steps":  # -1 trains by epochs: compare with the steps done
        return new > max(old, trained_steps)
    return new > old


def saved_recipe(out: Path) -> dict:
    """The resolved recipe the run was started with. Raises UserError when it cannot be read."""
    path = out / runs.RECIPE
    try:
        data = parse_yaml(path.read_bytes())
    except (
        OSError,
        UnicodeDecodeError,
        yaml.YAMLError,
    ) as exc:  # the strict reader's refusals included
        raise UserError(
            f"training.output_dir: {path} cannot be read ({type(exc).__name__}), so this run's recipe "
            "is unknown",
            [
                (
                    "choose another training.output_dir, or --resume never to start over "
                    "(the earlier run is moved aside)"
                )
            ],
        ) from None
    return data if isinstance(data, dict) else {}


def trained_steps(out: Path) -> int:
    """Steps the run has trained: its last complete checkpoint's, or its metrics'."""
    last = runs.latest_checkpoint(out)
    steps = runs.checkpoint_step(last) if last else 0
    with contextlib.suppress(OSError, ValueError, AttributeError, TypeError):
        steps = max(steps, int(json.loads((out / runs.METRICS).read_text()).get("steps") or 0))
    return steps


def check_is_run(out: Path) -> None:
    """Raise UserError when `out` holds files but no lora-tune run: they are not ours to move or mix."""
    if (
        out.is_dir()
        and not (out / runs.RECIPE).is_file()
        and [p for p in out.iterdir() if p.name != LOCK]
    ):
        raise UserError(
            f"training.output_dir: {out} holds files but no lora-tune run ({runs.RECIPE} is missing)",
            [
                "choose a new or empty training.output_dir: lora-tune does not write into other folders"
            ],
        )


def state(out: Path, recipe_data: dict) -> State:
    """What this recipe may do with the run directory `out`. Raises UserError when it holds
    another recipe's run, or files that are not a lora-tune run."""
    if not out.is_dir() or not [p for p in out.iterdir() if p.name != LOCK]:
        return State.NEW
    check_is_run(out)
    changed = differences(saved_recipe(out), parse_yaml(yaml_text(recipe_data)))
    steps = trained_steps(out)
    length = {key: values for key, values in changed.items() if key in LENGTH}
    shorter = {key: values for key, values in length.items() if not grows(key, *values, steps)}
    refused = {key: values for key, values in changed.items() if key not in LENGTH.keys() | CADENCE}
    if refused or shorter:
        problems = [describe_change(key, *values) for key, values in refused.items()]
        problems += [
            describe_change(
                key, *values, f" (the run has trained {steps} steps: nothing more to train)"
            )
            for key, values in shorter.items()
        ]
        raise UserError(
            f"training.output_dir: {out} holds a run of another recipe; {len(problems)} key(s) "
            f"differ from its {runs.RECIPE}:",
            [
                *problems,
                "to keep the earlier run: choose another training.output_dir",
                "to start over and move the earlier run aside: --resume never",
            ],
        )
    finished = (out / runs.ADAPTER).is_dir() and (out / runs.METRICS).is_file()
    return State.COMPLETE if finished and not length else State.RESUME


def yaml_text(data: dict) -> str:
    """The recipe as saved, so that it compares with recipe.yaml value for value."""
    return yaml.safe_dump(data, sort_keys=False)


# --- taking over the run directory -----------------------------------------------------------------


def claim(recipe, resume: str) -> State:
    """What a `train` with this recipe and --resume may do with its run directory; reads, writes
    nothing. Raises UserError when the directory holds another recipe's run or files of no run."""
    if resume == "never":
        check_is_run(recipe.output_dir)
        return State.NEW
    return state(recipe.output_dir, recipe.to_dict())


def resume_checkpoint(out: Path, resume: str) -> Path | None:
    """The checkpoint to resume from: `auto` (the latest complete one, if any), `never`, or a path."""
    if resume == "never":
        return None
    if resume == "auto":
        return runs.latest_checkpoint(out)
    path = Path(resume)
    if not runs.is_complete_checkpoint(path):
        raise UserError(
            f"--resume: {resume} is not a complete lora-tune checkpoint",
            [f"give a checkpoint-N folder that holds {runs.COMPLETE}, or --resume auto|never"],
        )
    return path


def take_over(recipe, resume: str, held: contextlib.ExitStack, write: bool = True) -> Decision:
    """Decide what this `train` does with its run directory. With `write`, take the lock (held
    until `held` closes), move an earlier run aside for --resume never, and save the recipe."""
    out = recipe.output_dir
    current = claim(recipe, resume)
    checkpoint = (
        None if current is State.COMPLETE else resume_checkpoint(out, resume)
    )  # checked before writing
    if current is State.COMPLETE or not write:
        return Decision(current, checkpoint)
    held.enter_context(lock(out))
    current = claim(
        recipe, resume
    )  # again, under the lock: another process may have written here since
    if current is State.COMPLETE:
        return Decision(current)
    checkpoint = resume_checkpoint(out, resume)
    aside = move_aside(out) if resume == "never" else None
    save_recipe(recipe, out)
    return Decision(current, checkpoint, aside)


def save_recipe(recipe, out: Path) -> None:
    """Write recipe.yaml whole or not at all (a reader never sees half a file)."""
    partial = out / f".{runs.RECIPE}.partial"
    recipe.save(partial)
    os.replace(partial, out / runs.RECIPE)


def agreed(decide):
    """Run `decide` on the main process only and give its result (or its UserError) to every
    process, so that none of them reads the run directory while the main one changes it, and all
    train or stop together."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return decide()
    import torch.distributed as dist

    from . import hardware

    if not dist.is_initialized():  # the training config sets it up; this only covers other callers
        from accelerate import PartialState

        PartialState(cpu=not hardware.has_cuda())
    box = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = decide()
        except UserError as exc:
            box[0] = exc
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], UserError):
        raise box[0]
    return box[0]


def move_aside(out: Path) -> Path | None:
    """Move the earlier run's files (all but the lock) to a sibling folder; return it, or None
    when there was nothing to move. Raises UserError, with everything moved back, when it cannot."""
    entries = [p for p in out.iterdir() if p.name != LOCK] if out.is_dir() else []
    if not entries:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = out.with_name(f"{out.name}.earlier-{stamp}")
    n = 1
    while aside.exists():
        n += 1
        aside = out.with_name(f"{out.name}.earlier-{stamp}-{n}")
    moved = []
    try:
        aside.mkdir()
        for entry in entries:
            entry.rename(aside / entry.name)
            moved.append(entry)
    except OSError as exc:
        for entry in moved:
            (aside / entry.name).rename(entry)
        with contextlib.suppress(OSError):
            aside.rmdir()
        raise UserError(
            f"--resume never: cannot move the earlier run in {out} to {aside}: {exc.strerror or exc}",
            [
                (
                    "make the folder above the run directory writable (the earlier run is kept beside it), "
                    "or move or delete the earlier run yourself"
                )
            ],
        ) from None
    return aside
