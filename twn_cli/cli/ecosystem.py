"""`twn convert-release`, `twn search` and `twn index`: the authors' release, and search over what `twn embed` wrote."""

from __future__ import annotations

import enum
import functools
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from twn_cli.engine.factory import LoadOptions

from twn_cli.cli.common import (
    ANY_BACKBONE,
    VERBOSE,
    ThinkOption,
    app,
    load_model_or_fresh,
    setup_logging,
    user_errors,
    with_load_options,
)
from twn_cli.errors import TWNError


# --------------------------------------------------------------------------------------------- convert-release
@app.command("convert-release")
@user_errors
@with_load_options
def convert_release(
    source: Path = typer.Argument(..., help="Folder laid out like the TWN authors' release: reasoning/, embedding/, gate_mlp.pt, queries.pt."),
    output: Path = typer.Option(..., "-o", "--output", help="Checkpoint directory to write."),
    backbone: str | None = typer.Option(None, help="Backbone directory or hub id (default: the one the release's adapters name)."),
    setting: list[str] = typer.Option([], "--set", help="A model setting the release does not carry: --set KEY=VALUE (repeatable), e.g. gate_threshold=0.6."),
    verbose: bool = VERBOSE,
    *,
    options: LoadOptions,
):
    """Write a TWN release folder as a twn checkpoint (twn.json with the backbone's fingerprint, file hashes).

    Every command also loads a release folder directly with --checkpoint; converting records its settings
    and lets the checkpoint be checked on every load. K comes from the queries' shape, the gate's width
    from its weights (mapped onto twn's gate by names and shapes); other settings take twn's defaults
    unless --set. Written atomically. Prints the checkpoint directory.
    """
    setup_logging(verbose)
    from twn_cli.engine.release import convert_release as convert
    from twn_cli.recipes import parse_overrides

    print(convert(source, output, backbone=backbone, overrides=parse_overrides(setting), **options.as_kwargs()))


# ------------------------------------------------------------------------------------------------------ search
@app.command()
@user_errors
@with_load_options
def search(
    queries: str = typer.Argument(..., help="Queries as `twn embed` takes them: an image folder, a JSONL file of records, or - for JSONL on stdin."),
    index: Path = typer.Option(..., "--index", help="What to search: an embedding file `twn embed` wrote (any format), or a folder `twn index` built."),
    checkpoint: Path | None = typer.Option(None, help="TWN checkpoint that embedded the index (a twn checkpoint or a release folder)."),
    backbone: str | None = ANY_BACKBONE,
    k: int = typer.Option(10, "-k", min=1, help="Results per query."),
    output: str = typer.Option("-", "-o", "--output", help="JSONL file to write, or - for stdout."),
    think: ThinkOption = typer.Option(ThinkOption.never, help="How the queries think: never, always, or auto (the gate decides)."),
    adaptive: bool = typer.Option(False, "--adaptive", help="Same as --think auto."),
    threshold: float | None = typer.Option(None, help="Gate threshold for --adaptive (default: the checkpoint's)."),
    index_think: ThinkOption = typer.Option(ThinkOption.never, help="The think mode the index must have been embedded with (candidates are embedded without thinking, as in training)."),
    chunk_size: int = typer.Option(16384, min=1, help="Stored vectors read and scored at a time: memory grows with it, not with the number stored."),
    batch_size: int = typer.Option(16, min=1, help="Queries per forward pass."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip unreadable or empty query records (reported on stderr) instead of stopping."),
    max_think_tokens: int | None = typer.Option(None, min=1, help="Most tokens a CoT may have (default: the checkpoint's)."),
    verbose: bool = VERBOSE,
    *,
    options: LoadOptions,
):
    """Embed queries and print each one's top-k stored vectors: {"id", "think", "results": [{"id", "score"}]}.

    Exact by default: the stored vectors are read a chunk at a time (memory bounded by --chunk-size however
    many there are), scores are cosine similarities, equal scores go to the earlier stored row. A folder
    built by `twn index` is searched with FAISS instead. An index embedded by another model, or in another
    think mode than --index-think, is refused before any query is embedded. CoTs are decoded greedily.
    """
    setup_logging(verbose)
    from twn_cli.atomic import atomic_file
    from twn_cli.data.inputs import read_inputs
    from twn_cli.stages.embed import EmbedSettings
    from twn_cli.stages.search import StoredVectors, run_search

    mode = "auto" if adaptive else think.value
    if adaptive and think is ThinkOption.always:
        raise TWNError("--adaptive and --think always contradict each other")
    stored = StoredVectors.open(index)
    records = read_inputs(queries)
    model = load_model_or_fresh(checkpoint, backbone, options, uses_gate=mode == "auto")
    if max_think_tokens is not None:
        model.config.max_think_tokens = max_think_tokens
    settings = EmbedSettings(think=mode, threshold=threshold, batch_size=batch_size, skip_bad=skip_bad)
    search_into = functools.partial(run_search, model, records, stored, settings, k=k, chunk_rows=chunk_size, index_think=index_think.value)
    started = time.perf_counter()
    if output == "-":
        summary = search_into(sys.stdout)
    else:
        with atomic_file(output) as staging, open(staging, "w", encoding="utf-8") as stream:
            summary = search_into(stream)
        print(output)
    print(
        f"searched {stored.count} stored vectors for {summary.embedded} queries ({summary.thought} thought, "
        f"{len(summary.skipped)} skipped) in {time.perf_counter() - started:.1f} s",
        file=sys.stderr,
    )


# ------------------------------------------------------------------------------------------------------- index
class IndexKind(str, enum.Enum):
    hnsw = "hnsw"
    flat = "flat"


@app.command()
@user_errors
def index(
    embeddings: Path = typer.Argument(..., help="An embedding file `twn embed` wrote (any format)."),
    output: Path = typer.Option(..., "-o", "--output", help="Index folder to write (index.faiss, ids.parquet, twn-index.json)."),
    kind: IndexKind = typer.Option(IndexKind.hnsw, help="hnsw: approximate, fast on millions; flat: exact, every vector scored."),
    hnsw_m: int = typer.Option(32, min=2, help="HNSW: links per vector (more: better recall, more memory)."),
    ef_search: int = typer.Option(128, min=1, help="HNSW: candidates explored per query (more: better recall, slower)."),
    chunk_size: int = typer.Option(16384, min=1, help="Vectors read at a time while building."),
    verbose: bool = VERBOSE,
):
    """Build a FAISS index (inner product) of an embedding file for `twn search --index`; needs faiss-cpu.

    The index keeps the embedding file's metadata, so search refuses it for another model or think mode as
    it would the file. FAISS holds every vector in memory. Written atomically. Prints the folder written.
    """
    setup_logging(verbose)
    from twn_cli.stages.search import build_index

    print(build_index(embeddings, output, kind=kind.value, hnsw_m=hnsw_m, ef_search=ef_search, chunk_rows=chunk_size))
