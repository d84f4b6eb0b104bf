"""`lora-tune eval`: did fine-tuning help, and what did it cost?

For each model (base, adapter, merged, or any model directory or hub id): token-weighted loss,
perplexity and next-token accuracy on the eval data; greedy-generation answer metrics where
the data has prompts; lm-evaluation-harness scores with --tasks; tokens/s of each.

Preference data (prompt, chosen, rejected) is scored pair by pair (pair_scores.py): how often
the model gives the chosen answer the higher log-probability, and by what margin. Loss,
perplexity, token accuracy and the generation metrics are then those of the chosen answers.

Prompt-only data (a prompt and columns for the rewards, as GRPO trains on) is scored with the
rewards of a grpo run among the targets (reward_scores.py): the mean reward of each model's
greedy completions, and with --sampled N of N sampled completions per prompt.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.table import Table

from . import (
    adapters,
    data,
    generate,
    hardware,
    models,
    output,
    pair_scores,
    pairs,
    prompts,
    reports,
    reward_scores,
    runs,
)
from . import rewards as reward_checks
from .common import batches, compare_logits
from .errors import UserError
from .formats import FORMATS
from .methods import METHODS
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
REWARD_NOTE = (
    "reward: the mean over the prompts of the weighted sum of the rewards of each greedy "
    "completion (as GRPO sums them); a reward's own column is its mean; sampled: the same over "
    "{n} completions per prompt sampled at the run's temperature."
)
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
        self.prompts = dataset if isinstance(dataset, reward_scores.PromptData) else None
        samples = self.pairs.chosen_samples() if self.pairs else dataset
        self.batch_list = (
            batches(dataset, batch_size, tokenizer.pad_token_id, device)
            if self.pairs is None and self.prompts is None
            else []
        )
        if self.prompts is not None:  # completed and scored by reward_scores
            self.items = prompt_items(self.prompts, tokenizer)
        elif want_generation is not False:
            self.items = generate.items_of(samples, tokenizer)
        else:
            self.items = []
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
        if self.prompts is not None:
            self.max_new_tokens = self.prompts.max_new_tokens
        self.stop, self.tasks, self.limit, self.tasks_path = stop, tasks, limit, tasks_path
        self.rows: dict[str, dict] = {}
        self.generations: dict[str, list[str]] = {}

    def measure(self, model, name: str) -> tuple[dict, torch.Tensor]:
        """The metrics of the eval data (SFT samples, preference pairs, or prompts to complete
        and reward) and the first batch's logits at the scored positions."""
        if self.prompts is not None:
            metrics, texts, logits = reward_scores.evaluate(
                model, self.tokenizer, self.prompts, self.batch_size, self.device
            )
            self.generations[name] = texts
            return metrics, logits
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
        metrics, logits = self.measure(model, name)
        if self.items and self.prompts is None:
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


def prompt_items(data: reward_scores.PromptData, tokenizer) -> list[generate.Item]:
    """The prompts as --samples shows them, beside the answer an exact or number match reads."""
    column = next((r.column for r in data.rewards if r.column), None)
    return [
        generate.Item(
            ids, tokenizer.decode(ids, skip_special_tokens=True), str(row.get(column, ""))
        )
        for ids, row in zip(data.prompt_ids, data.rows, strict=True)
    ]


@dataclass
class RewardSettings:
    """How prompt-only data is scored: the grpo recipe whose rewards (and sampling) are used, the
    completion length (default: its max_completion_length) and sampled completions per prompt."""

    recipe: object | None
    max_new_tokens: int | None
    sampled: int = 0


def reward_recipe(targets: list[str]):
    """The recipe of the first grpo run among the targets (its rewards score prompt-only data)."""
    for target in targets:
        adapter = runs.adapter_dir(Path(target))
        recipe = runs.run_recipe(adapter) if adapter else None
        if recipe is not None and recipe.rewards:
            return recipe
    return None


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
    sampled: int = 0,
) -> dict:
    """Evaluate each target; print one table; return (and optionally write) the report."""
    targets = [targets] if isinstance(targets, str) else list(targets)
    check_options(targets, compare, merge, tasks)
    device = hardware.device()
    report = new_report(targets, device, batch_size, max_samples, tasks, stop)
    report["settings"]["sampled"] = sampled
    scoring = RewardSettings(reward_recipe(targets), max_new_tokens, sampled)
    first_run, generations, evaluator = None, {}, None
    for target in targets:
        adapter = runs.adapter_dir(Path(target))
        recipe = runs.run_recipe(adapter) if adapter else None
        first_run = first_run or (adapter.parent if recipe else None)
        check_target(target, adapter, recipe, compare, plotted=bool(plot) and target == targets[0])
        section, tokenizer = load_target(target, adapter, recipe, allow_pickle)
        dataset = eval_dataset(data_spec, recipe, tokenizer, max_samples, scoring)
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


