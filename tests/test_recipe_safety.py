"""Recipes parse strictly and safely: keys written twice, alias bombs, runaway files, long values
in messages and counts of zero or below are all user errors (exit 2, the fix, nothing written)."""

from __future__ import annotations

import json
import string
import subprocess
import sys
import time

import pytest
from helpers import run_cli, write_recipe

from lora_tune import recipe as recipes
from lora_tune.errors import UserError


def files_under(path):
    return set(path.rglob("*"))


def bomb(levels: int, width: int = 9) -> str:
    """A flow list of `levels` anchors, each repeating the previous one `width` times: width**levels values."""
    names = string.ascii_lowercase
    items = [f"&a [{', '.join(['lol'] * width)}]"]
    items += [f"&{names[i]} [{', '.join([f'*{names[i - 1]}'] * width)}]" for i in range(1, levels)]
    return "[" + ", ".join(items) + "]"


def under(section: str, line: str):
    """An edit of the recipe's text: `line` becomes the first line of `section`."""
    return lambda text: text.replace(f"\n{section}:\n", f"\n{section}:\n{line}\n", 1)


def replace(old: str, new: str):
    def edit(text):
        assert old in text
        return text.replace(old, new, 1)

    return edit


def append(extra: str):
    return lambda text: text + extra


def setting(key: str, value: str):
    return lambda text: text, ["--set", f"{key}={value}"]


LONG = "x" * 100_000

