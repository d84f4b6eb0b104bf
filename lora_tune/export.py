"""`lora-tune export`: a run, adapter or model directory -> GGUF for llama.cpp and Ollama,
verified in llama.cpp against the transformers model it came from, written atomically.

An adapter is first merged (and verified) by `lora-tune merge`; llama.cpp's own converter writes
the GGUF and its quantizer makes the k-quants. With --adapter-only the adapter becomes a GGUF
LoRA file for runtimes that load it on a base GGUF, which is converted too unless given.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from . import gguf_check, llama_cpp, merge, models, ollama, output, runs, stream_merge
from .adapters import adapter_base_section, adapter_tokenizer, load_with_adapter
from .errors import UserError
from .recipe import ModelSection

console = output.console()
FORMATS = ("gguf",)
TEXTS = merge.PROBE_TEXTS  # tokenized by both sides besides the run's own samples
# LoRA settings llama.cpp's adapter format cannot express (it scales every layer by alpha / r).
LORA_UNSUPPORTED = {
    "use_dora": "DoRA's magnitude vectors",
    "alpha_pattern": "per-layer lora_alpha",
    "modules_to_save": "fully trained modules (modules_to_save)",
    "trainable_token_indices": "trained token rows",
}


@dataclass
class Source:
    """What is exported: an adapter (merged first) or a model directory."""

    target: Path
    adapter: Path | None
    model_dir: Path | None
    section: ModelSection
    recipe: object | None
    architecture: str


def check_options(format_: str, quant: str, adapter_only: bool, base_gguf: Path | None) -> None:
    if format_ not in FORMATS:
        raise UserError(
            f"--format {format_}: unknown format", [f"use one of: {', '.join(FORMATS)}"]
        )
    kinds = llama_cpp.CONVERTER_TYPES if adapter_only else llama_cpp.QUANT_TYPES
    if quant not in kinds:
        raise UserError(
            f"--quant {quant}: not a GGUF type lora-tune writes{' for an adapter' * adapter_only}",
            [f"use one of: {', '.join(kinds)}"],
        )
    if base_gguf is not None and not adapter_only:
        raise UserError("--base-gguf is for --adapter-only exports", ["add --adapter-only"])
    if base_gguf is not None and not base_gguf.is_file():
        raise UserError(f"--base-gguf {base_gguf}: no such file", ["give the base model's GGUF"])


def resolve(target: Path, adapter_only: bool, allow_pickle: bool) -> Source:
    """The target's kind, base and architecture, from configs only (no weights)."""
    adapter = runs.adapter_dir(target)
    if adapter is not None:
        recipe = runs.run_recipe(adapter)
        section = adapter_base_section(adapter, recipe.model if recipe else None, allow_pickle)
        model_dir = None
    else:
        if adapter_only:
            raise UserError(
                f"{target}: --adapter-only needs a run or adapter directory",
                ["give runs/NAME or an adapter directory"],
            )
        models.check_model_dir(target)
        recipe, model_dir = None, target
        section = ModelSection(id=str(target), allow_pickle=allow_pickle)
    config = models.load_config(section)
    architecture = (getattr(config, "architectures", None) or [type(config).__name__])[0]
    return Source(target, adapter, model_dir, section, recipe, architecture)


def check_architecture(source: Source, root: Path) -> None:
    supported = llama_cpp.supported_architectures(root)
    if source.architecture in supported:
        return
    families = sorted(
        {name.removesuffix("ForCausalLM") for name in supported if "CausalLM" in name}
    )
    fix = [f"llama.cpp converts these causal LM families: {', '.join(families)}"]
    if source.adapter is not None:
        fix.append(
            f"a merged transformers model works everywhere transformers does: "
            f"lora-tune merge {source.target} -o merged/{source.target.name}"
        )
    raise UserError(
        f"{source.target}: llama.cpp's converter does not support {source.architecture} "
        "models, so no GGUF can be written; nothing was done",
        fix,
    )


def check_adapter_convertible(adapter: Path) -> dict:
    """The adapter's config, refused when llama.cpp's LoRA format cannot hold it."""
    config = runs.adapter_config(adapter)
    found = [label for key, label in LORA_UNSUPPORTED.items() if config.get(key)]
    if config.get("peft_type", "LORA") != "LORA":
        found.append(f"a {config['peft_type']} adapter")
    if config.get("use_rslora") and config.get("rank_pattern"):
        found.append("rsLoRA with per-layer ranks")
    if found:
        raise UserError(
            f"{adapter}: llama.cpp's LoRA files cannot hold {', '.join(found)}",
            ["export the merged model instead (drop --adapter-only)"],
        )
    return config


