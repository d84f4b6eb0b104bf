"""Base model and tokenizer loading, dtype choice, quantization and target-module checks."""

from __future__ import annotations

import contextlib
import contextvars
import copy
import os
import re
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError

from . import hardware, output
from .common import first_line
from .errors import UserError

console = output.console()

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# False inside remote_code(allowed=False): a dry run checks a recipe without running any repository's code.
_REMOTE_CODE_ALLOWED = contextvars.ContextVar("remote_code_allowed", default=True)
REMOTE_CODE_FIX = (
    "set model.trust_remote_code: true in the recipe (lora-tune modules: --trust-remote-code) only if "
    "you trust that repository: it runs the repository's own Python code on this machine, with your "
    "user's rights"
)


def resolve_dtype(name: str) -> torch.dtype:
    """`auto` becomes bfloat16 on GPUs that support it, float16 on other GPUs, float32 on CPU."""
    if name != "auto":
        return DTYPES[name]
    if hardware.has_cuda():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def check_quantization(section) -> None:
    """Raise UserError when model.quantization cannot work here: bitsandbytes must be installed
    and able to quantize on this machine's device (recent releases also run on CPUs)."""
    import importlib.util

    if section.quantization is None:
        return
    use_bitsandbytes()
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(
            "model.quantization: the bitsandbytes package is not installed",
            ["pip install bitsandbytes"],
        )
    import bitsandbytes.functional as bnb

    device = hardware.device()
    try:  # a 64 x 64 probe, quantized the way the model's weights will be
        probe = torch.randn(64, 64, device=device, dtype=torch.float16)
        if section.quantization.bits == 4:
            bnb.quantize_4bit(probe, quant_type=section.quantization.quant_type)
        else:
            bnb.int8_vectorwise_quant(probe)
    except Exception as exc:  # bitsandbytes raises its own types per backend
        raise UserError(
            f"model.quantization: bitsandbytes cannot quantize on this machine's {device}: "
            f"{first_line(exc)[:200]}",
            [
                "upgrade bitsandbytes (pip install -U bitsandbytes), run on a CUDA GPU, or remove "
                "model.quantization to train LoRA on the full-precision base"
            ],
        ) from None


def use_bitsandbytes() -> None:
    """Let bitsandbytes be imported again where the command line hid it (see cli.hide_bitsandbytes):
    a quantized base needs it, and PEFT and transformers look for it when they quantize."""
    if "bitsandbytes" in sys.modules and sys.modules["bitsandbytes"] is None:
        del sys.modules["bitsandbytes"]


def quantization_config(section, dtype: torch.dtype):
    """The transformers.BitsAndBytesConfig of model.quantization."""
    from transformers import BitsAndBytesConfig

    use_bitsandbytes()
    q = section.quantization
    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=dtype if q.compute_dtype == "auto" else DTYPES[q.compute_dtype],
    )


def looks_local(model_id: str) -> bool:
    return (
        model_id.startswith((".", "/", "~")) or model_id.count("/") > 1 or Path(model_id).exists()
    )


@contextlib.contextmanager
def remote_code(allowed: bool):
    """Within `remote_code(allowed=False)`, model.trust_remote_code counts as false: configs,
    tokenizers and architectures come from transformers' own classes, or fail with a UserError."""
    token = _REMOTE_CODE_ALLOWED.set(allowed)
    try:
        yield
    finally:
        _REMOTE_CODE_ALLOWED.reset(token)


def trusts_remote_code(section) -> bool:
    return bool(section.trust_remote_code) and _REMOTE_CODE_ALLOWED.get()


def remote_code_error(section) -> UserError:
    """The refusal for a model that needs its repository's own code (auto_map in config.json)."""
    if section.trust_remote_code:  # allowed by the recipe, withheld by remote_code(allowed=False)
        return UserError(
            f"model.id: {section.id} needs its own Python code (auto_map in config.json), and --dry-run "
            "runs no repository code, so its layers and tokenizer were not checked",
            [
                "run without --dry-run to check and train it (model.trust_remote_code: true runs that code)"
            ],
        )
    return UserError(
        f"model.id: {section.id} needs its own Python code to load (auto_map in config.json), and "
        "model.trust_remote_code is false",
        [REMOTE_CODE_FIX],
    )


