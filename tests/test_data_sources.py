"""Data sources that say what they read, chat templates that refuse a row, and a preview that
shows every language and means something without colours."""

from __future__ import annotations

import copy
import io
import json
import random
import re
from pathlib import Path

import pytest
import yaml
from helpers import run_cli, write_recipe
from rich.console import Console

from lora_tune import data, preview
from lora_tune import recipe as recipes
from lora_tune.errors import UserError
from lora_tune.models import load_tokenizer
from lora_tune.recipe import DataSection, ModelSection

# Roles must alternate, as in the templates of Llama 2 and Mistral.
STRICT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] not in ['user', 'assistant'] %}{{ raise_exception('Unknown role: ' + m['role']) }}{% endif %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
CHINESE = "河流是蓝色的 🌊🙂"


@pytest.fixture(scope="module")
def tokenizer(tiny):
    return load_tokenizer(ModelSection(id=str(tiny / "tiny-llama")))


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return path


def texts(n: int, word: str = "river") -> list[dict]:
    return [{"text": f"the {word} is blue number {i}."} for i in range(n)]


def load_error(spec, tokenizer, **section) -> UserError:
    with pytest.raises(UserError) as info:
        data.load_datasets(
            DataSection(train=spec if isinstance(spec, list) else str(spec), **section), tokenizer
        )
    return info.value


# --- folders ------------------------------------------------------------------------------------


def test_a_folder_of_several_file_types_is_read_whole(tmp_path, tokenizer):
    from datasets import Dataset

    folder = tmp_path / "mixed"
    write_rows(folder / "a.jsonl", texts(50))
    Dataset.from_list(texts(700, "city")).to_csv(str(folder / "b.csv"))
    Dataset.from_list(texts(100, "ocean")).to_parquet(str(folder / "c.parquet"))
    (folder / "d.txt").write_text("".join(f"the forest sings {i}.\n" for i in range(20)))
    (folder / "README.md").write_text("# notes, not data\n")
    train, _, stats = data.load_datasets(DataSection(train=str(folder)), tokenizer)
    assert (stats["train"].rows, len(train)) == (870, 870)
    words = {
        tokenizer.decode(ids, skip_special_tokens=True).split()[1] for ids in train["input_ids"]
    }
    assert words == {"river", "city", "ocean", "forest"}


def test_a_folder_follows_the_split_file_names(tmp_path, tokenizer):
    folder = tmp_path / "splits"
    write_rows(folder / "train.jsonl", texts(3))
    write_rows(folder / "test.jsonl", texts(2))
    train, evaluation, _ = data.load_datasets(
        DataSection(train=str(folder), eval=str(folder), eval_split="test"), tokenizer
    )
    assert (len(train), len(evaluation)) == (3, 2)
    error = load_error(folder, tokenizer, split="validation")
    assert error.render() == (
        f"data.train: the folder {folder} has no 'validation' split; its file names make "
        "the splits train, test\n  - set data.split (or the source's split) to one of them"
    )


@pytest.mark.parametrize("case", ["other columns", "an extra column", "another type"])
def test_files_of_a_folder_with_different_columns_are_named(case, tmp_path, tokenizer):
    folder = tmp_path / "d"
    if case == "other columns":
        write_rows(folder / "a.jsonl", texts(3))
        write_rows(folder / "b.jsonl", [{"prompt": "what colour?", "completion": "blue"}])
        columns = ["a.jsonl: columns text", "b.jsonl: columns prompt, completion"]
    elif case == "an extra column":  # datasets would fill the gap with None and skip those rows
        write_rows(
            folder / "a.jsonl", [{"prompt": "what colour?", "completion": "blue", "text": "x"}]
        )
        write_rows(folder / "b.jsonl", [{"prompt": "what colour?"}] * 4)
        columns = ["a.jsonl: columns prompt, completion, text", "b.jsonl: columns prompt"]
    else:
        write_rows(folder / "a.jsonl", texts(3))
        (folder / "b.csv").write_text("text,source\nthe river is blue.,web\n")
        columns = ["a.jsonl: columns text", "b.csv: columns text, source"]
    error = load_error(folder, tokenizer)
    assert error.headline == f"data.train: the files of {folder} have different columns"
    assert error.problems == [f"{folder}/{line}" for line in columns] + [
        (
            "give every file the same columns, or list the files as separate sources of data.train "
            "(each is formatted by its own columns)"
        )
    ]


def test_a_folder_with_files_it_cannot_read_names_them(tmp_path, tokenizer):
    folder = tmp_path / "d"
    write_rows(folder / "a.jsonl", texts(3))
    (folder / "b.tsv").write_text("text\tsource\nx\ty\n")
    (folder / "notes.md").write_text("how the data was made\n")
    error = load_error(folder, tokenizer)
    assert error.headline == (
        f"data.train: the folder {folder} holds files of types lora-tune cannot read "
        f"(.md, .tsv): {folder}/b.tsv, {folder}/notes.md"
    )
    assert error.problems[0].startswith(
        "move them out of the folder, or list the files to use in data.train"
    )


def test_sources_of_one_format_with_other_columns_name_the_file_and_its_columns(
    tmp_path, tokenizer
):
    first = write_rows(tmp_path / "a.jsonl", [{"prompt": "what colour?", "completion": "blue"}])
    second = write_rows(tmp_path / "b.jsonl", [{"question": "what colour?", "answer": "blue"}])
    error = load_error([str(first), str(second)], tokenizer, format="prompt_completion")
    assert error.headline == (
        f"data.prompt_field: column 'prompt' not found in data.train ({second}); "
        "its columns: question, answer"
    )


# --- files that do not parse ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, content, expected",
    [
        (
            "rows.jsonl",
            '{"text": "a"}\n{"text": "b"}\n\n{"text": "c\n{"text": "d"}\n',
            "rows.jsonl:4: not valid JSON, column 10: Unterminated string starting at",
        ),
        (
            "rows.jsonl",
            '{"text": "a"}\n["b"]\n',
            'rows.jsonl:2: expected a JSON object (one row), got list ["b"]',
        ),
        (
            "rows.json",
            '[\n  {"text": "a"},\n  {"text" "b"}\n]\n',
            "rows.json:3: not valid JSON, column 11: Expecting ':' delimiter",
        ),
        ("rows.json", "[]\n", "rows.json: the file holds no rows: []"),
        (
            "rows.csv",
            "text,source\nthe river,web\nthe city, red,web\n",
            "rows.csv:3: 3 fields, but the header has 2",
        ),
        ("rows.jsonl", "", "rows.jsonl: the file is empty"),
        ("rows.csv", " \n\n  \n", "rows.csv: the file is empty"),
        ("rows.txt", "", "rows.txt: the file is empty"),
        ("rows.parquet", "", "rows.parquet: the file is empty"),
    ],
)
def test_a_file_that_does_not_parse_is_named_with_its_line(
    name, content, expected, tmp_path, tokenizer
):
    path = tmp_path / name
    path.write_text(content)
    error = load_error(path, tokenizer)
    assert error.headline == f"data.train: cannot load '{path}': {tmp_path}/{expected}"
    assert len(error.problems) == 1 and error.problems[0].startswith(("fix ", "add rows"))


