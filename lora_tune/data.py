"""Datasets: sources (hub or local file), formats, and tokenization with the labels to train.

lora-tune tokenizes the data itself and hands SFTTrainer `input_ids` and `labels`, so training
and `lora-tune eval` see exactly the same tokens and the same loss mask.
"""

from __future__ import annotations

from pathlib import Path

from .errors import UserError

BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def _quiet_datasets() -> None:
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()  # per-map progress bars on small data are noise around the plan


def load_source(spec: str, section, label: str, split: str):
    """One dataset from a local file or folder, or a hub dataset name. `label` names the recipe key."""
    from datasets import load_dataset

    _quiet_datasets()
    path = Path(spec).expanduser()
    local = path.suffix in BUILDERS or spec.startswith((".", "/", "~")) or path.exists()
    try:
        if local and path.is_dir():
            return load_dataset(str(path), split=split)
        if local:
            if not path.is_file():
                raise UserError(f"{label}: file not found: {spec}",
                                [f"give an existing {'/'.join(BUILDERS)} file, or a hub dataset name"])
            if path.suffix not in BUILDERS:
                raise UserError(f"{label}: cannot read {path.suffix!r} files: {spec}",
                                [f"use one of {', '.join(BUILDERS)}"])
            return load_dataset(BUILDERS[path.suffix], data_files=str(path), split="train")
        return load_dataset(spec, section.subset, split=split, revision=section.revision)
    except UserError:
        raise
    except Exception as exc:  # datasets raises many types for unreadable or unreachable data
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{label}: cannot load {spec!r}: {first}",
                        ["check the file's format, or the dataset name, split and network"]) from None


def required_columns(section) -> list[tuple[str, str]]:
    """(recipe key, column name) pairs that the data format needs."""
    if section.format == "text":
        return [("data.text_field", section.text_field)]
    if section.format == "prompt_completion":
        return [("data.prompt_field", section.prompt_field), ("data.completion_field", section.completion_field)]
    return [("data.format", "instruction"), ("data.format", "output")]


def check_columns(dataset, section, label: str, spec: str) -> None:
    columns = dataset.column_names
    for recipe_key, column in required_columns(section):
        if column not in columns:
            fix = (f"set {recipe_key} to one of its columns" if recipe_key != "data.format"
                   else "alpaca data needs instruction and output columns; choose another data.format")
            raise UserError(f"{recipe_key}: column {column!r} not found in {label} ({spec}); "
                            f"its columns: {', '.join(columns)}", [fix])


def to_prompt_completion(row: dict, section) -> tuple[str, str]:
    """One row as (prompt, completion) text; the text format has an empty prompt."""
    if section.format == "text":
        return "", row[section.text_field] or ""
    if section.format == "prompt_completion":
        return row[section.prompt_field] or "", row[section.completion_field] or ""
    extra = (row.get("input") or "").strip()
    template = section.prompt_template if extra else section.prompt_template_no_input
    return template.format(instruction=row["instruction"], input=extra), row["output"] or ""


def tokenize(tokenizer, prompt: str, completion: str, max_length: int, train_on_prompt: bool) -> dict:
    """input_ids and labels of one sample: prompt tokens (with BOS) then completion tokens then EOS.

    Labels are -100 on the prompt unless train_on_prompt. The final EOS is always a label, even
    when pad == eos, because padding is added later and masked by position, not by token id.
    """
    prefix = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if prefix and prefix[-1] == tokenizer.eos_token_id:  # tokenizers that append EOS themselves
        prefix = prefix[:-1]
    body = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    input_ids = (prefix + body)[:max_length]
    labels = (prefix if train_on_prompt else [-100] * len(prefix)) + body
    return {"input_ids": input_ids, "labels": labels[:max_length]}


def tokenize_dataset(dataset, section, tokenizer, label: str, spec: str):
    """Format and tokenize; drop rows left with nothing to train. Raises UserError if none remain."""
    check_columns(dataset, section, label, spec)

    def encode(row):
        prompt, completion = to_prompt_completion(row, section)
        return tokenize(tokenizer, prompt, completion, section.max_length, section.train_on_prompt)

    tokenized = dataset.map(encode, remove_columns=dataset.column_names, desc=f"Tokenizing {label}")
    tokenized = tokenized.filter(lambda row: any(label != -100 for label in row["labels"]))
    if len(tokenized) == 0:
        raise UserError(f"{label}: no usable rows in {spec} "
                        f"({len(dataset)} rows, none with tokens to train after truncation to {section.max_length})",
                        ["check the data file, the field names and data.max_length"])
    return tokenized


def load_datasets(section, tokenizer):
    """(train, eval or None), tokenized, from the recipe's data section."""
    train = load_source(section.train, section, "data.train", section.split)
    check_columns(train, section, "data.train", section.train)
    evaluation = None
    if section.eval:
        evaluation = load_source(section.eval, section, "data.eval", section.eval_split or section.split)
    elif section.eval_fraction:
        split = train.train_test_split(test_size=section.eval_fraction, seed=section.seed)
        train, evaluation = split["train"], split["test"]
    train = tokenize_dataset(train, section, tokenizer, "data.train", section.train)
    if evaluation is not None:
        label, spec = ("data.eval", section.eval) if section.eval else ("data.train", section.train)
        evaluation = tokenize_dataset(evaluation, section, tokenizer, label, spec)
    return train, evaluation


def detect_format(dataset, label: str, spec: str) -> dict:
    """Data-section fields for a dataset with no recipe, guessed from its columns."""
    columns = set(dataset.column_names)
    if {"prompt", "completion"} <= columns:
        return {"format": "prompt_completion"}
    if {"instruction", "output"} <= columns:
        return {"format": "alpaca"}
    if "text" in columns:
        return {"format": "text"}
    if len(columns) == 1:
        return {"format": "text", "text_field": next(iter(columns))}
    raise UserError(f"{label}: cannot tell the format of {spec} from its columns: {', '.join(sorted(columns))}",
                    ["give it a text column, prompt and completion columns, or instruction and output columns"])


def load_eval(spec: str | None, section, tokenizer, label: str = "--data"):
    """Tokenized evaluation data: `spec` if given (formatted as the recipe says, or guessed from
    its columns when there is no recipe), else the recipe's own eval data."""
    from .recipe import DataSection

    if spec is None:
        if section is None or not (section.eval or section.eval_fraction):
            raise UserError("no evaluation data: the target has no recipe with data.eval or data.eval_fraction",
                            ["pass --data FILE_OR_HUB_DATASET"])
        return load_datasets(section, tokenizer)[1]
    if section is None:
        dataset = load_source(spec, DataSection(train=spec), label, "train")
        section = DataSection(train=spec, **detect_format(dataset, label, spec))
    else:
        dataset = load_source(spec, section, label, section.eval_split or section.split)
    return tokenize_dataset(dataset, section, tokenizer, label, spec)
