"""`twn search` and `twn index`: exact chunked top-k equal to brute force over every embedding format,
end to end with real pictures, and refusal of an index that another model or think mode wrote."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from twn_cli.cli import app
from twn_cli.data import embedding_files
from twn_cli.data.embedding_chunks import open_embedding_source
from twn_cli.data.embedding_files import EmbeddingBatch, EmbeddingWriter, read_embeddings
from twn_cli.stages.search import exact_top_k

FORMATS = (".safetensors", ".pt", ".parquet", ".jsonl")


def run(*arguments):
    return CliRunner().invoke(app, [str(argument) for argument in arguments])


def error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("twn ") and ": error: " in line]
    assert result.exit_code == 1 and len(lines) == 1, result.stderr
    return lines[0]


def brute_force(queries: np.ndarray, stored: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Every score computed, ranked by score, equal scores by stored row."""
    scores = queries.astype(np.float64) @ stored.astype(np.float64).T
    rows = np.stack([np.lexsort((np.arange(len(stored)), -row))[:k] for row in scores])
    return np.take_along_axis(scores, rows, 1), rows


def write_vectors(path: Path, vectors: np.ndarray, metadata: dict) -> Path:
    writer = EmbeddingWriter(str(path), {**metadata, "embedding_dim": vectors.shape[1]})
    for start in range(0, len(vectors), 97):
        block = vectors[start : start + 97]
        count = len(block)
        ids = [f"doc-{row}" for row in range(start, start + count)]
        writer.add(EmbeddingBatch(ids, torch.from_numpy(block), [False] * count, [0.0] * count, [""] * count, [0] * count))
    writer.close()
    return path


@pytest.mark.parametrize("suffix", FORMATS)
def test_exact_top_10_equals_brute_force_in_every_format_and_chunk_size(tmp_path, monkeypatch, suffix):
    monkeypatch.setattr(embedding_files, "PARQUET_ROW_GROUP", 128)  # results spread over several row groups
    generator = np.random.default_rng(0)
    # Small whole numbers: every score is exact in float32, and many are equal, so the tie rule is tested too.
    stored = generator.integers(-2, 3, size=(1000, 8)).astype(np.float32)
    queries = generator.integers(-2, 3, size=(30, 8)).astype(np.float32)
    source = open_embedding_source(write_vectors(tmp_path / f"stored{suffix}", stored, {"think_mode": "never"}))
    assert (source.count, source.dim) == (1000, 8)
    expected_scores, expected_rows = brute_force(queries, stored, 10)
    for chunk_rows in (7, 128, 5000):
        scores, rows = exact_top_k(torch.from_numpy(queries), source, 10, chunk_rows)
        assert np.array_equal(rows.numpy(), expected_rows), chunk_rows
        assert np.array_equal(scores.numpy(), expected_scores.astype(np.float32))
    ids = source.ids_at(expected_rows.flatten().tolist())
    assert all(ids[row] == f"doc-{row}" for row in expected_rows.flatten().tolist())


@pytest.fixture(scope="module")
def world(toy_backbone_dir, real_image_paths, tmp_path_factory):
    """A checkpoint, the skimage pictures embedded with it into a parquet index, and query records."""
    from twn_cli.engine.backbone import load_backbone
    from twn_cli.engine.checkpoint import save_checkpoint
    from twn_cli.engine.config import TWNConfig
    from twn_cli.engine.model import TWNModel

    root = tmp_path_factory.mktemp("search")
    model = TWNModel(load_backbone(str(toy_backbone_dir), device="cpu"), TWNConfig(lora_rank=4, max_think_tokens=8))
    checkpoint = save_checkpoint(model, root / "checkpoint", stages=[])
    images = root / "images"
    images.mkdir()
    for path in real_image_paths:
        shutil.copy(path, images / path.name)
    result = run("embed", images, "--checkpoint", checkpoint, "--device", "cpu", "-o", root / "index.parquet")
    assert result.exit_code == 0, result.stderr
    queries = root / "queries.jsonl"
    records = [
        {"id": "cat", "text": "a cat", "instruction": "Find the picture."},
        {"id": "astronaut", "image": str(real_image_paths[0]), "text": "who is this?"},
        {"id": "coffee", "image": str(real_image_paths[2])},
    ]
    queries.write_text("".join(json.dumps(record) + "\n" for record in records))
    return {"root": root, "checkpoint": checkpoint, "index": root / "index.parquet", "queries": queries, "model": model}


