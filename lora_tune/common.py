"""Small helpers shared by the commands: eval batches, logit comparison, error text."""

from __future__ import annotations

import torch

# Largest allowed |merged - adapter| logit difference, relative to the largest |logit| (at
# least 1). Merging rounds W + scale * B @ A once to the weight dtype, so the bound follows it.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): libraries'
    messages run over many lines, and a UserError is one."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def batches(dataset, batch_size: int, pad_id: int, device) -> list[dict[str, torch.Tensor]]:
    """Length-sorted, right-padded batches; labels are -100 on padding."""
    order = sorted(range(len(dataset)), key=lambda i: -len(dataset[i]["input_ids"]))
    result = []
    for start in range(0, len(order), batch_size):
        rows = [dataset[i] for i in order[start : start + batch_size]]
        width = len(rows[0]["input_ids"])
        ids = torch.full((len(rows), width), pad_id)
        labels = torch.full((len(rows), width), -100)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, row in enumerate(rows):
            n = len(row["input_ids"])
            ids[j, :n] = torch.tensor(row["input_ids"])
            labels[j, :n] = torch.tensor(row["labels"])
            mask[j, :n] = 1
        result.append(
            {
                "input_ids": ids.to(device),
                "attention_mask": mask.to(device),
                "labels": labels.to(device),
            }
        )
    return result


def compare_logits(reference: torch.Tensor, other: torch.Tensor, dtype: torch.dtype) -> dict:
    """Max and mean absolute difference, and whether they are within the dtype's tolerance."""
    diff = (other - reference).abs()
    scale = max(1.0, reference.abs().max().item())
    tolerance = TOLERANCE.get(dtype, 5e-2) * scale
    finite = bool(torch.isfinite(other).all())
    max_diff = diff.max().item()
    return {
        "max_abs_diff": max_diff,
        "mean_abs_diff": diff.mean().item(),
        "tolerance": tolerance,
        "ok": finite and max_diff <= tolerance,
    }


def length_sorted(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indexes grouped into batches, longest first, so each batch pads to little."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def pad_rows(rows: list[list[int]], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Token rows right-padded into one batch: input_ids and an attention mask that marks the
    real tokens by position, so a pad id that is also a real token (EOS) is never confused."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, row in enumerate(rows):
        ids[j, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[j, : len(row)] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