def check_model_dir(path: Path) -> None:
    """Raise UserError for a local folder that holds no model config (transformers would ask for a model_type)."""
    if not (path / "config.json").is_file():
        raise UserError(
            f"{path}: not a run, adapter or model directory (no config.json, adapter_config.json or "
            "adapter/ in it)",
            [
                (
                    "give a run directory (runs/NAME), an adapter directory, or a model "
                    "directory written by save_pretrained (or a hub id)"
                )
            ],
        )


def load_config(section):
    """The model's config (no weights). Raises UserError when the model cannot be found, or
    needs its own code and that is not allowed."""
    from transformers import AutoConfig

    if looks_local(section.id):
        local = Path(section.id).expanduser()
        if not local.is_dir():
            raise UserError(
                f"model.id: no model directory at {section.id!r}",
                [
                    "give a local directory written by save_pretrained, or a hub id such as facebook/opt-350m"
                ],
            )
        check_model_dir(local)
    try:
        return AutoConfig.from_pretrained(
            section.id, revision=section.revision, trust_remote_code=trusts_remote_code(section)
        )
    except (OSError, ValueError) as exc:
        if "custom code" in str(exc):  # transformers' words when auto_map needs trust_remote_code
            raise remote_code_error(section) from None
        raise UserError(
            f"model.id: cannot load the model config of {section.id!r}: {first_line(exc)}",
            ["check the hub id or path, the network, and HF_TOKEN for gated models"],
        ) from None


def meta_model(config, trust_remote_code: bool = False):
    """The model's architecture on the meta device: module names and shapes without any weights."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(
                config, trust_remote_code=trust_remote_code and _REMOTE_CODE_ALLOWED.get()
            )
    except ValueError as exc:
        raise UserError(f"model.id: not a causal language model: {first_line(exc)}") from None


def linear_module_names(model) -> list[str]:
    """Full names of the layers LoRA can target (Linear and GPT-2 style Conv1D), lm_head excluded."""
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, (torch.nn.Linear, Conv1D)) and module is not head
    ]


def check_target_modules(target_modules, model, model_id: str) -> None:
    """Raise UserError when target_modules matches nothing, listing the model's linear layers.

    Matching follows PEFT: a string is a regex over full module names, a list entry matches a
    module's name or its dotted suffix.
    """
    if target_modules is None or target_modules == "all-linear":
        return
    names = linear_module_names(model)
    suffixes = sorted({name.rsplit(".", 1)[-1] for name in names})
    if isinstance(target_modules, str):
        if not any(re.fullmatch(target_modules, name) for name in names):
            raise UserError(
                f"lora.target_modules: the pattern {target_modules!r} matches no layer of {model_id}.",
                [f"its linear layers: {', '.join(suffixes)}", "or use target_modules: all-linear"],
            )
        return
    missing = sorted(
        t for t in target_modules if not any(n == t or n.endswith("." + t) for n in names)
    )
    if missing:
        raise UserError(
            f"lora.target_modules: {', '.join(missing)} not found in {model_id}.",
            [f"its linear layers: {', '.join(suffixes)}", "or use target_modules: all-linear"],
        )


def count_trainable(model, lora_config) -> tuple[int, int]:
    """(trainable, total) parameter counts of the model with LoRA applied. Works on the meta device."""
    from peft import get_peft_model

    # get_peft_model expands the config's target_modules in place: count on a copy, with the
    # plain initialisation (PiSSA and the others compute on weights that the meta device lacks).
    config = copy.deepcopy(lora_config)
    if hasattr(config, "init_lora_weights"):
        config.init_lora_weights = True
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as exc:
        raise UserError(f"lora: {exc}") from None
    return peft_model.get_nb_trainable_parameters()


def keeps_samples_apart(model) -> bool:
    """Whether samples concatenated into one row (packing, padding-free batches) stay apart.

    Such rows carry position ids that restart at each sample. transformers turns those into a
    block-diagonal mask only where the model passes position_ids to create_causal_mask (the
    Llama family does; OPT, for one, does not). Elsewhere samples would attend to each other.
    """
    import inspect
    import sys

    source = inspect.getsource(sys.modules[type(model).__module__])
    calls = re.findall(r"create_causal_mask\((.*?)\n\s*\)", source, re.S)
    return bool(calls) and all("position_ids" in call for call in calls)


def fit_vocabulary(model, tokenizer) -> None:
    """Grow the embedding (and output) rows to the tokenizer's size when tokens were added. The
    new rows' starting values (the mean of the others plus noise) are seeded, so that a base
    model evaluated with an adapter's added tokens gives the same numbers every time."""
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model.resize_token_embeddings(len(tokenizer), mean_resizing=model.device.type != "meta")