def search(world, *options):
    result = run("search", world["queries"], "--checkpoint", world["checkpoint"], "--device", "cpu", *options)
    assert result.exit_code == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_search_prints_the_exact_top_k_of_thinking_queries_as_jsonl(world):
    found = search(world, "--index", world["index"], "-k", 4, "--think", "always", "--chunk-size", 2)
    embedded = run("embed", world["queries"], "--checkpoint", world["checkpoint"], "--device", "cpu", "--think", "always",
                   "-o", world["root"] / "queries.pt")
    assert embedded.exit_code == 0, embedded.stderr
    query_ids, queries, _ = read_embeddings(world["root"] / "queries.pt")
    stored_ids, stored, _ = read_embeddings(world["index"])
    expected_scores, expected_rows = brute_force(queries.numpy(), stored.numpy(), 4)
    assert [record["id"] for record in found] == query_ids == ["cat", "astronaut", "coffee"]
    assert all(record["think"] for record in found)
    for record, rows, scores in zip(found, expected_rows, expected_scores):
        assert [hit["id"] for hit in record["results"]] == [stored_ids[row] for row in rows]
        assert [hit["score"] for hit in record["results"]] == pytest.approx(scores.tolist(), abs=1e-6)


def test_an_index_of_another_model_or_think_mode_is_refused_in_one_line(world, make_model, tmp_path):
    from twn_cli.engine.checkpoint import save_checkpoint

    moved = shutil.copytree(world["checkpoint"], tmp_path / "moved")  # the same model elsewhere is still the same model
    result = run("search", world["queries"], "--index", world["index"], "--checkpoint", moved, "--device", "cpu", "-k", 2)
    assert result.exit_code == 0, result.stderr

    other = save_checkpoint(make_model(seed=3), tmp_path / "other", stages=[])
    refused = run("search", world["queries"], "--index", world["index"], "--checkpoint", other, "--device", "cpu")
    assert "was embedded by another model (" in error_line(refused) and str(world["checkpoint"]) in error_line(refused)

    thought = tmp_path / "thought.safetensors"
    assert run("embed", world["queries"], "--checkpoint", world["checkpoint"], "--device", "cpu", "--think", "always", "-o", thought).exit_code == 0
    refused = run("search", world["queries"], "--index", thought, "--checkpoint", world["checkpoint"], "--device", "cpu")
    assert "was embedded with --think always, but search expects --think never" in error_line(refused)
    accepted = run("search", world["queries"], "--index", thought, "--checkpoint", world["checkpoint"], "--device", "cpu", "--index-think", "always")
    assert accepted.exit_code == 0, accepted.stderr


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_a_faiss_index_answers_as_exact_search_does(world, kind):
    pytest.importorskip("faiss")
    folder = world["root"] / f"index-{kind}"
    built = run("index", world["index"], "-o", folder, "--kind", kind)
    assert built.exit_code == 0, built.stderr
    assert built.stdout.strip() == str(folder)
    assert json.loads((folder / "twn-index.json").read_text())["embeddings"]["think_mode"] == "never"
    exact = search(world, "--index", world["index"], "-k", 3)
    approximate = search(world, "--index", folder, "-k", 3)
    for ours, theirs in zip(exact, approximate):
        assert [hit["id"] for hit in ours["results"]] == [hit["id"] for hit in theirs["results"]]
        assert [hit["score"] for hit in theirs["results"]] == pytest.approx([hit["score"] for hit in ours["results"]], abs=1e-5)
