"""`twn embed` and `twn eval` under torchrun: two processes give what one gives, and only the first writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from twn_cli.cli import app
from twn_cli.engine.checkpoint import save_checkpoint

# Numbers that depend on how long a run took or how it was started, not on what the model ranked.
RUN_KEYS = {"wall_seconds", "inputs_per_second", "created", "run", "command"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def checkpoint(make_model, tmp_path) -> Path:
    return save_checkpoint(make_model(), tmp_path / "run", stages=[])


def torchrun(*arguments) -> subprocess.CompletedProcess:
    """Two processes on this machine; --standalone picks a free port, so parallel test runs do not collide."""
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *map(str, arguments)],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def run(*arguments):
    return CliRunner().invoke(app, [str(argument) for argument in arguments])


MAP_IN_ORDER_SCRIPT = """
import json, sys, torch
from twn_cli.distributed import Distributed, end_process_group, start_process_group
from twn_cli.errors import TWNError
start_process_group()
distributed = Distributed()
def prepare(block):
    if block == "unreadable":
        raise TWNError(f"block {block} could not be read in process {distributed.rank}")
    return block.upper()
def work(block):
    if block == "BAD":
        raise TWNError(f"block {block} failed in process {distributed.rank}")
    return (block, distributed.rank)
done = list(distributed.map_in_order(work, ["a", "b", "c", "d", "e"], prepare))
failed = []
for blocks in (["a", "b", "c", "bad", "e"], ["a", "b", "unreadable", "d"]):
    try:
        list(distributed.map_in_order(work, blocks, prepare))
    except TWNError as error:
        failed.append(str(error))
only_first, nowhere = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
if distributed.rank == 0:
    only_first.grad = torch.ones(2)
distributed.sum_gradients([only_first, nowhere])
gradients = [only_first.grad.tolist(), nowhere.grad]
with open(f"{sys.argv[1]}.{distributed.rank}", "w") as output:
    json.dump({"done": done, "failed": failed, "gradients": gradients}, output)
end_process_group(finished=True)
"""


def test_map_in_order_keeps_block_order_and_raises_an_error_in_every_process_and_gradients_sum(tmp_path):
    script = tmp_path / "map.py"
    script.write_text(MAP_IN_ORDER_SCRIPT)
    torchrun(script, tmp_path / "out")
    for rank in (0, 1):
        result = json.loads((tmp_path / f"out.{rank}").read_text())
        # Block i is worked on by process i % 2; every process receives every result in block order.
        assert result["done"] == [["A", 0], ["B", 1], ["C", 0], ["D", 1], ["E", 0]]
        assert result["failed"] == ["block BAD failed in process 1", "block unreadable could not be read in process 0"]
        # Summed gradients: one process's counts; a parameter no process gave a gradient keeps none.
        assert result["gradients"] == [[1.0, 1.0], None]


def test_blocks_are_prepared_ahead_in_a_thread_but_never_drawn_past_what_a_stream_has_given():
    """The next block is prepared while the current one is worked on, and a stream that has given one
    block and waits (stdin) gets that block's result before anything more is drawn from it."""
    import threading

    from twn_cli.distributed import Distributed

    a_worked, c_prepared = threading.Event(), threading.Event()

    def stream():
        yield "a"
        assert a_worked.wait(timeout=30), "block a was not worked on before block b was drawn"
        yield "b"
        yield "c"

    def prepare(block):
        if block == "c":
            c_prepared.set()
        return block.upper()

    def work(block):
        if block == "A":
            a_worked.set()
        if block == "B":
            assert c_prepared.wait(timeout=30), "block c was not prepared while block b was worked on"
        return block

    assert list(Distributed().map_in_order(work, stream(), prepare)) == ["A", "B", "C"]


def test_a_process_prepares_its_next_block_while_it_works_however_many_blocks_are_others():
    """With three processes, rank 2's blocks are 2, 5, 8: block 5 is prepared while block 2 is worked on,
    although blocks 3 and 4, which other processes work on, come between."""
    import threading

    from twn_cli.distributed import prepared_ahead

    next_one_started = threading.Event()

    def prepare(block):
        if block == 5:
            next_one_started.set()
        return block

    handed = []
    for block, (ready, error) in prepared_ahead(range(9), prepare, mine=lambda index: index % 3 == 2):
        if block == 2:
            assert next_one_started.wait(timeout=30), "block 5 was not prepared while block 2 was worked on"
        handed.append((block, ready, error))
    assert handed == [(block, block if block % 3 == 2 else None, None) for block in range(9)]


