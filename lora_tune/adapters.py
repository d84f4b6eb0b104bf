"""An adapter on its base: which base it needs, loading the two together, and the checks that
the adapter fits (train, merge, eval, serve and export all load adapters through here)."""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

from safetensors import SafetensorError

from . import models, output
from .common import first_line
from .errors import UserError
from .models import DTYPES, fit_vocabulary, load_model, load_tokenizer, looks_local
from .recipe import ModelSection
from .runs import ADAPTER, RECIPE, adapter_config, adapter_dir

console = output.console()


def adapter_base_section(adapter: Path, model_section=None, allow_pickle: bool = False):
    """The model section of an adapter's base: the run recipe's, else from adapter_config.json
    (base_model_name_or_path, revision). Raises UserError when the base is gone."""
    config = adapter_config(adapter)
    base = config.get("base_model_name_or_path") or ""
    if model_section is None or model_section.id != base:
        model_section = ModelSection(
            id=base,
            revision=config.get("revision"),
            trust_remote_code=bool(model_section and model_section.trust_remote_code),
        )
    if allow_pickle:
        model_section = model_section.model_copy(update={"allow_pickle": True})
    if model_section.quantization:
        console.print(
            f"{adapter} was trained on a {model_section.quantization.bits}-bit base: loading the "
            f"full-precision {model_section.id} (quantized weights would round the adapter away when merged)."
        )
        model_section = model_section.model_copy(update={"quantization": None})
    if looks_local(base) and not Path(base).expanduser().is_dir():
        raise UserError(
            f"{adapter}: its base model {base!r} is not there any more",
            [
                "restore the base model directory, or edit base_model_name_or_path in adapter_config.json"
            ],
        )
    return model_section


def load_with_adapter(
    adapter: Path, dtype_name: str = "auto", model_section=None, allow_pickle: bool = False
):
    """(PeftModel on its base, tokenizer, base model section) for an adapter directory.

    Raises UserError when the base or the adapter will not load, or the adapter does not fit.
    """
    model_section = adapter_base_section(adapter, model_section, allow_pickle)
    dtype = "auto" if dtype_name == "auto" else DTYPES[dtype_name]
    tokenizer = adapter_tokenizer(adapter, model_section)
    model = load_model(model_section, dtype, source=model_section.id)
    fit_vocabulary(model, tokenizer)  # an adapter trained with added tokens
    return attach_adapter(model, adapter, model_section), tokenizer, model_section


def adapter_tokenizer(adapter: Path, model_section):
    """The tokenizer saved with the adapter (with its chat template), else the base's."""
    return load_tokenizer(
        model_section, adapter if (adapter / "tokenizer_config.json").is_file() else None
    )


def attach_adapter(model, adapter: Path, model_section):
    """PeftModel of `model` with the adapter loaded, in eval mode.

    Raises UserError for a pickle-only adapter (unless allowed), an unreadable one, or one that
    does not fit the base.
    """
    from peft import PeftModel

    base = model_section.id
    if not (adapter / "adapter_model.safetensors").is_file() and not model_section.allow_pickle:
        raise UserError(
            f"{adapter}: no adapter_model.safetensors",
            [
                "pickle (.bin) adapters can run code when loaded: pass --allow-pickle if you trust it"
            ],
        )
    check_adapter_fits(adapter, model, model_section)
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter))
    except Exception as exc:  # safetensors, torch and peft each raise their own types here
        mismatch = next(
            (line.strip() for line in str(exc).splitlines() if "size mismatch" in line), None
        )
        raise UserError(
            f"{adapter}: {'the adapter does not fit its base ' + base if mismatch else 'cannot read the adapter'}"
            f": {(mismatch or first_line(exc))[:300]}",
            [
                "check that the adapter was trained on this base model"
                if mismatch
                else "the adapter file is truncated or corrupt: use an earlier checkpoint or retrain"
            ],
        ) from None
    return peft_model.eval()


# The parts of a saved LoRA tensor's name that follow the name of the layer it changes.
LORA_PART = re.compile(
    r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)(\.|$)"
)


def adapter_modules(adapter: Path) -> list[str]:
    """Names of the layers an adapter changes, from its safetensors header (no tensor is read).
    Empty for an adapter without one, or an unreadable one (attach_adapter says which)."""
    from safetensors import safe_open

    try:
        with safe_open(adapter / "adapter_model.safetensors", framework="pt") as f:
            keys = list(f.keys())
    except (OSError, SafetensorError):
        return []
    names = {}
    for key in keys:
        match = LORA_PART.search(key)
        if match:
            names[
                key[: match.start()].removeprefix("base_model.model.").replace(".base_layer", "")
            ] = None
    return list(names)


