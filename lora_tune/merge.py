"""`lora-tune merge`: adapter + base -> one standalone model, verified before it is written."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from rich.console import Console

from . import models, runs
from .errors import UserError

console = Console(soft_wrap=True)  # never break paths in messages
# Largest allowed |merged - adapter| logit difference, relative to the largest |logit| (at
# least 1). Merging rounds W + scale * B @ A once to the weight dtype, so the bound follows it.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
PROBE_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Fine-tuning changes a model; merging must not.",
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10",
]


def probe_batch(tokenizer, device, seed: int = 0) -> dict[str, torch.Tensor]:
    """Fixed texts plus one row of random token ids, so every part of the vocabulary can show up."""
    batch = tokenizer(PROBE_TEXTS, return_tensors="pt", padding=True)
    generator = torch.Generator().manual_seed(seed)
    width = batch["input_ids"].shape[1]
    random_ids = torch.randint(0, len(tokenizer), (1, width), generator=generator)
    batch["input_ids"] = torch.cat([batch["input_ids"], random_ids])
    batch["attention_mask"] = torch.cat([batch["attention_mask"], torch.ones_like(random_ids)])
    return {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}


@torch.no_grad()
def logits_of(model, batch) -> torch.Tensor:
    """Logits at the real (non-padding) positions, as float32."""
    return model(**batch).logits[batch["attention_mask"].bool()].float()


def compare_logits(reference: torch.Tensor, other: torch.Tensor, dtype: torch.dtype) -> dict:
    """Max and mean absolute difference, and whether they are within the dtype's tolerance."""
    diff = (other - reference).abs()
    scale = max(1.0, reference.abs().max().item())
    tolerance = TOLERANCE.get(dtype, 5e-2) * scale
    finite = bool(torch.isfinite(other).all())
    max_diff = diff.max().item()
    return {"max_abs_diff": max_diff, "mean_abs_diff": diff.mean().item(), "tolerance": tolerance,
            "ok": finite and max_diff <= tolerance}


def run(source: Path, output: Path, force: bool = False, dtype: str = "auto", allow_pickle: bool = False) -> dict:
    """Merge, verify and write OUTPUT atomically. Returns the verification report."""
    adapter = runs.adapter_dir(source)
    if adapter is None:
        raise UserError(f"{source}: not a run directory or PEFT adapter (no adapter_config.json)",
                        ["give a run directory (runs/NAME) or an adapter directory"])
    if output.exists() and not force:
        raise UserError(f"{output} already exists", ["choose another --output, or pass --force to replace it"])
    if dtype not in ("auto", *models.DTYPES):
        raise UserError(f"--dtype: unknown dtype {dtype!r}", ["use auto, float32, bfloat16 or float16"])
    recipe = runs.run_recipe(adapter)
    model, tokenizer, section = models.load_with_adapter(adapter, dtype, recipe.model if recipe else None,
                                                         allow_pickle)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    weight_dtype = model.get_base_model().dtype

    batch = probe_batch(tokenizer, device)
    before = logits_of(model, batch)
    try:
        merged = model.merge_and_unload(safe_merge=True)
    except ValueError as exc:  # safe_merge found NaN or inf in a merged weight
        raise UserError(f"merge refused: {exc}", ["the adapter is broken; retrain or use an earlier checkpoint"]) from None
    after = logits_of(merged, batch)
    report = compare_logits(before, after, weight_dtype)
    report |= {"base_model": section.id, "revision": section.revision, "adapter": str(adapter),
               "dtype": str(weight_dtype).replace("torch.", ""), "versions": runs.versions()}
    console.print(f"Merged vs adapter logits: max |diff| {report['max_abs_diff']:.3g}, "
                  f"mean {report['mean_abs_diff']:.3g} (tolerance {report['tolerance']:.3g}, {report['dtype']})")
    if not report["ok"]:
        raise UserError(f"merge refused: the merged model's logits differ from adapter-on-base by "
                        f"{report['max_abs_diff']:.3g} (tolerance {report['tolerance']:.3g}); nothing was written",
                        ["merge in float32 with --dtype float32, or check the adapter for non-finite weights"])
    write_atomically(merged, tokenizer, output, report)
    console.print(f"Merged model written to {output}")
    return report


def write_atomically(model, tokenizer, output: Path, report: dict) -> None:
    """Write into a hidden sibling folder, then rename: OUTPUT is either complete or absent."""
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.parent / f".{output.name}.partial-{os.getpid()}"
    old = output.parent / f".{output.name}.old-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        runs.write_json(partial / "merge_report.json", report)
        if output.exists():
            output.rename(old)
        partial.rename(output)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        if old.exists() and not output.exists():
            old.rename(output)
        raise
    shutil.rmtree(old, ignore_errors=True)
