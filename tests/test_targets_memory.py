"""`lora-tune modules` sizes a GPU: the estimated peak of a training step in typical settings."""

from __future__ import annotations

from helpers import run_cli
from transformers import AutoConfig

from lora_tune import memory, models, targets
from lora_tune.recipe import ModelSection

BATCH, LENGTH, R = 4, 2048, 16
SETTINGS = ["bf16", "bf16, checkpointing", "QLoRA 4-bit, checkpointing"]


def expected_terms(config) -> dict[str, dict[str, int]]:
    """Each setting's terms in bytes, counted from the Llama config: its linear layers, norms and
    embeddings; activations per token and layer; logits per token and vocabulary entry."""
    h, m, n, vocab = (
        config.hidden_size,
        config.intermediate_size,
        config.num_hidden_layers,
        config.vocab_size,
    )
    kv = config.num_key_value_heads * h // config.num_attention_heads
    linear = [(h, h), (h, kv), (h, kv), (h, h), (h, m), (h, m), (m, h)]  # q k v o gate up down
    quantizable = n * sum(i * o for i, o in linear)
    other = 2 * vocab * h + (2 * n + 1) * h  # embeddings, lm_head (untied), the RMSNorms
    trainable = n * sum(R * (i + o) for i, o in linear)  # A (r x in) and B (out x r) per layer
    tokens = BATCH * LENGTH
    per_layer = memory.HIDDEN_ACTIVATIONS * h + memory.MLP_ACTIVATIONS * m
    lora = trainable * 4  # fp32
    state = trainable * (4 + 8)  # its fp32 gradient and AdamW's two moments
    logits = int(tokens * vocab * 4 * memory.LOGIT_COPIES)  # fp32 copies
    bf16 = (quantizable + other) * 2
    # 4 bits per quantized weight and an fp32 scale per 64 of them; the rest upcast to fp32.
    qlora = int(quantizable * (0.5 + 4 / 64) + other * 4)
    full = tokens * n * per_layer * 2  # bf16 activations of every layer
    checkpointed = tokens * (n * h + per_layer) * 2  # layer inputs, one layer recomputed
    rows = {
        "bf16": (bf16, full),
        "bf16, checkpointing": (bf16, checkpointed),
        "QLoRA 4-bit, checkpointing": (qlora, checkpointed),
    }
    return {
        label: {
            "base weights": weights,
            "LoRA parameters": lora,
            "gradients and optimizer state": state,
            "activations": activations,
            "logits and loss": logits,
            "fixed overhead": memory.OVERHEAD["cuda"],
        }
        for label, (weights, activations) in rows.items()
    }


def test_typical_estimates_count_the_tiny_llama_term_by_term(tiny):
    config = AutoConfig.from_pretrained(tiny / "tiny-llama")
    skeleton = models.meta_model(models.load_config(ModelSection(id=str(tiny / "tiny-llama"))))
    estimates = targets.typical_estimates(skeleton, trainable=32768)
    expected = expected_terms(config)
    assert list(estimates) == SETTINGS
    for label, estimate in estimates.items():
        assert estimate.terms == expected[label], label
        assert estimate.total == sum(expected[label].values())
    # The tiny Llama: 400 tokens, hidden 64, 2 layers; r=16 on all 14 linear layers.
    assert expected["bf16"]["base weights"] == 2 * (73728 + 51520)
    assert expected["bf16"]["LoRA parameters"] == 32768 * 4


def test_modules_prints_the_memory_table(tiny, capsys):
    assert run_cli("modules", tiny / "tiny-llama") == 0
    text = capsys.readouterr().out
    assert "all linear layers: target_modules: all-linear  ->  32,768 trainable" in text
    assert (
        "Memory of a training step on one GPU (estimate): batch 4 x 2,048 tokens, LoRA r=16 on "
        "all linear layers, AdamW" in text
    )
    table = text[text.index("Memory of a training step") :]
    header = next(line for line in table.splitlines() if line.startswith("┃"))
    assert [cell.strip() for cell in header.split("┃")[1:-1]] == ["", *SETTINGS]
    cells = {
        parts[0]: parts[1:]
        for line in table.splitlines()
        if line.startswith("│")
        for parts in [[cell.strip() for cell in line.split("│")[1:-1]]]
    }
    expected = expected_terms(AutoConfig.from_pretrained(tiny / "tiny-llama"))
    assert list(cells) == [*expected["bf16"], "peak"]
    for term in expected["bf16"]:
        assert cells[term] == [memory.gib(terms[term]) for terms in expected.values()], term
    assert cells["peak"] == [memory.gib(sum(terms.values())) for terms in expected.values()]