# name -> (edit of the recipe text, or (edit, extra CLI arguments)), expected fragment of the message
BAD_INPUTS = {
    "key written twice": (
        under("training", "  learning_rate: 0.1"),
        "training.learning_rate: written twice (lines",
    ),
    "section written twice": (
        append("training:\n  learning_rate: 0.1\n"),
        "training: written twice (lines",
    ),
    "key written three times": (under("lora", "  r: 4\n  r: 16"), "lora.r: written 3 times (lines"),
    "key written twice in a list": (
        replace("  train: ", "  train:\n  - {path: a.jsonl, path: b.jsonl}\n  x: "),
        "data.train[0].path: written twice",
    ),
    "alias bomb under output_dir": (
        replace("  output_dir: ", f"  output_dir: {bomb(6)}\n  x: "),
        "training.output_dir[5] holds more than 100,000 values once its aliases",
    ),
    "alias bomb under data.train": (
        replace("  train: ", f"  train: {bomb(7)}\n  x: "),
        "data.train[5] holds more than 100,000 values",
    ),
    "alias inside its anchor": (
        under("lora", "  target_modules: &t [q_proj, *t]"),
        "lora.target_modules[1] holds an alias to itself",
    ),
    "nesting too deep": (
        under("training", "  x: " + "[" * 10_000 + "]" * 10_000),
        "nested more than 50 levels deep",
    ),
    "file too large": (append("# " + "x" * 1_100_000 + "\n"), "bytes; a recipe is a few kilobytes"),
    "not text": (
        lambda text: text.replace("model:", "model: \udcff"),
        "not UTF-8 text: invalid start byte at byte",
    ),
    "integer too long": (
        under("training", "  warmup_steps: " + "9" * 5000),
        "(5,000 characters) (quote it to keep it",
    ),
    "impossible date": (
        under("data", "  revision: 2024-13-45"),
        "cannot read '2024-13-45' (quote it",
    ),
    "batch of zero": (
        setting("training.per_device_train_batch_size", "0"),
        "training.per_device_train_batch_size: Input should be greater than 0; got 0.",
    ),
    "negative batch": (
        setting("training.per_device_train_batch_size", "-8"),
        "training.per_device_train_batch_size: Input should be greater than 0; got -8.",
    ),
    "eval batch of zero": (
        setting("training.per_device_eval_batch_size", "0"),
        "training.per_device_eval_batch_size: Input should be greater than 0; got 0.",
    ),
    "accumulation of zero": (
        setting("training.gradient_accumulation_steps", "0"),
        "training.gradient_accumulation_steps: Input should be greater than 0; got 0.",
    ),
    "eval accumulation of zero": (
        setting("training.eval_accumulation_steps", "0"),
        "training.eval_accumulation_steps: Input should be greater than 0; got 0.",
    ),
    "zero epochs": (
        setting("training.num_train_epochs", "0"),
        "training.num_train_epochs: Input should be greater than 0; got 0.",
    ),
    "zero max_steps": (
        setting("training.max_steps", "0"),
        "got 0. Optimizer steps to train; -1 (the default) trains num_train_epochs instead.",
    ),
    "negative max_steps": (
        setting("training.max_steps", "-5"),
        "training.max_steps: Input should be greater than 0",
    ),
    "zero save_steps": (
        setting("training.save_steps", "0"),
        "training.save_steps: Input should be greater than 0",
    ),
    "negative logging_steps": (
        setting("training.logging_steps", "-3"),
        "training.logging_steps: Input should be greater than 0; got -3.",
    ),
    "zero eval_steps": (
        setting("training.eval_steps", "0"),
        "training.eval_steps: Input should be greater than 0",
    ),
    "negative workers": (
        setting("training.dataloader_num_workers", "-1"),
        "training.dataloader_num_workers: Input should be greater than or equal to 0; got -1.",
    ),
    "infinite save_steps": (
        setting("training.save_steps", ".inf"),
        "training.save_steps: expected a finite number, got inf. YAML reads .inf, .nan and",
    ),
    "save_steps beyond a float": (
        setting("training.save_steps", "1e400"),
        "training.save_steps: expected a finite number, got '1e400'.",
    ),
    "infinite logging_steps": (
        setting("training.logging_steps", "-.inf"),
        "training.logging_steps: expected a finite number, got -inf.",
    ),
    "infinite eval_steps": (
        (
            lambda text: text,
            ["--set", "training.eval_strategy=steps", "--set", "training.eval_steps=.inf"],
        ),
        "training.eval_steps: expected a finite number, got inf.",
    ),
    "infinite epochs": (
        (
            lambda text: text,
            ["--set", "training.max_steps=-1", "--set", "training.num_train_epochs=.inf"],
        ),
        "training.num_train_epochs: expected a finite number, got inf.",
    ),
    "nan learning rate": (
        setting("training.learning_rate", ".nan"),
        "training.learning_rate: expected a finite number, got nan.",
    ),
    "infinite learning rate": (
        setting("training.learning_rate", ".inf"),
        "training.learning_rate: expected a finite number, got inf.",
    ),
    "nan inside a mapping": (
        setting("training.lr_scheduler_kwargs", "{min_lr: .nan}"),
        "training.lr_scheduler_kwargs: expected a finite number, got {'min_lr': nan}.",
    ),
    "nan dropout": (
        setting("lora.lora_dropout", ".nan"),
        "lora.lora_dropout: expected a finite number, got nan.",
    ),
    "infinite alpha": (
        setting("lora.lora_alpha", ".inf"),
        "lora.lora_alpha: expected an integer, got inf.",
    ),
    "infinite LoRA+ ratio": (
        setting("lora.loraplus_lr_ratio", ".inf"),
        "lora.loraplus_lr_ratio: expected a positive number, got inf.",
    ),
    "nan LoRA+ embedding rate": (
        setting("lora.loraplus_lr_embedding", ".nan"),
        "lora.loraplus_lr_embedding: expected a positive number, got nan.",
    ),
    "infinite max_length": (
        setting("data.max_length", ".inf"),
        "data.max_length: Input should be a finite number",
    ),
    "nan eval_fraction": (
        (lambda text: text, ["--set", "data.eval=null", "--set", "data.eval_fraction=.nan"]),
        "data.eval_fraction: Input should be a finite number; got nan.",
    ),
    "key written twice in --set": (
        setting("lora.target_modules", "{q_proj: 1, q_proj: 2}"),
        "lora.target_modules.q_proj: written twice (lines 1:2 and 1:13); keep one.",
    ),
    "alias bomb in --set": (
        setting("data.train", bomb(7)),
        "data.train[5] holds more than 100,000 values",
    ),
    "long text value": (
        setting("training.learning_rate", LONG),
        f"training.learning_rate: expected a number, got {'x' * 80!r}... (100,000 characters).",
    ),
    "long model value": (setting("model.dtype", LONG), "; got 'xxxxxxxx"),
    "long list value": (
        setting("training.num_train_epochs", "[" + ", ".join(["1"] * 10_000) + "]"),
        "got [1, 1, 1, 1, 1, 1, 1, 1, ... (10,000 in all)].",
    ),
    "long key": (
        under("training", f"  {'k' * 1000}: 1"),
        f"training.{'k' * 80}... (1,000 characters): unknown key.",
    ),
    "long value quoted by TRL": (
        setting("training.lr_scheduler_type", "cosine" + LONG),
        "training.lr_scheduler_type: cosinexxxx",
    ),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input(name, tiny, tmp_path, capsys):
    change, expected = BAD_INPUTS[name]
    edit, extra = change if isinstance(change, tuple) else (change, [])
    case = tmp_path / "case"
    case.mkdir()
    path = write_recipe(case / "recipe.yaml", tiny, case / "run")
    path.write_bytes(edit(path.read_text()).encode(errors="surrogateescape"))
    before = files_under(case)
    started = time.perf_counter()
    assert run_cli("train", path, "--dry-run", *extra) == 2
    assert time.perf_counter() - started < 30
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err.replace("\n", " ").replace("  - ", ""), (
        err[:3000]
    )
    assert "Traceback" not in err
    assert "\n  - " in err  # the fix, or the problems with theirs
    assert len(err) < 3000  # no value is echoed whole
    assert files_under(case) == before
    assert not (case / "run").exists()


def test_duplicates_name_every_key_with_both_lines(tmp_path, tiny):
    path = write_recipe(tmp_path / "recipe.yaml", tiny, tmp_path / "run")
    text = path.read_text().replace("\ntraining:\n", "\ntraining:\n  learning_rate: 0.1\n")
    path.write_text(text + "lora:\n  r: 4\n")
    lines = text.splitlines()
    first_lr, second_lr = [
        i + 1 for i, line in enumerate(lines) if line.startswith("  learning_rate:")
    ]
    with pytest.raises(UserError) as info:
        recipes.load(path)
    assert info.value.headline == f"{path}: 2 problems in the recipe:"
    assert info.value.problems == [
        f"lora: written twice (lines {lines.index('lora:') + 1} and {len(lines) + 1}); keep one.",
        f"training.learning_rate: written twice (lines {first_lr} and {second_lr}); keep one.",
    ]


def test_ordinary_anchors_aliases_and_merge_keys_still_load(tmp_path, tiny):
    rows = tiny / "data" / "text_train.jsonl"
    path = tmp_path / "recipe.yaml"
    path.write_text(f"""\
model: {{id: {tiny / "tiny-llama"}, dtype: &precise float32}}
lora: {{r: 8, target_modules: &targets [q_proj, v_proj]}}
data:
  train:
    - &rows {{path: {rows}, split: train}}
  eval:
    - {{<<: *rows, split: test}}  # an explicit key beside a merge overrides it: not a duplicate
  max_length: 64
training:
  output_dir: {tmp_path / "run"}
  run_name: *precise
""")
    loaded = recipes.load(
        path,
        ["training.max_steps=-1", "training.logging_steps=0.5", "lora.layers_to_transform=[0]"],
    )
    assert [(s.path, s.split) for s in loaded.data.train + loaded.data.eval] == [
        (str(rows), "train"),
        (str(rows), "test"),
    ]
    assert loaded.model.dtype == loaded.training["run_name"] == "float32"
    assert loaded.lora["target_modules"] == ["q_proj", "v_proj"]
    assert loaded.training["max_steps"] == -1 and loaded.training["logging_steps"] == 0.5


def test_billion_laughs_is_refused_at_once_in_little_memory(tmp_path, tiny):
    """Nine anchors of nine aliases (387,420,489 values) under a valid key: refused in well under a
    second. The check runs in a child whose address space may grow by 2 GB at most, so a loader
    that expands the aliases fails there instead of eating this machine's memory."""
    for key, section in (("output_dir", "training"), ("train", "data")):
        path = write_recipe(tmp_path / f"{key}.yaml", tiny, tmp_path / "run")
        path.write_text(path.read_text().replace(f"  {key}: ", f"  {key}: {bomb(9)}\n  x: ", 1))
        code = f"""
import json, resource, sys, time
from lora_tune import recipe
from lora_tune.errors import UserError
import trl  # the heavy imports happen before the limit
def kib(name):
    return int(next(line.split()[1] for line in open('/proc/self/status') if line.startswith(name)))
hard = resource.getrlimit(resource.RLIMIT_AS)[1]
soft = (kib('VmSize:') + 2 * 1024 * 1024) * 1024
resource.setrlimit(resource.RLIMIT_AS, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))
rss, started = kib('VmRSS:'), time.perf_counter()
try:
    recipe.load({str(path)!r})
    message = 'loaded'
except UserError as exc:
    message = exc.render()
print(json.dumps([message, time.perf_counter() - started, kib('VmHWM:') - rss]))
"""
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
        )
        assert done.returncode == 0, done.stderr[-2000:]
        message, seconds, grown_kib = json.loads(done.stdout.splitlines()[-1])
        assert (
            f"{section}.{key}[5] holds more than 100,000 values once its aliases (*name) are expanded"
            in message
        )
        assert len(message) < 500
        assert seconds < 0.5
        assert grown_kib < 50 * 1024


def test_long_values_are_cut_in_every_message():
    assert recipes._shown("abc") == "'abc'"
    assert recipes._shown("y" * 81) == f"{'y' * 80!r}... (81 characters)"
    assert (
        recipes._shown({"a": [1] * 9, "b": {"c": {"d": {"e": {"f": 1}}}}})
        == "{'a': [1, 1, 1, 1, 1, 1, 1, 1, ... (9 in all)], 'b': {'c': {'d': {...}}}}"
    )
    assert recipes._shown(10**200) == f"{'1' + '0' * 79}... (201 characters)"
