"""Preference data: formats detected for the trainer, TRL's rows, the tokens TRL's DPOTrainer and
KTOTrainer make of them, skips and truncation counted, errors, evaluation pairs and the preview."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
from helpers import run_cli, write_recipe

from lora_tune import data, pairs
from lora_tune.errors import UserError
from lora_tune.methods import METHODS
from lora_tune.models import load_tokenizer
from lora_tune.recipe import DataSection, ModelSection
from lora_tune.tiny import CHAT_TEMPLATE, write_jsonl

DPO, KTO = METHODS["dpo"], METHODS["kto"]
RIVER = {
    "prompt": "what colour is the river?",
    "chosen": " the river is blue.",
    "rejected": " the river is red.",
}


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


CHAT_RIVER = {
    "prompt": [user("what colour is the river?")],
    "chosen": [assistant("the river is blue.")],
    "rejected": [assistant("the river is red.")],
}


@pytest.fixture(scope="module")
def tok(tiny):
    return load_tokenizer(ModelSection(id=str(tiny / "tiny-llama")))


@pytest.fixture()
def chat_tok(tok):
    chat = copy.deepcopy(tok)
    chat.chat_template = CHAT_TEMPLATE
    return chat


def trl_dpo_rows(tokenizer, rows, max_length):
    """The rows as TRL's DPOTrainer prepares them (its own _prepare_dataset)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(
        output_dir="unused", max_length=max_length, report_to=[], bf16=False, use_cpu=True
    )
    trainer = SimpleNamespace(_tokenizer=tokenizer)
    return DPOTrainer._prepare_dataset(trainer, Dataset.from_list(rows), tokenizer, args, "train")


def load(path, tokenizer, method=DPO, **settings):
    return pairs.load_datasets(DataSection(train=str(path), **settings), tokenizer, method)


# --- detection -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "columns, expected",
    [
        (["prompt", "completion"], "prompt_completion"),
        (["prompt", "completion", "label"], "prompt_completion"),
        (["messages", "prompt", "chosen", "rejected"], "messages"),  # UltraFeedback's columns
        (["prompt", "chosen", "rejected", "text"], "text"),
    ],
)
def test_sft_detection_never_picks_preference_data(columns, expected):
    assert data.detect_format(columns, DataSection(train="x"), "data.train", "x") == expected


def test_sft_refuses_pairs_naming_only_its_formats():
    with pytest.raises(UserError) as info:
        data.detect_format(
            ["prompt", "chosen", "rejected"], DataSection(train="p.jsonl"), "data.train", "p.jsonl"
        )
    assert info.value.headline == (
        "data.format: cannot tell the format of data.train (p.jsonl) from its columns: "
        "prompt, chosen, rejected"
    )
    sft = ", ".join(METHODS["sft"].formats)  # the table's sft formats, a new one included
    assert sft.startswith("text, prompt_completion, messages, alpaca")
    assert info.value.problems == [
        f"set data.format ({sft}) and the field names "
        "(data.text_field, data.prompt_field, data.completion_field, data.messages_field)"
    ]


def test_sft_tokenization_refuses_a_preference_format(tiny, tok):
    section = DataSection(train=str(tiny / "data" / "pref_train.jsonl"), format="preference")
    with pytest.raises(UserError) as info:
        data.load_datasets(section, tok)
    assert info.value.headline == (
        "data.format: preference data trains with trainer: dpo or kto or orpo or simpo; "
        f"supervised training reads {', '.join(METHODS['sft'].formats)} data"
    )
    assert info.value.problems == ["set trainer: dpo, or a supervised data.format"]


