"""`lora-tune modules MODEL`: the layers LoRA can target, and what each choice would train.

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

from . import models, output
from .recipe import ModelSection

console = output.console()
ATTENTION = re.compile(r"attn|attention", re.I)


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
    """Print the layer table and the suggested target sets with their trainable parameter counts."""
    from peft import LoraConfig

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

    for label, targets in suggestions(groups).items():
        lora = LoraConfig(task_type="CAUSAL_LM", r=r, target_modules=targets)
        trainable, total = models.count_trainable(copy.deepcopy(skeleton), lora)
        line = targets if isinstance(targets, str) else "[" + ", ".join(targets) + "]"
        console.print(
            f"{label}: [bold]target_modules: {escape(line)}[/bold]  ->  {trainable:,} trainable parameters "
            f"({100 * trainable / total:.3f}% of {total:,}) at r={r}"
        )
    embeddings = [
        name
        for name, module in skeleton.named_modules()
        if module is skeleton.get_input_embeddings() or module is skeleton.get_output_embeddings()
    ]
    console.print(
        f"embeddings (modules_to_save, or trainable_token_indices for new tokens): {', '.join(embeddings)}"
    )
