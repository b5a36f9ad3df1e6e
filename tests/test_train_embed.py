"""train-embed: the gradient cache is exact, each loss trains only its side, resume is exact, NaN stops."""

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
from twn_cli.data.prepared import load_prepared
from twn_cli.data.training_data import TrainingData
from twn_cli.engine.checkpoint import load_checkpoint
from twn_cli.engine.config import INTERFACES
from twn_cli.errors import TWNError
from twn_cli.stages import train_embed
from twn_cli.stages.train_embed import EmbedTrainer, TrainEmbedConfig, run_train_embed

RECIPES = Path(__file__).parents[1] / "recipes"
SMALL = dict(batch_size=6, chunk_size=6, hard_negatives=1, learning_rate=5e-3, warmup_steps=1, temperature=0.1, validation_queries=0, lora_rank=4)


def trainer_for(make_model, toy_dataset_dir, **settings) -> EmbedTrainer:
    config = TrainEmbedConfig(**{**SMALL, **settings})
    model = make_model(**{name: getattr(config, name) for name in train_embed.MODEL_SETTINGS})
    return EmbedTrainer(model, TrainingData(load_prepared(toy_dataset_dir), "train", config.hard_negatives, config.seed), config)


def gradients(trainer: EmbedTrainer) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in trainer.parameters.items() if p.grad is not None}


def trained_once_and_copied(reference: EmbedTrainer, other: EmbedTrainer) -> None:
    """Train `reference` one step (so that LoRA B is no longer zero and every parameter has a gradient to
    compare), then give `other` the same weights and step."""
    reference.step()
    other.model.load_state_dict(reference.model.state_dict())
    other.step_done = reference.step_done


def assert_same_gradients(expected_trainer: EmbedTrainer, actual_trainer: EmbedTrainer) -> None:
    expected, actual = gradients(expected_trainer), gradients(actual_trainer)
    assert expected.keys() == actual.keys() == expected_trainer.parameters.keys()
    for name in expected:
        assert torch.allclose(expected[name], actual[name], rtol=1e-4, atol=1e-6), name


def test_copies_of_a_positive_under_other_ids_are_no_negatives(toy_dataset_dir):
    dataset = load_prepared(toy_dataset_dir)
    data = TrainingData(dataset, "train", hard_negatives=2, seed=0)
    index = next(i for i, row in enumerate(data.rows) if row["task"].startswith("classification"))
    row = data.rows[index]
    (example,) = data.examples([index], step=0)
    copies = example.positive_ids - set(row["positive_ids"])
    def content(candidate_id: str) -> dict:
        return {k: dataset.candidates[data.candidate_index[candidate_id]][k] for k in ("instruction", "text", "images")}

    assert copies and all(content(copy) == content(row["positive_ids"][0]) for copy in copies)
    picture_query = next(row for row in data.rows if row["task"] == "t2i")  # every picture is rendered afresh
    assert dataset.with_copies(picture_query["positive_ids"]) == set(picture_query["positive_ids"])


def test_gradient_cache_gives_the_whole_batch_gradient(make_model, toy_dataset_dir):
    whole = trainer_for(make_model, toy_dataset_dir, chunk_size=6)
    chunked = trainer_for(make_model, toy_dataset_dir, chunk_size=2)
    trained_once_and_copied(whole, chunked)
    metrics_whole, metrics_chunked = whole.compute_gradients(), chunked.compute_gradients()
    assert metrics_whole["loss"] == pytest.approx(metrics_chunked["loss"], rel=1e-5)
    assert_same_gradients(whole, chunked)


def test_gradient_checkpointing_gives_the_same_gradient(make_model, toy_dataset_dir):
    plain = trainer_for(make_model, toy_dataset_dir, interface="reasoning-prefill")
    checkpointed = trainer_for(make_model, toy_dataset_dir, interface="reasoning-prefill", gradient_checkpointing=True)
    trained_once_and_copied(plain, checkpointed)
    plain.compute_gradients()
    checkpointed.compute_gradients()
    assert_same_gradients(plain, checkpointed)


