"""Training methods: each one unit, found in METHODS.

A method names its TRL config class (the recipe's `training` section holds that class's fields),
the TRL trainer class lora-tune's trainer (train.trainer_class) builds on, and the data formats
it trains on. Adding a method (DPO, KTO, GRPO...) is adding one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    name: str
    config: str  # TRL config class, e.g. SFTConfig
    trainer: str  # TRL trainer class, e.g. SFTTrainer
    formats: tuple[str, ...] | None = None  # names in formats.FORMATS; None: every format

    def config_class(self) -> type:
        import trl  # importing TRL costs seconds: only when a recipe is checked or trained

        return getattr(trl, self.config)

    def trainer_class(self) -> type:
        import trl

        return getattr(trl, self.trainer)

    def accepts(self, fmt: str) -> bool:
        return self.formats is None or fmt in self.formats


METHODS: dict[str, Method] = {
    method.name: method for method in (Method("sft", "SFTConfig", "SFTTrainer"),)
}
