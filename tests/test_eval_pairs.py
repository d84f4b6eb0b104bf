"""lora-tune eval on preference data: pair log-probs checked by hand, the model's own ranking,
--compare, several targets, the JSON report, detection without a recipe."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from helpers import run_cli, write_recipe

from lora_tune import evaluate, pair_scores


def load_llama(tiny: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny / "tiny-llama", dtype=torch.float32).eval()


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


@torch.no_grad()
def answer_logp(model, prompt: list[int], answer: list[int]) -> float:
    """log p(answer | prompt), one sequence alone: the sum of log_softmax at the answer tokens."""
    logits = model(input_ids=torch.tensor([prompt + answer])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    return sum(float(logp[len(prompt) + k - 1, token]) for k, token in enumerate(answer))


def trl_tokens(tokenizer, row: dict) -> tuple[list[int], list[int], list[int]]:
    """A text pair tokenized as TRL's DPOTrainer does: EOS after each answer, prompt and
    prompt+answer tokenized whole, the answers starting where they part from the prompt."""
    eos = tokenizer.eos_token
    prompt = tokenizer(row["prompt"])["input_ids"]
    chosen = tokenizer(row["prompt"] + row["chosen"] + eos)["input_ids"]
    rejected = tokenizer(row["prompt"] + row["rejected"] + eos)["input_ids"]
    assert chosen[: len(prompt)] == prompt == rejected[: len(prompt)]
    return prompt, chosen[len(prompt) :], rejected[len(prompt) :]


def shuffled(tokenizer, text: str, rng: random.Random) -> str:
    """The text's tokens in another order (never the same order)."""
    tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
    order = tokens[:]
    while order == tokens:
        rng.shuffle(order)
    return tokenizer.decode(order)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def pair_files(tiny, tmp_path_factory) -> dict[str, Path]:
    """pc: 16 prompt/completion rows of the eval data; prefs: the same prompts with the
    completion chosen over its tokens shuffled; swapped: chosen and rejected exchanged."""
    folder = tmp_path_factory.mktemp("pairs")
    tokenizer = load_tokenizer(tiny / "tiny-llama")
    rows = [json.loads(line) for line in (tiny / "data" / "pc_eval.jsonl").open()][:16]
    rng = random.Random(0)
    prefs = [
        {
            "prompt": r["prompt"],
            "chosen": r["completion"],
            "rejected": shuffled(tokenizer, r["completion"], rng),
        }
        for r in rows
    ]
    swapped = [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} for r in prefs]
    return {
        "pc": write_jsonl(folder / "pc.jsonl", rows),
        "prefs": write_jsonl(folder / "prefs.jsonl", prefs),
        "swapped": write_jsonl(folder / "swapped.jsonl", swapped),
    }


@pytest.fixture(scope="module")
def sft_run(tiny, tmp_path_factory) -> Path:
    """An SFT run on the prompt/completion data: its completions are the text it learns. Its
    recipe names its format, which does not stop pairs given with --data being read as pairs."""
    base = tmp_path_factory.mktemp("sft")
    recipe = write_recipe(
        base / "r.yaml",
        tiny,
        base / "run",
        data={
            "train": str(tiny / "data" / "pc_train.jsonl"),
            "eval": str(tiny / "data" / "pc_eval.jsonl"),
            "format": "prompt_completion",
        },
        training={"num_train_epochs": 2, "save_strategy": "no"},
    )
    assert run_cli("train", recipe) == 0
    return base / "run"


def preference_run(tiny: Path, folder: Path, name: str, **data) -> Path:
    """A DPO run from the base on the tiny preference pairs (the rule's answer chosen)."""
    data = {
        "train": str(tiny / "data" / f"{name}_train.jsonl"),
        "eval": str(tiny / "data" / f"{name}_eval.jsonl"),
    } | data
    training = {"max_steps": 30, "learning_rate": 3e-3, "save_strategy": "no"}
    recipe = write_recipe(
        folder / f"{name}.yaml", tiny, folder / name, trainer="dpo", data=data, training=training
    )
    assert run_cli("train", recipe) == 0
    return folder / name


