"""From embeddings to results: each task's rankings (`rank_task`), and every number of a thinking policy
(`policy_point`), its per-query predictions, and what routing buys (`routing_inputs_of`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from twn_cli.engine.gate import thinks
from twn_cli.eval.aggregate import HEADLINE_METRIC, TaskCost, aggregate, task_summary
from twn_cli.eval.cache import EmbeddingTable
from twn_cli.eval.metrics import query_metrics, rank_in_chunks
from twn_cli.eval.routing import RoutingInputs, routing_inputs

# The default sweep's thresholds: these quantiles of the queries' p_think (think rates 90 %, 80 %, ..., one query).
SWEEP_QUANTILES = tuple(level / 10 for level in range(1, 11))


@dataclass
class EvalTask:
    """One task of the split, loaded: its query rows and the pool of each (an index into `pools`)."""

    name: str
    meta_task: str
    modality: str
    pool_kind: str
    queries: list[dict]
    pools: list[tuple[str, ...]]
    pool_of_query: list[int]

    @property
    def candidate_ids(self) -> list[str]:
        return list(dict.fromkeys(candidate for pool in self.pools for candidate in pool))


@dataclass
class TaskResult:
    """What the report needs of a finished task; its rows and embeddings are dropped, so memory does not grow
    with the number of tasks. `ranked[view][row]` holds a query's top-k ids and scores, gold ranks, metrics."""

    name: str
    meta_task: str
    modality: str
    pool_kind: str
    query_ids: list[str]
    # The dataset's analysis tag per query ("" where it has none): the report breaks results down by it.
    difficulties: list[str]
    golds: list[tuple[list[str], list[float]]]
    candidates: int
    candidate_seconds: float
    p_think: torch.Tensor
    reasoning_tokens: torch.Tensor
    cot: list[str]
    query_seconds: dict[str, torch.Tensor]
    ranked: dict[str, dict[int, dict]]


def rank_task(
    task: EvalTask, candidates: EmbeddingTable, queries: EmbeddingTable, rows_by_view, chunk_size, device
) -> TaskResult:
    candidate_index = {candidate_id: index for index, candidate_id in enumerate(candidates.ids)}
    golds = [golds_of(query) for query in task.queries]
    ranked: dict[str, dict[int, dict]] = {}
    for view, rows in rows_by_view.items():
        ranked[view] = {}
        by_pool: dict[int, list[int]] = {}
        for row in rows:
            by_pool.setdefault(task.pool_of_query[row], []).append(row)
        for pool_number, members in by_pool.items():
            pool_ids = task.pools[pool_number]
            position_of = {candidate_id: position for position, candidate_id in enumerate(pool_ids)}
            whole = len(pool_ids) == len(candidates.ids) and list(pool_ids) == candidates.ids
            pool = None if whole else torch.tensor([candidate_index[c] for c in pool_ids], dtype=torch.long)
            # Pool position -> relevance of the golds in the pool; a gold outside it can only be a miss.
            positions = [
                {position_of[g]: r for g, r in zip(*golds[row]) if g in position_of and r > 0} for row in members
            ]
            rankings = rank_in_chunks(
                queries.embeddings[view][members], candidates.embeddings["no_think"], positions,
                pool=pool, chunk_size=chunk_size, device=device,
            )
            for row, gold_positions, ranking in zip(members, positions, rankings):
                rank_of = dict(zip(gold_positions, ranking.gold_ranks))
                gold_ids, relevance = golds[row]
                ranks = [rank_of.get(position_of.get(gold_id, -1)) for gold_id in gold_ids]
                ranked[view][row] = {
                    "top_ids": [pool_ids[position] for position in ranking.top_positions],
                    "top_scores": ranking.top_scores,
                    "gold_ranks": ranks,
                    "metrics": query_metrics(ranks, relevance),
                }
    return TaskResult(
        name=task.name,
        meta_task=task.meta_task,
        modality=task.modality,
        pool_kind=task.pool_kind,
        query_ids=queries.ids,
        difficulties=[query.get("difficulty") or "" for query in task.queries],
        golds=golds,
        candidates=len(candidates.ids),
        candidate_seconds=float(candidates.seconds["no_think"].sum()),
        p_think=queries.p_think,
        reasoning_tokens=queries.reasoning_tokens,
        cot=queries.cot,
        query_seconds=queries.seconds,
        ranked=ranked,
    )


def golds_of(query: Mapping) -> tuple[list[str], list[float]]:
    """A query's gold ids and relevances, a gold listed twice counted once."""
    relevance = {}
    for gold_id, value in zip(query["positive_ids"], query["positive_relevance"]):
        relevance.setdefault(gold_id, float(value))
    return list(relevance), list(relevance.values())


