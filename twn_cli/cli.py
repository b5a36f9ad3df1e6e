"""The `twn` command line: a thin Typer layer over the engine and the stages.

Results go to stdout (a path, or JSONL records) so that stages chain in shell pipelines; logs and progress
go to stderr. Heavy modules (torch, transformers, peft) are imported inside the commands so that `--help`
and argument errors answer at once.
"""

from __future__ import annotations

import enum
import errno
import functools
import inspect
import logging
import os
import sys
import time
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


class EvalMode(str, enum.Enum):
    never = "never"
    always = "always"
    adaptive = "adaptive"
    sweep = "sweep"


class GateTarget(str, enum.Enum):
    best = "best"
    within_noise = "within_noise"
    budget = "budget"


# Options of every command that loads a model (one declaration each).
DEVICE = typer.Option("auto", help="cpu, cuda, cuda:1, ... (auto: cuda if available; under torchrun each process takes its local GPU).")
DTYPE = typer.Option("float32", help="Backbone dtype: float32, bfloat16 or float16 (adapters, queries and gate train in float32).")
ATTENTION = typer.Option(None, help="Attention kernel (sdpa, eager, flash_attention_2); default: transformers' choice.")
REMOTE_CODE = typer.Option(False, help="Allow a hub backbone to run its own code.")
VERBOSE = typer.Option(False, "-v", "--verbose", help="Log details on stderr.")
MAX_TEXT = typer.Option(
    None, min=1, help="Most tokens of an input's text and instruction; longer ones are cut, and counted (default: what the backbone's positions leave room for)."
)
MIN_PIXELS = typer.Option(
    None, min=1, help="The fewest pixels of an image or video frame (for Qwen3-VL: of a whole video); default: the checkpoint's, else the backbone's."
)
MAX_PIXELS = typer.Option(None, min=1, help="The most pixels of an image or video frame; default: the checkpoint's, else the backbone's own.")
FRAMES = typer.Option(8, min=1, help="Frames sampled uniformly from each video of a record that gives no num_frames (MMEB-V2: 8).")
LOCAL_BACKBONE = typer.Option(None, help="A local copy of the checkpoint's backbone to load it onto.")
ANY_BACKBONE = typer.Option(None, help="Backbone directory or hub id: with --checkpoint, a local copy to load it onto; alone, fresh untrained adapters.")


def _load_options(device: str, dtype: str, attn_implementation: str | None, trust_remote_code: bool, min_pixels: int | None = None, max_pixels: int | None = None):
    from twn_cli.distributed import process_device
    from twn_cli.engine.factory import LoadOptions

    return LoadOptions(process_device(device), dtype, attn_implementation, trust_remote_code, min_pixels, max_pixels)


def _load_model(checkpoint: Path | None, backbone: str | None, options, *, uses_gate: bool = False, seed: int = 0):
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


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


# Where stderr is not a terminal (a log file), progress is a plain line this often instead of a bar.
PROGRESS_LINE_SECONDS = 30.0


def _progress(*columns, **options):
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

    return ProgressWithLines(*columns, console=_stderr_console(), **options)


def _setup_logging(verbose: bool) -> None:
    import warnings

    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=_stderr_console(), show_path=False, show_time=False)],
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


def _version() -> str:
    from twn_cli import __version__

    return __version__


