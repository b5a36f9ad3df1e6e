"""Embedding outputs: safetensors, .pt, parquet, or JSONL, chosen by the output name.

Every file carries, beside the vectors and ids, the checkpoint it came from, the think mode and whether the
vectors are normalised (and the records skipped as bad). Files are written under a temporary name and
renamed when complete, so an interrupted run never leaves an output that looks finished. JSONL streams
record by record and parquet row group by row group, so their memory stays bounded however many inputs
there are; safetensors and .pt hold every vector until the end, where they are written at once.

A parquet output is resumable: its row groups are first written as part files in a hidden folder beside it
(`.NAME.parts`), each saying how many input records it completes, and merged into the output at the end.
An interrupted run leaves the parts, and `twn embed ... --resume` continues after the records they hold.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch

from twn_cli.atomic import AtomicFile, atomic_file
from twn_cli.errors import TWNError, torch_load_refusal
from twn_cli.locks import lock_output

FORMATS = {".safetensors": "safetensors", ".pt": "pt", ".parquet": "parquet", ".jsonl": "jsonl"}
# Rows a parquet output buffers before writing them as one row group.
PARQUET_ROW_GROUP = 8192


@dataclass
class EmbeddingBatch:
    ids: list[str]
    embeddings: torch.Tensor
    think: list[bool]
    p_think: list[float]
    cot: list[str]
    reasoning_tokens: list[int]


class EmbeddingWriter:
    """Collects batches and writes them to `output` ('-' is JSONL on stdout) with `metadata`.

    `resume` continues a parquet output's interrupted run from its parts (`records_done` says how many input
    records they hold, `skipped` the bad ones among them); without it, parts left by another run are an error.
    """

    def __init__(self, output: str, metadata: dict, stdout: TextIO | None = None, resume: bool = False):
        self.metadata = metadata
        self.count = 0
        self.records_done = 0
        self.last_record: str | None = None  # the id of the last input record done
        self.skipped: list[dict] = []
        self.truncated = 0  # input texts cut to fit the backbone's positions
        if resume and (output == "-" or Path(output).suffix != ".parquet"):
            raise TWNError(f"--resume needs a .parquet output (its row groups are kept as parts), not '{output}'")
        if output == "-":
            self.format, self.path, self._stream = "jsonl", None, stdout or sys.stdout
            return
        self.path = Path(output)
        self.format = FORMATS.get(self.path.suffix)
        if self.format is None:
            raise TWNError(f"unknown output format '{self.path.suffix}' for '{output}': use {', '.join(FORMATS)} or -")
        self._lock = lock_output(self.path)  # the output and its parts: one writer at a time
        try:
            self._file = AtomicFile(self.path)
            self._temporary = self._file.staging
            self._batches: list[EmbeddingBatch] = []
            self._buffered = 0
            self._stream = None
            if self.format == "parquet":
                self._parts = self.path.parent / f".{self.path.name}.parts"
                self._resume_parts(resume)
                self._skipped_written = len(self.skipped)  # the bad records the parts already list
                self._truncated_written = self.truncated
            self._stream = open(self._temporary, "w", encoding="utf-8") if self.format == "jsonl" else None
        except BaseException:
            self._lock.release()
            raise

    def add(
        self, batch: EmbeddingBatch, records: int | None = None, skipped: list[dict] = (), last_record: str | None = None, truncated: int = 0
    ) -> None:
        """Add a batch that completes `records` more input records (default: its rows), `skipped` of them bad,
        the last of them `last_record` (default: its last row), `truncated` of its texts cut to fit."""
        self.count += len(batch.ids)
        self.truncated += truncated
        self.records_done += len(batch.ids) if records is None else records
        if last_record is not None:
            self.last_record = last_record
        elif batch.ids:
            self.last_record = batch.ids[-1]
        self.skipped += skipped
        if self.format == "jsonl":
            for row, record_id in enumerate(batch.ids):
                record = {
                    "id": record_id,
                    "think": batch.think[row],
                    "p_think": round(batch.p_think[row], 6),
                    "cot": batch.cot[row],
                    "reasoning_tokens": batch.reasoning_tokens[row],
                    "embedding": batch.embeddings[row].tolist(),
                }
                self._stream.write(json.dumps(record) + "\n")
            self._stream.flush()
            return
        self._batches.append(batch)
        self._buffered += len(batch.ids)
        if self.format == "parquet" and self._buffered >= PARQUET_ROW_GROUP:
            self._write_part()

    def close(self) -> Path | None:
        """Finish the output and move it into place; returns its path (None for stdout)."""
        if self.path is None:
            return None
        self.metadata["skipped"] = self.skipped
        self.metadata["truncated_texts"] = self.truncated
        if self.format == "jsonl":
            self._stream.close()
        elif self.format == "parquet":
            if self._batches:
                self._write_part()
            self._merge_parts()
        else:
            self._write_tensors()
        path = self._file.commit()
        if self.format == "parquet":
            shutil.rmtree(self._parts, ignore_errors=True)
        self._lock.release()
        return path

    def abort(self) -> None:
        """Drop a partial output (a parquet output's finished parts stay, for --resume)."""
        if self.path is None:
            return
        try:
            if self._stream is not None:
                self._stream.close()  # flushing may fail as the write did (a full disk): the file goes anyway
        except OSError:
            pass
        finally:
            self._file.discard()
            if self.format == "parquet" and self._parts.is_dir() and not any(self._parts.iterdir()):
                self._parts.rmdir()  # nothing finished: leave nothing behind
            self._lock.release()

    def _columns(self) -> dict:
        batches = self._batches
        dim = self.metadata["embedding_dim"]
        return {
            "ids": [record_id for batch in batches for record_id in batch.ids],
            "embeddings": torch.cat([b.embeddings.float().cpu() for b in batches]) if batches else torch.empty(0, dim),
            "think": torch.tensor([t for b in batches for t in b.think], dtype=torch.bool),
            "p_think": torch.tensor([p for b in batches for p in b.p_think], dtype=torch.float32),
            "reasoning_tokens": torch.tensor([n for b in batches for n in b.reasoning_tokens], dtype=torch.int32),
            "cot": [text for b in batches for text in b.cot],
        }

    def _write_tensors(self) -> None:
        columns = self._columns()
        if self.format == "pt":
            torch.save({**columns, **self.metadata}, self._temporary)
            return
        from safetensors.torch import save_file

        tensors = {key: columns[key].contiguous() for key in ("embeddings", "think", "p_think", "reasoning_tokens")}
        header = {key: json.dumps(value) for key, value in self.metadata.items()}
        header["ids"] = json.dumps(columns["ids"])
        save_file(tensors, self._temporary, metadata=header)


    def _resume_key(self) -> dict:
        """What the parts depend on (the inputs, the model, the settings): a resumed run must be the same job."""
        return {key: value for key, value in self.metadata.items() if key not in ("skipped", "truncated_texts", "twn_version")}

    def _resume_parts(self, resume: bool) -> None:
        import pyarrow.parquet as pq

        parts = sorted(self._parts.glob("part-*.parquet")) if self._parts.is_dir() else []
        if parts and not resume:
            finished = f" ('{self.path}' exists: a finished run may have stopped before removing them)" if self.path.exists() else ""
            raise TWNError(
                f"'{self.path}' has an interrupted run's parts in '{self._parts}'{finished}: pass --resume to continue "
                "it, or delete that folder to start again"
            )
        for part in parts:
            footer = pq.read_metadata(part)
            header = _twn_values(footer)
            if header.get("resume_key") != self._resume_key():
                raise TWNError(f"cannot resume '{self.path}': its parts were embedded with other settings ({part.name})")
            self.records_done = header["records_done"]
            self.last_record = header["last_record"]
            self.skipped += header["skipped_here"]
            self.truncated += header.get("truncated_here", 0)
            self.count += footer.num_rows

    def _write_part(self) -> None:
        """Write the buffered batches as the next part (one row group, atomically) and forget them."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        self._parts.mkdir(parents=True, exist_ok=True)
        number = len(list(self._parts.glob("part-*.parquet")))
        columns = self._columns()
        dim = self.metadata["embedding_dim"]
        flat = pa.array(columns["embeddings"].reshape(-1).numpy(), pa.float32())
        offsets = pa.array(range(0, len(flat) + 1, dim), pa.int32())
        table = pa.table(
            {
                "id": pa.array(columns["ids"], pa.string()),
                "embedding": pa.ListArray.from_arrays(offsets, flat),
                "think": pa.array(columns["think"].numpy(), pa.bool_()),
                "p_think": pa.array(columns["p_think"].numpy(), pa.float32()),
                "reasoning_tokens": pa.array(columns["reasoning_tokens"].numpy(), pa.int32()),
                "cot": pa.array(columns["cot"], pa.string()),
            },
            schema=_parquet_schema(),
        )
        header = {
            "resume_key": self._resume_key(), "records_done": self.records_done, "last_record": self.last_record,
            "skipped_here": self.skipped[self._skipped_written :], "truncated_here": self.truncated - self._truncated_written,
        }
        with atomic_file(self._parts / f"part-{number:06d}.parquet") as staging:
            pq.write_table(table.replace_schema_metadata(_twn_header(header)), staging)
        self._skipped_written = len(self.skipped)
        self._truncated_written = self.truncated
        self._batches, self._buffered = [], 0

    def _merge_parts(self) -> None:
        """The parts, in order, as the output's row groups, with the whole run's metadata."""
        import pyarrow.parquet as pq

        header = _twn_header(self.metadata)
        with pq.ParquetWriter(str(self._temporary), _parquet_schema().with_metadata(header)) as output:
            for part in sorted(self._parts.glob("part-*.parquet")):
                output.write_table(pq.read_table(part).replace_schema_metadata(header))


def _twn_header(values: dict) -> dict[str, str]:
    """Parquet key-value metadata: each value as JSON under `twn.` and its name."""
    return {f"twn.{key}": json.dumps(value) for key, value in values.items()}


def _twn_values(footer) -> dict:
    """The values `_twn_header` wrote, from a parquet file's footer (pyarrow FileMetaData)."""
    return {key.decode()[len("twn."):]: json.loads(value) for key, value in (footer.metadata or {}).items() if key.startswith(b"twn.")}


def _parquet_schema():
    import pyarrow as pa

    return pa.schema([
        ("id", pa.string()), ("embedding", pa.list_(pa.float32())), ("think", pa.bool_()), ("p_think", pa.float32()),
        ("reasoning_tokens", pa.int32()), ("cot", pa.string()),
    ])


def read_embeddings(path: str | Path) -> tuple[list[str], torch.Tensor, dict]:
    """Ids, float32 embeddings and metadata of an embedding file written by `twn embed`."""
    path = Path(path)
    if not path.is_file():
        raise TWNError(f"embedding file '{path}' does not exist")
    kind = FORMATS.get(path.suffix)
    if kind == "pt":
        try:
            content = torch.load(path, weights_only=True, map_location="cpu")
        except Exception as error:  # torch raises UnpicklingError and others for untrusted or broken files
            raise TWNError(f"'{path}' is not a plain tensor file (refused to unpickle: {torch_load_refusal(error)})") from None
        metadata = {key: value for key, value in content.items() if key not in ("ids", "embeddings")}
        return list(content["ids"]), content["embeddings"].float(), metadata
    if kind == "safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                header = {key: json.loads(value) for key, value in (handle.metadata() or {}).items()}
                embeddings = handle.get_tensor("embeddings").float()
        except (SafetensorError, OSError, ValueError) as error:
            raise TWNError(f"'{path}' is not a readable safetensors file ({str(error).strip().splitlines()[0]})") from None
        return header.pop("ids"), embeddings, header
    if kind == "parquet":
        import pyarrow
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
            # The footer's key-value metadata: the schema's, with what was set at the end over it.
            metadata = _twn_values(pq.read_metadata(path))
        except (pyarrow.ArrowException, OSError, ValueError) as error:
            raise TWNError(f"'{path}' is not a readable parquet file ({str(error).strip().splitlines()[0]})") from None
        dim = metadata["embedding_dim"]
        flat = table.column("embedding").combine_chunks().flatten().to_numpy()
        return table.column("id").to_pylist(), torch.from_numpy(flat.copy()).view(-1, dim).float(), metadata
    raise TWNError(f"cannot read embeddings from '{path}': use {', '.join(k for k in FORMATS if k != '.jsonl')}")
