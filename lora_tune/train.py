"""`lora-tune train`: recipe -> checked plan -> TRL trainer (SFT, DPO, ...) with LoRA -> run directory."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import json
import math
import os
import re
import resource
import shutil
import statistics
import tempfile
import time
import typing
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from rich.markup import escape
from rich.table import Table
from transformers import TrainerCallback

from . import adapters, data, hardware, memory, models, output, ownership, runs
from .common import batches
from .errors import UserError
from .methods import METHODS, Method
from .recipe import Recipe, build_lora_config, build_training_config

if TYPE_CHECKING:
    from datasets import Dataset
    from peft import PeftConfig
    from transformers import PreTrainedTokenizerBase, TrainingArguments

console = output.console()


@dataclass
class TrainingPlan:
    """Everything checked before a weight loads; the PEFT and TRL configs are built once, here."""

    recipe: Recipe
    lora_config: PeftConfig
    training_config: TrainingArguments
    tokenizer: PreTrainedTokenizerBase
    train: Dataset
    eval: Dataset | None
    trainable: int
    total: int
    steps: int
    data_stats: dict[str, dict]
    new_tokens: list[int]  # ids of data.add_tokens / add_special_tokens
    start: Path | None = None  # the adapter that model.adapter names, trained on
    memory: memory.Estimate | None = None  # the step's estimated peak, per process
    capacity: int | None = None  # bytes a process may use (--memory, the GPU's, or free RAM)
    advice: list[tuple[str, int]] = dataclasses.field(default_factory=list)  # (change, peak)
    baseline: int = 0  # resident bytes before the model loaded (what CPU peaks are measured from)

    @property
    def method(self) -> Method:
        return METHODS[self.recipe.trainer]


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_output_dir(path: Path) -> None:
    """Raise UserError when the run directory cannot be written; leave nothing behind.

    Writes and removes a probe file in the nearest existing folder, which also catches
    read-only and full filesystems (where permission bits alone say nothing, e.g. for root).
    """
    if path.exists() and not path.is_dir():
        raise UserError(
            f"training.output_dir: {path} exists and is a file", ["choose a directory path"]
        )
    parent = path
    while not parent.exists():
        parent = parent.parent
    try:
        if not parent.is_dir():
            raise NotADirectoryError(f"{parent} is a file")
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".lora-tune-probe-") as probe:
            probe.write(b"\0" * 4096)
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as exc:
        raise UserError(
            f"training.output_dir: cannot write {path}: {exc.strerror or exc}",
            ["choose a directory on a writable disk with free space, or fix its permissions"],
        ) from None


def make_plan(recipe: Recipe, capacity: int | None = None, resume: str = "auto") -> TrainingPlan:
    """Validate the recipe against the model's config and the data; load no weights.
    `capacity`: the memory a process may use (default: the GPU's, or the RAM free now);
    `resume`: as `train --resume` (a resumed run keeps the batch size auto chose)."""
    check_output_dir(recipe.output_dir)
    skeleton = check_model(recipe)
    start = adapters.starting_adapter(recipe.model, recipe.lora, skeleton)
    check_start_for(METHODS[recipe.trainer], start, recipe.training)
    tokenizer, new_tokens = plan_tokenizer(recipe, start)
    models.fit_vocabulary(skeleton, tokenizer)
    padding_free = choose_padding_free(recipe, skeleton)
    train, evaluation, data_stats = load_data(recipe, tokenizer)
    training_config = training_config_for(recipe, padding_free)
    check_generation(training_config)
    if training_config.eval_strategy != "no" and evaluation is None:
        raise UserError(
            f"training.eval_strategy: {training_config.eval_strategy.value} evaluation needs eval data",
            ["set data.eval or data.eval_fraction, or remove training.eval_strategy"],
        )
    steps = count_steps(recipe, training_config, len(train), data_stats["train"].lengths)
    if start:
        lora_config = adapters.starting_config(start)
    else:
        lora_config = lora_config_for(recipe, steps)
        models.train_token_rows(lora_config, skeleton, new_tokens)
    trainable, total = models.count_trainable(skeleton, lora_config)
    lengths = data_stats["train"].lengths
    capacity = capacity or hardware.memory_size(gpu=not training_config.use_cpu)
    if recipe.training.get("per_device_train_batch_size") == AUTO:
        training_config.per_device_train_batch_size = resumed_batch(
            recipe, resume
        ) or largest_batch(recipe, skeleton, training_config, lengths, trainable, capacity)
        steps = count_steps(recipe, training_config, len(train), lengths)
        if not start:  # AdaLoRA schedules its ranks over the steps
            lora_config = lora_config_for(recipe, steps)
            models.train_token_rows(lora_config, skeleton, new_tokens)
    estimate, capacity, advice = plan_memory(
        recipe, skeleton, training_config, lengths, trainable, capacity
    )
    return TrainingPlan(
        recipe,
        lora_config,
        training_config,
        tokenizer,
        train,
        evaluation,
        trainable,
        total,
        steps,
        {name: stats.summary() for name, stats in data_stats.items()},
        new_tokens,
        start,
        estimate,
        capacity,
        advice,
    )


AUTO = "auto"  # training.per_device_train_batch_size: auto
AUTO_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def largest_batch(recipe: Recipe, skeleton, args, lengths, trainable: int, capacity) -> int:
    """per_device_train_batch_size: auto: the largest of AUTO_BATCHES (no more than the data's
    rows) whose estimated peak fits the memory with room to spare; the smallest (1, KTO 2)
    where none does."""
    shape = memory.shape_of(skeleton)
    longest, rows = row_lengths(recipe, lengths)
    setting = memory_setting(recipe, args, longest, trainable)
    chosen = smallest_batch(recipe)
    for batch in AUTO_BATCHES[AUTO_BATCHES.index(chosen) + 1 :]:
        peak = memory.estimate(shape, dataclasses.replace(setting, batch=batch)).total
        if batch > max(rows, 1) or (capacity and peak > memory.TIGHT * capacity):
            break
        chosen = batch
    return chosen


def resumed_batch(recipe: Recipe, resume: str) -> int | None:
    """The batch size of the checkpoint a run resumes from: batch size auto chose it when the run
    started, and the rest of the run keeps it, whatever memory this machine has."""
    if resume == "never":
        return None
    checkpoint = runs.latest_checkpoint(recipe.output_dir) if resume == "auto" else Path(resume)
    state = checkpoint / "trainer_state.json" if checkpoint else None
    if state is None or not state.is_file():
        return None
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return json.loads(state.read_text()).get("train_batch_size")
    return None


def smallest_batch(recipe: Recipe) -> int:
    """KTO compares each batch with mismatched pairs of itself: it needs two rows at least."""
    return 2 if recipe.trainer == "kto" else 1


def row_lengths(recipe: Recipe, lengths: list[int]) -> tuple[int, int]:
    """(tokens of the longest row, rows per epoch): packing fills rows of data.max_length."""
    if recipe.data.packing:
        return recipe.data.max_length, math.ceil(sum(lengths) / recipe.data.max_length)
    return max(lengths, default=1), len(lengths)


def plan_memory(recipe: Recipe, skeleton, args, lengths: list[int], trainable: int, capacity):
    """(estimated peak per process, the memory it has, advice where it does not fit)."""
    shape = memory.shape_of(skeleton)
    setting = memory_setting(recipe, args, row_lengths(recipe, lengths)[0], trainable)
    estimate = memory.estimate(shape, setting)
    advice = []
    if memory.verdict(estimate.total, capacity) != "fits":
        advice = memory_advice(shape, setting, lengths, smallest_batch(recipe))
    return estimate, capacity, advice


def memory_setting(recipe: Recipe, args, longest: int, trainable: int) -> memory.Setting:
    """How the step runs, for the memory estimate: batch, longest sequence, dtypes, method."""
    method = METHODS[recipe.trainer]
    device = "cpu" if args.use_cpu else "cuda"
    weights = models.resolve_dtype(recipe.model.dtype)
    half = args.bf16 or args.fp16 or weights.itemsize == 2
    quantized = recipe.model.quantization
    if method.data == "prompts":  # GRPO: each prompt with a completion sampled after it
        longest += args.max_completion_length
    return memory.Setting(
        batch=args.per_device_train_batch_size,
        length=longest,
        weight_bytes=weights.itemsize,
        activation_bytes=2 if half else 4,
        trainable=trainable,
        quantized_bits=quantized.bits if quantized else None,
        checkpointing=bool(args.gradient_checkpointing),
        optimizer=getattr(args.optim, "value", args.optim),
        # chosen and rejected; KTO's KL sequences run without gradients
        sequences_per_row=2 if method.data == "paired" else 1,
        fused_rows=memory.FUSED_ROWS[device] if method.reference else None,
        device=device,
        processes=world_size(),
        sharding=memory.sharding_from_environment(),
        eager_attention=recipe.model.attn_implementation == "eager",
    )


def memory_advice(shape: memory.Shape, setting: memory.Setting, lengths: list[int], least: int):
    """Changes that lower the peak, in the recipe's own keys, each with its estimated peak
    (the batch no smaller than `least`)."""
    replace = dataclasses.replace
    options = []
    if setting.batch // 2 >= least:
        half = setting.batch // 2
        change = (
            f"training.per_device_train_batch_size: {half} with gradient_accumulation_steps "
            "twice as high (the same effective batch)"
        )
        options.append((change, replace(setting, batch=half)))
    if not setting.checkpointing:
        options.append(
            ("training.gradient_checkpointing: true", replace(setting, checkpointing=True))
        )
    shorter = setting.length // 2
    if shorter >= 8:
        cut = sum(length > shorter for length in lengths)
        change = f"data.max_length: {shorter} (truncates {cut:,} of {len(lengths):,} samples)"
        options.append((change, replace(setting, length=shorter)))
    if setting.device == "cuda" and not setting.quantized_bits:
        options.append(
            ("model.quantization: {bits: 4} (QLoRA)", replace(setting, quantized_bits=4))
        )
    if setting.device == "cuda":
        more = replace(setting, processes=setting.processes * 2, sharding="fsdp")
        change = f"--num-processes {more.processes} --accelerate-config configs/fsdp.yaml"
        options.append((change, more))
    return [(change, memory.estimate(shape, s).total) for change, s in options]


def check_start_for(method: Method, start: Path | None, training: dict) -> None:
    """DPO and KTO (and GRPO with a KL term) hold their reference as a second adapter: AdaLoRA
    allows one trainable adapter only."""
    adalora = start and runs.adapter_config(start).get("peft_type") == "ADALORA"
    if adalora and method.has_reference(training):
        raise UserError(
            f"model.adapter: {start} is an AdaLoRA adapter; trainer {method.name} keeps its "
            "reference as a second adapter, which AdaLoRA does not allow",
            [
                f"merge it first (lora-tune merge) and train {method.name} on the merged model",
                "or start a new LoRA adapter: remove model.adapter",
            ],
        )


def plan_tokenizer(recipe: Recipe, start: Path | None):
    """(tokenizer, ids of added tokens): the starting adapter's tokenizer (its chat template and
    added tokens) when there is one, else the base's; data.add_tokens added."""
    if start is None:
        tokenizer = models.load_tokenizer(recipe.model)
    else:
        tokenizer = adapters.adapter_tokenizer(start, recipe.model)
    size = len(tokenizer)
    new_tokens = data.prepare_tokenizer(tokenizer, recipe.data, recipe.model.id)
    if start and len(tokenizer) > size:
        raise UserError(
            f"data.add_tokens: the starting adapter {start} has no rows for the new tokens "
            f"{tokenizer.convert_ids_to_tokens(list(range(size, len(tokenizer))))}",
            ["add the tokens in the run that trains the adapter first (remove model.adapter)"],
        )
    return tokenizer, new_tokens


