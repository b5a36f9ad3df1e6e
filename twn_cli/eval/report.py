"""The tables of an eval report, rendered as markdown (report.md) or as rich tables (stderr).

Scores are shown x100 with one decimal, as MMEB-V2 reports them; report.json keeps fractions in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

from twn_cli.data.mmeb_v2_tasks import MODALITIES

TASK_METRICS = (
    ("Hit@1", "hit@1"), ("Hit@5", "hit@5"), ("Hit@10", "hit@10"), ("NDCG@5", "ndcg@5"), ("NDCG@10", "ndcg@10"),
    ("MRR", "mrr"), ("R@1", "recall@1"), ("R@5", "recall@5"), ("R@10", "recall@10"),
)

COMPACT_TASK_METRICS = ("hit@1", "hit@10", "ndcg@5", "mrr")
# Tasks named in the leaderboard's title before "and N more".
LISTED_TASKS = 8


@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]]


def report_tables(report: dict, compact: bool = False) -> list[Table]:
    """The overall, per-meta-task, per-task and (for a sweep) sweep tables; `compact` keeps terminal-sized columns."""
    result = report["result"]
    modalities = [m for m in MODALITIES if m in result["modalities"]] + sorted(set(result["modalities"]) - set(MODALITIES))
    cost_headers = ["think rate", "tokens/query", "seconds", "inputs/s"]
    tables = [_leaderboard_table(report["leaderboard"], compact)] if report.get("leaderboard") else []
    tables += [
        Table(
            f"Overall ({result['label']})",
            ["score", *(f"{m} ({report['headline_metric'][m]})" for m in modalities), "tasks", *cost_headers],
            [[_score(result["overall"]["score"]), *(_score(result["modalities"][m]["score"]) for m in modalities),
              str(result["overall"]["tasks"]), *_cost(result["overall"])]],
        ),
        Table(
            "Meta-tasks",
            ["meta-task", "modality", "tasks", "score", *cost_headers],
            [[name, group["modality"], str(group["tasks"]), _score(group["score"]), *_cost(group)]
             for name, group in result["meta_tasks"].items()],
        ),
        _task_table(result["tasks"], compact),
    ]
    if result.get("by_difficulty"):
        tables.append(_difficulty_table(report))
    if report.get("sweep"):
        tables.append(
            Table(
                "Sweep",
                ["point", "threshold", "think rate", "tokens/query", "overall", *modalities, "seconds"],
                [[point["mode"] + (" (chosen)" if is_chosen_point(point, report) else ""),
                  "-" if point["threshold"] is None else f"{point['threshold']:.4g}",
                  _rate(point["overall"]["think_rate"]), f"{point['overall']['reasoning_tokens_per_query']:.1f}",
                  _score(point["overall"]["score"]), *(_score(point["modalities"][m]["score"]) for m in modalities),
                  f"{point['overall']['wall_seconds']:.1f}"]
                 for point in report["sweep"]],
            )
        )
    if report.get("routing"):
        tables += _routing_tables(report["routing"])
    return tables


def _routing_tables(routing: dict) -> list[Table]:
    """The gate's sweep against random routing, and every routing's area above the random chord."""
    chord = "random (chord)"
    points = Table(
        "Routing: the gate's thresholds against random routing",
        ["threshold", "think rate", "share of always' tokens", "gate", "random at that think rate", f"{chord} at that share", "above the chord"],
        [[f"{entry['threshold']:.4g}", _rate(entry["think_rate"]), _rate(entry["token_share"]), _score(entry["score"]),
          _score(entry["random_at_think_rate"]), _score(entry["chord_at_token_share"]), "yes" if entry["above_chord"] else "no"]
         for entry in routing["gate"]["points"]],
    )
    rows = [["gate (the sweep)", "-", "-", "-", f"{100 * routing['gate']['area']:.2f}"]]
    oracle = routing["oracle"]
    rows.append(["per-input oracle (thinks where it helps)", _rate(oracle["think_rate"]), _rate(oracle["token_share"]), _score(oracle["score"]),
                 f"{100 * oracle['area']:.2f}"])
    if routing.get("kind_oracle"):
        kind = routing["kind_oracle"]
        rows.append(["kind oracle (whole kinds: task and tag, the best routing by kind)", "-", _rate(kind["token_share"]), _score(kind["score"]),
                     f"{100 * kind['area']:.2f}"])
    if routing["task_level"]:
        task = routing["task_level"]
        rows.append([f"task-level ({', '.join(task['tasks']) or 'no task'})", _rate(task["think_rate"]), _rate(task["token_share"]),
                     _score(task["score"]), f"{100 * task['area']:.2f}"])
    share = routing["gate"]["share_of_oracle_area"]
    title = "Routing: area above the random chord (score x100 over the token share)" + (
        f"; the gate has {share:.0%} of the oracle's" if share is not None else "")
    areas = Table(title, ["routing", "think rate", "share of always' tokens", "score", "area above the chord"], rows)
    return [points, areas]


def markdown_report(report: dict) -> str:
    dataset = report["dataset"]
    checkpoint = report["checkpoint"]
    if checkpoint is None:
        model = "a fresh, untrained TWN model (no checkpoint)"
    else:
        stages = ", ".join(stage["stage"] for stage in checkpoint.get("stages", [])) or "none"
        model = f"checkpoint on `{checkpoint['backbone']['source']}` (stages: {stages}; saved {checkpoint.get('saved')})"
    threshold = "" if report["threshold"] is None else f", gate threshold τ = {report['threshold']:.4g}"
    lines = [
        "# twn eval report",
        "",
        f"- dataset: `{dataset['path']}` (split `{dataset['split']}`, source `{dataset['source']}`)",
        f"- model: {model}",
        f"- mode: {report['mode']}{threshold}",
        f"- command: `{report['command']}`" if report["command"] else "- command: (called from Python)",
        f"- created: {report['created']}; this run took {report['run']['seconds']:.1f} s"
        + (f" ({len(report['run']['tasks_from_cache'])} tasks from the cache)" if report["run"]["tasks_from_cache"] else ""),
        "",
        "Scores x100. Headline: Hit@1 for image and video tasks, NDCG@5 for visual documents; meta-task, modality "
        "and overall scores are means over tasks. Ties count against the gold. Seconds are embedding time "
        "(candidates and queries, in the view each point uses); tokens/query are reasoning tokens per query.",
        "",
    ]
    for table in report_tables(report):
        lines += [f"## {table.title}", "", _markdown_row(table.headers), _markdown_row(["---"] * len(table.headers))]
        lines += [_markdown_row(row) for row in table.rows]
        lines.append("")
    lines += ["![overall score against reasoning tokens](quality_vs_tokens.png)", ""]
    return "\n".join(lines)


def print_tables(report: dict, console=None) -> None:
    """The report's tables as rich tables on `console` (default: stderr)."""
    from rich.console import Console
    from rich.table import Table as RichTable

    console = console or Console(stderr=True)
    for table in report_tables(report, compact=True):
        rich_table = RichTable(title=table.title, title_justify="left")
        for index, header in enumerate(table.headers):
            rich_table.add_column(header, justify="left" if index == 0 else "right")
        for row in table.rows:
            rich_table.add_row(*row)
        console.print(rich_table)


