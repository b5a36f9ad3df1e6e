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

PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}


class ThinkOption(str, enum.Enum):
    never = "never"
    always = "always"
    auto = "auto"


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
            return command(*args, **kwargs)
        except TWNError as error:
            hint = " (--skip-bad skips such records)" if isinstance(error, BadRecordError) else ""
            print(f"twn {command.__name__.replace('_', '-')}: error: {error}{hint}", file=sys.stderr)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            print("twn: interrupted; partial outputs were removed", file=sys.stderr)
            raise typer.Exit(130) from None

    return wrapper


def _not_built(stage: str) -> None:
    print(f"twn {stage}: this stage is not built yet in twn {_version()}; see CHANGELOG.md for what is.", file=sys.stderr)
    raise typer.Exit(2)


def _version() -> str:
    from twn_cli import __version__

    return __version__


# --------------------------------------------------------------------------------------------- toy backbone
@app.command("toy-backbone")
@user_errors
def toy_backbone(
    output: Path = typer.Option(..., "-o", "--output", help="Directory to write the backbone to."),
    seed: int = typer.Option(0, help="Seed of the tokenizer, the weights and the pre-training stream: the same seed gives the same files."),
    recipe: Optional[Path] = typer.Option(
        None, help="YAML of backbone sizes (default: the values of recipes/toy/toy-backbone.yaml, built in)."
    ),
    pretrain: bool = typer.Option(False, "--pretrain", help="Pre-train every weight on the toy world (captioning, scene QA, knowledge) before saving."),
    pretrain_recipe: Optional[Path] = typer.Option(
        None, help="YAML of pre-training settings (default: the values of recipes/toy/pretrain.yaml, built in)."
    ),
    verbose: bool = typer.Option(False, "-v", "--verbose", help="Log progress on stderr."),
):
    """Build the offline toy backbone: a tiny Qwen2-VL with a locally trained tokenizer and a PIL image processor.

    It has a real backbone's architecture and file layout, so every command loads it like
    Qwen/Qwen2-VL-2B-Instruct (`--backbone DIR`), with no download. With --pretrain it is first pre-trained
    on the toy world (a few minutes on 2 CPU cores), and the caption loss and shape/colour naming accuracy
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
                task = progress.add_task("pretrain", total=settings.steps, loss="")
                report = pretrain_toy_backbone(
                    staging, settings, world_seed=seed,
                    on_step=lambda step, loss: progress.update(task, completed=step, loss=f"{loss:.3f}"),
                )
            print(json.dumps(vars(report), indent=2), file=sys.stderr)
    print(output)


# --------------------------------------------------------------------------------------------- embed
@app.command()
@user_errors
def embed(
    inputs: str = typer.Argument(..., help="An image folder, a JSONL file of records (id, text, image/images, instruction), or - for JSONL on stdin."),
    checkpoint: Optional[Path] = typer.Option(None, help="TWN checkpoint directory to embed with."),
    backbone: Optional[str] = typer.Option(
        None, help="Backbone directory or hub id: with --checkpoint, load the checkpoint onto it; alone, a fresh untrained TWN model."
    ),
    output: str = typer.Option("-", "-o", "--output", help="Output file: .safetensors, .pt, .parquet, .jsonl, or - for JSONL on stdout."),
    think: ThinkOption = typer.Option(ThinkOption.never, help="never: no CoT; always: a CoT for every input; auto: the gate decides."),
    adaptive: bool = typer.Option(False, "--adaptive", help="Same as --think auto: think where the checkpoint's gate says it helps."),
    threshold: Optional[float] = typer.Option(None, help="Gate threshold for --adaptive (default: the checkpoint's)."),
    batch_size: int = typer.Option(16, min=1, help="Inputs per forward pass."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip unreadable or empty records (reported on stderr and in the output) instead of stopping."),
    max_think_tokens: Optional[int] = typer.Option(None, min=1, help="Most tokens a CoT may have (default: the checkpoint's)."),
    temperature: float = typer.Option(0.0, min=0.0, help="CoT sampling temperature; 0 decodes greedily."),
    top_p: float = typer.Option(1.0, min=0.0, max=1.0, help="Nucleus sampling for CoTs."),
    seed: int = typer.Option(0, help="Seed for sampled CoTs and for a fresh model's adapters."),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:1, ... (auto: cuda if available)."),
    dtype: str = typer.Option("float32", help="Backbone dtype: float32, bfloat16 or float16."),
    attn_implementation: Optional[str] = typer.Option(None, help="Attention kernel (sdpa, eager, flash_attention_2); default: transformers' choice."),
    trust_remote_code: bool = typer.Option(False, help="Allow a hub backbone to run its own code."),
    verbose: bool = typer.Option(False, "-v", "--verbose", help="Log progress details on stderr."),
):
    """Embed images, texts or both with the shared-prefill dual-LoRA model.

    Writes one vector per input with its id, whether it thought, its CoT and reasoning-token count. File
    outputs also record the checkpoint, the think mode and that vectors are L2-normalised, and are written
    atomically; with `-o -` (default) JSONL records stream to stdout. Prints the path written.
    """
    _setup_logging(verbose)
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from twn_cli.data.embedding_files import EmbeddingWriter
    from twn_cli.data.inputs import read_inputs
    from twn_cli.engine.backbone import load_backbone
    from twn_cli.engine.checkpoint import load_checkpoint
    from twn_cli.engine.model import Sampling, TWNConfig, TWNModel
    from twn_cli.stages.embed import EmbedSettings, run_embed

    if checkpoint is None and backbone is None:
        raise TWNError("give --checkpoint DIR (a trained model) or --backbone MODEL (a fresh, untrained one)")
    mode = "auto" if adaptive else think.value
    if adaptive and think is ThinkOption.always:
        raise TWNError("--adaptive and --think always contradict each other")
    load_options = dict(dtype=dtype, device=device, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code)
    records = read_inputs(inputs)
    if checkpoint is not None:
        loaded_backbone = load_backbone(backbone, **load_options) if backbone else None
        model = load_checkpoint(checkpoint, loaded_backbone, **load_options)
        if mode == "auto" and "gate" not in model.manifest:
            logging.warning("checkpoint '%s' has no trained gate: --adaptive uses an untrained one", checkpoint)
    else:
        logging.warning("no --checkpoint: embedding with fresh, untrained adapters on '%s'", backbone)
        model = TWNModel(load_backbone(backbone, **load_options), TWNConfig(seed=seed))
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
        "checkpoint": str(checkpoint) if checkpoint else None,
        "backbone": model.backbone.source,
        "think_mode": mode,
        "threshold": (model.config.gate_threshold if threshold is None else threshold) if mode == "auto" else None,
        "normalized": True,
        "embedding_dim": model.embedding_dim,
        "twn_version": _version(),
    }
    writer = EmbeddingWriter(output, metadata)
    started = time.perf_counter()
    with Progress(
        TextColumn("embedding"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.fields[rate]}"), console=_stderr_console(), transient=False,
    ) as progress:
        task = progress.add_task("embed", total=None, rate="")

        def advance(count: int) -> None:
            done = progress.tasks[0].completed + count
            progress.update(task, advance=count, rate=f"{done / (time.perf_counter() - started):.1f} inputs/s")

        summary = run_embed(model, records, writer, settings, on_batch=advance)
    print(
        f"embedded {summary.embedded} inputs ({summary.thought} thought, {summary.reasoning_tokens} reasoning tokens, "
        f"{len(summary.skipped)} skipped) in {time.perf_counter() - started:.1f} s",
        file=sys.stderr,
    )
    if writer.path is not None:
        print(writer.path)


# --------------------------------------------------------------------------------------------- stages to come
@app.command()
@user_errors
def prepare(
    source: str = typer.Argument(..., help="JSONL/CSV/Parquet file, `datasets` directory, image folder (one sub-folder per class), MMEB-train or MMEB-V2-eval parquet, or `synthetic`."),
    output: Path = typer.Option(..., "-o", "--output", help="Directory of the prepared dataset to write."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip bad records (each listed in manifest.json) instead of failing."),
    frames: int = typer.Option(8, min=1, help="Frames sampled uniformly from each video frame folder."),
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
    n: int = typer.Option(2000, min=10, help="synthetic: number of queries over train/validation/test."),
    seed: int = typer.Option(0, help="synthetic: seed of the toy world (the same seed gives the same dataset)."),
    image_size: int = typer.Option(56, min=28, help="synthetic: side of the rendered pictures in pixels."),
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

        write_synthetic_dataset(output, n=n, seed=seed, image_size=image_size)
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


@app.command("train-embed", context_settings=PASS_THROUGH)
def train_embed(ctx: typer.Context):
    """Jointly train the reasoning adapter (SFT on teacher CoT) and the embedding adapter + queries (InfoNCE).

    Both views of each query (with and without its CoT) share one prefill; the embedding side reads the
    detached cache, so the contrastive loss never reaches the reasoning adapter. In-batch and hard negatives,
    gradient cache for large batches, multi-process via accelerate. Writes a checkpoint directory.
    Usage: twn train-embed DATA --backbone MODEL -o RUN [--recipe YAML] [--resume].
    """
    _not_built("train-embed")


@app.command("train-gate", context_settings=PASS_THROUGH)
def train_gate(ctx: typer.Context):
    """Train the routing gate on self-supervised labels: does thinking improve this input's retrieval margin?

    Labels come from embedding each training input with and without a generated CoT; only the gate's
    parameters change. Picks the threshold for a think budget (--think-budget F) or the best validation
    score (--target best). Writes a checkpoint directory.
    Usage: twn train-gate DATA --checkpoint RUN -o RUN2 [--think-budget F | --target best].
    """
    _not_built("train-gate")


@app.command("train-rl", context_settings=PASS_THROUGH)
def train_rl(ctx: typer.Context):
    """Improve the reasoning adapter with GRPO, rewarded in the embedding space against a global negatives cache.

    For each query, G sampled CoTs are embedded; the reward compares each to the positive against the
    cache's negatives. Group-normalised advantages, clipped ratios, KL to the pre-RL adapter; only the
    reasoning adapter changes. Writes a checkpoint directory.
    Usage: twn train-rl DATA --checkpoint RUN --negatives-cache cache.pt -o RUN2.
    """
    _not_built("train-rl")


@app.command(context_settings=PASS_THROUGH)
def route(ctx: typer.Context):
    """Gate decisions only: prefill each input and report p_think and think, without decoding anything.

    Reads inputs like `twn embed`; writes JSONL (id, p_think, think) to stdout or a file.
    Usage: twn route INPUTS --checkpoint RUN [--threshold T] [-o FILE].
    """
    _not_built("route")


@app.command(name="eval", context_settings=PASS_THROUGH)
def evaluate(ctx: typer.Context):
    """MMEB-style evaluation in modes never / always / adaptive, or a sweep of gate thresholds.

    Hit@k, NDCG@k, MRR and Recall@k per task, meta-task, modality and overall, with think rate, reasoning
    tokens and throughput. Writes report.json, report.md, predictions.jsonl and a quality-vs-tokens plot.
    Usage: twn eval DATA --checkpoint RUN -o REPORT_DIR --mode never|always|adaptive|sweep.
    """
    _not_built("eval")
