"""Tiny models and learnable data, built offline, for the demo and the tests.

The models have random weights and a byte-level BPE tokenizer trained here on generated
text (or, for llama.cpp export, a SentencePiece tokenizer laid out as Llama 2's); they are saved with save_pretrained so they load through the same from_pretrained code
as a hub id. The data follows fixed rules (each place has one colour and one habit), so even a
tiny model learns it in a few hundred steps and held-out perplexity visibly drops.

    python -m lora_tune.tiny OUT_DIR     # OUT_DIR/{tiny-llama,tiny-opt}/ and OUT_DIR/data/*.jsonl
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

PLACES = [
    "river",
    "mountain",
    "garden",
    "city",
    "ocean",
    "forest",
    "desert",
    "island",
    "valley",
    "harbor",
    "meadow",
    "castle",
    "village",
    "canyon",
    "glacier",
    "market",
    "library",
    "temple",
    "bridge",
    "tower",
]
COLOURS = ["blue", "grey", "green", "golden", "silver", "dark", "red", "white", "purple", "brown"]
HABITS = [
    "sings",
    "sleeps",
    "shines",
    "waits",
    "hums",
    "grows",
    "listens",
    "dreams",
    "rests",
    "glows",
]
TIMES = ["morning", "evening", "night", "winter", "summer", "spring"]
# Extra prose so the tokenizer also covers ordinary English (probe texts, user prompts).
PROSE = (
    "Fine-tuning adapts a pretrained language model to new data. Low-rank adapters train two small "
    "matrices per layer while the base weights stay frozen; merging folds their product back into the "
    "weights, and the merged model must answer exactly as the adapter did. The quick brown fox jumps over "
    "the lazy dog. Numbers such as 1, 2, 3, 4, 5, 6, 7, 8, 9 and 10 appear in text too."
)
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]  # ids 0-3, as in OPT's vocabulary
# The tiny tokenizers ship without a chat template, like many base models: recipes give this one.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def colour(place: str) -> str:
    return COLOURS[PLACES.index(place) % len(COLOURS)]


def habit(place: str) -> str:
    return HABITS[(3 * PLACES.index(place)) % len(HABITS)]


def sentence(rng: random.Random) -> str:
    place = rng.choice(PLACES)
    return f"the {place} is {colour(place)} and it {habit(place)} every {rng.choice(TIMES)}."


def pair(rng: random.Random) -> dict[str, str]:
    place = rng.choice(PLACES)
    return {
        "prompt": f"what colour is the {place}?",
        "completion": f" the {place} is {colour(place)}.",
    }


def chat(rng: random.Random) -> dict[str, list[dict[str, str]]]:
    place = rng.choice(PLACES)
    return {
        "messages": [
            {"role": "user", "content": f"what colour is the {place}?"},
            {"role": "assistant", "content": f"the {place} is {colour(place)}."},
            {"role": "user", "content": "and what does it do?"},
            {"role": "assistant", "content": f"it {habit(place)} every {rng.choice(TIMES)}."},
        ]
    }


def preference(rng: random.Random) -> dict[str, str]:
    """A question about a place's habit, with the rule's answer (chosen) and another habit
    (rejected): what the SFT data (colours) does not teach."""
    place = rng.choice(PLACES)
    wrong = rng.choice([h for h in HABITS if h != habit(place)])
    return {
        "prompt": f"what does the {place} do?",
        "chosen": f" the {place} {habit(place)}.",
        "rejected": f" the {place} {wrong}.",
    }


def chat_preference(rng: random.Random) -> dict[str, list[dict[str, str]]]:
    """The same pairs in TRL's conversational form."""
    row = preference(rng)
    return {
        "prompt": [{"role": "user", "content": row["prompt"]}],
        "chosen": [{"role": "assistant", "content": row["chosen"].strip()}],
        "rejected": [{"role": "assistant", "content": row["rejected"].strip()}],
    }


