"""Streaming merge: the base model's safetensors shards in, merged shards out, one at a time.

Peak memory is about one shard plus the adapter, never the whole model. The arithmetic is
PEFT's own (peft/tuners/lora/layer.py and variants.py), replayed per tensor:

    W' = W + (B @ A) * scaling                       (transposed for fan_in_fan_out / embeddings)
    W' = m / ||W + (B @ A) * scaling||_row * (W + (B @ A) * scaling)          (DoRA)
    b' = b + lora_B.bias * scaling                   (lora_bias)
    scaling = alpha / r, or alpha / sqrt(r) with rsLoRA, per module via rank/alpha_pattern

Tensors the adapter saves whole (modules_to_save, trained biases) replace the base's. Anything
else makes `plan` return a reason, and `lora-tune merge` falls back to merge_and_unload.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from . import lora_methods
from .common import first_line
from .errors import UserError

PREFIX = "base_model.model."
TOKENIZER_FILES = [
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab*",
    "merges.txt",
    "*.model",
    "chat_template*",
]
LORA_KEY = re.compile(
    r"(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_A|"
    r"lora_embedding_B|lora_magnitude_vector)"
)


class CannotStream(Exception):
    """This adapter or base checkpoint needs the in-memory merge; the message says why."""


@dataclass
class Delta:
    """What one LoRA module adds to its base weight."""

    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    transpose: bool
    magnitude: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """The delta's shape, without computing it."""
        shape = (self.B.shape[0], self.A.shape[1])
        return shape[::-1] if self.transpose else shape

    def weight(self) -> torch.Tensor:
        delta = self.B.float() @ self.A.float()
        return (delta.T if self.transpose else delta) * self.scaling


@dataclass
class MergePlan:
    deltas: dict[str, Delta]  # base weight name -> delta
    replace: dict[str, torch.Tensor]  # base tensor name -> trained tensor


def plan(adapter: Path, base_dir: Path) -> MergePlan:
    """Read the adapter and check it against the base checkpoint's tensor names and shapes.

    Raises CannotStream for what this merge does not handle.
    """
    from .runs import adapter_config

    config = adapter_config(adapter)  # read as JSON: importing peft alone costs seconds
    if not lora_methods.handles_type(config, "stream_merge"):
        raise CannotStream(f"{config.get('peft_type')} adapters")
    unhandled = lora_methods.unhandled(config, "stream_merge")
    if unhandled:
        raise CannotStream(f"the {unhandled[0].key} option")
    parts, replace = lora_parts(read_adapter(adapter))
    deltas = {f"{module}.weight": delta(module, found, config) for module, found in parts.items()}
    check_against_base(base_dir, deltas, replace)
    return MergePlan(deltas, replace)


def read_adapter(adapter: Path) -> dict[str, torch.Tensor]:
    """The adapter's tensors, named as in the base checkpoint (PEFT's prefix and base_layer gone)."""
    if not (adapter / "adapter_model.safetensors").is_file():
        raise CannotStream("the adapter has no safetensors file")
    try:
        saved = load_file(adapter / "adapter_model.safetensors")
    except Exception as exc:  # truncated or corrupt file
        raise UserError(
            f"{adapter}: cannot read the adapter: {first_line(exc)}",
            ["the adapter file is truncated or corrupt: use an earlier checkpoint or retrain"],
        ) from None
    return {k.removeprefix(PREFIX).replace(".base_layer.", "."): v for k, v in saved.items()}


