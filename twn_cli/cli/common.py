"""What the commands share: the app, the options of every command that loads a model, model loading,
progress on stderr, logging, and one-line errors."""

from __future__ import annotations

import enum
import errno
import functools
import inspect
import logging
import os
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import typer

from twn_cli.errors import BadRecordError, TWNError
from twn_cli.locks import release_held_locks
from twn_cli.termination import Terminated, terminate_like_interrupt

app = typer.Typer(
    name="twn",
    help=(
        "Think When Needed multimodal embeddings: a frozen multimodal LLM with a reasoning LoRA that writes a "
        "chain of thought, an embedding LoRA that embeds, and a gate that decides per input whether to think.\n\n"
        "Pipeline: prepare -> train-embed -> train-gate -> train-rl -> embed / route / eval. "
        "Results go to stdout, logs and progress to stderr."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


class ThinkOption(str, enum.Enum):
    never = "never"
    always = "always"
    auto = "auto"


# How every command that loads a model loads it: `with_load_options` adds these to its options.
LOAD_OPTIONS = (
    ("device", str, typer.Option("auto", help="cpu, cuda, cuda:1, ... (auto: cuda if available; under torchrun each process takes its local GPU).")),
    ("dtype", str, typer.Option("float32", help="Backbone dtype: float32, bfloat16 or float16 (adapters, queries and gate train in float32).")),
    ("attn_implementation", str | None, typer.Option(None, help="Attention kernel (sdpa, eager, flash_attention_2); default: transformers' choice.")),
    ("min_pixels", int | None, typer.Option(
        None, min=1, help="The fewest pixels of an image or video frame (for Qwen3-VL: of a whole video); default: the checkpoint's, else the backbone's."
    )),
    ("max_pixels", int | None, typer.Option(None, min=1, help="The most pixels of an image or video frame; default: the checkpoint's, else the backbone's own.")),
    ("trust_remote_code", bool, typer.Option(False, help="Allow a hub backbone to run its own code.")),
)
VERBOSE = typer.Option(False, "-v", "--verbose", help="Log details on stderr.")
MAX_TEXT = typer.Option(
    None, min=1, help="Most tokens of an input's text and instruction; longer ones are cut, and counted (default: what the backbone's positions leave room for)."
)
FRAMES = typer.Option(8, min=1, help="Frames sampled uniformly from each video of a record that gives no num_frames (MMEB-V2: 8).")
LOCAL_BACKBONE = typer.Option(None, help="A local copy of the checkpoint's backbone to load it onto.")
ANY_BACKBONE = typer.Option(None, help="Backbone directory or hub id: with --checkpoint, a local copy to load it onto; alone, fresh untrained adapters.")


def with_load_options(command):
    """Give `command` the options of LOAD_OPTIONS (before its --verbose) and call it with them as one
    `options: LoadOptions` (under torchrun `auto` and `cuda` mean the process's own GPU)."""
    signature = inspect.signature(command)
    kept = [parameter for parameter in signature.parameters.values() if parameter.name != "options"]
    added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind) for name, kind, option in LOAD_OPTIONS]
    keyword_only = [parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY) for parameter in kept]
    parameters = [parameter for parameter in keyword_only if parameter.name != "verbose"] + added + [p for p in keyword_only if p.name == "verbose"]

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from twn_cli.distributed import process_device
        from twn_cli.engine.factory import LoadOptions

        values = {name: kwargs.pop(name) for name, _, _ in LOAD_OPTIONS}
        values["device"] = process_device(values["device"])
        return command(*args, options=LoadOptions(**values), **kwargs)

    wrapper.__signature__ = signature.replace(parameters=parameters)
    # What Typer reads the options' types from (`options` itself is no option of the command line).
    wrapper.__annotations__ = {name: kind for name, kind in command.__annotations__.items() if name != "options"} | {
        name: kind for name, kind, _ in LOAD_OPTIONS
    }
    return wrapper