# ------------------------------------------------------------------------------------------- points
def chosen_views(result: TaskResult, mode: str, threshold: float | None) -> list[str]:
    count = len(result.query_ids)
    if mode == "never":
        return ["no_think"] * count
    if mode == "always":
        return ["think"] * count
    return ["think" if thinking else "no_think" for thinking in thinks(result.p_think, threshold).tolist()]


def policy_point(results: Mapping[str, TaskResult], mode: str, threshold: float | None) -> dict:
    """Every number of one thinking policy: per task, per meta-task, per modality and overall."""
    tasks, costs, by_difficulty = {}, {}, {}
    for name, result in results.items():
        views = chosen_views(result, mode, threshold)
        for row, (view, difficulty) in enumerate(zip(views, result.difficulties)):
            if difficulty:
                group = by_difficulty.setdefault(difficulty, {"queries": 0, "hit@1": 0.0, "think_rate": 0.0})
                group["queries"] += 1
                group["hit@1"] += result.ranked[view][row]["metrics"]["hit@1"]
                group["think_rate"] += view == "think"
        thinking = [row for row, view in enumerate(views) if view == "think"]
        costs[name] = TaskCost(
            queries=len(views),
            thought=len(thinking),
            reasoning_tokens=int(result.reasoning_tokens[thinking].sum()) if thinking else 0,
            inputs=len(views) + result.candidates,
            seconds=result.candidate_seconds + sum(float(result.query_seconds[view][row]) for row, view in enumerate(views)),
        )
        per_query = [result.ranked[view][row]["metrics"] for row, view in enumerate(views)]
        tasks[name] = {
            **task_summary(result.meta_task, result.modality, per_query, costs[name]),
            "pool": result.pool_kind,
            "candidates": result.candidates,
        }
    for group in by_difficulty.values():
        group["hit@1"] /= group["queries"]
        group["think_rate"] /= group["queries"]
    label = mode if threshold is None else f"adaptive τ={threshold:.4g}"
    return {
        "label": label, "mode": mode, "threshold": threshold, **aggregate(tasks, costs), "tasks": tasks,
        # Hit@1 pooled over the queries of each difficulty tag (an analysis tag, e.g. the toy world's).
        "by_difficulty": dict(sorted(by_difficulty.items())),
    }


def routing_inputs_of(results: Mapping[str, TaskResult]) -> RoutingInputs:
    """Each query's headline score in both views and its CoT's tokens, per task (a sweep ranks both views)."""
    per_task, tags = {}, []
    for name, result in results.items():
        metric = HEADLINE_METRIC[result.modality]
        rows = range(len(result.query_ids))
        per_task[name] = (
            [result.ranked["no_think"][row]["metrics"][metric] for row in rows],
            [result.ranked["think"][row]["metrics"][metric] for row in rows],
            result.reasoning_tokens.tolist(),
        )
        tags += result.difficulties
    return routing_inputs(per_task, tags)


def think_tasks_of(manifest: dict | None) -> list[str] | None:
    """The tasks in which thinking beat not thinking on train-gate's validation (None: not recorded)."""
    validation = ((manifest or {}).get("gate") or {}).get("validation") or {}
    return validation.get("think_tasks")


def default_thresholds(results: Mapping[str, TaskResult]) -> list[float]:
    p_think = torch.cat([result.p_think for result in results.values()]).double()
    return sorted({float(value) for value in torch.quantile(p_think, torch.tensor(SWEEP_QUANTILES, dtype=torch.double))})


def predictions(results: Mapping[str, TaskResult], point: dict) -> list[dict]:
    records = []
    for name, result in results.items():
        for row, view in enumerate(chosen_views(result, point["mode"], point["threshold"])):
            ranked = result.ranked[view][row]
            gold_ids, relevance = result.golds[row]
            thinks = view == "think"
            records.append(
                {
                    "task": name,
                    "query_id": result.query_ids[row],
                    "gold_ids": gold_ids,
                    "gold_relevance": relevance,
                    "gold_ranks": ranked["gold_ranks"],
                    "top_ids": ranked["top_ids"],
                    "top_scores": [round(score, 6) for score in ranked["top_scores"]],
                    "think": thinks,
                    "p_think": round(float(result.p_think[row]), 6),
                    "reasoning_tokens": int(result.reasoning_tokens[row]) if thinks else 0,
                    "cot": result.cot[row] if thinks else "",
                }
            )
    return records
