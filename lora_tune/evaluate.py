"""`lora-tune eval`: did fine-tuning help, and what did it cost?

For each model (base, adapter, merged, or any model directory or hub id): token-weighted loss,
perplexity and next-token accuracy on the eval data; greedy-generation answer metrics where
the data has prompts; lm-evaluation-harness scores with --tasks; tokens/s of each.

Preference data (prompt, chosen, rejected) is scored pair by pair (pair_scores.py): how often
the model gives the chosen answer the higher log-probability, and by what margin. Loss,
perplexity, token accuracy and the generation metrics are then those of the chosen answers.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.table import Table

from . import adapters, data, generate, hardware, models, output, pair_scores, pairs, reports, runs
from .common import batches, compare_logits
from .errors import UserError
from .recipe import DataSection, ModelSection
from .sources import load_source

console = output.console()
PREFERENCE_NOTE = (
    "pref. acc: how often the model itself gives the chosen answer a higher log-probability than "
    "the rejected one (summed over the answer tokens, given the prompt); margin, chosen and "
    "rejected logp: the mean of those sums (chosen minus rejected for the margin). DPO's implicit "
    "reward is beta * (model logp - reference logp) of the same sums. Loss, perplexity, token acc "
    "and answers are measured on the chosen answers."
)
# Preference pairs get their own table (one row per target), before the usual one.
PREFERENCE_SHOWN = [
    ("preference_accuracy", "pref. acc", "{:.2%}"),
    ("margin", "margin", "{:+.3f}"),
    ("chosen_logp", "chosen logp", "{:.3f}"),
    ("rejected_logp", "rejected logp", "{:.3f}"),
]
SHOWN = [
    ("loss", "loss", "{:.4f}"),
    ("perplexity", "perplexity", "{:.2f}"),
    ("token_accuracy", "token acc", "{:.2%}"),
    ("exact_match", "exact", "{:.2%}"),
    ("normalized_exact_match", "norm. exact", "{:.2%}"),
    ("token_f1", "token F1", "{:.3f}"),
    ("generated_tokens", "gen. len", "{:.1f}"),
    ("tokens_per_second", "tokens/s", "{:,.0f}"),
]


@torch.no_grad()
def measure(model, batch_list) -> tuple[dict, torch.Tensor]:
    """Token-weighted loss, perplexity and next-token accuracy over every label token.

    Sums over tokens, never averages per batch, so padding and batch size cannot change the
    result. Also returns the first batch's logits (at labelled positions) for comparisons.
    """
    nll, correct, count, first = 0.0, 0, 0, None
    start = time.perf_counter()
    for batch in batch_list:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[
            :, :-1
        ]
        labels = batch["labels"][:, 1:]
        keep = labels != -100
        picked, targets = logits[keep].float(), labels[keep]
        nll += torch.nn.functional.cross_entropy(picked, targets, reduction="sum").item()
        correct += (picked.argmax(-1) == targets).sum().item()
        count += targets.numel()
        if first is None:
            first = picked
    seconds = time.perf_counter() - start
    loss = nll / count
    tokens = sum(int(b["attention_mask"].sum()) for b in batch_list)
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700)),
        "token_accuracy": correct / count,
        "tokens": count,
        "seconds": seconds,
        "tokens_per_second": tokens / seconds,
    }, first


@dataclass
class PairData:
    """Tokenized preference pairs (prompt_ids, chosen_ids, rejected_ids), and how training cuts
    sequences longer than max_length (TRL's truncation_mode)."""

    rows: list[tuple[list[int], list[int], list[int]]]
    max_length: int | None
    truncation_mode: str = "keep_start"

    def __len__(self) -> int:
        return len(self.rows)

    def chosen_samples(self) -> dict[str, list[list[int]]]:
        """prompt+chosen as SFT samples, labels on the answer: the generation prompts and their
        reference answers."""
        return {
            "input_ids": [prompt + chosen for prompt, chosen, _ in self.rows],
            "labels": [[-100] * len(prompt) + chosen for prompt, chosen, _ in self.rows],
        }


class Evaluator:
    """Runs every requested measurement on one model and collects the rows of the report."""

    def __init__(
        self,
        dataset,
        tokenizer,
        device,
        batch_size,
        max_new_tokens,
        stop,
        tasks,
        limit,
        tasks_path,
        want_generation: bool | None,
    ):
        self.tokenizer, self.device, self.batch_size = tokenizer, device, batch_size
        self.pairs = dataset if isinstance(dataset, PairData) else None
        samples = self.pairs.chosen_samples() if self.pairs else dataset
        self.batch_list = (
            [] if self.pairs else batches(dataset, batch_size, tokenizer.pad_token_id, device)
        )
        self.items = generate.items_of(samples, tokenizer) if want_generation is not False else []
        if want_generation and not self.items:
            raise UserError(
                "--generate: the eval data has no prompts (text data); nothing to generate from",
                ["use prompt/completion, alpaca or chat data, or drop --generate"],
            )
        longest = max(
            (
                len(tokenizer(i.reference, add_special_tokens=False)["input_ids"])
                for i in self.items
            ),
            default=0,
        )
        self.max_new_tokens = max_new_tokens or longest + 8  # room for every reference answer
        self.stop, self.tasks, self.limit, self.tasks_path = stop, tasks, limit, tasks_path
        self.rows: dict[str, dict] = {}
        self.generations: dict[str, list[str]] = {}

    def measure(self, model) -> tuple[dict, torch.Tensor]:
        """The metrics of the eval data (SFT samples or preference pairs) and the first batch's
        logits at the scored positions."""
        if self.pairs is None:
            return measure(model, self.batch_list)
        scores = pair_scores.score_pairs(
            model,
            self.pairs.rows,
            self.batch_size,
            self.tokenizer.pad_token_id,
            self.device,
            self.pairs.max_length,
            self.pairs.truncation_mode,
        )
        return scores.metrics(), scores.first_logits

    def __call__(self, name: str, model, harness: bool = True) -> torch.Tensor:
        metrics, logits = self.measure(model)
        if self.items:
            texts, lengths = generate.generate(
                model,
                self.tokenizer,
                self.items,
                self.max_new_tokens,
                self.stop,
                self.batch_size,
                self.device,
            )
            metrics |= generate.score(texts, [i.reference for i in self.items], lengths)
            self.generations[name] = texts
        if self.tasks and harness:
            metrics |= reports.harness(
                model,
                self.tokenizer,
                self.tasks,
                self.limit,
                self.batch_size,
                self.device,
                self.tasks_path,
            )
        self.rows[name] = metrics
        return logits


def run(
    targets: list[str] | str,
    data_spec: str | None = None,
    compare: bool = False,
    merge: bool = True,
    json_file: Path | None = None,
    batch_size: int = 8,
    max_samples: int | None = None,
    allow_pickle: bool = False,
    generation: bool | None = None,
    max_new_tokens: int | None = None,
    stop: list[str] = (),
    samples: int = 0,
    tasks: list[str] | None = None,
    limit: int | None = None,
    tasks_path: Path | None = None,
    plot: Path | None = None,
) -> dict:
    """Evaluate each target; print one table; return (and optionally write) the report."""
    targets = [targets] if isinstance(targets, str) else list(targets)
    check_options(targets, compare, merge, tasks)
    device = hardware.device()
    report = new_report(targets, device, batch_size, max_samples, tasks, stop)
    first_run, generations, evaluator = None, {}, None
    for target in targets:
        adapter = runs.adapter_dir(Path(target))
        recipe = runs.run_recipe(adapter) if adapter else None
        first_run = first_run or (adapter.parent if recipe else None)
        check_target(target, adapter, recipe, compare, plotted=bool(plot) and target == targets[0])
        section, tokenizer = load_target(target, adapter, recipe, allow_pickle)
        dataset = eval_dataset(data_spec, recipe, tokenizer, max_samples)
        evaluator = Evaluator(
            dataset,
            tokenizer,
            device,
            batch_size,
            max_new_tokens,
            list(stop),
            tasks,
            limit,
            tasks_path,
            generation,
        )
        report["data"] = data_spec or (recipe.data.eval or f"{recipe.data.train} (eval_fraction)")
        report["samples"] = len(dataset)
        prefix = "" if len(targets) == 1 else f"{target} "
        comparison = evaluate_target(evaluator, section, adapter, prefix, compare, merge, samples)
        if comparison is not None:
            report["merged_vs_adapter"] = comparison
        report["results"] |= evaluator.rows
        generations |= evaluator.generations
        report["max_new_tokens"] = evaluator.max_new_tokens if evaluator.items else None
    report["versions"] = runs.versions()
    publish(report, evaluator, generations, samples, first_run, plot, json_file)
    return report


def new_report(targets: list[str], device: str, batch_size: int, max_samples, tasks, stop) -> dict:
    """The report before any target is evaluated: what is compared, where, with which settings."""
    return {
        "targets": targets,
        "results": {},
        "merged_vs_adapter": None,
        "device": device,
        "settings": {
            "batch_size": batch_size,
            "max_samples": max_samples,
            "tasks": tasks,
            "stop": list(stop),
        },
    }


def check_options(targets: list[str], compare: bool, merge: bool, tasks: list[str] | None) -> None:
    """Refuse, before anything loads, options that cannot go together."""
    if compare and len(targets) > 1:
        raise UserError(
            "--compare takes one run or adapter", ["give several targets without --compare"]
        )
    if tasks and not merge and not compare:
        raise UserError(
            "--tasks runs lm-evaluation-harness on merged (plain) models, and --no-merge keeps the adapter "
            "unmerged",
            ["drop --no-merge, or add --compare to score the base too"],
        )


def check_target(target: str, adapter: Path | None, recipe, compare: bool, plotted: bool) -> None:
    """Refuse a target that --compare or --plot cannot use: they need an adapter and a run directory."""
    if compare and adapter is None:
        raise UserError(
            f"--compare: {target} is not a run or adapter directory",
            ["--compare needs an adapter to compare with its base"],
        )
    if plotted and not recipe:
        raise UserError(
            f"--plot: {target} is not a run directory",
            ["plot a run written by lora-tune train (the first target)"],
        )


def load_target(target: str, adapter: Path | None, recipe, allow_pickle: bool):
    """(model section, tokenizer) of the model to load: an adapter's base, or the target itself."""
    if adapter is not None:
        section = adapters.adapter_base_section(
            adapter, recipe.model if recipe else None, allow_pickle
        )
        return section, adapters.adapter_tokenizer(adapter, section)
    section = ModelSection(id=target, allow_pickle=allow_pickle)
    models.load_config(section)  # a clear error for a path or id that is not a model
    return section, models.load_tokenizer(section)


def eval_dataset(data_spec: str | None, recipe, tokenizer, max_samples: int | None):
    """The eval data (given, else the run's), tokenized, cut to max_samples: SFT samples, or
    PairData where the data is preference pairs."""
    section = given_data_section(data_spec, recipe.data if recipe else None)
    if not is_paired(data_spec, section):
        dataset = data.load_eval(data_spec, section, tokenizer)
        return dataset.select(range(min(max_samples, len(dataset)))) if max_samples else dataset
    rows = pairs.load_eval(data_spec, section, tokenizer)
    if max_samples:
        rows = rows.select(range(min(max_samples, len(rows))))
    tokenized = [tuple(pairs.tokenize_pair(tokenizer, row)) for row in rows]
    max_length = section.max_length if section else DataSection.model_fields["max_length"].default
    mode = recipe.training.get("truncation_mode", "keep_start") if recipe else "keep_start"
    return PairData(tokenized, max_length, mode)


def given_data_section(data_spec: str | None, section):
    """The run's data section to read --data with: its field names always, its explicit format
    only where the data is of that kind (an SFT run is also measured on preference pairs)."""
    if data_spec is None or section is None or section.format == "auto":
        return section
    loose = section.model_copy(update={"format": "auto"})
    return loose if is_paired(data_spec, loose) != is_paired(data_spec, section) else section


def is_paired(data_spec: str | None, section) -> bool:
    """Whether the eval data is preference pairs, told from its first source's columns (the
    recipe's data section, if any, names them)."""
    if data_spec is None and (section is None or not (section.eval or section.eval_fraction)):
        return False  # no eval data: data.load_eval says what to pass
    if data_spec is not None:
        known = section or DataSection(train=data_spec)
        spec, label, split = data_spec, "--data", known.eval_split or known.split
    elif section.eval:
        known, spec, label = section, section.eval, "data.eval"
        split = section.eval_split or section.split
    else:  # eval_fraction: a part of the training data
        known, spec, label, split = section, section.train, "data.train", section.split
    first = data.sources(spec, known, split)[0]
    return pairs.is_paired(load_source(first, label).column_names, section)


def evaluate_target(
    evaluator: Evaluator,
    section,
    adapter: Path | None,
    prefix: str,
    compare: bool,
    merge: bool,
    samples: int,
) -> dict | None:
    """Load the model and measure what was asked: the model itself, or base, adapter and merged.
    Returns the merged-vs-adapter logits comparison under --compare, else None."""
    model = models.load_model(section, "auto").to(evaluator.device).eval()
    models.fit_vocabulary(model, evaluator.tokenizer)  # an adapter trained with added tokens
    if adapter is None:
        evaluator(prefix + "model", model)
        return None
    if compare or samples:
        evaluator(prefix + "base", model, harness=compare)
    model = adapters.attach_adapter(model, adapter, section)
    if compare or not merge:
        adapter_logits = evaluator(
            prefix + "adapter", model, harness=False
        )  # the harness takes plain models
    if compare or merge:
        merged = model.merge_and_unload()
        merged_logits = evaluator(prefix + "merged", merged)
    if compare:
        return compare_logits(adapter_logits, merged_logits, merged.dtype)
    return None


def publish(
    report: dict,
    evaluator: Evaluator | None,
    generations: dict[str, list[str]],
    samples: int,
    first_run: Path | None,
    plot: Path | None,
    json_file: Path | None,
) -> None:
    """Print the report (and samples, and the change since the run's previous eval); write the plot and JSON."""
    print_report(report)
    if samples and generations:
        print_samples(evaluator.items, generations, samples)
    if first_run is not None and len(report["targets"]) == 1:
        previous = reports.record_history(first_run, report)
        if previous:
            print_previous(previous, report)
    if plot:
        reports.plot_losses(first_run, plot)
        console.print(f"Loss plot written to {plot}")
    if json_file:
        json_file.parent.mkdir(parents=True, exist_ok=True)
        runs.write_json(json_file, report | {"generations": generations})


def print_report(report: dict) -> None:
    results = report["results"]
    first = next(iter(results))
    title = f"lora-tune eval on {report['data']} ({report['samples']} samples)"
    paired = any("preference_accuracy" in m for m in results.values())
    if paired:
        print_preferences(results, title)
        title = "on the chosen answers"
    table = Table(title=title)
    columns = [
        (key, title, fmt) for key, title, fmt in SHOWN if any(key in m for m in results.values())
    ]
    extra = sorted({k for m in results.values() for k in m if "/" in k})  # lm-eval task scores
    table.add_column("model", overflow="fold")
    for title in [title for _, title, _ in columns] + [
        f"Δ loss vs {first}",
        f"Δ acc vs {first}",
        *extra,
    ]:
        table.add_column(title, justify="right")
    for name, m in results.items():
        cells = [fmt.format(m[key]) if key in m else "" for key, _, fmt in columns]
        same = name == first
        cells += [
            "" if same else f"{m['loss'] - results[first]['loss']:+.4f}",
            "" if same else f"{m['token_accuracy'] - results[first]['token_accuracy']:+.2%}",
        ]
        cells += [f"{m[key]:.4f}" if key in m else "" for key in extra]
        table.add_row(name, *cells)
    console.print(table)
    if paired:
        console.print(PREFERENCE_NOTE)
    print_merge_check(report)


def print_preferences(results: dict, title: str) -> None:
    """The preference table: accuracy, margin and log-probs per target, and accuracy's change."""
    first = next(iter(results))
    table = Table(title=title)
    table.add_column("model", overflow="fold")
    for _, column, _ in PREFERENCE_SHOWN:
        table.add_column(column, justify="right")
    table.add_column(f"Δ pref. acc vs {first}", justify="right")
    for name, m in results.items():
        cells = [fmt.format(m[key]) if key in m else "" for key, _, fmt in PREFERENCE_SHOWN]
        change = m.get("preference_accuracy", 0) - results[first].get("preference_accuracy", 0)
        table.add_row(name, *cells, "" if name == first else f"{change:+.2%}")
    console.print(table)


def print_merge_check(report: dict) -> None:
    """Whether merged equals adapter, and what merging buys in tokens/s (under --compare)."""
    results, check = report["results"], report["merged_vs_adapter"]
    if check:
        verdict = "equal within tolerance" if check["ok"] else "DIFFERENT"
        console.print(
            f"merged vs adapter: {verdict}; max |logit diff| {check['max_abs_diff']:.3g} "
            f"(tolerance {check['tolerance']:.3g})"
        )
        unmerged, merged = results.get("adapter"), results.get("merged")
        console.print(
            f"merging speeds inference {merged['tokens_per_second'] / unmerged['tokens_per_second']:.2f}x "
            f"({unmerged['tokens_per_second']:,.0f} -> {merged['tokens_per_second']:,.0f} tokens/s)"
        )


def print_samples(items, generations: dict[str, list[str]], n: int) -> None:
    table = Table(title=f"{min(n, len(items))} samples", show_lines=True)
    for column in ("prompt", "reference", *generations):
        table.add_column(column, overflow="fold")
    for i in range(min(n, len(items))):
        table.add_row(
            items[i].prompt, items[i].reference, *(texts[i] for texts in generations.values())
        )
    console.print(table)


def print_previous(previous: dict, report: dict) -> None:
    changes = []
    for name, now in report["results"].items():
        before = previous["results"].get(name)
        if before and "loss" in before:
            changes.append(f"{name} loss {before['loss']:.4f} -> {now['loss']:.4f}")
        if before and "preference_accuracy" in before and "preference_accuracy" in now:
            changes.append(
                f"{name} pref. acc {before['preference_accuracy']:.2%} -> "
                f"{now['preference_accuracy']:.2%}"
            )
    if changes:
        console.print(
            f"Since the previous eval on this data ({previous['time']}): {'; '.join(changes)}"
        )
