"""`lora-tune data`: show what will be trained, token by token, without loading model weights."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text

from . import data, models, output
from .recipe import Recipe

console = output.console()
TRAINED, MASKED = "bold green", "dim"


def render_sample(tokenizer, input_ids: list[int], labels: list[int]) -> Text:
    """The sample's text, trained tokens highlighted and masked ones dimmed."""
    text = Text()
    for token, label in zip(input_ids, labels):
        text.append(tokenizer.decode([token]), style=TRAINED if label != -100 else MASKED)
    return text


def run(recipe: Recipe, n: int = 3) -> dict:
    """Print N rendered training samples and the data statistics; return the statistics."""
    tokenizer = models.load_tokenizer(recipe.model)
    data.prepare_tokenizer(tokenizer, recipe.data, recipe.model.id)
    train, _, stats = data.load_datasets(recipe.data, tokenizer)
    console.print(Text.assemble("Legend: ", ("trained", TRAINED), " / ", ("masked (not in the loss)", MASKED)))
    for i in range(min(n, len(train))):
        row = train[i]
        console.rule(f"sample {i} ({len(row['input_ids'])} tokens)")
        console.print(render_sample(tokenizer, row["input_ids"], row["labels"]))
    table = Table(title="data", show_header=True)
    for column in ("split", "rows", "samples", "skipped", f"truncated to {recipe.data.max_length}",
                   "length min/median/p95/max", "trained tokens per epoch"):
        table.add_column(column, overflow="fold")
    summaries = {name: s.summary() for name, s in stats.items()}
    for name, s in summaries.items():
        length = s.get("length", {})
        skipped = ", ".join(f"{k}: {v}" for k, v in s["skipped"].items()) or "0"
        table.add_row(name, f"{s['rows']:,}", f"{s['samples']:,}", skipped,
                      f"{s['truncated']:,}",
                      "/".join(f"{length.get(k, 0):g}" for k in ("min", "median", "p95", "max")),
                      f"{s['trained_tokens']:,}")
    console.print(table)
    return summaries