def test_embed_with_two_processes_streams_what_one_process_writes(checkpoint, real_image_paths, tmp_path):
    kinds = [
        {"id": "q1", "text": "a cat sitting", "image": str(real_image_paths[1])},
        {"id": "q2", "text": "the shape with one more side than a square"},
        {"id": "q3", "image": str(real_image_paths[0])},
        {"id": "gone", "image": str(tmp_path / "missing.png")},
        {"id": "q4", "images": [str(real_image_paths[2]), str(real_image_paths[3])], "instruction": "Find the caption."},
    ]
    lines = [{**kind, "id": f"{kind['id']}-{copy}"} for copy in range(4) for kind in kinds]
    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text("".join(json.dumps(line) + "\n" for line in lines))
    options = ["--checkpoint", checkpoint, "--think", "always", "--batch-size", 1, "--skip-bad"]
    single = run("embed", inputs, *options, "-o", tmp_path / "one.jsonl")
    assert single.exit_code == 0, single.stderr
    # Blocks of 8 records (8 batches of one): process 0 embeds the first and third, process 1 the second.
    two = torchrun("-m", "twn_cli", "embed", inputs, *options, "-o", "-")
    expected = [json.loads(line) for line in (tmp_path / "one.jsonl").read_text().splitlines()]
    streamed = [json.loads(line) for line in two.stdout.splitlines()]
    kept = [line["id"] for line in lines if not line["id"].startswith("gone")]
    assert [record["id"] for record in streamed] == [record["id"] for record in expected] == kept
    for got, want in zip(streamed, expected):
        assert torch.allclose(torch.tensor(got.pop("embedding")), torch.tensor(want.pop("embedding")), atol=1e-5)
        assert got == want
    summaries = [line.split(" in ")[0] for line in two.stderr.splitlines() if line.startswith("embedded ")]
    assert summaries == [f"embedded 16 inputs (16 thought, {16 * 12} reasoning tokens, 4 skipped)"]


def test_eval_with_two_processes_reports_what_one_process_reports(checkpoint, toy_dataset_dir, tmp_path):
    options = ["--checkpoint", checkpoint, "--mode", "adaptive", "--batch-size", 1]  # blocks of 8 inputs
    single = run("eval", toy_dataset_dir, *options, "-o", tmp_path / "one")
    assert single.exit_code == 0, single.stderr
    two = torchrun("-m", "twn_cli", "eval", toy_dataset_dir, *options, "-o", tmp_path / "two")
    assert two.stdout.splitlines() == [str(tmp_path / "two")]
    reports = {name: json.loads((tmp_path / name / "report.json").read_text()) for name in ("one", "two")}
    assert (reports["one"]["run"]["processes"], reports["two"]["run"]["processes"]) == (1, 2)
    assert without(reports["two"], RUN_KEYS) == without(reports["one"], RUN_KEYS)
    assert (tmp_path / "two" / "predictions.jsonl").read_text() == (tmp_path / "one" / "predictions.jsonl").read_text()
    # The cache the two processes left is complete: one process resumes from it without embedding anything.
    resumed = run("eval", toy_dataset_dir, *options, "-o", tmp_path / "two")
    assert resumed.exit_code == 0, resumed.stderr
    tasks_from_cache = json.loads((tmp_path / "two" / "report.json").read_text())["run"]["tasks_from_cache"]
    assert tasks_from_cache == list(reports["two"]["result"]["tasks"])


def without(value, keys: set[str]):
    if isinstance(value, dict):
        return {key: without(item, keys) for key, item in value.items() if key not in keys}
    if isinstance(value, list):
        return [without(item, keys) for item in value]
    return value