# ------------------------------------------------------------------------------------------------ toy backbone
@app.command("toy-backbone")
@user_errors
def toy_backbone(
    output: Path = typer.Option(..., "-o", "--output", help="Directory to write the backbone to."),
    seed: int = typer.Option(0, help="Seed of the tokenizer, the weights and the pre-training stream: the same seed gives the same files."),
    recipe: Path | None = typer.Option(
        None, help="YAML of backbone sizes (default: the values of recipes/toy/toy-backbone.yaml, built in)."
    ),
    pretrain: bool = typer.Option(False, "--pretrain", help="Pre-train on the toy world before saving: a vision warm-up, then captioning, scene QA and knowledge."),
    pretrain_recipe: Path | None = typer.Option(
        None, help="YAML of pre-training settings (default: the values of recipes/toy/pretrain.yaml, built in)."
    ),
    verbose: bool = typer.Option(False, "-v", "--verbose", help="Log progress on stderr."),
):
    """Build the offline toy backbone: a tiny Qwen2-VL with a locally trained tokenizer and a PIL image processor.

    It has a real backbone's architecture and file layout, so every command loads it like
    Qwen/Qwen2-VL-2B-Instruct (`--backbone DIR`), with no download. With --pretrain it is first pre-trained
    on the toy world (a few minutes on 2 CPU cores), and the caption loss and shape, colour and position naming accuracy
    on unseen pictures, before and after, are printed. Written atomically. Prints the directory written.
    """
    _setup_logging(verbose)
    import json

    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    from twn_cli.atomic import atomic_directory
    from twn_cli.recipes import load_recipe
    from twn_cli.toyworld.backbone import ToyBackboneSpec, build_toy_backbone
    from twn_cli.toyworld.pretrain import PretrainSettings, pretrain_toy_backbone

    spec = load_recipe(recipe, ToyBackboneSpec)
    settings = load_recipe(pretrain_recipe, PretrainSettings) if pretrain else None
    config = output / "config.json"
    if output.exists() and any(output.iterdir()) and not (config.is_file() and "twn_toy_backbone" in config.read_text()):
        raise TWNError(f"'{output}' exists and is not a toy backbone: refusing to replace it")
    with atomic_directory(output) as staging:
        build_toy_backbone(staging, seed=seed, spec=spec)
        if settings is not None:
            with _progress(
                TextColumn("pre-training"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TextColumn("loss {task.fields[loss]}"),
            ) as progress:
                task = progress.add_task("pretrain", total=settings.vision_warmup_steps + settings.steps, loss="")
                report = pretrain_toy_backbone(
                    staging, settings, world_seed=seed,
                    on_step=lambda step, loss: progress.update(task, completed=step, loss=f"{loss:.3f}"),
                )
            print(json.dumps(vars(report), indent=2), file=sys.stderr)
    print(output)


# ----------------------------------------------------------------------------------------------------- prepare
@app.command()
@user_errors
def prepare(
    source: str = typer.Argument(..., help="JSONL/CSV/Parquet file, `datasets` directory, image folder (one sub-folder per class), MMEB-train or MMEB-V2-eval parquet, `synthetic`, or `mmeb-v2` (then ROOT)."),
    root: Path | None = typer.Argument(None, help="mmeb-v2: the benchmark's root folder (image-tasks/, video-tasks/, visdoc-tasks/; docs/mmeb-v2.md)."),
    output: Path = typer.Option(..., "-o", "--output", help="Directory of the prepared dataset to write."),
    tasks: str | None = typer.Option(None, help="mmeb-v2: tasks, modalities (image, video, visdoc) or leaderboard columns (I-CLS, V-RET, ViDoRe-V1, ...) to prepare, comma-separated (default: all 78)."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip bad records (each listed in manifest.json) instead of failing."),
    frames: int = typer.Option(8, min=1, help="Frames sampled uniformly from each video: a folder of frames or a video file (MMEB-V2: 8)."),
    cot_column: str | None = typer.Option(None, help="Column holding teacher CoT (default: `cot` when present)."),
    instruction: str | None = typer.Option(None, help="Task instruction for records that carry none."),
    split: str | None = typer.Option(None, help="Split for records that name none (default: train; test for MMEB-V2 eval files)."),
    task: str | None = typer.Option(None, help="Task name for records that name none (default: from the file or folder name)."),
    image_root: Path | None = typer.Option(None, help="Where relative image paths resolve (default: beside each file)."),
    cot_teacher: str | None = typer.Option(None, help="Teacher MLLM (directory or hub id) that writes a CoT for every query without one; resumable."),
    teacher_batch_size: int = typer.Option(8, min=1, help="Queries per teacher generation batch."),
    teacher_max_new_tokens: int = typer.Option(128, min=1, help="Longest teacher CoT, in tokens."),
    device: str = typer.Option("auto", help="Device of the teacher (cpu, cuda, ...; auto: cuda if available)."),
    dtype: str = typer.Option("float32", help="Teacher dtype: float32, bfloat16 or float16 (bfloat16 on GPUs)."),
    trust_remote_code: bool = typer.Option(False, help="Allow a hub teacher to run its own code."),
    n: int = typer.Option(4000, min=10, help="synthetic: number of queries over train/validation/test."),
    seed: int = typer.Option(0, help="synthetic: seed of the toy world (the same seed gives the same dataset)."),
    image_size: int | None = typer.Option(None, min=28, help="synthetic: side of the rendered pictures in pixels (default: the toy backbone's, which puts one of its image tokens on each grid cell)."),
    verbose: bool = typer.Option(False, "-v", "--verbose", help="Log details on stderr."),
):
    """Validate and normalise raw data into a prepared dataset directory (Arrow + manifest.json).

    `twn prepare synthetic -o DIR` writes the toy reasoning world instead: rendered shape scenes with simple,
    one-step and two-step clue queries and teacher CoTs; its test split holds unseen colour-shape
    combinations and clue phrasings.

    Every image is opened; missing or unreadable images, empty texts, records without a positive and
    duplicate ids fail the run with the first problems listed or, with --skip-bad, are skipped and listed in
    the manifest. Eval tasks keep their candidate pools (per query or global) and gold ids. Written
    atomically: an interrupted run leaves no directory that looks complete. Prints the directory written.
    """
    _setup_logging(verbose)
    import datasets
    from rich.progress import SpinnerColumn, TextColumn, TimeElapsedColumn

    from twn_cli.stages.prepare import run_prepare

    datasets.disable_progress_bars()
    if source == "mmeb-v2":
        _prepare_mmeb_v2(root, output, tasks, frames, ignored=[skip_bad, cot_column, instruction, split, task, image_root, cot_teacher])
        return
    if root is not None or tasks is not None:
        raise TWNError("ROOT and --tasks go with `twn prepare mmeb-v2 ROOT`")
    if source == "synthetic":
        from twn_cli.toyworld.dataset import write_synthetic_dataset
        from twn_cli.toyworld.render import PICTURE_SIZE

        write_synthetic_dataset(output, n=n, seed=seed, image_size=image_size or PICTURE_SIZE)
        _print_prepared_summary(output)
        return
    with _progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
    ) as progress:
        records = progress.add_task("reading", total=None)
        teacher = progress.add_task("teacher CoT", total=None, visible=False)
        summary = run_prepare(
            source, output, skip_bad=skip_bad, frames=frames, cot_column=cot_column, instruction=instruction,
            split=split, task=task, image_root=image_root,
            progress=lambda count: progress.update(records, advance=count, description=f"validated {progress.tasks[records].completed + count:.0f} records"),
            cot_teacher=cot_teacher, teacher_batch_size=teacher_batch_size, teacher_max_new_tokens=teacher_max_new_tokens,
            teacher_device=device, teacher_dtype=dtype, trust_remote_code=trust_remote_code,
            cot_progress=lambda done, total: progress.update(teacher, visible=True, description=f"teacher CoT {done}/{total}"),
        )
    _print_prepared_summary(summary.output_dir)


def _prepare_mmeb_v2(root: Path | None, output: Path, tasks: str | None, frames: int, ignored: list) -> None:
    from rich.progress import SpinnerColumn, TextColumn, TimeElapsedColumn

    from twn_cli.stages.prepare_mmeb_v2 import run_prepare_mmeb_v2

    if root is None:
        raise TWNError("`twn prepare mmeb-v2` needs the benchmark's root folder: twn prepare mmeb-v2 ROOT -o DIR")
    if any(ignored):
        raise TWNError("mmeb-v2 takes only ROOT, -o, --tasks and --frames: the benchmark fixes its records, splits and instructions")
    with _progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn()) as progress:
        bar = progress.add_task("MMEB-V2", total=None)
        summary = run_prepare_mmeb_v2(
            root, output, tasks=tasks.split(",") if tasks else None, frames=frames,
            progress=lambda name: progress.update(bar, description=f"MMEB-V2: reading {name}"),
        )
    _print_prepared_summary(summary.output_dir)