def test_cot_reencode_trains_the_embedding_side_exactly_as_reencode_does(make_model, toy_dataset_dir):
    """The two differ only in the prompt that SFT reads; each adapter's gradient is clipped on its own, so the
    reasoning side's different gradient cannot rescale the embedding side's steps (clipping is active here)."""
    trainers = {interface: trainer_for(make_model, toy_dataset_dir, interface=interface, max_grad_norm=0.1) for interface in ("cot-reencode", "reencode")}
    norms = {interface: [trainer.step()["grad_norm"] for _ in range(2)] for interface, trainer in trainers.items()}
    assert min(norms["reencode"]) > 0.1 and norms["cot-reencode"] != norms["reencode"]
    parts = {interface: trainer.model.trainable_parameters() for interface, trainer in trainers.items()}
    for name, parameter in parts["reencode"]["embedding"].items():
        assert torch.allclose(parts["cot-reencode"]["embedding"][name], parameter, atol=1e-6), name
    assert any(not torch.equal(parts["cot-reencode"]["reasoning"][name], parameter) for name, parameter in parts["reencode"]["reasoning"].items())


@pytest.mark.parametrize("setting", ["gradient_checkpointing", "shard_backbone"])
@pytest.mark.parametrize("interface", ["embedding-prefill", "reencode"])
def test_settings_that_need_reasoning_prefill_are_refused_under_the_other_interfaces(setting, interface):
    with pytest.raises(TWNError, match=f"^{setting} works with interface reasoning-prefill only, not {interface}$"):
        TrainEmbedConfig(**{**SMALL, setting: True, "interface": interface})
    assert getattr(TrainEmbedConfig(**{**SMALL, setting: True, "interface": "reasoning-prefill"}), setting)


@pytest.mark.parametrize("interface", INTERFACES)
def test_a_step_trains_both_adapters_and_queries_and_nothing_else(make_model, toy_dataset_dir, interface):
    """The stage's own steps with every parameter of the model in its optimiser: what moves is what its losses reach."""
    trainer = trainer_for(make_model, toy_dataset_dir, interface=interface)
    trainer.optimizer = torch.optim.AdamW(trainer.model.parameters(), lr=SMALL["learning_rate"])
    trainer.schedule = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda step: 1.0)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    for _ in range(2):  # LoRA A only gets a gradient once B has left zero
        trainer.step()
    after = dict(trainer.model.named_parameters())
    trained = {name for name in before if not torch.equal(before[name], after[name].detach())}
    expected = {name for name in before if "lora_" in name} | {"queries"}
    assert trained == expected


def test_resumed_run_equals_uninterrupted_run(make_model, toy_dataset_dir, tmp_path):
    dataset = load_prepared(toy_dataset_dir)
    config = TrainEmbedConfig(**{**SMALL, "steps": 4, "checkpoint_every": 2, "log_every": 1})

    def fresh():
        return make_model(**{name: getattr(config, name) for name in train_embed.MODEL_SETTINGS})

    straight = fresh()
    run_train_embed(straight, dataset, tmp_path / "straight", config, resume=False)

    def interrupt_after_step_two(metrics: dict) -> None:
        if metrics["step"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_train_embed(fresh(), dataset, tmp_path / "resumed", config, resume=False, on_step=interrupt_after_step_two)
    resumed = fresh()  # a new process starts from scratch and loads the state
    run_train_embed(resumed, dataset, tmp_path / "resumed", config, resume=True)

    def losses(run: str) -> list[float]:
        lines = (tmp_path / run / "train" / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line)["loss"] for line in lines]

    assert losses("straight") == losses("resumed") and len(losses("straight")) == 4
    for name, parameter in straight.named_parameters():
        assert torch.equal(parameter, dict(resumed.named_parameters())[name]), name