@pytest.fixture(scope="module")
def dpo_run(tiny, tmp_path_factory) -> Path:
    return preference_run(tiny, tmp_path_factory.mktemp("dpo"), "pref")


def direct_scores(model, tokenizer, path: Path) -> tuple[list[float], list[float]]:
    """Each pair's chosen and rejected log-prob, computed one sequence at a time."""
    chosen, rejected = [], []
    for line in path.read_text().splitlines():
        prompt, good, bad = trl_tokens(tokenizer, json.loads(line))
        chosen.append(answer_logp(model, prompt, good))
        rejected.append(answer_logp(model, prompt, bad))
    return chosen, rejected


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def test_pair_logps_equal_a_direct_computation(tiny):
    """Batched by length, right-padded with EOS (also the last token of each chosen answer):
    every sum equals the one-sequence computation."""
    model = load_llama(tiny)
    rng = random.Random(1)

    def tokens(n):
        return [rng.randrange(4, 400) for _ in range(n)]

    pairs = [
        (
            [0, *tokens(rng.randrange(1, 9))],
            [*tokens(rng.randrange(1, 7)), 2],
            tokens(rng.randint(1, 12)),
        )
        for _ in range(11)
    ]
    scores = pair_scores.score_pairs(model, pairs, batch_size=3, pad_id=2)
    chosen = [answer_logp(model, p, c) for p, c, _ in pairs]
    rejected = [answer_logp(model, p, r) for p, _, r in pairs]
    assert scores.chosen.logps.tolist() == pytest.approx(chosen, abs=1e-5)
    assert scores.rejected.logps.tolist() == pytest.approx(rejected, abs=1e-5)
    assert scores.chosen.tokens.tolist() == [len(c) for _, c, _ in pairs]
    metrics = scores.metrics()
    wins = sum(c > r for c, r in zip(chosen, rejected, strict=True))
    assert 0 < wins < len(pairs)  # both sides win somewhere: accuracy is not trivially 0 or 1
    assert metrics["preference_accuracy"] == wins / len(pairs)
    assert metrics["margin"] == pytest.approx(mean(chosen) - mean(rejected), abs=1e-5)
    assert metrics["loss"] == pytest.approx(-sum(chosen) / metrics["tokens"], abs=1e-6)
    per_token = mean([c / len(answer) for c, (_, answer, _) in zip(chosen, pairs, strict=True)])
    assert metrics["chosen_logp_per_token"] == pytest.approx(per_token, abs=1e-6)
    # Rows with TRL's column names, one per batch, give the same sums.
    rows = [{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in pairs]
    alone = pair_scores.score_pairs(model, rows, batch_size=1, pad_id=1)
    assert alone.chosen.logps.tolist() == pytest.approx(chosen, abs=1e-5)


def test_long_sequences_are_cut_as_trl_cuts_them(tiny):
    pair = ([1, 2, 3], [4, 5], [6])
    assert pair_scores.sequences([pair], max_length=4) == [([1, 2, 3, 4], 3), ([1, 2, 3, 6], 3)]
    assert pair_scores.sequences([pair], 4, "keep_end") == [([2, 3, 4, 5], 2), ([1, 2, 3, 6], 3)]
    model = load_llama(tiny)
    cut = pair_scores.score_pairs(model, [pair], pad_id=2, max_length=4)
    assert cut.chosen.tokens.tolist() == [1]
    assert float(cut.chosen.logps[0]) == pytest.approx(answer_logp(model, [1, 2, 3], [4]), abs=1e-5)


def test_preference_data_without_a_recipe_is_detected_and_scored(
    tiny, pair_files, tmp_path, capsys
):
    report_file = tmp_path / "report.json"
    target = tiny / "tiny-llama"
    assert run_cli("eval", target, "--data", pair_files["prefs"], "--json", report_file) == 0
    out = capsys.readouterr().out
    assert "pref. acc" in out and "the model itself gives the chosen answer" in out
    report = json.loads(report_file.read_text())
    row = report["results"]["model"]
    model, tokenizer = load_llama(tiny), load_tokenizer(target)
    chosen, rejected = direct_scores(model, tokenizer, pair_files["prefs"])
    assert report["samples"] == row["pairs"] == 16
    wins = sum(c > r for c, r in zip(chosen, rejected, strict=True))
    assert row["preference_accuracy"] == wins / 16
    assert row["chosen_logp"] == pytest.approx(mean(chosen), abs=1e-5)
    assert row["rejected_logp"] == pytest.approx(mean(rejected), abs=1e-5)
    assert row["margin"] == pytest.approx(mean(chosen) - mean(rejected), abs=1e-5)
    for key in ("loss", "perplexity", "token_accuracy", "exact_match", "token_f1"):
        assert key in row, key
    assert len(report["generations"]["model"]) == 16


def test_base_sft_and_dpo_side_by_side(sft_run, dpo_run, tiny, tmp_path, capsys):
    """One table and one JSON report for the three models on the tiny preference pairs; DPO
    learnt to rank the chosen answers first more often, and by more, than the base does."""
    report_file = tmp_path / "report.json"
    base = tiny / "tiny-llama"
    targets = [sft_run, dpo_run, base]
    data = tiny / "data" / "pref_eval.jsonl"
    assert run_cli("eval", *targets, "--data", data, "--no-generate", "--json", report_file) == 0
    out = capsys.readouterr().out
    assert "pref. acc" in out and "the model itself gives the chosen answer" in out
    report = json.loads(report_file.read_text())
    names = [f"{sft_run} merged", f"{dpo_run} merged", f"{base} model"]
    assert list(report["results"]) == names and report["samples"] == 64
    keys = {"pairs", "preference_accuracy", "margin", "chosen_logp", "rejected_logp", "loss"}
    for name in names:
        assert keys <= report["results"][name].keys(), name
        assert report["results"][name]["pairs"] == 64
    _, dpo, untrained = (report["results"][name] for name in names)
    assert dpo["preference_accuracy"] > untrained["preference_accuracy"]
    assert dpo["margin"] > untrained["margin"]
    # Without --data, the DPO run is evaluated on its own eval pairs.
    own = evaluate.run(str(dpo_run), generation=False)
    assert own["data"] == str(data)
    for key in keys:
        assert own["results"]["merged"][key] == pytest.approx(dpo[key], abs=1e-9), key


def test_chat_pairs_are_scored_and_answered(tiny, tmp_path):
    """TRL's conversational pairs, through the run's chat template: the scores are those of the
    tokens TRL trains on, and the reference answers are the chosen turns."""
    from lora_tune import pairs

    template = tiny_chat_template()
    run = preference_run(tiny, tmp_path, "chat_pref", chat_template=template)
    report_file = tmp_path / "report.json"
    evaluate.run(str(run), max_samples=8, samples=1, json_file=report_file)
    report = json.loads(report_file.read_text())
    merged = report["results"]["merged"]
    tokenizer = load_tokenizer(run / "adapter")
    rows = [json.loads(line) for line in (tiny / "data" / "chat_pref_eval.jsonl").open()][:8]
    tokens = [pairs.tokenize_pair(tokenizer, row) for row in rows]
    model = merged_model(tiny, run)
    chosen = [answer_logp(model, prompt, good) for prompt, good, _ in tokens]
    assert merged["pairs"] == 8 and merged["chosen_logp"] == pytest.approx(mean(chosen), abs=1e-5)
    assert "exact_match" in merged and len(report["generations"]["merged"]) == 8


def tiny_chat_template() -> str:
    from lora_tune.tiny import CHAT_TEMPLATE

    return CHAT_TEMPLATE


def merged_model(tiny: Path, run: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(load_llama(tiny), run / "adapter").merge_and_unload().eval()


def test_the_trained_text_is_preferred_both_ways(sft_run, tiny, pair_files):
    """The SFT run learnt the completions: it ranks them over their shuffled tokens every time,
    and the swapped set never; the base ranks them as the direct computation says."""
    targets = [str(sft_run), str(tiny / "tiny-llama")]
    rows = {}
    for name in ("prefs", "swapped"):
        report = evaluate.run(targets, data_spec=str(pair_files[name]), generation=False)
        assert list(report["results"]) == [f"{sft_run} merged", f"{tiny / 'tiny-llama'} model"]
        rows[name] = list(report["results"].values())
    chosen, rejected = direct_scores(
        load_llama(tiny), load_tokenizer(tiny / "tiny-llama"), pair_files["prefs"]
    )
    base_wins = sum(c > r for c, r in zip(chosen, rejected, strict=True)) / 16
    assert [r["preference_accuracy"] for r in rows["prefs"]] == [1.0, base_wins]
    assert [r["preference_accuracy"] for r in rows["swapped"]] == [0.0, 1 - base_wins]
    (sft, base), (sft_swapped, _) = rows["prefs"], rows["swapped"]
    assert sft["margin"] > base["margin"] + 2
    assert sft_swapped["margin"] == pytest.approx(-sft["margin"], abs=1e-5)


def test_compare_on_pairs_keeps_merged_equal_to_adapter(sft_run, pair_files, tmp_path, capsys):
    """--compare on preference data: base, adapter, merged; merged equals the adapter; the SFT
    numbers on the chosen answers are those of the same rows given as prompt/completion data."""
    pairs_file, pc_file = tmp_path / "pairs.json", tmp_path / "pc.json"
    assert (
        run_cli("eval", sft_run, "--compare", "--data", pair_files["prefs"], "--json", pairs_file)
        == 0
    )
    out = capsys.readouterr().out
    assert "merged vs adapter: equal within tolerance" in out and "pref. acc" in out
    assert run_cli("eval", sft_run, "--compare", "--data", pair_files["pc"], "--json", pc_file) == 0
    report, pc = json.loads(pairs_file.read_text()), json.loads(pc_file.read_text())
    assert list(report["results"]) == ["base", "adapter", "merged"]
    check = report["merged_vs_adapter"]
    assert check["ok"] and check["max_abs_diff"] <= check["tolerance"]
    adapter, merged = report["results"]["adapter"], report["results"]["merged"]
    assert merged["preference_accuracy"] == adapter["preference_accuracy"] == 1.0
    for key in ("margin", "chosen_logp", "rejected_logp"):
        assert merged[key] == pytest.approx(adapter[key], abs=1e-3)
    for name in ("base", "merged"):
        ours, theirs = report["results"][name], pc["results"][name]
        assert ours["loss"] == pytest.approx(theirs["loss"], abs=1e-5)
        assert ours["tokens"] == theirs["tokens"]
        for key in ("token_accuracy", "exact_match", "token_f1"):
            assert ours[key] == theirs[key], (name, key)
    assert report["generations"] == pc["generations"]
    keys = {"pairs", "preference_accuracy", "margin", "chosen_logp", "rejected_logp"}
    assert keys | {"chosen_logp_per_token", "rejected_logp_per_token"} <= merged.keys()
    assert "preference_accuracy" not in pc["results"]["merged"]
    # The run's eval history keeps the preference numbers, and the next eval says how they moved.
    assert run_cli("eval", sft_run, "--data", pair_files["prefs"], "--no-generate") == 0
    assert "merged pref. acc 100.00% -> 100.00%" in capsys.readouterr().out
