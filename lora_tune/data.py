"""Datasets: formats, tokenization with exactly the labels to train, and its statistics.

lora-tune tokenizes the data itself and hands SFTTrainer `input_ids` and `labels`, so training,
`lora-tune data` and `lora-tune eval` see the same tokens and the same loss mask:

- text: every token; prompt_completion and alpaca: the completion only; messages: the
  assistant turns only (unless data.train_on_prompt).
- The EOS that ends a sample is always a label. Padding is masked by position later, never by
  token id, so this holds when the tokenizer pads with EOS too.
- Rows with nothing to train (empty text, a chat without an assistant turn, a prompt that fills
  max_length) are skipped and counted; rows longer than max_length are truncated and counted.

Reading the sources themselves (files, folders, hub datasets) is sources.py's, and what each
format reads and how its rows become text is formats.py's; a chat template that refuses a row
is named here with that row.
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

from . import formats
from .errors import UserError
from .formats import FORMATS, check_turns
from .methods import METHODS
from .sources import load_source

SKIP_REASONS = ("empty", "no assistant turn", "nothing left to train after truncation")


@dataclass
class DataStats:
    """What tokenization kept, skipped and cut, for the preview and metrics.json."""

    rows: int = 0
    samples: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    truncated: int = 0
    trained_tokens: int = 0
    lengths: list[int] = field(default_factory=list, repr=False)

    def add(self, other: DataStats) -> DataStats:
        skipped = {
            k: self.skipped.get(k, 0) + other.skipped.get(k, 0)
            for k in dict.fromkeys([*self.skipped, *other.skipped])  # in the order first seen
        }
        return DataStats(
            self.rows + other.rows,
            self.samples + other.samples,
            skipped,
            self.truncated + other.truncated,
            self.trained_tokens + other.trained_tokens,
            self.lengths + other.lengths,
        )

    def summary(self) -> dict:
        data = {k: v for k, v in asdict(self).items() if k != "lengths"} | {
            "tokens": sum(self.lengths)
        }
        if self.lengths:
            median, p95 = percentiles(self.lengths, 50, 95)
            data["length"] = {
                "min": min(self.lengths),
                "median": median,
                "p95": p95,
                "max": max(self.lengths),
            }
        return data


def percentiles(values: list[int], *ranks: int) -> list[float]:
    """Percentiles of one method (linear between the nearest values, as numpy's default), so a
    higher rank never gives a lower value: p95 >= median, however few the values."""
    if len(values) == 1:
        return [values[0]] * len(ranks)
    cuts = statistics.quantiles(
        values, n=100, method="inclusive"
    )  # cuts[k - 1] is the k-th percentile
    return [round(cuts[rank - 1], 2) for rank in ranks]  # rounding keeps the order


def sources(spec, section, split: str) -> list[dict]:
    """A data.train / data.eval value as a list of {path, subset, split, revision}."""
    items = spec if isinstance(spec, list) else [spec]
    result = []
    for item in items:
        if isinstance(item, str):
            result.append(
                {
                    "path": item,
                    "subset": section.subset,
                    "split": split,
                    "revision": section.revision,
                }
            )
        else:
            result.append(
                {
                    "path": item.path,
                    "subset": item.subset,
                    "split": item.split or split,
                    "revision": item.revision,
                }
            )
    return result


def detect_format(columns: list[str], section, label: str, spec: str) -> str:
    """The data.format of a source for supervised training: the recipe's, or guessed from its
    columns among the supervised formats (preference data is pairs.py's)."""
    if section.format != "auto":
        if FORMATS[section.format].data != "sft":
            users = [name for name, method in METHODS.items() if method.accepts(section.format)]
            supervised = ", ".join(fmt.name for fmt in formats.candidates())
            raise UserError(
                f"data.format: {section.format} data trains with trainer: {' or '.join(users)}; "
                f"supervised training reads {supervised} data",
                [f"set trainer: {users[0]}, or a supervised data.format"],
            )
        return section.format
    detected = formats.detect(columns, section)
    if detected is not None:
        return detected.name
    names = [fmt.name for fmt in formats.candidates()]
    fields = dict.fromkeys(f"data.{field}" for fmt in formats.candidates() for field in fmt.fields)
    raise UserError(
        f"data.format: cannot tell the format of {label} ({spec}) from its columns: {', '.join(columns)}",
        [f"set data.format ({', '.join(names)}) and the field names ({', '.join(fields)})"],
    )


def required_columns(fmt: str, section) -> list[tuple[str, str]]:
    """(recipe key, column name) pairs that a format needs."""
    return FORMATS[fmt].required(section)


def check_columns(columns: list[str], fmt: str, section, label: str, spec: str) -> None:
    for recipe_key, column in required_columns(fmt, section):
        if column not in columns:
            fixed = " and ".join(FORMATS[fmt].columns)
            fix = (
                f"set {recipe_key} to one of its columns"
                if recipe_key != "data.format"
                else f"{fmt} data needs {fixed} columns; choose another data.format"
            )
            raise UserError(
                f"{recipe_key}: column {column!r} not found in {label} ({spec}); "
                f"its columns: {', '.join(columns)}",
                [fix],
            )


def to_prompt_completion(row: dict, fmt: str, section, where: str = "row") -> tuple[str, str]:
    """One row as (prompt, completion) text; the text format has an empty prompt."""
    return FORMATS[fmt].convert(row, section, where)


def tokenize(
    tokenizer, prompt: str, completion: str, max_length: int, train_on_prompt: bool
) -> dict:
    """input_ids and labels of one sample: prompt tokens (with BOS) then completion tokens then EOS.

    Labels are -100 on the prompt unless train_on_prompt.
    """
    prefix = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if prefix and prefix[-1] == tokenizer.eos_token_id:  # tokenizers that append EOS themselves
        prefix = prefix[:-1]
    body = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    labels = (prefix if train_on_prompt else [-100] * len(prefix)) + body
    return _truncate(prefix + body, labels, max_length)


def _truncate(input_ids: list[int], labels: list[int], max_length: int) -> dict:
    return {
        "input_ids": input_ids[:max_length],
        "labels": labels[:max_length],
        "truncated": len(input_ids) > max_length,
    }


def render_chat(tokenizer, messages: list[dict], where: str) -> tuple[str, list[tuple[int, int]]]:
    """The chat rendered by its template, and the character spans of its assistant turns.

    A turn's span is what rendering it adds after the generation prompt of the turns before it,
    so it covers the template's end-of-turn tokens too. That needs a template that renders a
    conversation's prefix as a prefix; where it does not, guessing would train the wrong tokens.
    """

    def render(turns, generation_prompt=False):
        return apply_template(tokenizer, turns, where, generation_prompt)

    full = render(messages)
    spans = []
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        prompt = render(messages[:i], generation_prompt=True) if i else ""
        upto = render(messages[: i + 1])
        if not full.startswith(upto) or not upto.startswith(prompt):
            raise UserError(
                f"data.chat_template: the chat template does not render conversations turn by turn "
                f"({where}), so the assistant tokens cannot be told apart",
                [
                    (
                        "set data.chat_template to a template without such rewriting, "
                        "or data.train_on_prompt: true to train every token"
                    )
                ],
            )
        spans.append((len(prompt), len(upto)))
    return full, spans


def apply_template(
    tokenizer, messages: list[dict], where: str, generation_prompt: bool = False
) -> str:
    """The chat rendered as text; a template that refuses the row is a UserError naming it."""
    with template_errors(messages, where):
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )


@contextlib.contextmanager
def template_errors(messages: list[dict], where: str):
    """A chat template that refuses the row (raise_exception on a role order it does not accept,
    say) is a UserError naming the row and quoting the template; invalid Jinja names the template."""
    from jinja2.exceptions import TemplateError, TemplateSyntaxError

    try:
        yield
    except TemplateSyntaxError as exc:
        raise UserError(
            f"data.chat_template: the chat template is not valid Jinja (its line {exc.lineno}): "
            f"{exc.message}",
            ["fix data.chat_template, or remove it to use the tokenizer's own"],
        ) from None
    except TemplateError as exc:
        roles = ", ".join(str(m.get("role")) for m in messages)
        raise UserError(
            f"{where}: the chat template refused this conversation (roles: {roles}): {exc}",
            [
                (
                    "fix the row as the template's message says, or set data.chat_template to a template "
                    "that accepts such conversations"
                )
            ],
        ) from None


def tokenize_chat(
    tokenizer, messages: list[dict], max_length: int, train_on_prompt: bool, where: str
) -> dict:
    """input_ids and labels of one conversation: assistant turns trained, ending with EOS."""
    if train_on_prompt:  # every token is trained: no need to locate the turns
        text = apply_template(tokenizer, messages, where)
        spans = [(0, len(text))]
    else:
        text, spans = render_chat(tokenizer, messages, where)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoded["input_ids"])
    # A token that overlaps an assistant turn at all is trained: BPE often glues the space after
    # the generation prompt to the answer's first word.
    trained = [
        any(start < b and end > a for a, b in spans) for start, end in encoded["offset_mapping"]
    ]
    if (
        spans
        and tokenizer.eos_token_id
        not in [i for i, t in zip(input_ids, trained, strict=False) if t][-8:]
    ):
        input_ids.append(
            tokenizer.eos_token_id
        )  # the template ends turns without EOS: end the sample with one
        trained.append(True)
    labels = [i if t else -100 for i, t in zip(input_ids, trained, strict=False)]
    return _truncate(input_ids, labels, max_length)


