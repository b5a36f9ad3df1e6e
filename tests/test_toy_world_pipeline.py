"""The toy world as the pipeline sees it: `twn prepare synthetic` and the pre-trained toy backbone."""

from __future__ import annotations

import json
import math
import os
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
from twn_cli.data.images import load_image
from twn_cli.data.prepared import load_prepared
from twn_cli.engine.backbone import config_fingerprint, load_backbone
from twn_cli.toyworld.backbone import build_toy_backbone
from twn_cli.toyworld.pretrain import PretrainSettings, cot_token_ids, pretrain_toy_backbone, unwritable_tokens, warm_up_vision
from twn_cli.toyworld.render import PICTURE_SIZE
from twn_cli.toyworld.world import LAZY_TEACHER_COT, generate_world

RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes" / "toy"


def prepare_synthetic(output, n=150, seed=3, *options: str):
    result = CliRunner().invoke(app, ["prepare", "synthetic", "-o", str(output), "--n", str(n), "--seed", str(seed), *options])
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(output)
    return load_prepared(output)


def test_prepare_synthetic_writes_a_self_contained_prepared_dataset(tmp_path):
    dataset = prepare_synthetic(tmp_path / "toy")
    assert set(dataset.queries) == {"train", "validation", "test"}
    assert dataset.manifest["world"]["seed"] == 3 and dataset.manifest["source"] == "synthetic"
    candidate_ids = set(dataset.candidates["id"])
    ids_by_split = {split: set(rows["id"]) for split, rows in dataset.queries.items()}
    assert not ids_by_split["train"] & ids_by_split["test"]
    for split, rows in dataset.queries.items():
        for row in rows:
            assert row["cot"] and row["difficulty"]
            assert set(row["positive_ids"]) <= set(row["candidate_ids"]) <= candidate_ids
            assert all(pool_id.startswith(f"{split}/") for pool_id in row["candidate_ids"])
            for path in row["images"]:
                assert str(path).startswith(str(tmp_path / "toy" / "images"))
    picture = next(row["images"][0] for row in dataset.candidates if row["images"])
    assert load_image(picture).size == (PICTURE_SIZE, PICTURE_SIZE)
    analysis = [json.loads(line) for line in (tmp_path / "toy" / "analysis.jsonl").read_text().splitlines()]
    assert len(analysis) == sum(len(rows) for rows in dataset.queries.values())


def test_prepare_synthetic_with_a_lazy_teacher_records_it_and_writes_its_cots(tmp_path):
    dataset = prepare_synthetic(tmp_path / "toy", 150, 3, "--lazy-teacher-share", "1")
    assert dataset.manifest["world"]["lazy_teacher_share"] == 1.0
    train = dataset.queries["train"]
    assert {cot for cot, difficulty in zip(train["cot"], train["difficulty"]) if difficulty in ("one_step", "two_step")} == {LAZY_TEACHER_COT}
    assert LAZY_TEACHER_COT not in dataset.queries["test"]["cot"]


def test_prepare_synthetic_with_a_near_miss_teacher_records_it_and_refuses_two_teachers_for_one_query(tmp_path):
    dataset = prepare_synthetic(tmp_path / "toy", 150, 3, "--near-miss-teacher-share", "1")
    assert dataset.manifest["world"]["near_miss_teacher_share"] == 1.0
    right = {record.id: record for record in generate_world(n=150, seed=3)["train"].records}
    train = dataset.queries["train"]
    clue_cots = [(right[i], cot) for i, cot, difficulty in zip(train["id"], train["cot"], train["difficulty"]) if difficulty in ("one_step", "two_step")]
    assert clue_cots and all(cot != record.cot and not cot.endswith(record.resolved) for record, cot in clue_cots)
    result = CliRunner().invoke(app, ["prepare", "synthetic", "-o", str(tmp_path / "both"), "--n", "50", "--lazy-teacher-share", "0.5", "--near-miss-teacher-share", "0.6"])
    assert result.exit_code != 0 and "add up to more than 1" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "both").exists()


