"""From per-query results to task, meta-task, modality and overall numbers, the MMEB-V2 way.

A task's metrics are means over its queries. A meta-task's and a modality's metrics are means over their
tasks (not their queries), and overall is the mean over all tasks, so a big task weighs as much as a small
one. The headline score of a task is its modality's metric: Hit@1 for image and video, NDCG@5 for visual
documents. Cost (think rate, reasoning tokens per query, seconds, inputs per second) is pooled over the
queries and inputs of a group instead: it is what the group costs to run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from twn_cli.data.mmeb_v2_tasks import HEADLINE_METRIC
from twn_cli.eval.metrics import METRICS


@dataclass
class TaskCost:
    """What embedding one task cost under one thinking policy."""

    queries: int
    thought: int
    reasoning_tokens: int
    inputs: int  # queries and candidates embedded
    seconds: float

    def __add__(self, other: TaskCost) -> TaskCost:
        return TaskCost(*(getattr(self, name) + getattr(other, name) for name in self.__dataclass_fields__))

    def summary(self) -> dict:
        return {
            "queries": self.queries,
            "think_rate": self.thought / self.queries if self.queries else 0.0,
            "reasoning_tokens_per_query": self.reasoning_tokens / self.queries if self.queries else 0.0,
            "inputs": self.inputs,
            "wall_seconds": self.seconds,
            "inputs_per_second": self.inputs / self.seconds if self.seconds > 0 else None,
        }


def task_summary(meta_task: str, modality: str, per_query: Sequence[Mapping[str, float]], cost: TaskCost) -> dict:
    """One task's entry: means of every metric over its queries, its headline score, and its cost."""
    metrics = mean_metrics(per_query)
    return {
        "meta_task": meta_task,
        "modality": modality,
        "score": metrics[HEADLINE_METRIC[modality]],
        "metrics": metrics,
        **cost.summary(),
    }


def aggregate(tasks: Mapping[str, dict], costs: Mapping[str, TaskCost]) -> dict:
    """Per meta-task, per modality and overall entries from task entries (see `task_summary`)."""

    def group(names: list[str]) -> dict:
        total = sum((costs[name] for name in names), TaskCost(0, 0, 0, 0, 0.0))
        return {
            "tasks": len(names),
            "score": _mean([tasks[name]["score"] for name in names]),
            "metrics": mean_metrics([tasks[name]["metrics"] for name in names]),
            **total.summary(),
        }

    meta_tasks: dict[str, list[str]] = {}
    modalities: dict[str, list[str]] = {}
    for name, task in tasks.items():
        meta_tasks.setdefault(task["meta_task"], []).append(name)
        modalities.setdefault(task["modality"], []).append(name)
    return {
        "overall": group(list(tasks)),
        "modalities": {
            modality: {"headline_metric": HEADLINE_METRIC[modality], **group(names)} for modality, names in modalities.items()
        },
        "meta_tasks": {
            meta_task: {"modality": tasks[names[0]]["modality"], **group(names)} for meta_task, names in meta_tasks.items()
        },
    }


def mean_metrics(rows: Sequence[Mapping[str, float]]) -> dict[str, float]:
    return {name: _mean([row[name] for row in rows]) for name in METRICS}


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0
