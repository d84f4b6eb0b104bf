"""Data: sources, formats, and the exact tokens that are trained."""

from __future__ import annotations

import copy
import itertools
import json
import os

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
    long = data.tokenize(
        tok, "", "the river is blue and it sings every night.", 64, train_on_prompt=False
    )
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
    sample = data.tokenize(
        tok, "what colour is the river?", " the river is blue.", 64, train_on_prompt=False
    )
    prompt = tok("what colour is the river?")["input_ids"]
    completion = tok(" the river is blue.", add_special_tokens=False)["input_ids"]
    assert prompt[0] == tok.bos_token_id
    assert sample["input_ids"] == [*prompt, *completion, tok.eos_token_id]
    assert sample["labels"] == [-100] * len(prompt) + [*completion, tok.eos_token_id]
    everything = data.tokenize(
        tok, "what colour is the river?", " the river is blue.", 64, train_on_prompt=True
    )
    assert everything["labels"] == everything["input_ids"]


def test_truncation_keeps_the_start(llama_tokenizer):
    sample = data.tokenize(
        llama_tokenizer, "", "the river is blue and it sings every night.", 8, False
    )
    assert len(sample["input_ids"]) == len(sample["labels"]) == 8
    assert sample["labels"][-1] != llama_tokenizer.eos_token_id  # the cut end has no EOS to learn


def test_alpaca_rows_use_the_templates():
    section = DataSection(train="x.jsonl", format="alpaca")
    with_input = {"instruction": "Add", "input": "2 and 3", "output": "5"}
    assert data.to_prompt_completion(with_input, "alpaca", section) == (
        "### Instruction:\nAdd\n\n### Input:\n2 and 3\n\n### Response:\n",
        "5",
    )
    assert data.to_prompt_completion(
        {"instruction": "Say hi", "input": "", "output": "hi"}, "alpaca", section
    ) == ("### Instruction:\nSay hi\n\n### Response:\n", "hi")
    custom = DataSection(train="x.jsonl", prompt_template="Q: {instruction} ({input})\nA:")
    assert data.to_prompt_completion(with_input, "alpaca", custom)[0] == "Q: Add (2 and 3)\nA:"


@pytest.fixture()
def chat_tokenizer(llama_tokenizer):
    from lora_tune.tiny import CHAT_TEMPLATE

    tok = copy.deepcopy(llama_tokenizer)
    tok.chat_template = CHAT_TEMPLATE
    return tok


CHAT = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "what colour is the river?"},
    {"role": "assistant", "content": "blue."},
    {"role": "user", "content": "and the city?"},
    {"role": "assistant", "content": "red."},
]


def test_messages_train_only_the_assistant_turns(chat_tokenizer):
    tok = chat_tokenizer
    sample = data.tokenize_chat(tok, CHAT, 256, train_on_prompt=False, where="row 0")
    # The template renders "role: content</s>\n" per turn; each assistant turn's content, its
    # </s> and newline are trained, the rest (system, user, "assistant: " prompts) is masked.
    text = (
        "system: be brief</s>\nuser: what colour is the river?</s>\nassistant: blue.</s>\n"
        "user: and the city?</s>\nassistant: red.</s>\n"
    )
    assert sample["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    tokens = [
        (tok.decode([i]), label != -100)
        for i, label in zip(sample["input_ids"], sample["labels"], strict=False)
    ]
    runs = [
        ("".join(t for t, _ in group), trained)
        for trained, group in itertools.groupby(tokens, lambda x: x[1])
    ]
    # BPE glues the space of "assistant: " to the answer's first word: that token is trained.
    assert runs == [
        ("system: be brief</s>\nuser: what colour is the river?</s>\nassistant:", False),
        (" blue.</s>\n", True),
        ("user: and the city?</s>\nassistant:", False),
        (" red.</s>\n", True),
    ]
    assert all(
        label in (-100, token)
        for token, label in zip(sample["input_ids"], sample["labels"], strict=False)
    )
    assert tok.eos_token_id in sample["labels"][-3:]  # the last turn ends with a trained EOS
    everything = data.tokenize_chat(tok, CHAT, 256, train_on_prompt=True, where="row 0")
    assert everything["labels"] == everything["input_ids"]


def test_messages_get_a_final_eos_when_the_template_has_none(chat_tokenizer):
    tok = chat_tokenizer
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    sample = data.tokenize_chat(tok, CHAT[1:3], 256, train_on_prompt=False, where="row 0")
    assert sample["input_ids"][-1] == sample["labels"][-1] == tok.eos_token_id
    trained = [label for label in sample["labels"] if label != -100]
    assert tok.decode(trained) == "blue.</s>"
    assert trained[-1] == tok.eos_token_id and tok.eos_token_id not in trained[:-1]