def test_prepare_synthetic_is_deterministic_for_a_seed(tmp_path):
    first, second, other = (prepare_synthetic(tmp_path / name, seed=seed) for name, seed in [("a", 1), ("b", 1), ("c", 2)])
    assert first.queries["test"]["text"] == second.queries["test"]["text"] != other.queries["test"]["text"]
    image_a = first.queries["test"].filter(lambda row: bool(row["images"]))[0]["images"][0]
    image_b = image_a.replace(str(tmp_path / "a"), str(tmp_path / "b"))
    assert open(image_a, "rb").read() == open(image_b, "rb").read()


def test_pretraining_lowers_caption_loss_on_unseen_pictures(tmp_path):
    backbone_dir = build_toy_backbone(tmp_path / "backbone", seed=0, spec=TEST_SPEC)
    random_fingerprint = load_backbone(str(backbone_dir), device="cpu").fingerprint
    settings = PretrainSettings(
        vision_warmup_steps=10, vision_warmup_batch_size=8, steps=60, batch_size=8, learning_rate=3e-3, warmup_steps=5,
        eval_pictures=16, eval_explanations=12,
    )
    report = pretrain_toy_backbone(backbone_dir, settings, world_seed=0)
    assert report.caption_loss_after < 0.5 * report.caption_loss_before
    assert set(report.explanation_accuracy_before.values()) == {0.0}
    assert set(report.explanation_accuracy_after) <= {"one_clue", "two_clues"}
    assert 0.0 <= report.vision_warmup_shape_accuracy <= 1.0
    reloaded = load_backbone(str(backbone_dir), device="cpu")
    assert reloaded.fingerprint != random_fingerprint == config_fingerprint(
        load_backbone(str(build_toy_backbone(tmp_path / "again", seed=0, spec=TEST_SPEC)), device="cpu").model.config
    )
    assert reloaded.model.config.twn_toy_backbone["pretraining"]["report"]["steps"] == 60
    assert report.cot_tokens == len(cot_token_ids(reloaded.processor.tokenizer, 0)) > 100
    assert reloaded.model.config.twn_toy_backbone["pretraining"]["report"]["cot_tokens_unwritable"] == report.cot_tokens_unwritable


@pytest.mark.parametrize("margin, writable", [(0.5, True), (-0.5, False)])
def test_a_token_is_writable_where_the_largest_normed_state_can_make_it_likelier_than_half(toy_backbone_dir, margin, writable):
    """One output row, every other zero: the best state puts logit a = √d·‖norm weight ⊙ row‖ on the token and 0
    on the V - 1 others, so its probability passes one half exactly where a > ln(V - 1)."""
    backbone = load_backbone(str(toy_backbone_dir), device="cpu")
    model, tokenizer = backbone.model, backbone.processor.tokenizer
    (token,) = tokenizer.encode(" so", add_special_tokens=False)
    weights = model.get_output_embeddings().weight  # tied to the input embeddings, as on Qwen2-VL-2B
    vocabulary, width = weights.shape
    generator = torch.Generator().manual_seed(0)
    direction = torch.randn(width, generator=generator)
    with torch.no_grad():
        # An uneven norm weight: the best state then points along weight ⊙ row, not along the row (where the search starts).
        model.get_decoder().norm.weight.copy_(0.2 + 3 * torch.rand(width, generator=generator))
        scale = model.get_decoder().norm.weight * width**0.5
        weights.zero_()
        weights[token] = direction * (math.log(vocabulary - 1) + margin) / (scale * direction).norm()
    assert unwritable_tokens(model, tokenizer, [token]) == ([] if writable else [" so"])


def test_vision_warmup_trains_every_vision_weight_and_nothing_else(tmp_path):
    backbone = load_backbone(str(build_toy_backbone(tmp_path / "backbone", seed=0, spec=TEST_SPEC)), device="cpu")
    model = backbone.model.requires_grad_(True)
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    settings = PretrainSettings(vision_warmup_steps=3, vision_warmup_batch_size=4, warmup_steps=1, eval_pictures=4)
    assert 0.0 <= warm_up_vision(model, backbone.processor, settings, on_step=lambda step, loss: None) <= 1.0
    for name, parameter in model.named_parameters():
        changed = not torch.equal(parameter, before[name])
        assert changed == name.startswith("model.visual."), name


