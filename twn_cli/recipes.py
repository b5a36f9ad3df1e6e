"""Recipes: YAML files of hyper-parameters for one backbone and stage, overridable from the command line."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import TypeVar

from twn_cli.errors import TWNError

Settings = TypeVar("Settings")


def load_recipe(path: str | Path | None, settings_class: type[Settings], **overrides) -> Settings:
    """`settings_class` filled from the recipe at `path` (if any), then from the non-None `overrides`."""
    import yaml

    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise TWNError(f"recipe '{path}' does not exist")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise TWNError(f"recipe '{path}' is not valid YAML ({str(error).splitlines()[0]})") from None
        if not isinstance(values, dict):
            raise TWNError(f"recipe '{path}' must be a mapping of setting: value")
    values.update({key: value for key, value in overrides.items() if value is not None})
    known = {item.name for item in fields(settings_class)}
    unknown = sorted(set(values) - known)
    if unknown:
        source = f"recipe '{path}'" if path is not None else "settings"
        raise TWNError(f"{source}: unknown settings {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    return settings_class(**values)


def parse_overrides(items: list[str], **options) -> dict:
    """`KEY=VALUE` strings from the command line (values read as YAML: numbers, lists, booleans), then the
    command's own options that were given (not None), which win over a `--set` of the same key."""
    import yaml

    overrides = {}
    for item in items:
        key, separator, value = item.partition("=")
        if not separator:
            raise TWNError(f"--set takes KEY=VALUE, not '{item}'")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides | {key: value for key, value in options.items() if value is not None}
