"""The tables of data formats, training methods and LoRA features, and what reads them.

Data formats: the recipe, detection, tokenization, `lora-tune data` and the README. Training
methods: the recipe's training section. LoRA methods and features: the recipe, the streaming
merge and the vLLM engine.
"""

from __future__ import annotations

import json
import typing
from pathlib import Path

import pytest
from helpers import run_cli, write_recipe

from lora_tune import data, formats, lora_methods, serve_vllm, stream_merge
from lora_tune.errors import UserError
from lora_tune.formats import FORMATS, Format, cell
from lora_tune.lora_methods import Feature
from lora_tune.methods import METHODS, Method
from lora_tune.models import load_tokenizer
from lora_tune.recipe import DataSection, ModelSection, validate

ROOT = Path(__file__).resolve().parents[1]


def readme_section(title: str) -> str:
    """A README section's text, its lines joined by single spaces."""
    section = (ROOT / "README.md").read_text().split(f"### {title}\n", 1)[1].split("\n### ", 1)[0]
    return " ".join(section.split())


def test_every_format_is_described_in_the_readme():
    section = readme_section("Data formats")
    for name, fmt in FORMATS.items():
        assert f"**{name}**: {fmt.description}" in section


def test_the_recipe_accepts_exactly_auto_and_the_formats():
    assert typing.get_args(DataSection.model_fields["format"].annotation) == ("auto", *FORMATS)
    assert list(FORMATS)[:4] == ["text", "prompt_completion", "messages", "alpaca"]
    recipe = {
        "model": {"id": "m"},
        "data": {"train": "x.jsonl", "format": "sharegpt"},
        "training": {"output_dir": "out"},
    }
    with pytest.raises(UserError) as info:
        validate(recipe)
    *names, last = [repr(name) for name in ("auto", *FORMATS)]
    assert info.value.problems == [
        f"data.format: Input should be {', '.join(names)} or {last}; got 'sharegpt'."
    ]


@pytest.mark.parametrize(
    "columns, settings, expected",
    [
        (
            ["messages", "prompt", "completion", "text"],
            {},
            "messages",
        ),  # the most specific columns win
        (["prompt", "completion", "instruction", "output", "text"], {}, "prompt_completion"),
        (["instruction", "output", "text"], {}, "alpaca"),
        (["text"], {}, "text"),
        (
            ["q", "a"],
            {"messages_field": "a", "prompt_field": "q"},
            "prompt_completion",
        ),  # set fields name a format
        (["chat"], {"messages_field": "chat", "text_field": "chat"}, "messages"),
    ],
)
def test_detection_order(columns, settings, expected):
    assert (
        data.detect_format(columns, DataSection(train="x", **settings), "data.train", "x")
        == expected
    )


def test_the_detection_error_names_every_sft_format_and_setting():
    with pytest.raises(UserError) as info:
        data.detect_format(["body", "title"], DataSection(train="q.jsonl"), "data.train", "q.jsonl")
    sft = [name for name, fmt in FORMATS.items() if fmt.data == "sft"]
    assert sft[:4] == ["text", "prompt_completion", "messages", "alpaca"]  # a new one comes after
    assert info.value.problems == [
        (
            f"set data.format ({', '.join(sft)}) and the field names (data.text_field, "
            "data.prompt_field, data.completion_field, data.messages_field)"
        )
    ]
    assert info.value.problems[0].startswith(
        "set data.format (text, prompt_completion, messages, alpaca"
    )


# A format added by one table entry: questions and answers, the answer trained.
QA = Format(
    "qa",
    "only the answer is trained.",
    lambda row, section, where: (
        f"Q: {cell(row, 'question', where)}\nA:",
        " " + cell(row, "answer", where),
    ),
    columns=("question", "answer"),
)


