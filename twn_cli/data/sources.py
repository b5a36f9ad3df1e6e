"""Readers of users' raw data: each turns one source layout into `SourceRecord`s for `twn prepare`.

Layouts, told apart by the path and by column names:
- record files (.jsonl, .csv, .parquet), or a directory of them, with the columns `id`, `task`, `split`,
  `instruction`, `query_text` (or `text`), `query_image(s)`, `pos_text` / `pos_image` (or `target_text` /
  `target_image`), `neg_text` / `neg_image`, `pos_relevance`, `cot`, `difficulty`, `meta_task`;
- a `datasets` directory (save_to_disk) with the same columns;
- MMEB-train parquet (TIGER-Lab/MMEB-train): `qry`, `qry_image_path`, `pos_text`, `pos_image_path`, `neg_text`,
  `neg_image_path`;
- MMEB image-task eval parquet: `qry_text`, `qry_img_path`, `tgt_text`, `tgt_img_path`, the first target being
  the gold one and all targets the query's own candidate pool; the instruction is written into the text
  (TIGER-Lab/MMEB-eval) or given in `qry_inst` / `tgt_inst` columns of its own (MMEB-V2's eval files);
- an image folder with one sub-folder per class (optionally under train/ validation/ test/ folders).
Any image path naming a directory is a video whose frames are the images in it, and one naming a video file
(.mp4, ...) is that video (see `expand_media`).

Readers do not open images; `twn prepare` validates every record. A record that cannot even be parsed is
yielded as a `BadRecordError`, so that the caller can report it with the others instead of stopping.
The readers of every layout share the record types and the row conversion, so they stay one module
(about 550 lines); MMEB-V2's own layouts are in `mmeb_v2_sources.py`.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path, PurePosixPath

import datasets
import pyarrow
import pyarrow.parquet

from twn_cli.data.prepared import is_prepared_dir
from twn_cli.data.videos import VideoClip, is_image_file, is_video_file, natural_key, sample_clip
from twn_cli.errors import BadRecordError, TWNError

logger = logging.getLogger(__name__)

RECORD_FILE_SUFFIXES = (".jsonl", ".csv", ".parquet")
KNOWN_SPLITS = ("train", "validation", "val", "dev", "test")
# MMEB texts mark where an image goes; the image itself travels in the record's image list.
IMAGE_MARKER = re.compile(r"<\|(?:image|video)_\d+\|>")
# Hugging Face hub shards are named <split>-00000-of-00001 inside a folder named after the subset (task).
HUB_SHARD_NAME = re.compile(r"^(?P<split>\w+?)-\d{5}-of-\d{5}$")
CLASSIFICATION_INSTRUCTION = {
    "classification": "Represent the given image for classification",
    "video_classification": "Represent the given video for classification",
}

@dataclass(frozen=True)
class Side:
    """A query or a target: instruction, text and image paths (absolute; a directory is a video)."""

    instruction: str = ""
    text: str = ""
    images: tuple[str, ...] = ()


@dataclass(frozen=True)
class SourceRecord:
    """One query with its targets, as read from the source and not yet validated."""

    label: str  # where it came from, "file:line" or "file:row N", for error messages
    id: str
    task: str
    split: str
    query: Side
    positives: tuple[Side, ...]
    relevance: tuple[float, ...]  # one per positive
    negatives: tuple[Side, ...] = ()
    pool: tuple[Side, ...] | None = None  # the query's own candidate pool; None = the task's global pool
    cot: str = ""
    difficulty: str = ""
    meta_task: str | None = None  # None: from the MMEB table or the default


@dataclass(frozen=True)
class SourceCandidate:
    """A candidate that belongs in its task's pool whether or not a query points at it (a class label)."""

    label: str
    task: str
    side: Side


SourceItem = SourceRecord | SourceCandidate | BadRecordError


