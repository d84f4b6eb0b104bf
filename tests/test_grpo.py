"""GRPO with LoRA: rewards named in the recipe and checked before any weights load; GRPO from an
SFT adapter raises the reward of greedy answers to held-out prompts; metrics.json and TensorBoard
get each reward's mean and spread and the completion length; resume, reload with plain PEFT,
merge and eval work as for the other trainers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import assert_resumes_to_same_adapter, run_cli, write_recipe
from safetensors.torch import load_file

from lora_tune import rewards, runs


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """GRPO's generation runs thousands of tiny operations: a second thread gains nothing on the
    tiny model, and where another process holds a core, every parallel operation waits for it
    (a 10-step run took 80 s with 2 threads on a busy 2-core machine, 1 s with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # for the resumed run's own process
    yield
    torch.set_num_threads(threads)


def grpo_recipe(path, tiny, out, **sections):
    """A short GRPO recipe on the tiny Llama's questions, rewarded for the exact answer."""
    data = {
        "train": str(tiny / "data" / "prompts_train.jsonl"),
        "eval": str(tiny / "data" / "prompts_eval.jsonl"),
    }
    training = {
        "max_steps": 4,
        "per_device_train_batch_size": 8,
        "num_generations": 4,
        "max_completion_length": 8,
        "temperature": 0.1,
        "top_k": 3,
        "learning_rate": 3e-4,
        "logging_steps": 1,
        "save_steps": 100,
    }
    sections = {
        "data": data | sections.pop("data", {}),
        "training": training | sections.pop("training", {}),
        "rewards": sections.pop("rewards", [{"exact_match": "answer", "weight": 1.0}]),
        **sections,
    }
    return write_recipe(path, tiny, out, trainer="grpo", **sections)


def metrics(out) -> dict:
    return json.loads((out / runs.METRICS).read_text())


def eval_report(*args) -> dict:
    out = Path(args[-1])
    assert run_cli("eval", *args[:-1], "--json", out) == 0
    return json.loads(out.read_text())


def tensorboard_scalars(run: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / runs.LOGS))
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_grpo_from_an_sft_adapter_raises_the_held_out_reward(tiny, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sft, out = tmp_path / "sft", tmp_path / "grpo"
    data = {
        "train": str(tiny / "data" / "pc_train.jsonl"),
        "eval": str(tiny / "data" / "pc_eval.jsonl"),
    }
    training = {"max_steps": 150, "learning_rate": 4e-3, "lr_scheduler_type": "cosine"}
    training |= {"warmup_steps": 10}
    assert (
        run_cli("train", write_recipe(tmp_path / "s.yaml", tiny, sft, data=data, training=training))
        == 0
    )
    training = {"max_steps": 30, "per_device_train_batch_size": 32, "num_generations": 8}
    training |= {"max_completion_length": 12, "logging_steps": 5, "seed": 0}
    path = grpo_recipe(
        tmp_path / "g.yaml", tiny, out, model={"adapter": str(sft)}, training=training
    )
    assert run_cli("train", path) == 0
    # Per logging step (the first alone): each reward's mean and spread, the completion length.
    found = metrics(out)
    logged = [entry for entry in found["log_history"] if "loss" in entry]
    assert [entry["step"] for entry in logged] == [1, 5, 10, 15, 20, 25, 30]
    for entry in logged:
        assert 0 <= entry["rewards/exact_match/mean"] <= 1 and entry["rewards/exact_match/std"] >= 0
        assert entry["reward"] == entry["rewards/exact_match/mean"]  # one reward, weight 1
        assert 1 <= entry["completions/mean_length"] <= 12
    assert found["method"]["first_logged_reward"] == logged[0]["reward"]
    assert found["method"]["rewards/exact_match/mean"] == logged[-1]["rewards/exact_match/mean"]
    scalars = tensorboard_scalars(out)
    for tag in ("rewards/exact_match/mean", "rewards/exact_match/std", "completions/mean_length"):
        assert scalars[f"train/{tag}"] == pytest.approx([entry[tag] for entry in logged])
    # Held-out prompts: greedy answers of the GRPO model earn more than the SFT model's.
    data = str(tiny / "data" / "prompts_eval.jsonl")
    report = eval_report(sft, out, "--data", data, tmp_path / "e.json")
    before = report["results"][f"{sft} merged"]["reward"]
    after = report["results"][f"{out} merged"]["reward"]
    assert after >= before + 0.1, (before, after)
    # Base, adapter and merged side by side; merged answers as the adapter does.
    report = eval_report(out, "--compare", tmp_path / "c.json")
    results = report["results"]
    assert (
        report["merged_vs_adapter"]["ok"]
        and results["merged"]["reward"] == results["adapter"]["reward"]
    )
    assert results["adapter"]["reward"] == after and results["base"]["reward"] == 0.0
    # Reloaded with plain PEFT (no reference adapter saved), and merged.
    assert not (out / "adapter" / "ref").exists()
    merged = tmp_path / "merged"
    assert run_cli("merge", out, "-o", merged) == 0
    tokenizer = AutoTokenizer.from_pretrained(out / "adapter")
    ids = tokenizer("what colour is the river?", return_tensors="pt")
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny / "tiny-llama"), out / "adapter"
    ).eval()
    with torch.no_grad():
        want = peft_model(**ids).logits
        got = AutoModelForCausalLM.from_pretrained(merged)(**ids).logits
    assert (got - want).abs().max() < 1e-4


