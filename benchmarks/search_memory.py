"""Exact search over millions of stored vectors: peak memory against the chunk size, and time.

    python benchmarks/search_memory.py --rows 1000000 --dim 1536 --queries 1000 --chunk-sizes 4096 16384 65536 -o search.json
    python benchmarks/search_memory.py --format safetensors --rows 1000000 --dim 256 --chunk-sizes 4096 65536

Writes `--rows` random unit vectors of `--dim` dimensions (default 1536, Qwen2-VL-2B's embedding size) in the
format `twn embed` writes (`--format`, default parquet: EmbeddingWriter itself, row groups of 8,192), once,
into `--work` (a temporary folder unless given; kept there for another run). Then, for each chunk size in a
fresh process, answers `--queries` random unit queries with the top `-k` through `StoredVectors.search`,
what `twn search` runs once its queries are embedded (exact, chunked, ids resolved at the end). Embedding the
queries is the model's cost, measured by the other benchmarks, not this one's.

Memory is the process's peak resident set during the search (VmHWM after /proc/self/clear_refs), absolute
and above what it held before (Python, torch, the queries, the open file). `chunk MiB` is what one chunk
weighs by itself: its vectors plus a score block of min(queries, 1024) rows, chunk x (dim + 1024) x 4 bytes.
A .pt file is memory-mapped, so its pages read count in the resident set until the kernel takes them back.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import _common as common

FORMATS = ("parquet", "safetensors", "pt")


def write_vectors(path: Path, rows: int, dim: int, seed: int = 0) -> float:
    """`rows` random unit vectors in the embed output format of `path`'s suffix; seconds taken."""
    import torch
    import torch.nn.functional as F

    from twn_cli.data.embedding_files import EmbeddingBatch, EmbeddingWriter

    started = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    metadata = {"inputs": "synthetic", "checkpoint": None, "backbone": "synthetic", "think_mode": "never", "threshold": None,
                "normalized": True, "embedding_dim": dim, "model": "synthetic"}
    writer = EmbeddingWriter(str(path), metadata)
    for start in range(0, rows, 8192):
        count = min(8192, rows - start)
        vectors = F.normalize(torch.randn(count, dim, generator=generator), dim=-1)
        writer.add(EmbeddingBatch([f"item-{row:08d}" for row in range(start, start + count)], vectors,
                                  [False] * count, [0.0] * count, [""] * count, [0] * count))
    writer.close()
    return time.perf_counter() - started


def measure_search(settings: dict) -> dict:
    """Search `settings['path']` for random queries with one chunk size; time and peak memory."""
    import torch
    import torch.nn.functional as F

    from twn_cli.stages.search import QUERY_BLOCK, StoredVectors

    stored = StoredVectors.open(settings["path"])
    generator = torch.Generator().manual_seed(1)
    queries = F.normalize(torch.randn(settings["queries"], stored.dim, generator=generator), dim=-1)
    chunk = settings["chunk_size"]
    with common.PeakMemory("cpu") as peak:
        started = time.perf_counter()
        results = stored.search(queries, settings["k"], chunk)
        seconds = time.perf_counter() - started
    assert len(results) == settings["queries"] and all(len(found) == settings["k"] for found in results)
    return {
        "chunk_size": chunk,
        "seconds": round(seconds, 2),
        "pairs_per_second": round(settings["queries"] * stored.count / seconds),
        "chunk_mib": common.mib(chunk * (stored.dim + min(settings["queries"], QUERY_BLOCK)) * 4),
        "peak_rss_mib": common.mib(peak.peak_bytes),
        "peak_above_start_mib": common.mib(peak.extra_bytes),
        "memory_method": peak.method,
        "first_result": results[0][0],
    }


def run(arguments) -> dict:
    work = Path(arguments.work or tempfile.mkdtemp(prefix="twn-search-"))
    path = work / f"vectors-{arguments.rows}x{arguments.dim}.{arguments.format}"
    figures = {"benchmark": "search_memory", "command": " ".join(sys.argv), "rows": arguments.rows, "dim": arguments.dim,
               "queries": arguments.queries, "k": arguments.k, "format": arguments.format}
    if not path.is_file():
        print(f"writing {arguments.rows} vectors to {path}", file=sys.stderr)
        figures["write_seconds"] = round(write_vectors(path, arguments.rows, arguments.dim), 1)
    figures["file_mib"] = common.mib(path.stat().st_size)
    rows = []
    for chunk in arguments.chunk_sizes:
        settings = {"path": str(path), "queries": arguments.queries, "k": arguments.k, "chunk_size": chunk}
        result = measure_search(settings) if arguments.in_process else common.run_worker(__file__, settings, timeout=arguments.timeout)
        result.setdefault("chunk_size", chunk)
        print(f"  chunk {chunk}: {result.get('seconds', result.get('error'))} s", file=sys.stderr)
        rows.append(result)
    answers = {json.dumps(row["first_result"]) for row in rows if "first_result" in row}
    figures["same_answer_for_every_chunk_size"] = len(answers) == 1
    figures["rows_measured"] = rows
    figures["work"] = str(work)
    figures["machine"] = common.machine_info("cpu")
    return figures


def report(figures: dict) -> None:
    print(f"exact search: {figures['queries']} queries, top {figures['k']}, over {figures['rows']} vectors of {figures['dim']} "
          f"dimensions ({figures['format']}, {figures['file_mib']} MiB)")
    table = []
    for row in figures["rows_measured"]:
        if "error" in row:
            table.append((row["chunk_size"], row["error"][:60], None, None, None))
        else:
            table.append((row["chunk_size"], row["seconds"], row["chunk_mib"], row["peak_rss_mib"], row["peak_above_start_mib"]))
    common.print_table(["chunk rows", "seconds", "chunk MiB", "peak RSS MiB", "peak above start MiB"], table)
    print(f"same top result for every chunk size: {figures['same_answer_for_every_chunk_size']}")


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=1536)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--format", choices=FORMATS, default="parquet")
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--work", help="folder for the vectors file (kept; reused when it already holds one of this size)")
    parser.add_argument("--in-process", action="store_true", help="search with every chunk size in this process")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("-o", "--output", help="write the figures as JSON here too")
    return parser.parse_args(argv)


def main(argv=None) -> dict | None:
    return common.measuring_main(parse(argv), measure_search, run, report)


if __name__ == "__main__":
    main()