def load_data(recipe: Recipe, tokenizer):
    """(train, eval or None, DataStats by split): tokenized samples for sft, rows in TRL's
    columns for the preference methods and grpo (their trainers tokenize them); grpo's rewards
    checked against the columns."""
    method = METHODS[recipe.trainer]
    if method.data == "sft":
        return data.load_datasets(recipe.data, tokenizer)
    if method.data != "prompts":
        from . import pairs

        return pairs.load_datasets(recipe.data, tokenizer, method)
    from . import prompts, rewards

    train, evaluation, stats = prompts.load_datasets(recipe.data, tokenizer, method)
    rewards.check_columns(recipe.rewards, train.column_names, "data.train", recipe.data.train)
    if evaluation is not None:
        spec = recipe.data.eval or recipe.data.train
        rewards.check_columns(recipe.rewards, evaluation.column_names, "data.eval", spec)
    return train, evaluation, stats


def check_generation(args) -> None:
    """GRPO's use_vllm needs vLLM installed and a CUDA GPU; say so before anything loads."""
    if not getattr(args, "use_vllm", False):
        return
    import importlib.util

    missing = []
    if importlib.util.find_spec("vllm") is None:
        missing.append("the vllm package is not installed (pip install vllm)")
    if not hardware.has_cuda() or args.use_cpu:
        missing.append("vLLM generates on CUDA GPUs, and this run has none")
    if missing:
        raise UserError(
            f"training.use_vllm: {'; '.join(missing)}",
            ["remove training.use_vllm to generate with transformers' generate"],
        )