def test_a_bad_file_in_a_folder_is_named(tmp_path, tokenizer):
    folder = tmp_path / "d"
    write_rows(folder / "a.jsonl", texts(3))
    (folder / "b.jsonl").write_text('{"text": "fine"}\n{"text": "broken"\n')
    assert load_error(folder, tokenizer).headline == (
        f"data.train: cannot load '{folder}': {folder}/b.jsonl:2: "
        "not valid JSON, column 18: Expecting ',' delimiter"
    )
    (folder / "b.jsonl").write_text("")
    (folder / "c.csv").write_text("")
    assert load_error(folder, tokenizer).headline == (
        f"data.train: cannot load '{folder}': {folder}/b.jsonl: the file is empty"
    )


# --- chat templates that refuse a row --------------------------------------------------------------


@pytest.fixture()
def strict_tokenizer(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = STRICT_TEMPLATE
    return tok


def chat(*roles: str) -> dict:
    return {"messages": [{"role": role, "content": f"{role} says hi"} for role in roles]}


@pytest.mark.parametrize(
    "roles, message",
    [
        (
            ("user", "user", "assistant"),
            "Conversation roles must alternate user/assistant/user/assistant/...",
        ),
        (("user", "assistant", "tool", "assistant"), "Unknown role: tool"),
    ],
)
@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_a_template_that_refuses_a_row_names_the_row(
    roles, message, train_on_prompt, tmp_path, strict_tokenizer
):
    path = write_rows(tmp_path / "chats.jsonl", [chat("user", "assistant"), chat(*roles)])
    error = load_error(path, strict_tokenizer, train_on_prompt=train_on_prompt)
    assert error.headline == (
        f"data.train ({path}), row 1: the chat template refused this conversation "
        f"(roles: {', '.join(roles)}): {message}"
    )
    assert error.problems == [
        (
            "fix the row as the template's message says, or set data.chat_template to a "
            "template that accepts such conversations"
        )
    ]


def test_a_template_that_is_not_jinja_is_named(tmp_path, tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}"
    path = write_rows(tmp_path / "chats.jsonl", [chat("user", "assistant")])
    error = load_error(path, tok)
    assert error.headline.startswith(
        "data.chat_template: the chat template is not valid Jinja (its line 1): "
    )
    assert "endfor" in error.headline


# --- length statistics --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "lengths, median, p95",
    [
        ([7], 7, 7),
        ([1, 100], 50.5, 95.05),
        ([1, 2, 100], 2, 90.2),
        ([3, 1, 2, 2], 2, 2.85),
    ],
)
def test_p95_is_never_below_the_median(lengths, median, p95):
    summary = data.DataStats(lengths=lengths).summary()["length"]
    assert (summary["median"], summary["p95"]) == (median, p95)
    rng = random.Random(0)
    for _ in range(300):
        sample = [rng.randint(1, 512) for _ in range(rng.randint(1, 9))]
        length = data.DataStats(lengths=sample).summary()["length"]
        assert length["min"] <= length["median"] <= length["p95"] <= length["max"], sample


