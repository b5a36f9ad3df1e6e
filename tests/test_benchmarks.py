"""The benchmark scripts still run, at their smallest sizes on the tests' tiny backbone (they must not rot).

Figures are not checked (timings mean nothing here), only that every part runs, writes its JSON, and that
the settings a comparison rests on hold: fixed-length CoTs, the asked think rate, one process per pool.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def scripts():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield lambda name: importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_cpu_benchmarks_run_at_tiny_sizes(scripts, toy_backbone_dir, toy_dataset_dir, tmp_path):
    backbone = ["--backbone", str(toy_backbone_dir)]

    figures = scripts("think_cost").main(
        backbone + ["--n", "4", "--batch-size", "2", "--rates", "0.5", "--repeats", "1", "--max-think-tokens", "2",
                    "--lora-rank", "2", "-o", str(tmp_path / "think_cost.json")]
    )
    written = json.loads((tmp_path / "think_cost.json").read_text())
    assert written["modes"].keys() == figures["modes"].keys()
    assert figures["modes"]["always"]["reasoning_tokens_per_input"] == 2  # every CoT runs to the budget
    assert figures["modes"]["never"]["reasoning_tokens_per_input"] == 0
    assert figures["adaptive"][0]["think_rate"] == 0.5
    assert {"interface", "plain", "length_sorting", "machine"} <= figures.keys()

    figures = scripts("train_embed_memory").main(
        backbone + ["--data", str(toy_dataset_dir), "--batch-sizes", "2", "--chunks", "none", "1", "--steps", "1",
                    "--lora-rank", "2", "--in-process", "-o", str(tmp_path / "train.json")]
    )
    assert [(row["chunk"], "error" in row) for row in figures["configurations"]] == [("none", False), ("1", False)]
    assert all(row["peak_mib"] > 0 for row in figures["configurations"])

    figures = scripts("scaling").main(
        backbone + ["--inputs", "2", "--modes", "never", "--batch-size", "2", "--repeats", "1", "--lora-rank", "2",
                    "--pools", "50", "--queries", "3", "--dim", "8", "--chunk-size", "16", "--in-process",
                    "-o", str(tmp_path / "scaling.json")]
    )
    assert [row["inputs"] for row in figures["embedding"]["rows"]] == [2]
    assert figures["ranking"]["rows"][0]["pool"] == 50

    figures = scripts("search_memory").main(
        ["--rows", "300", "--dim", "8", "--queries", "5", "-k", "3", "--chunk-sizes", "7", "1000", "--work", str(tmp_path),
         "--in-process", "-o", str(tmp_path / "search.json")]
    )
    assert [row["chunk_size"] for row in figures["rows_measured"]] == [7, 1000]
    assert figures["same_answer_for_every_chunk_size"] and all(row["peak_rss_mib"] > 0 for row in figures["rows_measured"])


def test_cot_quality_scores_every_task_and_difficulty_with_teacher_cots(scripts, toy_backbone_dir, toy_dataset_dir, tmp_path):
    from twn_cli.data.prepared import load_prepared

    figures = scripts("cot_quality").main(
        ["--backbone", str(toy_backbone_dir), "--data", str(toy_dataset_dir), "--split", "test", "--per-group", "1",
         "--max-think-tokens", "2", "--lora-rank", "2", "-o", str(tmp_path / "cot.json")]
    )
    rows = load_prepared(str(toy_dataset_dir)).queries["test"]
    assert {(g["task"], g["difficulty"]) for g in figures["groups"]} == {(r["task"], r["difficulty"]) for r in rows if r["cot"]}
    assert all(g["queries"] == 1 and 0 <= g["exact"] <= g["concludes_right"] <= 1 and g["teacher_loss_per_token"] > 0 for g in figures["groups"])
    assert scripts("cot_quality").conclusion("a lime is green; so a green star") == "a green star"
    assert scripts("cot_quality").conclusion("a green star") is None
    assert json.loads((tmp_path / "cot.json").read_text())["by_difficulty"] == figures["by_difficulty"]


def test_gpu_benchmark_tiny_mode_runs_on_the_cpu(scripts, toy_backbone_dir, tmp_path):
    figures = scripts("gpu").main(
        ["--tiny", "--backbones", "qwen3-vl-4b", "--tokenizer", str(toy_backbone_dir), "-o", str(tmp_path / "gpu.json")]
    )
    assert figures["errors"] == {}
    assert not figures["skipped"]
    for section in ("card", "build", "prefill", "decode_dynamic", "embed", "train_embed", "decode_static_compiled"):
        assert any(name.endswith(section) for name in figures["sections"]), section
    assert json.loads((tmp_path / "gpu.json").read_text())["sections"].keys() == figures["sections"].keys()


def test_gate_labels_scores_a_train_gate_runs_labels_without_a_model(scripts, make_model, toy_dataset_dir, tmp_path):
    from typer.testing import CliRunner

    from twn_cli.cli import app
    from twn_cli.engine.checkpoint import save_checkpoint

    start = save_checkpoint(make_model(), tmp_path / "embed", stages=[{"stage": "train-embed"}])
    settings = {"label_queries": 24, "label_batch_size": 6, "max_think_tokens": 4, "epochs": 10, "validation_queries": 6, "delta": 0.0}
    result = CliRunner().invoke(app, ["train-gate", str(toy_dataset_dir), "--checkpoint", str(start), "-o", str(tmp_path / "gate")]
                                + [f"--set={key}={value}" for key, value in settings.items()])
    assert result.exit_code == 0, result.stderr

    figures = scripts("gate_labels").main([str(tmp_path / "gate"), "--deltas", "0", "1", "-o", str(tmp_path / "labels.json")])
    logged = [json.loads(line) for line in (tmp_path / "gate" / "train" / "gate-labels.jsonl").read_text().splitlines()]
    at_zero, at_one = figures["auroc_by_delta"]["0"], figures["auroc_by_delta"]["1"]
    assert figures["inputs"] == len(logged) == 24
    assert at_zero["think_rate"] == round(sum(record["label"] for record in logged) / 24, 4)  # the run's own δ, 0
    manifest = json.loads((tmp_path / "gate" / "twn.json").read_text())
    assert at_zero["gate"] == manifest["gate"]["auroc"]["heldout"]  # train-gate's own estimate, recomputed
    assert at_one["think_rate"] == 0 and at_one["gate"] is None  # a cosine margin never rises by 1: one class, no AUROC
    assert {"gate", "gate_on_0.25_of_labels", "gate_on_0.5_of_labels", "task_rate", "task_difficulty_rate"} <= set(at_zero)
    assert all(0 <= at_zero[name] <= 1 for name in at_zero)
    assert json.loads((tmp_path / "labels.json").read_text())["auroc_by_delta"] == figures["auroc_by_delta"]


def test_hub_backbones_counts_video_tokens_and_computes_memory(scripts, tmp_path):
    figures = scripts("hub_backbones").main(["--frames", "4", "-o", str(tmp_path / "hub.json")])
    assert [row["ratio"] for row in figures["video_tokens"]] == [2.0] * 4  # a temporal patch holds two frames
    assert 4.3e9 < figures["memory"]["qwen3-vl-4b"]["parameters"] < 4.5e9
    assert figures["memory"]["qwen3-vl-30b-a3b language model"]["adapted_percent"] < 5
    assert json.loads((tmp_path / "hub.json").read_text())["video_tokens"] == figures["video_tokens"]


def test_rl_headroom_scores_the_teacher_cot_as_train_rl_scores_a_sampled_one(scripts, make_model, toy_dataset_dir, tmp_path):
    import torch
    import yaml
    from conftest import cache_for
    from parameter_checks import distinct_adapters

    from twn_cli.data.prepared import load_prepared
    from twn_cli.data.training_data import TrainingData
    from twn_cli.engine.checkpoint import save_checkpoint
    from twn_cli.stages.train_rl import HELDOUT_KEY, RLTrainer, TrainRLConfig

    model = make_model()
    distinct_adapters(model)
    checkpoint = save_checkpoint(model, tmp_path / "start", stages=[{"stage": "train-gate"}])
    dataset = load_prepared(str(toy_dataset_dir))
    cache = cache_for(model, dataset)
    torch.save({"ids": cache.ids, "embeddings": cache.embeddings}, tmp_path / "cache.pt")
    settings = {"group_size": 2, "max_think_tokens": 6, "temperature": 1.0, "batch_size": 4, "hardest_negatives": 4, "random_negatives": 4}
    (tmp_path / "rl.yaml").write_text(yaml.safe_dump(settings))
    arguments = ["--checkpoint", str(checkpoint), "--data", str(toy_dataset_dir), "--cache", str(tmp_path / "cache.pt"), "--recipe", str(tmp_path / "rl.yaml"),
                 "--split", "validation", "--queries", "8", "-o", str(tmp_path / "headroom.json")]
    figures = scripts("rl_headroom").main(arguments)

    trainer = RLTrainer(model, TrainingData(dataset, "validation", hard_negatives=0, seed=0), cache, TrainRLConfig(**settings, split="validation"))
    rows = list(dataset.queries["validation"])[:8]
    overall = figures["results"][0]
    assert overall["difficulty"] == "all" and overall["queries"] == 8
    assert overall["sampled"] == pytest.approx(trainer.heldout_reward(rows), abs=1e-4)  # train-rl's held-out reward
    assert all(row["best_of_group"] >= row["sampled"] - 1e-6 for row in figures["results"]) and overall["best_of_group"] > overall["sampled"]
    assert overall["teacher_over_sampled"] == pytest.approx(overall["teacher"] / overall["sampled"], abs=1e-3)  # every toy query has a CoT
    assert sum(row["queries"] for row in figures["results"][1:]) == 8
    assert json.loads((tmp_path / "headroom.json").read_text())["results"] == figures["results"]

    # A teacher that writes what the policy writes earns what the policy's CoT earns, query by query; the
    # same CoTs given to the wrong queries earn something else.
    batch = rows[:4]
    with torch.no_grad():
        groups = trainer.sample_groups(batch, key=HELDOUT_KEY)
        sampled = trainer.rewards(batch, groups, key=HELDOUT_KEY)[:, 0]
        written = [groups["cot_ids"][index * settings["group_size"]] for index in range(len(batch))]
        taught = scripts("rl_headroom").forced_cot_rewards(trainer, batch, groups, written)
        shifted = scripts("rl_headroom").forced_cot_rewards(trainer, batch, groups, written[1:] + written[:1])
    assert torch.allclose(taught, sampled, atol=1e-4)
    assert not torch.allclose(shifted, sampled, atol=1e-3)
