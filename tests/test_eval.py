"""lora-tune eval: metrics checked by hand, generation, compare, lm-eval bridge, reports."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import run_cli, write_recipe

from lora_tune import evaluate, generate
from lora_tune.errors import UserError


class FixedLogits(torch.nn.Module):
    """A 'model' whose next-token logits are the same at every position."""

    def __init__(self, logits: list[float]):
        super().__init__()
        self.logits = torch.tensor(logits)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.logits.expand(*input_ids.shape, -1).clone())


def batch(ids: list[list[int]], labels: list[list[int]]) -> list[dict]:
    return [
        {
            "input_ids": torch.tensor(ids),
            "attention_mask": torch.ones(len(ids), len(ids[0]), dtype=torch.long),
            "labels": torch.tensor(labels),
        }
    ]


def test_loss_perplexity_and_accuracy_by_hand():
    # Uniform logits over 4 tokens: every label costs ln 4, so perplexity is exactly 4.
    metrics, _ = evaluate.measure(FixedLogits([0.0] * 4), batch([[1, 2, 3]], [[1, 2, 3]]))
    assert metrics["loss"] == pytest.approx(math.log(4))
    assert metrics["perplexity"] == pytest.approx(4.0)
    # Logits [ln 3, 0, 0, 0]: p(token 0) = 3/6, p(any other) = 1/6, argmax is token 0. Labels 0
    # and 1 are scored (the first position is never predicted; -100 is skipped).
    metrics, _ = evaluate.measure(
        FixedLogits([math.log(3), 0, 0, 0]), batch([[2, 0, 1, 3]], [[2, 0, 1, -100]])
    )
    assert metrics["tokens"] == 2
    assert metrics["loss"] == pytest.approx((math.log(2) + math.log(6)) / 2)
    assert metrics["token_accuracy"] == 0.5


def test_answer_metrics_by_hand():
    assert generate.normalize("The  Cat, sat!") == "cat sat"
    assert generate.token_f1("the red cat", "a cat that is red") == pytest.approx(
        2 * (2 / 2) * (2 / 4) / (1 + 0.5)
    )
    assert generate.token_f1("", "") == 1.0 and generate.token_f1("dog", "cat") == 0.0
    scores = generate.score(["Blue.", " blue", "red"], ["blue", "blue", "green"], [2, 1, 1])
    assert scores["exact_match"] == pytest.approx(1 / 3)  # only " blue" == "blue" after stripping
    assert scores["normalized_exact_match"] == pytest.approx(2 / 3)
    assert scores["token_f1"] == pytest.approx(2 / 3)
    assert scores["generated_tokens"] == pytest.approx(4 / 3)
    assert generate.cut("yes.\nQuestion: next", ["\nQuestion:", "###"]) == "yes."


def test_prompts_and_references_come_from_the_labels(tiny):
    from lora_tune import data
    from lora_tune.models import load_tokenizer
    from lora_tune.recipe import ModelSection

    tokenizer = load_tokenizer(ModelSection(id=str(tiny / "tiny-llama")))
    pairs = data.load_eval(str(tiny / "data" / "pc_eval.jsonl"), None, tokenizer)
    items = generate.items_of(pairs, tokenizer)
    first = json.loads((tiny / "data" / "pc_eval.jsonl").read_text().splitlines()[0])
    assert len(items) == 64
    assert (items[0].prompt, items[0].reference) == (first["prompt"], first["completion"])
    text = data.load_eval(str(tiny / "data" / "text_eval.jsonl"), None, tokenizer)
    assert generate.items_of(text, tokenizer) == []  # plain text has no prompts


@pytest.fixture(scope="module")
def pc_run(tiny, tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("pc")
    out = base / "run"
    recipe = write_recipe(
        base / "r.yaml",
        tiny,
        out,
        data={
            "train": str(tiny / "data" / "pc_train.jsonl"),
            "eval": str(tiny / "data" / "pc_eval.jsonl"),
        },
        training={
            "num_train_epochs": 4,
            "logging_steps": 10,
            "eval_strategy": "steps",
            "eval_steps": 50,
        },
    )
    assert run_cli("train", recipe) == 0
    return out


def test_compare_report_with_generation_samples_history_and_plot(pc_run, tmp_path, capsys):
    report_file, plot = tmp_path / "report.json", tmp_path / "loss.png"
    assert (
        run_cli(
            "eval", pc_run, "--compare", "--samples", "2", "--json", report_file, "--plot", plot
        )
        == 0
    )
    out = capsys.readouterr().out
    for header in ("exact", "token F1", "Δ loss vs base", "2 samples", "prompt", "reference"):
        assert header in out
    assert "merged vs adapter: equal within tolerance" in out and "merging speeds inference" in out
    report = json.loads(report_file.read_text())
    rows = report["results"]
    assert list(rows) == ["base", "adapter", "merged"]
    assert rows["merged"]["token_f1"] > rows["base"]["token_f1"] + 0.3  # the rule is learnt
    assert rows["merged"]["exact_match"] == rows["adapter"]["exact_match"]
    assert report["max_new_tokens"] >= 5 and report["settings"]["batch_size"] == 8
    assert len(report["generations"]["merged"]) == report["samples"] == 64
    assert {"torch", "peft"} <= report["versions"].keys()
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 5000

    assert run_cli("eval", pc_run) == 0
    assert "Since the previous eval on this data" in capsys.readouterr().out
    history = (pc_run / "eval_history.jsonl").read_text().splitlines()
    assert len(history) == 2 and "merged" in json.loads(history[1])["results"]


def test_several_targets_side_by_side(pc_run, tiny, capsys):
    report = evaluate.run(
        [str(pc_run), str(tiny / "tiny-llama")],
        data_spec=str(tiny / "data" / "pc_eval.jsonl"),
        generation=False,
    )
    assert list(report["results"]) == [f"{pc_run} merged", f"{tiny / 'tiny-llama'} model"]
    assert "exact_match" not in report["results"][f"{pc_run} merged"]
    with pytest.raises(UserError, match="--compare takes one run or adapter"):
        evaluate.run([str(pc_run), str(pc_run)], compare=True)


def write_colour_task(folder: Path, name: str, rows: list[dict]) -> None:
    """An lm-evaluation-harness multiple-choice task over `rows` (place, choices, answer), in a
    local JSON file: FOLDER/NAME.yaml and FOLDER/NAME.jsonl."""
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{name}.yaml").write_text(f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / f"{name}.jsonl"}
output_type: multiple_choice
test_split: test
doc_to_text: "what colour is the {{{{place}}}}?"
doc_to_target: "{{{{answer}}}}"
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
metadata:
  version: 1.0
""")