# --- the preview ----------------------------------------------------------------------------------


def test_preview_decodes_whole_characters(tokenizer):
    prompt = tokenizer(f"the river {CHINESE[:2]}", add_special_tokens=True)["input_ids"]
    ids = tokenizer(f"the river {CHINESE} is blue.")["input_ids"]
    assert (
        tokenizer.decode(ids[len(prompt) - 1 : len(prompt) + 1]).count("\ufffd") >= 1
    )  # a character split in two
    labels = [-100] * (len(prompt) - 1) + ids[len(prompt) - 1 :]  # the mask ends inside 流
    pieces = preview.pieces(tokenizer, ids, labels)
    assert "".join(text for text, _ in pieces) == f"<s>the river {CHINESE} is blue."
    assert not any("\ufffd" in text for text, _ in pieces)
    assert ("河", False) in pieces and (
        "流",
        True,
    ) in pieces  # a partly trained character counts as trained
    plain = preview.render_sample(tokenizer, ids, labels, mark=True).plain
    assert plain == "<s>the river 河[[流是蓝色的 🌊🙂 is blue.]]"
    styled = preview.render_sample(tokenizer, ids, labels)
    assert styled.plain == f"<s>the river {CHINESE} is blue."
    assert {styled.plain[s.start : s.end]: s.style for s in styled.spans}["🌊"] == preview.TRAINED


@pytest.fixture()
def chinese_recipe(tiny, tmp_path):
    rows = [
        {"prompt": f"问题 {i}: what colour is the river?", "completion": f" {CHINESE} blue."}
        for i in range(5)
    ]
    path = write_rows(tmp_path / "zh.jsonl", rows)
    return write_recipe(
        tmp_path / "r.yaml",
        tiny,
        tmp_path / "run",
        data={"train": str(path), "eval": None, "max_length": 128},
    )