def check_adapter_fits(adapter: Path, model, section) -> None:
    """Raise UserError when `model` (the base, or its meta-device skeleton) lacks layers the
    adapter changes: an adapter trained on another architecture. PEFT would call that a
    missing target module, or load nothing for it."""
    wanted = adapter_modules(adapter)
    present = {name for name, _ in model.named_modules()}
    missing = [name for name in wanted if name not in present]
    if not missing:
        return
    # The ids recorded at training time, unless they name this base (its folder's contents changed since).
    here = Path(section.id).expanduser().resolve()
    others = [i for i in trained_on(adapter) if Path(i).expanduser().resolve() != here]
    origins = [kind for kind in map(model_kind, others) if kind]
    origin = origins[0] if origins else f"a model with layers such as {missing[0]}"
    base = f"{model.config.model_type} ({', '.join(model.config.architectures or [type(model).__name__])}, {section.id})"
    raise UserError(
        f"{adapter}: this adapter was trained on {origin}, the base is {base}: {len(missing)} of the "
        f"{len(wanted)} layers it changes are not in the base (e.g. {missing[0]})",
        [
            (
                f"use the base model it was trained on: set base_model_name_or_path in "
                f"{adapter / 'adapter_config.json'} to it"
            )
        ],
    )


def trained_on(adapter: Path) -> list[str]:
    """Model ids the adapter was trained on, as recorded when it was saved: its run's recipe
    (model.id) and PEFT's model card (base_model); adapter_config.json may have been edited since."""
    import yaml

    found = []
    recipe = adapter.parent / RECIPE
    if adapter.name == ADAPTER and recipe.is_file():
        with contextlib.suppress(
            OSError, yaml.YAMLError, AttributeError, TypeError
        ):  # an unreadable recipe: no id
            found.append(str(yaml.safe_load(recipe.read_text())["model"]["id"]))
    card = adapter / "README.md"
    if card.is_file():
        match = re.search(
            r"^base_model:[ \t]*(\S.*?)[ \t]*$", card.read_text(errors="replace"), re.MULTILINE
        )
        if match:
            found.append(match.group(1))
    return found


def model_kind(model_id: str) -> str | None:
    """'llama (LlamaForCausalLM, ID)' from the model's config.json where it is a local folder
    or in the hub cache (nothing is downloaded); None when it is not at hand."""
    path = Path(model_id).expanduser() / "config.json"
    if not path.is_file():
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(model_id, "config.json")
        except ValueError:  # not a valid hub id either
            return None
        if not isinstance(cached, str):
            return None
        path = Path(cached)
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    architectures = ", ".join(config.get("architectures") or [])
    return f"{config.get('model_type', 'an unknown model type')} ({architectures + ', ' if architectures else ''}{model_id})"


def starting_adapter(model_section, lora: dict, skeleton) -> Path | None:
    """The adapter that model.adapter names (a run or adapter directory), or None: checked to
    exist, to have been trained on model.id, and to agree with the recipe's lora section
    (`skeleton`, the model without weights, says what all-linear means)."""
    if not model_section.adapter:
        return None
    path = Path(model_section.adapter).expanduser()
    adapter = adapter_dir(path)
    if adapter is None:
        raise UserError(
            f"model.adapter: {path} is not a run or adapter directory (no adapter_config.json)",
            ["point model.adapter at a run directory (runs/NAME) or an adapter folder"],
        )
    config = adapter_config(adapter)
    base = config.get("base_model_name_or_path") or ""
    if not same_model(base, model_section.id):
        raise UserError(
            f"model.adapter: {adapter} was trained on {base!r}, model.id is {model_section.id!r}",
            [f"set model.id: {base}"],
        )
    if lora.get("target_modules") == "all-linear":
        names = {name.rsplit(".", 1)[-1] for name in models.linear_module_names(skeleton)}
        lora = lora | {"target_modules": sorted(names)}
    conflicts = lora_conflicts(lora, config)
    if conflicts:
        raise UserError(
            f"lora: the starting adapter {adapter} has its own settings, and the lora section "
            f"contradicts them: {'; '.join(conflicts)}",
            [
                "remove those keys: training continues the adapter as it is",
                "or train a new adapter: remove model.adapter",
            ],
        )
    return adapter


def same_model(a: str, b: str) -> bool:
    """Whether two model ids or paths name the same model (local paths compared resolved)."""
    if a == b:
        return True
    return (
        looks_local(a)
        and looks_local(b)
        and Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    )


# Keys of the lora section that are lora-tune's own optimizer settings, not the adapter's shape.
OPTIMIZER_KEYS = ("loraplus_lr_ratio", "loraplus_lr_embedding")


def lora_conflicts(lora: dict, config: dict) -> list[str]:
    """'lora.r: 4, the adapter has 8' for each lora key whose value differs from the adapter's."""
    found = []
    method = "adalora" if config.get("peft_type") == "ADALORA" else "lora"
    for key, value in lora.items():
        if key in OPTIMIZER_KEYS:
            continue
        saved = method if key == "method" else config.get(key)
        if key == "target_modules" and isinstance(saved, list) and isinstance(value, list):
            # Saved as full layer names or as their last parts: compared by the last parts.
            value, saved = (sorted({n.rsplit(".", 1)[-1] for n in v}) for v in (value, saved))
        elif isinstance(value, (list, set)) and isinstance(saved, (list, set)):
            value, saved = sorted(value), sorted(saved)
        if value != saved:
            found.append(f"lora.{key}: {value!r}, the adapter has {saved!r}")
    return found


def starting_config(adapter: Path):
    """The PEFT config of a starting adapter, ready to train (not in inference mode)."""
    from peft import PeftConfig

    config = PeftConfig.from_pretrained(str(adapter))
    config.inference_mode = False
    return config


def load_trainable(model, adapter: Path):
    """PeftModel of `model` with the starting adapter loaded for training."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter), is_trainable=True)
