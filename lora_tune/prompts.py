"""Prompt-only data for the grpo trainer: TRL's rows (a `prompt`, text or chat turns, and the
source's other columns, which TRL hands to the reward functions), checked and measured.

GRPO trains on completions it samples itself, so a row has nothing to train but its prompt. Each
prompt is tokenized as GRPOTrainer tokenizes it (text with the tokenizer's special tokens; chat
turns through the chat template with its generation prompt), for the plan, `lora-tune data` and
evaluation:

- skipped and counted: an empty prompt, chat turns ending with an assistant turn (there is
  nothing to answer), a prompt longer than data.max_length (TRL does not cut prompts: such a
  prompt would be generated after whole);
- every other column is kept, one value per prompt, for the rewards.
"""

from __future__ import annotations

import functools

from . import data, pairs
from .data import DataStats
from .errors import UserError
from .formats import FORMATS

EMPTY, ANSWERED, LONG = "empty", "ends with an assistant turn", "prompt longer than max_length"


def tokenize_prompt(tokenizer, prompt, where: str = "row") -> list[int]:
    """A prompt's token ids, as TRL's GRPOTrainer tokenizes it for generation."""
    if isinstance(prompt, list):
        with data.template_errors(prompt, where):
            return list(
                tokenizer.apply_chat_template(
                    prompt, add_generation_prompt=True, tokenize=True, return_dict=True
                )["input_ids"]
            )
    return list(tokenizer(text=prompt)["input_ids"])


def skip_reason(prompt) -> str:
    """Why a prompt is not trained before tokenization ("" when it is)."""
    if pairs.is_empty(prompt):
        return EMPTY
    if isinstance(prompt, list) and prompt[-1].get("role") == "assistant":
        return ANSWERED
    return ""


def convert(raw, fmt: str, section, tokenizer, label: str, spec, stats: DataStats):
    """The source's rows as TRL's prompt-only rows: `prompt` and the other columns as they are;
    rows to skip are counted and left out. A source holds text or chat prompts, not both."""
    column = section.prompt_field

    def check(row, index):
        prompt = FORMATS[fmt].convert(row, section, f"{label} ({spec}), row {index}")["prompt"]
        return {"skip": skip_reason(prompt), "chat": isinstance(prompt, list)}

    checked = raw.map(
        check, with_indices=True, remove_columns=raw.column_names, desc=f"Checking {label}"
    )
    pairs.count(stats, checked["skip"])
    kept = [index for index, skip in enumerate(checked["skip"]) if not skip]
    chat = {checked["chat"][index] for index in kept}
    if True in chat:
        data.need_chat_template(tokenizer, label, spec)
    if len(chat) > 1:
        raise UserError(
            f"{label} ({spec}): some prompts are chat messages and others text; a source holds "
            "one kind",
            ["write every prompt of the source in one form, or split it into two sources"],
        )
    rows = raw.select(kept)
    if column != "prompt":
        rows = rows.rename_column(column, "prompt")
    return rows


def measure(rows, tokenizer, max_length: int, label: str, spec, stats: DataStats):
    """Tokenize the prompts as TRL does; skip those longer than max_length; fill the statistics."""
    if not len(rows):
        return rows

    def length(row, index):
        ids = tokenize_prompt(tokenizer, row["prompt"], f"{label} ({spec}), row {index}")
        return {"__length": len(ids)}

    measured = rows.map(length, with_indices=True, desc=f"Tokenizing {label}")
    lengths = measured["__length"]
    pairs.count(stats, [LONG if n > max_length else "" for n in lengths])
    kept = [index for index, n in enumerate(lengths) if n <= max_length]
    stats.samples = len(kept)
    stats.lengths = [lengths[index] for index in kept]
    return rows.select(kept)


def prepare_source(raw, section, tokenizer, label: str, spec, method, who: str = ""):
    """One source as TRL's prompt-only rows, and its DataStats."""
    fmt = pairs.detect_format(raw.column_names, section, method, label, spec, who)
    data.check_columns(raw.column_names, fmt, section, label, spec)
    stats = DataStats(rows=len(raw))
    rows = convert(raw, fmt, section, tokenizer, label, spec, stats)
    return measure(rows, tokenizer, section.max_length, label, spec, stats), stats


def prepare_all(parts, section, tokenizer, label: str, spec, method, who: str = ""):
    """Every (dataset, path) source of one split; a UserError if no prompt is left, if the
    sources mix text and chat prompts, or if their columns differ (the rewards read them)."""
    prepared = [
        prepare_source(raw, section, tokenizer, label, path, method, who) for raw, path in parts
    ]
    full = [(dataset, path) for (dataset, _), (_, path) in zip(prepared, parts, strict=True)]
    full = [(dataset, path) for dataset, path in full if len(dataset)]
    forms = {path: "chat" if isinstance(d[0]["prompt"], list) else "text" for d, path in full}
    if len(set(forms.values())) > 1:
        listed = ", ".join(f"{path}: {form}" for path, form in forms.items())
        raise UserError(
            f"{label}: its sources mix text prompts and chat prompts ({listed})",
            ["use sources of one form for a split"],
        )
    columns = {path: sorted(d.column_names) for d, path in full}
    if len({tuple(c) for c in columns.values()}) > 1:
        listed = "; ".join(f"{path}: {', '.join(c)}" for path, c in columns.items())
        raise UserError(
            f"{label}: its sources have different columns ({listed}); the rewards read them",
            ["give every source of a split the same columns"],
        )
    datasets = pairs.aligned([dataset for dataset, _ in prepared])
    return data.combine(
        [(dataset, stats) for dataset, (_, stats) in zip(datasets, prepared, strict=True)],
        label,
        spec,
    )


def load_datasets(section, tokenizer, method):
    """(train, eval or None, {"train": DataStats, "eval": DataStats}) as TRL's prompt-only rows."""
    return data.load_datasets(section, tokenizer, functools.partial(prepare_all, method=method))


def load_eval(spec: str | None, section, tokenizer, method, label: str = "--data"):
    """Evaluation prompts: `spec` if given, else the recipe's own eval data."""
    prepare = functools.partial(prepare_all, method=method, who="reward evaluation")
    return data.load_eval(spec, section, tokenizer, label, prepare)
