"""The `search` and `index` stages: the stored vectors nearest to embedded queries.

Exact search reads the stored vectors (any file `twn embed` wrote) a chunk of rows at a time and keeps a
running top-k per query, so memory holds one chunk and one [queries x chunk] score block whatever the
number of rows (twn_cli/data/embedding_chunks.py). Scores are inner products; `twn embed` writes unit
vectors, so they are cosine similarities. Ties are broken by the earlier stored row, so the result is one
exact answer, the same for any chunk size.

`twn index` builds a FAISS index from such a file instead (faiss-cpu, `pip install 'twn-cli[faiss]'`): a
folder with `index.faiss`, `ids.parquet` and `twn-index.json`, which records the embedding file's metadata.

Either way the stored vectors must have come from the model that embeds the queries (`model_identity`), in
the think mode that search expects of them (by default `never`: candidates are embedded without thinking,
as in training and in `twn eval`); anything else is refused before any query is embedded.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np
import torch

from twn_cli.atomic import atomic_directory
from twn_cli.data.embedding_chunks import EmbeddingSource, open_embedding_source
from twn_cli.data.embedding_files import EmbeddingBatch
from twn_cli.data.inputs import InputRecord
from twn_cli.distributed import batched
from twn_cli.engine.identity import model_identity
from twn_cli.errors import TWNError
from twn_cli.stages.embed import EmbedSettings, EmbedSummary, run_embed

log = logging.getLogger(__name__)

# Queries scored against a chunk at once: the score block is QUERY_BLOCK x chunk rows.
QUERY_BLOCK = 1024
INDEX_MANIFEST = "twn-index.json"
INDEX_FORMAT = "twn-faiss-index"
INDEX_KINDS = ("flat", "hnsw")


@dataclass
class StoredVectors:
    """What `search` reads: an embedding file, or a FAISS index folder built from one."""

    path: Path
    metadata: dict
    dim: int
    count: int
    source: EmbeddingSource | None = None  # None: a FAISS index

    @classmethod
    def open(cls, path: str | Path) -> StoredVectors:
        path = Path(path)
        if path.is_dir():
            manifest_path = path / INDEX_MANIFEST
            if not manifest_path.is_file():
                raise TWNError(f"'{path}' is a folder but not an index built by `twn index` (no {INDEX_MANIFEST})")
            manifest = json.loads(manifest_path.read_text())
            return cls(path, manifest["embeddings"], manifest["dim"], manifest["count"])
        source = open_embedding_source(path)
        return cls(path, source.metadata, source.dim, source.count, source)

    def check_fits(self, identity: str, embedding_dim: int, index_think: str) -> None:
        """Refuse vectors of another model, size or think mode (one line); warn where the file cannot tell."""
        if self.dim != embedding_dim:
            raise TWNError(f"index '{self.path}' holds vectors of size {self.dim}, the model embeds {embedding_dim}: it was embedded by another model")
        if not self.metadata:
            log.warning("'%s' records no model or think mode (JSONL): its vectors cannot be checked against the model", self.path)
            return
        written_by = self.metadata.get("model")
        if written_by != identity:
            described = self.metadata.get("checkpoint") or f"fresh adapters on {self.metadata.get('backbone')}"
            what = "an older twn that did not record its model" if written_by is None else f"another model ({described})"
            raise TWNError(f"index '{self.path}' was embedded by {what}: embed it again with this checkpoint")
        if self.metadata.get("think_mode") != index_think:
            raise TWNError(
                f"index '{self.path}' was embedded with --think {self.metadata.get('think_mode')}, but search expects "
                f"--think {index_think} of its vectors (--index-think {self.metadata.get('think_mode')} accepts them)"
            )

    def search(self, queries: torch.Tensor, k: int, chunk_rows: int) -> list[list[tuple[str, float]]]:
        """The top-k (id, score) of every query, best first."""
        if self.source is None:
            scores, rows = faiss_top_k(self.path, queries, k)
            ids = _index_ids(self.path, {row for row in rows.flatten().tolist() if row >= 0})
        else:
            scores, rows = exact_top_k(queries, self.source, k, chunk_rows)
            ids = self.source.ids_at(set(rows.flatten().tolist()))
        return [
            [(ids[row], score) for row, score in zip(query_rows, query_scores) if row >= 0]
            for query_rows, query_scores in zip(rows.tolist(), scores.tolist())
        ]


def exact_top_k(queries: torch.Tensor, source: EmbeddingSource, k: int, chunk_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores and rows [queries, min(k, rows)] of each query's best stored vectors, best first, ties by row."""
    queries = queries.float().cpu()
    best: list[tuple[torch.Tensor, torch.Tensor]] = [
        (queries.new_empty(len(block), 0), torch.empty(len(block), 0, dtype=torch.long)) for block in queries.split(QUERY_BLOCK)
    ]
    for start, chunk in source.chunks(chunk_rows):
        vectors = torch.from_numpy(chunk)
        rows = torch.arange(start, start + len(vectors))
        for number, block in enumerate(queries.split(QUERY_BLOCK)):
            chunk_scores, chunk_rows_found = _top_k_in_row_order(block @ vectors.T, rows, k)
            scores, found = best[number]
            best[number] = _best_first(torch.cat([scores, chunk_scores], 1), torch.cat([found, chunk_rows_found], 1), k)
    return torch.cat([scores for scores, _ in best]), torch.cat([rows for _, rows in best])


