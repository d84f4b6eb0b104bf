"""The recipe: loading, `--set` overrides, and validation of every section.

`model` and `data` are lora-tune's own pydantic schemas. `lora` and `training` are checked
against the real `peft.LoraConfig` and the TRL config class of the recipe's `trainer` (sft: SFTConfig,
dpo: DPOConfig, ...): their dataclass fields give the valid keys and the types, and the objects
are then built for real so their own checks run too.
Every problem is collected and reported at once, each with its key path. The YAML itself is
read strictly by yaml_reader, which also cuts long values for messages.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from .errors import UserError, did_you_mean
from .formats import FORMATS
from .lora_methods import LORA_METHODS
from .methods import DEFAULT, METHODS
from .rewards import Reward
from .rewards import check as check_rewards
from .yaml_reader import SHOWN_CHARS, Refused, parse_yaml, where, yaml_problem
from .yaml_reader import cut as _cut  # private here: `shown` is the --set text in apply_overrides
from .yaml_reader import shown as _shown

SECTIONS = ("model", "lora", "data", "training")
# `trainer: dpo` chooses the training method (methods.METHODS); `rewards:` are GRPO's (rewards.py)
TOP_KEYS = ("trainer", *SECTIONS, "rewards")
REQUIRED_SECTIONS = {  # each with the smallest useful example, for the error that misses it
    "model": "Add the model to tune, e.g. model: {id: facebook/opt-350m}.",
    "data": "Add the training data, e.g. data: {train: data/train.jsonl}.",
    "training": "Add where the run is written, e.g. training: {output_dir: runs/my-run}.",
}
# TRL config keys that lora-tune sets itself from the `data` and `model` sections (two places
# for one setting would let them disagree), and secrets, which must not be saved with the run.
OWNED_TRAINING_KEYS = {
    "max_length": "set data.max_length instead",
    "model_init_kwargs": "lora-tune loads the model: set its options in the model section",
    "dataset_text_field": "set data.text_field instead",
    "completion_only_loss": "set data.train_on_prompt instead (false trains completions only)",
    "assistant_only_loss": "set data.train_on_prompt instead",
    "dataset_kwargs": "lora-tune tokenizes the data itself; describe it in the data section",
    "packing": "set data.packing instead",
    "padding_free": "set data.padding_free instead",
    "hub_token": "never put a token in a recipe, where it would be saved with the run; "
    "set the HF_TOKEN environment variable instead",
    "reward_weights": "give each entry of the rewards section its weight instead",
}

# Keys of the `lora` section that lora-tune handles itself, beside the chosen PEFT config's fields.
LORA_OPTIONS = {
    "method": " or ".join(
        f"{name} ({method.description})" for name, method in LORA_METHODS.items()
    ),
    "loraplus_lr_ratio": "LoRA+: learning rate of the B matrices over that of A, e.g. 16 "
    "(peft's create_loraplus_optimizer)",
    "loraplus_lr_embedding": "LoRA+: learning rate of LoRA on embedding layers (default 1e-6)",
}

# Counts that TrainingArguments accepts at zero or below, and then divides by (batch 0), crashes on
# later (eval batch 0, num_workers -1) or silently trains nothing with (0 epochs): key -> (bound, fix).
TRAINING_BOUNDS = {
    "per_device_train_batch_size": (Field(gt=0), "Samples per device and step, e.g. 8"),
    "per_device_eval_batch_size": (Field(gt=0), "Samples per device and eval step, e.g. 8"),
    "gradient_accumulation_steps": (
        Field(gt=0),
        "Batches per optimizer step; 1 (the default) updates after every batch",
    ),
    "eval_accumulation_steps": (
        Field(gt=0),
        "Eval steps kept on the device before moving outputs to the CPU, e.g. 4",
    ),
    "num_train_epochs": (
        Field(gt=0),
        "Passes over the training data, e.g. 3 (fractions such as 0.5 work)",
    ),
    "max_steps": (
        Field(gt=0),
        "Optimizer steps to train; -1 (the default) trains num_train_epochs instead",
    ),
    "save_steps": (
        Field(gt=0),
        "Steps between checkpoints, or a fraction of the run below 1, e.g. 0.25",
    ),
    "logging_steps": (
        Field(gt=0),
        "Steps between log lines, or a fraction of the run below 1, e.g. 0.1",
    ),
    "eval_steps": (
        Field(gt=0),
        "Steps between evaluations, or a fraction of the run below 1; default: logging_steps",
    ),
    "dataloader_num_workers": (
        Field(ge=0),
        "Data loading processes; 0 (the default) loads in the main process",
    ),
}
# per_device_train_batch_size: auto picks the largest batch the memory estimate fits.
AUTO_BATCH = "auto"
# Values of those keys that transformers reads as "not set" rather than as a count.
TRAINING_UNSET = {"max_steps": -1}

# A real recipe is a few kilobytes: this only stops a runaway file.
MAX_RECIPE_BYTES = 1_000_000
YAML_FIX = "indent with spaces (never tabs) and quote values containing ':' or '#'"

ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
ALPACA_PROMPT_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"
FormatName = Literal[("auto", *FORMATS)]  # data.format: auto, or a format of formats.FORMATS


class Quantization(BaseModel):
    """model.quantization: load the base through bitsandbytes, as QLoRA does."""

    model_config = ConfigDict(extra="forbid")

    bits: Literal[4, 8] = Field(description="4 (QLoRA) or 8.")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    double_quant: bool = Field(
        True,
        description="Also quantize the 4-bit scaling constants (about 0.4 bits per weight saved).",
    )
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="dtype of the 4-bit layers' matmuls; auto follows model.dtype."
    )


class ModelSection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(description="Hub id (facebook/opt-350m) or local model directory.")
    revision: str | None = Field(None, description="Hub branch, tag or commit.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Weight dtype; auto = bfloat16 on GPUs that support it, float16 on other GPUs, float32 on CPU.",
    )
    trust_remote_code: bool = Field(
        False, description="Allow the model repository's own Python code to run."
    )
    allow_pickle: bool = Field(
        False,
        description="Allow pickle-based .bin weights, which can run code when loaded; "
        "default: safetensors only.",
    )
    attn_implementation: str | None = Field(
        None, description="eager, sdpa or flash_attention_2; default: transformers' choice."
    )
    quantization: Quantization | None = Field(
        None,
        description="Load the base quantized with bitsandbytes (QLoRA): {bits: 4} or {bits: 8}.",
    )
    adapter: str | None = Field(
        None,
        description="Start from this adapter (a run or adapter directory) and train it on; "
        "the lora settings are then the adapter's.",
    )


class Source(BaseModel):
    """One data source with its own hub settings (an entry of a data.train or data.eval list)."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="Hub dataset name, or a local file or folder.")
    subset: str | None = Field(None, description="Hub dataset configuration name.")
    split: str | None = Field(
        None, description="Split to read; default: data.split (data.eval_split for eval)."
    )
    revision: str | None = Field(None, description="Hub dataset branch, tag or commit.")


