"""Inputs to embed or route: an image folder, a JSONL file of records, JSONL on standard input, or the
candidates of a prepared dataset (what `twn embed DATA -o cache.pt` turns into train-rl's negatives cache).

A JSONL record is an object with any of `id`, `text`, `image` (one path) or `images` (a list of paths),
`video` (a folder of frames, a list of frame paths, or a video file) with `num_frames` (frames sampled from
it, default 8) and `fps` (the frame rate of a folder's or list's frames), and `instruction`. An image path
naming a folder or a video file is that video, as in `twn prepare`. Relative paths are relative to the JSONL
file (to the working directory on stdin). Records are read lazily and their pictures opened batch by batch,
so inputs of any size stream through.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from twn_cli.data.images import IMAGE_SUFFIXES, load_image
from twn_cli.data.unicode import first_unicode_problem, standard_input, unicode_problem
from twn_cli.data.videos import DEFAULT_NUM_FRAMES, VideoClip, is_video_file, sample_clip
from twn_cli.distributed import batched, prepared_in_order
from twn_cli.errors import BadRecordError, TWNError
from twn_cli.types import ModelInput

log = logging.getLogger(__name__)


@dataclass
class InputRecord:
    """One input before its images are opened; `where` names it in messages (file:line or a path)."""

    id: str
    where: str
    text: str = ""
    image_paths: list[Path] = field(default_factory=list)
    instruction: str | None = None
    video: VideoClip | None = None
    # Why the record could not be parsed; reported when it is loaded, so --skip-bad treats all problems alike.
    problem: str | None = None

    def load(self) -> ModelInput:
        """The model input with its images opened; BadRecordError if it is unusable, naming the record."""
        if self.problem is not None:
            raise BadRecordError(self.where, self.problem)
        if not self.text.strip() and not self.image_paths and self.video is None:
            raise BadRecordError(self.where, f"record '{self.id}' has neither text nor images nor a video")
        images = []
        for path in self.image_paths:
            try:
                images.append(load_image(path))
            except ValueError as error:
                # An image folder's record is named by its path already.
                subject = "" if self.where == str(path) else f"record '{self.id}': image '{path}' "
                raise BadRecordError(self.where, f"{subject}{error}") from None
        try:
            video = self.video.load() if self.video is not None else None
        except ValueError as error:
            raise BadRecordError(self.where, f"record '{self.id}': video: {error}") from None
        return ModelInput(text=self.text, images=images, instruction=self.instruction, video=video)


def read_inputs(source: str, stdin: TextIO | None = None, frames: int = DEFAULT_NUM_FRAMES) -> Iterator[InputRecord]:
    """Records from `source`: '-' (JSONL on stdin), a prepared dataset's candidates, a directory of images, or a .jsonl file.

    `frames`: frames sampled from each video of a record that does not say (`num_frames`).
    """
    if frames < 1:
        raise TWNError(f"frames per video must be at least 1, not {frames}")
    if source == "-":
        yield from _unique(_read_jsonl(stdin or standard_input(), "<stdin>", Path.cwd(), frames))
        return
    from twn_cli.data.prepared import is_prepared_dir  # imports `datasets`: only when a directory is given

    path = Path(source)
    if path.is_dir() and is_prepared_dir(path):
        yield from _unique(_read_prepared_candidates(path))
    elif path.is_dir():
        yield from _read_image_folder(path)
    elif path.is_file() and path.suffix in {".jsonl", ".json", ".ndjson"}:
        with open(path, encoding="utf-8", errors="surrogateescape") as handle:
            yield from _unique(_read_jsonl(handle, str(path), path.parent, frames))
    elif path.exists():
        raise TWNError(f"cannot read inputs from '{source}': give an image folder, a .jsonl file, or - for stdin")
    else:
        raise TWNError(f"input '{source}' does not exist")


def check_output_is_not_input(output: str, source: str) -> None:
    """Refuse an output file that is the input itself: writing it would replace the records being read."""
    if "-" in (output, source) or not Path(source).is_file():
        return
    if Path(output).resolve() == Path(source).resolve() or (Path(output).exists() and os.path.samefile(output, source)):
        raise TWNError(f"the output '{output}' is the input '{source}': write to another file")


def _read_image_folder(folder: Path) -> Iterator[InputRecord]:
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise TWNError(f"image folder '{folder}' holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    for path in paths:
        record_id = path.relative_to(folder).as_posix()
        problem = unicode_problem(record_id)
        yield InputRecord(id=record_id, where=str(path), image_paths=[path], problem=problem and f"its file name {problem}")


def _read_prepared_candidates(folder: Path) -> Iterator[InputRecord]:
    from twn_cli.data.prepared import load_prepared

    candidates = load_prepared(folder).candidates
    for number, row in enumerate(candidates):
        yield InputRecord(
            id=row["id"],
            where=f"{folder}:candidate {number}",
            text=row["text"],
            image_paths=[Path(image) for image in row["images"]],
            instruction=row["instruction"] or None,  # empty: the model's default, as prepared_input reads it
            video=VideoClip.from_row(row["video"]),
        )


def _read_jsonl(lines: Iterable[str], name: str, base: Path, frames: int) -> Iterator[InputRecord]:
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{name}:{number}"
        try:
            fields = json.loads(line)
        except json.JSONDecodeError as error:
            yield InputRecord(id=f"line-{number}", where=where, problem=f"not valid JSON ({error.msg})")
            continue
        if not isinstance(fields, dict):
            yield InputRecord(id=f"line-{number}", where=where, problem="a record must be a JSON object")
            continue
        yield _record(fields, where, base, default_id=str(number), frames=frames)


def _record(fields: dict, where: str, base: Path, default_id: str, frames: int) -> InputRecord:
    record_id = str(fields.get("id", default_id))
    images = fields.get("images", [])
    if "image" in fields:
        images = [fields["image"], *images] if isinstance(images, list) else images
    if not isinstance(images, list) or not all(isinstance(image, str) for image in images):
        return InputRecord(id=record_id, where=where, problem="'images' must be a list of paths ('image' one path)")
    text = fields.get("text", "")
    instruction = fields.get("instruction")
    if not isinstance(text, str) or not (instruction is None or isinstance(instruction, str)):
        return InputRecord(id=record_id, where=where, problem="'text' and 'instruction' must be strings")
    if problem := unicode_problem(record_id):
        return InputRecord(id=record_id, where=where, problem=f"its 'id' {problem}")
    if problem := first_unicode_problem([("'text'", text), ("'instruction'", instruction), ("'images'", images)]):
        return InputRecord(id=record_id, where=where, problem=f"record '{record_id}': {problem}")
    paths = [base / image for image in images]
    try:
        video = _video(fields, base, frames, [path for path in paths if path.is_dir() or is_video_file(path)])
    except ValueError as error:
        return InputRecord(id=record_id, where=where, problem=f"video: {error}")
    return InputRecord(
        id=record_id,
        where=where,
        text=text,
        image_paths=[path for path in paths if not (path.is_dir() or is_video_file(path))],
        instruction=instruction,
        video=video,
    )


def _video(fields: dict, base: Path, frames: int, in_images: list[Path]) -> VideoClip | None:
    """The record's video, sampled: its `video` field, or a folder or video file among its images."""
    source = fields.get("video")
    num_frames, fps = fields.get("num_frames", frames), fields.get("fps")
    if not (isinstance(num_frames, int) and not isinstance(num_frames, bool)) or not (fps is None or isinstance(fps, (int, float))):
        raise ValueError("'num_frames' must be a whole number and 'fps' a number")
    if isinstance(source, list) and all(isinstance(frame, str) for frame in source):
        source = [str(base / frame) for frame in source]
    elif isinstance(source, str):
        source = base / source
    elif source is not None:
        raise ValueError("'video' must be a path (a folder of frames or a video file) or a list of frame paths")
    sources = in_images + ([source] if source is not None else [])
    if len(sources) > 1:
        raise ValueError(f"a record holds one video, not {len(sources)}")
    return sample_clip(sources[0], num_frames, fps) if sources else None


