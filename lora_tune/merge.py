"""`lora-tune merge`: adapter(s) + base -> one standalone model, verified, written atomically.

Two ways to merge, with the same result:
- stream (default where possible): shard by shard from the base checkpoint, in bounded memory
  (stream_merge.py);
- memory: PEFT's merge_and_unload on the loaded model, for what streaming does not handle and
  for combinations of several adapters.
Verification compares merged and adapter-on-base logits; it loads the model (one copy at a
time), which `--no-verify` skips for models larger than memory.
"""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
from pathlib import Path

import torch

from . import __version__, hardware, models, output, runs, stream_merge
from .adapters import adapter_base_section, check_adapter_fits, load_with_adapter
from .common import compare_logits
from .errors import UserError

console = output.console()
PROBE_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Fine-tuning changes a model; merging must not.",
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10",
]
COMBINATIONS = (
    "cat",
    "linear",
    "svd",
    "ties",
    "ties_svd",
    "dare_linear",
    "dare_ties",
    "magnitude_prune",
)


def probe_batch(tokenizer, device, samples=None, seed: int = 0) -> dict[str, torch.Tensor]:
    """Up to 4 of the run's eval samples (else fixed texts), plus one row of random token ids."""
    if samples:
        rows = list(samples[:4])
    else:
        rows = tokenizer(PROBE_TEXTS)["input_ids"]
    width = max(len(ids) for ids in rows)
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.full((len(rows) + 1, width), tokenizer.pad_token_id)
    attention = torch.zeros((len(rows) + 1, width), dtype=torch.long)
    for i, ids in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention[i, : len(ids)] = 1
    input_ids[-1] = torch.randint(0, len(tokenizer), (width,), generator=generator)
    attention[-1] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": attention.to(device)}


@torch.no_grad()
def logits_of(model, batch) -> torch.Tensor:
    """Logits at the real (non-padding) positions, as float32."""
    return model(**batch).logits[batch["attention_mask"].bool()].float()


def resolve_adapters(sources: list[Path]) -> list[Path]:
    adapters = []
    for source in sources:
        adapter = runs.adapter_dir(source)
        if adapter is None:
            raise UserError(
                f"{source}: not a run directory or PEFT adapter (no adapter_config.json)",
                ["give a run directory (runs/NAME) or an adapter directory"],
            )
        adapters.append(adapter)
    return adapters


def merge_inputs(adapters: list[Path], section) -> list[tuple[str, Path]]:
    """What a merge reads, by name: each adapter, the run directory holding it, and a local base."""
    inputs = []
    for adapter in adapters:
        if adapter.name == runs.ADAPTER and runs.is_run(adapter.parent):
            inputs.append(("the run directory", adapter.parent))
        inputs.append(("the adapter", adapter))
    base = Path(section.id).expanduser()
    if base.is_dir():
        inputs.append(("the base model", base))
    return inputs


def check_output_spares_inputs(
    output: Path, inputs: list[tuple[str, Path]], action: str = "a merge"
) -> None:
    """Raise UserError when OUTPUT is, or contains, an input of the merge: --force would delete it,
    and the rename onto OUTPUT would replace it. Paths are compared resolved (links, `..`)."""
    target = output.expanduser().resolve()
    for label, path in inputs:
        source = path.resolve()
        if source == target or target in source.parents:
            relation = "is" if source == target else "contains"
            folder = "merged" if action == "a merge" else "exports"
            example = Path(folder) / (inputs[0][1].resolve().name or "model")
            raise UserError(
                f"--output {output} {relation} {label} {path}; {action} never replaces its own inputs, "
                "even with --force",
                [f"write to a new folder, e.g. -o {example}"],
            )


def check_fits(adapters: list[Path], section) -> None:
    """Refuse, before any weight loads, adapters whose layers the base does not have (another
    architecture); a clear message also for a base that needs remote code."""
    skeleton = models.meta_model(models.load_config(section), models.trusts_remote_code(section))
    for adapter in adapters:
        check_adapter_fits(adapter, skeleton, section)


def check_same_base(adapters: list[Path]) -> None:
    configs = [runs.adapter_config(a) for a in adapters]
    bases = [(c.get("base_model_name_or_path"), c.get("revision")) for c in configs]
    if len(set(bases)) > 1:
        listing = "; ".join(
            f"{a}: {b}{'@' + r if r else ''}" for a, (b, r) in zip(adapters, bases, strict=False)
        )
        raise UserError(
            f"the adapters were trained on different base models ({listing})",
            ["combine only adapters trained on the same base"],
        )