def test_data_command_in_a_pipe_marks_trained_text(chinese_recipe, tmp_path, capsys):
    assert run_cli("data", chinese_recipe, "-n", "1") == 0
    out = capsys.readouterr().out
    assert "Legend: [[trained]] text is in the loss; the rest is masked (not in the loss)" in out
    assert f"<s>问题 0: what colour is the river?[[ {CHINESE} blue.</s>]]" in out
    assert "\ufffd" not in out
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "options, marked",
    [
        ({"force_terminal": True, "color_system": "truecolor"}, False),
        ({"force_terminal": True, "no_color": True}, True),
    ],
)
def test_data_command_on_a_terminal_marks_only_without_colours(
    options, marked, chinese_recipe, monkeypatch
):
    screen = io.StringIO()
    monkeypatch.setattr(preview, "console", Console(file=screen, width=200, **options))
    preview.run(recipes.load(chinese_recipe), n=1)
    shown = re.sub(r"\x1b\[[0-9;]*m", "", screen.getvalue())  # the terminal's colour codes
    assert (f"[[ {CHINESE} blue.</s>]]" in shown) is marked
    assert f"river? {CHINESE} blue.</s>" in shown or marked


# --- bad inputs through the command line: exit code 2, the file and line, a fix, nothing written ---


def _file(name: str, content: str):
    def make(case: Path) -> str:
        (case / name).write_text(content)
        return str(case / name)

    return make


def _folder(**files: str):
    def make(case: Path) -> str:
        folder = case / "folder"
        folder.mkdir()
        for name, content in files.items():
            (folder / name.replace("_", ".")).write_text(content)
        return str(folder)

    return make


CHATS = "".join(
    json.dumps(chat(*roles)) + "\n" for roles in [("user", "assistant"), ("assistant", "user")]
)
BAD_DATA = {
    "malformed json line": (
        _file("d.jsonl", '{"text": "a"}\n{"text": "b\n'),
        {},
        "d.jsonl:2: not valid JSON, column 10: Unterminated string starting at",
    ),
    "csv with an extra field": (
        _file("d.csv", "text\nthe river\nthe city, red\n"),
        {},
        "d.csv:3: 2 fields, but the header has 1",
    ),
    "empty file": (_file("d.jsonl", ""), {}, "d.jsonl: the file is empty"),
    "whitespace file": (_file("d.jsonl", "\n  \n"), {}, "d.jsonl: the file is empty"),
    "empty file in a folder": (
        _folder(a_jsonl='{"text": "a"}\n', b_jsonl=""),
        {},
        "folder/b.jsonl: the file is empty",
    ),
    "folder columns differ": (
        _folder(a_jsonl='{"text": "a"}\n', b_csv="quote\nb\n"),
        {},
        "folder/b.csv: columns quote give every file the same columns",
    ),
    "folder with unreadable files": (
        _folder(a_jsonl='{"text": "a"}\n', b_tsv="text\nb\n"),
        {},
        "holds files of types lora-tune cannot read (.tsv): ",
    ),
    "folder without the split": (
        _folder(train_jsonl='{"text": "a"}\n'),
        {"split": "validation"},
        "has no 'validation' split; its file names make the splits train",
    ),
    "template refuses a row": (
        _file("chats.jsonl", CHATS),
        {"chat_template": STRICT_TEMPLATE},
        (
            "chats.jsonl), row 1: the chat template refused this conversation (roles: "
            "assistant, user): Conversation roles must alternate user/assistant/user/assistant/..."
        ),
    ),
    "template is not jinja": (
        _file("chats.jsonl", CHATS),
        {"chat_template": "{% if x %}"},
        "data.chat_template: the chat template is not valid Jinja",
    ),
}


def files_under(path: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in path.rglob("*")}


@pytest.mark.parametrize("command", ["train", "data"])
@pytest.mark.parametrize("name", list(BAD_DATA))
def test_bad_data(name, command, tiny, tmp_path, capsys):
    make, section, expected = BAD_DATA[name]
    case = tmp_path / "case"
    case.mkdir()
    path = write_recipe(
        case / "recipe.yaml",
        tiny,
        case / "run",
        data={"train": make(case), "eval": None, **section},
    )
    before = files_under(case)
    assert run_cli(command, path) == 2
    err = capsys.readouterr().err
    flat = err.replace("\n  - ", " ").replace("\n", " ")
    assert err.startswith("error: ") and expected in flat, err
    assert "Traceback" not in err
    assert "\n  - " in err  # a fix follows the problem
    assert files_under(case) == before  # nothing written
    assert yaml.safe_load(path.read_text())["data"]["train"]  # the recipe is untouched