def _unique(records: Iterable[InputRecord]) -> Iterator[InputRecord]:
    seen: dict[str, str] = {}
    for record in records:
        if record.id in seen and record.problem is None:
            record.problem = f"duplicate id '{record.id}' (first at {seen[record.id]})"
        seen.setdefault(record.id, record.where)
        yield record


def loaded_batches(
    records: Iterable[InputRecord], batch_size: int, skip_bad: bool, skipped: list[BadRecordError]
) -> Iterator[tuple[list[str], list[ModelInput]]]:
    """The loaded (ids, inputs) of each block of `batch_size` records that keeps any (see `load_block`),
    opened in a background thread one block ahead of the consumer."""
    for ids, inputs in prepared_in_order(batched(records, batch_size), lambda block: load_block(block, skip_bad, skipped)):
        if ids:
            yield ids, inputs


def load_block(
    block: Iterable[InputRecord], skip_bad: bool, skipped: list[BadRecordError]
) -> tuple[list[str], list[ModelInput]]:
    """Ids and loaded inputs of `block`; a bad record raises, or with `skip_bad` is logged and added to `skipped`.

    A skipped record leaves its block one input short rather than pulling in the next record: blocks are
    fixed before anything is loaded, because under several processes each loads only its own blocks.
    """
    ids: list[str] = []
    inputs: list[ModelInput] = []
    for record in block:
        try:
            loaded = record.load()
        except BadRecordError as error:
            if not skip_bad:
                raise
            log.warning("skipped %s", error)
            skipped.append(error)
            continue
        ids.append(record.id)
        inputs.append(loaded)
    return ids, inputs