def training_config_for(recipe: Recipe, padding_free: bool):
    """The TRL config of the recipe's trainer, built once."""
    if recipe.rewards:  # grpo: each reward's weight, in the order of the rewards section
        weights = [reward.weight for reward in recipe.rewards]
        return build_training_config(recipe.trainer, recipe.training, None, reward_weights=weights)
    if METHODS[recipe.trainer].data != "sft":
        return build_training_config(recipe.trainer, recipe.training, recipe.data.max_length)
    # Samples are truncated to max_length during tokenization; TRL refuses max_length with padding-free batches.
    max_length = None if padding_free and not recipe.data.packing else recipe.data.max_length
    return build_training_config(
        recipe.trainer,
        recipe.training,
        max_length,
        packing=recipe.data.packing,
        padding_free=padding_free,
    )


def check_model(recipe: Recipe):
    """The model as a meta-device skeleton (no weights), once its config, weights, quantization
    and the recipe's target modules are checked."""
    models.check_quantization(recipe.model)
    config = models.load_config(recipe.model)
    models.check_weights(recipe.model)
    skeleton = models.meta_model(config, recipe.model.trust_remote_code)
    models.check_target_modules(recipe.lora.get("target_modules"), skeleton, recipe.model.id)
    if recipe.data.packing or recipe.data.padding_free:
        models.check_packing(
            skeleton, recipe.model.id, "packing" if recipe.data.packing else "padding_free"
        )
    return skeleton


def choose_padding_free(recipe: Recipe, skeleton) -> bool:
    """data.padding_free, or its default: flash attention's variable-length kernels skip the
    padding's compute exactly. Elsewhere (SDPA, eager) a padding-free row needs a mask over the
    whole batch: twice as slow on CPU."""
    if recipe.data.padding_free is not None:
        return recipe.data.padding_free
    batch = recipe.training.get("per_device_train_batch_size", 8)
    return (
        "flash" in (recipe.model.attn_implementation or "")
        and (batch == AUTO or batch > 1)
        and models.keeps_samples_apart(skeleton)
    )


def count_steps(
    recipe: Recipe, training_config: TrainingArguments, rows: int, lengths: list[int]
) -> int:
    """Optimizer steps the run will take, over every process."""
    if training_config.max_steps > 0:
        return training_config.max_steps
    if METHODS[recipe.trainer].data == "prompts":
        return grpo_steps(training_config, rows)
    if recipe.data.packing:  # best-fit packing leaves about total tokens / max_length rows
        rows = math.ceil(sum(lengths) / recipe.data.max_length)
    per_step = (
        training_config.per_device_train_batch_size
        * training_config.gradient_accumulation_steps
        * world_size()
    )
    return math.ceil(rows / per_step) * math.ceil(training_config.num_train_epochs)


def grpo_steps(args, rows: int) -> int:
    """GRPO's optimizer steps: each generation batch holds whole groups of num_generations
    completions of generation_batch_size / num_generations prompts (a last, partial batch is
    dropped, as TRL's sampler drops it), and serves steps_per_generation x num_iterations
    micro-batches, gradient_accumulation_steps to an optimizer step."""
    prompts_per_generation = args.generation_batch_size // args.num_generations
    generations = rows // prompts_per_generation
    batches = generations * args.steps_per_generation * args.num_iterations
    return math.ceil(batches / args.gradient_accumulation_steps) * math.ceil(args.num_train_epochs)


def lora_config_for(recipe: Recipe, steps: int) -> PeftConfig:
    """The recipe's PEFT config, built once the run's length is known (AdaLoRA schedules its
    rank budget over the steps)."""
    try:
        return build_lora_config(recipe.lora, total_step=steps)
    except ValueError as exc:
        raise UserError(
            f"lora: {exc} (this run trains {steps} steps)",
            ["lower lora.tinit and lora.tfinal, or train for more steps"],
        ) from None


def print_plan(plan: TrainingPlan) -> None:
    table = Table(title="lora-tune plan", show_header=False)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")
    for name, value in plan_rows(plan):
        table.add_row(name, escape(value))  # a list of targets is not rich markup
    console.print(table)
    print_memory(plan)


