"""Strict YAML reading, and the cutting of users' values for messages.

parse_yaml is PyYAML's SafeLoader made strict for recipes: a key written twice, a value that
aliases expand past MAX_VALUES values or MAX_DEPTH levels, and an alias inside its own anchor
raise Refused, which becomes one UserError naming the key path and the line. shown and cut
keep a user's value in a message short, however long the value.
"""

from __future__ import annotations

from collections import defaultdict
from itertools import islice
from typing import Any

import yaml

from .errors import UserError

# Bounds on the YAML itself: real recipes are a few levels deep and hold a few hundred values,
# so these only stop a "billion laughs" of nested aliases, which PyYAML builds as shared lists
# that every later walk over the recipe would expand.
MAX_DEPTH = 50
MAX_VALUES = 100_000
ALIAS_FIX = "a recipe needs a few hundred values: write them out instead of nesting aliases, and keep data in data files"
MERGE_TAG = "tag:yaml.org,2002:merge"
# How much of a user's value an error message shows.
SHOWN_CHARS = 80
SHOWN_ITEMS = 8
SHOWN_LEVELS = 3


class Refused(yaml.MarkedYAMLError):
    """Valid YAML that a recipe refuses: keys written twice, or too many values or levels."""

    def __init__(self, problems: list[str], fix: str | None = None, mark=None):
        super().__init__(problem="; ".join(problems), problem_mark=mark)
        self.problems, self.fix = problems, fix

    def user_error(self, source: str) -> UserError:
        if self.fix is None:  # a list of problems, reported the way validation reports them
            n = len(self.problems)
            return UserError(
                f"{source}: {n} problem{'s' if n > 1 else ''} in the recipe:", self.problems
            )
        return UserError(f"{where(source, self)}: {self.problem}", [self.fix])


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, refusing nesting deeper than MAX_DEPTH while composing (PyYAML's
    composer recurses once per level, so a file of 100,000 '[' would end in a RecursionError),
    and naming the line of a scalar it cannot construct (a 5,000-digit integer, a 13th month)."""

    depth = 0

    def compose_node(self, parent, index):
        if self.depth >= MAX_DEPTH:
            raise Refused(
                [f"nested more than {MAX_DEPTH} levels deep"],
                "a recipe nests a few levels (section, key, list): check the brackets and indentation",
                self.peek_event().start_mark,
            )
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep)
        except ValueError as exc:
            raise yaml.constructor.ConstructorError(
                problem=f"cannot read {shown(node.value)} (quote it to keep it as text): {cut(str(exc), 200)}",
                problem_mark=node.start_mark,
            ) from None


def parse_yaml(text: str | bytes, root: str = "") -> Any:
    """YAML -> Python data through PyYAML's SafeLoader, strictly: a key written twice in a
    mapping, a value that expands (through aliases) past MAX_VALUES values or MAX_DEPTH levels,
    and an alias inside its own anchor raise Refused, naming key paths below `root`.
    Other YAML errors raise yaml.YAMLError."""
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        repeated: list[str] = []
        _census(node, root, {}, repeated)
        if repeated:
            raise Refused(repeated)
        return loader.construct_document(node)
    finally:
        loader.dispose()


_WALKING = object()


def _census(node: yaml.Node, path: str, seen: dict, repeated: list[str]) -> tuple[int, int]:
    """(values, depth) of a composed node once its aliases are expanded; keys written twice go
    to `repeated`. An anchored node is walked once and then counted from `seen`, so a billion
    laughs is measured in microseconds and refused before anything expands it."""
    known = seen.get(id(node))
    if known is _WALKING:
        raise Refused(
            [f"{path or 'the recipe'} holds an alias to itself"],
            "an alias (*name) must refer to an anchor (&name) outside the value it sits in",
            node.start_mark,
        )
    if known:
        return known
    seen[id(node)] = _WALKING
    if isinstance(node, yaml.MappingNode):
        repeated += _repeated_keys(node, path)
    values, depth = 1, 1
    for child_path, child in _children(node, path):
        count, levels = _census(child, child_path, seen, repeated)
        values, depth = values + count, max(depth, levels + 1)
        if values > MAX_VALUES:
            problem = f"{path or 'the recipe'} holds more than {MAX_VALUES:,} values once its aliases (*name) are expanded"
            raise Refused([problem], ALIAS_FIX, node.start_mark)
        if depth > MAX_DEPTH:
            problem = f"{path or 'the recipe'} nests more than {MAX_DEPTH} levels deep once its aliases (*name) are expanded"
            raise Refused([problem], ALIAS_FIX, node.start_mark)
    seen[id(node)] = (values, depth)
    return values, depth


def _children(node: yaml.Node, path: str) -> list[tuple[str, yaml.Node]]:
    """(key path, node) of each key and value a node holds, in the file's order (anchors before aliases)."""
    if isinstance(node, yaml.SequenceNode):
        return [(f"{path}[{i}]", child) for i, child in enumerate(node.value)]
    if not isinstance(node, yaml.MappingNode):
        return []
    children = []
    for key, value in node.value:
        child_path = _child_path(path, key)
        children += [(child_path, key), (child_path, value)]
    return children