@dataclass(frozen=True)
class ReadOptions:
    """What the user may say about a source; None everywhere means: as the data says, else the default."""

    image_root: Path | None = None  # relative image paths resolve against it instead of the file's folder
    task: str | None = None  # the task of records that name none, instead of the file (or folder) name
    split: str | None = None  # the split of records whose data does not say
    cot_column: str | None = None  # the column holding teacher CoT, instead of `cot`
    instruction: str | None = None  # the instruction of queries that have none


def read_source(source: Path, options: ReadOptions) -> Iterator[SourceItem]:
    """The records of `source`, whichever layout it has; a TWNError at once if it is none of them."""
    if not source.exists():
        raise TWNError(f"source '{source}' does not exist")
    if source.is_file():
        if source.suffix.lower() not in RECORD_FILE_SUFFIXES:
            readable = ", ".join(RECORD_FILE_SUFFIXES)
            raise TWNError(f"source '{source}': cannot read '{source.suffix}' files (use {readable})")
        logger.info("reading records from %s", source)
        return read_record_file(source, source.name, options)
    if is_prepared_dir(source):
        raise TWNError(f"source '{source}' is already a prepared dataset")
    if (source / "dataset_dict.json").is_file() or (source / "state.json").is_file():
        logger.info("reading the `datasets` directory %s", source)
        return read_datasets_dir(source, options)
    record_files = find_record_files(source)
    if record_files:
        logger.info("reading %d record files under %s", len(record_files), source)
        return _chain(read_record_file(path, path.relative_to(source).as_posix(), options) for path in record_files)
    if _image_folder_splits(source, options.split):
        logger.info("reading the image folder %s (one sub-folder per class)", source)
        return read_image_folder(source, options)
    raise TWNError(
        f"cannot tell what '{source}' holds: expected a {'/'.join(RECORD_FILE_SUFFIXES)} file, a folder of them, "
        "a `datasets` save_to_disk folder, or an image folder with one sub-folder per class"
    )


def find_record_files(directory: Path) -> list[Path]:
    """The record files under `directory`, in a stable order, leaving out hidden ones.

    Hidden folders and files are partial outputs and caches (a prepare's teacher-CoT cache), not records.
    """
    found = []
    for folder, subfolders, files in os.walk(directory):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        found += [
            Path(folder, name)
            for name in files
            if not name.startswith(".") and Path(name).suffix.lower() in RECORD_FILE_SUFFIXES
        ]
    return sorted(found)


def sample_frames(directory: Path, count: int) -> list[str]:
    """`count` frames spread uniformly over the video in `directory` (all if it has fewer), in natural
    filename order (frame_2 before frame_10): the frame images of its `VideoClip`."""
    return list(sample_clip(directory, count).paths)


def expand_media(paths: tuple[str, ...], frames: int) -> tuple[list[str], VideoClip | None]:
    """The image files among `paths`, and the video among them (a folder of frames or a video file), sampled
    to `frames` frames; ValueError if a path names more than one video."""
    videos = [sample_clip(path, frames) for path in paths if Path(path).is_dir() or is_video_file(path)]
    images = [path for path in paths if not (Path(path).is_dir() or is_video_file(path))]
    if len(videos) > 1:
        raise ValueError(f"{len(videos)} videos in one query or target: give each its own record")
    return images, videos[0] if videos else None


# ---------------------------------------------------------------------------------------------- record files


@dataclass(frozen=True)
class _FileContext:
    name: str  # the file as named in record labels
    id_prefix: str  # generated ids are <id_prefix>-<row>
    base_dir: Path  # relative image paths resolve against it
    task: str  # the task of records that name none
    split: str | None  # the split of records that name none; None: the layout's default
    options: ReadOptions


