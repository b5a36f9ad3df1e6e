"""Checkpoint directories: layout, round trip, atomic writes, and clear errors for the wrong or broken ones."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel

from twn_cli.engine.backbone import load_backbone
from twn_cli.engine.checkpoint import load_checkpoint, save_checkpoint
from twn_cli.errors import TWNError
from twn_cli.types import ModelInput

INPUTS = [ModelInput(text="a red triangle"), ModelInput(text="the colour of grass")]


def perturbed(model):
    """A model whose every trainable part differs from a fresh one, so a round trip proves it all came back."""
    with torch.no_grad():
        for part in model.trainable_parameters().values():
            for parameter in part.values():
                parameter.add_(0.05 * torch.randn_like(parameter))
    return model


@pytest.fixture
def saved(make_model, tmp_path):
    model = perturbed(make_model(gate_threshold=0.4))
    path = save_checkpoint(model, tmp_path / "run", stages=[{"stage": "test", "arguments": {}}])
    return model, path


def test_layout_matches_the_specification(saved):
    _, path = saved
    assert sorted(p.name for p in path.iterdir()) == ["embedding", "gate.safetensors", "queries.safetensors", "reasoning", "twn.json"]
    for adapter in ("reasoning", "embedding"):
        assert (path / adapter / "adapter_config.json").is_file()
        assert (path / adapter / "adapter_model.safetensors").is_file()
    manifest = json.loads((path / "twn.json").read_text())
    assert manifest["backbone"]["fingerprint"].startswith("sha256:")
    assert manifest["model"]["gate_threshold"] == 0.4
    assert manifest["stages"] == [{"stage": "test", "arguments": {}}]
    assert {"torch", "transformers", "peft", "twn"} <= set(manifest["versions"])
    assert 0 < manifest["parameters"]["added_percent"]


def test_save_then_load_gives_identical_embeddings(saved):
    model, path = saved
    loaded = load_checkpoint(path, device="cpu")
    assert loaded.config == model.config
    for think in ("never", "always"):
        expected, actual = model.embed(INPUTS, think=think), loaded.embed(INPUTS, think=think)
        assert torch.equal(expected.embeddings, actual.embeddings)
        assert expected.cot == actual.cot
    assert torch.equal(model.embed(INPUTS).p_think, loaded.embed(INPUTS).p_think)


def test_adapters_load_with_peft_alone(saved, toy_backbone_dir):
    model, path = saved
    base = load_backbone(str(toy_backbone_dir), device="cpu").model
    peft_model = PeftModel.from_pretrained(base, path / "reasoning", adapter_name="reasoning")
    loaded = dict(peft_model.named_parameters())
    for name, parameter in model.adapter_parameters("reasoning").items():
        assert torch.equal(loaded[name.replace("peft.", "", 1)], parameter)


def test_loading_onto_another_backbone_is_a_clear_error(saved, other_backbone_dir):
    _, path = saved
    other = load_backbone(str(other_backbone_dir), device="cpu")
    with pytest.raises(TWNError, match=r"was trained on backbone .* not on .*other") as error:
        load_checkpoint(path, other)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda path: (path / "twn.json").unlink(), "not a TWN checkpoint"),
        (lambda path: (path / "twn.json").write_text("{ half"), "twn.json is corrupted"),
        (lambda path: (path / "gate.safetensors").unlink(), "incomplete: gate.safetensors is missing"),
        (lambda path: (path / "embedding" / "adapter_model.safetensors").write_bytes(b"\0" * 64), "corrupted: embedding/adapter_model"),
    ],
    ids=["no-manifest", "corrupt-manifest", "missing-file", "corrupt-adapter"],
)
def test_damaged_checkpoint_is_a_clear_error(saved, damage, message):
    _, path = saved
    damage(path)
    with pytest.raises(TWNError, match=message) as error:
        load_checkpoint(path, device="cpu")
    assert "\n" not in str(error.value)


def test_failed_write_leaves_the_previous_checkpoint_intact(saved, monkeypatch):
    model, path = saved
    before = (path / "twn.json").read_text()

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("twn_cli.engine.checkpoint.save_file", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(model, path, stages=[])
    assert (path / "twn.json").read_text() == before
    assert [p.name for p in path.parent.iterdir()] == ["run"]


def test_overwriting_replaces_the_checkpoint_atomically(saved):
    model, path = saved
    save_checkpoint(model, path, stages=[{"stage": "again", "arguments": {}}])
    assert json.loads((path / "twn.json").read_text())["stages"] == [{"stage": "again", "arguments": {}}]
    assert [p.name for p in path.parent.iterdir()] == ["run"]
    load_checkpoint(path, device="cpu")


def test_a_checkpoint_made_from_a_relative_backbone_path_loads_from_any_directory(toy_backbone_dir, tmp_path, monkeypatch):
    from twn_cli.engine.config import TWNConfig
    from twn_cli.engine.model import TWNModel

    monkeypatch.chdir(toy_backbone_dir.parent)
    backbone = load_backbone(toy_backbone_dir.name, device="cpu")
    assert backbone.source == str(toy_backbone_dir.resolve())
    save_checkpoint(TWNModel(backbone, TWNConfig(lora_rank=4)), tmp_path / "run", stages=[])
    monkeypatch.chdir(tmp_path)
    assert load_checkpoint(tmp_path / "run", device="cpu").backbone.source == str(toy_backbone_dir.resolve())