def _print_prepared_summary(dataset_dir: Path) -> None:
    """The queries per split and task as a table on stderr, and the dataset's path on stdout."""
    import json

    from rich.table import Table

    manifest = json.loads((dataset_dir / "manifest.json").read_text())
    table = Table("split", "task", "queries", title=str(dataset_dir), caption=f"{manifest['candidates']} candidates, {len(manifest['skipped'])} skipped")
    for split_name, counts in manifest["splits"].items():
        for task_name, count in counts["tasks"].items():
            table.add_row(split_name, task_name, str(count))
    _stderr_console().print(table)
    print(dataset_dir)


# ------------------------------------------------------------------------------------------------- train-embed
@app.command("train-embed")
@user_errors
def train_embed(
    data: Path = typer.Argument(..., help="Prepared dataset directory (from `twn prepare`)."),
    output: Path = typer.Option(..., "-o", "--output", help="Run directory: the checkpoint, plus train/ (metrics.jsonl, resumable states)."),
    backbone: str | None = typer.Option(None, help="Backbone directory or hub id to start from (fresh adapters)."),
    checkpoint: Path | None = typer.Option(None, help="TWN checkpoint to continue training."),
    recipe: Path | None = typer.Option(None, help="YAML of hyper-parameters, e.g. recipes/toy/train-embed.yaml."),
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted run in --output from its last state."),
    steps: int | None = typer.Option(None, min=1, help="Override: optimiser steps."),
    batch_size: int | None = typer.Option(None, min=2, help="Override: global contrastive batch (queries per step)."),
    chunk_size: int | None = typer.Option(None, min=1, help="Override: gradient-cache chunk per process (memory, not maths)."),
    learning_rate: float | None = typer.Option(None, help="Override: peak learning rate."),
    temperature: float | None = typer.Option(None, help="Override: InfoNCE temperature."),
    seed: int | None = typer.Option(None, help="Override: seed of the data order and fresh adapters."),
    setting: list[str] = typer.Option([], "--set", help="Override any recipe setting: --set KEY=VALUE (repeatable)."),
    device: str = DEVICE,
    dtype: str = DTYPE,
    attn_implementation: str | None = ATTENTION,
    min_pixels: int | None = MIN_PIXELS,
    max_pixels: int | None = MAX_PIXELS,
    trust_remote_code: bool = REMOTE_CODE,
    verbose: bool = VERBOSE,
):
    """Jointly train the reasoning adapter (SFT on teacher CoT) and the embedding adapter + queries (InfoNCE).

    Each query is trained in two views of one prefill, with its CoT and without; the embedding side reads
    the detached cache, so the contrastive loss never reaches the reasoning adapter. In-batch and hard
    negatives; a gradient cache makes a large contrastive batch fit in the memory of one chunk. Under
    torchrun / accelerate launch the batch is split over processes and negatives are gathered. States are
    saved every `checkpoint_every` steps (--resume continues exactly); a NaN loss stops with the last good
    state named. Prints the checkpoint (run) directory.
    """
    _setup_logging(verbose)
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from twn_cli.data.prepared import load_prepared
    from twn_cli.distributed import Distributed, process_device, shard_language_model, start_process_group
    from twn_cli.engine.backbone import resolve_device
    from twn_cli.engine.factory import load_model
    from twn_cli.recipes import load_recipe, parse_overrides
    from twn_cli.stages.train_embed import TrainEmbedConfig, run_train_embed
    from twn_cli.training import claim_run_directory

    if (backbone is None) == (checkpoint is None) and not resume:
        raise TWNError("give exactly one of --backbone MODEL (fresh adapters) or --checkpoint DIR (continue one)")
    if checkpoint is None and backbone is None:
        raise TWNError("--resume needs the --backbone or --checkpoint the run started from")
    overrides = parse_overrides(
        setting, steps=steps, batch_size=batch_size, chunk_size=chunk_size, learning_rate=learning_rate, temperature=temperature, seed=seed
    )
    config = load_recipe(recipe, TrainEmbedConfig, **overrides)
    start_process_group()
    distributed = Distributed()
    claim_run_directory(output, resume=resume, first_process=distributed.is_main)  # locked until the command ends
    shard = config.shard_backbone and distributed.world_size > 1
    options = _load_options(device, dtype, attn_implementation, trust_remote_code, min_pixels, max_pixels)
    if shard:  # a backbone to shard is loaded on the CPU first, so that no device ever holds all of it
        options.device = "cpu"
    dataset = load_prepared(data)
    model = load_model(checkpoint, backbone, config=None if checkpoint else config.model_config(), options=options)
    if shard:
        layers = shard_language_model(model, resolve_device(process_device(device)))
        logging.info("sharded %d language-model layers over %d processes", layers, distributed.world_size)
    with _progress(
        TextColumn("train-embed"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"), disable=not distributed.is_main,
    ) as progress:
        task = progress.add_task("train", total=config.steps, status="")

        def show(metrics: dict) -> None:
            progress.update(
                task, completed=metrics["step"],
                status=f"loss {metrics['loss']:.3f} (nce {metrics['contrastive_loss']:.3f}, sft {metrics['sft_loss']:.3f}) "
                f"lr {metrics['learning_rate']:.2e} {metrics['samples_per_second']:.1f} samples/s",
            )

        summary = run_train_embed(model, dataset, output, config, resume=resume, on_step=show)
    if not distributed.is_main:
        return
    table = Table("", "value", title="train-embed")
    for key, value in summary.get("validation", {}).items():
        table.add_row(f"validation {key}", f"{value:.3f}")
    overhead = summary["parameters"]
    table.add_row("added parameters", f"{overhead['added']:,} ({overhead['added_percent']:.2f} % of the backbone)")
    _stderr_console().print(table)
    print(output)


# -------------------------------------------------------------------------------------------------- train-gate
@app.command("train-gate")
@user_errors
def train_gate(
    data: Path = typer.Argument(..., help="Prepared dataset directory (from `twn prepare`): labels on its train split, τ on its validation split."),
    checkpoint: Path = typer.Option(..., help="TWN checkpoint whose gate to train (from train-embed or train-rl)."),
    output: Path = typer.Option(..., "-o", "--output", help="Checkpoint directory to write; its train/ keeps the label cache and logs."),
    backbone: str | None = LOCAL_BACKBONE,
    recipe: Path | None = typer.Option(None, help="YAML of hyper-parameters, e.g. recipes/toy/train-gate.yaml."),
    think_budget: float | None = typer.Option(None, min=0.0, max=1.0, help="Pick τ so that this share of validation inputs thinks."),
    target: GateTarget | None = typer.Option(None, help="best: the τ with the best validation Hit@1 (mean over tasks); within_noise: the least thinking that validation cannot tell from the best; budget: see --think-budget."),
    delta: float | None = typer.Option(None, help="Override: label 'think' only if thinking raises the retrieval margin by more than this."),
    negatives_cache: Path | None = typer.Option(
        None, help="Also score labels against every entry of this global negatives cache (`twn embed DATA -o cache.pt`) but the input's positives."
    ),
    setting: list[str] = typer.Option([], "--set", help="Override any recipe setting: --set KEY=VALUE (repeatable)."),
    device: str = DEVICE,
    dtype: str = DTYPE,
    attn_implementation: str | None = ATTENTION,
    min_pixels: int | None = MIN_PIXELS,
    max_pixels: int | None = MAX_PIXELS,
    trust_remote_code: bool = REMOTE_CODE,
    verbose: bool = VERBOSE,
):
    """Train the routing gate on self-supervised labels: does thinking improve this input's retrieval margin?

    Each training input is embedded without thinking and with a greedy CoT of the reasoning adapter; the
    label says whether the CoT raised its margin (positive vs the hardest of the in-batch and hard
    negatives, and of a global negatives cache when one is given) by more than δ. Labelling is batched and cached in OUTPUT/train/gate-labels/, so a rerun
    labels only what is missing. The gate (an MLP on the prefill's last prompt state) trains on those
    labels with a class-weighted BCE; only its parameters change. τ is chosen on the validation split, for
    a think budget (--think-budget F) or the best Hit@1 averaged over tasks (--target best), and stored with the label
    statistics, the gate's cross-validated AUROC and the think rate in twn.json. Under torchrun /
    accelerate launch the processes share the labelling and validation batches. Prints the checkpoint.
    Usage: twn train-gate DATA --checkpoint RUN -o RUN2 [--think-budget F | --target best].
    """
    _setup_logging(verbose)
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from twn_cli.data.negatives_cache import load_negatives_cache
    from twn_cli.data.prepared import load_prepared
    from twn_cli.distributed import Distributed, start_process_group
    from twn_cli.recipes import load_recipe, parse_overrides
    from twn_cli.stages.train_gate import TrainGateConfig, run_train_gate
    from twn_cli.training import claim_run_directory

    if think_budget is not None and target not in (None, GateTarget.budget):
        raise TWNError(f"--think-budget and --target {target.value} contradict each other: give one")
    chosen_target = GateTarget.budget.value if think_budget is not None else target.value if target else None
    overrides = parse_overrides(setting, target=chosen_target, think_budget=think_budget, delta=delta)
    config = load_recipe(recipe, TrainGateConfig, **overrides)
    start_process_group()
    distributed = Distributed()
    claim_run_directory(output, first_process=distributed.is_main, training_states=False)  # locked until the command ends
    dataset = load_prepared(data)
    model = _load_model(checkpoint, backbone, _load_options(device, dtype, attn_implementation, trust_remote_code, min_pixels, max_pixels))
    negatives = load_negatives_cache(negatives_cache, model.embedding_dim) if negatives_cache else None
    with _progress(
        TextColumn("train-gate {task.fields[phase]}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        disable=not distributed.is_main,
    ) as progress:
        bar = progress.add_task("train-gate", total=None, phase="")

        def show(phase: str, done: int, total: int) -> None:
            progress.update(bar, phase=phase, completed=done, total=total)

        summary = run_train_gate(model, dataset, output, config, negatives=negatives, progress=show)
    if not distributed.is_main:
        return

    labels, scores, validation = summary["labels"], summary["auroc"], summary["validation"]
    rule = {
        "best": "best validation Hit@1, task mean",
        "within_noise": "least thinking within the validation noise of the best Hit@1, task mean",
    }.get(summary["target"]) or f"{summary['think_budget']:.0%} think budget"
    table = Table("", "value", title="train-gate")
    table.add_row("threshold τ", f"{summary['threshold']:.6g} ({rule})")
    table.add_row("labels", f"{labels['inputs']} {labels['split']} inputs, thinking helps {labels['think_helps']} ({labels['think_helps_rate']:.1%}) at δ = {summary['delta']:g}")
    table.add_row("mean margin change", f"{labels['mean_margin_change']:+.4f}")
    for name, rate in labels.get("think_helps_rate_by_difficulty", {}).items():
        table.add_row(f"  thinking helps, {name}", f"{rate:.1%}")
    heldout = "n/a (one class)" if scores["heldout"] is None else f"{scores['heldout']:.3f}"
    table.add_row("gate AUROC", f"{heldout} on {scores['heldout_inputs']} held-out labels ({scores['heldout_folds']}-fold)")
    for name in ("task", "task_difficulty"):
        if f"heldout_{name}_lookup" in scores:
            value = scores[f"heldout_{name}_lookup"]
            table.add_row(f"  routing by {name.replace('_', ' x ')} alone", "n/a (one class)" if value is None else f"{value:.3f} (the same folds)")
    table.add_row("gate epoch kept", f"{summary['gate_epoch']} (lowest loss on the stopping slice)")
    table.add_row(f"{validation['split']} think rate", f"{validation['think_rate']:.1%} of {validation['queries']} queries")
    table.add_row(
        f"{validation['split']} Hit@1 (task mean)", f"{validation['hit@1_adaptive']:.3f} adaptive, {validation['hit@1_never']:.3f} never, {validation['hit@1_always']:.3f} always"
    )
    table.add_row(
        "reasoning tokens / query", f"{validation['reasoning_tokens_per_query']:.1f} adaptive, {validation['reasoning_tokens_per_query_always']:.1f} always"
    )
    _stderr_console().print(table)
    print(output)


# ---------------------------------------------------------------------------------------------------- train-rl
@app.command("train-rl")
@user_errors
def train_rl(
    data: Path = typer.Argument(..., help="Prepared dataset directory (from `twn prepare`): queries of its train split."),
    checkpoint: Path = typer.Option(..., help="TWN checkpoint whose reasoning adapter to improve (from train-embed or train-gate); also the KL reference."),
    negatives_cache: Path = typer.Option(..., help="Global negatives cache: `twn embed DATA --checkpoint RUN -o cache.pt` (.pt or .safetensors)."),
    output: Path = typer.Option(..., "-o", "--output", help="Run directory: the checkpoint, plus train/ (metrics.jsonl, resumable states)."),
    backbone: str | None = LOCAL_BACKBONE,
    recipe: Path | None = typer.Option(None, help="YAML of hyper-parameters, e.g. recipes/toy/train-rl.yaml."),
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted run in --output from its last state."),
    steps: int | None = typer.Option(None, min=1, help="Override: optimiser steps."),
    seed: int | None = typer.Option(None, help="Override: seed of the query order, the sampled CoTs and the random negatives."),
    setting: list[str] = typer.Option([], "--set", help="Override any recipe setting: --set KEY=VALUE (repeatable)."),
    device: str = DEVICE,
    dtype: str = DTYPE,
    attn_implementation: str | None = ATTENTION,
    min_pixels: int | None = MIN_PIXELS,
    max_pixels: int | None = MAX_PIXELS,
    trust_remote_code: bool = REMOTE_CODE,
    verbose: bool = VERBOSE,
):
    """Improve the reasoning adapter with GRPO, rewarded in the embedding space against a global negatives cache.

    For each query, G sampled CoTs are embedded by the frozen embedding side; the reward compares each to
    the positive against the cache's negatives (hardest by similarity, plus random ones). Group-normalised
    advantages, a clipped surrogate with asymmetric ε, k3 KL to the pre-RL adapter; only the reasoning
    adapter changes. The cache is checked first (dimension, unique ids, finite values; .pt only as plain
    tensors). States every `checkpoint_every` steps (--resume continues exactly); a NaN loss stops with
    the last good state named. Under torchrun / accelerate launch each process samples its share of every
    step's queries and the gradients are summed. Prints the checkpoint (run) directory.
    Usage: twn train-rl DATA --checkpoint RUN --negatives-cache cache.pt -o RUN2.
    """
    _setup_logging(verbose)
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    from twn_cli.data.negatives_cache import load_negatives_cache
    from twn_cli.data.prepared import load_prepared
    from twn_cli.distributed import Distributed, start_process_group
    from twn_cli.recipes import load_recipe, parse_overrides
    from twn_cli.stages.train_rl import TrainRLConfig, run_train_rl
    from twn_cli.training import claim_run_directory

    config = load_recipe(recipe, TrainRLConfig, **parse_overrides(setting, steps=steps, seed=seed))
    start_process_group()
    distributed = Distributed()
    claim_run_directory(output, resume=resume, first_process=distributed.is_main)  # locked until the command ends
    dataset = load_prepared(data)
    model = _load_model(checkpoint, backbone, _load_options(device, dtype, attn_implementation, trust_remote_code, min_pixels, max_pixels))
    cache = load_negatives_cache(negatives_cache, model.embedding_dim)
    with _progress(
        TextColumn("train-rl"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"), disable=not distributed.is_main,
    ) as progress:
        task = progress.add_task("train", total=config.steps, status="")

        def show(metrics: dict) -> None:
            progress.update(
                task, completed=metrics["step"],
                status=f"reward {metrics['reward_mean']:.3f} ± {metrics['reward_spread']:.3f}, {metrics['zero_spread_groups']:.0%} groups without spread, "
                f"kl {metrics['kl']:.4f}, CoT {metrics['cot_tokens_mean']:.1f} tokens, {metrics['ended_share']:.0%} ended"
                + (f", held-out reward {metrics['heldout_reward']:.4f}" if "heldout_reward" in metrics else ""),
            )

        summary = run_train_rl(model, dataset, cache, output, config, resume=resume, on_step=show)
    if not distributed.is_main:
        return
    heldout, kept = summary["heldout_reward"], summary["kept_best"]
    if heldout:
        _stderr_console().print(
            f"held-out reward ({heldout['queries']} {heldout['split']} queries): {heldout['before']:.4f} before RL, {heldout['after']:.4f} after"
        )
    if kept:
        _stderr_console().print(
            f"stopped at step {kept['stopped_at_step']}: {kept['why']}; the checkpoint keeps the adapter of step {kept['step']}"
            + (" (the one before RL)" if kept["step"] == 0 else "")
        )
    print(output)


# ------------------------------------------------------------------------------------------------------- embed
@app.command()
@user_errors
def embed(
    inputs: str = typer.Argument(
        ..., help="An image folder, a JSONL file of records (id, text, image/images, instruction), - for JSONL on stdin, or a prepared dataset directory (its candidates: a negatives cache for train-rl)."
    ),
    checkpoint: Path | None = typer.Option(None, help="TWN checkpoint directory to embed with."),
    backbone: str | None = ANY_BACKBONE,
    output: str = typer.Option("-", "-o", "--output", help="Output file: .safetensors, .pt, .parquet, .jsonl, or - for JSONL on stdout."),
    think: ThinkOption = typer.Option(ThinkOption.never, help="never: no CoT; always: a CoT for every input; auto: the gate decides."),
    adaptive: bool = typer.Option(False, "--adaptive", help="Same as --think auto: think where the checkpoint's gate says it helps."),
    threshold: float | None = typer.Option(None, help="Gate threshold for --adaptive (default: the checkpoint's)."),
    batch_size: int = typer.Option(16, min=1, help="Inputs per forward pass."),
    frames: int = FRAMES,
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip unreadable or empty records (reported on stderr and in the output) instead of stopping."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run into the same .parquet output after the records it finished."),
    max_think_tokens: int | None = typer.Option(None, min=1, help="Most tokens a CoT may have (default: the checkpoint's)."),
    max_text_tokens: int | None = MAX_TEXT,
    temperature: float = typer.Option(0.0, min=0.0, help="CoT sampling temperature; 0 decodes greedily."),
    top_p: float = typer.Option(1.0, min=0.0, max=1.0, help="Nucleus sampling for CoTs."),
    seed: int = typer.Option(0, help="Seed for sampled CoTs and for a fresh model's adapters."),
    device: str = DEVICE,
    dtype: str = DTYPE,
    attn_implementation: str | None = ATTENTION,
    min_pixels: int | None = MIN_PIXELS,
    max_pixels: int | None = MAX_PIXELS,
    trust_remote_code: bool = REMOTE_CODE,
    verbose: bool = VERBOSE,
):
    """Embed images, texts or both with the shared-prefill dual-LoRA model.

    Writes one vector per input with its id, whether it thought, its CoT and reasoning-token count. File
    outputs also record the checkpoint, the think mode and that vectors are L2-normalised, and are written
    atomically; with `-o -` (default) JSONL records stream to stdout. Prints the path written. A .parquet
    output keeps an interrupted run's finished row groups, and --resume continues after them.
    Under torchrun / accelerate launch each process embeds its share of the batches and the first one
    writes every input in input order, to a file or to stdout; inputs cannot then come from stdin.
    """
    _setup_logging(verbose)
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    from twn_cli.data.embedding_files import EmbeddingWriter
    from twn_cli.data.inputs import check_output_is_not_input, read_inputs
    from twn_cli.data.prepared import is_prepared_dir
    from twn_cli.distributed import Distributed, start_process_group
    from twn_cli.engine.decoding import Sampling
    from twn_cli.engine.identity import model_identity
    from twn_cli.stages.embed import EmbedSettings, run_embed

    mode = "auto" if adaptive else think.value
    if adaptive and think is ThinkOption.always:
        raise TWNError("--adaptive and --think always contradict each other")
    if mode != "never" and is_prepared_dir(Path(inputs)):
        raise TWNError("a prepared dataset's candidates are embedded without thinking, as in training: drop --think / --adaptive")
    start_process_group()
    distributed = Distributed()
    if inputs == "-" and distributed.world_size > 1:
        raise TWNError("several processes cannot share stdin: give the inputs as a file or folder that every process reads")
    check_output_is_not_input(output, inputs)
    records = read_inputs(inputs, frames=frames)
    model = _load_model(checkpoint, backbone, _load_options(device, dtype, attn_implementation, trust_remote_code, min_pixels, max_pixels), uses_gate=mode == "auto", seed=seed)
    if max_think_tokens is not None:
        model.config.max_think_tokens = max_think_tokens
    model.prompts.user_text.max_tokens = max_text_tokens
    generator = torch.Generator(device=model.device).manual_seed(seed)
    settings = EmbedSettings(
        think=mode,
        threshold=threshold,
        batch_size=batch_size,
        skip_bad=skip_bad,
        sampling=Sampling(temperature=temperature, top_p=top_p, generator=generator),
    )
    metadata = {
        "inputs": inputs if inputs == "-" else str(Path(inputs).resolve()),
        "checkpoint": str(Path(checkpoint).resolve()) if checkpoint else None,
        "backbone": model.backbone.source,
        "dtype": dtype,
        "pixels": model.backbone.pixels,
        "frames_per_video": frames,
        "think_mode": mode,
        "threshold": (model.config.gate_threshold if threshold is None else threshold) if mode == "auto" else None,
        "max_think_tokens": model.config.max_think_tokens,
        "max_text_tokens": max_text_tokens,
        "sampling": {"temperature": temperature, "top_p": top_p, "seed": seed},
        "normalized": True,
        "embedding_dim": model.embedding_dim,
        "model": model_identity(model),
        "twn_version": _version(),
    }
    if resume and inputs == "-":
        raise TWNError("--resume needs inputs that can be read again (a file or folder), not stdin")
    writer, refusal = None, None
    if distributed.is_main:
        try:
            writer = EmbeddingWriter(output, metadata, resume=resume)
        except TWNError as error:
            refusal = error
    refusal = distributed.gather_objects([refusal])[0]  # every process stops on the first one's refusal
    if refusal is not None:
        raise refusal
    if writer is not None and writer.records_done:
        logging.warning("resuming '%s' after its first %d records", output, writer.records_done)
    started = time.perf_counter()
    with _progress(
        TextColumn("embedding"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.fields[rate]}"), transient=False, disable=not distributed.is_main,
    ) as progress:
        task = progress.add_task("embed", total=None, rate="")

        def advance(count: int) -> None:
            done = progress.tasks[0].completed + count
            progress.update(task, advance=count, rate=f"{done / (time.perf_counter() - started):.1f} inputs/s")

        summary = run_embed(model, records, writer, settings, on_batch=advance)
    if not distributed.is_main:
        return
    print(
        f"embedded {summary.embedded} inputs ({summary.thought} thought, {summary.reasoning_tokens} reasoning tokens, "
        f"{len(summary.skipped)} skipped{_texts_cut(summary.truncated)}) in {time.perf_counter() - started:.1f} s",
        file=sys.stderr,
    )
    if writer.path is not None:
        print(writer.path)


def _texts_cut(count: int) -> str:
    """The summary line's count of texts cut to fit the backbone's positions, when there were any."""
    return f", {count} {'text' if count == 1 else 'texts'} cut to fit" if count else ""


# ------------------------------------------------------------------------------------------------------- route
@app.command()
@user_errors
def route(
    inputs: str = typer.Argument(..., help="An image folder, a JSONL file of records, or - for JSONL on stdin (as for `twn embed`)."),
    checkpoint: Path | None = typer.Option(None, help="TWN checkpoint whose gate decides."),
    backbone: str | None = ANY_BACKBONE,
    output: str = typer.Option("-", "-o", "--output", help="JSONL file to write, or - for stdout."),
    threshold: float | None = typer.Option(None, help="Think iff p_think >= threshold (default: the checkpoint's)."),
    batch_size: int = typer.Option(32, min=1, help="Inputs per prefill."),
    max_text_tokens: int | None = MAX_TEXT,
    frames: int = FRAMES,
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip unreadable or empty records (reported on stderr) instead of stopping."),
    device: str = DEVICE,
    dtype: str = DTYPE,
    attn_implementation: str | None = ATTENTION,
    min_pixels: int | None = MIN_PIXELS,
    max_pixels: int | None = MAX_PIXELS,
    trust_remote_code: bool = REMOTE_CODE,
    verbose: bool = VERBOSE,
):
    """Gate decisions only: prefill each input and report p_think and think, without decoding anything.

    Writes one JSON line per input, {"id", "p_think", "think"}, streamed to stdout (or written atomically
    to -o FILE), so it pipes into jq. It costs one prefill per input: no CoT, no query pass.
    """
    _setup_logging(verbose)
    from twn_cli.atomic import atomic_file
    from twn_cli.data.inputs import check_output_is_not_input, read_inputs
    from twn_cli.stages.route import run_route

    check_output_is_not_input(output, inputs)
    records = read_inputs(inputs, frames=frames)
    model = _load_model(checkpoint, backbone, _load_options(device, dtype, attn_implementation, trust_remote_code, min_pixels, max_pixels), uses_gate=True)
    model.prompts.user_text.max_tokens = max_text_tokens
    threshold = model.config.gate_threshold if threshold is None else threshold
    route_into = functools.partial(run_route, model, records, threshold=threshold, batch_size=batch_size, skip_bad=skip_bad)
    if output == "-":
        routed, thinking, skipped = route_into(sys.stdout)
    else:
        with atomic_file(output) as staging, open(staging, "w", encoding="utf-8") as stream:
            routed, thinking, skipped = route_into(stream)
        print(output)
    print(f"routed {routed} inputs: {thinking} think at threshold {threshold} ({len(skipped)} skipped{_texts_cut(model.prompts.user_text.truncated)})",
          file=sys.stderr)


# -------------------------------------------------------------------------------------------------------- eval
@app.command(name="eval")
@user_errors
def evaluate(
    data: Path = typer.Argument(..., help="Prepared eval dataset directory (from `twn prepare`)."),
    output: Path = typer.Option(..., "-o", "--output", help="Report directory: report.json, report.md, predictions.jsonl, quality_vs_tokens.png, cache/."),
    checkpoint: Path | None = typer.Option(None, help="TWN checkpoint to evaluate."),
    backbone: str | None = ANY_BACKBONE,
    mode: EvalMode = typer.Option(EvalMode.adaptive, help="never / always think, adaptive (the gate at its threshold), or sweep (never, always and a range of thresholds)."),
    split: str = typer.Option("test", help="Split of the prepared dataset to evaluate."),
    threshold: float | None = typer.Option(None, help="Gate threshold of the adaptive point (default: the checkpoint's)."),
    thresholds: str | None = typer.Option(None, help="Sweep thresholds, comma-separated (default: quantiles of p_think)."),
    batch_size: int = typer.Option(16, min=1, help="Inputs per forward pass."),
    rank_chunk_size: int = typer.Option(8192, min=1, help="Candidates scored at a time (bounds memory for huge pools)."),
    max_think_tokens: int | None = typer.Option(None, min=1, help="Most tokens a CoT may have (default: the checkpoint's)."),
    max_text_tokens: int | None = MAX_TEXT,
    device: str = DEVICE,
    dtype: str = DTYPE,
    attn_implementation: str | None = ATTENTION,
    min_pixels: int | None = MIN_PIXELS,
    max_pixels: int | None = MAX_PIXELS,
    trust_remote_code: bool = REMOTE_CODE,
    verbose: bool = VERBOSE,
):
    """MMEB-style evaluation: never / always / adaptive thinking, or a sweep of gate thresholds.

    Per task Hit@1/5/10, NDCG@5/10, MRR and Recall@k, aggregated per meta-task, modality and overall the
    MMEB-V2 way (Hit@1 for image and video, NDCG@5 for visual documents), with think rate, reasoning tokens
    per query and throughput. Embeddings are cached per task in the report directory, so an interrupted
    evaluation resumes. CoTs are decoded greedily. Prints the report directory. Under torchrun /
    accelerate launch each process embeds its share of the batches and the first writes the report.
    """
    _setup_logging(verbose)
    import shlex

    from rich.progress import SpinnerColumn, TextColumn, TimeElapsedColumn

    from twn_cli.distributed import Distributed, start_process_group
    from twn_cli.eval.report import print_tables
    from twn_cli.stages.evaluate import run_eval

    try:
        sweep = [float(value) for value in thresholds.split(",")] if thresholds else None
    except ValueError:
        raise TWNError(f"--thresholds takes numbers separated by commas, not '{thresholds}'") from None
    start_process_group()
    distributed = Distributed()
    options = _load_options(device, dtype, attn_implementation, trust_remote_code, min_pixels, max_pixels)
    model = _load_model(checkpoint, backbone, options, uses_gate=mode in (EvalMode.adaptive, EvalMode.sweep))
    if max_think_tokens is not None:
        model.config.max_think_tokens = max_think_tokens
    model.prompts.user_text.max_tokens = max_text_tokens
    with _progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), disable=not distributed.is_main,
    ) as progress:
        bar = progress.add_task("eval", total=None)

        def show(state) -> None:
            progress.update(bar, description=f"task {state.task_number}/{state.tasks} {state.task}: {state.step} {state.done}/{state.total}")

        report = run_eval(
            model, data, output, mode=mode.value, split=split, threshold=threshold, thresholds=sweep,
            batch_size=batch_size, rank_chunk_size=rank_chunk_size, command=shlex.join(["twn", *sys.argv[1:]]), progress=show,
        )
    if not distributed.is_main:
        return
    print_tables(report)
    print(output)