def _repeated_keys(node: yaml.MappingNode, path: str) -> list[str]:
    """'training.learning_rate: written twice (lines 5 and 12); keep one.' for each key a mapping
    repeats (keys that `<<: *anchor` merges in may be overridden: that is what merging is for)."""
    marks = defaultdict(list)
    for key, _ in node.value:
        if isinstance(key, yaml.ScalarNode) and key.tag != MERGE_TAG:
            marks[key.tag, key.value].append(key.start_mark)
    problems = []
    for (_, name), found in marks.items():
        if len(found) > 1:
            lines = [str(mark.line + 1) for mark in found]
            if len(set(lines)) < len(lines):  # a flow mapping on one line: columns tell them apart
                lines = [f"{mark.line + 1}:{mark.column + 1}" for mark in found]
            times = "twice" if len(found) == 2 else f"{len(found)} times"
            problems.append(
                f"{_child_path(path, name)}: written {times} (lines {', '.join(lines[:-1])} and "
                f"{lines[-1]}); keep one."
            )
    return problems


def _child_path(path: str, key: Any) -> str:
    name = cut(key.value if isinstance(key, yaml.ScalarNode) else str(key))
    return f"{path}.{name}" if path else name


def where(source: str, exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    return f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source


def yaml_problem(exc: yaml.YAMLError) -> str:
    return cut(getattr(exc, "problem", None) or str(exc), 300)


def cut(text: str, limit: int = SHOWN_CHARS) -> str:
    """Text for a message, cut past `limit` characters so a huge value cannot flood it."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def shown(value: Any, depth: int = 0) -> str:
    """repr of a user's value for a message, with long strings, long lists and deep nesting cut.
    (reprlib cuts too, but sorts dict keys and hides how much it left out.)"""
    if isinstance(value, str):
        return (
            repr(value)
            if len(value) <= SHOWN_CHARS
            else f"{value[:SHOWN_CHARS]!r}... ({len(value):,} characters)"
        )
    if isinstance(value, (dict, list, tuple)) and depth >= SHOWN_LEVELS:
        return "{...}" if isinstance(value, dict) else "[...]"
    if isinstance(value, dict):
        items = [
            f"{shown(k, depth + 1)}: {shown(v, depth + 1)}"
            for k, v in islice(value.items(), SHOWN_ITEMS)
        ]
        return "{" + _joined(items, len(value)) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + _joined([shown(v, depth + 1) for v in value[:SHOWN_ITEMS]], len(value)) + "]"
    return cut(repr(value))


def _joined(items: list[str], total: int) -> str:
    return ", ".join(items if total <= len(items) else [*items, f"... ({total:,} in all)"])
