"""`lora-tune modules MODEL`: the layers LoRA can target, what each choice would train, and the
memory a training step would take on a GPU in typical settings.

Reads only the model's config and builds the model on the meta device, so it answers in seconds
for any size of model and downloads no weights.
"""

from __future__ import annotations

import copy
import re
from collections import Counter
from dataclasses import dataclass

import torch
from rich.markup import escape
from rich.table import Table

from . import memory, models, output
from .recipe import ModelSection

console = output.console()
ATTENTION = re.compile(r"attn|attention", re.I)
# Settings a GPU is sized for before a recipe is written: batch x tokens, and the weights (bf16
# with and without gradient checkpointing, 4-bit QLoRA), bf16 activations throughout.
TYPICAL_BATCH, TYPICAL_LENGTH = 4, 2048
TYPICAL = {
    "bf16": {"weight_bytes": 2},
    "bf16, checkpointing": {"weight_bytes": 2, "checkpointing": True},
    "QLoRA 4-bit, checkpointing": {"weight_bytes": 2, "quantized_bits": 4, "checkpointing": True},
}


@dataclass
class Group:
    pattern: str  # the full names with layer numbers replaced by *
    shape: tuple[int, int]  # (in_features, out_features)
    count: int

    @property
    def suffix(self) -> str:
        return self.pattern.rsplit(".", 1)[-1]


def linear_groups(model) -> list[Group]:
    """The targetable layers grouped by name pattern and shape, in model order."""
    counts: Counter = Counter()
    for name in models.linear_module_names(model):
        module = model.get_submodule(name)
        # GPT-2's Conv1D stores its weight as (in, out).
        shape = (
            (module.in_features, module.out_features)
            if isinstance(module, torch.nn.Linear)
            else tuple(module.weight.shape)
        )
        counts[(re.sub(r"\.\d+\.", ".*.", name), shape)] += 1
    return [Group(pattern, shape, n) for (pattern, shape), n in counts.items()]


def suggestions(groups: list[Group]) -> dict[str, list[str] | str]:
    """Named target_modules choices: attention-only (where the names say which), and all-linear."""
    attention = list(dict.fromkeys(g.suffix for g in groups if ATTENTION.search(g.pattern)))
    choices: dict[str, list[str] | str] = {}
    if attention:
        choices["attention only"] = attention
    choices["all linear layers"] = "all-linear"
    return choices


def run(model: ModelSection, r: int) -> None:
    """Print the layer table, the suggested target sets with their trainable parameter counts, and
    the memory a training step would take on a GPU in typical settings."""
    config = models.load_config(model)
    skeleton = models.meta_model(config, model.trust_remote_code)
    groups = linear_groups(skeleton)
    table = Table(title=f"Linear layers of {model.id} ({config.model_type})")
    for column in ("name pattern", "in -> out", "count", f"LoRA parameters at r={r}"):
        table.add_column(column, justify="left" if column == "name pattern" else "right")
    for g in groups:
        table.add_row(
            g.pattern,
            f"{g.shape[0]} -> {g.shape[1]}",
            str(g.count),
            f"{r * sum(g.shape) * g.count:,}",
        )
    console.print(table)
    counts = print_suggestions(skeleton, groups, r)
    embeddings = [
        name
        for name, module in skeleton.named_modules()
        if module is skeleton.get_input_embeddings() or module is skeleton.get_output_embeddings()
    ]
    console.print(
        f"embeddings (modules_to_save, or trainable_token_indices for new tokens): {', '.join(embeddings)}"
    )
    print_memory(typical_estimates(skeleton, counts["all linear layers"]), r)


def print_suggestions(skeleton, groups: list[Group], r: int) -> dict[str, int]:
    """One line per suggested target set; returns each set's trainable parameter count."""
    from peft import LoraConfig

    counts = {}
    for label, targets in suggestions(groups).items():
        lora = LoraConfig(task_type="CAUSAL_LM", r=r, target_modules=targets)
        trainable, total = models.count_trainable(copy.deepcopy(skeleton), lora)
        counts[label] = trainable
        line = targets if isinstance(targets, str) else "[" + ", ".join(targets) + "]"
        console.print(
            f"{label}: [bold]target_modules: {escape(line)}[/bold]  ->  {trainable:,} trainable parameters "
            f"({100 * trainable / total:.3f}% of {total:,}) at r={r}"
        )
    return counts


def typical_estimates(skeleton, trainable: int) -> dict[str, memory.Estimate]:
    """The estimated peak of a training step on one GPU in each of the TYPICAL settings, with
    `trainable` LoRA parameters (those of all linear layers)."""
    shape = memory.shape_of(skeleton)
    return {
        label: memory.estimate(
            shape,
            memory.Setting(
                batch=TYPICAL_BATCH,
                length=TYPICAL_LENGTH,
                activation_bytes=2,
                trainable=trainable,
                fused_rows=None,
                device="cuda",
                **values,
            ),
        )
        for label, values in TYPICAL.items()
    }


def print_memory(estimates: dict[str, memory.Estimate], r: int) -> None:
    """The estimates side by side: one column per setting, one row per term, the peak last."""
    table = Table(
        title=f"Memory of a training step on one GPU (estimate): batch {TYPICAL_BATCH} x "
        f"{TYPICAL_LENGTH:,} tokens, LoRA r={r} on all linear layers, AdamW",
        caption="lora-tune train --dry-run estimates a recipe's own settings",
    )
    table.add_column("")
    for label in estimates:
        table.add_column(label, justify="right")
    first = next(iter(estimates.values()))
    for term in first.terms:
        table.add_row(term, *(memory.gib(e.terms[term]) for e in estimates.values()))
    table.add_row("peak", *(memory.gib(e.total) for e in estimates.values()), style="bold")
    console.print(table)
