"""The `twn` command line: a thin Typer layer over the engine and the stages.

Results go to stdout (a path, or JSONL records) so that stages chain in shell pipelines; logs and progress
go to stderr. Heavy modules (torch, transformers, peft) are imported inside the commands so that `--help`
and argument errors answer at once.
"""

from __future__ import annotations

import enum
import functools
import logging
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from twn_cli.errors import BadRecordError, TWNError

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


# The pixel bounds of every command that loads a backbone (`Backbone.bound_pixels`); a checkpoint keeps its own.
MIN_PIXELS_HELP = "The fewest pixels of an image or video frame (for Qwen3-VL: of a whole video); default: the checkpoint's, else the backbone's."
MAX_PIXELS_HELP = "The most pixels of an image or video frame; default: the checkpoint's, else the backbone's own."
FRAMES_HELP = "Frames sampled uniformly from each video of a record that gives no num_frames (MMEB-V2: 8)."


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
    budget = "budget"


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


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
    """Report TWNError as one line on stderr with exit code 1 (2 for usage errors from Typer itself)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            result = command(*args, **kwargs)
        except TWNError as error:
            hint = " (--skip-bad skips such records)" if isinstance(error, BadRecordError) else ""
            print(f"twn {command.__name__.replace('_', '-')}: error: {error}{hint}", file=sys.stderr)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            print("twn: interrupted; partial outputs were removed", file=sys.stderr)
            raise typer.Exit(130) from None
        if "twn_cli.distributed" in sys.modules:  # only commands that may run under several processes load it
            sys.modules["twn_cli.distributed"].end_process_group(finished=True)
        return result

    return wrapper


def _version() -> str:
    from twn_cli import __version__

    return __version__


# ------------------------------------------------------------------------------------------------ toy backbone
@app.command("toy-backbone")
@user_errors
def toy_backbone(
    output: Path = typer.Option(..., "-o", "--output", help="Directory to write the backbone to."),
    seed: int = typer.Option(0, help="Seed of the tokenizer, the weights and the pre-training stream: the same seed gives the same files."),
    recipe: Optional[Path] = typer.Option(
        None, help="YAML of backbone sizes (default: the values of recipes/toy/toy-backbone.yaml, built in)."
    ),
    pretrain: bool = typer.Option(False, "--pretrain", help="Pre-train on the toy world before saving: a vision warm-up, then captioning, scene QA and knowledge."),
    pretrain_recipe: Optional[Path] = typer.Option(
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

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

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
            with Progress(
                TextColumn("pre-training"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TextColumn("loss {task.fields[loss]}"), console=_stderr_console(),
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
    source: str = typer.Argument(..., help="JSONL/CSV/Parquet file, `datasets` directory, image folder (one sub-folder per class), MMEB-train or MMEB-V2-eval parquet, or `synthetic`."),
    output: Path = typer.Option(..., "-o", "--output", help="Directory of the prepared dataset to write."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip bad records (each listed in manifest.json) instead of failing."),
    frames: int = typer.Option(8, min=1, help="Frames sampled uniformly from each video: a folder of frames or a video file (MMEB-V2: 8)."),
    cot_column: Optional[str] = typer.Option(None, help="Column holding teacher CoT (default: `cot` when present)."),
    instruction: Optional[str] = typer.Option(None, help="Task instruction for records that carry none."),
    split: Optional[str] = typer.Option(None, help="Split for records that name none (default: train; test for MMEB-V2 eval files)."),
    task: Optional[str] = typer.Option(None, help="Task name for records that name none (default: from the file or folder name)."),
    image_root: Optional[Path] = typer.Option(None, help="Where relative image paths resolve (default: beside each file)."),
    cot_teacher: Optional[str] = typer.Option(None, help="Teacher MLLM (directory or hub id) that writes a CoT for every query without one; resumable."),
    teacher_batch_size: int = typer.Option(8, min=1, help="Queries per teacher generation batch."),
    teacher_max_new_tokens: int = typer.Option(128, min=1, help="Longest teacher CoT, in tokens."),
    device: str = typer.Option("auto", help="Device of the teacher (cpu, cuda, ...; auto: cuda if available)."),
    dtype: str = typer.Option("float32", help="Teacher dtype: float32, bfloat16 or float16 (bfloat16 on GPUs)."),
    trust_remote_code: bool = typer.Option(False, help="Allow a hub teacher to run its own code."),
    n: int = typer.Option(4000, min=10, help="synthetic: number of queries over train/validation/test."),
    seed: int = typer.Option(0, help="synthetic: seed of the toy world (the same seed gives the same dataset)."),
    image_size: Optional[int] = typer.Option(None, min=28, help="synthetic: side of the rendered pictures in pixels (default: the toy backbone's, which puts one of its image tokens on each grid cell)."),
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
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn


    from twn_cli.stages.prepare import run_prepare

    datasets.disable_progress_bars()
    if source == "synthetic":
        from twn_cli.toyworld.dataset import write_synthetic_dataset
        from twn_cli.toyworld.render import PICTURE_SIZE

        write_synthetic_dataset(output, n=n, seed=seed, image_size=image_size or PICTURE_SIZE)
        _print_prepared_summary(output)
        return
    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=_stderr_console(),
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
    backbone: Optional[str] = typer.Option(None, help="Backbone directory or hub id to start from (fresh adapters)."),
    checkpoint: Optional[Path] = typer.Option(None, help="TWN checkpoint to continue training."),
    recipe: Optional[Path] = typer.Option(None, help="YAML of hyper-parameters, e.g. recipes/toy/train-embed.yaml."),
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted run in --output from its last state."),
    steps: Optional[int] = typer.Option(None, min=1, help="Override: optimiser steps."),
    batch_size: Optional[int] = typer.Option(None, min=2, help="Override: global contrastive batch (queries per step)."),
    chunk_size: Optional[int] = typer.Option(None, min=1, help="Override: gradient-cache chunk per process (memory, not maths)."),
    learning_rate: Optional[float] = typer.Option(None, help="Override: peak learning rate."),
    temperature: Optional[float] = typer.Option(None, help="Override: InfoNCE temperature."),
    seed: Optional[int] = typer.Option(None, help="Override: seed of the data order and fresh adapters."),
    setting: list[str] = typer.Option([], "--set", help="Override any recipe setting: --set KEY=VALUE (repeatable)."),
    device: str = typer.Option("auto", help="cpu, cuda, ... (auto: cuda if available; under torchrun each process takes its local GPU)."),
    dtype: str = typer.Option("float32", help="Backbone dtype: float32 or bfloat16 (adapters train in float32)."),
    attn_implementation: Optional[str] = typer.Option(None, help="Attention kernel (sdpa, eager, flash_attention_2)."),
    min_pixels: Optional[int] = typer.Option(None, min=1, help=MIN_PIXELS_HELP),
    max_pixels: Optional[int] = typer.Option(None, min=1, help=MAX_PIXELS_HELP),
    trust_remote_code: bool = typer.Option(False, help="Allow a hub backbone to run its own code."),
    verbose: bool = typer.Option(False, "-v", "--verbose", help="Log details on stderr."),
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
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from twn_cli.data.prepared import load_prepared
    from twn_cli.distributed import Distributed, process_device, shard_language_model, start_process_group
    from twn_cli.engine.backbone import load_backbone, resolve_device
    from twn_cli.engine.checkpoint import load_checkpoint, save_checkpoint
    from twn_cli.engine.model import TWNModel
    from twn_cli.recipes import load_recipe, parse_overrides
    from twn_cli.stages.train_embed import TrainEmbedConfig, run_train_embed

    if (backbone is None) == (checkpoint is None) and not resume:
        raise TWNError("give exactly one of --backbone MODEL (fresh adapters) or --checkpoint DIR (continue one)")
    overrides = parse_overrides(
        setting, steps=steps, batch_size=batch_size, chunk_size=chunk_size, learning_rate=learning_rate, temperature=temperature, seed=seed
    )
    config = load_recipe(recipe, TrainEmbedConfig, **overrides)
    start_process_group()
    distributed = Distributed()
    shard = config.shard_backbone and distributed.world_size > 1
    # A backbone to shard is loaded on the CPU first, so that no device ever holds all of it.
    load_device = "cpu" if shard else process_device(device)
    load_options = dict(dtype=dtype, device=load_device, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code,
                        min_pixels=min_pixels, max_pixels=max_pixels)
    dataset = load_prepared(data)
    if checkpoint is not None:
        model = load_checkpoint(checkpoint, load_backbone(backbone, **load_options) if backbone else None, **load_options)
        history = model.manifest["stages"]
    elif backbone is not None:
        model = TWNModel(load_backbone(backbone, **load_options), config.model_config())
        history = []
    else:
        raise TWNError("--resume needs the --backbone or --checkpoint the run started from")
    if shard:
        layers = shard_language_model(model, resolve_device(process_device(device)))
        logging.info("sharded %d language-model layers over %d processes", layers, distributed.world_size)
    record = {
        "stage": "train-embed",
        "data": str(Path(data).resolve()),
        "arguments": {key: value for key, value in vars(config).items()},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    with Progress(
        TextColumn("train-embed"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"), console=_stderr_console(), disable=not distributed.is_main,
    ) as progress:
        task = progress.add_task("train", total=config.steps, status="")

        def show(metrics: dict) -> None:
            progress.update(
                task, completed=metrics["step"],
                status=f"loss {metrics['loss']:.3f} (nce {metrics['contrastive_loss']:.3f}, sft {metrics['sft_loss']:.3f}) "
                f"lr {metrics['learning_rate']:.2e} {metrics['samples_per_second']:.1f} samples/s",
            )

        summary = run_train_embed(model, dataset, output, config, resume=resume, stages=history + [record], on_step=show)
    if not distributed.is_main:
        return
    save_checkpoint(model, output, stages=history + [record], extra={"train_embed": summary})
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
    backbone: Optional[str] = typer.Option(None, help="A local copy of the checkpoint's backbone to load it onto."),
    recipe: Optional[Path] = typer.Option(None, help="YAML of hyper-parameters, e.g. recipes/toy/train-gate.yaml."),
    think_budget: Optional[float] = typer.Option(None, min=0.0, max=1.0, help="Pick τ so that this share of validation inputs thinks."),
    target: Optional[GateTarget] = typer.Option(None, help="best: the τ with the best validation Hit@1 (mean over tasks); budget: see --think-budget."),
    delta: Optional[float] = typer.Option(None, help="Override: label 'think' only if thinking raises the retrieval margin by more than this."),
    negatives_cache: Optional[Path] = typer.Option(
        None, help="Also score labels against every entry of this global negatives cache (`twn embed DATA -o cache.pt`) but the input's positives."
    ),
    setting: list[str] = typer.Option([], "--set", help="Override any recipe setting: --set KEY=VALUE (repeatable)."),
    device: str = typer.Option("auto", help="cpu, cuda, ... (auto: cuda if available)."),
    dtype: str = typer.Option("float32", help="Backbone dtype: float32, bfloat16 or float16 (the gate trains in float32)."),
    attn_implementation: Optional[str] = typer.Option(None, help="Attention kernel (sdpa, eager, flash_attention_2)."),
    min_pixels: Optional[int] = typer.Option(None, min=1, help=MIN_PIXELS_HELP),
    max_pixels: Optional[int] = typer.Option(None, min=1, help=MAX_PIXELS_HELP),
    trust_remote_code: bool = typer.Option(False, help="Allow a hub backbone to run its own code."),
    verbose: bool = typer.Option(False, "-v", "--verbose", help="Log details on stderr."),
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
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from twn_cli.data.negatives_cache import load_negatives_cache
    from twn_cli.data.prepared import load_prepared
    from twn_cli.distributed import Distributed, process_device, start_process_group
    from twn_cli.engine.backbone import load_backbone
    from twn_cli.engine.checkpoint import load_checkpoint, save_checkpoint, stage_results
    from twn_cli.recipes import load_recipe, parse_overrides
    from twn_cli.stages.train_gate import TrainGateConfig, run_train_gate

    if think_budget is not None and target is GateTarget.best:
        raise TWNError("--think-budget and --target best contradict each other: give one")
    chosen_target = GateTarget.budget.value if think_budget is not None else target.value if target else None
    overrides = parse_overrides(setting, target=chosen_target, think_budget=think_budget, delta=delta)
    config = load_recipe(recipe, TrainGateConfig, **overrides)
    start_process_group()
    distributed = Distributed()
    load_options = dict(dtype=dtype, device=process_device(device), attn_implementation=attn_implementation, trust_remote_code=trust_remote_code,
                        min_pixels=min_pixels, max_pixels=max_pixels)
    dataset = load_prepared(data)
    model = load_checkpoint(checkpoint, load_backbone(backbone, **load_options) if backbone else None, **load_options)
    negatives = load_negatives_cache(negatives_cache, model.embedding_dim) if negatives_cache else None
    record = {
        "stage": "train-gate",
        "data": str(Path(data).resolve()),
        "checkpoint": str(Path(checkpoint).resolve()),
        "negatives_cache": str(Path(negatives_cache).resolve()) if negatives_cache else None,
        "arguments": dict(vars(config)),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    with Progress(
        TextColumn("train-gate {task.fields[phase]}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=_stderr_console(),
        disable=not distributed.is_main,
    ) as progress:
        bar = progress.add_task("train-gate", total=None, phase="")

        def show(phase: str, done: int, total: int) -> None:
            progress.update(bar, phase=phase, completed=done, total=total)

        summary = run_train_gate(model, dataset, output, config, negatives=negatives, progress=show)
    if not distributed.is_main:
        return
    save_checkpoint(model, output, stages=model.manifest["stages"] + [record], extra={**stage_results(model.manifest), "gate": summary})

    labels, scores, validation = summary["labels"], summary["auroc"], summary["validation"]
    rule = f"{summary['think_budget']:.0%} think budget" if summary["target"] == "budget" else "best validation Hit@1, task mean"
    table = Table("", "value", title="train-gate")
    table.add_row("threshold τ", f"{summary['threshold']:.6g} ({rule})")
    table.add_row("labels", f"{labels['inputs']} {labels['split']} inputs, thinking helps {labels['think_helps']} ({labels['think_helps_rate']:.1%}) at δ = {summary['delta']:g}")
    table.add_row("mean margin change", f"{labels['mean_margin_change']:+.4f}")
    for name, rate in labels.get("think_helps_rate_by_difficulty", {}).items():
        table.add_row(f"  thinking helps, {name}", f"{rate:.1%}")
    heldout = "n/a (one class)" if scores["heldout"] is None else f"{scores['heldout']:.3f}"
    table.add_row("gate AUROC", f"{heldout} on {scores['heldout_inputs']} held-out labels ({scores['heldout_folds']}-fold)")
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
    backbone: Optional[str] = typer.Option(None, help="A local copy of the checkpoint's backbone to load it onto."),
    recipe: Optional[Path] = typer.Option(None, help="YAML of hyper-parameters, e.g. recipes/toy/train-rl.yaml."),
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted run in --output from its last state."),
    steps: Optional[int] = typer.Option(None, min=1, help="Override: optimiser steps."),
    seed: Optional[int] = typer.Option(None, help="Override: seed of the query order, the sampled CoTs and the random negatives."),
    setting: list[str] = typer.Option([], "--set", help="Override any recipe setting: --set KEY=VALUE (repeatable)."),
    device: str = typer.Option("auto", help="cpu, cuda, ... (auto: cuda if available)."),
    dtype: str = typer.Option("float32", help="Backbone dtype: float32 or bfloat16 (adapters train in float32)."),
    attn_implementation: Optional[str] = typer.Option(None, help="Attention kernel (sdpa, eager, flash_attention_2)."),
    min_pixels: Optional[int] = typer.Option(None, min=1, help=MIN_PIXELS_HELP),
    max_pixels: Optional[int] = typer.Option(None, min=1, help=MAX_PIXELS_HELP),
    trust_remote_code: bool = typer.Option(False, help="Allow a hub backbone to run its own code."),
    verbose: bool = typer.Option(False, "-v", "--verbose", help="Log details on stderr."),
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
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from twn_cli.data.negatives_cache import load_negatives_cache
    from twn_cli.data.prepared import load_prepared
    from twn_cli.distributed import Distributed, process_device, start_process_group
    from twn_cli.engine.backbone import load_backbone
    from twn_cli.engine.checkpoint import load_checkpoint, save_checkpoint, stage_results
    from twn_cli.recipes import load_recipe, parse_overrides
    from twn_cli.stages.train_rl import TrainRLConfig, run_train_rl

    config = load_recipe(recipe, TrainRLConfig, **parse_overrides(setting, steps=steps, seed=seed))
    start_process_group()
    distributed = Distributed()
    load_options = dict(dtype=dtype, device=process_device(device), attn_implementation=attn_implementation, trust_remote_code=trust_remote_code,
                        min_pixels=min_pixels, max_pixels=max_pixels)
    dataset = load_prepared(data)
    model = load_checkpoint(checkpoint, load_backbone(backbone, **load_options) if backbone else None, **load_options)
    cache = load_negatives_cache(negatives_cache, model.embedding_dim)
    record = {
        "stage": "train-rl",
        "data": str(Path(data).resolve()),
        "checkpoint": str(Path(checkpoint).resolve()),
        "negatives_cache": str(Path(negatives_cache).resolve()),
        "arguments": dict(vars(config)),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    stages = model.manifest["stages"] + [record]
    with Progress(
        TextColumn("train-rl"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"), console=_stderr_console(), disable=not distributed.is_main,
    ) as progress:
        task = progress.add_task("train", total=config.steps, status="")

        def show(metrics: dict) -> None:
            progress.update(
                task, completed=metrics["step"],
                status=f"reward {metrics['reward_mean']:.3f} kl {metrics['kl']:.4f} CoT {metrics['cot_tokens_mean']:.1f} tokens",
            )

        summary = run_train_rl(model, dataset, cache, output, config, resume=resume, stages=stages, on_step=show)
    if not distributed.is_main:
        return
    save_checkpoint(model, output, stages=stages, extra={**stage_results(model.manifest), "train_rl": summary})
    heldout = summary["heldout_reward"]
    if heldout:
        _stderr_console().print(
            f"held-out reward ({heldout['queries']} {heldout['split']} queries): {heldout['before']:.4f} before RL, {heldout['after']:.4f} after"
        )
    print(output)


# ------------------------------------------------------------------------------------------------------- embed
@app.command()
@user_errors
def embed(
    inputs: str = typer.Argument(
        ..., help="An image folder, a JSONL file of records (id, text, image/images, instruction), - for JSONL on stdin, or a prepared dataset directory (its candidates: a negatives cache for train-rl)."
    ),
    checkpoint: Optional[Path] = typer.Option(None, help="TWN checkpoint directory to embed with."),
    backbone: Optional[str] = typer.Option(
        None, help="Backbone directory or hub id: with --checkpoint, load the checkpoint onto it; alone, a fresh untrained TWN model."
    ),
    output: str = typer.Option("-", "-o", "--output", help="Output file: .safetensors, .pt, .parquet, .jsonl, or - for JSONL on stdout."),
    think: ThinkOption = typer.Option(ThinkOption.never, help="never: no CoT; always: a CoT for every input; auto: the gate decides."),
    adaptive: bool = typer.Option(False, "--adaptive", help="Same as --think auto: think where the checkpoint's gate says it helps."),
    threshold: Optional[float] = typer.Option(None, help="Gate threshold for --adaptive (default: the checkpoint's)."),
    batch_size: int = typer.Option(16, min=1, help="Inputs per forward pass."),
    frames: int = typer.Option(8, min=1, help=FRAMES_HELP),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip unreadable or empty records (reported on stderr and in the output) instead of stopping."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run into the same .parquet output after the records it finished."),
    max_think_tokens: Optional[int] = typer.Option(None, min=1, help="Most tokens a CoT may have (default: the checkpoint's)."),
    temperature: float = typer.Option(0.0, min=0.0, help="CoT sampling temperature; 0 decodes greedily."),
    top_p: float = typer.Option(1.0, min=0.0, max=1.0, help="Nucleus sampling for CoTs."),
    seed: int = typer.Option(0, help="Seed for sampled CoTs and for a fresh model's adapters."),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:1, ... (auto: cuda if available; under torchrun each process takes its local GPU)."),
    dtype: str = typer.Option("float32", help="Backbone dtype: float32, bfloat16 or float16."),
    attn_implementation: Optional[str] = typer.Option(None, help="Attention kernel (sdpa, eager, flash_attention_2); default: transformers' choice."),
    min_pixels: Optional[int] = typer.Option(None, min=1, help=MIN_PIXELS_HELP),
    max_pixels: Optional[int] = typer.Option(None, min=1, help=MAX_PIXELS_HELP),
    trust_remote_code: bool = typer.Option(False, help="Allow a hub backbone to run its own code."),
    verbose: bool = typer.Option(False, "-v", "--verbose", help="Log progress details on stderr."),
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
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from twn_cli.data.embedding_files import EmbeddingWriter
    from twn_cli.data.inputs import read_inputs
    from twn_cli.data.prepared import is_prepared_dir
    from twn_cli.distributed import Distributed, process_device, start_process_group
    from twn_cli.engine.model import Sampling
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
    records = read_inputs(inputs, frames=frames)
    model = _load_model(checkpoint, backbone, uses_gate=mode == "auto", seed=seed, dtype=dtype, device=process_device(device),
                        attn_implementation=attn_implementation, trust_remote_code=trust_remote_code,
                        min_pixels=min_pixels, max_pixels=max_pixels)
    if max_think_tokens is not None:
        model.config.max_think_tokens = max_think_tokens
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
        "sampling": {"temperature": temperature, "top_p": top_p, "seed": seed},
        "normalized": True,
        "embedding_dim": model.embedding_dim,
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
    with Progress(
        TextColumn("embedding"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.fields[rate]}"), console=_stderr_console(), transient=False, disable=not distributed.is_main,
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
        f"{len(summary.skipped)} skipped) in {time.perf_counter() - started:.1f} s",
        file=sys.stderr,
    )
    if writer.path is not None:
        print(writer.path)


def _load_model(checkpoint: Optional[Path], backbone: Optional[str], *, uses_gate: bool, seed: int = 0, **load_options):
    """A trained model from --checkpoint (optionally onto a local --backbone copy), or fresh adapters on --backbone."""
    from twn_cli.distributed import Distributed
    from twn_cli.engine.backbone import load_backbone
    from twn_cli.engine.checkpoint import load_checkpoint
    from twn_cli.engine.model import TWNConfig, TWNModel

    if checkpoint is None and backbone is None:
        raise TWNError("give --checkpoint DIR (a trained model) or --backbone MODEL (a fresh, untrained one)")
    # Every process of torchrun / accelerate launch loads the same model: the first one says what is wrong with it.
    warn = logging.warning if Distributed().is_main else logging.debug
    if checkpoint is None:
        warn("no --checkpoint: fresh, untrained adapters on '%s'", backbone)
        return TWNModel(load_backbone(backbone, **load_options), TWNConfig(seed=seed))
    model = load_checkpoint(checkpoint, load_backbone(backbone, **load_options) if backbone else None, **load_options)
    if uses_gate and "gate" not in model.manifest:
        warn("checkpoint '%s' has no trained gate (run train-gate): the gate is untrained", checkpoint)
    return model


# ------------------------------------------------------------------------------------------------------- route
@app.command()
@user_errors
def route(
    inputs: str = typer.Argument(..., help="An image folder, a JSONL file of records, or - for JSONL on stdin (as for `twn embed`)."),
    checkpoint: Optional[Path] = typer.Option(None, help="TWN checkpoint whose gate decides."),
    backbone: Optional[str] = typer.Option(None, help="Backbone: with --checkpoint, a local copy to load it onto; alone, an untrained gate."),
    output: str = typer.Option("-", "-o", "--output", help="JSONL file to write, or - for stdout."),
    threshold: Optional[float] = typer.Option(None, help="Think iff p_think >= threshold (default: the checkpoint's)."),
    batch_size: int = typer.Option(32, min=1, help="Inputs per prefill."),
    frames: int = typer.Option(8, min=1, help=FRAMES_HELP),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip unreadable or empty records (reported on stderr) instead of stopping."),
    device: str = typer.Option("auto", help="cpu, cuda, ... (auto: cuda if available)."),
    dtype: str = typer.Option("float32", help="Backbone dtype: float32, bfloat16 or float16."),
    attn_implementation: Optional[str] = typer.Option(None, help="Attention kernel (sdpa, eager, flash_attention_2)."),
    min_pixels: Optional[int] = typer.Option(None, min=1, help=MIN_PIXELS_HELP),
    max_pixels: Optional[int] = typer.Option(None, min=1, help=MAX_PIXELS_HELP),
    trust_remote_code: bool = typer.Option(False, help="Allow a hub backbone to run its own code."),
    verbose: bool = typer.Option(False, "-v", "--verbose", help="Log details on stderr."),
):
    """Gate decisions only: prefill each input and report p_think and think, without decoding anything.

    Writes one JSON line per input, {"id", "p_think", "think"}, streamed to stdout (or written atomically
    to -o FILE), so it pipes into jq. It costs one prefill per input: no CoT, no query pass.
    """
    _setup_logging(verbose)
    from twn_cli.atomic import atomic_file
    from twn_cli.data.inputs import read_inputs
    from twn_cli.stages.route import run_route

    records = read_inputs(inputs, frames=frames)
    model = _load_model(checkpoint, backbone, uses_gate=True, dtype=dtype, device=device,
                        attn_implementation=attn_implementation, trust_remote_code=trust_remote_code,
                        min_pixels=min_pixels, max_pixels=max_pixels)
    threshold = model.config.gate_threshold if threshold is None else threshold
    route_into = functools.partial(run_route, model, records, threshold=threshold, batch_size=batch_size, skip_bad=skip_bad)
    if output == "-":
        routed, thinking, skipped = route_into(sys.stdout)
    else:
        with atomic_file(output) as staging, open(staging, "w", encoding="utf-8") as stream:
            routed, thinking, skipped = route_into(stream)
        print(output)
    print(f"routed {routed} inputs: {thinking} think at threshold {threshold} ({len(skipped)} skipped)", file=sys.stderr)


# -------------------------------------------------------------------------------------------------------- eval
@app.command(name="eval")
@user_errors
def evaluate(
    data: Path = typer.Argument(..., help="Prepared eval dataset directory (from `twn prepare`)."),
    output: Path = typer.Option(..., "-o", "--output", help="Report directory: report.json, report.md, predictions.jsonl, quality_vs_tokens.png, cache/."),
    checkpoint: Optional[Path] = typer.Option(None, help="TWN checkpoint to evaluate."),
    backbone: Optional[str] = typer.Option(None, help="Backbone: with --checkpoint, a local copy to load it onto; alone, fresh untrained adapters."),
    mode: EvalMode = typer.Option(EvalMode.adaptive, help="never / always think, adaptive (the gate at its threshold), or sweep (never, always and a range of thresholds)."),
    split: str = typer.Option("test", help="Split of the prepared dataset to evaluate."),
    threshold: Optional[float] = typer.Option(None, help="Gate threshold of the adaptive point (default: the checkpoint's)."),
    thresholds: Optional[str] = typer.Option(None, help="Sweep thresholds, comma-separated (default: quantiles of p_think)."),
    batch_size: int = typer.Option(16, min=1, help="Inputs per forward pass."),
    rank_chunk_size: int = typer.Option(8192, min=1, help="Candidates scored at a time (bounds memory for huge pools)."),
    max_think_tokens: Optional[int] = typer.Option(None, min=1, help="Most tokens a CoT may have (default: the checkpoint's)."),
    device: str = typer.Option("auto", help="cpu, cuda, ... (auto: cuda if available; under torchrun each process takes its local GPU)."),
    dtype: str = typer.Option("float32", help="Backbone dtype: float32, bfloat16 or float16."),
    attn_implementation: Optional[str] = typer.Option(None, help="Attention kernel (sdpa, eager, flash_attention_2)."),
    min_pixels: Optional[int] = typer.Option(None, min=1, help=MIN_PIXELS_HELP),
    max_pixels: Optional[int] = typer.Option(None, min=1, help=MAX_PIXELS_HELP),
    trust_remote_code: bool = typer.Option(False, help="Allow a hub backbone to run its own code."),
    verbose: bool = typer.Option(False, "-v", "--verbose", help="Log details on stderr."),
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

    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from twn_cli.distributed import Distributed, process_device, start_process_group
    from twn_cli.eval.report import print_tables
    from twn_cli.stages.evaluate import run_eval

    try:
        sweep = [float(value) for value in thresholds.split(",")] if thresholds else None
    except ValueError:
        raise TWNError(f"--thresholds takes numbers separated by commas, not '{thresholds}'") from None
    start_process_group()
    distributed = Distributed()
    model = _load_model(checkpoint, backbone, uses_gate=mode in (EvalMode.adaptive, EvalMode.sweep), dtype=dtype,
                        device=process_device(device), attn_implementation=attn_implementation, trust_remote_code=trust_remote_code,
                        min_pixels=min_pixels, max_pixels=max_pixels)
    if max_think_tokens is not None:
        model.config.max_think_tokens = max_think_tokens
    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=_stderr_console(), disable=not distributed.is_main,
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