def check_output(output_dir: Path, force: bool, source: Source, base_gguf: Path | None) -> None:
    inputs = [("the export source", source.target)]
    if Path(source.section.id).expanduser().is_dir():
        inputs.append(("the base model", Path(source.section.id)))
    if base_gguf is not None:
        inputs.append(("--base-gguf", base_gguf))
    merge.check_output_spares_inputs(output_dir, inputs, "an export")
    if output_dir.exists() and not force:
        raise UserError(
            f"{output_dir} already exists",
            ["choose another --output, or pass --force to replace it"],
        )


def run(
    target: Path,
    output_dir: Path,
    format_: str = "gguf",
    quant: str = "f16",
    adapter_only: bool = False,
    base_gguf: Path | None = None,
    force: bool = False,
    verify: bool = True,
    allow_pickle: bool = False,
    allow_token_differences: bool = False,
) -> dict:
    """Export, verify and write OUTPUT atomically. Returns the report (export_report.json)."""
    started = time.time()
    check_options(format_, quant, adapter_only, base_gguf)
    version = llama_cpp.require_runtime()
    source = resolve(target, adapter_only, allow_pickle)
    root = llama_cpp.converter_root()
    check_architecture(source, root)
    if adapter_only:
        check_adapter_convertible(source.adapter)
    check_output(output_dir, force, source, base_gguf)
    models.check_weights(source.section)
    name = export_name(source)
    with merge.staged(output_dir) as partial:
        work = partial / ".work"
        work.mkdir(parents=True)
        if adapter_only:
            report = adapter_files(source, partial, work, name, quant, base_gguf, root, verify)
        else:
            report = model_files(source, partial, work, name, quant, root, verify)
        shutil.rmtree(work)
        report = finish_report(report, source, name, quant, version, started)
        check_verified(report, allow_token_differences)
        runs.write_json(partial / "export_report.json", report)
    print_summary(output_dir, report)
    return report


def model_files(source, partial, work, name, quant, root, verify) -> dict:
    """The merged model's GGUF, verified, and its Modelfile."""
    model_dir = source.model_dir
    if model_dir is None:
        model_dir = work / "merged"
        merged = merge.run(
            source.adapter,
            model_dir,
            verify=verify,
            allow_pickle=source.section.allow_pickle,
            announce=False,
        )
    gguf = partial / f"{name}-{quant}.gguf"
    quantized = convert(model_dir, gguf, quant, work, root, name)
    tokenizer = models.load_tokenizer(source.section, model_dir)
    report = {"files": {gguf.name: gguf.stat().st_size}} | quantized
    if source.model_dir is None:
        report["merge"] = {k: merged.get(k) for k in ("max_abs_diff", "tolerance", "verified")}
    if verify:
        section = ModelSection(id=str(model_dir), allow_pickle=source.section.allow_pickle)
        reference = models.load_model(section, models.resolve_dtype("float32"))
        report["verification"] = gguf_check.verify(
            gguf, reference.eval(), tokenizer, probe_rows(source, tokenizer), quant, texts=TEXTS
        )
    text, template = ollama.modelfile(f"./{gguf.name}", tokenizer, model_dir)
    (partial / "Modelfile").write_text(text)
    return report | {"modelfile": template}