class DataSection(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    train: str | list[str | Source] = Field(
        description="Hub dataset name, local .jsonl/.json/.csv/.parquet/.txt file or folder, or a list of them."
    )
    eval: str | list[str | Source] | None = Field(
        None, description="Held-out data, same kinds of source as train."
    )
    eval_fraction: float | None = Field(
        None, gt=0, lt=1, description="Hold out this fraction of train instead."
    )
    subset: str | None = Field(None, description="Hub dataset configuration name.")
    split: str = Field("train", description="Hub dataset split to train on.")
    eval_split: str | None = Field(
        None, description="Hub dataset split to evaluate on (default: split)."
    )
    revision: str | None = Field(None, description="Hub dataset branch, tag or commit.")
    format: FormatName = Field(
        "auto",
        description="How rows become training text; auto detects it from each source's columns.",
    )
    text_field: str = Field("text", description="Column holding the text (format: text).")
    prompt_field: str = Field(
        "prompt",
        description="Column holding the prompt (formats: prompt_completion, preference, "
        "unpaired, prompt_only).",
    )
    completion_field: str = Field(
        "completion", description="Column holding the completion (format: prompt_completion)."
    )
    messages_field: str = Field(
        "messages", description="Column holding the chat turns (format: messages)."
    )
    chosen_field: str = Field(
        "chosen", description="Column holding the preferred answer (format: preference)."
    )
    rejected_field: str = Field(
        "rejected", description="Column holding the rejected answer (format: preference)."
    )
    label_field: str = Field(
        "label", description="Column saying whether the completion is good (format: unpaired)."
    )
    chat_template: str | None = Field(
        None,
        description="Jinja chat template for messages, when the tokenizer has none or to replace its own.",
    )
    prompt_template: str = Field(
        ALPACA_PROMPT, description="Alpaca prompt, with {instruction} and {input}."
    )
    prompt_template_no_input: str = Field(
        ALPACA_PROMPT_NO_INPUT, description="Alpaca prompt for rows with an empty input."
    )
    train_on_prompt: bool = Field(
        False,
        description="Also train on prompts and user turns (default: completions and "
        "assistant turns only).",
    )
    add_tokens: list[str] = Field(
        [],
        description="Tokens to add to the vocabulary; their embedding and output rows "
        "are trained and saved with the adapter.",
    )
    add_special_tokens: list[str] = Field(
        [],
        description="Special tokens to add (never split, such as chat markers); trained "
        "and saved like add_tokens.",
    )
    max_length: int = Field(
        512, ge=8, description="Tokens per sample; longer samples are truncated (and counted)."
    )
    packing: bool = Field(
        False, description="Pack samples into max_length rows; samples never attend to each other."
    )
    padding_free: bool | None = Field(
        None,
        description="Train each batch as one row without padding, position ids keeping samples apart. "
        "Default: on with flash attention (model.attn_implementation) where the model supports it.",
    )
    seed: int = Field(42, description="Seed of the eval_fraction split.")

    @model_validator(mode="after")
    def _one_eval_source(self):
        if self.eval is not None and self.eval_fraction is not None:
            raise ValueError("set either data.eval or data.eval_fraction, not both")
        return self


@dataclasses.dataclass
class Recipe:
    model: ModelSection
    data: DataSection
    lora: dict[str, Any]
    training: dict[str, Any]
    source: str = "<recipe>"
    trainer: str = DEFAULT  # a key of methods.METHODS
    rewards: list[Reward] = dataclasses.field(default_factory=list)  # grpo's, checked

    @property
    def output_dir(self) -> Path:
        return Path(self.training["output_dir"])

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe as plain YAML-able data (recipes hold no secrets: hub_token is refused)."""
        method = {} if self.trainer == DEFAULT else {"trainer": self.trainer}
        rewards = {"rewards": [r.entry() for r in self.rewards]} if self.rewards else {}
        return (
            method
            | {
                "model": self.model.model_dump(exclude_defaults=True),
                "lora": self.lora,
                "data": self.data.model_dump(exclude_defaults=True, exclude_none=True),
                "training": self.training,
            }
            | rewards
        )

    def save(self, path: Path) -> None:
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def load(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read a recipe file, apply `--set` overrides and validate everything.

    Raises UserError listing every problem found.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"Recipe file not found: {path}", ["check the path; recipes/ holds ready examples"]
        )
    size = path.stat().st_size
    if size > MAX_RECIPE_BYTES:
        raise UserError(
            f"{path}: {size:,} bytes; a recipe is a few kilobytes (at most {MAX_RECIPE_BYTES:,} bytes)",
            ["keep data in data files named by data.train and data.eval, not in the recipe"],
        )
    try:
        raw = parse_yaml(path.read_bytes())
    except Refused as exc:
        raise exc.user_error(str(path)) from None
    except yaml.reader.ReaderError as exc:  # bytes that are not text: no line to name
        raise UserError(
            f"{path}: not UTF-8 text: {exc.reason} at byte {exc.position}",
            ["save the recipe as UTF-8 text"],
        ) from None
    except yaml.YAMLError as exc:
        raise UserError(
            f"{where(str(path), exc)}: the recipe is not valid YAML: {yaml_problem(exc)}",
            [YAML_FIX],
        ) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(
            f"{path}: a recipe is a mapping with sections {', '.join(SECTIONS)}; got {type(raw).__name__}",
            ["start from a recipe in recipes/: top-level keys model:, lora:, data: and training:"],
        )
    apply_overrides(raw, overrides)
    return validate(raw, source=str(path))


def apply_overrides(raw: dict, overrides: list[str]) -> None:
    """Apply `key.path=value` overrides in place; values are parsed as YAML (1e-4, true, [a, b])."""
    for item in overrides:
        key, sep, value = item.partition("=")
        shown = _shown(item)
        if not sep or not key:
            raise UserError(
                f"--set {shown}: expected KEY.PATH=VALUE",
                ["for example: --set training.learning_rate=1e-4"],
            )
        parts = key.strip().split(".")
        node = raw
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UserError(f"--set {shown}: {_cut('.'.join(parts[: i + 1]))} is not a section")
            node = child
        node[parts[-1]] = _parse_value(value, key.strip(), shown)


def _parse_value(text: str, key: str, shown: str) -> Any:
    """A `--set` value read as YAML, as strictly as a recipe; text that is not YAML stays text."""
    try:
        return parse_yaml(text, root=_cut(key)) if text.strip() else ""
    except Refused as exc:
        raise exc.user_error(f"--set {shown}") from None
    except yaml.YAMLError:
        return text


def validate(raw: dict, source: str = "<recipe>") -> Recipe:
    """Check every section; raise one UserError naming every problem, or return the Recipe."""
    problems: list[str] = []
    for key in raw:
        if key not in TOP_KEYS:
            name = _cut(str(key))
            problems.append(
                f"{name}: unknown section.{did_you_mean(name, TOP_KEYS)} Valid sections: {', '.join(SECTIONS)}."
            )
    trainer = _check_trainer(raw.get("trainer", DEFAULT), problems)
    for key, example in REQUIRED_SECTIONS.items():
        if key not in raw:
            problems.append(f"{key}: required section missing. {example}")
    sections = {}
    for key in SECTIONS:
        value = raw.get(key)
        if value is None:
            value = {}
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a mapping of keys, got {type(value).__name__}.")
            value = {}
        sections[key] = value

    model = (
        _pydantic_section("model", ModelSection, sections["model"], problems)
        if "model" in raw
        else None
    )
    data = (
        _pydantic_section("data", DataSection, sections["data"], problems)
        if "data" in raw
        else None
    )
    lora = _check_lora(sections["lora"], problems)
    training = _check_training(sections["training"], problems, "training" in raw, trainer)
    if data is not None:
        _check_data_for(trainer, data, problems)
    base = Path(source).parent if source != "<recipe>" else Path.cwd()
    rewards = check_rewards(raw.get("rewards"), trainer, base, problems)
    init = str(lora.get("init_lora_weights", "")).lower()
    if trainer != DEFAULT and init in ("corda", "eva"):
        problems.append(
            f"lora.init_lora_weights: {init} calibrates on tokenized SFT samples; with trainer "
            f"{trainer}, train the adapter with trainer: sft first and start from it (model.adapter)."
        )
    if problems:
        n = len(problems)
        raise UserError(f"{source}: {n} problem{'s' if n > 1 else ''} in the recipe:", problems)
    return Recipe(model, data, lora, training, source, trainer, rewards)


def _check_trainer(value: Any, problems: list[str]) -> str:
    if isinstance(value, str) and value in METHODS:
        return value
    choices = "\n".join(f"  {name}: {method.description}" for name, method in METHODS.items())
    hint = did_you_mean(_cut(value), METHODS) if isinstance(value, str) else ""
    problems.append(
        f"trainer: unknown training method {_shown(value)}.{hint} Choose one of:\n{choices}"
    )
    return DEFAULT


def _check_data_for(trainer: str, data: DataSection, problems: list[str]) -> None:
    """Data settings the method cannot use: a format of another method, packing for pairs."""
    method = METHODS[trainer]
    if data.format != "auto" and not method.accepts(data.format):
        users = [name for name, other in METHODS.items() if other.accepts(data.format)]
        problems.append(
            f"data.format: {data.format} data trains with trainer: {' or '.join(users)}; trainer "
            f"{trainer} trains on {', '.join(method.formats)} data."
        )
    if method.data != "sft" and (data.packing or data.padding_free):
        key = "packing" if data.packing else "padding_free"
        problems.append(
            f"data.{key}: trainer {trainer} scores whole prompt/answer sequences; remove data.{key}."
        )


def _pydantic_section(name: str, schema: type[BaseModel], values: dict, problems: list[str]):
    try:
        return schema(**values)
    except ValidationError as exc:
        for err in exc.errors():
            path = ".".join([name, *(_cut(str(p)) for p in err["loc"])]) if err["loc"] else name
            if err["type"] == "extra_forbidden":
                hint = did_you_mean(_cut(str(err["loc"][-1])), schema.model_fields)
                problems.append(
                    f"{path}: unknown key.{hint or ' Valid keys: ' + ', '.join(schema.model_fields) + '.'}"
                )
            elif err["type"] == "missing":
                problems.append(
                    f"{path}: required key missing. {schema.model_fields[err['loc'][-1]].description}"
                )
            else:
                problems.append(f"{path}: {_pydantic_message(err)}; got {_shown(err['input'])}.")
    return None


def _pydantic_message(err: dict) -> str:
    msg = err["msg"]
    return msg[len("Value error, ") :] if msg.startswith("Value error, ") else msg


def _check_fields(
    section: str, values: dict, cls: type, problems: list[str], own_keys: tuple[str, ...] = ()
) -> tuple[dict, bool]:
    """Check keys and value types against a config dataclass: (values that fit, all fitted).
    `own_keys` are lora-tune's keys of the section, offered for misspellings too."""
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    coerced, ok = {}, True
    for key, value in values.items():
        if key not in fields:
            name = _cut(str(key))
            problems.append(
                f"{section}.{name}: unknown key.{did_you_mean(name, fields | set(own_keys))} "
                f"{section} accepts the fields of {cls.__module__.split('.')[0]}.{cls.__name__}."
            )
            ok = False
            continue
        try:
            converted = TypeAdapter(hints[key]).validate_python(value)
            if _non_finite(converted):
                problems.append(
                    f"{section}.{key}: expected a finite number, got {_shown(value)}. {NON_FINITE_FIX}"
                )
                ok = False
                continue
            # Keep the user's own spelling where it already fits (10, not 10.0, for a float field).
            # Sub-configs (eva_config: {rho: 2}) stay plain data, for the saved recipe.
            coerced[key] = (
                value if converted == value or dataclasses.is_dataclass(converted) else converted
            )
        except ValidationError:
            if _fills_placeholder(hints[key], value):
                coerced[key] = value
                continue
            hint = (
                ' YAML reads a bare no/yes/off/on as false/true: quote it, e.g. "no".'
                if isinstance(value, bool)
                else ""
            )
            problems.append(
                f"{section}.{key}: expected {_type_name(hints[key])}, got {_shown(value)}.{hint}"
            )
            ok = False
        except Exception:  # a type pydantic cannot describe: leave it to the real constructor
            coerced[key] = value
    return coerced, ok


NON_FINITE_FIX = "YAML reads .inf, .nan and numbers beyond about 1e308 as infinite or not a number."


def _non_finite(value: Any) -> bool:
    """Whether a value is or holds inf or nan: no setting means them, and as a count, a rate or a
    probability they overflow where transformers rounds them, or poison every weight."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        value = list(value.values())
    return isinstance(value, (list, tuple)) and any(map(_non_finite, value))


def _fills_placeholder(hint: Any, value: Any) -> bool:
    """Whether a string fills a Literal option written with a placeholder, e.g. 'pissa_niter_4'
    for PEFT's 'pissa_niter_[number of iters]' (the constructor checks the rest)."""
    options = [
        arg
        for union in typing.get_args(hint) or [hint]
        if typing.get_origin(union) is Literal
        for arg in typing.get_args(union)
    ]
    return isinstance(value, str) and any(
        isinstance(o, str)
        and "[" in o
        and re.fullmatch(re.sub(r"\\\[.*?\]", ".+", re.escape(o)), value)
        for o in options
    )


SIMPLE_TYPES = {
    "float": "a number",
    "int": "an integer",
    "bool": "true or false",
    "str": "a string",
}


def _type_name(hint: Any, top: bool = True) -> str:
    """A readable type: 'a number', 'str | list[str] | None', 'SchedulerType | str'."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(arg, top=False) for arg in typing.get_args(hint))
    if typing.get_origin(hint) is Literal:
        return " | ".join(repr(arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return "None"
    text = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
    text = re.sub(r"\b(?:[A-Za-z_]\w*\.)+([A-Za-z_]\w*)", r"\1", text)
    return SIMPLE_TYPES.get(text, text) if top else text


def _blame(section: str, values: dict, message: str) -> str:
    """The key path a constructor's error message is about: a key it names, else a value it quotes."""
    for key in values:
        if re.search(rf"(?<![\w]){re.escape(key)}(?![\w])", message):
            return f"{section}.{key}"
    for key, value in values.items():
        if (
            isinstance(value, (str, int, float))
            and not isinstance(value, bool)
            and len(str(value)) > 2
            and str(value) in message
        ):
            return f"{section}.{key}"
    return section


def _check_lora(values: dict, problems: list[str]) -> dict:
    before = len(problems)
    method = values.get("method", "lora")
    if method not in LORA_METHODS:
        problems.append(
            f"lora.method: expected one of {', '.join(LORA_METHODS)}, got {_shown(method)}."
        )
        method = "lora"
    options = {key: values[key] for key in LORA_OPTIONS if key in values}
    for key in ("loraplus_lr_ratio", "loraplus_lr_embedding"):
        value = options.get(key)
        if value is not None and (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not 0 < value < math.inf
        ):  # nan fails both comparisons
            problems.append(
                f"lora.{key}: expected a positive number, got {_shown(value)}. {LORA_OPTIONS[key]}."
            )
    fields = {key: value for key, value in values.items() if key not in LORA_OPTIONS}
    coerced, ok = _check_fields(
        "lora", fields, lora_config_class(method), problems, tuple(LORA_OPTIONS)
    )
    r = coerced.get("r", 8)
    if r <= 0:
        problems.append(
            f"lora.r: the rank must be a positive integer, got {_shown(r)}. Typical values: 8, 16, 64."
        )
    alpha = coerced.get("lora_alpha", 8)
    if alpha <= 0:
        problems.append(
            f"lora.lora_alpha: must be positive, got {_shown(alpha)}. A common choice is 2 * r."
        )
    dropout = coerced.get("lora_dropout", 0.0)
    if not 0 <= dropout < 1:
        problems.append(
            f"lora.lora_dropout: must be in [0, 1), got {_shown(dropout)}. Typical values: 0 to 0.1."
        )
    coerced = options | coerced
    if coerced.get("init_lora_weights") == "loftq":
        problems.append(
            "lora.init_lora_weights: loftq fits the adapter to a base that is quantized afterwards, "
            "so it cannot be evaluated or merged against the model as loaded. For QLoRA set "
            "model.quantization; for an SVD-based start use pissa."
        )
    if ok and len(problems) == before:
        try:
            build_lora_config(
                coerced, total_step=10**9
            )  # AdaLoRA's real step count is known at planning
        except (ValueError, TypeError) as exc:
            problems.append(
                f"{_blame('lora', coerced, str(exc))}: {_library_message(exc, coerced)}"
            )
    return coerced


def _check_training(
    values: dict, problems: list[str], present: bool, trainer: str = DEFAULT
) -> dict:
    before = len(problems)
    owned = {key: fix for key, fix in OWNED_TRAINING_KEYS.items() if key in owned_keys(trainer)}
    for key, fix in owned.items():
        if key in values:
            problems.append(f"training.{key}: not set here; {fix}.")
    values = {k: v for k, v in values.items() if k not in owned}
    _check_kto_batch(values, trainer, problems)
    _check_grpo_batch(values, trainer, problems)
    values = _fields_of_other_methods(values, trainer, problems)
    _check_method_defaults(values, trainer, problems)
    auto = values.get("per_device_train_batch_size") == AUTO_BATCH
    if auto:  # chosen from the memory estimate when the run is planned
        values = {k: v for k, v in values.items() if k != "per_device_train_batch_size"}
    config_class = METHODS[trainer].config_class()
    coerced, ok = _check_fields("training", values, config_class, problems)
    _check_bounds(coerced, problems)
    if present and not coerced.get("output_dir") and "output_dir" not in values:
        problems.append(
            "training.output_dir: required key missing. Where the run is written, e.g. runs/my-run."
        )
    if ok and len(problems) == before and present:
        try:
            build_training_config(trainer, coerced, max_length=512)
        except (ValueError, TypeError) as exc:
            problems.append(
                f"{_blame('training', coerced, str(exc))}: {_library_message(exc, coerced)}"
            )
    return coerced | ({"per_device_train_batch_size": AUTO_BATCH} if auto else {})


def owned_keys(trainer: str) -> set[str]:
    """The training keys lora-tune sets itself for this trainer: the data section's own keys
    only for sft (the preference configs keep theirs), the reward weights for grpo."""
    everywhere = {"max_length", "model_init_kwargs", "hub_token"}
    if trainer == "grpo":
        return everywhere | {"reward_weights"}
    return set(OWNED_TRAINING_KEYS) - {"reward_weights"} if trainer == DEFAULT else everywhere


GRPO_BATCH = 8  # GRPOConfig's per_device_train_batch_size and num_generations defaults


def _check_grpo_batch(values: dict, trainer: str, problems: list[str]) -> None:
    """GRPO generates the completions of several steps at once (gradient_accumulation_steps of
    them, unless steps_per_generation or generation_batch_size says otherwise), in whole groups
    of num_generations per prompt: batch size auto could not keep whole groups."""
    if trainer != "grpo":
        return
    batch = values.get("per_device_train_batch_size", GRPO_BATCH)
    if batch == AUTO_BATCH:
        problems.append(
            "training.per_device_train_batch_size: auto is not available with trainer grpo (each "
            "batch of completions holds whole groups of num_generations); set a multiple of "
            "training.num_generations."
        )
        return
    group = values.get("num_generations", GRPO_BATCH)
    steps = values.get("steps_per_generation") or values.get("gradient_accumulation_steps", 1)
    counts = (batch, group, steps)
    if "generation_batch_size" in values or not all(isinstance(n, int) and n > 0 for n in counts):
        return  # TRL's own check says what is wrong
    if group > 1 and batch * steps % group:
        key = (
            "steps_per_generation"
            if "steps_per_generation" in values
            else "gradient_accumulation_steps"
        )
        problems.append(
            f"training.per_device_train_batch_size: GRPO generates {batch} x {steps} completions "
            f"at a time (per_device_train_batch_size x {key}), not whole groups of "
            f"num_generations ({group}) per prompt; set it to a multiple of {group}, or "
            f"num_generations to a divisor of {batch * steps} (2 or more)."
        )


def _check_kto_batch(values: dict, trainer: str, problems: list[str]) -> None:
    """KTO compares each batch with mismatched pairs of its own rows: one row is not enough."""
    batch = values.get("per_device_train_batch_size")
    if trainer == "kto" and batch == 1 and values.get("loss_type") != "apo_zero_unpaired":
        problems.append(
            "training.per_device_train_batch_size: trainer kto needs at least 2 rows per device "
            "and step (its KL term pairs each completion with another row's prompt); got 1."
        )


def _fields_of_other_methods(values: dict, trainer: str, problems: list[str]) -> dict:
    """Report keys that only other methods' configs have (beta in an sft recipe), saying which
    trainer has them; return the other keys."""
    own = {f.name for f in dataclasses.fields(METHODS[trainer].config_class())}
    kept = {}
    for key, value in values.items():
        owners = [
            name
            for name, method in METHODS.items()
            if name != trainer
            and key not in own
            and key in {f.name for f in dataclasses.fields(method.config_class())}
        ]
        if not owners:
            kept[key] = value
            continue
        config = METHODS[trainer].config
        problems.append(
            f"training.{key}: unknown key. {key} is a setting of trainer: {', '.join(owners)} "
            f"(set trainer: {owners[0]} to train with it). training accepts the fields of trl.{config}."
        )
    return kept


def _check_method_defaults(values: dict, trainer: str, problems: list[str]) -> None:
    """A value that would make the method another one (loss_type: sigmoid with trainer simpo)."""
    for key, value in METHODS[trainer].defaults.items():
        if key == "loss_type" and key in values and values[key] != value:
            problems.append(
                f"training.loss_type: trainer {trainer} is loss_type {value}, got {_shown(values[key])}. "
                "Remove training.loss_type, or choose the trainer of that loss."
            )


def _check_bounds(training: dict, problems: list[str]) -> None:
    """Refuse counts of zero or below (TRAINING_BOUNDS), checked with the bounds pydantic words."""
    for key, (bound, fix) in TRAINING_BOUNDS.items():
        value = training.get(key)
        if value is None or isinstance(value, bool) or value == TRAINING_UNSET.get(key):
            continue
        try:
            TypeAdapter(Annotated[float, bound]).validate_python(value)
        except ValidationError as exc:
            problems.append(
                f"training.{key}: {exc.errors()[0]['msg']}; got {_shown(value)}. {fix}."
            )


def _library_message(exc: Exception, values: dict) -> str:
    """A PEFT or TRL constructor's error on one line, with the long values it quotes cut."""
    text = " ".join(str(exc).split())
    for value in values.values():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str) and len(item) > SHOWN_CHARS:
                text = text.replace(item, _cut(item))
    return _cut(text, 600)