def test_a_template_that_rewrites_earlier_turns_is_refused(chat_tokenizer):
    chat_tokenizer.chat_template = (
        "{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['content'] }}"
        "{% endfor %}{% if add_generation_prompt %}A:{% endif %}"
    )
    with pytest.raises(UserError, match="does not render conversations turn by turn .*row 7"):
        data.tokenize_chat(chat_tokenizer, CHAT, 256, train_on_prompt=False, where="row 7")
    everything = data.tokenize_chat(
        chat_tokenizer, CHAT, 256, train_on_prompt=True, where="row 7"
    )  # the fix offered
    assert everything["labels"][:-1] == everything["input_ids"][:-1]


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_bad_rows_are_skipped_and_counted_or_refused(tmp_path, chat_tokenizer):
    chats = write_rows(
        tmp_path / "chats.jsonl",
        [
            {"messages": CHAT},
            {"messages": [{"role": "user", "content": "hello?"}]},  # no assistant turn: skipped
            {"messages": CHAT[:3] * 30},  # longer than max_length: truncated
        ],
    )
    section = DataSection(train=str(chats), max_length=96)
    train, _, stats = data.load_datasets(section, chat_tokenizer)
    assert len(train) == 2
    assert stats["train"].skipped == {"no assistant turn": 1}
    assert (stats["train"].rows, stats["train"].samples, stats["train"].truncated) == (3, 2, 1)
    assert sorted(len(ids) for ids in train["input_ids"]) == [
        len(data.tokenize_chat(chat_tokenizer, CHAT, 999, False, "")["input_ids"]),
        96,
    ]

    texts = write_rows(
        tmp_path / "texts.jsonl", [{"text": "the river is blue."}, {"text": ""}, {"text": None}]
    )
    train, _, stats = data.load_datasets(DataSection(train=str(texts)), chat_tokenizer)
    assert len(train) == 1 and stats["train"].skipped == {"empty": 2}

    numbers = write_rows(
        tmp_path / "numbers.jsonl", [{"text": "fine"}, {"text": "also fine"}, {"text": 42}]
    )
    with pytest.raises(UserError) as info:
        data.load_datasets(DataSection(train=str(numbers)), chat_tokenizer)
    assert (
        info.value.headline
        == f"data.train ({numbers}), row 2, field 'text': expected text, got int '42'"
    )

    broken = write_rows(tmp_path / "broken.jsonl", [{"messages": [{"role": "user"}]}])
    with pytest.raises(
        UserError, match=r"row 0: each chat turn needs a 'role' and a text 'content'"
    ):
        data.load_datasets(DataSection(train=str(broken)), chat_tokenizer)


def test_messages_need_a_chat_template(tmp_path, llama_tokenizer):
    chats = write_rows(tmp_path / "chats.jsonl", [{"messages": CHAT}])
    with pytest.raises(
        UserError, match="holds chat messages and the tokenizer has no chat template"
    ):
        data.load_datasets(DataSection(train=str(chats)), llama_tokenizer)
    with pytest.raises(
        UserError, match="data.chat_template: the tokenizer of m has no chat template"
    ):
        data.prepare_tokenizer(llama_tokenizer, DataSection(train="x", format="messages"), "m")


@pytest.mark.parametrize(
    "name, expected",
    [("text", "text"), ("pc", "prompt_completion"), ("chat", "messages"), ("alpaca", "alpaca")],
)
def test_formats_are_detected_from_the_columns(tiny, name, expected):
    from datasets import load_dataset

    columns = load_dataset(
        "json", data_files=str(tiny / "data" / f"{name}_eval.jsonl"), split="train"
    ).column_names
    assert data.detect_format(columns, DataSection(train="x"), "data.train", "x") == expected


def test_undetectable_format_lists_the_columns():
    with pytest.raises(UserError) as info:
        data.detect_format(
            ["question", "answer"], DataSection(train="q.jsonl"), "data.train", "q.jsonl"
        )
    assert info.value.headline == (
        "data.format: cannot tell the format of data.train (q.jsonl) from its columns: "
        "question, answer"
    )


def test_several_sources_mix_formats(tiny, chat_tokenizer):
    section = DataSection(
        train=[
            str(tiny / "data" / "text_eval.jsonl"),
            {"path": str(tiny / "data" / "chat_eval.jsonl")},
            str(tiny / "data" / "alpaca_eval.jsonl"),
        ]
    )
    train, _, stats = data.load_datasets(section, chat_tokenizer)
    assert len(train) == stats["train"].samples == 3 * 64


def test_tokenized_data_is_cached(tiny, llama_tokenizer):
    section = DataSection(train=str(tiny / "data" / "pc_train.jsonl"))
    first, _, _ = data.load_datasets(section, llama_tokenizer)
    files = [f["filename"] for f in first.cache_files]
    mtimes = [os.path.getmtime(f) for f in files]
    second, _, _ = data.load_datasets(section, copy.deepcopy(llama_tokenizer))
    assert [f["filename"] for f in second.cache_files] == files
    assert [os.path.getmtime(f) for f in files] == mtimes  # read back, not written again