def read_record_file(path: Path, name: str, options: ReadOptions) -> Iterator[SourceItem]:
    """The records of one .jsonl / .csv / .parquet file, of any of the three record layouts."""
    shard = HUB_SHARD_NAME.match(path.stem)
    context = _FileContext(
        name=name,
        id_prefix=str(PurePosixPath(name).with_suffix("")),
        base_dir=(options.image_root or path.parent).absolute(),
        task=options.task or (path.parent.name if shard else path.stem),
        split=shard["split"] if shard and shard["split"] in KNOWN_SPLITS else options.split,
        options=options,
    )
    rows = {".jsonl": _jsonl_rows, ".csv": _csv_rows, ".parquet": _parquet_rows}[path.suffix.lower()]
    try:
        for label, index, fields in rows(path, name):
            try:
                yield _convert_row(_Row(_as_mapping(fields, label), label, index, context))
            except BadRecordError as problem:
                yield problem
    except csv.Error as error:
        raise TWNError(f"'{path}' cannot be read as {path.suffix} text ({error})") from None


def read_datasets_dir(source: Path, options: ReadOptions) -> Iterator[SourceItem]:
    """The records of a `datasets` save_to_disk folder (a Dataset, or a DatasetDict whose keys are splits)."""
    try:
        loaded = datasets.load_from_disk(str(source))
    except (OSError, ValueError) as error:
        raise TWNError(f"'{source}' cannot be loaded as a `datasets` folder ({error})") from None
    tables = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [(None, loaded)]
    for split, table in tables:
        context = _FileContext(
            name=f"{source.name}[{split}]" if split else source.name,
            id_prefix=f"{source.name}-{split}" if split else source.name,
            base_dir=(options.image_root or source).absolute(),
            task=options.task or source.name,
            split=split or options.split,
            options=options,
        )
        for index, fields in enumerate(table):
            label = f"{context.name}:row {index}"
            try:
                yield _convert_row(_Row(fields, label, index, context))
            except BadRecordError as problem:
                yield problem


def read_rows(path: Path, name: str) -> Iterator[tuple[str, Mapping]]:
    """The rows of a .jsonl, .csv or .parquet file as mappings, each with its label ("name:line" or "name:row N").

    An unreadable file is a TWNError; a JSONL line that is not an object, a BadRecordError naming it.
    """
    rows = {".jsonl": _jsonl_rows, ".csv": _csv_rows, ".parquet": _parquet_rows}[path.suffix.lower()]
    try:
        for label, _, fields in rows(path, name):
            yield label, _as_mapping(fields, label)
    except (UnicodeDecodeError, csv.Error) as error:
        raise TWNError(f"'{path}' cannot be read as {path.suffix} text ({error})") from None


def _jsonl_rows(path: Path, name: str) -> Iterator[tuple[str, int, object]]:
    # Bytes that are not UTF-8 read as surrogates: the record holding them is refused, not the whole file.
    with path.open(encoding="utf-8", errors="surrogateescape") as lines:
        index = 0
        for line_number, line in enumerate(lines, 1):
            if line.strip():
                yield f"{name}:{line_number}", index, line
                index += 1


def _csv_rows(path: Path, name: str) -> Iterator[tuple[str, int, object]]:
    with path.open(newline="", encoding="utf-8", errors="surrogateescape") as handle:
        reader = csv.DictReader(handle)
        for index, fields in enumerate(reader):
            yield f"{name}:{reader.line_num}", index, {column: _csv_cell(cell) for column, cell in fields.items()}


def _csv_cell(cell: object) -> object:
    """A CSV cell; one holding a JSON list ('["a.png", "b.png"]') is that list, since CSV has no lists."""
    if isinstance(cell, str) and cell.startswith("[") and cell.endswith("]"):
        try:
            parsed = json.loads(cell)
        except json.JSONDecodeError:
            return cell
        return parsed if isinstance(parsed, list) else cell
    return cell