def lora_parts(tensors: dict[str, torch.Tensor]):
    """({module: {part: tensor}} for the LoRA pairs, {name: tensor} for trained base tensors)."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    replace = {}
    for key, tensor in tensors.items():
        match = LORA_KEY.fullmatch(key)
        if match:
            parts.setdefault(match["module"], {})[match["part"]] = tensor
        else:
            replace[key] = tensor
    return parts, replace


def delta(module: str, found: dict[str, torch.Tensor], config: dict) -> Delta:
    """The weight change of one module, with its rank and alpha (rank/alpha_pattern included)."""
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    r = rank_pattern.get(pattern_key(rank_pattern, module), config.get("r", 8))
    alpha = alpha_pattern.get(pattern_key(alpha_pattern, module), config.get("lora_alpha", 8))
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    embedding = "lora_embedding_A" in found
    A, B = (
        (found.get("lora_embedding_A"), found.get("lora_embedding_B"))
        if embedding
        else (found.get("lora_A.weight"), found.get("lora_B.weight"))
    )
    if A is None or B is None:
        raise CannotStream(f"an incomplete LoRA pair for {module}")
    if embedding and "lora_magnitude_vector" in found:
        raise CannotStream("DoRA on embeddings")
    return Delta(
        A,
        B,
        scaling,
        transpose=embedding or bool(config.get("fan_in_fan_out")),
        magnitude=found.get("lora_magnitude_vector"),
        bias=found.get("lora_B.bias"),
    )


def check_against_base(base_dir: Path, deltas: dict[str, Delta], replace: dict) -> None:
    """Raise CannotStream unless every delta and trained tensor has its tensor in the base checkpoint."""
    if "quantization_config" in json.loads((base_dir / "config.json").read_text()):
        raise CannotStream("a quantized base checkpoint")
    shapes = base_shapes(base_dir)
    for name, change in deltas.items():
        expected = change.shape
        if name not in shapes:
            raise CannotStream(f"no tensor {name} in the base checkpoint (renamed or tied weights)")
        if shapes[name] != expected:
            raise CannotStream(
                f"{name} has shape {shapes[name]} in the base, the adapter's delta {expected}"
            )
        if change.bias is not None and name.removesuffix("weight") + "bias" not in shapes:
            raise CannotStream(f"lora_bias on {name} whose base layer has no bias")
    for name, tensor in replace.items():
        if shapes.get(name) != tuple(tensor.shape):
            raise CannotStream(
                f"the adapter's {name} has no tensor of that shape in the base checkpoint"
            )


def pattern_key(patterns: dict, module: str) -> str:
    """The rank/alpha_pattern key that applies to a module, matched as PEFT does (a dotted suffix)."""
    return next((key for key in patterns if re.match(rf"(.*\.)?({key})$", module)), module)


def copy_tokenizer(source: Path, out: Path) -> None:
    for pattern in TOKENIZER_FILES:
        for path in source.glob(pattern):
            shutil.copy(path, out / path.name)


def keep_sentencepiece(base_dir: Path, out: Path) -> None:
    """transformers saves a SentencePiece tokenizer as tokenizer.json alone; llama.cpp's converter
    reads its merge scores from tokenizer.model (without it every piece scores alike and text
    splits differently). The base's tokenizer.model is kept beside a tokenizer whose vocabulary
    is the base's."""
    source = base_dir / "tokenizer.model"
    if source.is_file() and not (out / "tokenizer.model").exists():
        if vocabulary(out) == vocabulary(base_dir) or not (base_dir / "tokenizer.json").is_file():
            shutil.copy(source, out / "tokenizer.model")


def vocabulary(folder: Path) -> dict[str, int] | None:
    """Token -> id of a tokenizer.json, added tokens included."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    vocab = dict(data["model"].get("vocab") or {})
    return vocab | {t["content"]: t["id"] for t in data.get("added_tokens", [])}


def base_files(base_dir: Path) -> list[Path]:
    index = base_dir / "model.safetensors.index.json"
    if index.is_file():
        return [
            base_dir / name
            for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))
        ]
    if (base_dir / "model.safetensors").is_file():
        return [base_dir / "model.safetensors"]
    raise CannotStream("the base model has no safetensors checkpoint")


def base_shapes(base_dir: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape, read from the shard headers only."""
    shapes = {}
    for path in base_files(base_dir):
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    shapes[name] = tuple(f.get_slice(name).get_shape())
        except SafetensorError as exc:
            raise UserError(
                f"model.id: cannot load the weights of {base_dir}: {path.name}: {exc}",
                [
                    "check that the download or copy is complete (re-download corrupt or truncated files)"
                ],
            ) from None
    return shapes


