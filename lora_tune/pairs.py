"""Preference data for the dpo, orpo, simpo and kto trainers: TRL's rows, checked and measured.

The trainers tokenize these rows themselves, so lora-tune hands them TRL's columns: prompt,
chosen and rejected for paired methods; prompt, completion and a boolean label for kto (paired
data is unpaired into one good and one bad row, with TRL's unpair_preference_dataset). Cells
are text or TRL's conversational form (lists of chat messages).

Before that, each row is checked and measured with the tokens DPOTrainer trains
(`tokenize_pair`, built from TRL's own helpers), for the plan, `lora-tune data` and evaluation:

- skipped and counted: an empty answer, chosen equal to rejected, chat pairs without a prompt
  turn, a prompt that fills max_length (TRL drops those too: nothing of the answer would be left);
- counted as truncated: prompt + answer longer than max_length (TRL's collator keeps the start).

Reading the sources, eval_fraction and the statistics are data.py's, the formats formats.py's.
"""

from __future__ import annotations

import functools

from . import data, formats
from .data import DataStats
from .errors import UserError
from .formats import FORMATS
from .methods import METHODS

# The columns TRL's trainers read, by the kind of data a method trains on (Method.data).
COLUMNS = {
    "paired": ("prompt", "chosen", "rejected"),
    "unpaired": ("prompt", "completion", "label"),
}
EMPTY, SAME, NO_PROMPT, FILLED = (
    "empty",
    "chosen equals rejected",
    "no prompt turn",
    "prompt fills max_length",
)
EVALUATED = "preference"  # the format of evaluation pairs


def tokenize_pair(tokenizer, row: dict, where: str = "row") -> tuple[list, list, list]:
    """(prompt_ids, chosen_ids, rejected_ids) of a prompt/chosen/rejected row, exactly as TRL's
    DPOTrainer prepares it: text answers end with the EOS; chat rows render the prompt with the
    generation prompt, and each answer after the whole prompt; the answers start where the
    prompt's tokens and both prompt + answer token lists part (TRL's common_prefix_length)."""
    prompt_ids, (chosen, rejected) = _tokenize_answers(
        tokenizer, row["prompt"], [row["chosen"], row["rejected"]], where
    )
    return prompt_ids, chosen, rejected


def tokenize_unpaired(tokenizer, row: dict, where: str = "row") -> tuple[list, list]:
    """(prompt_ids, completion_ids) of a prompt/completion row, as TRL's KTOTrainer prepares it."""
    prompt_ids, (completion,) = _tokenize_answers(
        tokenizer, row["prompt"], [row["completion"]], where
    )
    return prompt_ids, completion


def _tokenize_answers(tokenizer, prompt, answers: list, where: str):
    from trl.data_utils import _tokenize, common_prefix_length

    if isinstance(prompt, list):  # TRL's conversational rows
        with data.template_errors(prompt + answers[0], where):
            prompt_ids = _tokenize(tokenizer, prompt, add_generation_prompt=True)["input_ids"]
            full = [_tokenize(tokenizer, prompt + answer)["input_ids"] for answer in answers]
    else:
        eos = tokenizer.eos_token
        answers = [answer if answer.endswith(eos) else answer + eos for answer in answers]
        prompt_ids = _tokenize(tokenizer, prompt)["input_ids"]
        full = [_tokenize(tokenizer, prompt + answer)["input_ids"] for answer in answers]
    start = min(common_prefix_length(prompt_ids, ids) for ids in full)
    return prompt_ids[:start], [ids[start:] for ids in full]


def wanted(section, accepted) -> str:
    """The columns of the accepted formats, as a message says them."""
    return " or ".join(
        f"{'/'.join(getattr(section, field) for field in fmt.settings())} columns ({fmt.name} data)"
        for fmt in formats.candidates(accepted)
    )