# --------------------------------------------------------------------------------------------- convert-release
@app.command("convert-release")
@user_errors
def convert_release(
    source: Path = typer.Argument(..., help="Folder laid out like the TWN authors' release: reasoning/, embedding/, gate_mlp.pt, queries.pt."),
    output: Path = typer.Option(..., "-o", "--output", help="Checkpoint directory to write."),
    backbone: str | None = typer.Option(None, help="Backbone directory or hub id (default: the one the release's adapters name)."),
    setting: list[str] = typer.Option([], "--set", help="A model setting the release does not carry: --set KEY=VALUE (repeatable), e.g. gate_threshold=0.6."),
    device: str = DEVICE,
    dtype: str = typer.Option("float32", help="Backbone dtype while converting: float32, bfloat16 or float16 (the checkpoint's tensors are float32)."),
    trust_remote_code: bool = REMOTE_CODE,
    verbose: bool = VERBOSE,
):
    """Write a TWN release folder as a twn checkpoint (twn.json with the backbone's fingerprint, file hashes).

    Every command also loads a release folder directly with --checkpoint; converting records its settings
    and lets the checkpoint be checked on every load. K comes from the queries' shape, the gate's width
    from its weights (mapped onto twn's gate by names and shapes); other settings take twn's defaults
    unless --set. Written atomically. Prints the checkpoint directory.
    """
    _setup_logging(verbose)
    from twn_cli.engine.release import convert_release as convert
    from twn_cli.recipes import parse_overrides

    print(convert(source, output, backbone=backbone, overrides=parse_overrides(setting), dtype=dtype, device=device, trust_remote_code=trust_remote_code))


