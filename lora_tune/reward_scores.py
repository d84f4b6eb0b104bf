"""Rewards of a model's own completions on prompt-only data: what `lora-tune eval` reports for
GRPO runs.

Each prompt is tokenized as GRPOTrainer tokenizes it (prompts.tokenize_prompt) and completed
greedily, and with --sampled N also N times by sampling with the run's temperature, top_p and
top_k, as GRPO samples during training. A completion ends at its first EOS (TRL's completion
ids keep that EOS; its text does not), is decoded without special tokens, and reaches the
reward functions as TRL hands it to them: text, or for chat prompts a list holding one assistant
message, with the row's other columns. Scores are TRL's too: the weighted sum of the rewards per
completion (a reward that returns None leaves its term out), averaged over the completions.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field

import torch

from . import prompts, rewards
from .common import length_sorted, pad_rows

# GRPOConfig's sampling fields, read from the recipe's training section (TRL's defaults otherwise).
SAMPLING = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
SEED = 0  # sampled completions start from this seed for every model, so each is drawn alike


@dataclass
class PromptData:
    """Evaluation prompts in TRL's rows, their token ids, and how they are completed and scored."""

    rows: list[dict]
    prompt_ids: list[list[int]]
    rewards: list[rewards.Reward]
    max_new_tokens: int
    sampled: int = 0  # sampled completions per prompt (0: greedy only)
    sampling: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.rows)

    def columns(self, repeat: int = 1) -> dict[str, list]:
        """The rows' other columns, one value per completion (each row's `repeat` times)."""
        names = [name for name in self.rows[0] if name != "prompt"] if self.rows else []
        return {name: [row[name] for row in self.rows for _ in range(repeat)] for name in names}


def grpo_default(name: str):
    """A GRPOConfig field's default (TRL's, whatever version is installed)."""
    from .methods import METHODS

    fields = dataclasses.fields(METHODS["grpo"].config_class())
    return next(f.default for f in fields if f.name == name)


def prompt_data(rows, recipe, tokenizer, max_new_tokens: int | None, sampled: int) -> PromptData:
    """PromptData of checked prompt-only rows, with the rewards and sampling of a grpo recipe."""
    training = recipe.training
    sampling = {key: training.get(key, grpo_default(key)) for key in SAMPLING}
    length = (
        max_new_tokens
        or training.get("max_completion_length")
        or grpo_default("max_completion_length")
    )
    listed = [dict(row) for row in rows]
    ids = [prompts.tokenize_prompt(tokenizer, row["prompt"]) for row in listed]
    return PromptData(listed, ids, recipe.rewards, length, sampled, sampling)


def eos_ids(model, tokenizer) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS and the model's, as GRPOTrainer takes them."""
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    return [tokenizer.eos_token_id, *(i for i in ids if i != tokenizer.eos_token_id)]


@torch.no_grad()
def complete(model, tokenizer, prompt_ids, data: PromptData, batch_size: int, device, sample: bool):
    """Completion token ids, EOS included where one ended it, in prompt order: one list per
    prompt, greedy, or data.sampled of them sampled."""
    ends = eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ends[0]
    n = data.sampled if sample else 1
    options = {"do_sample": True, **data.sampling} if sample else {"do_sample": False}
    if sample:
        torch.manual_seed(SEED)
    found: list[list[list[int]]] = [[] for _ in prompt_ids]
    for chunk in length_sorted([len(ids) for ids in prompt_ids], batch_size):
        width = max(len(prompt_ids[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):  # left padding: every completion starts at `width`
            ids[row, width - len(prompt_ids[i]) :] = torch.tensor(prompt_ids[i])
            mask[row, width - len(prompt_ids[i]) :] = 1
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=data.max_new_tokens,
            num_return_sequences=n,
            pad_token_id=pad,
            eos_token_id=ends,
            **options,
        )
        for row, sequence in enumerate(out[:, width:].tolist()):
            end = next((j for j, t in enumerate(sequence) if t in ends), None)
            found[chunk[row // n]].append(sequence if end is None else sequence[: end + 1])
    return found


def scores(data: PromptData, completion_ids: list[list[list[int]]], tokenizer) -> tuple[dict, list]:
    """The rewards of the completions: ({reward: mean, rewards/NAME: mean, completion_length},
    the first completion text of each prompt)."""
    n = len(completion_ids[0])
    flat = [ids for per_prompt in completion_ids for ids in per_prompt]
    texts = tokenizer.batch_decode(flat, skip_special_tokens=True)
    prompt_list = [row["prompt"] for row in data.rows for _ in range(n)]
    chat = bool(prompt_list) and isinstance(prompt_list[0], list)
    completions = [[{"role": "assistant", "content": t}] for t in texts] if chat else texts
    found = rewards.score(data.rewards, prompt_list, completions, flat, data.columns(n))
    total = [0.0] * len(flat)
    for reward in data.rewards:
        for i, value in enumerate(found[reward.name]):
            total[i] += 0.0 if math.isnan(value) else reward.weight * value
    metrics = {"reward": sum(total) / len(total)}
    for name, values in found.items():
        kept = [value for value in values if not math.isnan(value)]
        metrics[f"rewards/{name}"] = sum(kept) / len(kept) if kept else math.nan
    metrics["completion_length"] = sum(len(ids) for ids in flat) / len(flat)
    return metrics, texts[::n]


@torch.no_grad()
def first_logits(model, data: PromptData, batch_size: int, pad: int, device) -> torch.Tensor:
    """The logits of the first batch of prompts at their real tokens: merged vs adapter."""
    batch = pad_rows(data.prompt_ids[:batch_size], pad, device)
    logits = model(**batch).logits
    return logits[batch["attention_mask"].bool()].float()


def evaluate(model, tokenizer, data: PromptData, batch_size: int, device):
    """(metrics, greedy completion texts, first logits) of one model on the prompts."""
    start = time.perf_counter()
    greedy = complete(model, tokenizer, data.prompt_ids, data, batch_size, device, sample=False)
    metrics, texts = scores(data, greedy, tokenizer)
    generated = sum(len(ids) for per_prompt in greedy for ids in per_prompt)
    if data.sampled:
        sampled = complete(model, tokenizer, data.prompt_ids, data, batch_size, device, True)
        more, _ = scores(data, sampled, tokenizer)
        metrics |= {f"sampled_{key}": value for key, value in more.items()}
        generated += sum(len(ids) for per_prompt in sampled for ids in per_prompt)
    seconds = time.perf_counter() - start
    metrics |= {
        "prompts": len(data),
        "seconds": seconds,
        "tokens_per_second": generated / seconds,
    }
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return metrics, texts, first_logits(model, data, batch_size, pad, device)