@pytest.mark.parametrize(
    "method, columns, settings, expected",
    [
        (DPO, ["prompt", "chosen", "rejected", "messages", "text"], {}, "preference"),
        (DPO, ["chosen", "rejected"], {}, "preference"),  # the prompt is their shared start
        (KTO, ["prompt", "completion", "label"], {}, "unpaired"),
        (KTO, ["prompt", "chosen", "rejected"], {}, "preference"),
        (KTO, ["q", "chosen", "rejected"], {"prompt_field": "q"}, "preference"),
        (KTO, ["q", "completion", "label"], {"prompt_field": "q"}, "unpaired"),
        (KTO, ["q", "good", "bad"], {"chosen_field": "good"}, "preference"),
        (DPO, ["q", "good", "bad"], {"format": "preference"}, "preference"),
    ],
)
def test_preference_trainers_detect_their_formats(method, columns, settings, expected):
    section = DataSection(train="x", **settings)
    assert pairs.detect_format(columns, section, method, "data.train", "x") == expected


def test_a_dpo_recipe_on_prompt_completion_data_is_told_what_it_needs(tiny, tok):
    path = tiny / "data" / "pc_train.jsonl"
    with pytest.raises(UserError) as info:
        load(path, tok)
    assert info.value.headline == (
        "data.format: trainer dpo needs prompt/chosen/rejected columns (preference data); "
        f"data.train ({path}) has columns: prompt, completion"
    )
    assert info.value.problems == [
        "rename the columns, or set data.prompt_field, data.chosen_field, data.rejected_field "
        "to the columns that hold them"
    ]
    with pytest.raises(UserError) as info:
        load(path, tok, KTO, label_field="good")
    assert info.value.headline == (
        "data.label_field: column 'good' not found in data.train "
        f"({path}); its columns: prompt, completion"
    )
    with pytest.raises(UserError) as info:
        load(tiny / "data" / "text_train.jsonl", tok, KTO)
    assert info.value.headline.startswith(
        "data.format: trainer kto needs prompt/chosen/rejected columns (preference data) or "
        "prompt/completion/label columns (unpaired data); data.train"
    )


def test_is_paired_tells_pairs_from_sft_data():
    assert pairs.is_paired(["prompt", "chosen", "rejected"], None)
    assert pairs.is_paired(["chosen", "rejected", "messages"], None)
    assert not pairs.is_paired(["prompt", "completion"], None)
    assert not pairs.is_paired(["prompt", "completion", "label"], None)
    # The recipe's field names and format say it.
    assert pairs.is_paired(
        ["q", "good", "bad"], DataSection(train="x", chosen_field="good", rejected_field="bad")
    )
    assert not pairs.is_paired(
        ["q", "chosen", "rejected"], DataSection(train="x", prompt_field="q2")
    )
    assert not pairs.is_paired(
        ["prompt", "chosen", "rejected"], DataSection(train="x", format="text")
    )


# --- rows, tokens, skips ---------------------------------------------------------------------


def test_tokenize_pair_is_what_trls_dpo_trainer_makes(tok, chat_tok):
    text_rows = [RIVER, {"prompt": "", "chosen": "yes</s>", "rejected": "no"}]
    prepared = trl_dpo_rows(tok, text_rows, 64)
    for row, trl_row in zip(text_rows, prepared, strict=True):
        assert pairs.tokenize_pair(tok, row) == (
            trl_row["prompt_ids"],
            trl_row["chosen_ids"],
            trl_row["rejected_ids"],
        )
    prompt_ids, chosen_ids, _ = pairs.tokenize_pair(tok, RIVER)
    assert tok.decode(prompt_ids) == "<s>what colour is the river?"
    assert tok.decode(chosen_ids) == " the river is blue.</s>"

    chat_rows = [
        CHAT_RIVER,
        {**CHAT_RIVER, "prompt": [user("hi"), assistant("hello"), user("and?")]},
    ]
    prepared = trl_dpo_rows(chat_tok, chat_rows, 64)
    for row, trl_row in zip(chat_rows, prepared, strict=True):
        assert pairs.tokenize_pair(chat_tok, row) == (
            trl_row["prompt_ids"],
            trl_row["chosen_ids"],
            trl_row["rejected_ids"],
        )
    prompt_ids, chosen_ids, _ = pairs.tokenize_pair(chat_tok, CHAT_RIVER)
    # The space after "assistant:" joins the answer's first token: the answer starts at it.
    assert chat_tok.decode(prompt_ids) == "user: what colour is the river?</s>\nassistant:"
    assert chat_tok.decode(chosen_ids) == " the river is blue.</s>\n"


