"""GRPO's rewards: the recipe's `rewards:` section, checked, and turned into TRL reward functions.

Each entry is one reward with a weight (TRL's reward_weights): a built-in that needs no code, or a
user function from a Python file the recipe names, relative to the recipe file:

    rewards:
      - {exact_match: answer, weight: 1.0}          # the completion equals the row's `answer`
      - {number_match: answer, weight: 1.0}         # its last number equals the answer's last one
      - {regex: '^the \\w+ is \\w+\\.$', weight: 0.5}  # re.search finds the pattern
      - {length: 12, weight: 0.1}                   # 1 at 12 completion tokens, 0 at 0 or 24
      - {function: my_rewards.py:brevity, weight: 0.2, name: short}

A user function gets what TRL's GRPOTrainer passes every reward function, as keyword arguments:
`prompts` and `completions` (text, or for chat prompts a list holding one assistant message),
`completion_ids`, the dataset's other columns (one value per completion), and TRL's
`trainer_state`, `log_extra` and `log_metric`; it returns one float (or None: not scored) per
completion. A file that is missing or does not import, a function that is missing or would not
accept those arguments is reported when the recipe is checked, before any weights load.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import inspect
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError

BUILT_INS = {  # kind -> what its value is
    "exact_match": "a column",
    "number_match": "a column",
    "regex": "a pattern",
    "length": "a token count",
}
KINDS = (*BUILT_INS, "function")
OPTIONS = ("weight", "name")
# Keyword arguments TRL gives every reward function besides the dataset's columns.
TRL_ARGUMENTS = (
    "prompts",
    "completions",
    "completion_ids",
    "trainer_state",
    "log_extra",
    "log_metric",
)
# Columns a dataset may not have: TRL passes arguments of these names itself, or reads the column
# as something else (images make the model a vision model, environment picks a tool environment).
RESERVED_COLUMNS = (*TRL_ARGUMENTS, "completion", "environments", "environment", "image", "images")
SIGNATURE = "def {name}(prompts, completions, **kwargs) -> list[float]"
NAME = re.compile(r"[A-Za-z0-9_.\-]+")
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


@dataclass(frozen=True)
class Reward:
    """One checked entry of the rewards section."""

    kind: str  # a key of BUILT_INS, or "function"
    value: Any  # the column, pattern, token count, or "path/to/file.py:function" (path resolved)
    weight: float
    name: str  # in TRL's logs: rewards/<name>/mean and /std

    def entry(self) -> dict:
        """The entry as the resolved recipe saves it."""
        return {self.kind: self.value, "weight": self.weight, "name": self.name}

    @property
    def column(self) -> str | None:
        """The dataset column it compares with (exact_match and number_match)."""
        return self.value if self.kind in ("exact_match", "number_match") else None

    def describe(self) -> str:
        """'exact_match (answer) x1.0' for the plan."""
        shown = self.value if self.kind != "function" else self.value.rsplit(":", 1)[1]
        label = f"{self.kind} {shown!r}" if self.kind == "regex" else f"{self.kind} ({shown})"
        named = "" if self.name == default_name(self.kind, self.value) else f" as {self.name}"
        return f"{label}{named} x{self.weight:g}"


def default_name(kind: str, value: Any) -> str:
    return str(value).rsplit(":", 1)[1] if kind == "function" else kind


# --- the recipe's section ---------------------------------------------------------------------


def check(section: Any, trainer: str, base: Path, problems: list[str]) -> list[Reward]:
    """The rewards section, checked: entries, weights, names, patterns, and each user function
    loaded from its file (paths relative to `base`, the recipe's folder). Problems are appended."""
    if section is None:
        if trainer == "grpo":
            problems.append(
                "rewards: required section missing for trainer grpo. Add at least one reward, "
                "e.g. rewards: [{exact_match: answer, weight: 1.0}]."
            )
        return []
    if trainer != "grpo":
        problems.append(f"rewards: only trainer grpo uses rewards; this recipe trains {trainer}.")
        return []
    if not isinstance(section, list) or not section:
        problems.append(
            "rewards: expected a list of rewards, e.g. [{exact_match: answer, weight: 1.0}]."
        )
        return []
    found = [check_entry(entry, f"rewards[{i}]", base, problems) for i, entry in enumerate(section)]
    rewards = [reward for reward in found if reward is not None]
    seen: dict[str, int] = {}
    for i, reward in enumerate(found):
        if reward is None:
            continue
        if reward.name in seen:
            problems.append(
                f"rewards[{i}]: its name {reward.name} is rewards[{seen[reward.name]}]'s too; "
                "TRL logs each reward by name: give one of them a name: key."
            )
        seen.setdefault(reward.name, i)
    return rewards


def check_entry(entry: Any, where: str, base: Path, problems: list[str]) -> Reward | None:
    """One entry: exactly one kind, a finite weight, a simple name; None where it is wrong."""
    kinds = ", ".join(KINDS)
    if not isinstance(entry, dict):
        problems.append(
            f"{where}: expected a mapping such as {{exact_match: answer, weight: 1.0}}; got {entry!r}."
        )
        return None
    unknown = [str(key) for key in entry if key not in (*KINDS, *OPTIONS)]
    for key in unknown:
        problems.append(
            f"{where}.{key}: unknown key. A reward is one of {kinds}, with weight and name."
        )
    chosen = [key for key in KINDS if key in entry]
    if len(chosen) != 1:
        problems.append(
            f"{where}: name exactly one kind of reward ({kinds}); got "
            f"{', '.join(chosen) or 'none'}."
        )
        return None
    kind = chosen[0]
    weight = check_weight(entry.get("weight", 1.0), where, problems)
    value = check_value(kind, entry[kind], where, base, problems)
    name = entry.get("name")
    if name is not None and (not isinstance(name, str) or not NAME.fullmatch(name)):
        problems.append(
            f"{where}.name: expected letters, digits, '_', '.' or '-' (it names the reward in the "
            f"logs); got {name!r}."
        )
        return None
    if unknown or weight is None or value is None:
        return None
    return Reward(kind, value, weight, name or default_name(kind, value))


def check_weight(weight: Any, where: str, problems: list[str]) -> float | None:
    if (
        isinstance(weight, bool)
        or not isinstance(weight, (int, float))
        or not math.isfinite(weight)
    ):
        problems.append(f"{where}.weight: expected a finite number, e.g. 1.0; got {weight!r}.")
        return None
    return float(weight)


def check_value(kind: str, value: Any, where: str, base: Path, problems: list[str]) -> Any:
    """The kind's value checked (and a function's path resolved); None where it is wrong."""
    if kind == "function":
        return check_function(value, f"{where}.function", base, problems)
    if kind == "length":
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            problems.append(
                f"{where}.length: expected a positive token count, e.g. 64; got {value!r}."
            )
            return None
        return value
    if not isinstance(value, str) or not value:
        problems.append(f"{where}.{kind}: expected {BUILT_INS[kind]}; got {value!r}.")
        return None
    if kind == "regex":
        try:
            re.compile(value)
        except re.error as exc:
            problems.append(f"{where}.regex: not a valid regular expression: {exc}.")
            return None
    return value


def check_function(value: Any, where: str, base: Path, problems: list[str]) -> str | None:
    """'path/to/file.py:name', its file found (relative to `base`), imported, and the function's
    signature able to take TRL's arguments. Returns the value with the file's absolute path."""
    if not isinstance(value, str) or ":" not in value:
        problems.append(
            f"{where}: expected PATH.py:FUNCTION, e.g. rewards.py:exact_answer; got {value!r}."
        )
        return None
    path_text, name = value.rsplit(":", 1)
    path = (base / path_text).resolve()
    try:
        function = load_function(path, name, path_text)
        check_signature(function, name)
    except UserError as exc:
        problems.append(f"{where}: {exc.headline}")
        return None
    return f"{path}:{name}"


def load_function(path: Path, name: str, shown: str):
    """The function `name` of the Python file `path`; UserError where there is none."""
    if not path.is_file():
        raise UserError(f"{shown} not found ({path}); the path is relative to the recipe file")
    module = import_file(path)
    function = getattr(module, name, None)
    if not callable(function):
        defined = [
            key
            for key, item in vars(module).items()
            if inspect.isfunction(item) and item.__module__ == module.__name__
        ]
        raise UserError(
            f"{shown} has no function {name!r}; it defines: {', '.join(defined) or 'no functions'}. "
            f"Expected: {SIGNATURE.format(name=name)}"
        )
    return function


@functools.cache
def _import(path: Path, stamp: float):
    # One module per file and version: a reward file is run once however often it is named.
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(f"lora_tune_rewards_{digest}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def import_file(path: Path):
    """The module of a reward file; UserError naming the file where importing it fails."""
    try:
        return _import(path, path.stat().st_mtime)
    except Exception as exc:  # the user's code: any error of it is theirs to fix
        line = f" (line {exc.lineno})" if isinstance(exc, SyntaxError) else ""
        raise UserError(f"importing {path} failed{line}: {type(exc).__name__}: {exc}") from None


def check_signature(function, name: str, columns: tuple[str, ...] | None = None) -> None:
    """UserError unless `function` takes TRL's reward arguments and the dataset's columns as
    keyword arguments. Before the data is read (`columns` None), only that it takes TRL's own
    (parameters it names beyond them may be columns)."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):  # a builtin without a signature: TRL will find out
        return
    arguments = dict.fromkeys((*TRL_ARGUMENTS, *(columns or ())))
    bind = signature.bind_partial if columns is None else signature.bind
    try:
        bind(**arguments)
    except TypeError as exc:
        raise UserError(
            f"{name}{signature} cannot take the arguments TRL passes ({exc}). Expected: "
            f"{SIGNATURE.format(name=name)}, with the dataset's columns among the keyword "
            "arguments"
        ) from None


def check_columns(rewards: list[Reward], columns: list[str], label: str, spec) -> None:
    """Before training: each compared column is in the data, no column has a name TRL passes
    itself, and each user function takes the columns. Raises UserError."""
    problems = []
    for column in columns:
        if column in RESERVED_COLUMNS:
            problems.append(
                f"{label} ({spec}) has a column {column!r}, a name GRPO gives reward functions "
                "(or reads) itself; rename that column"
            )
    for i, reward in enumerate(rewards):
        if reward.column is not None and reward.column not in columns:
            problems.append(
                f"rewards[{i}].{reward.kind}: column {reward.column!r} not found in {label} "
                f"({spec}); its columns: {', '.join(columns)}"
            )
        if reward.kind == "function":
            path, name = reward.value.rsplit(":", 1)
            try:
                check_signature(load_function(Path(path), name, path), name, tuple(columns))
            except UserError as exc:
                problems.append(f"rewards[{i}].function: {exc.headline}")
    if problems:
        raise UserError(f"rewards: {len(problems)} problem(s) with {label}:", problems)


# --- the reward functions TRL calls -----------------------------------------------------------


def text_of(completion) -> str:
    """A completion's text: itself, or the content of a chat completion's last message."""
    if isinstance(completion, list):
        return str(completion[-1].get("content") or "") if completion else ""
    return completion


def last_number(text) -> float | None:
    """The last number written in a text (1,234.5 -> 1234.5), or a number itself; None if none."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    found = NUMBER.findall(str(text))
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def exact_match(column: str, completions, **kwargs) -> list[float]:
    """1 where the completion equals the row's value, spaces at either end aside."""
    return [
        float(text_of(c).strip() == str(v).strip())
        for c, v in zip(completions, kwargs[column], strict=True)
    ]


def number_match(column: str, completions, **kwargs) -> list[float]:
    """1 where the completion's last number equals the value's last number."""
    scores = []
    for completion, value in zip(completions, kwargs[column], strict=True):
        got, want = last_number(text_of(completion)), last_number(value)
        scores.append(float(got is not None and want is not None and math.isclose(got, want)))
    return scores


def regex(pattern: re.Pattern, completions, **kwargs) -> list[float]:
    """1 where the pattern is found in the completion."""
    return [float(pattern.search(text_of(c)) is not None) for c in completions]


def length(target: int, completions, completion_ids, **kwargs) -> list[float]:
    """1 at `target` completion tokens (an ending EOS counted), falling linearly to 0 at 0 and
    twice the target."""
    return [max(0.0, 1.0 - abs(len(ids) - target) / target) for ids in completion_ids]


SCORERS = {
    "exact_match": exact_match,
    "number_match": number_match,
    "regex": regex,
    "length": length,
}


def function_of(reward: Reward):
    """The callable TRL calls for a reward, named as the reward so TRL logs it under that name.
    A user function's result is checked: one number or None per completion."""
    if reward.kind == "function":
        path, name = reward.value.rsplit(":", 1)
        return checked(load_function(Path(path), name, path), reward.name)
    value = re.compile(reward.value, re.DOTALL) if reward.kind == "regex" else reward.value
    scorer = functools.partial(SCORERS[reward.kind], value)

    def score(prompts, completions, **kwargs):
        return scorer(completions=completions, **kwargs)

    score.__name__ = score.__qualname__ = reward.name
    return score


def checked(function, name: str):
    """`function` with its result checked, under the reward's name (async kept async)."""

    def check_result(result, completions):
        values = list(result) if isinstance(result, (list, tuple)) else None
        if (
            values is None
            or len(values) != len(completions)
            or not all(
                value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))
                for value in values
            )
        ):
            raise UserError(
                f"rewards: {function.__name__} returned {str(result)[:120]!r} for "
                f"{len(completions)} completions; a reward function returns one float (or None) "
                f"per completion. Expected: {SIGNATURE.format(name=function.__name__)}"
            )
        return values

    if inspect.iscoroutinefunction(function):

        async def call(prompts, completions, **kwargs):
            return check_result(
                await function(prompts=prompts, completions=completions, **kwargs), completions
            )

    else:

        def call(prompts, completions, **kwargs):
            return check_result(
                function(prompts=prompts, completions=completions, **kwargs), completions
            )

    call.__name__ = call.__qualname__ = name
    return call


def functions(rewards: list[Reward]) -> list:
    return [function_of(reward) for reward in rewards]


def score(
    rewards: list[Reward], prompts, completions, completion_ids, rows: dict
) -> dict[str, list]:
    """Every reward of every completion, as TRL computes them: {name: [float or nan, ...]}.
    `rows` holds the dataset's other columns, one value per completion."""
    import asyncio

    scores = {}
    for reward, function in zip(rewards, functions(rewards), strict=True):
        result = function(
            prompts=prompts,
            completions=completions,
            completion_ids=completion_ids,
            trainer_state=None,
            log_extra=lambda *args, **kwargs: None,
            log_metric=lambda *args, **kwargs: None,
            **rows,
        )
        if inspect.isawaitable(result):
            result = asyncio.run(result)
        scores[reward.name] = [math.nan if value is None else float(value) for value in result]
    return scores
