"""The prepared dataset: what `twn prepare` writes and every other stage reads.

    manifest.json   format, schema version, source, counts per split and task, task table, skipped records
    queries/        datasets.DatasetDict (save_to_disk), one split per name, rows as QUERY_FEATURES
    candidates/     datasets.Dataset (save_to_disk), rows as CANDIDATE_FEATURES

A query's gold targets and hard negatives are candidates referenced by id. `candidate_ids` is the query's own
pool; an empty list means the task's global pool (every candidate of that task). Images are absolute paths;
a video is its sampled clip (`video`: the frame images or the video file, which frames of the video they are,
how many it has and its frame rate; no paths: no video), encoded by the backbone's video path. Datasets of
schema version 1 (before videos had a column of their own, when a video's frames were its images) are read
with an empty `video` column.

Candidates of identical content (instruction, text and image paths) under different ids are copies: a class
name or an answer recurs across tasks and splits. Training never uses a copy of a query's positive as one of
its negatives (`PreparedDataset.with_copies`); evaluation follows the gold ids as given.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import datasets

from twn_cli.atomic import atomic_directory
from twn_cli.data.mmeb_v2_tasks import MODALITY_OF_META_TASK
from twn_cli.errors import BadRecordError, TWNError

FORMAT = "twn-prepared"
SCHEMA_VERSION = 2
# Versions this twn reads: version 1 lacks the `video` column, which is read as empty.
READABLE_SCHEMA_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
QUERIES_DIR = "queries"
CANDIDATES_DIR = "candidates"

# The meta-tasks (MMEB-V2's nine) and their modalities are the task registry's.
META_TASKS = tuple(MODALITY_OF_META_TASK)
POOLS = ("per_query", "global")

_STRING = datasets.Value("string")
_STRINGS = datasets.List(_STRING)
VIDEO_FEATURE = {
    "paths": _STRINGS,
    "frame_indices": datasets.List(datasets.Value("int64")),
    "total_frames": datasets.Value("int64"),
    "fps": datasets.Value("float64"),
}
NO_VIDEO = {"paths": [], "frame_indices": [], "total_frames": 0, "fps": 0.0}
QUERY_FEATURES = datasets.Features(
    {
        "id": _STRING,
        "task": _STRING,
        "meta_task": _STRING,
        "modality": _STRING,
        "instruction": _STRING,
        "text": _STRING,
        "images": _STRINGS,
        "video": VIDEO_FEATURE,
        "positive_ids": _STRINGS,
        "positive_relevance": datasets.List(datasets.Value("float64")),
        "negative_ids": _STRINGS,
        "candidate_ids": _STRINGS,
        "cot": _STRING,
        "difficulty": _STRING,
    }
)
CANDIDATE_FEATURES = datasets.Features(
    {"id": _STRING, "task": _STRING, "instruction": _STRING, "text": _STRING, "images": _STRINGS, "video": VIDEO_FEATURE}
)
# A split names a folder of the dataset (queries/<split>/): the `datasets` library's rule for split names.
SPLIT_NAME = re.compile(r"\w+(\.\w+)*", re.ASCII)
# A task names files of later stages (an eval cache folder) and appears in ids and reports: no path
# separators, no control characters.
TASK_NAME = re.compile(r"\w[\w .,:;+=()\[\]{}&#@!~'-]*")
LONGEST_NAME = 128
_NAME_RULES = {
    "split": (SPLIT_NAME, "letters, digits and '_', parts joined by '.'"),
    "task": (TASK_NAME, "letters, digits, spaces and _ . , : ; + = ( ) [ ] { } & # @ ! ~ ' -, beginning with a letter, digit or '_'"),
}

# Columns a row given to write_prepared may leave out, and what they then hold.
OPTIONAL_COLUMNS = {"video": NO_VIDEO}
# What the caller of write_prepared supplies; the writer adds format, version, time and counts.
MANIFEST_EXTRA_KEYS = ("source", "tasks", "skipped", "frames_per_video")


@dataclass
class PreparedDataset:
    """A loaded prepared dataset; the Arrow tables are memory-mapped, not read into memory."""

    path: Path
    manifest: dict
    queries: datasets.DatasetDict
    candidates: datasets.Dataset
    _global_pools: dict[str, list[str]] | None = field(default=None, init=False, repr=False, compare=False)
    _copies: dict[str, list[str]] | None = field(default=None, init=False, repr=False, compare=False)

    def candidate_pool(self, query: Mapping) -> list[str]:
        """The ids of the candidates that `query` (a query row) is ranked against."""
        if query["candidate_ids"]:
            return list(query["candidate_ids"])
        if self._global_pools is None:
            self._global_pools = {}
            for candidate_id, task in zip(self.candidates["id"], self.candidates["task"]):
                self._global_pools.setdefault(task, []).append(candidate_id)
        return self._global_pools.get(query["task"], [])

    def with_copies(self, ids: Iterable[str]) -> set[str]:
        """`ids` and every candidate of the same content under another id: what must not be a negative of a
        query whose positives are `ids` (it would be the right answer, scored as a wrong one)."""
        if self._copies is None:
            # Keyed by a digest, not the content: millions of document texts would not fit in memory twice.
            by_content: dict[bytes, list[str]] = {}
            columns = self.candidates.select_columns(["id", "instruction", "text", "images", "video"])
            for batch in columns.iter(batch_size=10_000):
                contents = zip(batch["id"], batch["instruction"], batch["text"], batch["images"], batch["video"])
                for candidate_id, instruction, text, images, video in contents:
                    content = json.dumps([instruction, text, images, video], sort_keys=True).encode()
                    by_content.setdefault(hashlib.blake2b(content, digest_size=16).digest(), []).append(candidate_id)
            self._copies = {member: group for group in by_content.values() if len(group) > 1 for member in group}
        return {copy for item in ids for copy in self._copies.get(item, (item,))}


def write_prepared(
    output_dir: str | Path,
    queries_by_split: Mapping[str, Sequence[Mapping]],
    candidates: Sequence[Mapping],
    manifest_extra: Mapping,
    write_files: Callable[[Path], None] | None = None,
) -> Path:
    """Write a prepared dataset to `output_dir` atomically and return its path.

    `write_files(staging_dir)` may add files that belong to the dataset (rendered images, say) before the
    directory is renamed into place; rows refer to them by their final paths under `output_dir`.

    Everything goes to a hidden temporary sibling that is renamed into place at the end, with manifest.json
    written last, so an interrupted run never leaves a directory that looks complete. An existing prepared
    dataset (or empty directory) at `output_dir` is replaced only once the new one is complete; any other
    existing directory is refused. Rows must match QUERY_FEATURES / CANDIDATE_FEATURES and reference only
    existing candidates (ValueError otherwise: that is a bug in the caller, not bad user data); a row may leave
    out the OPTIONAL_COLUMNS.
    """
    output_dir = Path(output_dir)
    check_output_dir(output_dir)
    missing = [key for key in MANIFEST_EXTRA_KEYS if key not in manifest_extra]
    if missing:
        raise ValueError(f"manifest_extra lacks {missing}")
    _check_consistency(queries_by_split, candidates, manifest_extra["tasks"])
    manifest = {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "source": manifest_extra["source"],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "splits": {split: split_counts(rows) for split, rows in queries_by_split.items()},
        "candidates": len(candidates),
        **{key: value for key, value in manifest_extra.items() if key != "source"},
    }
    with atomic_directory(output_dir) as staging:
        if write_files is not None:
            write_files(staging)
        for split in queries_by_split:
            _check_inside(staging / QUERIES_DIR / split, staging)
        queries = datasets.DatasetDict(
            {split: _to_dataset(rows, QUERY_FEATURES) for split, rows in queries_by_split.items()}
        )
        queries.save_to_disk(str(staging / QUERIES_DIR))
        _to_dataset(candidates, CANDIDATE_FEATURES).save_to_disk(str(staging / CANDIDATES_DIR))
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return output_dir


def load_prepared(path: str | Path) -> PreparedDataset:
    """The prepared dataset at `path`; a TWNError in one line if it is missing, corrupt or of another version."""
    path = Path(path)
    manifest = _read_manifest(path)
    try:
        queries = datasets.load_from_disk(str(path / QUERIES_DIR))
        candidates = datasets.load_from_disk(str(path / CANDIDATES_DIR))
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise TWNError(f"prepared dataset '{path}' is corrupt: {_first_line(error)}") from None
    if not isinstance(queries, datasets.DatasetDict) or not isinstance(candidates, datasets.Dataset):
        raise TWNError(f"prepared dataset '{path}' is corrupt: queries/ or candidates/ has the wrong layout")
    if set(queries) != set(manifest.get("splits", {})):
        raise TWNError(
            f"prepared dataset '{path}' is corrupt: its splits {sorted(queries)} differ from the manifest's"
        )
    version = manifest["schema_version"]
    tables = {f"queries/{split}": (queries[split], QUERY_FEATURES) for split in queries}
    tables["candidates"] = (candidates, CANDIDATE_FEATURES)
    for name, (table, features) in tables.items():
        expected = features if version == SCHEMA_VERSION else datasets.Features({key: value for key, value in features.items() if key != "video"})
        if table.features != expected:
            raise TWNError(f"prepared dataset '{path}' is corrupt: {name} lacks the schema-{version} columns")
    if version == 1:
        queries = datasets.DatasetDict({split: _with_empty_video(table, QUERY_FEATURES) for split, table in queries.items()})
        candidates = _with_empty_video(candidates, CANDIDATE_FEATURES)
    return PreparedDataset(path=path, manifest=manifest, queries=queries, candidates=candidates)


def name_problem(kind: str, name: str) -> str | None:
    """Why `name` cannot be a split or task name (`kind`), or None if it can."""
    pattern, rule = _NAME_RULES[kind]
    if len(name) <= LONGEST_NAME and pattern.fullmatch(name):
        return None
    return f"{kind} name {name[:LONGEST_NAME + 1]!r} is not allowed: use {rule} (at most {LONGEST_NAME} characters)"


def _with_empty_video(table: datasets.Dataset, features: datasets.Features) -> datasets.Dataset:
    """A schema-1 table with the `video` column of schema 2, empty (in memory: the dataset on disk is not touched)."""
    table = table.add_column("video", [NO_VIDEO] * len(table), feature=VIDEO_FEATURE)
    return table.cast(features) if table.features != features else table


def is_prepared_dir(path: Path) -> bool:
    """Whether `path` holds a manifest that says it is a prepared dataset (of any version)."""
    try:
        return json.loads((path / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_output_dir(output_dir: Path) -> None:
    """Refuse an output path that holds something other than a prepared dataset, before any work is done."""
    if not output_dir.exists():
        return
    if not output_dir.is_dir():
        raise TWNError(f"output '{output_dir}' exists and is not a directory")
    if any(output_dir.iterdir()) and not is_prepared_dir(output_dir):
        raise TWNError(
            f"output '{output_dir}' exists and is not a prepared dataset; choose another output or remove it"
        )


def _read_manifest(path: Path) -> dict:
    if not path.is_dir():
        raise TWNError(f"prepared dataset '{path}' does not exist")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise TWNError(
            f"'{path}' is not a prepared dataset (no {MANIFEST}; an interrupted `twn prepare` leaves none)"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise TWNError(f"prepared dataset '{path}': {MANIFEST} is corrupt ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise TWNError(f"'{path}' is not a prepared dataset ({MANIFEST} does not say format '{FORMAT}')")
    version = manifest.get("schema_version")
    if version not in READABLE_SCHEMA_VERSIONS:
        raise TWNError(
            f"prepared dataset '{path}' has schema version {version}; this twn reads versions "
            f"{', '.join(map(str, READABLE_SCHEMA_VERSIONS))}: run `twn prepare` again"
        )
    return manifest


def _check_consistency(
    queries_by_split: Mapping[str, Sequence[Mapping]], candidates: Sequence[Mapping], tasks: Mapping
) -> None:
    """The invariants other stages rely on: unique ids, resolvable references, known tasks."""
    candidate_ids = {row["id"] for row in candidates}
    if len(candidate_ids) != len(candidates):
        raise ValueError("candidate ids are not unique")
    for name, info in tasks.items():
        if info.get("meta_task") not in META_TASKS or info.get("pool") not in POOLS:
            raise ValueError(f"task '{name}' has meta_task {info.get('meta_task')!r} / pool {info.get('pool')!r}")
        if info.get("modality") != MODALITY_OF_META_TASK[info["meta_task"]]:
            raise ValueError(f"task '{name}': modality {info.get('modality')!r} does not fit {info['meta_task']}")
    query_ids: set[str] = set()
    for rows in queries_by_split.values():
        for row in rows:
            if row["id"] in query_ids:
                raise ValueError(f"query id '{row['id']}' is not unique")
            query_ids.add(row["id"])
            if row["task"] not in tasks:
                raise ValueError(f"query '{row['id']}' has task '{row['task']}' missing from the task table")
            if not row["positive_ids"] or len(row["positive_ids"]) != len(row["positive_relevance"]):
                raise ValueError(f"query '{row['id']}' needs positive_ids with one relevance each")
            referenced = {*row["positive_ids"], *row["negative_ids"], *row["candidate_ids"]}
            if not referenced <= candidate_ids:
                unknown = sorted(referenced - candidate_ids)[:3]
                raise ValueError(f"query '{row['id']}' references unknown candidates {unknown}")


def _check_inside(path: Path, root: Path) -> None:
    """Refuse a path of the dataset that would lie outside its folder (a split named '../x' or '/x')."""
    if not path.resolve().is_relative_to(root.resolve()):
        raise TWNError(f"refusing to write '{path}': it lies outside the prepared dataset")


def split_counts(rows: Sequence[Mapping]) -> dict:
    """A split's entry in the manifest: {"queries": n, "tasks": {task: n}}."""
    tasks: dict[str, int] = {}
    for row in rows:
        tasks[row["task"]] = tasks.get(row["task"], 0) + 1
    return {"queries": len(rows), "tasks": tasks}