def print_memory(plan: TrainingPlan) -> None:
    """The estimated peak per process, term by term, against the memory there is; and where it
    does not fit, the changes that would make it fit, each with its own peak."""
    estimate, capacity = plan.memory, plan.capacity
    table = Table(title="memory per process (estimate)", show_header=False)
    table.add_column(no_wrap=True)
    table.add_column(justify="right")
    for name, size in estimate.terms.items():
        table.add_row(name, memory.gib(size))
    table.add_row("peak", memory.gib(estimate.total), style="bold")
    verdict = memory.verdict(estimate.total, capacity)
    table.add_row("available", memory.gib(capacity) if capacity else "unknown")
    table.add_row("verdict", verdict, style="green" if verdict == "fits" else "bold red")
    console.print(table)
    for change, peak in plan.advice:
        console.print(f"  to lower it: {change} -> peak {memory.gib(peak)}")


def plan_rows(plan: TrainingPlan) -> list[tuple[str, str]]:
    """The plan's lines: what is trained, on what, how long, where."""
    args = plan.training_config
    targets = plan.lora_config.target_modules
    rows = {"sft": "samples", "paired": "pairs", "prompts": "prompts"}.get(plan.method.data, "rows")
    auto = ""
    if plan.recipe.training.get("per_device_train_batch_size") == AUTO:
        auto = "; batch size auto: the largest that fits"
    batching = (
        ", packed"
        if plan.recipe.data.packing
        else ", padding-free batches"
        if getattr(args, "padding_free", False)
        else ""
    )
    rows = [
        ("model", describe_model(plan.recipe.model)),
        ("trainer", describe_trainer(plan)),
        (
            "method",
            describe_method(plan.lora_config, plan.recipe.lora)
            + f", targets={layer_kinds(targets)}",
        ),
        (
            "trainable parameters",
            f"{plan.trainable:,} of {plan.total:,} ({100 * plan.trainable / plan.total:.3f}%)",
        ),
        (f"train {rows}", describe_data(plan.data_stats["train"], plan.recipe.data) + batching),
        (
            f"eval {rows}",
            describe_data(plan.data_stats["eval"], plan.recipe.data)
            if plan.eval is not None
            else "none",
        ),
        (
            "steps",
            (
                f"{plan.steps:,} (batch {args.per_device_train_batch_size} x accumulation "
                f"{args.gradient_accumulation_steps} x {world_size()} process(es){auto})"
            ),
        ),
        *reward_rows(plan),
        ("precision", hardware.precision_label(args)),
        ("device", "cpu" if args.use_cpu else "cuda"),
        ("output", str(plan.recipe.output_dir.resolve())),
    ]
    if plan.recipe.model.trust_remote_code:
        remote = "ALLOWED: the model repository's own Python code runs (model.trust_remote_code)"
        rows.insert(1, ("remote code", remote))
    return rows


def describe_trainer(plan: TrainingPlan) -> str:
    """'dpo (beta=0.1, loss_type=sigmoid), reference: the starting adapter ...'."""
    method, args = plan.method, plan.training_config
    settings = ", ".join(f"{key}={shown(getattr(args, key))}" for key in method.plan)
    text = method.name + (f" ({settings})" if settings else "")
    if plan.start:
        text += f", continuing {plan.start}"
    if method.has_reference(plan.recipe.training):
        text += (
            ", reference: the starting adapter, as a frozen second adapter on the same base"
            if plan.start
            else ", reference: the base with the adapter switched off"
        )
    elif method.reference_when:
        text += f", no reference ({method.reference_when}=0)"
    return text


def reward_rows(plan: TrainingPlan) -> list[tuple[str, str]]:
    """GRPO's plan lines: its rewards with their weights, and how completions are generated."""
    if not plan.recipe.rewards:
        return []
    args = plan.training_config
    engine = f"vLLM ({args.vllm_mode})" if args.use_vllm else "transformers generate"
    prompts_per_generation = args.generation_batch_size // args.num_generations
    return [
        ("rewards", ", ".join(reward.describe() for reward in plan.recipe.rewards)),
        (
            "generation",
            f"{engine}: {args.num_generations} completions of up to "
            f"{args.max_completion_length} tokens for each of {prompts_per_generation} prompts "
            f"every {args.steps_per_generation} step(s)",
        ),
    ]


def layer_kinds(targets) -> str:
    """target_modules as the plan shows them: all-linear or a pattern as written, a list of layer
    names as their kinds ([q_proj, v_proj] for every layer's q_proj and v_proj)."""
    if not isinstance(targets, (set, list)):
        return str(targets)
    return f"[{', '.join(sorted({name.rsplit('.', 1)[-1] for name in targets}))}]"


def shown(value) -> str:
    """A config value for the plan: a one-item list (TRL's loss_type) as its item."""
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value)) if len(value) != 1 else str(value[0])
    return str(value)


def describe_model(section) -> str:
    """'ID (float32)' or 'ID (float32, 4-bit nf4)'."""
    dtype = str(models.resolve_dtype(section.dtype)).replace("torch.", "")
    quantized = section.quantization
    if not quantized:
        return f"{section.id} ({dtype})"
    kind = f" {quantized.quant_type}" if quantized.bits == 4 else ""
    return f"{section.id} ({dtype}, {quantized.bits}-bit{kind})"


def describe_method(config, lora: dict) -> str:
    """'DoRA r=16, alpha=32, rsLoRA, init pissa, LoRA+ (B learning rate x16)' for the plan."""
    if lora.get("method") == "adalora":
        text = f"AdaLoRA rank {config.init_r} -> {config.target_r} over steps {config.tinit}-{config.total_step - config.tfinal}"
    else:
        text = f"{'DoRA' if config.use_dora else 'LoRA'} r={config.r}"
    text += f", alpha={config.lora_alpha}"
    if config.use_rslora:
        text += ", rsLoRA"
    if config.init_lora_weights is not True:
        text += f", init {config.init_lora_weights}"
    if lora.get("loraplus_lr_ratio"):
        text += f", LoRA+ (B learning rate x{lora['loraplus_lr_ratio']})"
    return text