def _parquet_rows(path: Path, name: str) -> Iterator[tuple[str, int, object]]:
    try:
        batches = pyarrow.parquet.ParquetFile(path).iter_batches(batch_size=1024)
        index = 0
        for batch in batches:
            for fields in batch.to_pylist():
                yield f"{name}:row {index}", index, fields
                index += 1
    except (OSError, pyarrow.ArrowException) as error:
        raise TWNError(f"'{path}' is not a readable Parquet file ({error})") from None


def _as_mapping(fields: object, label: str) -> Mapping:
    if isinstance(fields, str):  # a JSONL line
        try:
            fields = json.loads(fields)
        except json.JSONDecodeError as error:
            raise BadRecordError(label, f"not valid JSON ({error})") from None
    if not isinstance(fields, Mapping):
        raise BadRecordError(label, "not a JSON object")
    return fields


def _convert_row(row: _Row) -> SourceRecord:
    columns = row.fields.keys()
    if {"qry", "pos_text"} <= columns:
        return _mmeb_train_record(row)
    if {"qry_text", "tgt_text"} <= columns:
        return _mmeb_eval_record(row)
    if columns & {"query_text", "text", "query_image", "query_images"}:
        return _generic_record(row)
    raise BadRecordError(
        row.label, "no query columns (expected query_text / text / query_image(s), or MMEB's qry / qry_text)"
    )


def _generic_record(row: _Row) -> SourceRecord:
    query = Side(
        instruction=row.text("instruction") or row.default_instruction,
        text=_strip_markers(row.text("query_text", "text")),
        images=row.paths(row.values("query_images", "query_image")),
    )
    positives = tuple(
        Side(text=_strip_markers(_as_text(text)), images=row.paths([image]))
        for text, image in _pairs(row.values("pos_text", "target_text"), row.values("pos_image", "target_image"))
    )
    negatives = tuple(
        Side(text=_strip_markers(_as_text(text)), images=row.paths([image]))
        for text, image in _pairs(row.values("neg_text"), row.values("neg_image"))
    )
    return row.record(query=query, positives=positives, negatives=negatives, default_split="train")


def _mmeb_train_record(row: _Row) -> SourceRecord:
    query = row.mmeb_side(row.fields["qry"], row.values("qry_image_path"), is_query=True, what="query")
    positives = row.mmeb_targets(_pairs(row.values("pos_text"), row.values("pos_image_path")), "positive")
    negatives = row.mmeb_targets(_pairs(row.values("neg_text"), row.values("neg_image_path")), "negative")
    return row.record(query=query, positives=positives, negatives=negatives, default_split="train")


def _mmeb_eval_record(row: _Row) -> SourceRecord:
    texts, images = row.values("tgt_text"), row.values("tgt_img_path")
    if "qry_inst" in row.fields:
        query = row.mmeb_v2_side(row.fields["qry_inst"], row.fields["qry_text"], row.values("qry_img_path"), "query")
        instruction = row.fields.get("tgt_inst")

        def targets(pairs: Iterator[tuple[object, object]], what: str) -> tuple[Side, ...]:
            # As MMEB-V2's own evaluation does: only a target with an image gets the target instruction.
            return tuple(row.mmeb_v2_side(instruction if image else "", text, [image], what) for text, image in pairs)
    else:
        query = row.mmeb_side(row.fields["qry_text"], row.values("qry_img_path"), is_query=True, what="query")

        def targets(pairs: Iterator[tuple[object, object]], what: str) -> tuple[Side, ...]:
            return row.mmeb_targets(pairs, what)
    # The first target is the gold one; an empty first target must not let the second one take its place.
    gold = targets(_pairs(texts[:1], images[:1]), "gold target")
    pool = targets(_pairs(texts, images), "candidate")
    return row.record(query=query, positives=gold, pool=pool, default_split="test")


