"""Training methods: each one unit, found in METHODS.

A method names its TRL config class (the recipe's `training` section holds that class's fields)
and trainer class, where TRL keeps them (ORPO and CPO/SimPO live in trl.experimental in TRL 1.x),
the kinds of data it trains on (its formats are those of formats.FORMATS with such a `data` kind),
the config values that make it what it is, and the values its log reports that metrics.json
keeps. Adding a method is adding one entry here.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Method:
    name: str
    config: str  # TRL config class, e.g. SFTConfig
    trainer: str  # TRL trainer class, e.g. SFTTrainer
    description: str
    # rows handed to the trainer: "sft" token labels, "paired", "unpaired", "prompts" (GRPO)
    data: str = "sft"
    reads: tuple[str, ...] = ("sft",)  # the Format.data kinds it trains on (kto: pairs unpaired)
    module: str = "trl"  # where TRL keeps the two classes
    reference: bool = False  # trains against a reference model (the start, held as an adapter)
    # A config field that gives it a reference where it is not zero (GRPO's KL weight, beta).
    reference_when: str = ""
    defaults: dict = field(default_factory=dict)  # config values it needs (recipe keys win)
    # log keys whose last value metrics.json keeps (under `method`); one ending in "/" keeps
    # every key it starts (GRPO's rewards/NAME/mean and rewards/NAME/std)
    logged: tuple[str, ...] = ()
    plan: tuple[str, ...] = ()  # config fields the plan shows

    def _module(self):
        # TRL announces its experimental modules on import; the README says which ones are.
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        return importlib.import_module(self.module)  # TRL costs seconds: imported when needed

    def config_class(self) -> type:
        return getattr(self._module(), self.config)

    def trainer_class(self) -> type:
        return getattr(self._module(), self.trainer)

    @property
    def formats(self) -> tuple[str, ...]:
        """Names of the formats.FORMATS entries it trains on, in the table's order."""
        from .formats import FORMATS

        return tuple(name for name, fmt in FORMATS.items() if fmt.data in self.reads)

    def accepts(self, fmt: str) -> bool:
        return fmt in self.formats

    def has_reference(self, training: dict) -> bool:
        """Whether a run of the recipe's `training` section trains against a reference."""
        return self.reference or bool(self.reference_when and training.get(self.reference_when))

    def keeps(self, key: str) -> bool:
        """Whether metrics.json keeps this log key's last value."""
        return any(
            key == kept or (kept.endswith("/") and key.startswith(kept)) for kept in self.logged
        )


# The first step's loss alone in the log: the check that the reference is the policy at step 0.
FIRST_STEP_LOGGED = {"logging_first_step": True}
REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")

METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        Method(
            "sft",
            "SFTConfig",
            "SFTTrainer",
            "supervised fine-tuning on the completions (TRL's SFTTrainer)",
        ),
        Method(
            "dpo",
            "DPOConfig",
            "DPOTrainer",
            "Direct Preference Optimization on chosen/rejected pairs (TRL's DPOTrainer)",
            data="paired",
            reads=("paired",),
            reference=True,
            defaults=FIRST_STEP_LOGGED,
            logged=REWARDS,
            plan=("beta", "loss_type"),
        ),
        Method(
            "kto",
            "KTOConfig",
            "KTOTrainer",
            "Kahneman-Tversky Optimization on completions labelled good or bad (TRL's KTOTrainer)",
            data="unpaired",
            reads=("unpaired", "paired"),
            reference=True,
            defaults=FIRST_STEP_LOGGED,
            logged=("rewards/chosen", "rewards/rejected", "rewards/margins", "kl"),
            plan=("beta", "loss_type", "desirable_weight", "undesirable_weight"),
        ),
        Method(
            "orpo",
            "ORPOConfig",
            "ORPOTrainer",
            "Odds Ratio Preference Optimization, no reference model "
            "(TRL's experimental ORPOTrainer)",
            data="paired",
            reads=("paired",),
            module="trl.experimental.orpo",
            logged=(*REWARDS, "log_odds_ratio", "nll_loss"),
            plan=("beta",),
        ),
        Method(
            "simpo",
            "CPOConfig",
            "CPOTrainer",
            "SimPO: length-normalized preference margin, no reference model "
            "(TRL's experimental CPOTrainer with loss_type simpo)",
            data="paired",
            reads=("paired",),
            module="trl.experimental.cpo",
            defaults={"loss_type": "simpo", "cpo_alpha": 0.0},
            logged=REWARDS,
            plan=("beta", "simpo_gamma"),
        ),
        Method(
            "grpo",
            "GRPOConfig",
            "GRPOTrainer",
            "Group Relative Policy Optimization: completions sampled for each prompt, scored by "
            "the recipe's rewards (TRL's GRPOTrainer)",
            data="prompts",
            reads=("prompts",),
            reference_when="beta",
            defaults=FIRST_STEP_LOGGED,
            logged=("reward", "reward_std", "completions/mean_length", "kl", "rewards/"),
            plan=("num_generations", "max_completion_length", "temperature", "beta", "loss_type"),
        ),
    )
}
DEFAULT = "sft"
