"""Greedy generation on prompt-style eval data, and the answer metrics computed on it.

Prompts and references come from the tokenized eval samples themselves: the prompt is
everything before the first trained token, the reference is the trained run that follows
(without its EOS). Text-only data has no prompts, so it gets no generation metrics.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass

import torch

ARTICLES = re.compile(r"\b(a|an|the)\b")


@dataclass
class Item:
    prompt_ids: list[int]
    prompt: str
    reference: str


def items_of(dataset, tokenizer) -> list[Item]:
    """Prompt/reference pairs of the samples that have a prompt."""
    items = []
    for input_ids, labels in zip(dataset["input_ids"], dataset["labels"], strict=False):
        start = next((i for i, label in enumerate(labels) if label != -100), None)
        if start is None or start < 2:  # no prompt beyond a BOS: plain text
            continue
        end = next((i for i in range(start, len(labels)) if labels[i] == -100), len(labels))
        reference = [t for t in input_ids[start:end] if t != tokenizer.eos_token_id]
        items.append(
            Item(
                input_ids[:start],
                tokenizer.decode(input_ids[:start], skip_special_tokens=True),
                tokenizer.decode(reference, skip_special_tokens=True),
            )
        )
    return items


def normalize(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (the usual answer normalization)."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(ARTICLES.sub(" ", text).split())


def token_f1(prediction: str, reference: str) -> float:
    """F1 of the normalized words in common (a bag of words, counted with multiplicity)."""
    predicted, expected = normalize(prediction).split(), normalize(reference).split()
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def score(predictions: list[str], references: list[str], lengths: list[int]) -> dict:
    n = len(references)
    return {
        "exact_match": sum(
            p.strip() == r.strip() for p, r in zip(predictions, references, strict=False)
        )
        / n,
        "normalized_exact_match": sum(
            normalize(p) == normalize(r) for p, r in zip(predictions, references, strict=False)
        )
        / n,
        "token_f1": sum(token_f1(p, r) for p, r in zip(predictions, references, strict=False)) / n,
        "generated_tokens": sum(lengths) / n,
    }


def cut(text: str, stop: list[str]) -> str:
    positions = [text.find(s) for s in stop if s and s in text]
    return text[: min(positions)] if positions else text


@torch.no_grad()
def generate(
    model,
    tokenizer,
    items: list[Item],
    max_new_tokens: int,
    stop: list[str],
    batch_size: int,
    device,
) -> tuple[list[str], list[int]]:
    """Greedy continuations (cut at EOS and at any stop string) and their token counts, in item order."""
    order = sorted(range(len(items)), key=lambda i: -len(items[i].prompt_ids))
    texts, lengths = [""] * len(items), [0] * len(items)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(items[i].prompt_ids) for i in chunk)
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):  # left padding, so every continuation starts at `width`
            prompt = items[i].prompt_ids
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        for row, i in enumerate(chunk):
            new = out[row, width:].tolist()
            if tokenizer.eos_token_id in new:
                new = new[: new.index(tokenizer.eos_token_id)]
            text = cut(tokenizer.decode(new, skip_special_tokens=True), stop)
            texts[i] = text
            lengths[i] = (
                len(tokenizer(text, add_special_tokens=False)["input_ids"]) if text != "" else 0
            )
    return texts, lengths