def _leaderboard_table(board: dict, compact: bool) -> Table:
    """The MMEB-V2 leaderboard row of each policy, each column's header saying how many tasks it averages;
    `compact` (a terminal) turns it so that the policies are the columns."""
    columns = board["columns"]
    title = f"MMEB-V2 leaderboard ({columns['Overall']['tasks']} of {columns['Overall']['of']} tasks"
    not_evaluated = board["not_evaluated"]
    for reason, names in (("missing from the root", not_evaluated["missing_from_root"]),
                          ("not selected", not_evaluated["not_selected"])):
        if names:
            more = f" and {len(names) - LISTED_TASKS} more" if len(names) > LISTED_TASKS else ""
            title += f"; {reason}: {', '.join(names[:LISTED_TASKS])}{more}"
    headers = ["tokens/query", "think rate", *(f"{name} ({c['tasks']}/{c['of']})" for name, c in columns.items())]
    rows = [[f"{row['reasoning_tokens_per_query']:.1f}", _rate(row["think_rate"]),
             *("-" if row["scores"][name] is None else _score(row["scores"][name]) for name in columns)]
            for row in board["rows"]]
    labels = [row["label"] for row in board["rows"]]
    if compact:
        return Table(title + ")", ["", *labels], [[header, *cells] for header, *cells in zip(headers, *rows)])
    return Table(title + ")", ["policy", *headers], [[label, *cells] for label, cells in zip(labels, rows)])


def _difficulty_table(report: dict) -> Table:
    """Hit@1 pooled over the queries of each difficulty tag: at never, the reported point and always (a sweep's)."""
    result = report["result"]
    points = {point["mode"]: point for point in report.get("sweep") or [] if point["mode"] in ("never", "always")}
    columns = [("never", points.get("never")), (result["label"], result), ("always", points.get("always"))]
    columns = [(label, point) for label, point in columns if point is not None and (point is result or label != result["label"])]
    return Table(
        "By difficulty tag (Hit@1 pooled over queries)",
        ["difficulty", "queries", *(f"Hit@1 {label}" for label, _ in columns), f"think rate {result['label']}"],
        [[difficulty, str(group["queries"]), *(_score(point["by_difficulty"][difficulty]["hit@1"]) for _, point in columns),
          _rate(group["think_rate"])]
         for difficulty, group in result["by_difficulty"].items()],
    )


def _task_table(tasks: dict, compact: bool) -> Table:
    metrics = [m for m in TASK_METRICS if m[1] in COMPACT_TASK_METRICS] if compact else list(TASK_METRICS)
    identity = ["task", "queries"] if compact else ["task", "meta-task", "pool", "queries", "candidates"]
    rows = []
    for name, task in tasks.items():
        described = [name, str(task["queries"])] if compact else [
            name, task["meta_task"], task["pool"], str(task["queries"]), str(task["candidates"])
        ]
        cost = _cost(task)
        rows.append([*described, _score(task["score"]), *(_score(task["metrics"][m]) for _, m in metrics),
                     *(cost[:2] if compact else cost)])
    cost_headers = ["think rate", "tokens/query"] + ([] if compact else ["seconds", "inputs/s"])
    return Table("Tasks", [*identity, "score", *(label for label, _ in metrics), *cost_headers], rows)


def is_chosen_point(point: dict, report: dict) -> bool:
    return point["mode"] == "adaptive" and point["threshold"] == report["threshold"]


def _markdown_row(cells: list[str]) -> str:
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def _score(value: float) -> str:
    return f"{100 * value:.1f}"


def _rate(value: float) -> str:
    return f"{100 * value:.0f}%"


def _cost(group: dict) -> list[str]:
    speed = group["inputs_per_second"]
    return [
        _rate(group["think_rate"]),
        f"{group['reasoning_tokens_per_query']:.1f}",
        f"{group['wall_seconds']:.1f}",
        "-" if speed is None else f"{speed:.1f}",
    ]