def lora_config_class(method: str) -> type:
    import peft

    return getattr(peft, LORA_METHODS[method].config)


def build_lora_config(lora: dict, total_step: int | None = None):
    """The PEFT config of a recipe's `lora` section: peft.LoraConfig, or peft.AdaLoraConfig for
    `method: adalora`, whose total_step defaults to the run's step count. task_type defaults to CAUSAL_LM."""
    method = lora.get("method", "lora")
    fields = {"task_type": "CAUSAL_LM"} | {k: v for k, v in lora.items() if k not in LORA_OPTIONS}
    if LORA_METHODS[method].total_step and total_step is not None:
        fields.setdefault("total_step", total_step)
    return lora_config_class(method)(**fields)


def build_training_config(trainer: str, training: dict, max_length: int | None, **extra):
    """The TRL config (SFTConfig, DPOConfig, ...) of a recipe's `training` section for its
    trainer, hardware defaults and the method's own values filled in.

    TRL's own defaults (bf16 autocast, gradient checkpointing) are wrong for many machines, so
    precision and checkpointing follow the hardware unless the recipe sets them.
    """
    from .hardware import hardware_training_defaults

    method = METHODS[trainer]
    if training.get("per_device_train_batch_size") == AUTO_BATCH:  # the plan sets it
        training = training | {"per_device_train_batch_size": 1}
    config_class = method.config_class()
    kwargs = hardware_training_defaults(training) | method.defaults | training
    if "max_length" in {f.name for f in dataclasses.fields(config_class)}:  # GRPOConfig has none
        kwargs["max_length"] = max_length
    kwargs |= extra
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return config_class(**kwargs)