def base_directory(section) -> Path:
    """The folder holding the base checkpoint: a local path, or the hub cache (downloading if needed)."""
    local = Path(section.id).expanduser()
    if local.is_dir():
        return local
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                section.id,
                revision=section.revision,
                allow_patterns=["*.safetensors", "*.json", "*.py", *TOKENIZER_FILES],
            )
        )
    except Exception as exc:  # offline and not cached, gated, or missing
        raise CannotStream(f"the base checkpoint is not reachable ({type(exc).__name__})") from None


def merge_tensor(
    name: str, tensor: torch.Tensor, merge_plan: MergePlan, bias_of: dict[str, Delta]
) -> torch.Tensor:
    """One base tensor, merged as PEFT would (in the base tensor's dtype)."""
    if name in merge_plan.replace:  # saved whole; PEFT saves a targeted embedding's base weight too
        tensor = merge_plan.replace[name].to(tensor.dtype)
    delta = merge_plan.deltas.get(name)
    if delta is not None:
        change = delta.weight()
        if (
            delta.magnitude is None
        ):  # added in float32 and rounded once, as PEFT's in-place merge does
            return (tensor.to(change.dtype) + change).to(tensor.dtype)
        rows = tensor.T if delta.transpose else tensor
        lora = change.T if delta.transpose else change
        norm = torch.linalg.norm(rows + lora, dim=1).to(tensor.dtype)
        factor = (delta.magnitude / norm).view(-1, 1)
        return ((factor.T if delta.transpose else factor) * (tensor + change)).to(tensor.dtype)
    if name in bias_of:
        owner = bias_of[name]
        return tensor + (owner.bias * owner.scaling).to(tensor.dtype)
    return tensor


class ShardWriter:
    """Writes tensors into numbered safetensors shards of at most max_bytes (or one per flush)."""

    def __init__(self, out: Path, max_bytes: int | None):
        self.out, self.max_bytes = out, max_bytes
        self.buffer: dict[str, torch.Tensor] = {}
        self.size = 0
        self.shards: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.max_bytes and self.buffer and self.size + nbytes > self.max_bytes:
            self.flush()
        self.buffer[name] = tensor.contiguous()
        self.size += nbytes
        self.total += nbytes

    def flush(self) -> None:
        if not self.buffer:
            return
        path = self.out / f"shard-{len(self.shards):05d}.tmp"
        save_file(self.buffer, path, metadata={"format": "pt"})
        self.shards.append((path, list(self.buffer)))
        self.buffer, self.size = {}, 0

    def finish(self) -> None:
        """Name the shards as transformers expects and write the index when there are several."""
        self.flush()
        n = len(self.shards)
        if n == 1:
            self.shards[0][0].rename(self.out / "model.safetensors")
            return
        weight_map = {}
        for i, (path, names) in enumerate(self.shards, start=1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            path.rename(self.out / final)
            weight_map |= dict.fromkeys(names, final)
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def merge(
    merge_plan: MergePlan,
    base_dir: Path,
    out: Path,
    dtype: torch.dtype | None,
    max_bytes: int | None,
) -> None:
    """Write the merged checkpoint (weights, config, generation config) into `out`."""
    bias_of = {
        name.removesuffix("weight") + "bias": d
        for name, d in merge_plan.deltas.items()
        if d.bias is not None
    }
    writer = ShardWriter(out, max_bytes)
    for path in base_files(base_dir):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                tensor = merge_tensor(name, f.get_tensor(name), merge_plan, bias_of)
                if tensor.is_floating_point():
                    if not torch.isfinite(tensor).all():
                        raise UserError(
                            f"merge refused: the merged tensor {name} has NaN or infinite values; "
                            "nothing was written",
                            ["the adapter is broken; retrain or use an earlier checkpoint"],
                        )
                    if dtype is not None:
                        tensor = tensor.to(dtype)
                writer.add(name, tensor)
        if max_bytes is None:
            writer.flush()  # one output shard per input shard
    writer.finish()
    config = json.loads((base_dir / "config.json").read_text())
    if dtype is not None:
        config["dtype"] = str(dtype).removeprefix("torch.")
        config.pop("torch_dtype", None)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for extra in ["generation_config.json", *(p.name for p in base_dir.glob("*.py"))]:
        if (base_dir / extra).is_file():
            shutil.copy(base_dir / extra, out / extra)
