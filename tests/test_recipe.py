"""The recipe: every mistake reported at once, with its path and the fix; nothing written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import run_cli, write_recipe

from lora_tune import recipe as recipes
from lora_tune.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def test_help_answers_without_importing_torch():
    code = (
        "import sys; from lora_tune.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('heavy:', sorted(m for m in ('torch', 'transformers', 'peft', 'trl') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert "train" in out and "merge" in out and "eval" in out
    assert "heavy: []" in out


def test_every_problem_is_reported_at_once_with_paths_and_fixes(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    out = tmp_path / "run"
    bad.write_text(f"""
model:
  id: some/model
  dtyp: float32
lora:
  r: 0
  lora_alpa: 16
  lora_dropout: 1.5
data:
  train: data.jsonl
  formt: text
training:
  output_dir: {out}
  learnig_rate: 1e-4
  num_train_epochs: three
  max_length: 100
trainig: {{}}
""")
    assert run_cli("train", bad) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        f"error: {bad}: 9 problems in the recipe:",
        "  - trainig: unknown section. Did you mean 'training'? Valid sections: model, lora, data, training.",
        "  - model.dtyp: unknown key. Did you mean 'dtype'?",
        "  - data.formt: unknown key. Did you mean 'format'?",
        "  - lora.lora_alpa: unknown key. Did you mean 'lora_alpha'? lora accepts the fields of peft.LoraConfig.",
        "  - lora.r: the rank must be a positive integer, got 0. Typical values: 8, 16, 64.",
        "  - lora.lora_dropout: must be in [0, 1), got 1.5. Typical values: 0 to 0.1.",
        "  - training.max_length: not set here; set data.max_length instead.",
        "  - training.learnig_rate: unknown key. Did you mean 'learning_rate'? "
        "training accepts the fields of trl.SFTConfig.",
        "  - training.num_train_epochs: expected a number, got 'three'.",
    ]
    assert "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize(
    "override, expected",
    [
        (
            "model.dtype=float64",
            "model.dtype: Input should be 'auto', 'float32', 'bfloat16' or 'float16'; got 'float64'.",
        ),
        ("data.eval_fraction=1.5", "data.eval_fraction: Input should be less than 1; got 1.5."),
        (
            "data.max_length=0",
            "data.max_length: Input should be greater than or equal to 8; got 0.",
        ),
        (
            "lora.lora_alpha=-16",
            "lora.lora_alpha: must be positive, got -16. A common choice is 2 * r.",
        ),
        (
            "lora.target_modules=5",
            "lora.target_modules: expected ",
        ),  # the union's order varies by Python
        (
            "training.per_device_train_batch_size=big",
            "training.per_device_train_batch_size: expected an integer, got 'big'.",
        ),
        (
            "training.lr_scheduler_type=cosinee",
            "training.lr_scheduler_type: cosinee is not a valid SchedulerType",
        ),
        (
            "training.save_strategy=no",
            "training.save_strategy: expected SaveStrategy | str, got False. YAML reads a "
            'bare no/yes/off/on as false/true: quote it, e.g. "no".',
        ),
        ("training.bf16=true", None),
    ],
)
def test_single_mistakes(tmp_path, tiny, override, expected):
    path = write_recipe(tmp_path / "r.yaml", tiny, tmp_path / "run")
    if expected is None:  # a valid override: loads
        recipes.load(path, [override, "training.fp16=false"])
        return
    with pytest.raises(UserError) as info:
        recipes.load(path, [override])
    assert any(p.startswith(expected) for p in info.value.problems), info.value.render()


def test_eval_and_eval_fraction_conflict(tmp_path, tiny):
    path = write_recipe(tmp_path / "r.yaml", tiny, tmp_path / "run", data={"eval_fraction": 0.1})
    with pytest.raises(UserError) as info:
        recipes.load(path)
    assert info.value.problems == [
        "data: set either data.eval or data.eval_fraction, not both; got "
        + repr(yaml.safe_load(path.read_text())["data"])
        + "."
    ]


def test_yaml_syntax_error_names_line_and_column(tmp_path, capsys):
    path = tmp_path / "tabs.yaml"
    path.write_text("model:\n\tid: x\n")
    assert run_cli("train", path) == 2
    err = capsys.readouterr().err
    assert (
        f"error: {path}:2:1: the recipe is not valid YAML: found character '\\t' that cannot start any token"
        in err
    )
    assert "never tabs" in err


def test_missing_recipe_and_sections(tmp_path):
    with pytest.raises(UserError, match="Recipe file not found"):
        recipes.load(tmp_path / "nope.yaml")
    empty = tmp_path / "empty.yaml"
    empty.write_text("lora: {r: 4}\n")
    with pytest.raises(UserError) as info:
        recipes.load(empty)
    assert info.value.problems == [
        "model: required section missing. Add the model to tune, e.g. model: {id: facebook/opt-350m}.",
        "data: required section missing. Add the training data, e.g. data: {train: data/train.jsonl}.",
        "training: required section missing. Add where the run is written, e.g. training: {output_dir: runs/my-run}.",
    ]


def test_set_overrides_parse_yaml_values(tmp_path, tiny):
    path = write_recipe(tmp_path / "r.yaml", tiny, tmp_path / "run")
    loaded = recipes.load(
        path,
        [
            "training.learning_rate=1e-4",
            "lora.target_modules=[q_proj, v_proj]",
            "training.num_train_epochs=2",
            "data.train_on_prompt=true",
        ],
    )
    assert loaded.training["learning_rate"] == pytest.approx(1e-4)
    assert loaded.lora["target_modules"] == ["q_proj", "v_proj"]
    assert loaded.training["num_train_epochs"] == 2
    assert loaded.data.train_on_prompt is True
    with pytest.raises(UserError, match="expected KEY.PATH=VALUE"):
        recipes.load(path, ["training.learning_rate"])
    with pytest.raises(UserError, match="training.output_dir is not a section"):
        recipes.load(path, ["training.output_dir.x=1"])


def test_yaml_string_numbers_are_coerced(tmp_path, tiny):
    # YAML 1.1 reads 1e-4 (no dot) as a string; the recipe accepts it as the number it means.
    path = write_recipe(tmp_path / "r.yaml", tiny, tmp_path / "run")
    path.write_text(path.read_text().replace("learning_rate: 0.003", "learning_rate: 1e-4"))
    assert recipes.load(path).training["learning_rate"] == pytest.approx(1e-4)


def test_tokens_are_refused_so_they_are_never_saved(tmp_path, tiny):
    path = write_recipe(
        tmp_path / "r.yaml", tiny, tmp_path / "run", training={"hub_token": "hf_secret"}
    )
    with pytest.raises(UserError) as info:
        recipes.load(path)
    assert info.value.problems == [
        "training.hub_token: not set here; never put a token in a recipe, where it "
        "would be saved with the run; set the HF_TOKEN environment variable instead."
    ]


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_validate_and_say_how_to_run(path):
    first = path.read_text().splitlines()[0]
    assert first == f"# lora-tune train recipes/{path.name}"
    recipes.load(path)


def test_opt_350m_recipe_is_the_classic_example():
    loaded = recipes.load(ROOT / "recipes" / "opt-350m-english-quotes.yaml")
    assert loaded.model.id == "facebook/opt-350m"
    assert (loaded.data.train, loaded.data.text_field) == ("Abirate/english_quotes", "quote")
    assert loaded.lora == {
        "r": 16,
        "lora_alpha": 32,
        "target_modules": ["q_proj", "v_proj"],
        "lora_dropout": 0.05,
        "bias": "none",
        "task_type": "CAUSAL_LM",
    }
    assert loaded.training["learning_rate"] == 2e-4
    assert loaded.training["num_train_epochs"] == 3
    assert loaded.training["per_device_train_batch_size"] == 4


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_accelerate_configs_load(path):
    from accelerate.commands.config.config_args import load_config_from_file

    assert path.read_text().startswith("# ")
    config = load_config_from_file(str(path))
    assert config.num_processes >= 1
    assert config.mixed_precision == "no"  # precision is chosen by lora-tune or the recipe


def test_accelerate_config_check_rejects_unknown_keys(tmp_path):
    from accelerate.commands.config.config_args import load_config_from_file

    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "configs" / "ddp.yaml").read_text() + "num_proceses: 2\n")
    with pytest.raises(ValueError, match="num_proceses"):
        load_config_from_file(str(bad))


@pytest.mark.parametrize(
    "schema, section", [(recipes.ModelSection, "model"), (recipes.DataSection, "data")]
)
def test_readme_reference_matches_the_schema(schema, section):
    """The README's key tables repeat the schema's descriptions word for word, and miss none."""
    readme = (ROOT / "README.md").read_text()
    table = readme.split(f"### {section}\n", 1)[1].split("\n\n", 1)[0].strip()
    rows = {
        line.split("|")[1].strip(" `"): line.split("|")[3].strip()
        for line in table.splitlines()[2:]
    }
    assert rows == {name: field.description for name, field in schema.model_fields.items()}