def detect_format(columns: list[str], section, method, label: str, spec, who: str = "") -> str:
    """The format of a source for a preference method: the recipe's, or detected among the
    formats the method accepts."""
    who = who or f"trainer {method.name}"
    if section.format != "auto":
        if not method.accepts(section.format):
            raise UserError(
                f"data.format: {who} needs {wanted(section, method.formats)}; "
                f"data.format is {section.format}",
                ["set data.format: auto, or pass data in one of those formats"],
            )
        return section.format
    detected = formats.detect(columns, section, method.formats)
    if detected is not None:
        return detected.name
    settings = dict.fromkeys(
        f"data.{field}" for fmt in formats.candidates(method.formats) for field in fmt.settings()
    )
    raise UserError(
        f"data.format: {who} needs {wanted(section, method.formats)}; {label} ({spec}) has "
        f"columns: {', '.join(columns)}",
        [f"rename the columns, or set {', '.join(settings)} to the columns that hold them"],
    )


def is_empty(value) -> bool:
    if isinstance(value, list):
        return not any(str(turn.get("content") or "").strip() for turn in value)
    return not value.strip()


def content_skip(sample: dict) -> str:
    """Why a converted row is not trained, before tokenization ("" when it is)."""
    answers = [sample[key] for key in ("chosen", "rejected", "completion") if key in sample]
    if any(is_empty(answer) for answer in answers):
        return EMPTY
    if "chosen" in sample and sample["chosen"] == sample["rejected"]:
        return SAME
    if isinstance(sample["prompt"], list) and not sample["prompt"]:
        return NO_PROMPT
    return ""


def count(stats: DataStats, reasons: list[str]) -> None:
    for reason in reasons:
        if reason:
            stats.skipped[reason] = stats.skipped.get(reason, 0) + 1


def convert(raw, fmt: str, section, tokenizer, label: str, spec, stats: DataStats):
    """The source's rows in TRL's columns, with `row` (the source row) for messages; rows to
    skip are counted and left out. A source holds text rows or chat rows, not both."""
    to_row = FORMATS[fmt].convert

    def check(row, index):
        sample = to_row(row, section, f"{label} ({spec}), row {index}")
        chat = any(isinstance(value, list) for value in sample.values())
        return {"skip": content_skip(sample), "chat": chat}

    checked = raw.map(
        check, with_indices=True, remove_columns=raw.column_names, desc=f"Checking {label}"
    )
    count(stats, checked["skip"])
    kept = [index for index, skip in enumerate(checked["skip"]) if not skip]
    chat = [checked["chat"][index] for index in kept]
    if any(chat):
        data.need_chat_template(tokenizer, label, spec)
    if any(chat) and not all(chat):
        first, other = kept[0], kept[chat.index(not chat[0])]
        kinds = ("chat messages", "text") if chat[0] else ("text", "chat messages")
        raise UserError(
            f"{label} ({spec}), row {other}: {kinds[1]}, but row {first} holds {kinds[0]}; "
            "a source holds text rows or chat rows, not both",
            ["write every row of the source in one form, or split it into two sources"],
        )
    rows = raw.select(kept)
    return rows.map(
        lambda row, index: to_row(row, section, "row") | {"row": kept[index]},
        with_indices=True,
        remove_columns=rows.column_names,
        desc=f"Converting {label}",
    )


def measure(rows, tokenizer, max_length: int, label: str, spec, stats: DataStats):
    """Tokenize as TRL does; skip rows whose prompt fills max_length, count truncated ones, and
    fill the statistics. Returns the kept rows in TRL's columns."""
    paired = "chosen" in rows.column_names
    if not len(rows):  # every row skipped
        return rows
    tokenize = tokenize_pair if paired else tokenize_unpaired

    def lengths(row):
        prompt_ids, *answers = tokenize(tokenizer, row, f"{label} ({spec}), row {row['row']}")
        room = max_length - len(prompt_ids)
        kept = [min(len(answer), room) for answer in answers]
        return {
            "skip": FILLED if room <= 0 else "",
            "truncated": any(len(answer) > room for answer in answers),
            "length": len(prompt_ids) + max(kept),
            "trained": sum(kept),
        }

    measured = rows.map(lengths, desc=f"Tokenizing {label}")
    count(stats, measured["skip"])
    kept = measured.filter(lambda row: not row["skip"])
    stats.samples = len(kept)
    stats.truncated = sum(kept["truncated"])
    stats.lengths = list(kept["length"])
    stats.trained_tokens = sum(kept["trained"])
    return kept.select_columns(list(COLUMNS["paired" if paired else "unpaired"]))


