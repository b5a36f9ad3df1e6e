"""Readers of the MMEB-V2 benchmark as its maintainers distribute it: one reader per layout of the registry.

Under the benchmark root (ROOT):
- image tasks: ROOT/image-tasks/<task>/test-*.parquet (`qry_inst`, `qry_text`, `qry_img_path`, `tgt_inst`,
  `tgt_text`, `tgt_img_path`; the first target is the gold one, all of them the query's pool), images
  relative to ROOT/image-tasks;
- video tasks: the annotation files of each hub dataset in ROOT/video-tasks/<dataset>/ and the frame folders
  of MMEB-V2 in ROOT/video-tasks/frames/<kind>/<dataset>/<video>/;
- visual-document tasks in the BEIR layout: ROOT/visdoc-tasks/<dataset>/{queries,corpus,qrels}/<split>-*.parquet
  and the page images in ROOT/visdoc-tasks/<pages>/. Pages that the corpus parquet holds but the page folder
  lacks are written there, as the maintainers' code does.

Annotation files are parquet or JSONL, in a hub layout: `<split>-00000-of-00001.parquet`, optionally under the
folder of a hub config, or `<split>/0000.parquet`. A video is the path of its frame folder; `twn prepare`
samples its frames (`sources.sample_frames`). Readers open no image: `twn prepare` validates every record.
A file that is missing or unreadable in a task that is there is a BadRecordError naming it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from functools import cache
from importlib import resources
from pathlib import Path

import pyarrow
import pyarrow.parquet

from twn_cli.atomic import atomic_file
from twn_cli.data.mmeb_v2_tasks import MMEBTask
from twn_cli.data.sources import (
    HUB_SHARD_NAME,
    ReadOptions,
    Side,
    SourceCandidate,
    SourceItem,
    SourceRecord,
    read_record_file,
    read_rows,
)
from twn_cli.data.videos import natural_key
from twn_cli.errors import BadRecordError, TWNError

logger = logging.getLogger(__name__)

ANNOTATION_SUFFIXES = (".parquet", ".jsonl")
LABELS_FILE = "mmeb_v2_labels.json"  # the class names of the video-classification tasks ranked against all of them


def annotation_files(root: Path, task: MMEBTask, config: str | None = None) -> list[Path] | None:
    """The task's annotation files of its split (in `config`, default the task's), or None when the task's
    data folder is not under `root` (the task is missing). A folder without them is a BadRecordError."""
    folder = root / task.data
    if not folder.is_dir():
        return None
    config = config or task.config
    found = []
    for path in folder.rglob("*"):
        parts = path.relative_to(folder).parts
        if path.suffix.lower() not in ANNOTATION_SUFFIXES or any(part.startswith(".") for part in parts):
            continue
        shard = HUB_SHARD_NAME.match(path.stem)
        in_split = path.stem == task.split or (shard and shard["split"] == task.split) or task.split in parts[:-1]
        if in_split and (config is None or config in parts[:-1]) and path.is_file():
            found.append(path)
    if not found:
        where = folder / config if config else folder
        raise BadRecordError(str(where), f"no '{task.split}' annotation file ({' or '.join(ANNOTATION_SUFFIXES)})")
    return sorted(found)


def read_task(root: Path, task: MMEBTask, files: list[Path]) -> Iterator[SourceItem]:
    """The records (and pool-only candidates) of one task, from its annotation `files`."""
    media = root / task.media
    # A page folder may be absent: the corpus parquet can hold the pages, which are then written there.
    if not media.is_dir() and task.modality != "visdoc":
        raise BadRecordError(str(media), "folder not found (the task's images or frames)")
    return _READERS[task.layout](_Context(root, task, media), files)


class _Context:
    """One task being read: where its files lie, and how its records are made."""

    def __init__(self, root: Path, task: MMEBTask, media: Path):
        self.root, self.task, self.media = root, task, media

    def rows(self, files: list[Path]) -> Iterator[tuple[int, str, Mapping]]:
        """(number over all the files, label, row) of every row."""
        number = 0
        for path in files:
            for label, row in read_rows(path, path.relative_to(self.root).as_posix()):
                yield number, label, row
                number += 1

    def config_of(self, label: str) -> str:
        """The hub config (first folder under the task's data folder) of the file a row label names."""
        return Path(label.rsplit(":", 1)[0]).relative_to(self.task.data).parts[0]

    def record(self, record_id: object, label: str, query: Side, golds: tuple[Side, ...], *,
               pool: tuple[Side, ...] | None = None, relevance: tuple[float, ...] | None = None) -> SourceRecord:
        return SourceRecord(
            label=label, id=f"{self.task.name}/{record_id}", task=self.task.name, split="test", query=query,
            positives=golds, relevance=relevance or (1.0,) * len(golds), pool=pool, meta_task=self.task.meta_task,
        )

    def video(self, label: str, folder: Path) -> tuple[str, ...]:
        """A video as its frame folder (sampled by `twn prepare`)."""
        if not folder.is_dir():
            raise BadRecordError(label, f"frame folder '{folder}' not found")
        return (str(folder),)

    def query(self, text: str = "", images: tuple[str, ...] = (), given_input: str = "text") -> Side:
        return Side(instruction=self.task.query_instruction_for(given_input) or "", text=text, images=images)

    def target(self, images: tuple[str, ...]) -> Side:
        return Side(instruction=self.task.target_instruction or "", images=images)


def _field(label: str, row: Mapping, name: str):
    value = row.get(name)
    if value is None or (isinstance(value, (str, list)) and not value):
        raise BadRecordError(label, f"no '{name}'")
    return value


def _text(value) -> str:
    return str(value).strip()


# ---------------------------------------------------------------------------------------------- image tasks
def _image_tasks(context: _Context, files: list[Path]) -> Iterator[SourceItem]:
    """MMEB-V2's eval parquet, read as `twn prepare` reads any MMEB eval file; ids numbered like the others'."""
    options = ReadOptions(image_root=context.root / "image-tasks", task=context.task.name, split="test")
    number = 0
    for path in files:
        for item in read_record_file(path, path.relative_to(context.root).as_posix(), options):
            if isinstance(item, BadRecordError):
                raise item
            yield dataclasses.replace(item, id=f"{context.task.name}/{number}", meta_task=context.task.meta_task)
            number += 1


# ---------------------------------------------------------------------------------------------- video classification
@cache
def _class_names() -> dict[str, list[str]]:
    return json.loads(resources.files("twn_cli.data").joinpath(LABELS_FILE).read_text(encoding="utf-8"))


def _video_classification(context: _Context, files: list[Path]) -> Iterator[SourceItem]:
    """Each clip against every class name of its dataset (the task's global pool)."""
    for name in _class_names()[context.task.name]:
        yield SourceCandidate(label=f"{context.task.name} class names", task=context.task.name, side=Side(text=name))
    for number, label, row in context.rows(files):
        frames = context.video(label, context.media / _text(_field(label, row, "video_id")))
        gold = Side(text=_text(_field(label, row, "pos_text")))
        yield context.record(number, label, context.query(images=frames, given_input="video"), (gold,))


def _ssv2(context: _Context, files: list[Path]) -> Iterator[SourceItem]:
    """Each clip against its own list of choices (`neg_text`, which holds the gold `pos_text`)."""
    for number, label, row in context.rows(files):
        frames = context.video(label, context.media / _text(_field(label, row, "video_id")))
        choices = tuple(Side(text=_text(choice)) for choice in _field(label, row, "neg_text"))
        gold = Side(text=_text(_field(label, row, "pos_text")))
        yield context.record(number, label, context.query(images=frames, given_input="video"), (gold,), pool=choices)


# ---------------------------------------------------------------------------------------------- video retrieval
# layout -> (the column naming the video, the caption column); a list of captions counts by its first.
_VIDEO_RETRIEVAL_COLUMNS = {
    "msrvtt": ("video_id", "caption"),
    "msvd": ("video_id", "caption"),
    "didemo": ("video", "caption"),  # a file name: its frame folder is the name without the extension
    "youcook2": ("id", "sentence"),
    "vatex": ("videoID", "enCap"),
}


def _video_retrieval(context: _Context, files: list[Path]) -> Iterator[SourceItem]:
    """Each caption against every video of the task (the task's global pool)."""
    video_column, caption_column = _VIDEO_RETRIEVAL_COLUMNS[context.task.layout]
    for number, label, row in context.rows(files):
        video = _text(_field(label, row, video_column))
        if context.task.layout == "didemo":
            video = Path(video).stem
        caption = _field(label, row, caption_column)
        caption = caption[0] if isinstance(caption, (list, tuple)) else caption
        frames = context.video(label, context.media / video)
        yield context.record(number, label, context.query(text=_text(caption)), (context.target(frames),))


# ---------------------------------------------------------------------------------------------- moment retrieval
def _moment_retrieval(context: _Context, files: list[Path]) -> Iterator[SourceItem]:
    """A description and the whole video (its `query/` frames) against the clip folders cut from it, one
    of which is named `positive*`."""
    for number, label, row in context.rows(files):
        folder = context.media / Path(_text(_field(label, row, "video_path"))).stem
        query_frames = context.video(label, folder / "query")
        clips = sorted(
            (path for path in folder.iterdir() if path.is_dir() and path.name != "query"),
            key=lambda path: natural_key(path.name),
        )
        golds = [clip for clip in clips if clip.name.startswith("positive")]
        if len(golds) != 1:
            raise BadRecordError(label, f"'{folder}' holds {len(golds)} clip folders named positive*, not one")
        pool = tuple(context.target((str(clip),)) for clip in clips)
        query = context.query(text=_text(_field(label, row, "query")), images=query_frames, given_input="video")
        yield context.record(number, label, query, (context.target((str(golds[0]),)),), pool=pool)


def _momentseeker(context: _Context, files: list[Path]) -> Iterator[SourceItem]:
    """A description, with an image or a video segment or neither, against positive and negative clips."""
    frames_root = context.media / "video_frames"
    for number, label, row in context.rows(files):
        text = _text(_field(label, row, "query"))
        given = _text(row.get("input_frames") or "")
        if given.endswith(".mp4"):
            frames = context.video(label, frames_root / _clip_name(given))
            query = context.query(text, frames, given_input="video")
        elif given.endswith(".jpg"):
            query = context.query(text, (str(context.media / f"query_{given}"),), given_input="image")
        else:
            query = context.query(text)

        def clips(column: str, row=row, label=label) -> tuple[Side, ...]:
            paths = [entry["output_path"] for entry in row.get(column) or ()]
            return tuple(context.target(context.video(label, frames_root / _clip_name(path))) for path in paths)

        golds = clips("positive_frames")
        if not golds:
            raise BadRecordError(label, "no positive_frames")
        yield context.record(number, label, query, golds, pool=golds + clips("negative_frames"))


def _clip_name(path: str) -> str:
    return path.replace("/", "_").split(".mp4")[0]


# ---------------------------------------------------------------------------------------------- video QA
def _video_qa(context: _Context, files: list[Path]) -> Iterator[SourceItem]:
    """A question about the video's frames (with its options) against the answer options."""
    question_of = _QUESTIONS[context.task.layout]
    for number, label, row in context.rows(files):
        video, text, choices, gold = question_of(context, label, row)
        frames = context.video(label, context.media / video)
        query = context.query(text, frames, given_input="video")
        yield context.record(number, label, query, (Side(text=gold),), pool=tuple(Side(text=c) for c in choices))


def _option_text(option: str) -> str:
    """An option without its letter ("A. Five." -> "Five"), as MMEB-V2's evaluation strips it."""
    _, separator, rest = option.partition(". ")
    return (rest if separator else option).strip(". ")


def _lettered(question: str, choices: list[str]) -> tuple[str, list[str]]:
    """The question followed by its lettered options, and the options as candidates ("(A) ...")."""
    options = [f"({chr(ord('A') + index)}) {choice}" for index, choice in enumerate(choices)]
    return "\n".join([question, "Options:", *options]), options


def _chosen(label: str, choices: list[str], index: int) -> str:
    if not 0 <= index < len(choices):
        raise BadRecordError(label, f"the answer is none of the {len(choices)} options")
    return choices[index]


def _videomme(context: _Context, label: str, row: Mapping) -> tuple[str, str, list[str], str]:
    options = [_text(option) for option in _field(label, row, "options")]
    choices = [_option_text(option) for option in options]
    text = _text(_field(label, row, "question")) + "\n" + "\n".join(options)
    gold = _chosen(label, choices, "ABCD".find(_text(row.get("answer"))))
    return _text(_field(label, row, "videoID")), text, choices, gold


def _egoschema(context: _Context, label: str, row: Mapping) -> tuple[str, str, list[str], str]:
    options = [_text(option) for option in _field(label, row, "option")]
    choices = [_option_text(option) for option in options]
    # As the maintainers join them: the options follow the question without a separator.
    text = _text(_field(label, row, "question")) + " ".join(options)
    gold = _chosen(label, choices, int(_field(label, row, "answer")))
    return _text(_field(label, row, "video_idx")), text, choices, gold


def _nextqa(context: _Context, label: str, row: Mapping) -> tuple[str, str, list[str], str]:
    text, choices = _lettered(_text(_field(label, row, "question")), [_text(row.get(f"a{i}")) for i in range(5)])
    return _text(_field(label, row, "video")), text, choices, _chosen(label, choices, int(_field(label, row, "answer")))


def _mvbench(context: _Context, label: str, row: Mapping) -> tuple[str, str, list[str], str]:
    answers = [_text(choice) for choice in _field(label, row, "candidates")]
    answer = _text(_field(label, row, "answer"))
    text, choices = _lettered(_text(_field(label, row, "question")), answers)
    # A sub-task is a hub config; its frames lie in a folder of that name. An answer that is none of the
    # options is scored as a miss, as in the maintainers' evaluation.
    subset = _text(row.get("subset") or context.config_of(label))
    gold = f"({chr(ord('A') + answers.index(answer))}) {answer}" if answer in answers else answer
    return f"{subset}/{_text(_field(label, row, 'video'))}", text, choices, gold


def _activitynetqa(context: _Context, label: str, row: Mapping) -> tuple[str, str, list[str], str]:
    choices = ["yes", "no"]
    answer = _text(_field(label, row, "answer"))
    text = _text(_field(label, row, "question")) + "? (A) yes; (B) no."
    video = f"v_{_text(_field(label, row, 'video_name'))}"
    return video, text, choices, _chosen(label, choices, choices.index(answer) if answer in choices else -1)


_QUESTIONS = {
    "videomme": _videomme, "egoschema": _egoschema, "nextqa": _nextqa, "mvbench": _mvbench,
    "activitynetqa": _activitynetqa,
}


# ---------------------------------------------------------------------------------------------- visual documents
def _page_file(layout: str, corpus_id: str) -> str:
    if layout == "visrag":
        # VisRAG page names can be very long: the maintainers shorten them and add a hash of the whole name.
        base, extension = os.path.splitext(corpus_id)
        return f"{base[:50]}_{hashlib.md5(corpus_id.encode('utf-8')).hexdigest()[:8]}{extension}"
    return f"{corpus_id}.png"


def _documents(context: _Context, query_files: list[Path]) -> Iterator[SourceItem]:
    """BEIR: every query against every page of the corpus, its relevant pages graded by qrels (score > 0)."""
    task = context.task
    corpus_files = annotation_files(context.root, task, "corpus")
    qrels_files = annotation_files(context.root, task, "qrels")
    relevance: dict[str, dict[str, float]] = {}
    for _, label, row in context.rows(qrels_files):
        score = row.get("score")
        if not isinstance(score, (int, float)):
            raise BadRecordError(label, f"score {score!r} is not a number")
        if score > 0:
            query_pages = relevance.setdefault(_text(_field(label, row, "query-id")), {})
            page = _text(_field(label, row, "corpus-id"))
            query_pages[page] = max(float(score), query_pages.get(page, 0.0))
    pages = _corpus_pages(context, corpus_files)
    for page_id in pages:
        yield SourceCandidate(label=f"{task.data}/corpus", task=task.name, side=context.target((pages[page_id],)))
    for _, label, row in context.rows(query_files):
        query_id = _text(_field(label, row, "query-id"))
        graded = relevance.get(query_id)
        if not graded:
            raise BadRecordError(label, f"query '{query_id}' has no relevant page in {task.data}/qrels")
        golds = []
        for page_id in graded:
            path = pages.get(page_id) or str(context.media / _page_file(task.layout, page_id))
            if not Path(path).is_file():
                raise BadRecordError(label, f"page '{path}' of corpus-id '{page_id}' not found")
            golds.append(context.target((path,)))
        query = context.query(text=_text(_field(label, row, "query")))
        yield context.record(query_id, label, query, tuple(golds), relevance=tuple(graded.values()))


def _corpus_pages(context: _Context, files: list[Path]) -> dict[str, str]:
    """corpus-id -> page image file; a page missing from the page folder is written from the corpus parquet."""
    pages: dict[str, str] = {}
    missing: dict[str, str] = {}
    for page_id in _column(context, files, "corpus-id"):
        path = context.media / _page_file(context.task.layout, page_id)
        pages[page_id] = str(path)
        if not path.is_file():
            missing[page_id] = str(path)
    if missing:
        logger.info("%s: writing %d pages of the corpus parquet into %s", context.task.name, len(missing), context.media)
        for page_id, image in _column(context, files, "corpus-id", "image"):
            if page_id in missing:
                if not isinstance(image, Mapping) or not image.get("bytes"):
                    raise BadRecordError(missing[page_id], "page image not found, and the corpus holds no image for it")
                with atomic_file(Path(missing[page_id])) as staging:
                    Path(staging).write_bytes(image["bytes"])
    return pages


def _column(context: _Context, files: list[Path], *names: str) -> Iterator:
    """The values of `names` in every row of the files (tuples when several), reading only those columns."""
    for path in files:
        label = path.relative_to(context.root).as_posix()
        if path.suffix.lower() == ".jsonl":
            rows = (row for _, row in read_rows(path, label))
        else:
            try:
                batches = pyarrow.parquet.ParquetFile(path).iter_batches(batch_size=64, columns=list(names))
                rows = (row for batch in batches for row in batch.to_pylist())
            except (OSError, pyarrow.ArrowException) as error:
                raise TWNError(f"'{path}' is not a readable Parquet file with columns {names} ({error})") from None
        try:
            for row in rows:
                values = [row.get(name) for name in names]
                if values[0] is None:
                    raise BadRecordError(label, f"a row has no '{names[0]}'")
                values[0] = _text(values[0])
                yield values[0] if len(names) == 1 else tuple(values)
        except (OSError, pyarrow.ArrowException) as error:
            raise TWNError(f"'{path}' is not a readable Parquet file ({error})") from None


_READERS: dict[str, Callable[[_Context, list[Path]], Iterator[SourceItem]]] = {
    "mmeb-image": _image_tasks,
    "video-classification": _video_classification,
    "ssv2": _ssv2,
    **dict.fromkeys(_VIDEO_RETRIEVAL_COLUMNS, _video_retrieval),
    "moment-retrieval": _moment_retrieval,
    "momentseeker": _momentseeker,
    **dict.fromkeys(_QUESTIONS, _video_qa),
    "vidore": _documents,
    "visrag": _documents,
}
