"""Data formats: each one unit, found in FORMATS.

A format says which columns it reads (recipe settings such as data.text_field, or fixed column
names), how it is recognised from a source's columns, the kind of data it is (`data`: sft rows
that data.py tokenizes, or the paired and unpaired rows of the preference trainers, which
pairs.py prepares) and how a row becomes that data: a (prompt, completion) pair, chat turns for
the chat template, or TRL's prompt/chosen/rejected or prompt/completion/label row. Adding a
format is adding one entry here; the recipe's data.format, detection and tokenization read this
table. Detection only chooses among the formats the trainer accepts.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
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


def check_turns(messages, where: str) -> None:
    """Raise UserError naming the row unless every turn has a text role and content."""
    for turn in messages if isinstance(messages, list) else [messages]:
        if (
            not isinstance(turn, dict)
            or not isinstance(turn.get("role"), str)
            or not isinstance(turn.get("content"), str)
        ):
            raise UserError(
                f"{where}: each chat turn needs a 'role' and a text 'content'; got {str(turn)[:80]!r}",
                ["fix the row or drop it from the data"],
            )


def text_or_turns(row: dict, column: str, where: str) -> str | list[dict]:
    """A preference cell: text, or chat turns (TRL's conversational form); None counts as empty."""
    value = row.get(column)
    if value is None:
        return ""
    if isinstance(value, list) and all(isinstance(turn, dict) for turn in value):
        check_turns(value, f"{where}, field {column!r}")
        return value
    if not isinstance(value, str):
        raise UserError(
            f"{where}, field {column!r}: expected text or a list of chat messages, got "
            f"{type(value).__name__} {str(value)[:60]!r}",
            ["fix the row or drop it from the data"],
        )
    return value


@dataclass(frozen=True)
class Format:
    """One data format.

    `convert(row, section, where)` gives (prompt, completion) text, or with `chat` the row's list
    of chat turns; for paired and unpaired data, the row in TRL's columns. `rank` orders
    detection (lowest first), so a source whose columns fit several formats gets the most
    specific one.
    """

    name: str
    description: str  # what is trained, as the README's "Data formats" section says it
    convert: Callable
    fields: tuple[str, ...] = ()  # data.* settings naming its columns (data.text_field...)
    columns: tuple[str, ...] = ()  # column names it always reads
    chat: bool = False
    rank: int = 50
    data: str = "sft"  # "sft": text to tokenize; "paired": prompt/chosen/rejected; "unpaired";
    # "prompts": prompts to complete (GRPO)
    optional: tuple[str, ...] = ()  # data.* settings naming columns read where present

    def required(self, section) -> list[tuple[str, str]]:
        """(recipe key, column name) pairs the format needs; an optional column is needed once
        the recipe names it."""
        named = [field for field in self.optional if field in section.model_fields_set]
        return [(f"data.{field}", getattr(section, field)) for field in (*named, *self.fields)] + [
            ("data.format", column) for column in self.columns
        ]

    def settings(self) -> tuple[str, ...]:
        """Every data.* setting naming one of its columns."""
        return (*self.optional, *self.fields)

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


def _kind(value) -> str | None:
    """chat, text, or None for an empty cell."""
    if not value:
        return None
    return "chat" if isinstance(value, list) else "text"


def _one_kind(sample: dict, columns: dict[str, str], where: str) -> dict:
    """The row's cells all text or all chat turns (empty cells take the others' kind)."""
    kinds = {key: _kind(value) for key, value in sample.items()}
    found = set(kinds.values()) - {None}
    if len(found) > 1:
        chat = [repr(columns[key]) for key, kind in kinds.items() if kind == "chat"]
        text = [repr(columns[key]) for key, kind in kinds.items() if kind == "text"]
        raise UserError(
            f"{where}: field {' and '.join(chat)} holds chat messages but {' and '.join(text)} "
            "holds text; a row is all text or all chat messages",
            ["write every field of the row as text, or every one as a list of chat messages"],
        )
    empty = [] if found == {"chat"} else ""
    return {key: value or empty for key, value in sample.items()}


def _preference(row, section, where):
    """TRL's prompt/chosen/rejected row. Chosen and rejected that hold the whole conversation
    (no prompt column, or a text prompt beside chat answers) lose their shared start to the
    prompt, as TRL's maybe_extract_prompt does."""
    from trl.data_utils import maybe_extract_prompt

    columns = {
        "prompt": section.prompt_field,
        "chosen": section.chosen_field,
        "rejected": section.rejected_field,
    }
    pair = {side: text_or_turns(row, column, where) for side, column in columns.items()}
    if section.prompt_field not in row:
        del pair["prompt"]
    elif not pair["prompt"]:  # no prompt turns: the shared start of chat answers, if any
        pair["prompt"] = ""
    if pair["chosen"] and pair["rejected"]:  # a row with an empty side is skipped later
        split = maybe_extract_prompt(pair)
        if isinstance(pair.get("prompt"), str) and pair["prompt"] and split["prompt"] == []:
            raise UserError(
                f"{where}: field {section.prompt_field!r} holds text, but {section.chosen_field!r} "
                f"and {section.rejected_field!r} hold chat messages that share no prompt turns",
                [
                    "write the prompt as chat messages ([{'role': 'user', 'content': ...}]), or "
                    "chosen and rejected as whole conversations"
                ],
            )
        pair = split
    return _one_kind({"prompt": "", **pair}, columns, where)


def _unpaired(row, section, where):
    """TRL's prompt/completion/label row; the label must be a boolean."""
    label = row.get(section.label_field)
    if not isinstance(label, bool):
        raise UserError(
            f"{where}, field {section.label_field!r}: expected true or false, got "
            f"{type(label).__name__} {str(label)[:60]!r}",
            ["write the label as true (a good completion) or false (a bad one)"],
        )
    columns = {"prompt": section.prompt_field, "completion": section.completion_field}
    sample = {key: text_or_turns(row, column, where) for key, column in columns.items()}
    return _one_kind(sample, columns, where) | {"label": label}


def _prompt_only(row, section, where):
    """TRL's prompt-only row: the prompt, text or chat turns; the other columns go to the rewards."""
    return {"prompt": text_or_turns(row, section.prompt_field, where)}


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
        Format(
            "preference",
            (
                "`prompt`, a better answer `chosen` and a worse one `rejected` (trainers dpo, orpo, "
                "simpo; kto takes each pair as one good and one bad completion); text, or chat "
                "messages rendered with the chat template. Where chosen and rejected hold the whole "
                "conversation, their shared start is the prompt. Both answers are trained, each "
                "after the prompt."
            ),
            _preference,
            fields=("chosen_field", "rejected_field"),
            optional=("prompt_field",),
            data="paired",
            rank=40,
        ),
        Format(
            "unpaired",
            (
                "`prompt`, `completion` and a true/false `label` saying whether the completion is "
                "good (trainer kto); text, or chat messages rendered with the chat template. The "
                "completion is trained."
            ),
            _unpaired,
            fields=("prompt_field", "completion_field", "label_field"),
            data="unpaired",
            rank=35,
        ),
        Format(
            "prompt_only",
            (
                "a `prompt` to complete (trainer grpo), text or chat messages rendered with the "
                "chat template and its generation prompt; nothing of it is trained. The other "
                "columns (such as an `answer`) are handed to the reward functions."
            ),
            _prompt_only,
            fields=("prompt_field",),
            data="prompts",
            rank=95,
        ),  # any 'prompt' column fits: tried after every format that reads more of the row
    )
}