def test_rows_are_trls_with_skips_and_truncation_counted(tmp_path, tok):
    long_prompt = {**RIVER, "prompt": "what colour is the river? " * 8}
    long_answer = {
        **RIVER,
        "chosen": " the river is blue and it sings every night, every morning and every evening.",
    }
    rows = [
        RIVER,
        {**RIVER, "chosen": ""},  # empty
        {**RIVER, "rejected": None},  # empty
        {**RIVER, "rejected": RIVER["chosen"]},  # the same answer twice
        long_prompt,  # the prompt alone fills max_length
        long_answer,  # prompt + chosen longer than max_length: truncated
        {**RIVER, "prompt": "what colour is the mountain?"},
    ]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    train, evaluation, stats = load(path, tok, max_length=20)
    assert evaluation is None and train.column_names == ["prompt", "chosen", "rejected"]
    assert train.to_list() == [RIVER, long_answer, rows[6]]  # TRL adds the EOS itself
    s = stats["train"]
    assert (s.rows, s.samples, s.truncated) == (7, 3, 1)
    assert s.skipped == {"empty": 2, "chosen equals rejected": 1, "prompt fills max_length": 1}
    # TRL drops the same rows; lengths and trained tokens are those of its token lists, cut at 20.
    trl = trl_dpo_rows(
        tok, [r for r in rows if r["chosen"] and r["rejected"] and r["chosen"] != r["rejected"]], 20
    )
    assert trl["prompt"] == train["prompt"]
    sizes = [(len(r["prompt_ids"]), len(r["chosen_ids"]), len(r["rejected_ids"])) for r in trl]
    assert sizes[0] == (7, 6, 6) and sizes[1][0] + sizes[1][1] > 20
    assert s.lengths == [min(p + max(c, r), 20) for p, c, r in sizes] == [13, 20, 17]
    assert s.trained_tokens == sum(min(c, 20 - p) + min(r, 20 - p) for p, c, r in sizes) == 43


def test_nothing_left_is_an_error(tmp_path, tok):
    path = write_jsonl(
        tmp_path / "p.jsonl", [{**RIVER, "chosen": " "}, {**RIVER, "rejected": RIVER["chosen"]}]
    )
    with pytest.raises(UserError) as info:
        load(path, tok)
    assert info.value.headline == (
        f"data.train: no usable rows in {path} (2 rows; skipped: 1 empty, 1 chosen equals rejected)"
    )


def test_field_names_from_the_recipe(tmp_path, tok):
    rows = [
        {"question": r["prompt"], "better": r["chosen"], "worse": r["rejected"]}
        for r in [RIVER] * 2
    ]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    train, _, stats = load(
        path, tok, prompt_field="question", chosen_field="better", rejected_field="worse"
    )
    assert train.to_list() == [RIVER, RIVER] and stats["train"].samples == 2
    with pytest.raises(UserError) as info:
        load(path, tok, chosen_field="better")  # prompt and rejected keep their default names
    assert info.value.headline == (
        f"data.rejected_field: column 'rejected' not found in data.train ({path}); "
        "its columns: question, better, worse"
    )
    assert info.value.problems == ["set data.rejected_field to one of its columns"]


def test_chat_pairs_need_a_template_and_keep_trls_form(tiny, tok, chat_tok):
    path = tiny / "data" / "chat_pref_train.jsonl"
    with pytest.raises(UserError) as info:
        load(path, tok)
    assert info.value.headline == (
        f"data.chat_template: data.train ({path}) holds chat messages and the tokenizer has no "
        "chat template"
    )
    train, _, stats = load(path, chat_tok)
    assert stats["train"].samples == 400 and stats["train"].skipped == {}
    assert train[0]["prompt"] == [user(train[0]["prompt"][0]["content"])]
    assert [turn["role"] for turn in train[0]["chosen"] + train[0]["rejected"]] == ["assistant"] * 2
    assert (
        data.prepare_tokenizer(tok, DataSection(train="x", chat_template=CHAT_TEMPLATE), "m") == []
    )
    assert load(path, tok)[0].to_list() == train.to_list()  # data.chat_template serves as well