def train_token_rows(lora_config, model, token_ids: list[int]) -> None:
    """Make the rows of added tokens trainable (PEFT's trainable_token_indices), in the input
    embedding and, when not tied to it, the output layer, so the adapter saves both. Embedding
    layers already in modules_to_save are trained and saved whole."""
    if not token_ids:
        return
    names = {module: name.rsplit(".", 1)[-1] for name, module in model.named_modules()}
    layers = [model.get_input_embeddings()]
    output = model.get_output_embeddings()
    if output is not None and output.weight is not layers[0].weight:
        layers.append(output)
    indices = lora_config.trainable_token_indices
    indices = (
        dict(indices)
        if isinstance(indices, dict)
        else {names[layers[0]]: list(indices)}
        if indices
        else {}
    )
    for layer in layers:
        if names[layer] not in (lora_config.modules_to_save or []):
            indices[names[layer]] = sorted(set(indices.get(names[layer], [])) | set(token_ids))
    lora_config.trainable_token_indices = indices or None


def check_packing(model, model_id: str, key: str = "packing") -> None:
    """Raise UserError when data.packing or data.padding_free is asked of a model that would mix samples."""
    if not keeps_samples_apart(model):
        raise UserError(
            f"data.{key}: {model_id} ({model.config.model_type}) cannot keep samples in one row apart, "
            "so they would attend to each other",
            [
                f"set data.{key}: false (length-grouped batches also cut padding: "
                "training.train_sampling_strategy: group_by_length)"
            ],
        )


def load_tokenizer(section, path: str | Path | None = None):
    """The tokenizer, with a pad token.

    Where the tokenizer has none, pad = eos. That is safe here: lora-tune builds the labels
    itself and padding is masked by position, so the EOS that ends each sample stays trained.
    """
    from transformers import AutoTokenizer

    source = str(path) if path else section.id
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source,
            revision=None if path else section.revision,
            trust_remote_code=trusts_remote_code(section),
        )
    except ValueError as exc:
        if "custom code" in str(exc):
            raise remote_code_error(section) from None
        raise
    if tokenizer.eos_token is None:
        raise UserError(
            f"model.id: the tokenizer of {section.id!r} has no eos_token, so samples cannot be ended.",
            ["use a tokenizer with an end-of-sequence token"],
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_weights(section, source: str | None = None) -> None:
    """Refuse a local model directory whose only weights are pickles, unless model.allow_pickle."""
    local = Path(source or section.id).expanduser()
    if local.is_dir() and not section.allow_pickle and not list(local.glob("*.safetensors")):
        raise UserError(
            f"model.id: {local} has no .safetensors weights",
            [
                "pickle (.bin) weights can run code when loaded: convert them to safetensors, "
                "or set model.allow_pickle: true (--allow-pickle) if you trust their source"
            ],
        )


def load_model(section, dtype, source: str | None = None):
    """The base model's weights, from a hub id or a local directory.

    Only safetensors unless model.allow_pickle: a pickled .bin file can run code when loaded.
    Raises UserError for missing, pickle-only or unreadable weights.
    """
    from transformers import AutoModelForCausalLM

    source = source or section.id
    kwargs = {
        "dtype": dtype,
        "trust_remote_code": section.trust_remote_code,
        "use_safetensors": None if section.allow_pickle else True,
    }
    if section.attn_implementation:
        kwargs["attn_implementation"] = section.attn_implementation
    if section.quantization:  # quantized weights are placed on this process's GPU as they load
        kwargs["quantization_config"] = quantization_config(section, dtype)
        kwargs["device_map"] = {
            "": int(os.environ.get("LOCAL_RANK", "0")) if hardware.has_cuda() else "cpu"
        }
    check_weights(section, source)
    try:
        return AutoModelForCausalLM.from_pretrained(source, revision=section.revision, **kwargs)
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise UserError(
            f"model.id: cannot load the weights of {source}: {first_line(exc)}",
            [
                "check that the download or copy is complete (re-download corrupt or truncated files)"
            ],
        ) from None
