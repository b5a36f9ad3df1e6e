"""`twn train-embed`, `twn train-gate` and `twn train-rl`: the three training stages."""

from __future__ import annotations

import enum
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from twn_cli.engine.factory import LoadOptions

from twn_cli.cli.common import (
    LOCAL_BACKBONE,
    VERBOSE,
    app,
    load_model_or_fresh,
    progress_bar,
    setup_logging,
    stderr_console,
    training_progress,
    user_errors,
    with_load_options,
)
from twn_cli.errors import TWNError


class GateTarget(str, enum.Enum):
    best = "best"
    within_noise = "within_noise"
    budget = "budget"


# ------------------------------------------------------------------------------------------------- train-embed
@app.command("train-embed")
@user_errors
@with_load_options
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
    verbose: bool = VERBOSE,
    *,
    options: LoadOptions,
):
    """Jointly train the reasoning adapter (SFT on teacher CoT) and the embedding adapter + queries (InfoNCE).

    Each query is trained in two views of one prefill, with its CoT and without; the embedding side reads
    the detached cache, so the contrastive loss never reaches the reasoning adapter. In-batch and hard
    negatives; a gradient cache makes a large contrastive batch fit in the memory of one chunk. Under
    torchrun / accelerate launch the batch is split over processes and negatives are gathered. States are
    saved every `checkpoint_every` steps (--resume continues exactly); a NaN loss stops with the last good
    state named. Prints the checkpoint (run) directory.
    """
    setup_logging(verbose)
    from rich.table import Table

    from twn_cli.data.prepared import load_prepared
    from twn_cli.distributed import Distributed, shard_language_model, start_process_group
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
    device = options.device
    if shard:  # a backbone to shard is loaded on the CPU first, so that no device ever holds all of it
        options.device = "cpu"
    dataset = load_prepared(data)
    model = load_model(checkpoint, backbone, config=None if checkpoint else config.model_config(), options=options)
    if shard:
        layers = shard_language_model(model, resolve_device(device))
        logging.info("sharded %d language-model layers over %d processes", layers, distributed.world_size)
    def status(metrics: dict) -> str:
        return (f"loss {metrics['loss']:.3f} (nce {metrics['contrastive_loss']:.3f}, sft {metrics['sft_loss']:.3f}) "
                f"lr {metrics['learning_rate']:.2e} {metrics['samples_per_second']:.1f} samples/s")

    with training_progress("train-embed", config.steps, status, shown=distributed.is_main) as show:
        summary = run_train_embed(model, dataset, output, config, resume=resume, on_step=show)
    if not distributed.is_main:
        return
    table = Table("", "value", title="train-embed")
    for key, value in summary.get("validation", {}).items():
        table.add_row(f"validation {key}", f"{value:.3f}")
    overhead = summary["parameters"]
    table.add_row("added parameters", f"{overhead['added']:,} ({overhead['added_percent']:.2f} % of the backbone)")
    stderr_console().print(table)
    print(output)


# -------------------------------------------------------------------------------------------------- train-gate
@app.command("train-gate")
@user_errors
@with_load_options
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
    verbose: bool = VERBOSE,
    *,
    options: LoadOptions,
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
    setup_logging(verbose)
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
    model = load_model_or_fresh(checkpoint, backbone, options)
    negatives = load_negatives_cache(negatives_cache, model.embedding_dim) if negatives_cache else None
    with progress_bar(
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
    table.add_row("labels", f"{summary['label']}: {labels['inputs']} {labels['split']} inputs, thinking helps {labels['think_helps']} ({labels['think_helps_rate']:.1%}) at δ = {summary['delta']:g}")
    table.add_row("mean margin change", f"{labels['mean_margin_change']:+.4f}")
    for name, rate in labels.get("think_helps_rate_by_difficulty", {}).items():
        table.add_row(f"  thinking helps, {name}", f"{rate:.1%}")
    heldout = "n/a (one class)" if scores["heldout"] is None else f"{scores['heldout']:.3f}"
    on = f"{scores['judged_inputs']} held-out inputs thinking helps or hurts" if summary["label"] == "expected_hit" else f"{scores['heldout_inputs']} held-out labels"
    table.add_row("gate AUROC", f"{heldout} on {on} ({scores['heldout_folds']}-fold)")
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
    stderr_console().print(table)
    print(output)


# ---------------------------------------------------------------------------------------------------- train-rl
@app.command("train-rl")
@user_errors
@with_load_options
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
    verbose: bool = VERBOSE,
    *,
    options: LoadOptions,
):
    """Improve the reasoning adapter with GRPO, rewarded in the embedding space against a global negatives cache.

    For each query, G sampled CoTs are embedded by the frozen embedding side; the reward compares each to
    the positive against the cache's negatives (hardest by similarity, plus random ones). Group-normalised
    advantages, a clipped surrogate with asymmetric ε, k3 KL to the pre-RL adapter; only the reasoning
    adapter changes. The cache is checked first (dimension, unique ids, finite values; .pt only as plain
    tensors). At every checkpoint the held-out score is measured on validation queries (the reward, and
    always-think Hit@1 against their own pools with `heldout_hit_queries`); the checkpoint keeps the
    adapter of the best-scoring step, the pre-RL one if none beat it. States every `checkpoint_every`
    steps (--resume continues exactly); a NaN loss stops with the last good state named. Under torchrun /
    accelerate launch each process samples its share of every step's queries and the gradients are
    summed. Prints the checkpoint (run) directory.
    Usage: twn train-rl DATA --checkpoint RUN --negatives-cache cache.pt -o RUN2.
    """
    setup_logging(verbose)

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
    model = load_model_or_fresh(checkpoint, backbone, options)
    cache = load_negatives_cache(negatives_cache, model.embedding_dim)
    def status(metrics: dict) -> str:
        return (f"reward {metrics['reward_mean']:.3f} ± {metrics['reward_spread']:.3f}, {metrics['zero_spread_groups']:.0%} groups without spread, "
                f"kl {metrics['kl']:.4f}, CoT {metrics['cot_tokens_mean']:.1f} tokens, {metrics['ended_share']:.0%} ended"
                + (f", held-out reward {metrics['heldout_reward']:.4f}" if "heldout_reward" in metrics else "")
                + (f", held-out Hit@1 {metrics['heldout_hit']:.1%}" if "heldout_hit" in metrics else ""))

    with training_progress("train-rl", config.steps, status, shown=distributed.is_main) as show:
        summary = run_train_rl(model, dataset, cache, output, config, resume=resume, on_step=show)
    if not distributed.is_main:
        return
    reward, hit, kept = summary["heldout_reward"], summary["heldout_hit"], summary["kept_best"]
    if reward:
        stderr_console().print(
            f"held-out reward ({reward['queries']} {reward['split']} queries): {reward['before']:.4f} before RL, {reward['after']:.4f} after"
        )
    if hit:
        stderr_console().print(
            f"held-out always-think Hit@1 ({hit['queries']} {hit['split']} queries): {hit['before']:.1%} before RL, {hit['after']:.1%} after"
        )
    if kept:
        stopped = f"stopped at step {kept['stopped_at_step']}: " if summary["steps"] < config.steps else ""
        stderr_console().print(
            f"{stopped}{kept['why']}; the checkpoint keeps the adapter of step {kept['step']}" + (" (the one before RL)" if kept["step"] == 0 else "")
        )
    print(output)
