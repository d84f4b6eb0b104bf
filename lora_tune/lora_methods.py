"""LoRA methods and adapter features: what the recipe offers, what merge and serve must know.

LORA_METHODS maps the recipe's lora.method to its PEFT config class and the peft_type its
adapters save; FEATURES lists adapter_config.json options that not every consumer handles. Each
says whether the streaming merge (stream_merge.py) computes it and whether vLLM's LoRA loader
(serve_vllm.py) takes it; a new method or option is one entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class LoraMethod:
    name: str
    config: str  # PEFT config class, e.g. LoraConfig
    peft_type: str  # as adapter_config.json saves it
    description: str
    total_step: bool = False  # its config takes the run's step count (AdaLoRA's rank schedule)
    stream_merge: bool = False
    vllm: bool = False


LORA_METHODS: dict[str, LoraMethod] = {
    method.name: method
    for method in (
        LoraMethod(
            "lora",
            "LoraConfig",
            "LORA",
            "peft.LoraConfig, the default",
            stream_merge=True,
            vllm=True,
        ),
        LoraMethod(
            "adalora",
            "AdaLoraConfig",
            "ADALORA",
            "peft.AdaLoraConfig: ranks reallocated while training",
            total_step=True,
        ),
    )
}


def _trained_biases(config: dict) -> bool:
    return config.get("bias", "none") != "none" or bool(config.get("lora_bias"))


@dataclass(frozen=True)
class Feature:
    key: str  # the adapter_config.json option
    label: str  # how a refusal names it
    stream_merge: bool
    vllm: bool
    used: Callable[[dict], bool] | None = None  # default: the option is set

    def in_(self, config: dict) -> bool:
        return self.used(config) if self.used else bool(config.get(self.key))


# In the order refusals name them.
FEATURES = (
    Feature("use_dora", "DoRA", stream_merge=True, vllm=False),
    Feature("modules_to_save", "modules_to_save", stream_merge=True, vllm=False),
    Feature("layer_replication", "layer_replication", stream_merge=False, vllm=True),
    Feature("target_parameters", "target_parameters", stream_merge=False, vllm=True),
    Feature(
        "trainable_token_indices",
        "added tokens (trainable_token_indices)",
        stream_merge=False,
        vllm=False,
    ),
    Feature("alora_invocation_tokens", "alora_invocation_tokens", stream_merge=False, vllm=True),
    Feature("lora_bias", "LoRA biases", stream_merge=True, vllm=False, used=_trained_biases),
)


def handles_type(config: dict, consumer: str) -> bool:
    """Whether `consumer` ("stream_merge" or "vllm") takes adapters of this config's peft_type."""
    return any(
        method.peft_type == config.get("peft_type") and getattr(method, consumer)
        for method in LORA_METHODS.values()
    )


def unhandled(config: dict, consumer: str) -> list[Feature]:
    """The features this adapter config uses that `consumer` does not handle."""
    return [
        feature for feature in FEATURES if not getattr(feature, consumer) and feature.in_(config)
    ]
