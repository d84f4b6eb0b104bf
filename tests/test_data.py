"""Data: sources, formats, and the exact tokens that are trained."""

from __future__ import annotations

import json

import pytest

from lora_tune import data
from lora_tune.errors import UserError
from lora_tune.models import load_tokenizer
from lora_tune.recipe import DataSection, ModelSection


@pytest.fixture(scope="module")
def llama_tokenizer(tiny):
    """The tiny Llama tokenizer has no pad token, so lora-tune pads with EOS."""
    return load_tokenizer(ModelSection(id=str(tiny / "tiny-llama")))


def test_pad_equals_eos_but_the_final_eos_is_trained(llama_tokenizer):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    tok = llama_tokenizer
    assert tok.pad_token_id == tok.eos_token_id == 2
    short = data.tokenize(tok, "", "the river is blue.", 64, train_on_prompt=False)
    long = data.tokenize(tok, "", "the river is blue and it sings every night.", 64, train_on_prompt=False)
    body = tok("the river is blue.", add_special_tokens=False)["input_ids"]
    assert short["input_ids"] == [tok.bos_token_id, *body, tok.eos_token_id]
    assert short["labels"] == [-100, *body, tok.eos_token_id]
    # The collator SFTTrainer uses pads with the EOS id, yet masks the padding by position only.
    batch = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id)([short, long])
    n = len(short["input_ids"])
    assert batch["labels"][0, n - 1].item() == tok.eos_token_id
    assert batch["labels"][0, n:].tolist() == [-100] * (len(long["input_ids"]) - n)
    assert batch["input_ids"][0, n:].tolist() == [tok.eos_token_id] * (len(long["input_ids"]) - n)
    assert batch["labels"][1, -1].item() == tok.eos_token_id


def test_prompt_completion_trains_the_completion_only(llama_tokenizer):
    tok = llama_tokenizer
    sample = data.tokenize(tok, "what colour is the river?", " the river is blue.", 64, train_on_prompt=False)
    prompt = tok("what colour is the river?")["input_ids"]
    completion = tok(" the river is blue.", add_special_tokens=False)["input_ids"]
    assert prompt[0] == tok.bos_token_id
    assert sample["input_ids"] == [*prompt, *completion, tok.eos_token_id]
    assert sample["labels"] == [-100] * len(prompt) + [*completion, tok.eos_token_id]
    everything = data.tokenize(tok, "what colour is the river?", " the river is blue.", 64, train_on_prompt=True)
    assert everything["labels"] == everything["input_ids"]


def test_truncation_keeps_the_start(llama_tokenizer):
    sample = data.tokenize(llama_tokenizer, "", "the river is blue and it sings every night.", 8, False)
    assert len(sample["input_ids"]) == len(sample["labels"]) == 8
    assert sample["labels"][-1] != llama_tokenizer.eos_token_id  # the cut end has no EOS to learn


def test_alpaca_rows_use_the_templates():
    section = DataSection(train="x.jsonl", format="alpaca")
    with_input = {"instruction": "Add", "input": "2 and 3", "output": "5"}
    assert data.to_prompt_completion(with_input, section) == (
        "### Instruction:\nAdd\n\n### Input:\n2 and 3\n\n### Response:\n", "5")
    assert data.to_prompt_completion({"instruction": "Say hi", "input": "", "output": "hi"}, section) == (
        "### Instruction:\nSay hi\n\n### Response:\n", "hi")


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet", ".txt"])
def test_local_file_kinds(tmp_path, llama_tokenizer, suffix):
    from datasets import Dataset

    rows = [{"text": f"the river is blue number {i}."} for i in range(5)]
    path = tmp_path / f"d{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".txt":
        path.write_text("".join(r["text"] + "\n" for r in rows))
    else:
        getattr(Dataset.from_list(rows), "to_csv" if suffix == ".csv" else "to_parquet")(str(path))
    section = DataSection(train=str(path))
    train, evaluation = data.load_datasets(section, llama_tokenizer)
    assert len(train) == 5 and evaluation is None
    assert train[0]["labels"][-1] == llama_tokenizer.eos_token_id


def test_eval_fraction_holds_out_rows(tiny, llama_tokenizer):
    section = DataSection(train=str(tiny / "data" / "text_train.jsonl"), eval_fraction=0.25)
    train, evaluation = data.load_datasets(section, llama_tokenizer)
    assert (len(train), len(evaluation)) == (300, 100)


def test_missing_column_lists_the_columns(tiny, llama_tokenizer):
    path = tiny / "data" / "text_train.jsonl"
    section = DataSection(train=str(path), text_field="quote")
    with pytest.raises(UserError) as info:
        data.load_datasets(section, llama_tokenizer)
    assert info.value.render() == (f"data.text_field: column 'quote' not found in data.train ({path}); "
                                   "its columns: text\n  - set data.text_field to one of its columns")


def test_missing_file_and_empty_data(tmp_path, llama_tokenizer):
    with pytest.raises(UserError, match=r"data.train: file not found: .*nope.jsonl"):
        data.load_datasets(DataSection(train=str(tmp_path / "nope.jsonl")), llama_tokenizer)
    # A row whose prompt fills max_length has nothing left to train.
    long_prompt = tmp_path / "long.jsonl"
    long_prompt.write_text(json.dumps({"prompt": "the river " * 50, "completion": "blue"}) + "\n")
    section = DataSection(train=str(long_prompt), format="prompt_completion", max_length=16)
    with pytest.raises(UserError, match=r"data.train: no usable rows .* \(1 rows, none with tokens to train"):
        data.load_datasets(section, llama_tokenizer)


def test_format_detection_for_eval_without_recipe(tiny, llama_tokenizer):
    evaluation = data.load_eval(str(tiny / "data" / "pc_eval.jsonl"), None, llama_tokenizer)
    assert len(evaluation) == 64
    assert evaluation[0]["labels"][0] == -100  # prompt masked: detected as prompt_completion