def test_captioning_with_a_zero_vision_rate_leaves_the_vision_tower_as_it_was(tmp_path):
    backbone_dir = build_toy_backbone(tmp_path / "backbone", seed=0, spec=TEST_SPEC)
    initial = {name: p.clone() for name, p in load_backbone(str(backbone_dir), device="cpu").model.named_parameters()}
    settings = PretrainSettings(vision_warmup_steps=0, vision_learning_rate=0.0, steps=3, batch_size=4, warmup_steps=1, eval_pictures=4, eval_explanations=2)
    pretrain_toy_backbone(backbone_dir, settings, world_seed=0)
    trained = dict(load_backbone(str(backbone_dir), device="cpu").model.named_parameters())
    assert all(torch.equal(trained[name], initial[name]) for name in initial if name.startswith("model.visual."))
    assert not torch.equal(trained["model.language_model.layers.0.mlp.up_proj.weight"], initial["model.language_model.layers.0.mlp.up_proj.weight"])


def test_toy_backbone_command_pretrains_with_a_recipe(tmp_path):
    sizes = tmp_path / "sizes.yaml"
    sizes.write_text(yaml.safe_dump(dict(vars(TEST_SPEC))))
    pretraining = tmp_path / "pretrain.yaml"
    pretraining.write_text(yaml.safe_dump({"vision_warmup_steps": 2, "vision_warmup_batch_size": 4, "steps": 4, "batch_size": 4, "eval_pictures": 4, "eval_explanations": 2}))
    result = CliRunner().invoke(
        app, ["toy-backbone", "-o", str(tmp_path / "toy"), "--recipe", str(sizes), "--pretrain", "--pretrain-recipe", str(pretraining)]
    )
    assert result.exit_code == 0, result.stderr
    assert '"caption_loss_after"' in result.stderr
    assert load_backbone(result.stdout.strip(), device="cpu").model.config.twn_toy_backbone["pretraining"]["settings"]["steps"] == 4


REDUCED_PIPELINE = {
    "pretrain": {"vision_warmup_steps": 2, "vision_warmup_batch_size": 4, "steps": 6, "batch_size": 4, "eval_pictures": 4, "eval_explanations": 2},
    "train-embed": {"steps": 6, "batch_size": 8, "chunk_size": 8, "checkpoint_every": 3, "validation_queries": 16, "max_think_tokens": 16},
    "train-gate": {"label_queries": 48, "epochs": 20, "validation_queries": 24, "max_think_tokens": 16},
    "train-rl": {"steps": 2, "batch_size": 2, "group_size": 2, "checkpoint_every": 1, "max_think_tokens": 8},
}


def test_toy_pipeline_script_chains_every_stage(tmp_path):
    """recipes/toy/pipeline.sh itself, with the toy recipes cut down to a few steps and a small world."""
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "toy-backbone.yaml").write_text(yaml.safe_dump(dict(vars(TEST_SPEC))))
    for stage, overrides in REDUCED_PIPELINE.items():
        recipe = yaml.safe_load((RECIPE_DIR / f"{stage}.yaml").read_text())
        assert set(overrides) <= set(recipe), f"{stage}: reduced settings must exist in the toy recipe"
        (recipes / f"{stage}.yaml").write_text(yaml.safe_dump({**recipe, **overrides}))
    run = tmp_path / "run"
    environment = {**os.environ, "TOY_WORLD_SIZE": "150", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(
        ["bash", str(RECIPE_DIR / "pipeline.sh"), str(run), str(recipes)], env=environment, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((run / "report" / "report.json").read_text())
    assert {"never", "adaptive", "always"} == {point["mode"] for point in report["sweep"]}
    stages = [entry["stage"] for entry in json.loads((run / "rl" / "twn.json").read_text())["stages"]]
    assert stages == ["train-embed", "train-gate", "train-rl"]
    photo_ids, photo_embeddings, _ = read_embeddings(run / "sample-images.safetensors")
    assert len(photo_ids) == len(photo_embeddings) >= 10
