"""Who owns a run directory, and what a new `lora-tune train` may do with it.

A run directory belongs to one recipe and one process at a time:
- one `train` holds OUT/lora-tune.lock (an flock: the kernel releases it when the process dies,
  so a killed run never leaves it stuck); a second one is refused with the first one's PID;
- a finished run is left alone; a rerun of an unfinished one resumes it;
- a changed recipe is refused, except for the keys that continue the same run (a longer run,
  gradient clipping, how often it logs and saves);
- `--resume never` moves the earlier run aside, so its checkpoints are never resumed later.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import reprlib
import socket
import time
import warnings
from enum import Enum
from pathlib import Path

import yaml

from . import runs
from .errors import UserError
from .yaml_reader import parse_yaml

LOCK = "lora-tune.lock"
UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)  # filesystems without flock
# Keys a rerun may change and still continue the same run from its checkpoint. The learning rate
# is not one: a resumed scheduler restores the old one, so a new value would be silently ignored.
CONTINUES = {"training.max_steps", "training.num_train_epochs"}
CADENCE = {"training.max_grad_norm", "training.logging_steps", "training.save_steps",
           "training.save_total_limit", "training.eval_steps", "training.report_to"}

_short = reprlib.Repr()  # values in messages are cut: a recipe's value may be long
_short.maxstring = _short.maxother = 60


class State(Enum):
    NEW = "new"              # nothing there yet: train from the start
    RESUME = "resume"        # the same run, not finished: continue it
    COMPLETE = "complete"    # the same run, finished: nothing to do


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
    return UserError(f"training.output_dir: {out} is in use by another `lora-tune train` ({who})",
                     [("wait for it to finish, stop it (a stopped run resumes when rerun), "
                       "or choose another training.output_dir")])


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
            warnings.warn(f"{out}: this filesystem cannot lock files ({exc.strerror}); make sure no other "
                          "`lora-tune train` writes to this run directory", stacklevel=2)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        yield
    finally:
        os.close(fd)  # releases the lock


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


MISSING = object()  # a key that one of the two recipes does not set


def differences(saved: dict, current: dict) -> dict[str, tuple]:
    """Key path -> (saved value, current value) for every key whose value differs."""
    before, after = flatten(saved), flatten(current)
    return {key: (before.get(key, MISSING), after.get(key, MISSING)) for key in sorted(before.keys() | after.keys())
            if before.get(key, MISSING) != after.get(key, MISSING)}


def describe_change(key: str, old, new) -> str:
    """'training.learning_rate: 0.003 -> 0.001', long values cut."""
    def show(value):
        return "(not set)" if value is MISSING else _short.repr(value)

    return f"{key}: {show(old)} -> {show(new)}"


def saved_recipe(out: Path) -> dict:
    """The resolved recipe the run was started with. Raises UserError when it cannot be read."""
    path = out / runs.RECIPE
    try:
        data = parse_yaml(path.read_bytes())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise UserError(f"training.output_dir: {path} cannot be read ({type(exc).__name__}), so this run's recipe "
                        "is unknown", [("choose another training.output_dir, or --resume never to start over "
                                        "(the earlier run is moved aside)")]) from None
    return data if isinstance(data, dict) else {}


def check_is_run(out: Path) -> None:
    """Raise UserError when `out` holds files but no lora-tune run: they are not ours to move or mix."""
    if out.is_dir() and not (out / runs.RECIPE).is_file() and [p for p in out.iterdir() if p.name != LOCK]:
        raise UserError(f"training.output_dir: {out} holds files but no lora-tune run ({runs.RECIPE} is missing)",
                        ["choose a new or empty training.output_dir: lora-tune does not write into other folders"])


def state(out: Path, recipe_data: dict) -> State:
    """What this recipe may do with the run directory `out`. Raises UserError when it holds
    another recipe's run, or files that are not a lora-tune run."""
    if not out.is_dir() or not [p for p in out.iterdir() if p.name != LOCK]:
        return State.NEW
    check_is_run(out)
    changed = differences(saved_recipe(out), yaml.safe_load(yaml.safe_dump(recipe_data)))
    refused = {key: values for key, values in changed.items() if key not in CONTINUES | CADENCE}
    if refused:
        raise UserError(f"training.output_dir: {out} holds a run of another recipe; "
                        f"{len(refused)} key(s) differ from its {runs.RECIPE}:",
                        [describe_change(key, *values) for key, values in refused.items()]
                        + ["to keep the earlier run: choose another training.output_dir",
                           "to start over and move the earlier run aside: --resume never"])
    finished = (out / runs.ADAPTER).is_dir() and (out / runs.METRICS).is_file()
    return State.COMPLETE if finished and not changed.keys() & CONTINUES else State.RESUME


def move_aside(out: Path) -> Path | None:
    """Move the earlier run's files (all but the lock) to a sibling folder; return it, or None
    when there was nothing to move."""
    entries = [p for p in out.iterdir() if p.name != LOCK] if out.is_dir() else []
    if not entries:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = out.with_name(f"{out.name}.earlier-{stamp}")
    n = 1
    while aside.exists():
        n += 1
        aside = out.with_name(f"{out.name}.earlier-{stamp}-{n}")
    aside.mkdir()
    for entry in entries:
        entry.rename(aside / entry.name)
    return aside
