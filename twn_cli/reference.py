"""The reference pages in docs/, generated from the code so that they cannot drift from it.

    python -m twn_cli.reference        # rewrites docs/cli.md and docs/recipes.md

docs/cli.md comes from the Typer app (every command, argument and option with its help and default);
docs/recipes.md from the settings dataclasses that recipes load into (every setting, its default, the
comment beside it in the code, and the value each shipped recipe gives it). A test regenerates both and
compares them with the files.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
from pathlib import Path

ROOT = Path(__file__).parents[1]


# ----------------------------------------------------------------------------------------------- commands
def cli_reference() -> str:
    import typer

    from twn_cli.cli import app

    group = typer.main.get_command(app)
    context = type(group).context_class(group, info_name="twn")
    lines = ["# Command reference", "", "Generated from the command line itself (`python -m twn_cli.reference`); `twn COMMAND --help` says the same.", ""]
    lines += [inspect.cleandoc(group.help or ""), ""]
    for name in group.list_commands(context):
        command = group.get_command(context, name)
        command_context = type(command).context_class(command, info_name=name, parent=context)
        lines += [f"## `twn {name}`", "", "```", f"twn {name} {' '.join(command.collect_usage_pieces(command_context))}", "```", ""]
        lines += [inspect.cleandoc(command.help or ""), ""]
        records = [parameter.get_help_record(command_context) for parameter in command.params]
        rows = [f"| `{names}` | {meaning.replace('|', chr(92) + '|')} |" for names, meaning in filter(None, records) if names != "--help"]
        if rows:
            lines += ["| argument / option | meaning |", "| --- | --- |", *rows, ""]
    return "\n".join(lines).rstrip() + "\n"


# ----------------------------------------------------------------------------------------------- recipes
def recipes_reference() -> str:
    from twn_cli.recipes import read_yaml, stage_settings

    lines = [
        "# Recipe reference",
        "",
        "Generated from the settings classes (`python -m twn_cli.reference`). A recipe is a YAML file of",
        "`setting: value` for one stage and backbone, `recipes/<backbone>/<file>`; any setting can also be given",
        "on the command line as `--set KEY=VALUE`. Columns after the default show each shipped recipe's value",
        "(blank: the default).",
        "",
    ]
    for file_name, settings_class in stage_settings().items():
        recipes = sorted(ROOT.glob(f"recipes/*/{file_name}"))
        values = {path.parent.name: read_yaml(path.read_text()) or {} for path in recipes}
        comments = _field_comments(settings_class)
        lines += [f"## `{file_name}`: `{settings_class.__module__}.{settings_class.__name__}`", ""]
        lines += [inspect.cleandoc(settings_class.__doc__ or ""), ""]
        header = ["setting", "default", *values, "meaning"]
        lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        for field in dataclasses.fields(settings_class):
            default = field.default if field.default is not dataclasses.MISSING else field.default_factory()  # type: ignore[misc]
            cells = [f"`{field.name}`", _value(default), *(_value(values[name][field.name]) if field.name in values[name] else "" for name in values)]
            lines.append("| " + " | ".join(cells + [comments.get(field.name, "").replace("|", "\\|")]) + " |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _value(value) -> str:
    return "`null`" if value is None else f"`{value}`"


def _field_comments(settings_class: type) -> dict[str, str]:
    """Each field's comment in the class source: the comment lines just above it and the one beside it."""
    source = textwrap.dedent(inspect.getsource(settings_class))
    lines = source.splitlines()
    comments = {}
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            line = lines[node.lineno - 1]
            above = []
            row = node.lineno - 2
            while row >= 0 and lines[row].strip().startswith("#"):
                above.insert(0, lines[row].strip().lstrip("#").strip())
                row -= 1
            beside = line.split("#", 1)[1].strip() if "#" in line and "'#'" not in line and '"#"' not in line else ""
            comments[node.target.id] = " ".join(part for part in (*above, beside) if part)
    return comments


def write() -> None:
    (ROOT / "docs" / "cli.md").write_text(cli_reference())
    (ROOT / "docs" / "recipes.md").write_text(recipes_reference())


if __name__ == "__main__":
    write()
