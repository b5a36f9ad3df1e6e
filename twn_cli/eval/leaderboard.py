"""The MMEB-V2 leaderboard table of an eval report, from the task registry.

One row per thinking policy (a sweep's never, chosen adaptive point and always; otherwise the evaluated
mode), with its reasoning tokens and think rate per query. Columns as the leaderboard shows them: overall,
image, video and visual documents, then the meta-task columns (image CLS / QA / RET / VG, video CLS / QA /
RET / MRET) and the visual-document families (ViDoRe-V1, ViDoRe-V2, VisRAG, VisDoc-OOD). Every column is
the mean of its tasks' headline scores (Hit@1 for image and video, NDCG@5 for visual documents), as the
leaderboard averages them, and says how many of its registry tasks it averages: a column of 30 of 36 tasks
is not the leaderboard's number, and the table says which tasks were not evaluated and why.
"""

from __future__ import annotations

from collections.abc import Mapping

from twn_cli.data.mmeb_v2_tasks import GROUPS, MODALITIES, MODALITY_LABELS, TASKS, MMEBTask


def _columns() -> dict[str, list[MMEBTask]]:
    columns = {"Overall": list(TASKS)}
    columns.update({MODALITY_LABELS[m]: [task for task in TASKS if task.modality == m] for m in MODALITIES})
    columns.update({group: [task for task in TASKS if task.column == group] for group in GROUPS})
    return columns


def leaderboard(report: Mapping) -> dict:
    """The leaderboard entry of report.json: columns (with the tasks each averages), one row per policy."""
    evaluated = set(report["result"]["tasks"])
    benchmark = report["dataset"].get("benchmark") or {}
    missing = [name for name in benchmark.get("missing", []) if name not in evaluated]
    columns = _columns()
    return {
        "benchmark": benchmark.get("name"),
        "columns": {
            name: {"tasks": sum(task.name in evaluated for task in tasks), "of": len(tasks)}
            for name, tasks in columns.items()
        },
        "rows": [_row(point, columns) for point in _policies(report)],
        "complete": len(evaluated) == len(TASKS),
        "not_evaluated": {
            "missing_from_root": missing,
            "not_selected": [task.name for task in TASKS if task.name not in evaluated and task.name not in missing],
        },
    }


def _policies(report: Mapping) -> list[Mapping]:
    sweep = report.get("sweep")
    if not sweep:
        return [report["result"]]
    by_mode = {point["mode"]: point for point in sweep if point["mode"] != "adaptive"}
    return [by_mode["never"], report["result"], by_mode["always"]]


def _row(point: Mapping, columns: Mapping[str, list[MMEBTask]]) -> dict:
    scores = {}
    for name, tasks in columns.items():
        values = [point["tasks"][task.name]["score"] for task in tasks if task.name in point["tasks"]]
        scores[name] = sum(values) / len(values) if values else None
    return {
        "label": point["label"],
        "mode": point["mode"],
        "threshold": point["threshold"],
        "think_rate": point["overall"]["think_rate"],
        "reasoning_tokens_per_query": point["overall"]["reasoning_tokens_per_query"],
        "scores": scores,
    }