# ------------------------------------------------------------------------------------------------------ search
@app.command()
@user_errors
def search(
    queries: str = typer.Argument(..., help="Queries as `twn embed` takes them: an image folder, a JSONL file of records, or - for JSONL on stdin."),
    index: Path = typer.Option(..., "--index", help="What to search: an embedding file `twn embed` wrote (any format), or a folder `twn index` built."),
    checkpoint: Path | None = typer.Option(None, help="TWN checkpoint that embedded the index (a twn checkpoint or a release folder)."),
    backbone: str | None = ANY_BACKBONE,
    k: int = typer.Option(10, "-k", min=1, help="Results per query."),
    output: str = typer.Option("-", "-o", "--output", help="JSONL file to write, or - for stdout."),
    think: ThinkOption = typer.Option(ThinkOption.never, help="How the queries think: never, always, or auto (the gate decides)."),
    adaptive: bool = typer.Option(False, "--adaptive", help="Same as --think auto."),
    threshold: float | None = typer.Option(None, help="Gate threshold for --adaptive (default: the checkpoint's)."),
    index_think: ThinkOption = typer.Option(ThinkOption.never, help="The think mode the index must have been embedded with (candidates are embedded without thinking, as in training)."),
    chunk_size: int = typer.Option(16384, min=1, help="Stored vectors read and scored at a time: memory grows with it, not with the number stored."),
    batch_size: int = typer.Option(16, min=1, help="Queries per forward pass."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip unreadable or empty query records (reported on stderr) instead of stopping."),
    max_think_tokens: int | None = typer.Option(None, min=1, help="Most tokens a CoT may have (default: the checkpoint's)."),
    device: str = DEVICE,
    dtype: str = DTYPE,
    attn_implementation: str | None = ATTENTION,
    trust_remote_code: bool = REMOTE_CODE,
    verbose: bool = VERBOSE,
):
    """Embed queries and print each one's top-k stored vectors: {"id", "think", "results": [{"id", "score"}]}.

    Exact by default: the stored vectors are read a chunk at a time (memory bounded by --chunk-size however
    many there are), scores are cosine similarities, equal scores go to the earlier stored row. A folder
    built by `twn index` is searched with FAISS instead. An index embedded by another model, or in another
    think mode than --index-think, is refused before any query is embedded. CoTs are decoded greedily.
    """
    _setup_logging(verbose)
    from twn_cli.atomic import atomic_file
    from twn_cli.data.inputs import read_inputs
    from twn_cli.stages.embed import EmbedSettings
    from twn_cli.stages.search import StoredVectors, run_search

    mode = "auto" if adaptive else think.value
    if adaptive and think is ThinkOption.always:
        raise TWNError("--adaptive and --think always contradict each other")
    stored = StoredVectors.open(index)
    records = read_inputs(queries)
    model = _load_model(checkpoint, backbone, _load_options(device, dtype, attn_implementation, trust_remote_code), uses_gate=mode == "auto")
    if max_think_tokens is not None:
        model.config.max_think_tokens = max_think_tokens
    settings = EmbedSettings(think=mode, threshold=threshold, batch_size=batch_size, skip_bad=skip_bad)
    search_into = functools.partial(run_search, model, records, stored, settings, k=k, chunk_rows=chunk_size, index_think=index_think.value)
    started = time.perf_counter()
    if output == "-":
        summary = search_into(sys.stdout)
    else:
        with atomic_file(output) as staging, open(staging, "w", encoding="utf-8") as stream:
            summary = search_into(stream)
        print(output)
    print(
        f"searched {stored.count} stored vectors for {summary.embedded} queries ({summary.thought} thought, "
        f"{len(summary.skipped)} skipped) in {time.perf_counter() - started:.1f} s",
        file=sys.stderr,
    )


# ------------------------------------------------------------------------------------------------------- index
class IndexKind(str, enum.Enum):
    hnsw = "hnsw"
    flat = "flat"


@app.command()
@user_errors
def index(
    embeddings: Path = typer.Argument(..., help="An embedding file `twn embed` wrote (any format)."),
    output: Path = typer.Option(..., "-o", "--output", help="Index folder to write (index.faiss, ids.parquet, twn-index.json)."),
    kind: IndexKind = typer.Option(IndexKind.hnsw, help="hnsw: approximate, fast on millions; flat: exact, every vector scored."),
    hnsw_m: int = typer.Option(32, min=2, help="HNSW: links per vector (more: better recall, more memory)."),
    ef_search: int = typer.Option(128, min=1, help="HNSW: candidates explored per query (more: better recall, slower)."),
    chunk_size: int = typer.Option(16384, min=1, help="Vectors read at a time while building."),
    verbose: bool = VERBOSE,
):
    """Build a FAISS index (inner product) of an embedding file for `twn search --index`; needs faiss-cpu.

    The index keeps the embedding file's metadata, so search refuses it for another model or think mode as
    it would the file. FAISS holds every vector in memory. Written atomically. Prints the folder written.
    """
    _setup_logging(verbose)
    from twn_cli.stages.search import build_index

    print(build_index(embeddings, output, kind=kind.value, hnsw_m=hnsw_m, ef_search=ef_search, chunk_rows=chunk_size))