def prepare_tokenizer(tokenizer, section, model_id: str) -> list[int]:
    """Add data.add_tokens / add_special_tokens and install data.chat_template; fail early when
    chat data will need a template and none exists. Returns the ids of the listed tokens."""
    tokenizer.add_tokens(section.add_tokens)
    tokenizer.add_tokens(section.add_special_tokens, special_tokens=True)
    if section.chat_template:
        tokenizer.chat_template = section.chat_template
    elif section.format in FORMATS and FORMATS[section.format].chat and not tokenizer.chat_template:
        raise UserError(
            f"data.chat_template: the tokenizer of {model_id} has no chat template for messages data",
            ["set data.chat_template to the Jinja template the model will be served with"],
        )
    return tokenizer.convert_tokens_to_ids(section.add_tokens + section.add_special_tokens)


def need_chat_template(tokenizer, label: str, spec) -> None:
    """Chat data in a source: a UserError unless the tokenizer has a chat template."""
    if not tokenizer.chat_template:
        raise UserError(
            f"data.chat_template: {label} ({spec}) holds chat messages and the tokenizer has no "
            "chat template",
            ["set data.chat_template to the Jinja template the model will be served with"],
        )


def tokenize_dataset(dataset, section, tokenizer, label: str, spec: str):
    """Format and tokenize one source. Returns (dataset of input_ids/labels, DataStats)."""
    fmt = detect_format(dataset.column_names, section, label, spec)
    check_columns(dataset.column_names, fmt, section, label, spec)
    if FORMATS[fmt].chat:
        need_chat_template(tokenizer, label, spec)

    def encode(row, index):
        where = f"{label} ({spec}), row {index}"
        if FORMATS[fmt].chat:
            messages = FORMATS[fmt].convert(row, section, where)
            check_turns(messages, where)
            if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
                return skipped("no assistant turn")
            sample = tokenize_chat(
                tokenizer, messages, section.max_length, section.train_on_prompt, where
            )
        else:
            prompt, completion = to_prompt_completion(row, fmt, section, where)
            if not completion.strip():
                return skipped("empty")
            sample = tokenize(
                tokenizer, prompt, completion, section.max_length, section.train_on_prompt
            )
        # Counted here, row by row, so the statistics need no second pass over the token lists.
        trained = sum(label != -100 for label in sample["labels"][1:])
        kept = any(label != -100 for label in sample["labels"])
        return sample | {
            "skip": "" if kept else "nothing left to train after truncation",
            "length": len(sample["input_ids"]),
            "trained": trained,
        }

    def skipped(reason: str) -> dict:
        return {
            "input_ids": [],
            "labels": [],
            "truncated": False,
            "skip": reason,
            "length": 0,
            "trained": 0,
        }

    tokenized = dataset.map(
        encode, with_indices=True, remove_columns=dataset.column_names, desc=f"Tokenizing {label}"
    )
    stats = DataStats(rows=len(dataset))
    for reason in tokenized["skip"]:
        if reason:
            stats.skipped[reason] = stats.skipped.get(reason, 0) + 1
    kept = tokenized.filter(lambda row: not row["skip"])
    stats.samples = len(kept)
    stats.truncated = sum(kept["truncated"])
    stats.lengths = list(kept["length"])
    stats.trained_tokens = sum(kept["trained"])
    return kept.remove_columns(["skip", "truncated", "length", "trained"]), stats