def prepare_source(raw, section, tokenizer, label: str, spec, method, who: str = ""):
    """One source as TRL's rows for `method`, and its DataStats."""
    from trl.data_utils import unpair_preference_dataset

    fmt = detect_format(raw.column_names, section, method, label, spec, who)
    data.check_columns(raw.column_names, fmt, section, label, spec)
    stats = DataStats(rows=len(raw))
    rows = convert(raw, fmt, section, tokenizer, label, spec, stats)
    if method.data == "unpaired" and FORMATS[fmt].data == "paired" and len(rows):
        rows = unpair_preference_dataset(rows, desc=f"Unpairing {label}")
    return measure(rows, tokenizer, section.max_length, label, spec, stats), stats


def prepare_all(parts, section, tokenizer, label: str, spec, method, who: str = ""):
    """Every (dataset, path) source of one split for `method`; a UserError if no row is left
    or the sources mix text and chat rows."""
    prepared = [
        prepare_source(raw, section, tokenizer, label, path, method, who) for raw, path in parts
    ]
    forms = {
        path: "chat" if isinstance(dataset[0]["prompt"], list) else "text"
        for (dataset, _), (_, path) in zip(prepared, parts, strict=True)
        if len(dataset)
    }
    if len(set(forms.values())) > 1:
        listed = ", ".join(f"{path}: {form}" for path, form in forms.items())
        raise UserError(
            f"{label}: its sources mix text rows and chat rows ({listed})",
            ["use sources of one form for a split"],
        )
    datasets = aligned([dataset for dataset, _ in prepared])
    return data.combine(
        [(dataset, stats) for dataset, (_, stats) in zip(datasets, prepared, strict=True)],
        label,
        spec,
    )


def aligned(datasets: list) -> list:
    """Chat sources whose turns differ in keys (a 'name' in one) cast so that they concatenate:
    such chat columns are kept as datasets keeps differing turns, as JSON, each as written."""
    from datasets import Json, List

    full = [dataset for dataset in datasets if len(dataset)]  # an empty one has no columns
    if not full or all(dataset.features == full[0].features for dataset in full):
        return datasets
    features = full[0].features.copy()
    for column in features:
        kinds = [dataset.features[column] for dataset in full]
        if all(isinstance(kind, List) for kind in kinds) and any(k != kinds[0] for k in kinds):
            features[column] = List(Json())
    return [dataset.cast(features) if len(dataset) else dataset for dataset in datasets]


def load_datasets(section, tokenizer, method):
    """(train, eval or None, {"train": DataStats, "eval": DataStats}) in TRL's columns for a
    preference method (methods.Method), from the recipe's data section."""
    return data.load_datasets(section, tokenizer, functools.partial(prepare_all, method=method))


def is_paired(columns: list[str], section) -> bool:
    """Whether data with these columns is prompt/chosen/rejected pairs for the recipe's data
    section (None: no recipe): its data.format says, or else its columns do."""
    from .recipe import DataSection

    section = section or DataSection(train="-")
    if section.format != "auto":
        return FORMATS[section.format].data == "paired"
    return FORMATS[EVALUATED].detect(set(columns), section)


def load_eval(spec: str | None, section, tokenizer, label: str = "--data"):
    """Evaluation pairs (prompt/chosen/rejected rows, checked as for training): `spec` if given
    (read with the recipe's field names, or detected from its columns when there is no recipe),
    else the recipe's own eval data."""
    prepare = functools.partial(prepare_all, method=METHODS["dpo"], who="preference evaluation")
    return data.load_eval(spec, section, tokenizer, label, prepare)
