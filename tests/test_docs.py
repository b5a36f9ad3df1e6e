"""The generated reference pages are current: regenerating them changes nothing."""

from __future__ import annotations

from twn_cli.reference import ROOT, cli_reference, recipes_reference


def test_the_command_reference_is_current():
    assert (ROOT / "docs" / "cli.md").read_text() == cli_reference(), "run: python -m twn_cli.reference"


def test_the_recipe_reference_is_current():
    assert (ROOT / "docs" / "recipes.md").read_text() == recipes_reference(), "run: python -m twn_cli.reference"