@contextmanager
def training_progress(name: str, total: int, status: Callable[[dict], str], shown: bool):
    """A progress bar of a training run's `total` steps; yields the callback that shows a step's metrics."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    with progress_bar(TextColumn(name), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.fields[status]}"),
                      disable=not shown) as progress:
        task = progress.add_task("train", total=total, status="")
        yield lambda metrics: progress.update(task, completed=metrics["step"], status=status(metrics))


def load_model_or_fresh(checkpoint: Path | None, backbone: str | None, options, *, uses_gate: bool = False, seed: int = 0):
    """A trained model from --checkpoint (optionally onto a local --backbone copy), or fresh adapters on --backbone."""
    from twn_cli.distributed import Distributed
    from twn_cli.engine.config import TWNConfig
    from twn_cli.engine.factory import load_model

    if checkpoint is None and backbone is None:
        raise TWNError("give --checkpoint DIR (a trained model) or --backbone MODEL (a fresh, untrained one)")
    # Every process of torchrun / accelerate launch loads the same model: the first one says what is wrong with it.
    warn = logging.warning if Distributed().is_main else logging.debug
    if checkpoint is None:
        warn("no --checkpoint: fresh, untrained adapters on '%s'", backbone)
        return load_model(backbone=backbone, config=TWNConfig(seed=seed), options=options)
    model = load_model(checkpoint, backbone, options=options)
    if uses_gate and "gate" not in model.manifest:
        warn("checkpoint '%s' has no trained gate (run train-gate): the gate is untrained", checkpoint)
    return model


def stderr_console():
    from rich.console import Console

    return Console(stderr=True)


# Where stderr is not a terminal (a log file), progress is a plain line this often instead of a bar.
PROGRESS_LINE_SECONDS = 30.0


def progress_bar(*columns, **options):
    """A rich progress bar on stderr; where stderr is not a terminal, a line every PROGRESS_LINE_SECONDS."""
    import io

    from rich.console import Console
    from rich.progress import Progress

    stream = sys.stderr  # as it is now: a running bar redirects sys.stderr through itself

    class ProgressWithLines(Progress):
        last_line = float("-inf")

        def update(self, task_id, **fields) -> None:
            super().update(task_id, **fields)
            if not self.disable and not self.console.is_terminal and time.monotonic() - self.last_line >= PROGRESS_LINE_SECONDS:
                self.last_line = time.monotonic()
                line = Console(file=io.StringIO(), width=160, color_system=None)  # a log line: no terminal to fit
                line.print(self.make_tasks_table(self.tasks))
                stream.write(line.file.getvalue())
                stream.flush()

    return ProgressWithLines(*columns, console=stderr_console(), **options)


def setup_logging(verbose: bool) -> None:
    import warnings

    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=stderr_console(), show_path=False, show_time=False)],
        force=True,
    )
    # Deprecation chatter from inside transformers/peft that a user cannot act on.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)\.")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def user_errors(command):
    """Report TWNError and a full disk as one line on stderr with exit code 1 (2 for usage errors from Typer
    itself); Ctrl-C and SIGTERM end with 130 and 143 once cleanup has run. Locks the command took are released."""

    skips_bad = "skip_bad" in inspect.signature(command).parameters

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        name = command.__name__.replace("_", "-")
        terminate_like_interrupt()
        try:
            result = command(*args, **kwargs)
        except TWNError as error:
            hint = ""
            if isinstance(error, BadRecordError):
                # Stages that read a prepared dataset have no --skip-bad: `twn prepare` checked their records.
                hint = " (--skip-bad skips such records)" if skips_bad else " (`twn prepare --skip-bad` leaves such records out of a dataset)"
            print(f"twn {name}: error: {error}{hint}", file=sys.stderr)
            raise typer.Exit(1) from None
        except KeyboardInterrupt as interruption:
            terminated = isinstance(interruption, Terminated)
            print(f"twn: {'terminated' if terminated else 'interrupted'}; partial outputs were removed", file=sys.stderr)
            raise typer.Exit(143 if terminated else 130) from None
        except Exception as error:  # noqa: BLE001 - only a full disk is answered here; anything else goes on up
            if not _disk_full(error):
                raise
            where = f" writing '{error.filename}'" if getattr(error, "filename", None) else ""
            print(f"twn {name}: error: no space left on the device{where}; partial outputs were removed", file=sys.stderr)
            raise typer.Exit(1) from None
        finally:
            release_held_locks()
        if "twn_cli.distributed" in sys.modules:  # only commands that may run under several processes load it
            sys.modules["twn_cli.distributed"].end_process_group(finished=True)
        return result

    return wrapper


def _disk_full(error: Exception) -> bool:
    """Whether `error` says the disk (or the user's quota) is full; safetensors and pyarrow raise their own
    errors for it, with the system's words."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return any(os.strerror(code) in str(error) for code in (errno.ENOSPC, errno.EDQUOT))


def version() -> str:
    from twn_cli import __version__

    return __version__


