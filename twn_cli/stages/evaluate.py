"""The `eval` stage: MMEB-style evaluation of a TWN model on a prepared eval set.

Per task: embed the candidates (never thinking) and the queries in the views the mode needs, rank every
query against its pool (its own `candidate_ids`, or the task's global pool), score the ranking; then
aggregate per meta-task, modality and overall (twn_cli/eval/aggregate.py). Modes:

- never / always: every query without / with a CoT;
- adaptive: the gate decides per query (p_think >= threshold, by default the model's);
- sweep: never, always, and adaptive at a range of thresholds. p_think comes from the prefill and does
  not depend on the threshold, so every point is answered from each query's two embeddings (no-think and
  think): a sweep embeds each query twice, never once per threshold.

Outputs in REPORT_DIR: report.json, report.md, predictions.jsonl (the chosen point: the mode, or for a
sweep the adaptive point at the threshold), quality_vs_tokens.png, and cache/ (twn_cli/eval/cache.py),
from which an interrupted run resumes. Each point also holds Hit@1 and think rate per difficulty tag, where
the queries have one (an analysis tag, e.g. the toy world's).

Wall time is embedding time (image loading included, ranking excluded), measured per batch and shared
equally by the batch's rows. A point's time is the sum over its inputs of the view it uses, so the
points of a sweep, and an adaptive run that reuses cached views, report what that policy costs to run.

Under several processes (torchrun / accelerate launch) each one embeds its share of every pass's batches
(twn_cli/distributed.py) and all of them receive every batch, so each holds the whole cache and computes
the same report; only the first writes the cache and the report. Batches are timed in the process that
embeds them, so seconds are process-seconds (the time of one process) and `run.seconds` the wall time.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from twn_cli.atomic import atomic_file, write_text_atomically
from twn_cli.data.prepared import PreparedDataset, load_prepared, prepared_input
from twn_cli.distributed import Distributed, batched
from twn_cli.engine.batching import block_size, embed_block
from twn_cli.engine.gate import thinks
from twn_cli.engine.model import EmbedResult, TWNModel
from twn_cli.errors import TWNError
from twn_cli.eval.aggregate import HEADLINE_METRIC
from twn_cli.eval.cache import EmbeddingTable, model_key, task_cache_dir
from twn_cli.eval.leaderboard import leaderboard
from twn_cli.eval.metrics import TOP_K
from twn_cli.eval.plot import plot_quality_vs_tokens
from twn_cli.eval.report import markdown_report
from twn_cli.eval.results import EvalTask, TaskResult, default_thresholds, policy_point, predictions, rank_task, routing_inputs_of, think_tasks_of
from twn_cli.eval.routing import routing_report
from twn_cli.types import ModelInput

MODES = ("never", "always", "adaptive", "sweep")
REPORT_FORMAT = "twn-eval-report"
REPORT_VERSION = 1
REPORT_FILES = ("report.json", "report.md", "predictions.jsonl", "quality_vs_tokens.png")
CACHE_DIR = "cache"
# Save a table being filled at most this often, and never more than a tenth of the time spent embedding.
SAVE_EVERY_SECONDS = 60.0
TIE_RULE = "ties count against the gold: score desc, then relevance asc, then pool order"


@dataclass
class EvalProgress:
    """Where an evaluation is: `step` is 'candidates', 'queries: never|always|auto' or 'done' (task finished)."""

    task: str
    task_number: int
    tasks: int
    step: str
    done: int
    total: int


def run_eval(
    model: TWNModel,
    dataset_dir: str | Path,
    report_dir: str | Path,
    *,
    mode: str,
    split: str = "test",
    threshold: float | None = None,
    thresholds: Sequence[float] | None = None,
    batch_size: int = 16,
    rank_chunk_size: int = 8192,
    command: str | None = None,
    progress: Callable[[EvalProgress], None] | None = None,
) -> dict:
    """Evaluate `model` on `split` of the prepared dataset and write the report to `report_dir`; returns report.json's content.

    `threshold` is the gate threshold of the adaptive point (default: the model's); `thresholds` replaces
    the sweep's default grid (quantiles of p_think). Embeddings already in `report_dir/cache` are reused.
    Under several processes every one returns the report and the first writes it.
    """
    if mode not in MODES:
        raise TWNError(f"mode must be one of {', '.join(MODES)}, not '{mode}'")
    report_dir = Path(report_dir)
    _check_report_dir(report_dir)
    dataset = load_prepared(dataset_dir)
    if split not in dataset.queries:
        raise TWNError(f"prepared dataset '{dataset_dir}' has no split '{split}' (it has {', '.join(dataset.queries)})")
    tau = model.config.gate_threshold if threshold is None else threshold
    if not all(math.isfinite(value) for value in [tau, *(thresholds or [])]):
        raise TWNError("gate thresholds must be finite numbers")
    rows_by_task = _rows_by_task(dataset, split)
    if not rows_by_task:
        raise TWNError(f"split '{split}' of '{dataset_dir}' has no queries")
    key = {
        "model": model_key(model),
        "dataset": {"path": str(dataset.path.resolve()), "created": dataset.manifest.get("created"), "split": split},
    }
    distributed = Distributed()
    started = time.perf_counter()
    candidate_index = {candidate_id: index for index, candidate_id in enumerate(dataset.candidates["id"])}
    results: dict[str, TaskResult] = {}
    from_cache: list[str] = []
    notify = progress or (lambda event: None)
    for number, (name, rows) in enumerate(rows_by_task.items(), start=1):
        def report_step(step: str, done: int, total: int, name=name, number=number) -> None:
            notify(EvalProgress(name, number, len(rows_by_task), step, done, total))

        task = load_task(dataset, split, name, rows)
        candidates, queries, embedded = _embed_task(
            model, dataset, candidate_index, task, report_dir / CACHE_DIR, key, mode, tau, batch_size, report_step, distributed
        )
        results[name] = rank_task(task, candidates, queries, views_needed(mode, tau, queries), rank_chunk_size, model.device)
        if not embedded:
            from_cache.append(name)
        report_step("done", len(rows), len(rows))

    sweep = None
    if mode == "sweep":
        grid = list(thresholds) if thresholds is not None else default_thresholds(results)
        grid = sorted({*grid, tau}, reverse=True)
        adaptive_points = [policy_point(results, "adaptive", t) for t in grid]
        sweep = [policy_point(results, "never", None), *adaptive_points, policy_point(results, "always", None)]
        chosen = next(point for point in sweep if point["mode"] == "adaptive" and point["threshold"] == tau)
    else:
        chosen = policy_point(results, mode, tau if mode == "adaptive" else None)

    report = {
        "format": REPORT_FORMAT,
        "format_version": REPORT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": command,
        "mode": mode,
        "threshold": tau if mode in ("adaptive", "sweep") else None,
        "dataset": {
            "path": str(dataset.path),
            "split": split,
            "source": dataset.manifest.get("source"),
            "created": dataset.manifest.get("created"),
            "tasks": {name: dataset.manifest["tasks"].get(name) for name in rows_by_task},
            "benchmark": dataset.manifest.get("benchmark"),
        },
        "checkpoint": model.manifest,
        "model": model.config.to_dict(),
        "settings": {
            "batch_size": batch_size,
            "rank_chunk_size": rank_chunk_size,
            "top_k": TOP_K,
            "cot_decoding": "greedy",
            "tie_rule": TIE_RULE,
            "thresholds": [point["threshold"] for point in sweep if point["mode"] == "adaptive"] if sweep else None,
        },
        "headline_metric": HEADLINE_METRIC,
        "result": chosen,
        "sweep": sweep,
        "run": {
            "seconds": time.perf_counter() - started, "processes": distributed.world_size, "tasks_from_cache": from_cache,
            # Texts cut to fit the backbone's positions (or --max-text-tokens) by the processes, in this run.
            "truncated_texts": sum(distributed.gather_objects([model.prompts.user_text.truncated])),
        },
    }
    if report["dataset"]["benchmark"]:
        report["leaderboard"] = leaderboard(report)
    if sweep:
        report["routing"] = routing_report(routing_inputs_of(results), sweep, tau, think_tasks_of(model.manifest))
    if distributed.is_main:
        _write_outputs(report_dir, report, predictions(results, chosen))
    return report


def _rows_by_task(dataset: PreparedDataset, split: str) -> dict[str, list[int]]:
    """The split's row numbers per task, tasks in order of first appearance (reads only the task column)."""
    rows: dict[str, list[int]] = {}
    for row, name in enumerate(dataset.queries[split]["task"]):
        rows.setdefault(name, []).append(row)
    return rows


def load_task(dataset: PreparedDataset, split: str, name: str, rows: list[int]) -> EvalTask:
    """Task `name` (its `rows` of the split) with its queries grouped by pool."""
    queries = list(dataset.queries[split].select(rows))
    pool_kind = dataset.manifest["tasks"].get(name, {}).get("pool", "per_query")
    task = EvalTask(name, queries[0]["meta_task"], queries[0]["modality"], pool_kind, queries, [], [])
    pool_numbers: dict[tuple[str, ...] | None, int] = {}
    for query in queries:
        # The global pool is one shared list: key it once instead of hashing its ids for every query.
        pool_key = tuple(dict.fromkeys(query["candidate_ids"])) if query["candidate_ids"] else None
        if pool_key not in pool_numbers:
            pool_numbers[pool_key] = len(task.pools)
            task.pools.append(pool_key if pool_key is not None else tuple(dataset.candidate_pool(query)))
        task.pool_of_query.append(pool_numbers[pool_key])
    if any(not pool for pool in task.pools):
        raise TWNError(f"task '{name}' has a query with an empty candidate pool")
    return task


# ------------------------------------------------------------------------------------------- embedding
def _embed_task(
    model, dataset, candidate_index, task, cache_root, key, mode, tau, batch_size, report_step, distributed
) -> tuple[EmbeddingTable, EmbeddingTable, bool]:
    """The task's candidate and query embeddings, from its cache where present; and whether any were computed.

    Every process reads the cache here, before the first gathered batch: the first process saves it only
    after one, so all of them start from the same table and agree on the rows still missing.
    """
    folder = task_cache_dir(cache_root, task.name)
    task_key = {**key, "task": task.name}
    candidate_ids = task.candidate_ids
    candidates = EmbeddingTable.load_or_new(
        folder / "candidates.safetensors", candidate_ids, model.embedding_dim, task_key, views=("no_think",)
    )
    queries = EmbeddingTable.load_or_new(
        folder / "queries.safetensors", [row["id"] for row in task.queries], model.embedding_dim, task_key
    )

    def candidate_input(row: int) -> ModelInput:
        return prepared_input(dataset.candidates[candidate_index[candidate_ids[row]]])

    def query_input(row: int) -> ModelInput:
        return prepared_input(task.queries[row])

    embedded = False

    def fill(table, path, rows, think, input_of, step):
        nonlocal embedded
        if rows:
            embedded = True
            with _saved(table, path, distributed.is_main) as checkpoint:
                def on_batch(done: int) -> None:
                    report_step(step, done, len(rows))

                _embed_rows(model, table, rows, think, tau, input_of, batch_size, on_batch, checkpoint, distributed)

    fill(candidates, folder / "candidates.safetensors", candidates.missing("no_think"), "never", candidate_input, "candidates")
    query_path = folder / "queries.safetensors"
    if mode in ("never", "sweep"):
        fill(queries, query_path, queries.missing("no_think"), "never", query_input, "queries: never")
    if mode in ("always", "sweep"):
        fill(queries, query_path, queries.missing("think"), "always", query_input, "queries: always")
    if mode == "adaptive":
        undecided = torch.isnan(queries.p_think).nonzero().flatten().tolist()
        fill(queries, query_path, undecided, "auto", query_input, "queries: auto")
        # Rows whose p_think came from the cache may lack the view this threshold picks for them.
        for view, think in (("think", "always"), ("no_think", "never")):
            wanted = set(views_needed(mode, tau, queries)[view])
            missing = [row for row in queries.missing(view) if row in wanted]
            fill(queries, query_path, missing, think, query_input, f"queries: {think}")
    return candidates, queries, embedded


def _embed_rows(model, table, rows, think, tau, input_of, batch_size, on_batch, checkpoint, distributed) -> None:
    def load(batch: tuple[int, ...]) -> tuple[tuple[int, ...], list[ModelInput]]:
        return batch, [input_of(row) for row in batch]

    def embed(loaded: tuple[tuple[int, ...], list[ModelInput]]) -> tuple[tuple[int, ...], EmbedResult]:
        batch, inputs = loaded
        result = embed_block(model, inputs, think, batch_size, threshold=tau)
        # On the CPU: results cross processes, and the table keeps them there anyway.
        return batch, dataclasses.replace(result, embeddings=result.embeddings.cpu(), think=result.think.cpu(), p_think=result.p_think.cpu())

    done = 0
    # Each block is charged the wall time since the previous one arrived (images are opened ahead, in a
    # thread, so timing the work alone would leave their reading out); saving the table is not charged.
    since = time.perf_counter()
    for batch, result in distributed.map_in_order(embed, batched(rows, block_size(batch_size)), prepare=load):
        table.record(batch, ["think" if flag else "no_think" for flag in result.think.tolist()], result, time.perf_counter() - since)
        done += len(batch)
        on_batch(done)
        checkpoint()
        since = time.perf_counter()


@contextmanager
def _saved(table: EmbeddingTable, path: Path, writes: bool):
    """If `writes` (one process, or the first of several), save `table` when the block ends, however it
    ends, and now and then inside it (the yielded callable)."""
    last_save = time.perf_counter()
    save_cost = 0.0

    def checkpoint() -> None:
        nonlocal last_save, save_cost
        if not writes or time.perf_counter() - last_save < max(SAVE_EVERY_SECONDS, 10 * save_cost):
            return
        began = time.perf_counter()
        table.save(path)
        last_save = time.perf_counter()
        save_cost = last_save - began

    try:
        yield checkpoint
    finally:
        # Only finished batches are in the table, so an interrupted pass keeps everything it completed.
        if writes:
            table.save(path)


# ------------------------------------------------------------------------------------------- ranking
def views_needed(mode: str, tau: float, queries: EmbeddingTable) -> dict[str, list[int]]:
    """The query rows to rank in each view for `mode`."""
    every_row = list(range(len(queries.ids)))
    if mode == "never":
        return {"no_think": every_row}
    if mode == "always":
        return {"think": every_row}
    if mode == "sweep":
        return {"no_think": every_row, "think": every_row}
    thinking = thinks(queries.p_think, tau).tolist()
    return {
        "think": [row for row in every_row if thinking[row]],
        "no_think": [row for row in every_row if not thinking[row]],
    }


# ------------------------------------------------------------------------------------------- outputs
def _check_report_dir(report_dir: Path) -> None:
    if not report_dir.exists():
        return
    if not report_dir.is_dir():
        raise TWNError(f"report '{report_dir}' exists and is not a directory")
    ours = (report_dir / CACHE_DIR).is_dir() or (report_dir / "report.json").is_file()
    if any(report_dir.iterdir()) and not ours:
        raise TWNError(f"'{report_dir}' exists and is not an eval report; choose another -o or remove it")


def _write_outputs(report_dir: Path, report: dict, predictions: list[dict]) -> None:
    write_text_atomically(report_dir / "predictions.jsonl", "".join(json.dumps(record) + "\n" for record in predictions))
    write_text_atomically(report_dir / "report.md", markdown_report(report))
    with atomic_file(report_dir / "quality_vs_tokens.png") as staging:
        plot_quality_vs_tokens(report, staging)
    # Last, so a report.json always sits beside complete companions.
    write_text_atomically(report_dir / "report.json", json.dumps(report, indent=2) + "\n")


