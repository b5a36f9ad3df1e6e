"""Recipes: YAML files of hyper-parameters for one backbone and stage, overridable from the command line."""

from __future__ import annotations

import types
import typing
from dataclasses import fields
from pathlib import Path
from typing import TypeVar

from twn_cli.errors import TWNError

Settings = TypeVar("Settings")


def stage_settings() -> dict[str, type]:
    """The settings class that each recipe file (`recipes/<backbone>/<file>`) loads into."""
    from twn_cli.stages.train_embed import TrainEmbedConfig
    from twn_cli.stages.train_gate import TrainGateConfig
    from twn_cli.stages.train_rl import TrainRLConfig
    from twn_cli.toyworld.backbone import ToyBackboneSpec
    from twn_cli.toyworld.pretrain import PretrainSettings

    return {
        "toy-backbone.yaml": ToyBackboneSpec,
        "pretrain.yaml": PretrainSettings,
        "train-embed.yaml": TrainEmbedConfig,
        "train-gate.yaml": TrainGateConfig,
        "train-rl.yaml": TrainRLConfig,
    }


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
    hints = typing.get_type_hints(settings_class)
    for name, value in values.items():
        if not _fits(value, hints[name]):
            source = "command line" if overrides.get(name) is not None else f"recipe '{path}'"
            raise TWNError(f"{source}: {name} must be {_describe(hints[name])}, not {value!r}")
    return settings_class(**values)


def _fits(value, annotation) -> bool:
    """Whether a YAML value suits a setting's annotation (an int is a float; a bool is no number)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return any(_fits(value, member) for member in typing.get_args(annotation))
    origin = typing.get_origin(annotation) or annotation
    if annotation is type(None):
        return value is None
    if origin is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple))
    return isinstance(value, origin) if isinstance(origin, type) else True


def _describe(annotation) -> str:
    names = {bool: "true or false", int: "a whole number", float: "a number", str: "a string", list: "a list", tuple: "a list"}
    members = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    return " or ".join("empty (null)" if member is type(None) else names.get(typing.get_origin(member) or member, str(member)) for member in members)


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
