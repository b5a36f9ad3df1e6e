"""`twn embed`, `twn route` and `twn eval`: what a trained model gives."""

from __future__ import annotations

import enum
import functools
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from twn_cli.engine.factory import LoadOptions

from twn_cli.cli.common import (
    ANY_BACKBONE,
    FRAMES,
    MAX_TEXT,
    VERBOSE,
    ThinkOption,
    app,
    load_model_or_fresh,
    progress_bar,
    setup_logging,
    user_errors,
    version,
    with_load_options,
)
from twn_cli.errors import TWNError


class EvalMode(str, enum.Enum):
    never = "never"
    always = "always"
    adaptive = "adaptive"
    sweep = "sweep"


# ------------------------------------------------------------------------------------------------------- embed
@app.command()
@user_errors
@with_load_options
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
    verbose: bool = VERBOSE,
    *,
    options: LoadOptions,
):
    """Embed images, texts or both with the shared-prefill dual-LoRA model.

    Writes one vector per input with its id, whether it thought, its CoT and reasoning-token count. File
    outputs also record the checkpoint, the think mode and that vectors are L2-normalised, and are written
    atomically; with `-o -` (default) JSONL records stream to stdout. Prints the path written. A .parquet
    output keeps an interrupted run's finished row groups, and --resume continues after them.
    Under torchrun / accelerate launch each process embeds its share of the batches and the first one
    writes every input in input order, to a file or to stdout; inputs cannot then come from stdin.
    """
    setup_logging(verbose)
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
    model = load_model_or_fresh(checkpoint, backbone, options, uses_gate=mode == "auto", seed=seed)
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
        "dtype": options.dtype,
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
        "twn_version": version(),
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
    with progress_bar(
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
        f"{len(summary.skipped)} skipped{texts_cut(summary.truncated)}) in {time.perf_counter() - started:.1f} s",
        file=sys.stderr,
    )
    if writer.path is not None:
        print(writer.path)


def texts_cut(count: int) -> str:
    """The summary line's count of texts cut to fit the backbone's positions, when there were any."""
    return f", {count} {'text' if count == 1 else 'texts'} cut to fit" if count else ""


# ------------------------------------------------------------------------------------------------------- route
@app.command()
@user_errors
@with_load_options
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
    verbose: bool = VERBOSE,
    *,
    options: LoadOptions,
):
    """Gate decisions only: prefill each input and report p_think and think, without decoding anything.

    Writes one JSON line per input, {"id", "p_think", "think"}, streamed to stdout (or written atomically
    to -o FILE), so it pipes into jq. It costs one prefill per input: no CoT, no query pass.
    """
    setup_logging(verbose)
    from twn_cli.atomic import atomic_file
    from twn_cli.data.inputs import check_output_is_not_input, read_inputs
    from twn_cli.stages.route import run_route

    check_output_is_not_input(output, inputs)
    records = read_inputs(inputs, frames=frames)
    model = load_model_or_fresh(checkpoint, backbone, options, uses_gate=True)
    model.prompts.user_text.max_tokens = max_text_tokens
    threshold = model.config.gate_threshold if threshold is None else threshold
    route_into = functools.partial(run_route, model, records, threshold=threshold, batch_size=batch_size, skip_bad=skip_bad)
    if output == "-":
        routed, thinking, skipped = route_into(sys.stdout)
    else:
        with atomic_file(output) as staging, open(staging, "w", encoding="utf-8") as stream:
            routed, thinking, skipped = route_into(stream)
        print(output)
    print(f"routed {routed} inputs: {thinking} think at threshold {threshold} ({len(skipped)} skipped{texts_cut(model.prompts.user_text.truncated)})",
          file=sys.stderr)


# -------------------------------------------------------------------------------------------------------- eval
@app.command(name="eval")
@user_errors
@with_load_options
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
    verbose: bool = VERBOSE,
    *,
    options: LoadOptions,
):
    """MMEB-style evaluation: never / always / adaptive thinking, or a sweep of gate thresholds.

    Per task Hit@1/5/10, NDCG@5/10, MRR and Recall@k, aggregated per meta-task, modality and overall the
    MMEB-V2 way (Hit@1 for image and video, NDCG@5 for visual documents), with think rate, reasoning tokens
    per query and throughput. Embeddings are cached per task in the report directory, so an interrupted
    evaluation resumes. CoTs are decoded greedily. Prints the report directory. Under torchrun /
    accelerate launch each process embeds its share of the batches and the first writes the report.
    """
    setup_logging(verbose)
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
    model = load_model_or_fresh(checkpoint, backbone, options, uses_gate=mode in (EvalMode.adaptive, EvalMode.sweep))
    if max_think_tokens is not None:
        model.config.max_think_tokens = max_think_tokens
    model.prompts.user_text.max_tokens = max_text_tokens
    with progress_bar(
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