@pytest.mark.parametrize("plugin", ["FSDP", "DEEPSPEED"])
def test_accelerate_sharding_configs_are_refused_rather_than_ignored(plugin, monkeypatch):
    from twn_cli.distributed import start_process_group
    from twn_cli.errors import TWNError

    monkeypatch.setenv(f"ACCELERATE_USE_{plugin}", "true")
    with pytest.raises(TWNError, match="shard_backbone"):
        start_process_group()


@pytest.mark.parametrize("label", ["margin", "expected_hit"])
def test_train_gate_with_two_processes_saves_what_one_process_saves(checkpoint, toy_dataset_dir, tmp_path, label):
    """Four labelling batches: processes 0 and 1 each label two of them (margin: and cache them; expected_hit:
    judged against their pools, as the validation queries are)."""
    settings = {"label": label, "split": "train", "label_queries": 8, "label_batch_size": 2, "validation_queries": 8,
                "max_think_tokens": 6, "epochs": 20, "batch_size": 8, **({"hard_negatives": 2} if label == "margin" else {})}
    options = ["--checkpoint", checkpoint, "--target", "best", "--delta", 0.01, *[f"--set={key}={value}" for key, value in settings.items()]]
    single = run("train-gate", toy_dataset_dir, *options, "-o", tmp_path / "one")
    assert single.exit_code == 0, single.stderr
    two = torchrun("-m", "twn_cli", "train-gate", toy_dataset_dir, *options, "-o", tmp_path / "two")
    assert two.stdout.splitlines() == [str(tmp_path / "two")]
    gates = {name: json.loads((tmp_path / name / "twn.json").read_text())["gate"] for name in ("one", "two")}
    assert gates["two"] == gates["one"] and gates["one"]["label"] == label
    assert (tmp_path / "two" / "gate.safetensors").read_bytes() == (tmp_path / "one" / "gate.safetensors").read_bytes()
    for name in ("gate-labels.jsonl", "gate-metrics.jsonl"):
        assert (tmp_path / "two" / "train" / name).read_text() == (tmp_path / "one" / "train" / name).read_text()
    assert len((tmp_path / "one" / "train" / "gate-labels.jsonl").read_text().splitlines()) == 8
    assert len(list((tmp_path / "two" / "train" / "gate-labels").glob("batch-*.safetensors"))) == (4 if label == "margin" else 0)


def test_train_rl_with_two_processes_trains_checkpoints_and_resumes(checkpoint, toy_dataset_dir, tmp_path):
    cache = run("embed", toy_dataset_dir, "--checkpoint", checkpoint, "-o", tmp_path / "cache.pt")
    assert cache.exit_code == 0, cache.stderr
    options = ["train-rl", toy_dataset_dir, "--checkpoint", checkpoint, "--negatives-cache", tmp_path / "cache.pt",
               "-o", tmp_path / "rl", "--set=batch_size=4", "--set=group_size=2", "--set=max_think_tokens=4",
               "--set=validation_queries=8", "--set=heldout_hit_queries=6", "--set=checkpoint_every=1", "--set=refresh_cache_every=1"]  # 2 held-out batches
    first = torchrun("-m", "twn_cli", *options, "--steps", 1)
    assert first.stdout.splitlines() == [str(tmp_path / "rl")]
    resumed = torchrun("-m", "twn_cli", *options, "--steps", 2, "--resume")
    assert resumed.stdout.splitlines() == [str(tmp_path / "rl")]
    manifest = json.loads((tmp_path / "rl" / "twn.json").read_text())
    assert manifest["train_rl"]["steps"] == 2 and manifest["train_rl"]["cache_refreshes"] == 1  # the resumed run's step
    steps = [json.loads(line)["step"] for line in (tmp_path / "rl" / "train" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    assert "held-out reward (8 validation queries)" in resumed.stderr
    assert "held-out always-think Hit@1 (6 validation queries)" in resumed.stderr
    assert len(manifest["train_rl"]["heldout_hit"]["by_step"]) == 2
    again = torchrun("-m", "twn_cli", *options, "--steps", 2, "--resume")  # already finished: nothing to train
    assert "held-out reward (8 validation queries)" in again.stderr
    fresh = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "twn_cli", *map(str, options), "--steps", "2"],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )
    # Every process refuses a directory that holds a run, not only the first.
    assert fresh.returncode != 0 and fresh.stderr.count("holds a run already") == 2
