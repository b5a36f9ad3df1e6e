"""`twn prepare mmeb-v2 ROOT -o DIR`: the MMEB-V2 benchmark, as its maintainers distribute it, as one prepared dataset.

Every selected task of the registry (`twn_cli.data.mmeb_v2_tasks`) is read by the reader of its layout
(`twn_cli.data.mmeb_v2_sources`) and validated like any other source (every image and frame opened, videos
sampled to `frames` frames). A task whose data folder is not under ROOT is missing: it is listed (a warning
and the manifest's `benchmark.missing`) and skipped. A task that is there but incomplete (a missing or
unreadable file, a record that cannot be used) stops the run with one line naming the task and the file,
and nothing is written: a benchmark is scored on all its records or not at all.

The manifest's `benchmark` entry (name, tasks selected, tasks missing) tells `twn eval` to add the
leaderboard table to its report.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from twn_cli.data.mmeb_v2_sources import annotation_files, read_task
from twn_cli.data.mmeb_v2_tasks import select_tasks
from twn_cli.data.prepared import check_output_dir, split_counts, write_prepared
from twn_cli.errors import TWNError
from twn_cli.stages.prepare import DatasetBuilder, PreparedSummary, cot_info

logger = logging.getLogger(__name__)

BENCHMARK = "mmeb-v2"


def run_prepare_mmeb_v2(
    root: str | Path,
    output_dir: str | Path,
    *,
    tasks: Sequence[str] | None = None,
    frames: int = 8,
    progress: Callable[[str], None] | None = None,
) -> PreparedSummary:
    """Prepare the MMEB-V2 tasks under `root` into `output_dir`; `tasks` names tasks, modalities ("video")
    or leaderboard columns ("V-RET") to keep (default: all 78). `progress(task)` is told of each task begun."""
    root, output_dir = Path(root), Path(output_dir)
    check_output_dir(output_dir)
    if not root.is_dir():
        raise TWNError(f"MMEB-V2 root '{root}' is not a directory")
    if frames < 1:
        raise TWNError(f"frames per video must be at least 1, not {frames}")
    try:
        selected = select_tasks(tasks)
    except ValueError as error:
        raise TWNError(str(error)) from None
    builder = DatasetBuilder(frames)
    missing = []
    for task in selected:
        if progress is not None:
            progress(task.name)
        try:
            files = annotation_files(root, task)
            if files is None:
                missing.append(task.name)
                continue
            for item in read_task(root, task, files):
                builder.add(item)
        except TWNError as problem:  # a BadRecordError too: no record of a benchmark may be skipped
            raise TWNError(f"MMEB-V2 task '{task.name}' is incomplete: {problem}") from None
    if missing:
        logger.warning(
            "%d of the %d selected MMEB-V2 tasks are not under %s and are skipped: %s",
            len(missing), len(selected), root, ", ".join(missing),
        )
    if not builder.queries:
        raise TWNError(
            f"none of the {len(selected)} selected MMEB-V2 tasks is under '{root}' (e.g. no folder {root / selected[0].data})"
        )

    query_rows = [row for rows in builder.queries.values() for row in rows]
    write_prepared(
        output_dir,
        builder.queries,
        list(builder.candidates.values()),
        {
            "source": str(root.absolute()),
            "tasks": builder.tasks,
            "skipped": [],
            "frames_per_video": frames,
            "cot": cot_info(query_rows, teacher=None, generated=0),
            "benchmark": {"name": BENCHMARK, "selected": [task.name for task in selected], "missing": missing},
        },
    )
    logger.info("wrote %s: %d queries of %d tasks", output_dir, len(query_rows), len(builder.tasks))
    return PreparedSummary(
        output_dir=output_dir,
        queries={split: split_counts(rows)["tasks"] for split, rows in builder.queries.items()},
        candidates=len(builder.candidates),
        skipped=0,
    )