def test_packed_loss_equals_unpacked_loss(tiny, llama_tokenizer):
    """Packed samples must not see each other: the loss of a packed row equals the padded batch's.

    Llama passes position ids to its mask and keeps samples apart; OPT does not, so lora-tune
    refuses to pack for it, and the leak is visible in the loss.
    """
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import pack_dataset
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from lora_tune.models import check_packing, meta_model

    for kind in ("llama", "opt"):
        model = AutoModelForCausalLM.from_pretrained(tiny / f"tiny-{kind}").eval()
        section = DataSection(train=str(tiny / "data" / "pc_eval.jsonl"), train_on_prompt=True)
        samples, _, _ = data.load_datasets(section, llama_tokenizer)
        samples = samples.select(range(12))
        padded = DataCollatorForLanguageModeling(pad_token_id=llama_tokenizer.pad_token_id)(
            list(samples)
        )
        packed_rows = pack_dataset(Dataset.from_list(list(samples)), seq_length=2048)
        assert len(packed_rows) == 1
        packed = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(
            list(packed_rows)
        )
        # As in SFTTrainer's training step: no KV cache (with one, transformers ignores the packing).
        with torch.no_grad():
            unpacked_loss = model(**padded, use_cache=False).loss
            packed_loss = model(
                input_ids=packed["input_ids"],
                labels=packed["labels"],
                position_ids=packed["position_ids"],
                use_cache=False,
            ).loss
            # Without position ids the samples attend to each other and the loss changes.
            leaky_loss = model(
                input_ids=packed["input_ids"], labels=packed["labels"], use_cache=False
            ).loss
        assert abs(leaky_loss.item() - unpacked_loss.item()) > 1e-3, kind
        if kind == "llama":
            check_packing(meta_model(model.config), "tiny-llama")
            assert packed_loss.item() == pytest.approx(unpacked_loss.item(), abs=1e-5)
        else:
            assert abs(packed_loss.item() - unpacked_loss.item()) > 1e-3
            with pytest.raises(
                UserError,
                match=r"data.packing: tiny-opt \(opt\) cannot keep samples in one row apart",
            ):
                check_packing(meta_model(model.config), "tiny-opt")


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
    train, evaluation, _ = data.load_datasets(section, llama_tokenizer)
    assert len(train) == 5 and evaluation is None
    assert train[0]["labels"][-1] == llama_tokenizer.eos_token_id


def test_eval_fraction_holds_out_rows(tiny, llama_tokenizer):
    section = DataSection(train=str(tiny / "data" / "text_train.jsonl"), eval_fraction=0.25)
    train, evaluation, _ = data.load_datasets(section, llama_tokenizer)
    assert (len(train), len(evaluation)) == (300, 100)


def test_missing_column_lists_the_columns(tiny, llama_tokenizer):
    path = tiny / "data" / "text_train.jsonl"
    section = DataSection(train=str(path), format="text", text_field="quote")
    with pytest.raises(UserError) as info:
        data.load_datasets(section, llama_tokenizer)
    assert info.value.render() == (
        f"data.text_field: column 'quote' not found in data.train ({path}); "
        "its columns: text\n  - set data.text_field to one of its columns"
    )


def test_missing_file_and_empty_data(tmp_path, llama_tokenizer):
    with pytest.raises(UserError, match=r"data.train: file not found: .*nope.jsonl"):
        data.load_datasets(DataSection(train=str(tmp_path / "nope.jsonl")), llama_tokenizer)
    # A row whose prompt fills max_length has nothing left to train.
    long_prompt = tmp_path / "long.jsonl"
    long_prompt.write_text(json.dumps({"prompt": "the river " * 50, "completion": "blue"}) + "\n")
    section = DataSection(train=str(long_prompt), format="prompt_completion", max_length=16)
    with pytest.raises(
        UserError, match=r"data.train: no usable rows .* \(1 rows; skipped: 1 nothing left to train"
    ):
        data.load_datasets(section, llama_tokenizer)


def test_format_detection_for_eval_without_recipe(tiny, llama_tokenizer):
    evaluation = data.load_eval(str(tiny / "data" / "pc_eval.jsonl"), None, llama_tokenizer)
    assert len(evaluation) == 64
    assert evaluation[0]["labels"][0] == -100  # prompt masked: detected as prompt_completion


def test_a_folder_of_files_and_a_file_that_does_not_parse(tmp_path, llama_tokenizer):
    folder = tmp_path / "folder"
    folder.mkdir()
    write_rows(folder / "a.jsonl", [{"text": "the river is blue."}] * 3)
    write_rows(folder / "b.jsonl", [{"text": "the city is red."}] * 2)
    train, _, _ = data.load_datasets(DataSection(train=str(folder)), llama_tokenizer)
    assert len(train) == 5
    corrupt = tmp_path / "corrupt.jsonl"
    corrupt.write_text('{"text": "fine"}\n{"text": "broken\n')
    with pytest.raises(UserError) as info:
        data.load_datasets(DataSection(train=str(corrupt)), llama_tokenizer)
    assert info.value.headline.startswith(f"data.train: cannot load '{corrupt}': ")