def test_a_killed_grpo_run_resumes_to_the_same_adapter(tiny, tmp_path):
    assert_resumes_to_same_adapter(grpo_recipe, tiny, tmp_path)


REWARD_FILE = '''
import json, os


def words(prompts, completions, answer, **kwargs):
    """The share of the answer's words in the completion; records what it was given."""
    with open(os.environ["REWARD_LOG"], "a") as log:
        log.write(json.dumps({"keys": sorted(kwargs), "prompt": prompts[0],
                              "completion": completions[0], "answer": answer[0]}) + "\\n")
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [len(set(t.split()) & set(a.split())) / len(a.split()) for t, a in zip(texts, answer)]


def no_kwargs(prompts, completions):
    return [0.0] * len(completions)


def needs_column(prompts, completions, solution, completion_ids, trainer_state, log_extra,
                 log_metric):
    return [0.0] * len(completions)


def wrong_length(prompts, completions, **kwargs):
    return [1.0]
'''


def test_user_reward_functions_get_trls_arguments_and_are_logged_by_name(
    tiny, tmp_path, monkeypatch
):
    """A function from a file beside the recipe (its path relative to the recipe), on chat
    prompts, with a KL term (beta): it gets the prompts, the completions as chat messages, the
    completion ids, TRL's trainer state and the dataset's other columns; its weighted mean is
    logged under its name; the reference is the base with the adapter switched off."""
    from lora_tune import recipe as recipes
    from lora_tune import tiny as builder
    from lora_tune import train

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "scores.py").write_text(REWARD_FILE)
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("REWARD_LOG", str(log))
    rows = [
        {"prompt": [{"role": "user", "content": row["prompt"]}], "answer": row["answer"]}
        for row in (json.loads(line) for line in (tiny / "data" / "prompts_train.jsonl").open())
    ]
    chat = builder.write_jsonl(tmp_path / "chat.jsonl", rows[:40])
    out = tmp_path / "run"
    path = grpo_recipe(
        tmp_path / "r.yaml",
        tiny,
        out,
        data={"train": str(chat), "eval": None, "chat_template": builder.CHAT_TEMPLATE},
        rewards=[
            {"function": "mine/scores.py:words", "weight": 0.5},
            {"exact_match": "answer", "weight": 2.0, "name": "exact"},
        ],
        training={"max_steps": 2, "beta": 0.04},
    )
    plan = train.make_plan(recipes.load(path))
    lines = dict(train.plan_rows(plan))
    assert lines["rewards"] == "function (words) x0.5, exact_match (answer) as exact x2"
    assert train.describe_trainer(plan).endswith(
        "reference: the base with the adapter switched off"
    )
    assert plan.training_config.reward_weights == [0.5, 2.0]
    assert run_cli("train", path) == 0
    call = json.loads(log.read_text().splitlines()[0])
    assert call["keys"] == ["completion_ids", "log_extra", "log_metric", "trainer_state"]
    assert call["prompt"][0]["role"] == "user" and call["completion"][0]["role"] == "assistant"
    place = call["prompt"][0]["content"].removeprefix("what colour is the ").removesuffix("?")
    assert call["answer"] == f"the {place} is {builder.colour(place)}."  # the prompt's own row
    entries = [entry for entry in metrics(out)["log_history"] if "loss" in entry]
    for entry in entries:
        weighted = 0.5 * entry["rewards/words/mean"] + 2.0 * entry["rewards/exact/mean"]
        assert entry["reward"] == pytest.approx(weighted, abs=1e-5)
        assert "kl" in entry and math.isfinite(entry["kl"])
    saved = recipes.load(out / runs.RECIPE)  # the run's recipe names the file by its full path
    assert saved.rewards[0].value == f"{tmp_path / 'mine' / 'scores.py'}:words"