def test_whole_conversations_give_the_shared_start_as_prompt(tmp_path, chat_tok):
    conversation = [user("hi"), assistant("hello"), user("what colour is the river?")]
    rows = [
        {  # UltraFeedback-binarized: a text prompt beside whole conversations
            "prompt": "what colour is the river?",
            "chosen": [*conversation, assistant("blue")],
            "rejected": [*conversation, assistant("red")],
            "messages": [*conversation, assistant("blue")],
        }
    ]
    train, _, _ = load(write_jsonl(tmp_path / "uf.jsonl", rows), chat_tok)
    assert train.to_list() == [
        {"prompt": conversation, "chosen": [assistant("blue")], "rejected": [assistant("red")]}
    ]
    # Text without a prompt column: the texts' shared start (HH-RLHF's form).
    hh = [{"chosen": "Human: sky? Assistant: blue", "rejected": "Human: sky? Assistant: green"}]
    train, _, _ = load(write_jsonl(tmp_path / "hh.jsonl", hh), chat_tok)
    assert train.to_list() == [
        {"prompt": "Human: sky? Assistant:", "chosen": " blue", "rejected": " green"}
    ]


def test_chat_pairs_without_a_prompt_turn_are_skipped(tmp_path, chat_tok):
    rows = [CHAT_RIVER, {**CHAT_RIVER, "prompt": []}, {**CHAT_RIVER, "prompt": None}]
    _, _, stats = load(write_jsonl(tmp_path / "p.jsonl", rows), chat_tok)
    assert stats["train"].skipped == {"no prompt turn": 2} and stats["train"].samples == 1


def test_bad_cells_are_errors_naming_row_and_field(tmp_path, chat_tok):
    cases = [
        (
            [RIVER, {**RIVER, "chosen": 5}],
            DPO,
            "row 1, field 'chosen': expected text or a list of chat messages, got int '5'",
        ),
        (
            [
                {"prompt": "q", "completion": " a", "label": True},
                {"prompt": "q", "completion": " b", "label": "yes"},
            ],
            KTO,
            "row 1, field 'label': expected true or false, got str 'yes'",
        ),
        (
            [{**CHAT_RIVER, "rejected": "the river is red."}],
            DPO,
            "row 0: field 'prompt' and 'chosen' holds chat messages but 'rejected' holds text; a row "
            "is all text or all chat messages",
        ),
        (
            [{**CHAT_RIVER, "prompt": "what colour is the river?"}],
            DPO,
            "row 0: field 'prompt' holds text, but 'chosen' and 'rejected' hold chat messages that "
            "share no prompt turns",
        ),
        (
            [RIVER, CHAT_RIVER],
            DPO,
            "row 1: chat messages, but row 0 holds text; a source holds text rows or chat rows, not both",
        ),
        (
            [{**CHAT_RIVER, "chosen": [{"role": "assistant"}]}],
            DPO,
            "row 0, field 'chosen': each chat turn needs a 'role' and a text 'content'; got "
            "\"{'role': 'assistant'}\"",
        ),
    ]
    for i, (rows, method, message) in enumerate(cases):
        path = write_jsonl(tmp_path / f"bad{i}.jsonl", rows)
        with pytest.raises(UserError) as info:
            load(path, chat_tok, method)
        assert info.value.headline == f"data.train ({path}), {message}"