def describe_data(stats: dict, section) -> str:
    """'400 (12,000 trained tokens; 3 truncated; skipped: 2 empty)' for the plan; prompts to
    complete (GRPO) count their own tokens, as nothing of them is trained."""
    trained = stats["trained_tokens"]
    notes = [f"{trained:,} trained tokens" if trained else f"{stats['tokens']:,} prompt tokens"]
    if stats["truncated"]:
        notes.append(f"{stats['truncated']} truncated to {section.max_length}")
    if stats["skipped"]:
        notes.append(
            "skipped: " + ", ".join(f"{n} {reason}" for reason, n in stats["skipped"].items())
        )
    return f"{stats['samples']:,} ({'; '.join(notes)})"


@contextlib.contextmanager
def tensorboard_dir(path: Path):
    """Point transformers' TensorBoard callback (which reads the variable when created) at the run's logs/."""
    previous = os.environ.get("TENSORBOARD_LOGGING_DIR")
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(path)
    try:
        yield
    finally:
        if previous is None:
            del os.environ["TENSORBOARD_LOGGING_DIR"]
        else:
            os.environ["TENSORBOARD_LOGGING_DIR"] = previous


def finished(out: Path) -> dict:
    """Say that the run is complete and what to do instead; return its metrics."""
    try:
        metrics = json.loads((out / runs.METRICS).read_text())
    except (OSError, ValueError):  # the adapter is what counts; the figures are only reported
        metrics = {}
    metrics = metrics if isinstance(metrics, dict) else {}
    loss = metrics.get("final_loss")
    loss_text = f"{loss:.4f}" if isinstance(loss, (int, float)) else "?"
    if is_main_process():
        console.print(
            f"{out} is complete: {metrics.get('steps', '?')} steps, final train loss "
            f"{loss_text}, adapter in {out / runs.ADAPTER}. "
            "Nothing to do.\nTo train longer, raise training.max_steps or training.num_train_epochs (it "
            "resumes from the last checkpoint); to start over, add --resume never (the earlier run is "
            "moved aside)."
        )
    return metrics


def run(
    recipe: Recipe,
    dry_run: bool = False,
    resume: str = "auto",
    capacity: int | None = None,
    force: bool = False,
) -> dict | None:
    """Train and write the run directory. Returns the metrics (None for a dry run).
    `capacity`: bytes a process may use (--memory); `force`: train even where the memory
    estimate exceeds it."""
    started = time.perf_counter()
    out = recipe.output_dir
    if is_main_process():  # at once, before planning; the other ranks are the lock holder's own
        ownership.check_free(out)
    with models.remote_code(allowed=not dry_run):  # a dry run runs no repository code
        plan = make_plan(recipe, capacity, resume)
    if not (dry_run or force or finished_already(recipe, resume)):  # before the run dir is touched
        refuse_if_too_big(plan)
    with contextlib.ExitStack() as held:  # the run's lock, on the main process
        decision = ownership.agreed(
            lambda: ownership.take_over(recipe, resume, held, write=not dry_run)
        )
        if decision.state is ownership.State.COMPLETE:
            metrics = finished(out)
            return None if dry_run else metrics
        if is_main_process():
            if decision.aside:
                console.print(
                    f"Starting over: the earlier run moved to {decision.aside} (its checkpoints are never "
                    "resumed; delete the folder when you no longer need it)"
                )
            print_plan(plan)
        if dry_run:
            return None
        return train_and_save(plan, decision.checkpoint, started)


