"""`twn toy-backbone` and `twn prepare`: the offline toy backbone, and datasets prepared for every stage."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from twn_cli.cli.common import (
    app,
    progress_bar,
    setup_logging,
    stderr_console,
    user_errors,
)
from twn_cli.errors import TWNError


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
    setup_logging(verbose)
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
            with progress_bar(
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
    rl_size: int = typer.Option(0, min=0, help="synthetic: queries of an `rl` split drawn like train that train-embed never reads (train-rl's queries; 0: none)."),
    lazy_teacher_share: float = typer.Option(0.0, min=0.0, max=1.0, help="synthetic: share of train's clue queries whose teacher CoT resolves nothing (an imperfect teacher, for RL to improve on; 0: none)."),
    near_miss_teacher_share: float = typer.Option(0.0, min=0.0, max=1.0, help="synthetic: share of train's clue queries whose teacher CoT is a near miss, as a real teacher errs: it resolves a clue to the hard negative's value (a question: reads the picture wrong and answers with it; for RL to improve on; 0: none)."),
    validation_size: int | None = typer.Option(None, min=1, help="synthetic: validation queries instead of its 10 % share of --n, drawn in blocks the size of test, each with pools of its own (train and test stay as they are): what train-gate learns and chooses τ on."),
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
    setup_logging(verbose)
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

        write_synthetic_dataset(output, n=n, seed=seed, image_size=image_size or PICTURE_SIZE, validation_size=validation_size, rl_size=rl_size, lazy_teacher_share=lazy_teacher_share, near_miss_teacher_share=near_miss_teacher_share)
        _print_prepared_summary(output)
        return
    with progress_bar(
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
    with progress_bar(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn()) as progress:
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
    stderr_console().print(table)
    print(dataset_dir)