def test_sources_of_one_split_are_joined(tmp_path, chat_tok):
    # Turns with other keys (a name) in one source: each turn is kept as written.
    named = {
        **CHAT_RIVER,
        "prompt": [{"content": "what colour is the river?", "role": "user", "name": "ann"}],
    }
    first = write_jsonl(tmp_path / "a.jsonl", [CHAT_RIVER])
    second = write_jsonl(tmp_path / "b.jsonl", [named, {**CHAT_RIVER, "chosen": []}])
    train, _, stats = pairs.load_datasets(
        DataSection(train=[str(first), str(second)]), chat_tok, DPO
    )
    assert list(train["prompt"]) == [CHAT_RIVER["prompt"], named["prompt"]]
    assert (stats["train"].rows, stats["train"].samples, stats["train"].skipped) == (
        3,
        2,
        {"empty": 1},
    )
    text = write_jsonl(tmp_path / "t.jsonl", [RIVER])
    with pytest.raises(UserError) as info:
        pairs.load_datasets(DataSection(train=[str(first), str(text)]), chat_tok, DPO)
    assert info.value.headline == (
        f"data.train: its sources mix text rows and chat rows ({first}: chat, {text}: text)"
    )


# --- kto -------------------------------------------------------------------------------------


def test_kto_takes_unpaired_rows_and_unpairs_pairs(tmp_path, tok):
    unpaired = [
        {"prompt": "what colour is the river?", "completion": " blue.", "label": True},
        {"prompt": "what colour is the river?", "completion": " red.", "label": False},
        {"prompt": "what colour is the river?", "completion": "", "label": False},
    ]
    train, _, stats = load(write_jsonl(tmp_path / "u.jsonl", unpaired), tok, KTO)
    assert train.to_list() == unpaired[:2]
    assert stats["train"].skipped == {"empty": 1}
    prompt_ids, completion_ids = pairs.tokenize_unpaired(tok, unpaired[0])
    assert (
        tok.decode(prompt_ids) + "|" + tok.decode(completion_ids)
        == "<s>what colour is the river?| blue.</s>"
    )

    mountain = {**RIVER, "prompt": "what colour is the mountain?"}
    train, _, stats = load(
        write_jsonl(tmp_path / "p.jsonl", [RIVER, mountain, {**RIVER, "chosen": ""}]), tok, KTO
    )
    assert train.column_names == ["prompt", "completion", "label"]
    assert [(r["prompt"], r["completion"], r["label"]) for r in train] == [
        (RIVER["prompt"], RIVER["chosen"], True),
        (mountain["prompt"], RIVER["chosen"], True),
        (RIVER["prompt"], RIVER["rejected"], False),
        (mountain["prompt"], RIVER["rejected"], False),
    ]
    assert (stats["train"].rows, stats["train"].samples, stats["train"].skipped) == (
        3,
        4,
        {"empty": 1},
    )


def test_kto_rows_and_tokens_are_what_trls_kto_trainer_makes(tmp_path, tok, chat_tok):
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    args = KTOConfig(output_dir="unused", max_length=64, report_to=[], bf16=False, use_cpu=True)
    mountain = {**RIVER, "prompt": "what colour is the mountain?"}
    chat_mountain = {**CHAT_RIVER, "prompt": [user("what colour is the mountain?")]}
    for tokenizer, rows in ((tok, [RIVER, mountain]), (chat_tok, [CHAT_RIVER, chat_mountain])):
        trainer = SimpleNamespace(_tokenizer=tokenizer, calculate_KL=False)
        # TRL unpairs and tokenizes the pairs itself; lora-tune's rows give the same tokens.
        prepared = KTOTrainer._prepare_dataset(
            trainer, Dataset.from_list(rows), tokenizer, args, "eval"
        )
        ours, _, _ = load(write_jsonl(tmp_path / "p.jsonl", rows), tokenizer, KTO)
        assert ours["label"] == prepared["label"] == [True, True, False, False]
        assert [pairs.tokenize_unpaired(tokenizer, row) for row in ours] == [
            (row["prompt_ids"], row["completion_ids"]) for row in prepared
        ]


# --- splits and evaluation -------------------------------------------------------------------


