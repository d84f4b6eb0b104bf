"""Will it fit? The peak memory of a training step, estimated before any weight loads.

The estimate adds up, per process: the base weights (in their dtype, or 4/8-bit with their
quantization constants), the LoRA parameters with their gradients and optimizer state, the
activations kept for the backward pass of the longest batch (per token and layer, from the
hidden and MLP sizes; only the layer inputs with gradient checkpointing, plus one layer
recomputed), the logits and loss buffers (batch x length x vocabulary: often the largest term),
and a small fixed overhead. FSDP and ZeRO-3 divide the weights over the processes, ZeRO-2 the
gradients and optimizer state. Preference methods score two sequences per pair.

The coefficients were measured on a CPU (fp32, SDPA attention) with scripts/bench_memory.py,
which prints estimate / measured for each of its configurations.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

GIB = 1024**3
# Elements kept per token and decoder layer for the backward pass: about 14 hidden-sized and 8
# MLP-sized tensors (norm inputs, LoRA inputs, rotary q/k, attention q/k/v/out, SiLU and its
# product), measured (bench_memory) rather than derived.
HIDDEN_ACTIVATIONS, MLP_ACTIVATIONS = 14, 8
# Eager attention keeps about 4 batch x heads x length^2 tensors per layer (scores, softmax, ...).
EAGER_COPIES = 4
# Copies of the batch's logits alive at the loss's peak: the logits, log-softmax and their
# gradients (fp32).
LOGIT_COPIES = 3.5
# TRL's fused log-probability head (DPO, KTO) scores this many rows at a time (train.py sets the
# CPU's size; TRL's own default elsewhere), and keeps about a quarter of a chunk's logits.
FUSED_ROWS = {"cpu": 1024, "cuda": 32768}
FUSED_LOGIT_COPIES = 0.25
# Those trainers keep 1.2x the activations of an SFT step on the same tokens, and gradient
# checkpointing keeps 0.45 of that (it drops far less than for SFT): measured by bench_memory.
FUSED_ACTIVATIONS, FUSED_CHECKPOINTED = 1.2, 0.45
OVERHEAD = {"cpu": 48 * 1024**2, "cuda": 256 * 1024**2}  # allocator, buffers, CUDA workspaces
OPTIMIZER_BYTES = {  # bytes of optimizer state per trainable parameter
    "adamw": 8,
    "adam": 8,
    "adamw_8bit": 2,
    "paged_adamw_8bit": 2,
    "adafactor": 4,
    "sgd": 4,
    "lion": 4,
}
# Verdicts: below TIGHT of the memory fits; below REFUSE runs but may not fit; above it, train
# stops before loading weights unless --force.
TIGHT, REFUSE = 0.85, 1.10


@dataclass(frozen=True)
class Shape:
    """What the estimate needs of a model, read from its meta-device skeleton."""

    layers: int
    hidden: int
    mlp: int
    vocab: int
    heads: int
    quantizable: int  # parameters of the decoder's linear layers (what 4/8-bit quantizes)
    other: int  # embeddings, output layer, norms


@dataclass(frozen=True)
class Setting:
    """How the step runs: what the recipe and the hardware say."""

    batch: int  # sequences per device and step
    length: int  # tokens of the longest sequence
    weight_bytes: float  # per parameter of the base: 4 fp32, 2 bf16/fp16
    activation_bytes: int  # per activation element
    trainable: int
    quantized_bits: int | None = None
    checkpointing: bool = False
    optimizer: str = "adamw"
    sequences_per_row: int = 1  # 2 for preference pairs (chosen and rejected)
    fused_rows: int | None = None  # the fused log-probability head's chunk, where one is used
    device: str = "cpu"
    processes: int = 1
    sharding: str = "ddp"  # ddp, fsdp, zero2, zero3
    eager_attention: bool = (
        False  # keeps each layer's attention probabilities (batch x heads x s^2)
    )


@dataclass
class Estimate:
    terms: dict[str, int] = field(default_factory=dict)  # name -> bytes, per process

    @property
    def total(self) -> int:
        return sum(self.terms.values())


def optimizer_bytes(name: str) -> int:
    """State bytes per parameter of a TrainingArguments `optim` (8-bit ones by their suffix)."""
    name = str(name).lower()
    if "8bit" in name:
        return 2
    return next((b for key, b in OPTIMIZER_BYTES.items() if name.startswith(key)), 8)


def weight_bytes(shape: Shape, setting: Setting) -> float:
    """The base weights: quantized linear layers at their bits plus their constants (an fp32
    scale per 64 weights; double quantization shrinks it to about 1/8), the rest in fp32 (PEFT's
    preparation for k-bit training upcasts it) or the model's dtype."""
    if setting.quantized_bits == 4:
        return shape.quantizable * (0.5 + 0.0625) + shape.other * 4
    if setting.quantized_bits == 8:
        return shape.quantizable * (1 + 0.0625) + shape.other * 4
    return (shape.quantizable + shape.other) * setting.weight_bytes