ERROR_CASES = {
    "missing file": (
        {"rewards": [{"function": "nowhere.py:score"}]},
        "rewards[0].function: nowhere.py not found ({tmp}/nowhere.py); the path is relative to "
        "the recipe file",
    ),
    "missing function": (
        {"rewards": [{"function": "scores.py:score", "weight": 1}]},
        "rewards[0].function: scores.py has no function 'score'; it defines: words, no_kwargs, "
        "needs_column, wrong_length. Expected: def score(prompts, completions, **kwargs) -> "
        "list[float]",
    ),
    "wrong signature": (
        {"rewards": [{"function": "scores.py:no_kwargs"}]},
        "rewards[0].function: no_kwargs(prompts, completions) cannot take the arguments TRL passes "
        "(got an unexpected keyword argument 'completion_ids'). Expected: def no_kwargs(prompts, "
        "completions, **kwargs) -> list[float], with the dataset's columns among the keyword "
        "arguments",
    ),
    "two kinds": (
        {"rewards": [{"regex": "x", "length": 3}]},
        "rewards[0]: name exactly one kind of reward (exact_match, number_match, regex, length, "
        "function); got regex, length.",
    ),
    "unknown key": (
        {"rewards": [{"exact_match": "answer", "wieght": 2}]},
        "rewards[0].wieght: unknown key. A reward is one of exact_match, number_match, regex, "
        "length, function, with weight and name.",
    ),
    "same name": (
        {"rewards": [{"regex": "a"}, {"regex": "b"}]},
        "rewards[1]: its name regex is rewards[0]'s too; TRL logs each reward by name: give one of "
        "them a name: key.",
    ),
    "bad pattern": (
        {"rewards": [{"regex": "(unclosed"}]},
        "rewards[0].regex: not a valid regular expression: missing ), unterminated subpattern at "
        "position 0.",
    ),
    "no rewards": ({"rewards": None}, None),
    "weights in training": (
        {"training": {"reward_weights": [1.0]}},
        "training.reward_weights: not set here; give each entry of the rewards section its "
        "weight instead.",
    ),
    "partial groups": (
        {"training": {"per_device_train_batch_size": 6, "gradient_accumulation_steps": 1}},
        "training.per_device_train_batch_size: GRPO generates 6 x 1 completions at a time "
        "(per_device_train_batch_size x gradient_accumulation_steps), not whole groups of "
        "num_generations (4) per prompt; set it to a multiple of 4, or num_generations to a "
        "divisor of 6 (2 or more).",
    ),
    "auto batch": (
        {"training": {"per_device_train_batch_size": "auto"}},
        "training.per_device_train_batch_size: auto is not available with trainer grpo (each "
        "batch of completions holds whole groups of num_generations); set a multiple of "
        "training.num_generations.",
    ),
}


@pytest.mark.parametrize("case", ERROR_CASES, ids=list(ERROR_CASES))
def test_recipe_mistakes_are_clear_before_anything_loads(tiny, tmp_path, capsys, case):
    sections, message = ERROR_CASES[case]
    (tmp_path / "scores.py").write_text(REWARD_FILE)
    out = tmp_path / "run"
    path = grpo_recipe(tmp_path / "r.yaml", tiny, out, **sections)
    if sections.get("rewards", "") is None:  # no rewards section at all
        path.write_text(path.read_text().replace("rewards: null\n", ""))
        message = (
            "rewards: required section missing for trainer grpo. Add at least one reward, e.g. "
            "rewards: [{exact_match: answer, weight: 1.0}]."
        )
    assert run_cli("train", path, "--dry-run") == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"error: {path}: 1 problem in the recipe:"
    assert err[1] == "  - " + message.replace("{tmp}", str(tmp_path))
    assert not out.exists()