def probe_samples(recipe, tokenizer) -> list[list[int]] | None:
    """input_ids of the run's eval samples, when the adapter belongs to a run with eval data."""
    from . import data

    if recipe is None or not (recipe.data.eval or recipe.data.eval_fraction):
        return None
    try:
        return data.load_eval(None, recipe.data, tokenizer)["input_ids"][:4]
    except UserError:  # the eval data moved since training: fixed probe texts will do
        return None


def run(
    sources: list[Path] | Path,
    output: Path,
    force: bool = False,
    dtype: str = "auto",
    allow_pickle: bool = False,
    method: str = "auto",
    verify: bool = True,
    max_shard_size: str | None = None,
    weights: list[float] | None = None,
    combination: str = "cat",
    density: float | None = None,
    adapter_only: bool = False,
    announce: bool = True,
) -> dict:
    """Merge, verify and write OUTPUT atomically. Returns the report (also saved as merge_report.json)."""
    adapters = resolve_adapters(sources if isinstance(sources, list) else [sources])
    weights = weights or [1.0] * len(adapters)
    check_options(adapters, dtype, method, combination, weights, adapter_only)
    max_bytes = parse_size(max_shard_size)
    recipe, section = check_inputs(adapters, output, force, allow_pickle)
    stream = stream_plan(adapters, section, weights, method)
    with staged(output) as partial:
        if stream is not None:
            base_dir, merge_plan = stream
            report = streamed(
                adapters[0],
                recipe,
                section,
                base_dir,
                merge_plan,
                partial,
                dtype,
                max_bytes,
                verify,
            )
        else:
            report = in_memory(
                adapters,
                recipe,
                section,
                partial,
                dtype,
                max_bytes,
                weights,
                combination,
                density,
                adapter_only,
            )
        report |= inputs_report(section, adapters, weights, combination)
        runs.write_json(partial / "merge_report.json", report)
        write_model_card(partial, report, recipe)
    if announce:
        console.print(
            f"{'Combined adapter' if adapter_only else 'Merged model'} written to {output.resolve()}"
        )
    return report


@contextlib.contextmanager
def staged(output: Path):
    """A hidden folder beside OUTPUT to write into: it replaces OUTPUT when the block ends without
    error, and is removed (with the parent folders it created) when the block fails."""
    partial = output.parent / f".{output.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    created = make_parents(output.parent)
    try:
        yield partial
        runs.give_umask_modes(partial)
        replace(partial, output)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        remove_empty(created)
        raise


def check_inputs(adapters: list[Path], output: Path, force: bool, allow_pickle: bool):
    """(run recipe or None, base model section) once the adapters share a base that they fit,
    its weights are there, and OUTPUT may be written without touching any input."""
    check_same_base(adapters)
    recipe = runs.run_recipe(adapters[0])
    section = adapter_base_section(adapters[0], recipe.model if recipe else None, allow_pickle)
    check_output_spares_inputs(output, merge_inputs(adapters, section))
    if output.exists() and not force:
        raise UserError(
            f"{output} already exists", ["choose another --output, or pass --force to replace it"]
        )
    models.check_weights(section)
    check_fits(adapters, section)
    return recipe, section


def inputs_report(section, adapters: list[Path], weights: list[float], combination: str) -> dict:
    """The merge report's record of what went in."""
    return {
        "base_model": section.id,
        "revision": section.revision,
        "adapters": [str(a) for a in adapters],
        "weights": weights,
        "combination": combination if len(adapters) > 1 else None,
        "versions": runs.versions(),
    }


