"""Does a GGUF file answer as the transformers model it came from? Checked in llama.cpp itself
(llama-cpp-python) on probe texts: the tokenizer (same token ids), the special tokens and chat
template (same metadata), next-token logits at every position (within a tolerance for 16/32-bit
files; top-1 agreement for quantized ones) and greedy continuations."""

from __future__ import annotations

import contextlib
import os

import numpy as np
import torch

# Largest |logit difference| allowed, times max(1, largest |logit|), by GGUF type. llama.cpp
# multiplies f16 weights with f16-rounded activations, so f16 sits well above fp32 rounding.
TOLERANCE = {"f32": 1e-3, "f16": 1e-2, "bf16": 5e-2}
QUANTIZED_AGREEMENT = 0.9  # top-1 agreement below which a quantized file is reported as degraded
CONTINUATION = 16  # greedy tokens compared after each probe prompt
PROBE_TOKENS = 128  # logits of every position are held on both sides: vocab x this x probes


def threads() -> int:
    return max(1, len(os.sched_getaffinity(0)))


@contextlib.contextmanager
def opened(path, n_ctx: int, lora=None):
    """A llama.cpp model (with a LoRA GGUF on top) that keeps the logits of every position."""
    from llama_cpp import Llama

    with open(os.devnull, "w") as quiet, contextlib.redirect_stderr(quiet):
        llm = Llama(
            model_path=str(path),
            lora_path=str(lora) if lora else None,
            n_ctx=n_ctx,
            n_batch=n_ctx,
            logits_all=True,
            n_threads=threads(),
            seed=0,
            verbose=False,
        )
    try:
        yield llm
    finally:
        llm.close()


def gguf_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: llm.n_tokens], dtype=np.float32)


@torch.no_grad()
def hf_logits(model, ids: list[int]) -> np.ndarray:
    return model(torch.tensor([ids])).logits[0].float().numpy()


def gguf_greedy(llm, ids: list[int], n: int, stop: set[int]) -> list[int]:
    out = []
    llm.reset()
    llm.eval(ids)
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if token in stop:
            break
        out.append(token)
        llm.eval([token])
    return out


@torch.no_grad()
def hf_greedy(model, ids: list[int], n: int, stop: set[int]) -> list[int]:
    out, row = [], list(ids)
    for _ in range(n):
        token = int(model(torch.tensor([row])).logits[0, -1].argmax())
        if token in stop:
            break
        out.append(token)
        row.append(token)
    return out


def compare_logits(reference: list[np.ndarray], got: list[np.ndarray], quant: str) -> dict:
    ref, other = np.concatenate(reference), np.concatenate(got)
    diff = np.abs(ref - other)
    scale = max(1.0, float(np.abs(ref).max()))
    agreement = float((ref.argmax(-1) == other.argmax(-1)).mean())
    result = {
        "positions": int(ref.shape[0]),
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "top1_agreement": agreement,
        "finite": bool(np.isfinite(other).all()),
    }
    if quant in TOLERANCE:
        result["tolerance"] = TOLERANCE[quant] * scale
        result["ok"] = result["finite"] and result["max_abs_diff"] <= result["tolerance"]
    else:
        result["min_top1_agreement"] = QUANTIZED_AGREEMENT
        result["ok"] = result["finite"] and agreement >= QUANTIZED_AGREEMENT
    return result


def probe_texts(tokenizer, rows: list[list[int]], extra: list[str]) -> list[str]:
    """The probes' texts (after a BOS), and more texts to tokenize."""
    texts = []
    for ids in rows:
        start = 1 if ids[:1] == [tokenizer.bos_token_id] else 0
        texts.append(tokenizer.decode(ids[start:], skip_special_tokens=False))
    return texts + list(extra)


def compare_tokens(llm, tokenizer, texts: list[str]) -> dict:
    """Each text tokenized by llama.cpp and by transformers, each adding the special tokens its
    own configuration says (a BOS one adds and the other not is a difference too)."""
    differing = []
    for text in texts:
        ours = tokenizer(text)["input_ids"]
        theirs = llm.tokenize(text.encode(), add_bos=True, special=True)
        if theirs != ours:
            differing.append({"text": text, "transformers": ours, "llama.cpp": theirs})
    return {"texts": len(texts), "differing": differing, "ok": not differing}


def compare_metadata(llm, tokenizer) -> dict:
    """The special tokens and chat template the GGUF carries, against the tokenizer's."""
    meta = llm.metadata
    expected = {
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "chat_template": tokenizer.chat_template or None,
    }
    found = {
        "bos": llm.token_bos() if expected["bos"] is not None else None,
        "eos": llm.token_eos(),
        "chat_template": meta.get("tokenizer.chat_template"),
    }
    wrong = [key for key in expected if expected[key] != found[key]]
    return {"expected": expected, "found": found, "differing": wrong, "ok": not wrong}


def verify(path, model, tokenizer, rows: list[list[int]], quant: str, lora=None, texts=()) -> dict:
    """Every check of the GGUF at `path` against the transformers `model` on `rows` (cut to
    PROBE_TOKENS), and of its tokenizer on their texts and `texts`."""
    rows = [list(ids[:PROBE_TOKENS]) for ids in rows]
    stop = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    n_ctx = max(len(ids) for ids in rows) + CONTINUATION + 8
    prompts = [ids[: max(2, len(ids) // 2)] for ids in rows]
    with opened(path, n_ctx, lora) as llm:
        report = {
            "tokenizer": compare_tokens(llm, tokenizer, probe_texts(tokenizer, rows, texts)),
            "metadata": compare_metadata(llm, tokenizer),
            "logits": compare_logits(
                [hf_logits(model, ids) for ids in rows],
                [gguf_logits(llm, ids) for ids in rows],
                quant,
            ),
        }
        theirs = [gguf_greedy(llm, ids, CONTINUATION, stop) for ids in prompts]
    ours = [hf_greedy(model, ids, CONTINUATION, stop) for ids in prompts]
    report["greedy"] = {
        "prompts": len(prompts),
        "identical": sum(a == b for a, b in zip(ours, theirs, strict=True)),
        "transformers": ours,
        "llama.cpp": theirs,
        "llama.cpp_text": [tokenizer.decode(ids) for ids in theirs],
    }
    return report