def test_data_mistakes_are_clear_before_any_weights_load(tiny, tmp_path, capsys):
    (tmp_path / "scores.py").write_text(REWARD_FILE)
    from lora_tune import tiny as builder

    train = str(tiny / "data" / "prompts_train.jsonl")
    odd = builder.write_jsonl(tmp_path / "odd.jsonl", [{"prompt": "p", "completions": "c"}])
    cases = [
        (
            {"rewards": [{"number_match": "solution"}]},
            "rewards[0].number_match: column 'solution' not found in data.train ({train}); its "
            "columns: prompt, answer",
        ),
        (
            {"rewards": [{"function": "scores.py:needs_column"}]},
            "rewards[0].function: needs_column(prompts, completions, solution, completion_ids, "
            "trainer_state, log_extra, log_metric) cannot take the arguments TRL passes "
            "(missing a required argument: 'solution'). Expected: def needs_column(prompts, "
            "completions, **kwargs) -> list[float], with the dataset's columns among the "
            "keyword arguments",
        ),
        (
            {"data": {"train": str(odd), "eval": None}, "rewards": [{"regex": "x"}]},
            f"data.train ({odd}) has a column 'completions', a name GRPO gives reward functions "
            "(or reads) itself; rename that column",
        ),
    ]
    for sections, message in cases:
        path = grpo_recipe(tmp_path / "r.yaml", tiny, tmp_path / "run", **sections)
        assert run_cli("train", path, "--dry-run") == 2
        err = capsys.readouterr().err.splitlines()
        assert err[1] == "  - " + message.replace("{train}", train)
        assert not (tmp_path / "run").exists()
    path = grpo_recipe(tmp_path / "r.yaml", tiny, tmp_path / "run", training={"use_vllm": True})
    assert run_cli("train", path, "--dry-run") == 2
    assert capsys.readouterr().err.splitlines()[0] == (
        "error: training.use_vllm: the vllm package is not installed (pip install vllm); vLLM "
        "generates on CUDA GPUs, and this run has none"
    )


def test_a_wrong_reward_result_stops_training_with_the_signature(tiny, tmp_path, capsys):
    (tmp_path / "scores.py").write_text(REWARD_FILE)
    path = grpo_recipe(
        tmp_path / "r.yaml",
        tiny,
        tmp_path / "run",
        rewards=[{"function": "scores.py:wrong_length"}],
    )
    assert run_cli("train", path) == 2
    err = capsys.readouterr().err  # after the progress bar's line
    assert err[err.index("error: ") :].splitlines()[0] == (
        "error: rewards: wrong_length returned '[1.0]' for 8 completions; a reward function "
        "returns one float (or None) per completion. Expected: def wrong_length(prompts, "
        "completions, **kwargs) -> list[float]"
    )


def test_plan_counts_steps_as_grpo_takes_them(tiny, tmp_path):
    """One epoch of 40 prompts, 8 completions per micro-batch in groups of 4, two micro-batches
    per step: each generation serves 16 completions (4 prompts), so 10 generations of 2
    micro-batches, 10 optimizer steps."""
    from lora_tune import recipe as recipes
    from lora_tune import tiny as builder
    from lora_tune import train

    rows = [json.loads(line) for line in (tiny / "data" / "prompts_train.jsonl").open()][:40]
    data = {"train": str(builder.write_jsonl(tmp_path / "p.jsonl", rows)), "eval": None}
    out = tmp_path / "run"
    training = {"max_steps": -1, "num_train_epochs": 1, "gradient_accumulation_steps": 2}
    path = grpo_recipe(tmp_path / "r.yaml", tiny, out, data=data, training=training)
    plan = train.make_plan(recipes.load(path))
    assert plan.steps == 10
    assert dict(train.plan_rows(plan))["generation"] == (
        "transformers generate: 4 completions of up to 8 tokens for each of 4 prompts every 2 "
        "step(s)"
    )
    assert run_cli("train", path) == 0
    assert metrics(out)["steps"] == 10