class _Row:
    """One raw row and where it came from; its methods read columns into sides and records."""

    def __init__(self, fields: Mapping, label: str, index: int, context: _FileContext):
        self.fields = fields
        self.label = label
        self.index = index
        self.context = context
        self.default_instruction = context.options.instruction or ""

    def text(self, *names: str) -> str:
        """The first non-empty of these columns, as stripped text."""
        for name in names:
            value = _as_text(self.fields.get(name))
            if value:
                return value
        return ""

    def values(self, *names: str) -> list:
        """The first non-empty of these columns as a list (a scalar is a one-item list)."""
        for name in names:
            value = _as_list(self.fields.get(name))
            if value:
                return value
        return []

    def paths(self, values: list) -> tuple[str, ...]:
        """Absolute image paths; relative ones resolve against the image root (default the file's folder)."""
        paths = []
        for value in values:
            if value is None or value == "":
                continue
            if not isinstance(value, str):
                raise BadRecordError(self.label, f"an image field holds {type(value).__name__} data, not a path")
            # Normalised so that one image spelt two ways ("a/../b.png", "b.png") is one candidate.
            paths.append(os.path.normpath(self.context.base_dir / Path(value).expanduser()))
        return tuple(paths)

    def mmeb_side(self, raw_text: object, images: list, *, is_query: bool, what: str) -> Side:
        """A side of an MMEB row: the image marker stripped, the instruction split off the text."""
        text = _as_text(raw_text)
        paths = self.paths(images)
        has_marker = bool(IMAGE_MARKER.search(text))
        if has_marker and not paths:
            raise BadRecordError(self.label, f"{what} text has an image marker but no image path")
        instruction, text = _split_instruction(_strip_markers(text), is_query=is_query, has_marker=has_marker)
        return Side(instruction=instruction or (self.default_instruction if is_query else ""), text=text, images=paths)

    def mmeb_v2_side(self, instruction: object, text: object, images: list, what: str) -> Side:
        """A side of an MMEB-V2 eval row, whose instruction has a column of its own; image markers stripped."""
        paths = self.paths(images)
        instruction = _as_text(instruction)
        if IMAGE_MARKER.search(instruction) and not paths:
            raise BadRecordError(self.label, f"{what} instruction has an image marker but no image path")
        return Side(instruction=_strip_markers(instruction), text=_strip_markers(_as_text(text)), images=paths)

    def mmeb_targets(self, pairs: Iterator[tuple[object, object]], what: str) -> tuple[Side, ...]:
        return tuple(self.mmeb_side(text, [image], is_query=False, what=what) for text, image in pairs)

    def record(
        self,
        *,
        query: Side,
        positives: tuple[Side, ...],
        default_split: str,
        negatives: tuple[Side, ...] = (),
        pool: tuple[Side, ...] | None = None,
    ) -> SourceRecord:
        return SourceRecord(
            label=self.label,
            id=self.text("id") or f"{self.context.id_prefix}-{self.index}",
            task=self.text("task") or self.context.task,
            split=self.text("split") or self.context.split or default_split,
            query=query,
            positives=positives,
            relevance=self._relevance(len(positives)),
            negatives=negatives,
            pool=pool,
            cot=self.text(self.context.options.cot_column or "cot"),
            difficulty=self.text("difficulty"),
            meta_task=self.text("meta_task") or None,
        )

    def _relevance(self, positives: int) -> tuple[float, ...]:
        given = self.values("pos_relevance")
        if not given:
            return (1.0,) * positives
        try:
            relevance = tuple(float(value) for value in given)
        except (TypeError, ValueError):
            raise BadRecordError(self.label, f"pos_relevance {given!r} is not a list of numbers") from None
        if len(relevance) != positives:
            raise BadRecordError(self.label, f"pos_relevance has {len(relevance)} values for {positives} positives")
        return relevance


def _pairs(texts: list, images: list) -> Iterator[tuple[object, object]]:
    """Targets from parallel text and image lists (position i of each is target i); empty pairs are no target."""
    for text, image in zip_longest(texts, images, fillvalue=""):
        if _as_text(text) or image:
            yield text, image