def shared_memory(launch) -> int | None:
    """The memory each launched process may use: its GPU's, or on CPUs the free RAM shared by
    the processes of this machine (decided once, here, so that every process agrees)."""
    if hardware.has_cuda():
        return None  # each process has its own GPU, and reads its size
    free = hardware.memory_size(gpu=False)
    per_machine = max(1, launch.num_processes // max(1, launch.num_machines))
    return free // per_machine if free else None


def leave_process_group() -> None:
    """After a run under accelerate launch: wait for every process, then close the process
    group, so that no communication thread is still running when the interpreter exits (gloo's
    aborted a process at exit now and then)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def finished_already(recipe: Recipe, resume: str) -> bool:
    """Whether rerunning this recipe only says that the run is complete (a run directory of
    another recipe is ownership's to report, later)."""
    if resume == "never":
        return False
    try:
        return ownership.state(recipe.output_dir, recipe.to_dict()) is ownership.State.COMPLETE
    except UserError:
        return False


def refuse_if_too_big(plan: TrainingPlan) -> None:
    """Stop before any weight loads when the estimate exceeds the memory by a clear margin."""
    if memory.verdict(plan.memory.total, plan.capacity) != "does not fit":
        return
    fixes = [f"{change} (peak {memory.gib(peak)})" for change, peak in plan.advice]
    raise UserError(
        f"the estimated peak memory per process, {memory.gib(plan.memory.total)}, exceeds the "
        f"{memory.gib(plan.capacity)} available (see the plan's memory table)",
        [*fixes, "or pass --force to train anyway (the estimate may be pessimistic)"],
    )


def train_and_save(plan: TrainingPlan, checkpoint: Path | None, started: float) -> dict | None:
    """Load the model, train, and write the adapter and metrics. Returns the metrics on the
    main process, None on the others."""
    out = plan.recipe.output_dir
    out.mkdir(parents=True, exist_ok=True)
    trainer, guard, initial = build_trainer(plan, checkpoint)
    start_epoch = 0.0
    if checkpoint:
        start_epoch = (
            json.loads((checkpoint / "trainer_state.json").read_text()).get("epoch") or 0.0
        )
        if is_main_process():
            console.print(f"Resuming from {checkpoint} (epoch {start_epoch:.2f})")
    start = time.perf_counter()
    result = fit(trainer, checkpoint, out)
    wall = time.perf_counter() - start
    if guard.problem:
        raise UserError(
            f"training stopped at {guard.problem}; nothing after that was saved. "
            f"Last good checkpoint: {runs.latest_checkpoint(out) or 'none'}",
            [
                (
                    "clip gradients harder (training.max_grad_norm below its default 1.0, e.g. 0.3) and rerun: "
                    "it resumes from the last good checkpoint"
                ),
                (
                    "or lower training.learning_rate and start over with --resume never (a resumed run "
                    "keeps the learning rate schedule it started with)"
                ),
            ],
        )
    adapter = save_adapter(trainer, plan, initial)
    if adapter is None:
        return None
    dtype = str(models.resolve_dtype(plan.recipe.model.dtype)).replace("torch.", "")
    metrics = collect_metrics(plan, trainer, result, wall, dtype, start_epoch)
    metrics |= step_times(started, guard.step_ends)
    runs.write_json(out / runs.METRICS, metrics)
    console.print(
        f"Final train loss {metrics['final_loss']:.4f}, {metrics['tokens_per_second']:,.0f} tokens/s, "
        f"wall {wall:.1f} s. Adapter: {adapter.resolve()}"
    )
    return metrics


def build_trainer(plan: TrainingPlan, checkpoint: Path | None):
    """Load the base, add LoRA and build the trainer: (trainer, its RunGuard, the initial-adapter
    folder of PiSSA-like runs or None)."""
    recipe, out = plan.recipe, plan.recipe.output_dir
    # PEFT's advice in these is what lora-tune does: PiSSA-like adapters are converted for the
    # original base, and added tokens are saved as trainable rows (see save_adapter).
    warnings.filterwarnings("ignore", message=".*changes the base weights of the model")
    warnings.filterwarnings("ignore", message="Setting `save_embedding_layers` to `True`")
    hardware.reset_peak_resident()
    plan.baseline = hardware.resident_bytes()  # CPU peaks are measured above this level
    model = models.load_model(recipe.model, models.resolve_dtype(recipe.model.dtype))
    models.fit_vocabulary(model, plan.tokenizer)
    if recipe.model.quantization:  # QLoRA: norms in fp32, input gradients for checkpointing
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=plan.training_config.gradient_checkpointing
        )
    # A starting adapter was initialised when it was first trained.
    init = "" if plan.start else str(getattr(plan.lora_config, "init_lora_weights", "")).lower()
    if init == "corda":
        calibrate_corda(model, plan)
    if plan.start:
        model = adapters.load_trainable(model, plan.start)
    if plan.method.data != "sft" and plan.training_config.use_cpu:
        score_in_small_chunks()
    guard = RunGuard()
    callbacks = [guard, AdaLoraAllocator()] if recipe.lora.get("method") == "adalora" else [guard]
    with tensorboard_dir(out / runs.LOGS):
        trainer = trainer_class(plan.method)(
            model=model,
            args=plan.training_config,
            train_dataset=plan.train,
            eval_dataset=plan.eval,
            processing_class=plan.tokenizer,
            peft_config=None if plan.start else plan.lora_config,
            callbacks=callbacks,
            **method_arguments(plan),
        )
    trainer.loraplus = {k: v for k, v in recipe.lora.items() if k.startswith("loraplus_")}
    if init == "eva" and not checkpoint:  # a checkpoint holds the adapter, ranks included
        from peft import initialize_lora_eva_weights

        initialize_lora_eva_weights(
            trainer.model, trainer.get_train_dataloader(), show_progress_bar=False
        )
    # PiSSA, OLoRA and CorDA move part of the base weights into the adapter; the adapter as
    # trained only fits that changed base. Its initial state lets PEFT convert it at the end
    # into an adapter for the original base model.
    initial = out / runs.INITIAL_ADAPTER if init.startswith(CONVERTED_INITS) else None
    if initial and is_main_process() and not (initial / "adapter_model.safetensors").exists():
        trainer.model.save_pretrained(initial)
    return trainer, guard, initial


def method_arguments(plan: TrainingPlan) -> dict:
    """What a method's trainer takes beyond the common arguments: GRPO's reward functions."""
    if not plan.recipe.rewards:
        return {}
    from . import rewards

    return {"reward_funcs": rewards.functions(plan.recipe.rewards)}


def fit(trainer, checkpoint: Path | None, out: Path):
    """trainer.train(); on Ctrl-C, say where the last complete checkpoint is and exit 130."""
    try:
        return trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except KeyboardInterrupt:
        if is_main_process():
            output.console(stderr=True).print(interrupted(out, trainer.state.global_step))
        raise SystemExit(130) from None


def interrupted(out: Path, step: int) -> str:
    """What Ctrl-C leaves behind, and how to go on."""
    last = runs.latest_checkpoint(out)
    if last is None:
        return (
            f"Interrupted at step {step}, before the first checkpoint was saved: nothing to resume. "
            "Rerun the same command to start again."
        )
    return (
        f"Interrupted at step {step}. The last complete checkpoint is {last} (step {runs.checkpoint_step(last)}): "
        "rerun `lora-tune train` with the same recipe (and without --resume never) to resume from it."
    )


def save_adapter(trainer, plan: TrainingPlan, initial: Path | None) -> Path | None:
    """Write adapter/ through a staging folder, checked before it is renamed, so that it is
    complete and sound, or absent. Returns its path on the main process, None on the others."""
    out = plan.recipe.output_dir
    adapter, staging = out / runs.ADAPTER, out / f"{runs.ADAPTER}.partial"
    if (
        is_main_process()
    ):  # only the main process writes there; another removing it would race the writing
        shutil.rmtree(staging, ignore_errors=True)
    trainer.save_model(str(staging))  # every process takes part: ZeRO-3 gathers the weights here
    if not is_main_process():
        return None
    save_options = {}
    if initial:
        save_options["path_initial_model_for_weight_conversion"] = str(initial)
    if plan.new_tokens:
        # The added tokens' rows are saved as trainable tokens (or whole, as modules_to_save);
        # PEFT would also save the base's resized embedding and output layers, gigabytes for a
        # large vocabulary, which loaders rebuild by resizing the base instead.
        save_options["save_embedding_layers"] = False
    if save_options:
        trainer.model.save_pretrained(staging, **save_options)
    # DPO and KTO hold their reference as a second adapter, which PEFT saves in a subfolder of
    # its name: the run's adapter is the trained one alone.
    shutil.rmtree(staging / REFERENCE_ADAPTER, ignore_errors=True)
    # Trainer leaves its arguments as a pickle; an adapter folder is shared, so keep it pickle-free.
    (staging / "training_args.bin").unlink(missing_ok=True)
    try:
        check_adapter(staging)
    except UserError:
        shutil.rmtree(staging)
        raise
    runs.give_umask_modes(staging)
    shutil.rmtree(adapter, ignore_errors=True)
    staging.rename(adapter)
    return adapter


CONVERTED_INITS = ("pissa", "olora", "corda")
REFERENCE_ADAPTER = "ref"  # the name TRL's DPO and KTO trainers give the frozen copy they add


def calibrate_corda(model, plan: TrainingPlan, samples: int = 256) -> None:
    """CorDA builds its initialisation from the covariance of each target layer's inputs on
    training samples: run up to `samples` of them through the model before LoRA is added."""
    from peft.tuners.lora.corda import preprocess_corda
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers

    rows = plan.train.select(range(min(samples, len(plan.train))))
    device = next(model.parameters()).device

    @torch.no_grad()
    def run_model():
        for batch in batches(
            rows, 1, plan.tokenizer.pad_token_id, device
        ):  # PEFT's hooks take one sample
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

    # PEFT expands `all-linear` only inside get_peft_model; the preprocessing needs the names.
    config = _maybe_include_all_linear_layers(copy.deepcopy(plan.lora_config), model)
    preprocess_corda(model, config, run_model=run_model)


# Rows of hidden states TRL's fused LM head turns into log-probabilities at a time, on a CPU.
CPU_LOG_PROB_ROWS = 1024


def score_in_small_chunks() -> None:
    """TRL's DPO and KTO trainers score tokens through a fused LM head in chunks of 32,768 rows:
    on a CPU one chunk holds a whole batch's logits, several times over (a DPO step peaked at 2.4x
    an SFT step on the same pairs in scripts/bench_train.py). Chunks of CPU_LOG_PROB_ROWS bring
    it to the SFT step's level, and run faster. TRL keeps the size in a module constant."""
    import trl.trainer.utils

    if hasattr(trl.trainer.utils, "_CHUNKED_LOGPROB_CHUNK_SIZE"):
        trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE = CPU_LOG_PROB_ROWS


class LoraTrainerMixin:
    """What every lora-tune trainer adds to TRL's: LoRA+ learning rates for the B matrices, and
    an eval loss without AdaLoRA's orthogonality penalty."""

    loraplus: typing.ClassVar[dict] = {}  # loraplus_lr_ratio (and _embedding) from the lora section

    def create_optimizer(self, model=None):
        if self.loraplus and self.optimizer is None:
            from peft.optimizers import create_loraplus_optimizer

            optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
            kwargs.pop("lr", None)
            self.optimizer = create_loraplus_optimizer(
                self.model,
                optimizer_cls,
                lr=self.args.learning_rate,
                weight_decay=self.args.weight_decay,
                **self.loraplus,
                **kwargs,
            )
        return super().create_optimizer(model)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # AdaLoRA adds its orthogonality penalty to every loss computed with labels: leave it
        # out of the eval loss, which must stay the model's NLL (as `lora-tune eval` measures).
        peft_config = getattr(self.model, "peft_config", {})
        config = peft_config.get("default")
        penalty = getattr(config, "orth_reg_weight", None)
        if penalty is None:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        config.orth_reg_weight = 0.0
        try:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        finally:
            config.orth_reg_weight = penalty


def trainer_class(method: Method | None = None):
    """The trainer of a method: TRL's class with LoraTrainerMixin. The preference trainers keep
    TRL's loss; SFT's is the model's own (see sft_trainer_class)."""
    method = method or METHODS["sft"]
    if method.name == "sft":
        return sft_trainer_class()
    return type(f"LoraTune{method.trainer}", (LoraTrainerMixin, method.trainer_class()), {})


def sft_trainer_class():
    """SFTTrainer without the per-step extras of its default loss.

    TRL's compute_loss also computes the entropy of the whole output distribution and the token
    accuracy at every step, plus several device syncs to log them: with a 32k vocabulary that made
    each CPU step 2.6x the raw PyTorch step (scripts/bench_train.py). The plain NLL loss is the
    model's own, token-count normalized across gradient accumulation (num_items_in_batch) as in
    transformers' Trainer. Other loss types, Liger kernels and auxiliary losses keep TRL's path.
    """
    from transformers import Trainer

    from .methods import METHODS

    SFTTrainer = METHODS["sft"].trainer_class()  # a class, named as TRL names it

    class LoraTuneTrainer(LoraTrainerMixin, SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.args.loss_type != "nll" or self.args.use_liger_kernel or self.aux_loss_enabled:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            inputs["use_cache"] = False  # with a KV cache, transformers ignores packed position ids
            return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)

    return LoraTuneTrainer


class AdaLoraAllocator(TrainerCallback):
    """AdaLoRA reallocates ranks from the gradients after each optimizer step, before they are zeroed."""

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        model.base_model.update_and_allocate(state.global_step)


class RunGuard(TrainerCallback):
    """Marks complete checkpoints, stops training before it saves weights that are no longer
    finite (transformers would otherwise train on through NaN), and times the steps."""

    def __init__(self):
        self.problem: str | None = None
        self.step_ends: list[float] = []

    def _stop(self, state, control, reason: str) -> None:
        self.problem = self.problem or f"step {state.global_step}: {reason}"
        control.should_save = False
        control.should_training_stop = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "grad_norm"):
            value = (logs or {}).get(key)
            if isinstance(value, float) and not math.isfinite(value):
                self._stop(state, control, f"the {key.replace('_', ' ')} became {value}")

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.step_ends.append(time.perf_counter())
        # Checked only when a checkpoint is due, so ordinary steps pay no device sync.
        if (
            control.should_save
            and model is not None
            and not all(torch.isfinite(p).all() for p in model.parameters() if p.requires_grad)
        ):
            self._stop(state, control, "the adapter weights are no longer finite")

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            runs.give_umask_modes(checkpoint)
            (checkpoint / runs.COMPLETE).touch()