def test_data_preview_shows_the_prompt_and_what_the_rewards_get(tiny, tmp_path, capsys):
    path = grpo_recipe(tmp_path / "r.yaml", tiny, tmp_path / "run")
    assert run_cli("data", path, "-n", "1") == 0
    out = capsys.readouterr().out
    first = json.loads((tiny / "data" / "prompts_train.jsonl").open().readline())
    assert f"prompt: <s>{first['prompt']}\n" in out
    assert f"answer (to the rewards): {first['answer']}\n" in out
    assert "prompt tokens per epoch" in out and "│ train │ 400  │ 400 " in out


def test_eval_on_prompts_needs_a_grpo_run(tiny, tmp_path, capsys):
    data = tiny / "data" / "prompts_eval.jsonl"
    assert run_cli("eval", tiny / "tiny-llama", "--data", data) == 2
    assert capsys.readouterr().err.splitlines()[0] == (
        f"error: {data}: prompt-only data (a prompt column and no answer to compare) is scored "
        "with the rewards of a grpo run, and no target is one"
    )
    assert (
        run_cli(
            "eval", tiny / "tiny-llama", "--data", tiny / "data" / "pc_eval.jsonl", "--sampled", "2"
        )
        == 2
    )
    assert capsys.readouterr().err.splitlines()[0] == (
        "error: --sampled: the eval data is not prompt-only data; sampled completions are scored "
        "with a grpo run's rewards"
    )


def test_built_in_rewards():
    text = ["the river is blue.", " the river is blue. ", "the river is red."]
    chat = [[{"role": "assistant", "content": t}] for t in text]
    answer = ["the river is blue."] * 3
    ids = [[1] * 4, [1] * 8, [1] * 16]
    made = {
        kind: rewards.function_of(rewards.Reward(kind, value, 1.0, kind))
        for kind, value in (
            ("exact_match", "answer"),
            ("number_match", "answer"),
            ("regex", r"^the \w+ is blue\.$"),
            ("length", 8),
        )
    }
    assert made["exact_match"].__name__ == "exact_match"  # TRL logs rewards/<__name__>/mean
    for completions in (text, chat):
        args = {"prompts": ["q"] * 3, "completions": completions, "completion_ids": ids}
        assert made["exact_match"](**args, answer=answer) == [1.0, 1.0, 0.0]
        assert made["regex"](**args, answer=answer) == [1.0, 0.0, 0.0]
        assert made["length"](**args, answer=answer) == [0.5, 1.0, 0.0]
    numbers = ["so it is 1,234.", "about 1234.0 apples", "12", "no number"]
    gsm8k = ["step 1... #### 1234"] * 3 + ["#### 7"]
    args = {"prompts": ["q"] * 4, "completions": numbers, "completion_ids": [[]] * 4}
    assert made["number_match"](**args, answer=gsm8k) == [1.0, 1.0, 0.0, 0.0]
    assert rewards.last_number(-2.5) == -2.5 and rewards.last_number("x -.5 y") == -0.5


def test_a_kl_term_from_an_adapter_takes_that_adapter_as_reference(tiny, tmp_path):
    """With beta > 0 and a starting adapter, the reference is a frozen copy of the start: the
    first step's KL is 0 (the policy is its reference); the copy is not saved."""
    sft, out = tmp_path / "sft", tmp_path / "grpo"
    data = {"train": str(tiny / "data" / "pc_train.jsonl"), "eval": None}
    training = {"max_steps": 10}
    assert (
        run_cli("train", write_recipe(tmp_path / "s.yaml", tiny, sft, data=data, training=training))
        == 0
    )
    training = {"max_steps": 2, "beta": 0.1}
    path = grpo_recipe(
        tmp_path / "g.yaml", tiny, out, model={"adapter": str(sft)}, training=training
    )
    assert run_cli("train", path) == 0
    kl = [entry["kl"] for entry in metrics(out)["log_history"] if "kl" in entry]
    assert kl[0] == pytest.approx(0.0, abs=1e-6) and len(kl) == 2
    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    assert saved.keys() == load_file(sft / "adapter" / "adapter_model.safetensors").keys()
    assert not (out / "adapter" / "ref").exists()
