"""`lora-tune eval`: loss, perplexity and token accuracy for base, adapter and merged models."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from . import data, models, runs
from .errors import UserError
from .merge import compare_logits

console = Console(soft_wrap=True)  # never break paths in messages


def batches(dataset, batch_size: int, pad_id: int, device) -> list[dict[str, torch.Tensor]]:
    """Length-sorted, right-padded batches; labels are -100 on padding."""
    order = sorted(range(len(dataset)), key=lambda i: -len(dataset[i]["input_ids"]))
    result = []
    for start in range(0, len(order), batch_size):
        rows = [dataset[i] for i in order[start:start + batch_size]]
        width = len(rows[0]["input_ids"])
        ids = torch.full((len(rows), width), pad_id)
        labels = torch.full((len(rows), width), -100)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, row in enumerate(rows):
            n = len(row["input_ids"])
            ids[j, :n] = torch.tensor(row["input_ids"])
            labels[j, :n] = torch.tensor(row["labels"])
            mask[j, :n] = 1
        result.append({"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)})
    return result


@torch.no_grad()
def measure(model, batch_list) -> tuple[dict, torch.Tensor]:
    """Token-weighted loss, perplexity and next-token accuracy over every label token.

    Sums over tokens, never averages per batch, so padding and batch size cannot change the
    result. Also returns the first batch's logits (at labelled positions) for comparisons.
    """
    nll, correct, count, first = 0.0, 0, 0, None
    start = time.perf_counter()
    for batch in batch_list:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        keep = labels != -100
        picked, targets = logits[keep].float(), labels[keep]
        nll += torch.nn.functional.cross_entropy(picked, targets, reduction="sum").item()
        correct += (picked.argmax(-1) == targets).sum().item()
        count += targets.numel()
        if first is None:
            first = picked
    seconds = time.perf_counter() - start
    loss = nll / count
    tokens = sum(int(b["attention_mask"].sum()) for b in batch_list)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700)), "token_accuracy": correct / count,
            "tokens": count, "seconds": seconds, "tokens_per_second": tokens / seconds}, first


def run(target: str, data_spec: str | None = None, compare: bool = False, merge: bool = True,
        json_file: Path | None = None, batch_size: int = 8, max_samples: int | None = None,
        allow_pickle: bool = False) -> dict:
    """Evaluate TARGET; print a table; return (and optionally write) the report."""
    path = Path(target)
    adapter = runs.adapter_dir(path) if path.is_dir() else None
    recipe = runs.run_recipe(adapter) if adapter else None
    if compare and adapter is None:
        raise UserError(f"--compare: {target} is not a run or adapter directory",
                        ["--compare needs an adapter to compare with its base"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if adapter is not None:
        model, tokenizer, section = models.load_with_adapter(adapter, "auto", recipe.model if recipe else None,
                                                             allow_pickle)
    else:
        from .recipe import ModelSection

        section = ModelSection(id=target, allow_pickle=allow_pickle)
        models.load_config(section)  # a clear error for a path or id that is not a model
        tokenizer = models.load_tokenizer(section)
        model = models.load_model(section, "auto").eval()
    dataset = data.load_eval(data_spec, recipe.data if recipe else None, tokenizer)
    if max_samples:
        dataset = dataset.select(range(min(max_samples, len(dataset))))
    model.to(device)
    batch_list = batches(dataset, batch_size, tokenizer.pad_token_id, device)

    results, check = {}, None
    if adapter is None:
        results["model"], _ = measure(model, batch_list)
    else:
        if compare:
            with model.disable_adapter():
                results["base"], _ = measure(model, batch_list)
        if compare or not merge:
            results["adapter"], adapter_logits = measure(model, batch_list)
        if compare or merge:
            merged = model.merge_and_unload()
            results["merged"], merged_logits = measure(merged, batch_list)
        if compare:
            check = compare_logits(adapter_logits, merged_logits, merged.dtype)

    report = {"target": target, "base_model": section.id,
              "data": data_spec or (recipe.data.eval or f"{recipe.data.train} (eval_fraction)"),
              "samples": len(dataset), "batch_size": batch_size, "device": device, "results": results,
              "merged_vs_adapter": check, "versions": runs.versions()}
    print_report(report)
    if json_file:
        json_file.parent.mkdir(parents=True, exist_ok=True)
        runs.write_json(json_file, report)
    return report


def print_report(report: dict) -> None:
    results = report["results"]
    table = Table(title=f"lora-tune eval: {report['target']} on {report['data']} ({report['samples']} samples)")
    for column in ("model", "loss", "perplexity", "token acc", "vs base", "tokens/s"):
        table.add_column(column, justify="left" if column == "model" else "right")
    base = results.get("base")
    for name, m in results.items():
        delta = "" if base is None or name == "base" else f"{m['perplexity'] - base['perplexity']:+.2f} ppl"
        table.add_row(name, f"{m['loss']:.4f}", f"{m['perplexity']:.2f}", f"{m['token_accuracy']:.2%}",
                      delta, f"{m['tokens_per_second']:,.0f}")
    console.print(table)
    check = report["merged_vs_adapter"]
    if check:
        verdict = "equal within tolerance" if check["ok"] else "DIFFERENT"
        console.print(f"merged vs adapter: {verdict}; max |logit diff| {check['max_abs_diff']:.3g} "
                      f"(tolerance {check['tolerance']:.3g})")