def adapter_files(source, partial, work, name, quant, base_gguf, root, verify) -> dict:
    """The adapter as a GGUF LoRA file, the base GGUF it goes on (converted unless given, with
    the adapter's tokenizer and chat template), both verified together against the adapter on
    its base in transformers."""
    base_dir = base_with_adapter_tokenizer(source, work)
    adapter = plain_scaling(source.adapter, work)
    lora = partial / f"{name}-lora-{quant}.gguf"
    arguments = [str(adapter), "--base", str(base_dir), "--outfile", str(lora), "--outtype", quant]
    llama_cpp.run_converter("convert_lora_to_gguf.py", arguments, root)
    files = {lora.name: lora.stat().st_size}
    if base_gguf is None:
        base_gguf = partial / f"base-{quant}.gguf"
        convert(base_dir, base_gguf, quant, work, root, Path(source.section.id).name)
        files[base_gguf.name] = base_gguf.stat().st_size
    report = {"files": files, "base_gguf": str(base_gguf)}
    tokenizer = adapter_tokenizer(source.adapter, source.section)
    from_ = f"./{base_gguf.name}" if base_gguf.parent == partial else str(base_gguf.resolve())
    text, template = ollama.modelfile(from_, tokenizer, base_dir, adapter=f"./{lora.name}")
    (partial / "Modelfile").write_text(text)
    if verify:
        model, _, _ = load_with_adapter(
            source.adapter, "float32", source.recipe.model if source.recipe else None
        )
        kind = coarser(quant, base_gguf_type(base_gguf))
        rows = probe_rows(source, tokenizer)
        check = gguf_check.verify(base_gguf, model, tokenizer, rows, kind, lora=lora, texts=TEXTS)
        if template["translated"]:  # the Modelfile carries the template the GGUF may lack
            check["metadata"] = template_elsewhere(check["metadata"])
        report["verification"] = check
    return report | {"modelfile": template}


def base_with_adapter_tokenizer(source: Source, work: Path) -> Path:
    """The base model's folder as the converter should see it: its weights and config, with the
    tokenizer files saved with the adapter (its chat template, its special tokens)."""
    base_dir = local_base(source.section)
    if not (source.adapter / "tokenizer_config.json").is_file():
        return base_dir
    view = work / "base"
    view.mkdir()
    for path in base_dir.iterdir():
        if path.is_file():
            (view / path.name).symlink_to(path.resolve())
    for path in view.iterdir():
        if any(path.match(pattern) for pattern in stream_merge.TOKENIZER_FILES):
            path.unlink()
    stream_merge.copy_tokenizer(source.adapter, view)
    stream_merge.keep_sentencepiece(base_dir, view)
    return view


def coarser(quant: str, base_type: str) -> str:
    """The GGUF type whose tolerance a LoRA file of `quant` on a base of `base_type` is held to."""
    order = ["f32", "f16", "bf16"]
    if quant not in order or base_type not in order:
        return "quantized"
    return max(quant, base_type, key=order.index)


def convert(model_dir: Path, gguf: Path, quant: str, work: Path, root: Path, name: str) -> dict:
    """llama.cpp's converter; k-quants from an f16 file through llama.cpp's quantizer."""
    direct = quant in llama_cpp.CONVERTER_TYPES
    first = gguf if direct else work / "f16.gguf"
    arguments = [str(model_dir), "--outfile", str(first), "--outtype", quant if direct else "f16"]
    arguments += ["--model-name", name]
    llama_cpp.run_converter("convert_hf_to_gguf.py", arguments, root)
    if direct:
        return {}
    quantized = llama_cpp.quantize(first, gguf, quant, gguf_check.threads())
    first.unlink()
    if quantized:
        console.print(
            f"[yellow]{quantized['fallback_tensors']} of {quantized['tensors']} tensors are not "
            f"{quant}: llama.cpp gave them another type (k-quants need rows of 256 values)[/yellow]"
        )
    return quantized


def local_base(section) -> Path:
    """The base model's folder: its directory, or its hub snapshot (cached by training)."""
    try:
        return stream_merge.base_directory(section)
    except stream_merge.CannotStream as exc:
        raise UserError(
            f"{section.id}: the base model's files are needed to convert it: {exc}",
            ["connect to the hub once, or give a base GGUF with --base-gguf and a local base"],
        ) from None