def candidates(accepted: Collection[str] | None = None) -> list[Format]:
    """The formats detection chooses among, in the table's order: those named (the ones a
    trainer accepts), or else the supervised ones."""
    if accepted is None:
        return [fmt for fmt in FORMATS.values() if fmt.data == "sft"]
    return [fmt for fmt in FORMATS.values() if fmt.name in accepted]


def named_by(section, among: list[Format], columns: set[str]) -> Format | None:
    """The format whose column settings the recipe sets, or None. More of them set wins, then
    more settings (prompt_field and completion_field outrank messages_field); formats still
    level (a kto recipe naming only prompt_field) are told apart by the columns. `among` is
    in detection order."""
    chosen = section.model_fields_set

    def key(fmt):
        return (-len(chosen & set(fmt.settings())), -len(fmt.settings()))

    named = sorted((fmt for fmt in among if chosen & set(fmt.settings())), key=key)
    if not named:
        return None
    level = [fmt for fmt in named if key(fmt) == key(named[0])]
    return next((fmt for fmt in level if fmt.detect(columns, section)), level[0])


def detect(columns: list[str], section, accepted: Collection[str] | None = None) -> Format | None:
    """The format data.format: auto chooses for a source with these columns, or None; only
    formats in `accepted` (default: the supervised ones) are considered."""
    among = sorted(candidates(accepted), key=lambda fmt: fmt.rank)
    present = set(columns)
    # A field name the recipe sets says which format it means.
    fmt = named_by(section, among, present)
    if fmt is not None:
        return fmt
    return next((fmt for fmt in among if fmt.detect(present, section)), None)