def test_tensorboard_gets_the_logged_metrics_and_a_resumed_run_replaces_the_steps_it_redoes(make_model, toy_dataset_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    dataset = load_prepared(toy_dataset_dir)
    config = TrainEmbedConfig(**{**SMALL, "steps": 3, "checkpoint_every": 1, "log_every": 1, "tensorboard": True})
    model = make_model(**{name: getattr(config, name) for name in train_embed.MODEL_SETTINGS})

    def interrupt_after_step_two(metrics: dict) -> None:
        if metrics["step"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_train_embed(model, dataset, tmp_path / "run", config, resume=False, on_step=interrupt_after_step_two)
    (tmp_path / "run" / "train" / "states" / "step-00000002").rename(tmp_path / "run" / "train" / "states" / "dropped")
    run_train_embed(model, dataset, tmp_path / "run", config, resume=True)  # redoes step 2
    events = EventAccumulator(str(tmp_path / "run" / "train" / "tensorboard")).Reload()
    logged = [json.loads(line) for line in (tmp_path / "run" / "train" / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "contrastive_loss", "sft_loss", "learning_rate"} <= set(events.Tags()["scalars"])
    assert [(event.step, event.value) for event in events.Scalars("loss")] == [
        (record["step"], pytest.approx(record["loss"], rel=1e-6)) for record in logged
    ]


def test_nan_loss_stops_training_and_names_the_last_good_state(make_model, toy_dataset_dir, tmp_path, monkeypatch):
    dataset = load_prepared(toy_dataset_dir)
    config = TrainEmbedConfig(**{**SMALL, "steps": 3, "checkpoint_every": 1})
    model = make_model(**{name: getattr(config, name) for name in train_embed.MODEL_SETTINGS})
    original = train_embed.contrastive_loss
    calls = {"count": 0}

    def poisoned(*args, **kwargs):
        calls["count"] += 1
        loss = original(*args, **kwargs)
        return loss * float("nan") if calls["count"] == 2 else loss

    monkeypatch.setattr(train_embed, "contrastive_loss", poisoned)
    with pytest.raises(TWNError, match=r"loss became nan at step 2.*last good state is .*step-00000001"):
        run_train_embed(model, dataset, tmp_path / "run", config, resume=False)
    assert load_checkpoint(tmp_path / "run" / "train" / "states" / "step-00000001", device="cpu")


def test_a_second_run_into_the_same_directory_needs_resume(make_model, toy_dataset_dir, tmp_path):
    dataset = load_prepared(toy_dataset_dir)
    config = TrainEmbedConfig(**{**SMALL, "steps": 1})
    model = make_model(lora_rank=4)
    run_train_embed(model, dataset, tmp_path / "run", config, resume=False)
    with pytest.raises(TWNError, match="--resume"):
        run_train_embed(model, dataset, tmp_path / "run", config, resume=False)


def test_train_embed_command_end_to_end(toy_backbone_dir, toy_dataset_dir, tmp_path):
    recipe = Path(__file__).parents[1] / "recipes" / "toy" / "train-embed.yaml"
    result = CliRunner().invoke(
        app,
        [
            "train-embed", str(toy_dataset_dir), "--backbone", str(toy_backbone_dir), "-o", str(tmp_path / "run"),
            "--recipe", str(recipe), "--steps", "2", "--batch-size", "4", "--set", "validation_queries=4", "--set", "lora_rank=4",
        ],
    )
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path / "run")
    assert "hit@1_never" in result.stderr and "added parameters" in result.stderr
    model = load_checkpoint(tmp_path / "run", device="cpu")
    assert [stage["stage"] for stage in model.manifest["stages"]] == ["train-embed"]
    assert set(model.manifest["train_embed"]["validation"]) == {"hit@1_never", "hit@1_teacher_cot", "hit@1_generated_cot"}
    assert (tmp_path / "run" / "train" / "metrics.jsonl").is_file()


TWO_PROCESS_SCRIPT = """
import json, os, sys, torch
from twn_cli.distributed import end_process_group, shard_language_model, start_process_group
start_process_group()
from twn_cli.data.prepared import load_prepared, prepared_input
from twn_cli.data.training_data import TrainingData
from twn_cli.engine.factory import LoadOptions, load_model
from twn_cli.stages import train_embed
backbone_dir, dataset_dir, settings = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
config = train_embed.TrainEmbedConfig(**settings)
model = load_model(backbone=backbone_dir, config=config.model_config(), options=LoadOptions(device="cpu"))
if config.shard_backbone:
    shard_language_model(model, torch.device("cpu"))
trainer = train_embed.EmbedTrainer(model, TrainingData(load_prepared(dataset_dir), "train", config.hard_negatives, config.seed), config)
metrics = trainer.compute_gradients()
model.embed([prepared_input(load_prepared(dataset_dir).queries["train"][0])])  # a forward without gradients
# What each process holds between passes (sharded layers gather their weights only while they run).
frozen = [p for n, p in model.backbone.model.get_decoder().layers.named_parameters() if "lora_" not in n]
held = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in frozen)
if torch.distributed.get_rank() == 0:
    grads = {n: p.grad for n, p in trainer.parameters.items() if p.grad is not None}
    torch.save({"loss": metrics["loss"], "grads": grads, "held": held, "whole": sum(p.numel() for p in frozen)}, sys.argv[4])
end_process_group(finished=True)
"""


@pytest.mark.parametrize("shard_backbone", [False, True])
def test_two_processes_give_the_single_process_loss_and_gradient(toy_backbone_dir, toy_dataset_dir, tmp_path, shard_backbone):
    """Also with the language model's frozen layer weights sharded, half of them on each process (FSDP2)."""
    settings = {**SMALL, "lora_rank": 4, "max_think_tokens": 12, "gradient_checkpointing": shard_backbone, "shard_backbone": shard_backbone,
                "interface": "reasoning-prefill" if shard_backbone else TrainEmbedConfig.interface}  # checkpointing needs it
    script = tmp_path / "two.py"
    script.write_text(TWO_PROCESS_SCRIPT)
    output = tmp_path / "two.pt"
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
         str(toy_backbone_dir), str(toy_dataset_dir), json.dumps(settings), str(output)],
        check=True, env=environment, capture_output=True, timeout=300,
    )
    two = torch.load(output, weights_only=True)

    from twn_cli.engine.factory import LoadOptions, load_model

    config = TrainEmbedConfig(**settings)
    model = load_model(backbone=str(toy_backbone_dir), config=config.model_config(), options=LoadOptions(device="cpu"))
    single = EmbedTrainer(model, TrainingData(load_prepared(toy_dataset_dir), "train", config.hard_negatives, config.seed), config)
    metrics = single.compute_gradients()
    assert two["held"] < 0.55 * two["whole"] if shard_backbone else two["held"] == two["whole"]
    assert two["loss"] == pytest.approx(metrics["loss"], rel=1e-5)
    for name, gradient in gradients(single).items():
        assert torch.allclose(two["grads"][name], gradient, rtol=1e-4, atol=1e-6), name