@pytest.fixture()
def qa_rows(tmp_path, monkeypatch):
    monkeypatch.setitem(FORMATS, "qa", QA)
    path = tmp_path / "qa.jsonl"
    rows = [{"question": f"what colour is river {i}?", "answer": "blue"} for i in range(4)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_a_format_added_to_the_table_is_detected_and_tokenized(qa_rows, tiny):
    tokenizer = load_tokenizer(ModelSection(id=str(tiny / "tiny-llama")))
    section = DataSection(train=str(qa_rows))
    assert formats.detect(["question", "answer"], section) is QA
    train, _, stats = data.load_datasets(section, tokenizer)
    prompt = tokenizer("Q: what colour is river 0?\nA:")["input_ids"]
    answer = tokenizer(" blue", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert train[0]["input_ids"] == prompt + answer
    assert train[0]["labels"] == [-100] * len(prompt) + answer
    assert stats["train"].samples == 4
    with pytest.raises(UserError) as info:
        data.check_columns(["question"], "qa", section, "data.train", "q.jsonl")
    assert (
        info.value.headline
        == "data.format: column 'answer' not found in data.train (q.jsonl); its columns: question"
    )
    assert info.value.problems == [
        "qa data needs question and answer columns; choose another data.format"
    ]


def test_the_data_command_shows_a_format_added_to_the_table(qa_rows, tiny, tmp_path, capsys):
    recipe = write_recipe(
        tmp_path / "r.yaml", tiny, tmp_path / "run", data={"train": str(qa_rows), "eval": None}
    )
    assert run_cli("data", recipe, "-n", "1") == 0
    assert "<s>Q: what colour is river 0?\nA:[[ blue</s>]]" in capsys.readouterr().out
    assert not (tmp_path / "run").exists()


RECIPE = {
    "model": {"id": "m"},
    "data": {"train": "x.jsonl"},
    "training": {"output_dir": "out", "beta": 0.5},
}


def test_training_is_checked_against_the_config_class_of_the_method_table(monkeypatch):
    with pytest.raises(UserError) as info:
        validate(RECIPE)
    assert info.value.problems[0].startswith("training.beta: unknown key.")
    assert info.value.problems[0].endswith("training accepts the fields of trl.SFTConfig.")
    assert "beta is a setting of trainer: dpo, kto, orpo, simpo" in info.value.problems[0]
    dpo = validate(RECIPE | {"trainer": "dpo"})
    assert (dpo.trainer, dpo.training) == ("dpo", {"output_dir": "out", "beta": 0.5})
    assert (
        dpo.to_dict()["trainer"] == "dpo"
        and "trainer" not in validate(RECIPE | {"training": {"output_dir": "out"}}).to_dict()
    )
    # The table is what validation reads: a method pointing at another config class changes it.
    monkeypatch.setitem(METHODS, "sft", Method("sft", "DPOConfig", "DPOTrainer", "test"))
    assert validate(RECIPE).training == {"output_dir": "out", "beta": 0.5}


def test_lora_methods_come_from_their_table():
    recipe = RECIPE | {"lora": {"method": "ia3"}, "training": {"output_dir": "out"}}
    with pytest.raises(UserError) as info:
        validate(recipe)
    assert info.value.problems == ["lora.method: expected one of lora, adalora, got 'ia3'."]
    assert list(lora_methods.LORA_METHODS) == ["lora", "adalora"]


def adapter(folder: Path, **config) -> Path:
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8} | config))
    (folder / "adapter_model.safetensors").write_bytes(b"")
    return folder


@pytest.mark.parametrize(
    "config, streamed, served",
    [
        ({"use_dora": True, "modules_to_save": ["lm_head"]}, None, "DoRA, modules_to_save"),
        (
            {"layer_replication": [[0, 1]], "trainable_token_indices": [5]},
            "the layer_replication option",
            "added tokens (trainable_token_indices)",
        ),
        (
            {"bias": "all", "alora_invocation_tokens": [1]},
            "the alora_invocation_tokens option",
            "LoRA biases",
        ),
        (
            {"peft_type": "ADALORA", "lora_bias": True},
            "ADALORA adapters",
            "ADALORA adapters, LoRA biases",
        ),
    ],
)
def test_lora_features_decide_what_stream_merge_and_vllm_take(config, streamed, served, tmp_path):
    from lora_tune.recipe import ModelSection as Base

    folder = adapter(tmp_path / "a", **config)
    if streamed is None:  # the configuration is accepted: reading the (empty) weights is what fails
        with pytest.raises(UserError, match="cannot read the adapter"):
            stream_merge.plan(folder, tmp_path)
    else:
        with pytest.raises(stream_merge.CannotStream) as refused:
            stream_merge.plan(folder, tmp_path)
        assert str(refused.value) == streamed
    with pytest.raises(UserError) as info:
        serve_vllm.vllm_command(Base(id="m"), {"a": folder}, "0.0.0.0", 8000, "m")
    assert (
        info.value.headline
        == f"--engine vllm: a ({folder}) uses {served}, which vLLM does not serve as LoRA"
    )


def test_a_feature_added_to_the_table_is_refused_by_stream_merge_and_vllm(tmp_path, monkeypatch):
    from lora_tune.recipe import ModelSection as Base

    monkeypatch.setattr(
        lora_methods,
        "FEATURES",
        (*lora_methods.FEATURES, Feature("spin", "spun adapters", False, False)),
    )
    spun = adapter(tmp_path / "spun", spin=True)
    with pytest.raises(stream_merge.CannotStream, match="^the spin option$"):
        stream_merge.plan(spun, tmp_path)
    with pytest.raises(UserError) as info:
        serve_vllm.vllm_command(Base(id="m"), {"s": spun}, "0.0.0.0", 8000, "m")
    assert (
        info.value.headline
        == f"--engine vllm: s ({spun}) uses spun adapters, which vLLM does not serve as LoRA"
    )