def plain_scaling(adapter: Path, work: Path) -> Path:
    """The adapter, copied with lora_alpha rescaled when it uses rsLoRA: llama.cpp scales by
    alpha / r, rsLoRA by alpha / sqrt(r)."""
    config = runs.adapter_config(adapter)
    if not config.get("use_rslora"):
        return adapter
    copy = work / "adapter"
    shutil.copytree(adapter, copy)
    config |= {"lora_alpha": config["lora_alpha"] * math.sqrt(config["r"]), "use_rslora": False}
    (copy / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return copy


def base_gguf_type(path: Path) -> str:
    """f32, f16 or bf16 for an unquantized GGUF (its general.file_type), else 'quantized'."""
    with gguf_check.opened(path, 16) as llm:
        kind = int(llm.metadata.get("general.file_type", -1))
    return {0: "f32", 1: "f16", 32: "bf16"}.get(kind, "quantized")


def template_elsewhere(metadata: dict) -> dict:
    """For a LoRA export the chat template travels in the Modelfile, not in the base GGUF."""
    differing = [key for key in metadata["differing"] if key != "chat_template"]
    return metadata | {"differing": differing, "ok": not differing}


def export_name(source: Source) -> str:
    """The files' name: the run's (runs/NAME/adapter -> NAME), else the target folder's."""
    target = source.target.resolve()
    if source.adapter is not None and source.adapter.name == runs.ADAPTER:
        return source.adapter.resolve().parent.name
    return target.name


def probe_rows(source: Source, tokenizer) -> list[list[int]]:
    """The run's eval samples (up to 4), else fixed texts."""
    rows = merge.probe_samples(source.recipe, tokenizer)
    return [list(r) for r in rows] if rows else tokenizer(merge.PROBE_TEXTS)["input_ids"]


def finish_report(
    report: dict, source: Source, name: str, quant: str, version: str, started: float
) -> dict:
    return {
        "format": "gguf",
        "name": name,
        "quant": quant,
        "source": str(source.target),
        "kind": "adapter" if source.adapter else "model",
        "base_model": source.section.id,
        "architecture": source.architecture,
        "llama_cpp_python": version,
        **report,
        "versions": runs.versions(),
        "seconds": round(time.time() - started, 1),
    }


def failures(verification: dict, allow_token_differences: bool) -> list[str]:
    """What the verification found wrong, in words."""
    found = []
    logits = verification["logits"]
    if not logits["ok"]:
        if "tolerance" in logits:
            found.append(
                f"next-token logits differ by up to {logits['max_abs_diff']:.3g} "
                f"(tolerance {logits['tolerance']:.3g})"
            )
        else:
            found.append(
                f"the top next token agrees at only {logits['top1_agreement']:.0%} of positions "
                f"(at least {logits['min_top1_agreement']:.0%} expected)"
            )
    metadata = verification["metadata"]
    for key in metadata["differing"]:
        found.append(
            f"{key}: the GGUF has {metadata['found'][key]!r}, the model {metadata['expected'][key]!r}"
        )
    tokens = verification["tokenizer"]
    if not tokens["ok"] and not allow_token_differences:
        first = tokens["differing"][0]
        found.append(
            f"llama.cpp tokenizes {len(tokens['differing'])} of {tokens['texts']} probe texts "
            f"differently, e.g. {first['text']!r}: {first['llama.cpp']} instead of "
            f"{first['transformers']}"
        )
    return found


def check_verified(report: dict, allow_token_differences: bool) -> None:
    """Refuse an export whose GGUF does not answer as its source model."""
    verification = report.get("verification")
    if verification is None:
        return
    found = failures(verification, allow_token_differences)
    verification["ok"] = not found
    if found:
        quantized = report["quant"] not in gguf_check.TOLERANCE
        raise UserError(
            "export refused: the GGUF does not answer as the model it came from in llama.cpp ("
            + "; ".join(found)
            + "); nothing was written",
            [
                "a less lossy --quant (q8_0, f16)"
                if quantized
                else "report the model: llama.cpp's converter mishandles it",
                "--allow-token-differences accepts tokenizer differences you have checked",
            ],
        )


def print_summary(output_dir: Path, report: dict) -> None:
    from rich.table import Table

    table = Table("file", "size")
    for name, size in report["files"].items():
        table.add_row(
            name, f"{size / 2**20:,.1f} MiB" if size >= 2**20 else f"{size / 2**10:,.0f} KiB"
        )
    console.print(table)
    verification = report.get("verification")
    if verification:
        logits, greedy = verification["logits"], verification["greedy"]
        console.print(
            f"llama.cpp vs transformers on {logits['positions']} positions: max |logit diff| "
            f"{logits['max_abs_diff']:.3g}, top-1 agreement {logits['top1_agreement']:.1%}, "
            f"greedy continuations identical {greedy['identical']}/{greedy['prompts']}, "
            f"tokenizer {'agrees' if verification['tokenizer']['ok'] else 'DIFFERS'}"
        )
    else:
        console.print("[yellow]not verified (--no-verify)[/yellow]")
    console.print(f"Chat template in the Modelfile: {report['modelfile']['chat_template']}")
    console.print(f"GGUF export written to {output_dir.resolve()}")
    console.print(f"  ollama create {report['name']} -f {output_dir / 'Modelfile'}")
