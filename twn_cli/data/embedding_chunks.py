"""Reading what `twn embed` wrote a chunk of rows at a time, so that a search over millions of vectors holds
one chunk, not the file.

- .parquet: row by row group, the `embedding` column alone; ids are read back only from the row groups
  that hold results.
- .safetensors: the header names where the embeddings tensor lies; rows are read from there with plain file
  reads. Its ids live in the header as one JSON list, so resolving results parses all of them once.
- .pt: memory-mapped (torch.load(mmap=True, weights_only=True)); the pages read stay mapped, and count in
  the resident size, until the kernel needs them back. Its ids are one pickled list, loaded with it.
- .jsonl: streamed line by line; ids are found again by a second pass. It records no metadata.
"""

from __future__ import annotations

import json
import struct
from abc import ABC, abstractmethod
from bisect import bisect_right
from collections.abc import Iterable, Iterator
from itertools import accumulate
from pathlib import Path

import numpy as np

from twn_cli.data.embedding_files import FORMATS, _twn_values
from twn_cli.errors import TWNError


class EmbeddingSource(ABC):
    """One embedding file: its metadata, row count and dimension, its rows in chunks, the ids of some rows."""

    path: Path
    metadata: dict
    count: int
    dim: int

    @abstractmethod
    def chunks(self, rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, float32 [n, dim] array) for consecutive chunks of at most `rows` rows, in file order."""

    @abstractmethod
    def ids_at(self, rows: Iterable[int]) -> dict[int, str]:
        """The id of each of `rows`."""

    @abstractmethod
    def ids(self) -> Iterator[str]:
        """Every id, in file order."""


def open_embedding_source(path: str | Path) -> EmbeddingSource:
    path = Path(path)
    if not path.is_file():
        raise TWNError(f"embedding file '{path}' does not exist")
    kind = FORMATS.get(path.suffix)
    if kind is None:
        raise TWNError(f"cannot read embeddings from '{path}': use a file `twn embed` wrote ({', '.join(FORMATS)})")
    return {"parquet": _ParquetSource, "safetensors": _SafetensorsSource, "pt": _TorchSource, "jsonl": _JsonlSource}[kind](path)


class _ParquetSource(EmbeddingSource):
    def __init__(self, path: Path):
        import pyarrow.parquet as pq

        self.path = path
        try:
            self._file = pq.ParquetFile(path)
        except Exception as error:  # pyarrow raises ArrowInvalid and OSError for files that are not parquet
            raise TWNError(f"'{path}' is not a readable parquet file ({str(error).splitlines()[0]})") from None
        self.metadata = _twn_values(self._file.metadata)
        if "embedding_dim" not in self.metadata or "embedding" not in self._file.schema_arrow.names:
            raise TWNError(f"'{path}' was not written by `twn embed` (no embedding column or twn metadata)")
        self.count = self._file.metadata.num_rows
        self.dim = self.metadata["embedding_dim"]
        groups = self._file.metadata.num_row_groups
        self._group_starts = [0, *accumulate(self._file.metadata.row_group(group).num_rows for group in range(groups))]

    def chunks(self, rows: int) -> Iterator[tuple[int, np.ndarray]]:
        # Row group by row group, copied into each chunk: pyarrow's iter_batches over a whole file buffers
        # every row group it is going to read, and joining the pieces of a chunk would hold it twice.
        start, chunk, filled = 0, None, 0
        for group in range(self._file.metadata.num_row_groups):
            column = self._file.read_row_group(group, columns=["embedding"], use_threads=False).column(0)
            vectors = column.combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(-1, self.dim)
            taken = 0
            while taken < len(vectors):
                if chunk is None:
                    chunk, filled = np.empty((min(rows, self.count - start), self.dim), dtype=np.float32), 0
                count = min(len(chunk) - filled, len(vectors) - taken)
                chunk[filled : filled + count] = vectors[taken : taken + count]
                filled, taken = filled + count, taken + count
                if filled == len(chunk):
                    yield start, chunk
                    start, chunk = start + filled, None

    def ids(self) -> Iterator[str]:
        for group in range(self._file.metadata.num_row_groups):
            yield from self._file.read_row_group(group, columns=["id"], use_threads=False).column(0).to_pylist()

    def ids_at(self, rows: Iterable[int]) -> dict[int, str]:
        by_group: dict[int, list[int]] = {}
        for row in set(rows):
            by_group.setdefault(bisect_right(self._group_starts, row) - 1, []).append(row)
        found = {}
        for group, members in by_group.items():
            ids = self._file.read_row_group(group, columns=["id"]).column(0)
            found.update({row: ids[row - self._group_starts[group]].as_py() for row in members})
        return found


class _SafetensorsSource(EmbeddingSource):
    def __init__(self, path: Path):
        self.path = path
        header, self._data_start = _safetensors_header(path)
        self.metadata = {key: json.loads(value) for key, value in header.get("__metadata__", {}).items() if key != "ids"}
        entry = header.get("embeddings")
        if entry is None or entry.get("dtype") != "F32" or len(entry.get("shape", ())) != 2:
            raise TWNError(f"'{path}' was not written by `twn embed` (no float32 [rows, dim] tensor 'embeddings')")
        self.count, self.dim = entry["shape"]
        self._offset = self._data_start + entry["data_offsets"][0]

    def chunks(self, rows: int) -> Iterator[tuple[int, np.ndarray]]:
        row_bytes = self.dim * 4
        with open(self.path, "rb") as handle:
            handle.seek(self._offset)
            for start in range(0, self.count, rows):
                count = min(rows, self.count - start)
                data = bytearray(count * row_bytes)  # writable, so that torch can take it without a copy
                if handle.readinto(data) != len(data):
                    raise TWNError(f"'{self.path}' is truncated: its header promises {self.count} rows")
                yield start, np.frombuffer(data, dtype="<f4").reshape(count, self.dim)

    def ids(self) -> Iterator[str]:
        header, _ = _safetensors_header(self.path)
        yield from json.loads(header["__metadata__"]["ids"])

    def ids_at(self, rows: Iterable[int]) -> dict[int, str]:
        wanted = set(rows)
        return {row: record_id for row, record_id in enumerate(self.ids()) if row in wanted}


def _safetensors_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and where its data begins (the format's 8-byte length prefix)."""
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
        text = handle.read(length) if 0 < length < path.stat().st_size else b""
    try:
        return json.loads(text), 8 + length
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise TWNError(f"'{path}' is not a safetensors file (its header is unreadable)") from None


