"""Recipes: YAML files of hyper-parameters for one backbone and stage, overridable from the command line."""

from __future__ import annotations

import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, fields
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


def read_yaml(text: str):
    """YAML as recipes mean it: `3e-4` and `1E5` are numbers, as in Python and YAML 1.2 (PyYAML's YAML 1.1
    reads a number without a dot or a signed exponent, such as a learning rate of 3e-4, as a string)."""
    import yaml

    class RecipeLoader(yaml.SafeLoader):
        pass

    RecipeLoader.yaml_implicit_resolvers = {first: list(resolvers) for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:float", _PLAIN_EXPONENT, list("-+0123456789."))
    return yaml.load(text, Loader=RecipeLoader)


# A number with an exponent that YAML 1.1 misses: no dot in the mantissa or no sign in the exponent.
_PLAIN_EXPONENT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")


def load_recipe(path: str | Path | None, settings_class: type[Settings], **overrides) -> Settings:
    """`settings_class` filled from the recipe at `path` (if any), then from the non-None `overrides`."""
    import yaml

    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise TWNError(f"recipe '{path}' does not exist")
        try:
            values = read_yaml(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise TWNError(f"recipe '{path}' is not valid YAML ({str(error).splitlines()[0]})") from None
        if not isinstance(values, dict):
            raise TWNError(f"recipe '{path}' must be a mapping of setting: value")
    values.update({key: value for key, value in overrides.items() if value is not None})
    check_types(
        values, settings_class, f"recipe '{path}'" if path is not None else "settings",
        source_of=lambda name: "command line" if overrides.get(name) is not None else f"recipe '{path}'",
    )
    return settings_class(**values)


def check_types(values: dict, settings_class: type, source: str, source_of: Callable[[str], str] | None = None) -> None:
    """Refuse unknown names, values of the wrong type (a string for a number, say) and NaN or infinite numbers,
    before `settings_class(**values)` builds (and a command allocates) anything from them. `source` names
    where the values came from, `source_of(name)` where one of them did (default: `source`)."""
    source_of = source_of or (lambda name: source)
    known = {item.name for item in fields(settings_class)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise TWNError(f"{source}: unknown settings {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    hints = typing.get_type_hints(settings_class)
    for name, value in values.items():
        if not _fits(value, hints[name]):
            raise TWNError(f"{source_of(name)}: {name} must be {_describe(hints[name])}, not {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise TWNError(f"{source_of(name)}: {name} must be a finite number, not {value!r}")


@dataclass(frozen=True)
class Range:
    """The values a number setting may take: from `low` (excluded if `low_excluded`) to `high`; None is open."""

    low: float | None = None
    high: float | None = None
    low_excluded: bool = False

    def holds(self, value: float) -> bool:
        above = self.low is None or (value > self.low if self.low_excluded else value >= self.low)
        return above and (self.high is None or value <= self.high) and math.isfinite(value)

    def __str__(self) -> str:
        if self.low is not None and self.high is not None and not self.low_excluded:
            return f"from {self.low:g} to {self.high:g}"
        parts = []
        if self.low is not None:
            parts.append(f"above {self.low:g}" if self.low_excluded else f"at least {self.low:g}")
        if self.high is not None:
            parts.append(f"at most {self.high:g}")
        return "a finite number " + " and ".join(parts)


POSITIVE = Range(0, low_excluded=True)
NOT_NEGATIVE = Range(0)
AT_LEAST_ONE = Range(1)
SHARE = Range(0, 1)  # a probability or a fraction


def check_ranges(settings, ranges: dict[str, Range]) -> None:
    """Refuse a setting outside its range (None passes: it means the default); `settings` is a dataclass."""
    for name, allowed in ranges.items():
        value = getattr(settings, name)
        if value is not None and not allowed.holds(value):
            raise TWNError(f"{name} must be {allowed}, not {value!r}")


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
    overrides = {}
    for item in items:
        key, separator, value = item.partition("=")
        if not separator:
            raise TWNError(f"--set takes KEY=VALUE, not '{item}'")
        overrides[key.strip()] = read_yaml(value)
    return overrides | {key: value for key, value in options.items() if value is not None}