def check_options(
    adapters: list[Path],
    dtype: str,
    method: str,
    combination: str,
    weights: list[float],
    adapter_only: bool,
) -> None:
    """Refuse, before anything loads, an unknown option value or options that do not fit the adapters."""
    if dtype not in ("auto", *models.DTYPES):
        raise UserError(
            f"--dtype: unknown dtype {dtype!r}", ["use auto, float32, bfloat16 or float16"]
        )
    if method not in ("auto", "stream", "memory"):
        raise UserError(f"--method: unknown method {method!r}", ["use auto, stream or memory"])
    if combination not in COMBINATIONS:
        raise UserError(
            f"--combination: unknown combination {combination!r}",
            [f"use one of {', '.join(COMBINATIONS)}"],
        )
    if len(weights) != len(adapters):
        raise UserError(
            f"--weights: {len(weights)} weights for {len(adapters)} adapters",
            ["give one weight per adapter"],
        )
    if adapter_only and len(adapters) < 2:
        raise UserError(
            "--adapter-only combines several adapters into one", ["give two or more adapters"]
        )


def stream_plan(adapters: list[Path], section, weights: list[float], method: str):
    """(base checkpoint directory, plan) when the merge streams, else None: the merge runs in memory,
    which --method auto says and --method stream refuses."""
    single = len(adapters) == 1 and weights == [1.0]
    reason = "several adapters are combined" if not single else None
    if single and method != "memory":
        try:
            base_dir = stream_merge.base_directory(section)
            return base_dir, stream_merge.plan(adapters[0], base_dir)
        except stream_merge.CannotStream as exc:
            reason = str(exc)
    elif method == "memory":
        reason = "--method memory"
    if reason and method == "stream":
        raise UserError(
            f"--method stream: cannot stream this merge: {reason}", ["use --method auto or memory"]
        )
    if reason and method == "auto":
        console.print(
            f"Merging in memory with merge_and_unload ({'not streamed: ' if single else ''}{reason})."
        )
    return None


def parse_size(text: str | None) -> int | None:
    if text is None:
        return None
    from transformers.utils.hub import convert_file_size_to_int

    try:
        return convert_file_size_to_int(text)
    except ValueError:
        raise UserError(
            f"--max-shard-size: cannot read {text!r}", ["write it like 2GB or 500MB"]
        ) from None


def streamed(
    adapter, recipe, section, base_dir, merge_plan, partial, dtype, max_bytes, verify
) -> dict:
    """Stream the merge into `partial`; verify against adapter-on-base, one model in memory at a time."""
    from transformers import AutoModelForCausalLM

    device = hardware.device()
    report: dict = {"method": "stream"}
    if verify:
        model, tokenizer, _ = load_with_adapter(adapter, dtype, section)
        batch = probe_batch(tokenizer, device, probe_samples(recipe, tokenizer))
        reference = logits_of(model.to(device), batch)
        del model
        gc.collect()
    partial.mkdir(parents=True)
    stream_merge.merge(
        merge_plan, base_dir, partial, None if dtype == "auto" else models.DTYPES[dtype], max_bytes
    )
    stream_merge.copy_tokenizer(
        adapter if (adapter / "tokenizer_config.json").is_file() else base_dir, partial
    )
    stream_merge.keep_sentencepiece(base_dir, partial)
    if verify:
        merged = AutoModelForCausalLM.from_pretrained(partial, dtype="auto").to(device).eval()
        report |= compare_merged(reference, logits_of(merged, batch), merged.dtype)
    else:
        report |= {"verified": False}
        console.print("Verification skipped (--no-verify).")
    return report


def in_memory(
    adapters,
    recipe,
    section,
    partial,
    dtype,
    max_bytes,
    weights,
    combination,
    density,
    adapter_only,
) -> dict:
    """merge_and_unload (or PEFT's weighted combination) on the loaded model; verified before writing."""
    model, tokenizer, _ = load_with_adapter(adapters[0], dtype, section)
    if len(adapters) > 1 or weights != [1.0]:
        names = ["default"]
        for i, adapter in enumerate(adapters[1:], start=1):
            model.load_adapter(str(adapter), adapter_name=f"adapter{i}")
            names.append(f"adapter{i}")
        kwargs = {"density": density} if density is not None else {}
        try:
            model.add_weighted_adapter(
                names, weights, "combined", combination_type=combination, **kwargs
            )
        except ValueError as exc:
            raise UserError(
                f"--combination {combination}: {exc}",
                ["cat works for any ranks; ties and dare_* need --density"],
            ) from None
        model.set_adapter("combined")
        for name in names:
            model.delete_adapter(name)
    device = hardware.device()
    model.to(device)
    report: dict = {"method": "memory"}
    if adapter_only:
        model.save_pretrained(partial)
        nested = partial / "combined"  # PEFT nests adapters not named "default"
        for item in nested.iterdir():
            item.rename(partial / item.name)
        nested.rmdir()
        tokenizer.save_pretrained(partial)
        return report | {"verified": False, "adapter_only": True}
    batch = probe_batch(
        tokenizer, device, probe_samples(recipe, tokenizer) if len(adapters) == 1 else None
    )
    before = logits_of(model, batch)
    try:
        merged = model.merge_and_unload(safe_merge=True)
    except ValueError as exc:  # safe_merge found NaN or inf in a merged weight
        raise UserError(
            f"merge refused: {exc}", ["the adapter is broken; retrain or use an earlier checkpoint"]
        ) from None
    report |= compare_merged(before, logits_of(merged, batch), merged.dtype)
    merged.save_pretrained(partial, max_shard_size=max_bytes or "50GB")
    tokenizer.save_pretrained(partial)
    with contextlib.suppress(stream_merge.CannotStream):
        stream_merge.keep_sentencepiece(stream_merge.base_directory(section), partial)
    return report