def test_lm_eval_harness_bridge_on_a_local_task(pc_run, tmp_path):
    """A custom task over a local JSON file: the harness runs offline through the bridge."""
    rows = [
        {
            "place": p,
            "choices": [f" the {p} is {c}." for c in ("blue", "grey", "green")],
            "answer": i,
        }
        for i, p in enumerate(["river", "mountain", "garden"])
    ]
    write_colour_task(tmp_path, "tiny_colours", rows)
    report = evaluate.run(
        str(pc_run), compare=True, tasks=["tiny_colours"], tasks_path=tmp_path, generation=False
    )
    merged, base = report["results"]["merged"], report["results"]["base"]
    assert merged["tiny_colours/acc"] == 1.0  # river is blue, mountain grey, garden green: learnt
    assert "tiny_colours/acc" in base and "tiny_colours/acc" not in report["results"]["adapter"]
    with pytest.raises(UserError, match="--tasks: unknown task no_such_task"):
        evaluate.run(str(pc_run), tasks=["no_such_task"], generation=False)


def test_eval_bad_input(pc_run, tiny, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"prompt": "x", "completion": ""}\n')
    assert run_cli("eval", pc_run, "--data", empty) == 2
    assert "--data: no usable rows in" in capsys.readouterr().err
    adapter = Path(shutil.copytree(pc_run / "adapter", tmp_path / "adapter"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone")
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert run_cli("eval", adapter, "--data", tiny / "data" / "pc_eval.jsonl") == 2
    assert f"its base model '{tmp_path / 'gone'}' is not there any more" in capsys.readouterr().err
    assert run_cli("eval", pc_run, "--generate", "--data", tiny / "data" / "text_eval.jsonl") == 2
    assert "--generate: the eval data has no prompts" in capsys.readouterr().err
    assert run_cli("eval", tiny / "tiny-llama", "--plot", tmp_path / "p.png", "--data", empty) == 2
    assert "--plot: " in capsys.readouterr().err


def test_max_new_tokens_and_stop_shape_the_generations(pc_run, tiny, tmp_path):
    data = tiny / "data" / "pc_eval.jsonl"
    full, short, stopped = (
        tmp_path / "full.json",
        tmp_path / "short.json",
        tmp_path / "stopped.json",
    )
    assert run_cli("eval", pc_run, "--data", data, "--max-samples", "8", "--json", full) == 0
    assert (
        run_cli(
            "eval",
            pc_run,
            "--data",
            data,
            "--max-samples",
            "8",
            "--max-new-tokens",
            "2",
            "--json",
            short,
        )
        == 0
    )
    assert (
        run_cli(
            "eval", pc_run, "--data", data, "--max-samples", "8", "--stop", " is", "--json", stopped
        )
        == 0
    )
    full, short, stopped = (json.loads(path.read_text()) for path in (full, short, stopped))
    # Answers such as " the meadow is blue." are learnt, and need more than 2 tokens.
    assert full["results"]["merged"]["exact_match"] > 0.5
    assert short["max_new_tokens"] == 2 and full["max_new_tokens"] > 2
    assert 0 < short["results"]["merged"]["generated_tokens"] <= 2
    assert short["results"]["merged"]["exact_match"] == 0
    # --stop cuts each answer before " is": what is left is the start of the full answer.
    assert stopped["results"]["merged"]["exact_match"] == 0
    assert len(stopped["generations"]["merged"]) == len(full["generations"]["merged"]) == 8
    for cut, whole in zip(
        stopped["generations"]["merged"], full["generations"]["merged"], strict=False
    ):
        assert " is" not in cut and " is" in whole and whole.startswith(cut), (cut, whole)


def test_limit_takes_the_first_examples_of_each_task(pc_run, tmp_path):
    """Only the first row's answer is the learnt one: with --limit 1 accuracy is 1, on all 3 it is 1/3."""
    rows = [
        {
            "place": p,
            "choices": [f" the {p} is {c}." for c in ("blue", "grey", "green")],
            "answer": 0,
        }
        for p in ["river", "mountain", "garden"]
    ]
    write_colour_task(tmp_path, "tiny_first_right", rows)
    scores = {}
    for limit in ([], ["--limit", "1"]):
        report = tmp_path / f"report{len(limit)}.json"
        assert (
            run_cli(
                "eval",
                pc_run,
                "--tasks",
                "tiny_first_right",
                "--tasks-path",
                tmp_path,
                "--no-generate",
                *limit,
                "--json",
                report,
            )
            == 0
        )
        scores[bool(limit)] = json.loads(report.read_text())["results"]["merged"][
            "tiny_first_right/acc"
        ]
    assert scores == {False: pytest.approx(1 / 3), True: 1.0}