class _TorchSource(EmbeddingSource):
    def __init__(self, path: Path):
        import torch

        self.path = path
        try:
            content = torch.load(path, weights_only=True, map_location="cpu", mmap=True)
        except Exception as error:  # torch raises UnpicklingError and others for untrusted or broken files
            raise TWNError(f"'{path}' is not a plain tensor file (refused to unpickle: {str(error).splitlines()[0]})") from None
        if not isinstance(content, dict) or "embeddings" not in content or "ids" not in content:
            raise TWNError(f"'{path}' was not written by `twn embed` (no 'embeddings' and 'ids')")
        self._embeddings, self._ids = content["embeddings"], content["ids"]
        self.metadata = {key: value for key, value in content.items() if key not in ("ids", "embeddings", "think", "p_think", "reasoning_tokens", "cot")}
        self.count, self.dim = self._embeddings.shape

    def chunks(self, rows: int) -> Iterator[tuple[int, np.ndarray]]:
        for start in range(0, self.count, rows):
            yield start, self._embeddings[start : start + rows].float().numpy()

    def ids(self) -> Iterator[str]:
        yield from self._ids

    def ids_at(self, rows: Iterable[int]) -> dict[int, str]:
        return {row: self._ids[row] for row in rows}


class _JsonlSource(EmbeddingSource):
    def __init__(self, path: Path):
        self.path = path
        self.metadata = {}
        self.count = 0
        self.dim = 0
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    if not self.dim:
                        self.dim = len(self._record(line, number)["embedding"])
                    self.count += 1
        if not self.count:
            raise TWNError(f"'{path}' holds no embeddings")

    def _record(self, line: str, number: int) -> dict:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise TWNError(f"{self.path}:{number}: not valid JSON ({error.msg})") from None
        if not isinstance(record, dict) or "id" not in record or not isinstance(record.get("embedding"), list):
            raise TWNError(f"{self.path}:{number}: not a record of `twn embed` (it needs 'id' and 'embedding')")
        if self.dim and len(record["embedding"]) != self.dim:
            raise TWNError(f"{self.path}:{number}: an embedding of {len(record['embedding'])} numbers where the first has {self.dim}")
        return record

    def _records(self) -> Iterator[dict]:
        with open(self.path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    yield self._record(line, number)

    def chunks(self, rows: int) -> Iterator[tuple[int, np.ndarray]]:
        start, block = 0, []
        for record in self._records():
            block.append(record["embedding"])
            if len(block) == rows:
                yield start, np.asarray(block, dtype=np.float32)
                start, block = start + rows, []
        if block:
            yield start, np.asarray(block, dtype=np.float32)

    def ids(self) -> Iterator[str]:
        for record in self._records():
            yield str(record["id"])

    def ids_at(self, rows: Iterable[int]) -> dict[int, str]:
        wanted = set(rows)
        return {row: record_id for row, record_id in enumerate(self.ids()) if row in wanted}
