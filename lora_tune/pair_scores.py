"""Log-probabilities of preference pairs: which answer a model itself prefers, and by how much.

Each pair is (prompt_ids, chosen_ids, rejected_ids), tokenized as TRL's DPOTrainer tokenizes
them. Prompt+chosen and prompt+rejected are each one sequence and get one forward pass; the
score of an answer is the sum of log p(token | everything before it) over its tokens, as TRL
sums it. DPO's implicit reward is beta * (policy logp - reference logp) of these sums; here the
model is compared with nothing but itself: a pair is ranked right when its chosen answer has the
higher log-probability.

Sequences are batched longest first and right-padded; padding is masked by position (the pad id
may be EOS, a real answer token). Sequences longer than max_length are cut as TRL's collator cuts
them (keep_start, or keep_end).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from .common import length_sorted, pad_rows


@dataclass
class Scores:
    """One value per sequence: the summed log-prob of its answer, its answer tokens counted, and
    how many of them the model ranks first (greedy next-token accuracy)."""

    logps: torch.Tensor  # float64, on the CPU
    tokens: torch.Tensor
    correct: torch.Tensor


@dataclass
class PairScores:
    chosen: Scores
    rejected: Scores
    first_logits: torch.Tensor | None  # the first batch's logits at answer positions
    seconds: float
    input_tokens: int  # every real token the model read

    @property
    def margins(self) -> torch.Tensor:
        return self.chosen.logps - self.rejected.logps

    def metrics(self) -> dict:
        """The preference numbers, and the SFT ones on the chosen answers (token-weighted loss,
        perplexity, next-token accuracy, as `lora-tune eval` reports them for SFT data)."""
        chosen, rejected = self.chosen, self.rejected
        answer_tokens = int(chosen.tokens.sum())
        loss = -float(chosen.logps.sum()) / max(answer_tokens, 1)
        return {
            "pairs": len(chosen.logps),
            "preference_accuracy": float((self.margins > 0).double().mean()),
            "margin": float(self.margins.mean()),
            "chosen_logp": float(chosen.logps.mean()),
            "rejected_logp": float(rejected.logps.mean()),
            # Per pair, the answer's mean log-prob per token (SimPO's length-normalized score).
            "chosen_logp_per_token": float((chosen.logps / chosen.tokens.clamp(min=1)).mean()),
            "rejected_logp_per_token": float(
                (rejected.logps / rejected.tokens.clamp(min=1)).mean()
            ),
            "loss": loss,
            "perplexity": math.exp(min(loss, 700)),
            "token_accuracy": int(chosen.correct.sum()) / max(answer_tokens, 1),
            "tokens": answer_tokens,
            "seconds": self.seconds,
            "tokens_per_second": self.input_tokens / self.seconds,
        }


def triple(pair) -> tuple[list[int], list[int], list[int]]:
    """(prompt_ids, chosen_ids, rejected_ids) of a tuple or of a row with TRL's column names."""
    if isinstance(pair, dict):
        return pair["prompt_ids"], pair["chosen_ids"], pair["rejected_ids"]
    return tuple(pair)


def cut(ids: list[int], start: int, max_length: int | None, mode: str) -> tuple[list[int], int]:
    """A sequence and where its answer starts, truncated to max_length as TRL's collator does."""
    if max_length is None or len(ids) <= max_length:
        return ids, start
    if mode == "keep_end":
        dropped = len(ids) - max_length
        return ids[dropped:], max(start - dropped, 0)
    if mode != "keep_start":
        raise ValueError(f"truncation mode {mode!r}: expected keep_start or keep_end")
    return ids[:max_length], min(start, max_length)


def sequences(
    pairs: Iterable, max_length: int | None = None, truncation_mode: str = "keep_start"
) -> list[tuple[list[int], int]]:
    """(token ids, answer start) of every prompt+chosen sequence, then every prompt+rejected one."""
    chosen, rejected = [], []
    for pair in pairs:
        prompt, good, bad = (list(part) for part in triple(pair))
        chosen.append(cut(prompt + good, len(prompt), max_length, truncation_mode))
        rejected.append(cut(prompt + bad, len(prompt), max_length, truncation_mode))
    return chosen + rejected


def answer_mask(batch: list[tuple[list[int], int]], width: int, device) -> torch.Tensor:
    """True at the answer tokens of each sequence, by position (padding and prompt are False)."""
    mask = torch.zeros((len(batch), width), dtype=torch.bool)
    for j, (ids, start) in enumerate(batch):
        mask[j, start : len(ids)] = True
    return mask.to(device)


@torch.no_grad()
def score_sequences(
    model, items: Sequence[tuple[list[int], int]], batch_size: int, pad_id: int, device
) -> tuple[Scores, torch.Tensor | None]:
    """Summed answer log-probs of each (ids, answer start), in the order given, and the first
    batch's logits at the answer positions. The first token of a sequence is never scored:
    nothing precedes it."""
    n = len(items)
    logps = torch.zeros(n, dtype=torch.float64)
    tokens, correct = torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long)
    first = None
    for group in length_sorted([len(ids) for ids, _ in items], batch_size):
        batch = [items[i] for i in group]
        inputs = pad_rows([ids for ids, _ in batch], pad_id, device)
        logits = model(**inputs).logits[:, :-1]
        keep = answer_mask(batch, inputs["input_ids"].shape[1], device)[:, 1:]
        picked, targets = logits[keep].float(), inputs["input_ids"][:, 1:][keep]
        token_logps = picked.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
        rows = keep.nonzero()[:, 0].cpu()
        where = torch.tensor(group)
        logps[where] = torch.zeros(len(batch), dtype=torch.float64).index_add_(
            0, rows, token_logps.double().cpu()
        )
        tokens[where] = keep.sum(1).cpu()
        hits = (picked.argmax(-1) == targets).long().cpu()
        correct[where] = torch.zeros(len(batch), dtype=torch.long).index_add_(0, rows, hits)
        if first is None:
            first = picked
    return Scores(logps, tokens, correct), first


@torch.no_grad()
def score_pairs(
    model,
    pairs: Iterable,
    batch_size: int = 8,
    pad_id: int = 0,
    device=None,
    max_length: int | None = None,
    truncation_mode: str = "keep_start",
) -> PairScores:
    """Summed log-probs of each pair's chosen and rejected answer given its prompt.

    `pairs`: (prompt_ids, chosen_ids, rejected_ids) tuples, or rows with those columns (as
    TRL's DPOTrainer stores them). `batch_size` counts sequences per forward pass; `device` is
    where the batches go (default: the model's). `scores.chosen.logps[i]` and
    `scores.rejected.logps[i]` belong to pair i.
    """
    device = device if device is not None else next(model.parameters()).device
    items = sequences(pairs, max_length, truncation_mode)
    start = time.perf_counter()
    scores, first = score_sequences(model, items, batch_size, pad_id, device)
    seconds = time.perf_counter() - start
    n = len(items) // 2
    chosen = Scores(scores.logps[:n], scores.tokens[:n], scores.correct[:n])
    rejected = Scores(scores.logps[n:], scores.tokens[n:], scores.correct[n:])
    input_tokens = sum(len(ids) for ids, _ in items)
    return PairScores(chosen, rejected, first, seconds, input_tokens)