def activation_elements(shape: Shape, setting: Setting) -> float:
    """Activation elements kept for the backward pass of one step."""
    tokens = setting.batch * setting.sequences_per_row * setting.length
    per_layer = HIDDEN_ACTIVATIONS * shape.hidden + MLP_ACTIVATIONS * shape.mlp
    if setting.eager_attention:  # SDPA's kernels keep no such matrix; eager keeps some per layer
        per_layer += EAGER_COPIES * shape.heads * setting.length
    if setting.fused_rows:  # TRL's DPO and KTO
        full = tokens * shape.layers * per_layer * FUSED_ACTIVATIONS
        return full * FUSED_CHECKPOINTED if setting.checkpointing else full
    if setting.checkpointing:  # each layer's input, and one layer's own while it is recomputed
        return tokens * (shape.layers * shape.hidden + per_layer)
    return tokens * shape.layers * per_layer


def logit_bytes(shape: Shape, setting: Setting) -> float:
    rows = setting.batch * setting.sequences_per_row * setting.length
    if setting.fused_rows:
        return min(rows, setting.fused_rows) * shape.vocab * 4 * FUSED_LOGIT_COPIES
    return rows * shape.vocab * 4 * LOGIT_COPIES


def estimate(shape: Shape, setting: Setting) -> Estimate:
    """The peak of one training step, per process, term by term."""
    weights = weight_bytes(shape, setting)
    if setting.sharding in ("fsdp", "zero3"):
        weights /= setting.processes
    state = setting.trainable * (4 + optimizer_bytes(setting.optimizer))
    if setting.sharding in ("fsdp", "zero2", "zero3"):
        state /= setting.processes
    terms = {
        "base weights": weights,
        "LoRA parameters": setting.trainable * 4,
        "gradients and optimizer state": state,
        "activations": activation_elements(shape, setting) * setting.activation_bytes,
        "logits and loss": logit_bytes(shape, setting),
        "fixed overhead": OVERHEAD[setting.device],
    }
    return Estimate({name: int(value) for name, value in terms.items()})


def verdict(total: int, capacity: int | None) -> str:
    if capacity is None:
        return "no memory size known"
    if total <= TIGHT * capacity:
        return "fits"
    return "tight" if total <= REFUSE * capacity else "does not fit"


def sharding_from_environment() -> str:
    """How accelerate divides the model in this process (set by `accelerate launch`)."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "fsdp"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
        return "zero3" if stage == "3" else "zero2"
    return "ddp"


def shape_of(skeleton) -> Shape:
    """The Shape of a model built on the meta device. Quantizable: the weights of the linear
    layers that bitsandbytes replaces (every one but the output layer)."""
    from .models import linear_module_names

    config = skeleton.config.get_text_config()
    linear = set(linear_module_names(skeleton))
    quantizable = sum(
        module.weight.numel() for name, module in skeleton.named_modules() if name in linear
    )
    total = sum(param.numel() for param in skeleton.parameters())
    hidden = getattr(config, "hidden_size", None) or getattr(config, "d_model", 0)
    mlp = getattr(config, "intermediate_size", None) or getattr(config, "ffn_dim", None)
    return Shape(
        layers=getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 0),
        hidden=hidden,
        mlp=mlp or 4 * hidden,
        vocab=config.vocab_size,
        heads=getattr(config, "num_attention_heads", None) or 0,
        quantizable=quantizable,
        other=total - quantizable,
    )


def gib(n: float) -> str:
    """A memory size to read: '1.52 GiB', '240 MiB', '3.1 MiB'."""
    if n >= GIB:
        return f"{n / GIB:.2f} GiB"
    mib = n / 1024**2
    return f"{mib:.1f} MiB" if mib < 10 else f"{mib:,.0f} MiB"


def parse_size(text: str) -> int:
    """'24GiB', '24GB', '24G', '1.5TiB' or a number of bytes -> bytes (GB and GiB both 2**30:
    memory sizes are quoted that way)."""
    import re

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B)?\s*", str(text), re.IGNORECASE)
    if not match:
        from .errors import UserError

        raise UserError(
            f"--memory: cannot read {text!r} as a memory size", ["write it like 24GiB or 80GB"]
        )
    power = " KMGT".index(match.group(2).upper() or " ")
    return int(float(match.group(1)) * 1024**power)
