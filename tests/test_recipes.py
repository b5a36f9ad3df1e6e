"""Every recipe loads into the settings of its stage (torchtune's rule: each config is tested to load)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from twn_cli.cli import app
from twn_cli.recipes import load_recipe, parse_overrides, stage_settings
from twn_cli.stages.train_embed import TrainEmbedConfig
from twn_cli.stages.train_gate import TrainGateConfig
from twn_cli.stages.train_rl import TrainRLConfig

RECIPES = Path(__file__).parents[1] / "recipes"
SETTINGS = stage_settings()


STAGE_RECIPES = sorted(path for path in RECIPES.glob("*/*.yaml") if path.parent.name != "accelerate")


@pytest.mark.parametrize("recipe", STAGE_RECIPES, ids=lambda path: f"{path.parent.name}/{path.name}")
def test_recipe_loads_into_its_stage_settings(recipe):
    assert recipe.name in SETTINGS, f"{recipe} belongs to no known stage"
    load_recipe(recipe, SETTINGS[recipe.name])


@pytest.mark.parametrize("config", sorted(RECIPES.glob("accelerate/*.yaml")), ids=lambda path: path.name)
def test_accelerate_launch_config_loads_in_accelerate(config):
    from accelerate.commands.config.config_args import ClusterConfig

    assert ClusterConfig.from_yaml_file(config).distributed_type.value == "MULTI_GPU"


def test_an_unknown_setting_is_a_clear_error(tmp_path):
    from twn_cli.errors import TWNError

    recipe = tmp_path / "bad.yaml"
    recipe.write_text("stepz: 3\n")
    with pytest.raises(TWNError, match="unknown settings stepz"):
        load_recipe(recipe, TrainEmbedConfig)


@pytest.mark.parametrize(("setting", "message"), [
    ("best_tolerance: abc", "best_tolerance must be a number, not 'abc'"),
    ("epochs: 2.5", "epochs must be a whole number, not 2.5"),
    ("margin_weighting: 1", "margin_weighting must be true or false, not 1"),
    ("max_think_tokens: many", "max_think_tokens must be a whole number or empty \\(null\\), not 'many'"),
])
def test_a_setting_of_the_wrong_type_is_a_clear_error(tmp_path, setting, message):
    from twn_cli.errors import TWNError

    recipe = tmp_path / "bad.yaml"
    recipe.write_text(setting + "\n")
    with pytest.raises(TWNError, match=message):
        load_recipe(recipe, TrainGateConfig)
    assert load_recipe(None, TrainGateConfig, delta=1, max_think_tokens=None).delta == 1  # an int is a number


def test_set_and_a_named_option_of_the_same_setting_combine_with_the_option_winning():
    assert parse_overrides(["learning_rate=0.002", "steps=5"], learning_rate=None, steps=7) == {"learning_rate": 0.002, "steps": 7}


def test_train_embed_accepts_set_for_a_setting_that_also_has_an_option(tmp_path):
    result = CliRunner().invoke(
        app, ["train-embed", str(tmp_path / "missing"), "--backbone", str(tmp_path), "-o", str(tmp_path / "run"), "--set", "learning_rate=0.002"]
    )
    assert result.exit_code == 1 and "missing" in result.stderr and not isinstance(result.exception, TypeError)


@pytest.mark.parametrize("written", ["3e-4", "3E-4", "3.0e-4", "0.0003", "3e-04"])
def test_a_learning_rate_in_exponent_notation_is_a_number(tmp_path, written):
    """PyYAML alone reads 3e-4 as the string '3e-4'; recipes and --set read it as Python does."""
    recipe = tmp_path / "rl.yaml"
    recipe.write_text(f"learning_rate: {written}\n")
    assert load_recipe(recipe, TrainRLConfig).learning_rate == pytest.approx(3e-4)
    assert parse_overrides([f"learning_rate={written}"]) == {"learning_rate": pytest.approx(3e-4)}
    assert parse_overrides(["run_name=1e5x"]) == {"run_name": "1e5x"}