def _to_dataset(rows: Sequence[Mapping], features: datasets.Features) -> datasets.Dataset:
    # Built column by column: from_list cannot build an empty table, and this names a wrong row's keys.
    for row in rows:
        if not set(features) - set(OPTIONAL_COLUMNS) <= set(row) <= set(features):
            raise ValueError(f"row {row.get('id')!r} has keys {sorted(row)}, expected {sorted(features)}")
    columns = {name: [row.get(name, OPTIONAL_COLUMNS.get(name)) for row in rows] for name in features}
    return datasets.Dataset.from_dict(columns, features=features)


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def prepared_input(row: Mapping):
    """The model input of a prepared query or candidate row; an empty instruction means the model's default."""
    from twn_cli.data.images import load_image
    from twn_cli.data.videos import VideoClip
    from twn_cli.types import ModelInput

    images = []
    for path in row["images"]:
        try:
            images.append(load_image(path))
        except ValueError as error:
            raise BadRecordError(f"record '{row['id']}'", f"image '{path}' {error}") from None
    clip = VideoClip.from_row(row.get("video"))
    try:
        video = clip.load() if clip is not None else None
    except ValueError as error:
        raise BadRecordError(f"record '{row['id']}'", f"video: {error}") from None
    return ModelInput(text=row["text"], images=images, instruction=row["instruction"] or None, video=video)


