"""`twn prepare`: read raw data, validate every record and image, write a prepared dataset.

Validation opens every image (query, target, negative, pool candidate, video frame) once and decodes the
sampled frames of every video file. A record that fails (missing or unreadable image or video, no text and
no picture, no positive, duplicate id, unparseable row) is a `BadRecordError`; by default any of them stops
the run before anything is written, and with `skip_bad` they are left out and listed in the manifest.
Nothing is dropped without being reported.

Queries without a CoT get one from a teacher MLLM when one is named (after validation, so that bad data
fails before a large model loads); its CoTs are cached beside the output so that an interrupted run resumes.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from twn_cli.data.images import load_image
from twn_cli.data.mmeb_v2_tasks import MODALITY_OF_META_TASK, mmeb_meta_task
from twn_cli.data.prepared import NO_VIDEO, check_output_dir, name_problem, split_counts, write_prepared
from twn_cli.data.sources import (
    ReadOptions,
    Side,
    SourceCandidate,
    SourceItem,
    SourceRecord,
    expand_media,
    read_source,
)
from twn_cli.data.unicode import first_unicode_problem
from twn_cli.data.videos import VideoClip
from twn_cli.errors import BadRecordError, TWNError
from twn_cli.locks import lock_output
from twn_cli.stages.teacher_cot import check_generation_limits, generate_teacher_cots

logger = logging.getLogger(__name__)

LISTED_PROBLEMS = 5


@dataclass(frozen=True)
class PreparedSummary:
    """What `run_prepare` wrote: query counts per split and task, candidates, skipped records."""

    output_dir: Path
    queries: dict[str, dict[str, int]]  # split -> task -> queries
    candidates: int
    skipped: int

    def table(self) -> list[tuple[str, str, int]]:
        """(split, task, queries) rows, for printing."""
        return [(split, task, count) for split, tasks in self.queries.items() for task, count in tasks.items()]


def run_prepare(
    source: str,
    output_dir: Path,
    *,
    skip_bad: bool,
    frames: int = 8,
    cot_column: str | None,
    instruction: str | None,
    split: str | None,
    progress: Callable[[int], None] | None = None,
    image_root: Path | None = None,
    task: str | None = None,
    cot_teacher: str | None = None,
    teacher_batch_size: int = 8,
    teacher_max_new_tokens: int = 128,
    teacher_device: str = "auto",
    teacher_dtype: str = "float32",
    trust_remote_code: bool = False,
    cot_progress: Callable[[int, int], None] | None = None,
) -> PreparedSummary:
    """Prepare `source` (a path in any layout of `twn_cli.data.sources`) into `output_dir`.

    `frames`: frames sampled per video. `cot_column`: the column with teacher CoT (default `cot`).
    `instruction`, `split`, `task`: used for records that do not give their own. `image_root`: where
    relative image paths resolve (default: each file's folder). `progress(n)` is told of every n records
    handled (like `run_embed`'s `on_batch`), to advance a progress bar of unknown total.

    `cot_teacher` (a directory or hub id) writes the CoT of every query that has none, `teacher_batch_size`
    queries at a time, greedily, at most `teacher_max_new_tokens` each, on `teacher_device` in
    `teacher_dtype`; `cot_progress(done, total)` follows it.
    """
    output_dir = Path(output_dir)
    check_output_dir(output_dir)
    if frames < 1:
        raise TWNError(f"frames per video must be at least 1, not {frames}")
    for kind, name in (("split", split), ("task", task)):
        if name is not None and (problem := name_problem(kind, name)):
            raise TWNError(f"--{kind}: {problem}")
    if cot_teacher is not None:
        check_generation_limits(teacher_batch_size, teacher_max_new_tokens)
    with lock_output(output_dir):  # one writer per output; it also guards the teacher-CoT cache beside it
        options = ReadOptions(
            image_root=Path(image_root) if image_root else None,
            task=task,
            split=split,
            cot_column=cot_column,
            instruction=instruction,
        )
        builder = DatasetBuilder(frames)
        problems: list[BadRecordError] = []
        for item in read_source(Path(source), options):
            try:
                builder.add(item)
            except BadRecordError as problem:
                problems.append(problem)
            if progress is not None and not isinstance(item, SourceCandidate):
                progress(1)

        if problems and not skip_bad:
            raise _bad_records_error(problems, builder.records)
        if not builder.queries:
            raise TWNError(f"'{source}' holds no usable records ({len(problems)} bad, {builder.records} in all)")
        if cot_column and not builder.has_cot:
            raise TWNError(f"no record has a value in the CoT column '{cot_column}'")
        if problems:
            logger.warning("skipped %d of %d records (each is listed in manifest.json)", len(problems), builder.records)

        query_rows = [row for rows in builder.queries.values() for row in rows]
        if cot_teacher is None:
            cot = cot_info(query_rows, teacher=None, generated=0)
        else:
            teacher_settings = _TeacherSettings(
                cot_teacher, teacher_batch_size, teacher_max_new_tokens, teacher_device, teacher_dtype, trust_remote_code
            )
            cot = _add_teacher_cots(query_rows, teacher_settings, teacher_cot_cache_path(output_dir), cot_progress)

        write_prepared(
            output_dir,
            builder.queries,
            list(builder.candidates.values()),
            {
                "source": str(Path(source).absolute()),
                "tasks": builder.tasks,
                "skipped": [{"record": problem.record, "reason": problem.reason} for problem in problems],
                "frames_per_video": frames,
                "cot": cot,
            },
        )
        if cot_teacher is not None:
            teacher_cot_cache_path(output_dir).unlink(missing_ok=True)
        summary = PreparedSummary(
            output_dir=output_dir,
            queries={split: split_counts(rows)["tasks"] for split, rows in builder.queries.items()},
            candidates=len(builder.candidates),
            skipped=len(problems),
        )
        queries = sum(map(len, builder.queries.values()))
        logger.info("wrote %s: %d queries, %d candidates", output_dir, queries, summary.candidates)
        return summary


def teacher_cot_cache_path(output_dir: Path) -> Path:
    """Where the teacher CoTs of a prepare into `output_dir` are cached until the dataset is written."""
    return output_dir.parent / f".{output_dir.name}.cot-cache.jsonl"


@dataclass(frozen=True)
class _TeacherSettings:
    """The teacher MLLM that writes missing CoTs, and how it runs."""

    source: str  # a directory or hub id
    batch_size: int
    max_new_tokens: int
    device: str
    dtype: str
    trust_remote_code: bool


def _add_teacher_cots(
    query_rows: list[dict], settings: _TeacherSettings, cache_path: Path, progress: Callable[[int, int], None] | None
) -> dict:
    """Fill the empty `cot` of query rows with the teacher's; the manifest's account of where CoTs came from."""
    lacking = [row for row in query_rows if not row["cot"]]
    if not lacking:
        logger.info("every query has a CoT already: the teacher is not needed")
        return cot_info(query_rows, teacher=None, generated=0)
    from twn_cli.engine.backbone import load_backbone

    # A local teacher is named by its absolute path, so that a resumed run from elsewhere matches the cache.
    source = str(Path(settings.source).absolute()) if Path(settings.source).exists() else settings.source
    teacher = load_backbone(
        source, dtype=settings.dtype, device=settings.device, trust_remote_code=settings.trust_remote_code
    )
    cots = generate_teacher_cots(
        lacking,
        teacher,
        cache_path,
        batch_size=settings.batch_size,
        max_new_tokens=settings.max_new_tokens,
        progress=progress,
    )
    for row in lacking:
        row["cot"] = cots[row["id"]]
    generated = sum(1 for row in lacking if row["cot"])
    if generated < len(lacking):
        logger.warning("the teacher wrote an empty CoT for %d of %d queries", len(lacking) - generated, len(lacking))
    return cot_info(query_rows, teacher=source, generated=generated)


def cot_info(query_rows: list[dict], *, teacher: str | None, generated: int) -> dict:
    from_column = sum(1 for row in query_rows if row["cot"]) - generated
    source = "teacher" if teacher else "column" if from_column else "none"
    return {"source": source, "teacher": teacher, "generated": generated, "from_column": from_column}


class DatasetBuilder:
    """Collects validated query and candidate rows; a bad record changes nothing."""

    def __init__(self, frames: int):
        self.frames = frames
        self.queries: dict[str, list[dict]] = {}  # split -> query rows
        self.candidates: dict[str, dict] = {}  # id -> candidate row
        self.tasks: dict[str, dict] = {}  # task -> {meta_task, modality, pool}
        self.records = 0
        self.has_cot = False
        self._query_ids: set[str] = set()
        self._image_problems: dict[str, str | None] = {}  # path -> why it cannot be read; each opened once
        self._resolved: dict[tuple[str, Side], tuple[dict, bool]] = {}  # shared targets are checked once

    def add(self, item: SourceItem) -> None:
        if isinstance(item, SourceCandidate):
            row, _ = self._candidate(item.label, item.task, item.side, "candidate")
            self.candidates.setdefault(row["id"], row)
            return
        self.records += 1
        if isinstance(item, BadRecordError):
            raise item
        self._add_record(item)

    def _add_record(self, record: SourceRecord) -> None:
        label = record.label
        problem = name_problem("split", record.split) or name_problem("task", record.task) or _text_problem(record)
        if problem:
            raise BadRecordError(label, problem)
        if record.id in self._query_ids:
            raise BadRecordError(label, f"duplicate id '{record.id}'")
        if not record.positives:
            raise BadRecordError(label, "no positive target")
        images, video = self._media(label, "query", record.query.images)
        if not record.query.text and not images and video is None:
            raise BadRecordError(label, "query has neither text nor image nor video")
        positives = self._candidates(record, record.positives, "positive")
        negatives = self._candidates(record, record.negatives, "negative")
        pool = self._candidates(record, record.pool or (), "candidate")
        is_video = video is not None or any(is_video for _, is_video in positives + negatives + pool)
        task_info = self._task_info(record, is_video)

        # Everything is valid: only now does the record touch the dataset.
        for row, _ in positives + negatives + pool:
            self.candidates.setdefault(row["id"], row)
        relevance = {}
        for (row, _), value in zip(positives, record.relevance):
            relevance.setdefault(row["id"], value)
        self.tasks[record.task] = task_info
        self._query_ids.add(record.id)
        self.has_cot = self.has_cot or bool(record.cot)
        self.queries.setdefault(record.split, []).append(
            {
                "id": record.id,
                "task": record.task,
                "meta_task": task_info["meta_task"],
                "modality": task_info["modality"],
                "instruction": record.query.instruction,
                "text": record.query.text,
                "images": images,
                "video": video.to_row() if video is not None else NO_VIDEO,
                "positive_ids": list(relevance),
                "positive_relevance": list(relevance.values()),
                "negative_ids": _unique_ids(negatives),
                "candidate_ids": _unique_ids(pool),
                "cot": record.cot,
                "difficulty": record.difficulty,
            }
        )

    def _task_info(self, record: SourceRecord, is_video: bool) -> dict:
        """The task's meta-task, modality and pool kind: fixed by its first record, which later ones must fit."""
        stated = record.meta_task
        if stated is not None and stated not in MODALITY_OF_META_TASK:
            raise BadRecordError(record.label, f"meta_task '{stated}' is not one of {', '.join(MODALITY_OF_META_TASK)}")
        known = self.tasks.get(record.task)
        if known is not None and stated is not None and stated != known["meta_task"]:
            raise BadRecordError(
                record.label, f"meta_task '{stated}' differs from '{known['meta_task']}' of task '{record.task}'"
            )
        if known is None:
            meta_task = stated or mmeb_meta_task(record.task) or ("video_retrieval" if is_video else "retrieval")
            known = {"meta_task": meta_task, "modality": MODALITY_OF_META_TASK[meta_task], "pool": "global"}
        if record.pool is not None:
            return {**known, "pool": "per_query"}
        return known

    def _candidates(self, record: SourceRecord, sides: tuple[Side, ...], what: str) -> list[tuple[dict, bool]]:
        return [self._candidate(record.label, record.task, side, f"{what} {n}") for n, side in enumerate(sides, 1)]

    def _candidate(self, label: str, task: str, side: Side, what: str) -> tuple[dict, bool]:
        """The candidate row of a target (its id derived from its content) and whether it is a video."""
        key = (task, side)
        if key not in self._resolved:
            problem = name_problem("task", task) or first_unicode_problem(
                [(f"{what} instruction", side.instruction), (f"{what} text", side.text), (f"{what} image", side.images)]
            )
            if problem:
                raise BadRecordError(label, problem)
            images, video = self._media(label, what, side.images)
            if not side.text and not images and video is None:
                raise BadRecordError(label, f"{what} has neither text nor image nor video")
            content = {"task": task, "instruction": side.instruction, "text": side.text, "images": images}
            if video is not None:
                content["video"] = video.to_row()
            # Identical targets of different records get one id; the hash keeps ids stable across runs.
            digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]
            self._resolved[key] = ({"id": f"{task}/{digest}", **content}, video is not None)
        return self._resolved[key]

    def _media(self, label: str, what: str, paths: tuple[str, ...]) -> tuple[list[str], VideoClip | None]:
        """The images among `paths` and their video (sampled to `frames` frames), each checked to open."""
        try:
            images, video = expand_media(paths, self.frames)
            for image in images:
                self._check_image(image)
            if video is not None:
                video.load()
        except ValueError as problem:
            raise BadRecordError(label, f"{what}: {problem}") from None
        return images, video

    def _check_image(self, path: str) -> None:
        if path not in self._image_problems:
            try:
                load_image(path)
                self._image_problems[path] = None
            except ValueError as problem:
                self._image_problems[path] = str(problem)
        if self._image_problems[path] is not None:
            raise ValueError(f"image '{path}' {self._image_problems[path]}")


def _text_problem(record: SourceRecord) -> str | None:
    """Why a field of the query itself is not text (its targets are checked as candidates)."""
    return first_unicode_problem([
        ("id", record.id), ("query instruction", record.query.instruction), ("query text", record.query.text),
        ("query image", record.query.images), ("cot", record.cot), ("difficulty", record.difficulty), ("meta_task", record.meta_task),
    ])


def _unique_ids(candidates: list[tuple[dict, bool]]) -> list[str]:
    return list(dict.fromkeys(row["id"] for row, _ in candidates))


def _bad_records_error(problems: list[BadRecordError], records: int) -> TWNError:
    lines = [
        f"{len(problems)} of {records} records are bad; fix them, or rerun with --skip-bad to skip them "
        "(each skipped record is listed in manifest.json)"
    ]
    lines += [f"  {problem.record}: {problem.reason}" for problem in problems[:LISTED_PROBLEMS]]
    if len(problems) > LISTED_PROBLEMS:
        lines.append(f"  ... and {len(problems) - LISTED_PROBLEMS} more")
    return TWNError("\n".join(lines))