def tokenize_all(parts: list[tuple], section, tokenizer, label: str, spec):
    """Tokenize and concatenate (dataset, path) parts of one split. Raises UserError if nothing is left."""
    return combine(
        [tokenize_dataset(raw, section, tokenizer, label, path) for raw, path in parts],
        label,
        spec,
    )


def combine(prepared: list[tuple], label: str, spec):
    """One split from its sources' (dataset, DataStats); a UserError if no row is left."""
    from datasets import concatenate_datasets

    stats = DataStats()
    for _, part in prepared:
        stats = stats.add(part)
    if stats.samples == 0:
        skipped = ", ".join(f"{n} {reason}" for reason, n in stats.skipped.items()) or "none"
        raise UserError(
            f"{label}: no usable rows in {spec} ({stats.rows} rows; skipped: {skipped})",
            ["check the data, the field names and data.max_length"],
        )
    datasets = [dataset for dataset, _ in prepared if len(dataset)]
    return concatenate_datasets(datasets) if len(datasets) > 1 else datasets[0], stats


@dataclass
class Split:
    """The rows of one split as read, source by source: (dataset, source path) parts, and the
    recipe key and value they come from, for messages."""

    parts: list[tuple]
    label: str
    spec: object


def read_split(spec, section, label: str, split: str) -> Split:
    """Every source of a data.train or data.eval value, read."""
    parts = [
        (load_source(source, label), source["path"]) for source in sources(spec, section, split)
    ]
    return Split(parts, label, spec)