def check_adapter(adapter: Path) -> None:
    """Raise UserError when a saved adapter holds empty tensors (what DeepSpeed ZeRO-3 saves when
    the weights are not gathered) or LoRA matrices of another rank than its config says. AdaLoRA
    may prune a layer to rank 0 on purpose; its rank pattern says which."""
    from peft.utils.other import get_pattern_key
    from safetensors import safe_open

    config = json.loads((adapter / "adapter_config.json").read_text())
    adalora = config.get("peft_type") == "ADALORA"
    ranks = config.get("rank_pattern") or {}
    pruned = [
        name.rsplit(".", 1)[0] + ".lora_"
        for name, mask in ranks.items()
        if adalora and isinstance(mask, list) and not any(mask)
    ]
    problems = []
    with safe_open(adapter / "adapter_model.safetensors", framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            shape = f.get_slice(key).get_shape()
            lora = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])\.weight", key)
            if 0 in shape and not any(p in key for p in pruned):
                problems.append(f"{key} is empty {list(shape)}")
            elif lora and not adalora:
                module, part = lora.groups()
                expected = (
                    ranks.get(get_pattern_key(ranks, module), config["r"]) if ranks else config["r"]
                )
                rank = shape[0] if part == "A" else shape[1]
                if rank != expected:
                    problems.append(f"{key} has rank {rank}, adapter_config.json says {expected}")
    if problems:
        raise UserError(
            f"the adapter was not saved: {len(problems)} of its tensors are unusable, e.g. {problems[0]}; "
            "it would load as a no-op or not at all",
            [
                (
                    "under DeepSpeed ZeRO-3 set zero3_save_16bit_model: true (configs/deepspeed_zero3.yaml) "
                    "so the weights are gathered before saving; the checkpoints are kept: rerun to resume"
                )
            ],
        )


