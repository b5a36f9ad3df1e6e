"""Every recipe loads into the settings of its stage (torchtune's rule: each config is tested to load)."""

from __future__ import annotations

from pathlib import Path

import pytest

from twn_cli.recipes import load_recipe
from twn_cli.stages.train_embed import TrainEmbedConfig
from twn_cli.stages.train_gate import TrainGateConfig
from twn_cli.stages.train_rl import TrainRLConfig
from twn_cli.toyworld.backbone import ToyBackboneSpec
from twn_cli.toyworld.pretrain import PretrainSettings

RECIPES = Path(__file__).parents[1] / "recipes"
SETTINGS = {
    "toy-backbone.yaml": ToyBackboneSpec,
    "pretrain.yaml": PretrainSettings,
    "train-embed.yaml": TrainEmbedConfig,
    "train-gate.yaml": TrainGateConfig,
    "train-rl.yaml": TrainRLConfig,
}


@pytest.mark.parametrize("recipe", sorted(RECIPES.glob("*/*.yaml")), ids=lambda path: f"{path.parent.name}/{path.name}")
def test_recipe_loads_into_its_stage_settings(recipe):
    assert recipe.name in SETTINGS, f"{recipe} belongs to no known stage"
    load_recipe(recipe, SETTINGS[recipe.name])


def test_an_unknown_setting_is_a_clear_error(tmp_path):
    from twn_cli.errors import TWNError

    recipe = tmp_path / "bad.yaml"
    recipe.write_text("stepz: 3\n")
    with pytest.raises(TWNError, match="unknown settings stepz"):
        load_recipe(recipe, TrainEmbedConfig)
