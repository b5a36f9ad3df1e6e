"""The command line as a user meets it: help, the toy backbone, `twn embed` end to end on real images."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TEST_SPEC
from typer.testing import CliRunner

from twn_cli.cli import app
from twn_cli.data.embedding_files import read_embeddings
from twn_cli.engine.checkpoint import save_checkpoint
from twn_cli.errors import TWNError


def run(*arguments, input: str | None = None):
    return CliRunner().invoke(app, [str(argument) for argument in arguments], input=input)


def error_line(result) -> str:
    """The one line that reports the error (progress bars may precede it on stderr)."""
    errors = [line for line in result.stderr.splitlines() if line.startswith("twn ") and ": error: " in line]
    assert len(errors) == 1, result.stderr
    return errors[0]


@pytest.fixture
def image_folder(tmp_path, real_image_paths) -> Path:
    folder = tmp_path / "images"
    (folder / "nested").mkdir(parents=True)
    for path in real_image_paths[:3]:
        shutil.copy(path, folder / path.name)
    shutil.copy(real_image_paths[3], folder / "nested" / real_image_paths[3].name)
    (folder / "notes.txt").write_text("not an image, not an input")
    return folder


@pytest.fixture
def checkpoint(make_model, tmp_path) -> Path:
    return save_checkpoint(make_model(), tmp_path / "run", stages=[])


def test_help_lists_every_command_without_importing_torch():
    code = "import sys; from twn_cli.cli import app; sys.argv = ['twn', '--help']\ntry: app()\nexcept SystemExit: pass\nprint('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    for command in ["toy-backbone", "prepare", "train-embed", "train-gate", "train-rl", "embed", "route", "eval"]:
        assert command in result.stdout
    assert result.stdout.strip().endswith("False")


def test_python_dash_m_runs_the_same_app():
    result = subprocess.run([sys.executable, "-m", "twn_cli", "--help"], capture_output=True, text=True, check=True)
    assert "toy-backbone" in result.stdout


def test_toy_backbone_is_deterministic_for_a_seed(tmp_path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({k: v for k, v in vars(TEST_SPEC).items()}))
    paths = {}
    for name, seed in [("a", 5), ("b", 5), ("c", 6)]:
        result = run("toy-backbone", "-o", tmp_path / name, "--seed", seed, "--recipe", recipe)
        assert result.exit_code == 0, result.stderr
        paths[name] = Path(result.stdout.strip())
    weights = {name: (path / "model.safetensors").read_bytes() for name, path in paths.items()}
    assert weights["a"] == weights["b"] != weights["c"]
    assert (paths["a"] / "tokenizer.json").read_bytes() == (paths["b"] / "tokenizer.json").read_bytes()


def test_toy_backbone_loads_offline_like_a_real_one(toy_backbone_dir):
    code = (
        "from twn_cli.engine.backbone import load_backbone\n"
        f"b = load_backbone({str(toy_backbone_dir)!r}, device='cpu')\n"
        "print(type(b.model).__name__, type(b.processor.image_processor).__name__)"
    )
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": "/nonexistent"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.split() == ["Qwen2VLForConditionalGeneration", "Qwen2VLImageProcessorPil"]


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".parquet", ".jsonl"])
def test_embed_an_image_folder_into_each_format(image_folder, checkpoint, tmp_path, suffix):
    output = tmp_path / f"embeddings{suffix}"
    result = run("embed", image_folder, "--checkpoint", checkpoint, "-o", output, "--think", "always", "--batch-size", 3)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(output)
    expected_ids = ["astronaut.png", "chelsea.png", "coffee.png", "nested/rocket.jpg"]
    if suffix == ".jsonl":
        records = [json.loads(line) for line in output.read_text().splitlines()]
        assert [r["id"] for r in records] == expected_ids
        assert all(r["think"] and r["reasoning_tokens"] > 0 for r in records)
        return
    ids, embeddings, metadata = read_embeddings(output)
    assert ids == expected_ids
    assert embeddings.shape == (4, metadata["embedding_dim"])
    assert torch.allclose(embeddings.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert metadata["checkpoint"] == str(checkpoint)
    assert metadata["think_mode"] == "always"
    assert metadata["normalized"] is True
    assert not list(tmp_path.glob(".*partial*"))


def test_every_format_holds_the_same_vectors(image_folder, checkpoint, tmp_path):
    vectors = []
    for suffix in (".safetensors", ".pt", ".parquet"):
        assert run("embed", image_folder, "--checkpoint", checkpoint, "-o", tmp_path / f"e{suffix}").exit_code == 0
        vectors.append(read_embeddings(tmp_path / f"e{suffix}")[1])
    assert torch.equal(vectors[0], vectors[1]) and torch.equal(vectors[0], vectors[2])


def test_parquet_output_streams_row_groups_keeps_them_when_interrupted_and_resumes(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    from twn_cli.data import embedding_files
    from twn_cli.data.embedding_files import EmbeddingBatch, EmbeddingWriter

    monkeypatch.setattr(embedding_files, "PARQUET_ROW_GROUP", 4)
    metadata = {"embedding_dim": 3, "think_mode": "never"}
    vectors = torch.randn(10, 3)

    def batch(rows: range) -> EmbeddingBatch:
        return EmbeddingBatch([f"r{i}" for i in rows], vectors[rows.start : rows.stop], [False] * len(rows), [0.5] * len(rows), [""] * len(rows), [0] * len(rows))

    writer = EmbeddingWriter(str(tmp_path / "e.parquet"), metadata)
    writer.add(batch(range(0, 3)), records=4, skipped=[{"record": "x", "reason": "not found"}])  # 4 records, one bad
    writer.add(batch(range(3, 6)), records=3)
    assert writer._buffered == 0  # six rows: written out as a part as soon as a row group is full
    writer.add(batch(range(6, 8)), records=2)
    writer.abort()  # interrupted: the finished part stays, the rows not yet written are lost
    assert not (tmp_path / "e.parquet").exists()
    with pytest.raises(TWNError, match="interrupted run's parts.*--resume"):
        EmbeddingWriter(str(tmp_path / "e.parquet"), metadata)
    with pytest.raises(TWNError, match="other settings"):
        EmbeddingWriter(str(tmp_path / "e.parquet"), {**metadata, "think_mode": "always"}, resume=True)

    resumed = EmbeddingWriter(str(tmp_path / "e.parquet"), metadata, resume=True)
    assert (resumed.records_done, resumed.count, resumed.skipped) == (7, 6, [{"record": "x", "reason": "not found"}])
    resumed.add(batch(range(6, 10)), records=4)
    resumed.close()
    written = pq.ParquetFile(tmp_path / "e.parquet").metadata
    assert [written.row_group(i).num_rows for i in range(written.num_row_groups)] == [6, 4]
    ids, embeddings, read_metadata = read_embeddings(tmp_path / "e.parquet")
    assert ids == [f"r{i}" for i in range(10)] and torch.equal(embeddings, vectors)
    assert read_metadata["skipped"] == [{"record": "x", "reason": "not found"}] and read_metadata["think_mode"] == "never"
    assert list(tmp_path.iterdir()) == [tmp_path / "e.parquet"]  # the parts are gone once merged
    for output in (str(tmp_path / "e.safetensors"), "-"):
        with pytest.raises(TWNError, match="needs a .parquet output"):
            EmbeddingWriter(output, metadata, resume=True)
    failed_early = EmbeddingWriter(str(tmp_path / "g.parquet"), metadata)
    failed_early.abort()  # before any part: nothing is left behind
    assert list(tmp_path.iterdir()) == [tmp_path / "e.parquet"]


def test_embed_resumes_an_interrupted_parquet_output(checkpoint, real_image_paths, tmp_path, monkeypatch):
    from twn_cli.data import embedding_files
    from twn_cli.stages import embed as embed_stage

    # Six records, bad ones at 1 and 4; blocks of one record; a part every two rows.
    lines = [{"id": f"r{i}", "image": str(real_image_paths[i % 4] if i not in (1, 4) else tmp_path / "missing.png")} for i in range(6)]
    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text("".join(json.dumps(line) + "\n" for line in lines))
    monkeypatch.setattr(embedding_files, "PARQUET_ROW_GROUP", 2)
    monkeypatch.setattr("twn_cli.engine.batching.BLOCK_BATCHES", 1)
    options = ["--checkpoint", checkpoint, "--batch-size", 1, "--think", "always", "--skip-bad"]
    straight = run("embed", inputs, *options, "-o", tmp_path / "straight.parquet")
    assert straight.exit_code == 0, straight.stderr

    original = embed_stage.EmbeddingWriter.add
    added = []

    def interrupt_after_four_blocks(self, *arguments, **named):
        original(self, *arguments, **named)
        added.append(1)
        if len(added) == 4:  # r0, r1 (bad), r2: a part of two rows; r3 still buffered, lost
            raise KeyboardInterrupt

    monkeypatch.setattr(embed_stage.EmbeddingWriter, "add", interrupt_after_four_blocks)
    assert run("embed", inputs, *options, "-o", tmp_path / "e.parquet").exit_code != 0
    monkeypatch.setattr(embed_stage.EmbeddingWriter, "add", original)
    assert not (tmp_path / "e.parquet").exists()
    refused = run("embed", inputs, *options, "-o", tmp_path / "e.parquet")
    assert refused.exit_code == 1 and "--resume" in refused.stderr
    other_settings = run("embed", inputs, *options[:-2], "never", "--skip-bad", "-o", tmp_path / "e.parquet", "--resume")
    assert other_settings.exit_code == 1 and "other settings" in other_settings.stderr

    resumed = run("embed", inputs, *options, "-o", tmp_path / "e.parquet", "--resume")
    assert resumed.exit_code == 0, resumed.stderr
    assert "after its first 3 records" in resumed.stderr and "embedded 2 inputs" in resumed.stderr
    expected, got = read_embeddings(tmp_path / "straight.parquet"), read_embeddings(tmp_path / "e.parquet")
    assert got[0] == expected[0] == ["r0", "r2", "r3", "r5"] and torch.allclose(got[1], expected[1], atol=1e-6)
    assert [entry["record"] for entry in got[2]["skipped"]] == [entry["record"] for entry in expected[2]["skipped"]]
    assert len(got[2]["skipped"]) == 2 and not list(tmp_path.glob(".e.parquet.parts"))

    # Inputs that changed under an interrupted run are refused, not skipped blindly.
    monkeypatch.setattr(embed_stage.EmbeddingWriter, "add", interrupt_after_four_blocks)
    added.clear()
    assert run("embed", inputs, *options, "-o", tmp_path / "f.parquet").exit_code != 0
    monkeypatch.setattr(embed_stage.EmbeddingWriter, "add", original)
    inputs.write_text("".join(json.dumps({**line, "id": f"new-{line['id']}"}) + "\n" for line in lines))
    changed = run("embed", inputs, *options, "-o", tmp_path / "f.parquet", "--resume")
    assert changed.exit_code == 1 and "the inputs now have 'new-r2' there" in changed.stderr


def test_embed_jsonl_from_stdin_streams_jsonl_to_stdout(checkpoint, real_image_paths):
    lines = [
        {"id": "q1", "text": "a cat sitting", "image": str(real_image_paths[1])},
        {"id": "q2", "text": "the shape with one more side than a square"},
        {"id": "q3", "images": [str(real_image_paths[0]), str(real_image_paths[2])], "instruction": "Find the caption."},
    ]
    stdin = "".join(json.dumps(line) + "\n" for line in lines)
    result = run("embed", "-", "--checkpoint", checkpoint, "--adaptive", "--threshold", "0.0", input=stdin)
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["id"] for r in records] == ["q1", "q2", "q3"]
    assert all(r["think"] and 0 <= r["p_think"] <= 1 and len(r["embedding"]) == 64 for r in records)


def test_embed_with_fresh_adapters_on_a_backbone(image_folder, toy_backbone_dir, tmp_path):
    result = run("embed", image_folder, "--backbone", toy_backbone_dir, "-o", tmp_path / "e.pt")
    assert result.exit_code == 0, result.stderr
    assert "untrained" in result.stderr
    assert read_embeddings(tmp_path / "e.pt")[2]["checkpoint"] is None


def test_a_bad_record_stops_embed_with_its_name_and_leaves_no_output(checkpoint, tmp_path, real_image_paths):
    records = tmp_path / "queries.jsonl"
    records.write_text(
        json.dumps({"id": "good", "image": str(real_image_paths[0])}) + "\n"
        + json.dumps({"id": "missing", "image": "nowhere.png"}) + "\n"
    )
    output = tmp_path / "e.safetensors"
    result = run("embed", records, "--checkpoint", checkpoint, "-o", output)
    assert result.exit_code == 1
    error = error_line(result)
    assert f"{records}:2" in error and "record 'missing'" in error and "not found" in error
    assert not output.exists() and not list(tmp_path.glob(".*partial*"))


@pytest.mark.parametrize(
    "bad_line, reason",
    [
        ('{"id": "empty", "text": "  "}', "neither text nor images"),
        ('{"id": "corrupt", "image": "corrupt.png"}', "Pillow can decode"),
        ('{"id": "good", "text": "again"}', "duplicate id 'good'"),
        ("{not json", "not valid JSON"),
    ],
    ids=["empty", "corrupt-image", "duplicate-id", "invalid-json"],
)
def test_skip_bad_skips_and_reports_each_bad_record(checkpoint, tmp_path, bad_line, reason):
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG garbage that is no picture")
    records = tmp_path / "queries.jsonl"
    records.write_text('{"id": "good", "text": "a red triangle"}\n' + bad_line + "\n" + '{"id": "last", "text": "a blue star"}\n')
    strict = run("embed", records, "--checkpoint", checkpoint, "-o", tmp_path / "strict.pt")
    assert strict.exit_code == 1 and reason in error_line(strict) and "--skip-bad" in error_line(strict)
    result = run("embed", records, "--checkpoint", checkpoint, "-o", tmp_path / "e.pt", "--skip-bad")
    assert result.exit_code == 0, result.stderr
    ids, _, metadata = read_embeddings(tmp_path / "e.pt")
    assert ids == ["good", "last"]
    assert len(metadata["skipped"]) == 1
    assert metadata["skipped"][0]["record"] == f"{records}:2" and reason in metadata["skipped"][0]["reason"]


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--checkpoint", "no-such-run"], "does not exist"),
        (["-o", "e.npy"], "unknown output format"),
        ([], "give --checkpoint"),
    ],
)
def test_usage_errors_are_one_clear_line(image_folder, checkpoint, arguments, message):
    if arguments and arguments[0] == "-o":
        arguments = ["--checkpoint", str(checkpoint), *arguments]
    result = run("embed", image_folder, *arguments)
    assert result.exit_code == 1
    assert message in error_line(result)


def test_route_streams_gate_decisions_from_stdin_without_decoding(checkpoint, real_image_paths, monkeypatch):
    from twn_cli.engine.model import TWNModel

    def no_decoding(*args, **kwargs):
        raise AssertionError("route must not decode")

    monkeypatch.setattr(TWNModel, "think", no_decoding)
    monkeypatch.setattr(TWNModel, "query_pass", no_decoding)
    stdin = "".join(
        json.dumps(line) + "\n"
        for line in [{"id": "a", "text": "a red triangle"}, {"id": "b", "image": str(real_image_paths[1])}, {"id": "c", "text": "a cup"}]
    )
    result = run("route", "-", "--checkpoint", checkpoint, "--threshold", "0.5", "--batch-size", 2, input=stdin)
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["id"] for r in records] == ["a", "b", "c"]
    assert all(r["think"] == (r["p_think"] >= 0.5) for r in records)


def test_route_probabilities_match_embed(checkpoint, image_folder, tmp_path):
    routed = run("route", image_folder, "--checkpoint", checkpoint, "-o", tmp_path / "route.jsonl")
    assert routed.exit_code == 0, routed.stderr
    assert routed.stdout.strip() == str(tmp_path / "route.jsonl")
    embedded = run("embed", image_folder, "--checkpoint", checkpoint, "-o", tmp_path / "e.jsonl")
    assert embedded.exit_code == 0, embedded.stderr
    p_route = [json.loads(line)["p_think"] for line in (tmp_path / "route.jsonl").read_text().splitlines()]
    p_embed = [json.loads(line)["p_think"] for line in (tmp_path / "e.jsonl").read_text().splitlines()]
    assert p_route == pytest.approx(p_embed, abs=1e-5)


def test_eval_command_writes_the_report(checkpoint, toy_dataset_dir, tmp_path):
    result = run("eval", toy_dataset_dir, "--checkpoint", checkpoint, "-o", tmp_path / "report", "--mode", "sweep", "--thresholds", "0.3,0.6")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path / "report")
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["mode"] == "sweep" and report["command"].startswith("twn ")  # sys.argv: pytest's, in-process
    assert [point["label"] for point in report["sweep"]][0] == "never"
    for name in ("report.md", "predictions.jsonl", "quality_vs_tokens.png"):
        assert (tmp_path / "report" / name).is_file()
    bad = run("eval", toy_dataset_dir, "--checkpoint", checkpoint, "-o", tmp_path / "r2", "--thresholds", "high")
    assert bad.exit_code == 1 and "--thresholds" in error_line(bad)
