"""Embedding outputs: safetensors, .pt, parquet, or JSONL, chosen by the output name.

Every file carries, beside the vectors and ids, the checkpoint it came from, the think mode and whether the
vectors are normalised (and the records skipped as bad). Files are written under a temporary name and
renamed when complete, so an interrupted run never leaves an output that looks finished. JSONL streams
record by record and parquet row group by row group, so their memory stays bounded however many inputs
there are; safetensors and .pt hold every vector until the end, where they are written at once.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch

from twn_cli.atomic import AtomicFile
from twn_cli.errors import TWNError

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
    """Collects batches and writes them to `output` ('-' is JSONL on stdout) with `metadata`."""

    def __init__(self, output: str, metadata: dict, stdout: TextIO | None = None):
        self.metadata = metadata
        self.count = 0
        if output == "-":
            self.format, self.path, self._stream = "jsonl", None, stdout or sys.stdout
            return
        self.path = Path(output)
        self.format = FORMATS.get(self.path.suffix)
        if self.format is None:
            raise TWNError(f"unknown output format '{self.path.suffix}' for '{output}': use {', '.join(FORMATS)} or -")
        self._file = AtomicFile(self.path)
        self._temporary = self._file.staging
        self._batches: list[EmbeddingBatch] = []
        self._buffered = 0
        self._stream = open(self._temporary, "w", encoding="utf-8") if self.format == "jsonl" else None
        self._parquet = self._open_parquet() if self.format == "parquet" else None

    def add(self, batch: EmbeddingBatch) -> None:
        self.count += len(batch.ids)
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
        if self._parquet is not None and self._buffered >= PARQUET_ROW_GROUP:
            self._write_row_group()

    def close(self) -> Path | None:
        """Finish the output and move it into place; returns its path (None for stdout)."""
        if self.path is None:
            return None
        if self.format == "jsonl":
            self._stream.close()
        elif self.format == "parquet":
            self._write_row_group()
            # Set at the end (the records skipped): the footer's metadata, which readers take over the schema's.
            self._parquet.add_key_value_metadata(self._parquet_metadata())
            self._parquet.close()
        else:
            self._write_tensors()
        return self._file.commit()

    def abort(self) -> None:
        """Drop a partial output."""
        if self.path is None:
            return
        if self._stream is not None:
            self._stream.close()
        if self._parquet is not None:
            self._parquet.close()
        self._file.discard()

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

    def _parquet_metadata(self) -> dict[str, str]:
        return {f"twn.{key}": json.dumps(value) for key, value in self.metadata.items()}

    def _open_parquet(self):
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema([
            ("id", pa.string()), ("embedding", pa.list_(pa.float32())), ("think", pa.bool_()), ("p_think", pa.float32()),
            ("reasoning_tokens", pa.int32()), ("cot", pa.string()),
        ])
        return pq.ParquetWriter(str(self._temporary), schema.with_metadata(self._parquet_metadata()))

    def _write_row_group(self) -> None:
        """Write the buffered batches as one row group and forget them."""
        import pyarrow as pa

        if not self._batches:
            return
        columns = self._columns()
        dim = self.metadata["embedding_dim"]
        flat = pa.array(columns["embeddings"].reshape(-1).numpy(), pa.float32())
        offsets = pa.array(range(0, len(flat) + 1, dim), pa.int32())
        arrays = {
            "id": pa.array(columns["ids"], pa.string()),
            "embedding": pa.ListArray.from_arrays(offsets, flat),
            "think": pa.array(columns["think"].numpy(), pa.bool_()),
            "p_think": pa.array(columns["p_think"].numpy(), pa.float32()),
            "reasoning_tokens": pa.array(columns["reasoning_tokens"].numpy(), pa.int32()),
            "cot": pa.array(columns["cot"], pa.string()),
        }
        self._parquet.write_table(pa.table(arrays, schema=self._parquet.schema))
        self._batches, self._buffered = [], 0


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
            raise TWNError(f"'{path}' is not a plain tensor file (refused to unpickle: {str(error).splitlines()[0]})") from None
        metadata = {key: value for key, value in content.items() if key not in ("ids", "embeddings")}
        return list(content["ids"]), content["embeddings"].float(), metadata
    if kind == "safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            header = {key: json.loads(value) for key, value in (handle.metadata() or {}).items()}
            embeddings = handle.get_tensor("embeddings").float()
        return header.pop("ids"), embeddings, header
    if kind == "parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        # The footer's key-value metadata: the schema's, with what was set at the end over it.
        metadata = {
            key.decode()[len("twn."):]: json.loads(value)
            for key, value in (pq.read_metadata(path).metadata or {}).items()
            if key.startswith(b"twn.")
        }
        dim = metadata["embedding_dim"]
        flat = table.column("embedding").combine_chunks().flatten().to_numpy()
        return table.column("id").to_pylist(), torch.from_numpy(flat.copy()).view(-1, dim).float(), metadata
    raise TWNError(f"cannot read embeddings from '{path}': use {', '.join(k for k in FORMATS if k != '.jsonl')}")