def compare_merged(reference: torch.Tensor, merged: torch.Tensor, dtype: torch.dtype) -> dict:
    """Compare, print, and refuse past the tolerance."""
    result = compare_logits(reference, merged, dtype) | {
        "verified": True,
        "dtype": str(dtype).removeprefix("torch."),
    }
    console.print(
        f"Merged vs adapter logits: max |diff| {result['max_abs_diff']:.3g}, "
        f"mean {result['mean_abs_diff']:.3g} (tolerance {result['tolerance']:.3g}, {result['dtype']})"
    )
    if not result["ok"]:
        raise UserError(
            f"merge refused: the merged model's logits differ from adapter-on-base by "
            f"{result['max_abs_diff']:.3g} (tolerance {result['tolerance']:.3g}); nothing was written",
            [
                "merge in float32 with --dtype float32, or check the adapter for non-finite weights",
                "LoRA on a weight tied to another (a tied lm_head and embeddings) cannot be merged "
                "into one copy: untie them (tie_word_embeddings: false) before training",
            ],
        )
    return result


def write_model_card(folder: Path, report: dict, recipe) -> None:
    """A README model card: where the model came from and how it was checked."""
    verified = (
        f"merged and adapter-on-base logits agree: max |diff| {report['max_abs_diff']:.3g}, mean "
        f"{report['mean_abs_diff']:.3g} (tolerance {report['tolerance']:.3g})"
        if report.get("verified")
        else "not verified"
    )
    lines = [
        "---",
        f"base_model: {report['base_model']}",
        "library_name: transformers",
        "tags: [lora-tune, lora, merged]"
        if not report.get("adapter_only")
        else "tags: [lora-tune, lora, peft]",
        "---",
        "",
        f"# {folder.name.split('.partial-')[0].lstrip('.')}",
        "",
        f"- Base model: {report['base_model']}"
        + (f" (revision {report['revision']})" if report["revision"] else ""),
        f"- Adapters: {', '.join(report['adapters'])}"
        + (
            f" (weights {report['weights']}, {report['combination']})"
            if report["combination"]
            else ""
        ),
        f"- Merge: {report['method']}, by lora-tune {__version__}",
        f"- Verification: {verified}",
    ]
    if recipe is not None:
        import yaml

        lines += [
            "",
            "## Recipe",
            "",
            "```yaml",
            yaml.safe_dump(recipe.to_dict(), sort_keys=False).rstrip(),
            "```",
        ]
    (folder / "README.md").write_text("\n".join(lines) + "\n")


def make_parents(folder: Path) -> list[Path]:
    """Create `folder` and its missing parents; return the ones created, deepest first."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    return missing


def remove_empty(folders: list[Path]) -> None:
    """Remove the folders a failed merge created, deepest first, where nothing else was put in them."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty (someone else wrote there) or already gone: leave it
            return


def replace(partial: Path, output: Path) -> None:
    """Rename `partial` to `output`; an existing output is kept until the new one is in place."""
    old = output.parent / f".{output.name}.old-{os.getpid()}"
    if output.exists():
        output.rename(old)
    try:
        partial.rename(output)
    except BaseException:
        if old.exists() and not output.exists():
            old.rename(output)
        raise
    shutil.rmtree(old, ignore_errors=True)
