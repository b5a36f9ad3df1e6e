"""Inputs to embed or route: an image folder, a JSONL file of records, JSONL on standard input, or the
candidates of a prepared dataset (what `twn embed DATA -o cache.pt` turns into train-rl's negatives cache).

A JSONL record is an object with any of `id`, `text`, `image` (one path) or `images` (a list of paths),
and `instruction`. Relative image paths are relative to the JSONL file (to the working directory on stdin).
Records are read lazily and their images opened batch by batch, so inputs of any size stream through.
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
    # Why the record could not be parsed; reported when it is loaded, so --skip-bad treats all problems alike.
    problem: str | None = None

    def load(self) -> ModelInput:
        """The model input with its images opened; BadRecordError if it is unusable, naming the record."""
        if self.problem is not None:
            raise BadRecordError(self.where, self.problem)
        if not self.text.strip() and not self.image_paths:
            raise BadRecordError(self.where, f"record '{self.id}' has neither text nor images")
        images = []
        for path in self.image_paths:
            try:
                images.append(load_image(path))
            except ValueError as error:
                # An image folder's record is named by its path already.
                subject = "" if self.where == str(path) else f"record '{self.id}': image '{path}' "
                raise BadRecordError(self.where, f"{subject}{error}") from None
        return ModelInput(text=self.text, images=images, instruction=self.instruction)


def read_inputs(source: str, stdin: TextIO | None = None) -> Iterator[InputRecord]:
    """Records from `source`: '-' (JSONL on stdin), a prepared dataset's candidates, a directory of images, or a .jsonl file."""
    if source == "-":
        yield from _unique(_read_jsonl(stdin or standard_input(), "<stdin>", Path.cwd()))
        return
    from twn_cli.data.prepared import is_prepared_dir  # imports `datasets`: only when a directory is given

    path = Path(source)
    if path.is_dir() and is_prepared_dir(path):
        yield from _unique(_read_prepared_candidates(path))
    elif path.is_dir():
        yield from _read_image_folder(path)
    elif path.is_file() and path.suffix in {".jsonl", ".json", ".ndjson"}:
        with open(path, encoding="utf-8", errors="surrogateescape") as handle:
            yield from _unique(_read_jsonl(handle, str(path), path.parent))
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
        )


def _read_jsonl(lines: Iterable[str], name: str, base: Path) -> Iterator[InputRecord]:
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
        yield _record(fields, where, base, default_id=str(number))


def _record(fields: dict, where: str, base: Path, default_id: str) -> InputRecord:
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
    return InputRecord(
        id=record_id,
        where=where,
        text=text,
        image_paths=[base / image for image in images],
        instruction=instruction,
    )


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