def raw_splits(section) -> Iterator[tuple[str, Split]]:
    """("train", Split) then ("eval", Split) when the recipe has eval data: data.eval, or the
    eval_fraction held out of each train source's rows, so no eval row is ever trained on.
    A split's sources are read when it is reached."""
    if section.eval_fraction:
        train, held_out = (
            Split([], "data.train", section.train),
            Split([], "data.train", section.train),
        )
        for source in sources(section.train, section, section.split):
            split = load_source(source, "data.train").train_test_split(
                test_size=section.eval_fraction, seed=section.seed
            )
            train.parts.append((split["train"], source["path"]))
            held_out.parts.append((split["test"], source["path"]))
        yield "train", train
        yield "eval", held_out
        return
    yield "train", read_split(section.train, section, "data.train", section.split)
    if section.eval:
        split = section.eval_split or section.split
        yield "eval", read_split(section.eval, section, "data.eval", split)


def load_split(spec, section, tokenizer, label: str, split: str, prepare=tokenize_all):
    """Read and prepare (by default: tokenize) every source of a data.train or data.eval value."""
    raw = read_split(spec, section, label, split)
    return prepare(raw.parts, section, tokenizer, raw.label, raw.spec)


def load_datasets(section, tokenizer, prepare=tokenize_all):
    """(train, eval or None, {"train": DataStats, "eval": DataStats}) from the recipe's data
    section. `prepare(parts, section, tokenizer, label, spec) -> (dataset, DataStats)` turns a
    split's sources into its rows: tokenize_all for supervised training."""
    prepared = {
        name: prepare(raw.parts, section, tokenizer, raw.label, raw.spec)
        for name, raw in raw_splits(section)
    }
    stats = {name: part_stats for name, (_, part_stats) in prepared.items()}
    evaluation = prepared["eval"][0] if "eval" in prepared else None
    return prepared["train"][0], evaluation, stats


def load_eval(spec: str | None, section, tokenizer, label: str = "--data", prepare=tokenize_all):
    """Prepared (by default: tokenized) evaluation data: `spec` if given (formatted as the recipe
    says, or detected from its columns when there is no recipe), else the recipe's own eval data."""
    from .recipe import DataSection

    if spec is None:
        if section is None or not (section.eval or section.eval_fraction):
            raise UserError(
                "no evaluation data: the target has no recipe with data.eval or data.eval_fraction",
                ["pass --data FILE_OR_HUB_DATASET"],
            )
        return load_datasets(section, tokenizer, prepare)[1]
    section = section or DataSection(train=spec)
    split = section.eval_split or section.split
    return load_split(spec, section, tokenizer, label, split, prepare)[0]