def step_times(started: float, ends: list[float]) -> dict:
    """Seconds from the command's start to the first optimizer step, and the median step after it
    (host clock: no device sync is added)."""
    gaps = [b - a for a, b in itertools.pairwise(ends)]
    return {
        "time_to_first_step_s": ends[0] - started if ends else None,
        "step_time_s": statistics.median(gaps) if gaps else None,
    }


def collect_metrics(
    plan: TrainingPlan, trainer, result, wall: float, dtype: str, start_epoch: float
) -> dict:
    state = trainer.state
    losses = [entry["loss"] for entry in state.log_history if "loss" in entry]
    # Non-padding tokens per epoch times the epochs this invocation trained (a resumed run
    # starts part-way): no per-step counting, which would cost a sync in every step.
    tokens_per_epoch = plan.data_stats["train"]["tokens"]
    runtime = result.metrics.get("train_runtime", wall)
    tokens = tokens_per_epoch * (state.epoch - start_epoch)  # an epoch spans all processes
    metrics = {
        "train_loss": result.training_loss,
        "final_loss": losses[-1] if losses else result.training_loss,
        "eval_loss": next(
            (e["eval_loss"] for e in reversed(state.log_history) if "eval_loss" in e), None
        ),
        "steps": state.global_step,
        "epochs": state.epoch,
        "train_tokens": int(tokens),
        "tokens_per_second": tokens / runtime if runtime else 0.0,
        "train_runtime_s": runtime,
        "wall_time_s": wall,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "memory": {
            "estimate_bytes": plan.memory.total,
            "measured_bytes": measured_peak(plan),
            "terms": plan.memory.terms,
        },
        "peak_gpu_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0,
        "data": plan.data_stats,
        "trainer": plan.recipe.trainer,
        "method": method_metrics(plan.method, state.log_history),
        "trainable_parameters": plan.trainable,
        "total_parameters": plan.total,
        "device": "cpu" if plan.training_config.use_cpu else "cuda",
        "dtype": dtype,
        "world_size": world_size(),
        "distributed_type": trainer.accelerator.distributed_type.value,  # NO, MULTI_CPU, MULTI_GPU, FSDP, DEEPSPEED
        "versions": runs.versions(),
        "log_history": state.log_history,
    }
    return metrics


def measured_peak(plan: TrainingPlan) -> int:
    """The step's measured peak, as the estimate counts it: on a GPU the most memory torch
    allocated; on a CPU the peak resident memory above its level before the model loaded."""
    if not plan.training_config.use_cpu and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return hardware.resident_bytes("VmHWM") - plan.baseline


def method_metrics(method: Method, history: list[dict]) -> dict:
    """The first logged loss and its step (DPO and KTO log the first step alone: ln 2 and 0.5 when
    the reference is the policy at step 0) and the last value of each of the method's own log
    entries (rewards/accuracies, margins, ...)."""
    first = next((entry for entry in history if "loss" in entry), {})
    found = {"first_logged_loss": first.get("loss"), "first_logged_step": first.get("step")}
    for entry in history:
        found |= {key: value for key, value in entry.items() if method.keeps(key)}
    if "reward" in first:  # GRPO: the reward it started from
        found["first_logged_reward"] = first["reward"]
    return found