def _top_k_in_row_order(scores: torch.Tensor, rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best k of a block whose columns are stored rows in order: topk, or, where equal scores straddle the
    k-th place (topk may pick any of them), a stable sort that keeps the earlier rows."""
    k = min(k, scores.shape[1])
    values, index = scores.topk(k, dim=1)
    crowded = ((scores >= values[:, -1:]).sum(1) > k).nonzero().flatten()
    if len(crowded):
        index[crowded] = scores[crowded].sort(dim=1, descending=True, stable=True).indices[:, :k]
        values[crowded] = scores[crowded].gather(1, index[crowded])
    return _best_first(values, rows[index], k)


def _best_first(scores: torch.Tensor, rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best by score, equal scores by row (two stable sorts, the minor key first)."""
    order = rows.sort(dim=1, stable=True).indices
    scores, rows = scores.gather(1, order), rows.gather(1, order)
    order = scores.sort(dim=1, descending=True, stable=True).indices[:, :k]
    return scores.gather(1, order), rows.gather(1, order)


# ------------------------------------------------------------------------------------------------ FAISS
def _faiss():
    try:
        import faiss
    except ImportError:
        raise TWNError("FAISS indexes need faiss-cpu: pip install 'twn-cli[faiss]'") from None
    return faiss


def build_index(embeddings: str | Path, output: str | Path, *, kind: str = "hnsw", hnsw_m: int = 32, ef_search: int = 128,
                chunk_rows: int = 16384) -> Path:
    """A FAISS index of the vectors in `embeddings` (inner product; HNSW, or flat = exact), written atomically."""
    faiss = _faiss()
    if kind not in INDEX_KINDS:
        raise TWNError(f"index kind must be one of {', '.join(INDEX_KINDS)}, not '{kind}'")
    output = Path(output)
    if output.exists() and not (output / INDEX_MANIFEST).is_file():
        raise TWNError(f"'{output}' exists and is not an index built by `twn index`: refusing to replace it")
    source = open_embedding_source(embeddings)
    if kind == "flat":
        index = faiss.IndexFlatIP(source.dim)
    else:
        index = faiss.IndexHNSWFlat(source.dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = ef_search
    import pyarrow as pa
    import pyarrow.parquet as pq

    with atomic_directory(output) as staging:
        for _, chunk in source.chunks(chunk_rows):
            index.add(np.ascontiguousarray(chunk))
        faiss.write_index(index, str(staging / "index.faiss"))
        schema = pa.schema([("id", pa.string())])
        with pq.ParquetWriter(str(staging / "ids.parquet"), schema) as writer:
            for block in batched(source.ids(), chunk_rows):
                writer.write_table(pa.table({"id": pa.array(list(block), pa.string())}, schema=schema))
        manifest = {
            "format": INDEX_FORMAT, "format_version": 1, "kind": kind, "count": source.count, "dim": source.dim,
            "hnsw_m": hnsw_m if kind == "hnsw" else None, "ef_search": ef_search if kind == "hnsw" else None,
            "source": str(Path(embeddings).resolve()), "embeddings": source.metadata,
        }
        (staging / INDEX_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return output


def faiss_top_k(folder: Path, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    index = _faiss().read_index(str(folder / "index.faiss"))
    scores, rows = index.search(np.ascontiguousarray(queries.float().cpu().numpy()), min(k, index.ntotal))
    return torch.from_numpy(scores), torch.from_numpy(rows)


def _index_ids(folder: Path, rows: set[int]) -> dict[int, str]:
    import pyarrow.parquet as pq

    ids = pq.read_table(folder / "ids.parquet").column("id")
    return {row: ids[row].as_py() for row in rows}


# ------------------------------------------------------------------------------------------------ queries
@dataclass
class QueryEmbeddings:
    """Embedded queries kept in memory: the writer `run_embed` fills when search embeds its queries."""

    batches: list[EmbeddingBatch] = field(default_factory=list)
    records_done: int = 0
    last_record: str | None = None

    def add(self, batch: EmbeddingBatch, records: int | None = None, skipped=(), last_record: str | None = None, truncated: int = 0) -> None:
        self.batches.append(batch)

    def close(self) -> None:
        """Nothing to finish: the batches stay in memory."""

    def abort(self) -> None:
        self.batches.clear()

    def gathered(self, dim: int) -> tuple[list[str], torch.Tensor, list[bool]]:
        ids = [record_id for batch in self.batches for record_id in batch.ids]
        vectors = torch.cat([batch.embeddings.float() for batch in self.batches]) if self.batches else torch.empty(0, dim)
        return ids, vectors, [think for batch in self.batches for think in batch.think]


def run_search(
    model, records: Iterable[InputRecord], stored: StoredVectors, settings: EmbedSettings, output: TextIO, *, k: int, chunk_rows: int,
    index_think: str,
) -> EmbedSummary:
    """Check `stored` fits the model, embed `records` with `settings`, and write one JSON line per
    query to `output`: {"id", "think", "results": [{"id", "score"}, ...]}, best first. Returns run_embed's summary."""
    stored.check_fits(model_identity(model), model.embedding_dim, index_think)
    collected = QueryEmbeddings()
    summary = run_embed(model, records, collected, settings)
    ids, vectors, thinks = collected.gathered(model.embedding_dim)
    hits = stored.search(vectors, k, chunk_rows) if ids else []
    for query_id, think, found in zip(ids, thinks, hits):
        results = [{"id": hit_id, "score": score} for hit_id, score in found]
        output.write(json.dumps({"id": query_id, "think": think, "results": results}) + "\n")
    return summary
