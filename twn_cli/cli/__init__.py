"""The `twn` command line: a thin Typer layer over the engine and the stages.

Results go to stdout (a path, or JSONL records) so that stages chain in shell pipelines; logs and progress
go to stderr. Heavy modules (torch, transformers, peft) are imported inside the commands so that `--help`
and argument errors answer at once. Each module registers its commands on `app`, in the pipeline's order.
"""

from __future__ import annotations

from twn_cli.cli.common import app

# isort: off
from twn_cli.cli import data, training, inference, ecosystem  # noqa: E402, F401
# isort: on

__all__ = ["app"]
