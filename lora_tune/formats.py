"""Data formats: each one unit, found in FORMATS.

A format says which columns it reads (recipe settings such as data.text_field, or fixed column
names), how it is recognised from a source's columns, and how a row becomes the text data.py
tokenizes: a (prompt, completion) pair, or chat turns for the chat template. Adding a format is
adding one entry here; the recipe's data.format, detection and tokenization read this table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .errors import UserError


def cell(row: dict, column: str, where: str) -> str:
    """A string cell; None counts as empty. Anything else is a user error naming file, row and field."""
    value = row.get(column)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise UserError(
            f"{where}, field {column!r}: expected text, got {type(value).__name__} {str(value)[:60]!r}",
            ["fix the row or drop it from the data"],
        )
    return value


@dataclass(frozen=True)
class Format:
    """One data format.

    `convert(row, section, where)` gives (prompt, completion) text, or with `chat` the row's list
    of chat turns. `rank` orders detection (lowest first), so a source whose columns fit several
    formats gets the most specific one.
    """

    name: str
    description: str  # what is trained, as the README's "Data formats" section says it
    convert: Callable
    fields: tuple[str, ...] = ()  # data.* settings naming its columns (data.text_field...)
    columns: tuple[str, ...] = ()  # column names it always reads
    chat: bool = False
    rank: int = 50

    def required(self, section) -> list[tuple[str, str]]:
        """(recipe key, column name) pairs the format needs."""
        return [(f"data.{field}", getattr(section, field)) for field in self.fields] + [
            ("data.format", column) for column in self.columns
        ]

    def detect(self, columns: set[str], section) -> bool:
        """Whether a source with these columns is in this format."""
        return all(column in columns for _, column in self.required(section))


def _text(row, section, where):
    return "", cell(row, section.text_field, where)


def _prompt_completion(row, section, where):
    return cell(row, section.prompt_field, where), cell(row, section.completion_field, where)


def _messages(row, section, where):
    return row[section.messages_field] or []


def _alpaca(row, section, where):
    extra = cell(row, "input", where).strip()
    template = section.prompt_template if extra else section.prompt_template_no_input
    return template.format(instruction=cell(row, "instruction", where), input=extra), cell(
        row, "output", where
    )


# In the order users read them: data.format's choices, its messages, the README.
FORMATS: dict[str, Format] = {
    fmt.name: fmt
    for fmt in (
        Format(
            "text",
            "every token is trained (`text_field` names the column).",
            _text,
            fields=("text_field",),
            rank=90,
        ),  # any 'text' column fits: tried last
        Format(
            "prompt_completion",
            "only the completion and its EOS are trained.",
            _prompt_completion,
            fields=("prompt_field", "completion_field"),
            rank=20,
        ),
        Format(
            "messages",
            (
                "rendered with the tokenizer's chat template (or `data.chat_template`, which is then saved "
                "with the adapter and the merged model); only the assistant turns are trained."
            ),
            _messages,
            fields=("messages_field",),
            chat=True,
            rank=10,
        ),
        Format(
            "alpaca",
            (
                "rendered through `prompt_template` (`prompt_template_no_input` when input is empty); only the "
                "output is trained."
            ),
            _alpaca,
            columns=("instruction", "output"),
            rank=30,
        ),
    )
}


def by_rank() -> list[Format]:
    return sorted(FORMATS.values(), key=lambda fmt: fmt.rank)


def named_by(chosen: set[str]) -> Format | None:
    """The format whose column settings the recipe sets (the one with more of them first:
    prompt_field and completion_field outrank messages_field), or None."""
    for fmt in sorted(by_rank(), key=lambda fmt: -len(fmt.fields)):
        if chosen & set(fmt.fields):
            return fmt
    return None


def detect(columns: list[str], section) -> Format | None:
    """The format data.format: auto chooses for a source with these columns, or None."""
    fmt = named_by(
        section.model_fields_set
    )  # a field name the recipe sets says which format it means
    if fmt is not None:
        return fmt
    present = set(columns)
    return next((fmt for fmt in by_rank() if fmt.detect(present, section)), None)