def test_sharded_command_on_two_processes_saves_what_one_process_trains(toy_backbone_dir, toy_dataset_dir, tmp_path):
    """The whole command with a sharded backbone, started by accelerate launch with the recipes' config:
    loaded on the CPU, sharded, trained, validated in lockstep."""
    common = [
        "--recipe", str(RECIPES / "toy" / "train-embed.yaml"), "--steps", "2", "--batch-size", "4", "--chunk-size", "2", "--set", "validation_queries=4", "--set", "lora_rank=4",
        "--set", "shard_backbone=true", "--set", "interface=reasoning-prefill",
    ]
    arguments = ["train-embed", str(toy_dataset_dir), "--backbone", str(toy_backbone_dir), *common]
    two = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(RECIPES / "accelerate" / "multi-gpu.yaml"),
         "--num_processes", "2", "-m", "twn_cli", *arguments, "-o", str(tmp_path / "two"), "--verbose"],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )
    assert two.returncode == 0, two.stderr[-4000:]
    assert "sharded" in two.stderr and two.stdout.strip() == str(tmp_path / "two")
    one = CliRunner().invoke(app, [*arguments, "-o", str(tmp_path / "one")])
    assert one.exit_code == 0, one.stderr

    sharded, single = load_checkpoint(tmp_path / "two", device="cpu"), load_checkpoint(tmp_path / "one", device="cpu")
    assert sharded.manifest["train_embed"]["validation"] == single.manifest["train_embed"]["validation"]
    for name, parameter in single.named_parameters():
        assert torch.allclose(dict(sharded.named_parameters())[name], parameter, rtol=1e-4, atol=1e-6), name