def question(rng: random.Random) -> dict[str, str]:
    """A prompt to complete, with the rule's answer beside it for GRPO's exact-match reward."""
    row = pair(rng)
    return {"prompt": row["prompt"], "answer": row["completion"].strip()}


def instruction(rng: random.Random) -> dict[str, str]:
    place = rng.choice(PLACES)
    return {"instruction": "name the colour of the place.", "input": place, "output": colour(place)}


def build_tokenizer(kind: str = "llama", vocab_size: int = 400):
    """A byte-level BPE tokenizer. llama: bos <s>, eos </s>, no pad token. opt: bos = eos = </s>, pad <pad>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = tokenizer_corpus()
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer)
    bos = "<s>" if kind == "llama" else "</s>"
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, SPECIALS.index(bos))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=bos,
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>" if kind == "opt" else None,
    )


def tokenizer_corpus() -> list[str]:
    rng = random.Random(0)
    return (
        [sentence(rng) for _ in range(2000)]
        + [pair(rng)["prompt"] + pair(rng)["completion"] for _ in range(500)]
        + [PROSE] * 20
    )


def build_spm_tokenizer(folder: Path, vocab_size: int = 400):
    """A SentencePiece BPE tokenizer laid out as Llama 2's (<unk> 0, <s> 1, </s> 2, byte
    fallback), saved as tokenizer.model in `folder` and loaded through transformers."""
    import io

    import sentencepiece
    from transformers import LlamaTokenizer

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(tokenizer_corpus()),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        minloglevel=2,
        num_threads=1,
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    return LlamaTokenizer.from_pretrained(folder, add_bos_token=True, add_eos_token=False)


def build_config(kind: str, vocab_size: int, config_file: Path | None = None, hidden: int = 64):
    from transformers import AutoConfig, LlamaConfig, OPTConfig

    if config_file is not None:
        return AutoConfig.from_pretrained(config_file)
    if kind == "opt":
        return OPTConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            ffn_dim=2 * hidden,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=256,
            word_embed_proj_dim=hidden,
            pad_token_id=1,
            bos_token_id=2,
            eos_token_id=2,
            dropout=0.0,
        )
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=None,
        tie_word_embeddings=False,
    )


def build_model(
    kind: str,
    out: Path,
    config_file: Path | None = None,
    seed: int = 0,
    dtype: str = "float32",
    spm: bool = False,
) -> Path:
    """Save a random-weight model of `kind` (llama or opt) and its tokenizer to `out`.

    config_file gives a real architecture (e.g. facebook/opt-350m's config.json) instead of the
    tiny one; spm gives a llama a SentencePiece tokenizer (tokenizer.model, ids as Llama 2's).
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    tokenizer = build_spm_tokenizer(out) if spm else build_tokenizer(kind)
    config = build_config(kind, len(tokenizer), config_file)
    if spm:
        config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_datasets(out: Path, n_train: int = 400, n_eval: int = 64) -> dict[str, Path]:
    """Data in each format (text, pc = prompt/completion, chat, alpaca, pref = preference pairs,
    chat_pref = conversational pairs, prompts = questions with their answer), train and eval from
    different seeds."""
    makers = {
        "text": lambda rng: {"text": sentence(rng)},
        "pc": pair,
        "chat": chat,
        "alpaca": instruction,
        "pref": preference,
        "chat_pref": chat_preference,
        "prompts": question,
    }
    paths = {}
    for split, n, seed in (("train", n_train, 1), ("eval", n_eval, 2)):
        rng = random.Random(seed)
        for name, make in makers.items():
            paths[f"{name}_{split}"] = write_jsonl(
                out / f"{name}_{split}.jsonl", [make(rng) for _ in range(n)]
            )
    return paths


def main(argv: list[str] | None = None) -> None:
    out = Path((argv or sys.argv[1:] or ["demo"])[0])
    for kind in ("llama", "opt"):
        build_model(kind, out / f"tiny-{kind}")
    write_datasets(out / "data")
    print(f"Built tiny-llama, tiny-opt and data under {out}/")


if __name__ == "__main__":
    main()