def _split_instruction(text: str, *, is_query: bool, has_marker: bool) -> tuple[str, str]:
    """MMEB writes the instruction into the text ("Represent the given image with the question: What ...").

    A query's instruction ends at its first colon; a target only has one when it is an image (the marker
    was there), since plain target texts (captions, answers, labels) may hold colons of their own. Without
    a colon the whole text of an image side is its instruction ("Represent the given image.").
    """
    if not (is_query or has_marker):
        return "", text
    head = re.match(r"(.*?:)\s+(.*)", text, re.DOTALL)
    if head:
        return head[1].strip(), head[2].strip()
    return (text, "") if has_marker else ("", text)


def _strip_markers(text: str) -> str:
    return IMAGE_MARKER.sub("", text).strip()


def _as_text(value: object) -> str:
    if value is None:
        return ""
    return (value if isinstance(value, str) else str(value)).strip()


def _as_list(value: object) -> list:
    if isinstance(value, str):
        value = value.strip()
    if value is None or value == "":
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _chain(readers: Iterator[Iterator[SourceItem]]) -> Iterator[SourceItem]:
    for reader in readers:
        yield from reader


# ---------------------------------------------------------------------------------------------- image folders


def read_image_folder(root: Path, options: ReadOptions) -> Iterator[SourceItem]:
    """Classification records of an image folder: root/<class>/<image> (or root/<split>/<class>/<image>).

    The task is named after the root folder; its candidates are the class names (underscores read as
    spaces) and form one global pool; each image's gold candidate is its class. A sub-folder inside a
    class folder (its frames) or a video file is a video, which makes a video-classification record.
    """
    task = options.task or root.name
    for split, split_dir in _image_folder_splits(root, options.split).items():
        for class_dir in _class_dirs(split_dir):
            label = Side(text=class_dir.name.replace("_", " "))
            yield SourceCandidate(label=class_dir.relative_to(root).as_posix(), task=task, side=label)
            for item in _class_media(class_dir):
                meta_task = "video_classification" if item.is_dir() or is_video_file(item) else "classification"
                relative = item.relative_to(root).as_posix()
                yield SourceRecord(
                    label=relative,
                    id=f"{task}/{PurePosixPath(relative).with_suffix('')}",
                    task=task,
                    split=split,
                    query=Side(
                        instruction=options.instruction or CLASSIFICATION_INSTRUCTION[meta_task],
                        images=(str(item.absolute()),),
                    ),
                    positives=(label,),
                    relevance=(1.0,),
                    meta_task=meta_task,
                )


def _image_folder_splits(root: Path, split: str | None) -> dict[str, Path]:
    """{split: folder of class folders}; empty if `root` is not an image folder."""
    subfolders = _visible_subfolders(root)
    if subfolders and all(folder.name in KNOWN_SPLITS and _class_dirs(folder) for folder in subfolders):
        return {folder.name: folder for folder in subfolders}
    return {split or "train": root} if _class_dirs(root) else {}


def _class_dirs(folder: Path) -> list[Path]:
    return [subfolder for subfolder in _visible_subfolders(folder) if _class_media(subfolder)]


def _class_media(class_dir: Path) -> list[Path]:
    """The images and video (frame) folders of one class, in natural filename order."""
    media = [path for path in class_dir.iterdir() if not path.name.startswith(".") and _is_media(path)]
    return sorted(media, key=lambda path: natural_key(path.name))


def _is_media(path: Path) -> bool:
    # Only a folder that holds images is a video: other folders (a prepared output, say) are not records.
    if path.is_dir():
        return any(is_image_file(frame) for frame in path.iterdir())
    return is_image_file(path) or is_video_file(path)


def _visible_subfolders(folder: Path) -> list[Path]:
    return sorted(path for path in folder.iterdir() if path.is_dir() and not path.name.startswith("."))