def eval_dataset(data_spec: str | None, recipe, tokenizer, max_samples: int | None, scoring):
    """The eval data (given, else the run's), tokenized, cut to max_samples: SFT samples,
    PairData where the data is preference pairs, PromptData where it is prompts to complete."""
    section = given_data_section(data_spec, recipe.data if recipe else None)
    kind = data_kind(data_spec, section)
    if scoring.sampled and kind != "prompts":
        raise UserError(
            "--sampled: the eval data is not prompt-only data; sampled completions are scored "
            "with a grpo run's rewards",
            ["drop --sampled, or pass prompt-only data (--data) with a grpo run among the targets"],
        )
    if kind == "prompts":
        return prompt_data(data_spec, section, tokenizer, max_samples, scoring)
    if kind == "sft":
        dataset = data.load_eval(data_spec, section, tokenizer)
        return dataset.select(range(min(max_samples, len(dataset)))) if max_samples else dataset
    rows = pairs.load_eval(data_spec, section, tokenizer)
    if max_samples:
        rows = rows.select(range(min(max_samples, len(rows))))
    tokenized = [tuple(pairs.tokenize_pair(tokenizer, row)) for row in rows]
    max_length = section.max_length if section else DataSection.model_fields["max_length"].default
    mode = recipe.training.get("truncation_mode", "keep_start") if recipe else "keep_start"
    return PairData(tokenized, max_length, mode)


def prompt_data(data_spec: str | None, section, tokenizer, max_samples: int | None, scoring):
    """PromptData: the prompts (checked as for training), the grpo run's rewards (checked
    against the columns) and how many completions are sampled."""
    if scoring.recipe is None:
        raise UserError(
            f"{data_spec or 'the eval data'}: prompt-only data (a prompt column and no answer "
            "to compare) is scored with the rewards of a grpo run, and no target is one",
            ["add the grpo run to the targets, or evaluate on data with completions"],
        )
    rows = prompts.load_eval(data_spec, section, tokenizer, METHODS["grpo"])
    if max_samples:
        rows = rows.select(range(min(max_samples, len(rows))))
    label, spec = (
        ("--data", data_spec) if data_spec else ("data.eval", section.eval or section.train)
    )
    reward_checks.check_columns(scoring.recipe.rewards, rows.column_names, label, spec)
    return reward_scores.prompt_data(
        rows, scoring.recipe, tokenizer, scoring.max_new_tokens, scoring.sampled
    )


def given_data_section(data_spec: str | None, section):
    """The run's data section to read --data with: its field names always, its explicit format
    only where the data is of that kind (an SFT run is also measured on preference pairs)."""
    if data_spec is None or section is None or section.format == "auto":
        return section
    loose = section.model_copy(update={"format": "auto"})
    return loose if data_kind(data_spec, loose) != data_kind(data_spec, section) else section


def data_kind(data_spec: str | None, section) -> str:
    """What the eval data is, told from its first source's columns (the recipe's data section,
    if any, names them): "paired" preference pairs, "prompts" to complete and reward (a prompt
    column that no other format reads), or "sft" samples."""
    columns = first_columns(data_spec, section)
    if columns is None:
        return "sft"  # no eval data: data.load_eval says what to pass
    if pairs.is_paired(columns, section):
        return "paired"
    known = section or DataSection(train="-")
    if known.format != "auto":
        return "prompts" if FORMATS[known.format].data == "prompts" else "sft"
    found = [fmt for fmt in FORMATS.values() if fmt.detect(set(columns), known)]
    return "prompts" if [fmt.data for fmt in found] == ["prompts"] else "sft"


def first_columns(data_spec: str | None, section) -> list[str] | None:
    """The columns of the eval data's first source; None where there is no eval data."""
    if data_spec is None and (section is None or not (section.eval or section.eval_fraction)):
        return None
    if data_spec is not None:
        known = section or DataSection(train=data_spec)
        spec, label, split = data_spec, "--data", known.eval_split or known.split
    elif section.eval:
        known, spec, label = section, section.eval, "data.eval"
        split = section.eval_split or section.split
    else:  # eval_fraction: a part of the training data
        known, spec, label, split = section, section.train, "data.train", section.split
    first = data.sources(spec, known, split)[0]
    return load_source(first, label).column_names


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
    if any("reward" in m for m in results.values()):
        print_rewards(results, title, report["settings"]["sampled"])
        print_merge_check(report)
        return
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


def print_rewards(results: dict, title: str, sampled: int) -> None:
    """The rewards table: the mean reward of greedy (and sampled) completions per target, each
    reward's own mean, the completions' length, and the change against the first target."""
    first = next(iter(results))
    names = [key for key in results[first] if key.startswith("rewards/")]
    columns = [("reward", "reward", "{:.3f}")]
    columns += [(name, name.removeprefix("rewards/"), "{:.3f}") for name in names]
    columns.append(("completion_length", "completion len", "{:.1f}"))
    if sampled:
        columns.append(("sampled_reward", f"sampled reward (x{sampled})", "{:.3f}"))
    table = Table(title=title.replace("samples)", "prompts)"))
    table.add_column("model", overflow="fold")
    for _, header, _ in columns:
        table.add_column(header, justify="right")
    table.add_column(f"Δ reward vs {first}", justify="right")
    table.add_column("tokens/s", justify="right")
    for name, m in results.items():
        cells = [fmt.format(m[key]) if key in m else "" for key, _, fmt in columns]
        change = "" if name == first else f"{m['reward'] - results[first]['reward']:+.3f}"
        table.add_row(name, *cells, change, f"{m['tokens_per_second']:,.0f}")
    console.print(table)
    console.print(REWARD_NOTE.format(n=sampled or "N (--sampled N)"))


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
        if before and "reward" in before and "reward" in now:
            changes.append(f"{name} reward {before['reward']:.3f} -> {now['reward']:.3f}")
        if before and "preference_accuracy" in before and "preference_accuracy" in now:
            changes.append(
                f"{name} pref. acc {before['preference_accuracy']:.2%} -> "
                f"{now['preference_accuracy']:.2%}"
            )
    if changes:
        console.print(
            f"Since the previous eval on this data ({previous['time']}): {'; '.join(changes)}"
        )