def test_eval_fraction_and_eval_sources(tiny, tok):
    from datasets import load_dataset

    path = tiny / "data" / "pref_train.jsonl"
    train, evaluation, stats = load(path, tok, eval_fraction=0.25)
    # The rows are held out as data.py holds out SFT rows: each source's rows, split once.
    held = load_dataset("json", data_files=str(path), split="train").train_test_split(
        test_size=0.25, seed=42
    )
    assert train.to_list() == held["train"].to_list()
    assert evaluation.to_list() == held["test"].to_list()
    assert (stats["train"].rows, stats["eval"].rows) == (300, 100)
    eval_path = tiny / "data" / "pref_eval.jsonl"
    train, evaluation, stats = load(path, tok, eval=str(eval_path))
    assert (len(train), len(evaluation), stats["eval"].rows) == (400, 64, 64)
    section = DataSection(train=[str(path), str(eval_path)])  # two sources make one split
    train, _, stats = pairs.load_datasets(section, tok, DPO)
    assert (len(train), stats["train"].rows) == (464, 464)


def test_load_eval_reads_pairs_with_or_without_a_recipe(tiny, tmp_path, tok):
    path = tiny / "data" / "pref_eval.jsonl"
    rows = pairs.load_eval(str(path), None, tok)
    assert rows.column_names == ["prompt", "chosen", "rejected"] and len(rows) == 64
    renamed = write_jsonl(
        tmp_path / "r.jsonl",
        [{"q": r["prompt"], "good": r["chosen"], "bad": r["rejected"]} for r in rows],
    )
    section = DataSection(
        train=str(path), prompt_field="q", chosen_field="good", rejected_field="bad"
    )
    assert pairs.load_eval(str(renamed), section, tok).to_list() == rows.to_list()
    own = DataSection(train=str(tiny / "data" / "pref_train.jsonl"), eval=str(path))
    assert pairs.load_eval(None, own, tok).to_list() == rows.to_list()
    with pytest.raises(UserError) as info:
        pairs.load_eval(str(tiny / "data" / "pc_eval.jsonl"), None, tok)
    assert info.value.headline.startswith(
        "data.format: preference evaluation needs prompt/chosen/rejected columns (preference data); --data"
    )


# --- lora-tune data --------------------------------------------------------------------------


def test_the_data_command_shows_a_pair(tiny, tmp_path, capsys):
    path = write_jsonl(tmp_path / "p.jsonl", [RIVER, {**RIVER, "chosen": ""}])
    recipe = write_recipe(
        tmp_path / "r.yaml",
        tiny,
        tmp_path / "run",
        trainer="dpo",
        data={"train": str(path), "eval": None, "max_length": 16},
    )
    assert run_cli("data", recipe, "-n", "1") == 0
    out = capsys.readouterr().out
    assert "sample 0 (prompt 7 tokens, chosen 6, rejected 6)" in out
    assert "prompt: <s>what colour is the river?\nchosen: [[ the river is blue.</s>]]\n" in out
    assert "rejected: [[ the river is red.</s>]]\n" in out
    assert "│ train │ 2    │ 1       │ empty: 1 │ 0" in out
    assert not (tmp_path / "run").exists()


def test_the_data_command_shows_kto_rows_with_their_label(tiny, tmp_path, capsys):
    rows = [
        {"prompt": "what colour is the river?", "completion": " red.", "label": False},
        {"prompt": "what colour is the river?", "completion": " blue.", "label": True},
    ]
    path = write_jsonl(tmp_path / "u.jsonl", rows)
    recipe = write_recipe(
        tmp_path / "r.yaml",
        tiny,
        tmp_path / "run",
        trainer="kto",
        data={"train": str(path), "eval": None},
    )
    assert run_cli("data", recipe, "-n", "2") == 0
    out = capsys.readouterr().out
    assert "sample 0, label false (prompt 7 tokens, completion 3)" in out
    assert "prompt: <s>what colour is the river?\ncompletion: [[ red.</s>]]\n" in out
    assert "sample 1, label true (prompt 7 tokens, completion 3)" in out
    assert "completion: [[ blue.</s>]]\n" in out
