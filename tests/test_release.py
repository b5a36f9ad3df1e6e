"""The TWN authors' release layout: loaded by every command, converted into a checkpoint, its gate mapped by
names and shapes; written here from one of our own checkpoints, so the round trip must be exact."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from twn_cli.cli import app
from twn_cli.data.embedding_files import read_embeddings
from twn_cli.engine.backbone import load_backbone
from twn_cli.engine.checkpoint import load_checkpoint, save_checkpoint
from twn_cli.engine.config import TWNConfig
from twn_cli.engine.release import map_gate_state
from twn_cli.errors import TWNError
from twn_cli.types import ModelInput

INPUTS = [ModelInput(text="a red triangle"), ModelInput(text="the colour of grass", instruction="Answer.")]
HIDDEN = 64  # the test backbone's hidden size


def run(*arguments):
    return CliRunner().invoke(app, [str(argument) for argument in arguments])


def write_release(checkpoint: Path, release: Path, gate_names: dict[str, str] | None = None, nest: str | None = None) -> Path:
    """A release-layout folder from one of our checkpoints: its adapter folders, queries.pt and gate_mlp.pt
    (gate keys renamed by `gate_names`, optionally nested under `nest`)."""
    release.mkdir(parents=True)
    for adapter in ("reasoning", "embedding"):
        shutil.copytree(checkpoint / adapter, release / adapter)
    torch.save(load_file(checkpoint / "queries.safetensors")["queries"], release / "queries.pt")
    gate = {(gate_names or {}).get(name, name): tensor for name, tensor in load_file(checkpoint / "gate.safetensors").items()}
    torch.save({nest: gate} if nest else gate, release / "gate_mlp.pt")
    return release


@pytest.fixture
def original(make_model, tmp_path):
    """A model with TWNConfig's defaults (what a release carries no settings for) but the authors' interface
    (the reasoning adapter prefills), and every trained part moved."""
    model = make_model(max_think_tokens=TWNConfig.max_think_tokens, interface="reasoning-prefill")
    with torch.no_grad():
        for part in model.trainable_parameters().values():
            for parameter in part.values():
                parameter.add_(0.05 * torch.randn_like(parameter))
    return model, save_checkpoint(model, tmp_path / "ours", stages=[])


def assert_same_embeddings(expected, actual):
    for think in ("never", "always", "auto"):
        a, b = expected.embed(INPUTS, think=think, threshold=0.5), actual.embed(INPUTS, think=think, threshold=0.5)
        assert torch.equal(a.embeddings, b.embeddings), think
        assert torch.equal(a.p_think, b.p_think) and a.cot == b.cot


def test_a_release_written_from_our_checkpoint_round_trips_to_identical_embeddings(original, toy_backbone_dir, tmp_path):
    model, checkpoint = original
    release = write_release(checkpoint, tmp_path / "release")
    loaded = load_checkpoint(release, load_backbone(str(toy_backbone_dir), device="cpu"))
    assert loaded.config == model.config
    assert loaded.manifest["release"]["gate_keys"] == {name: name for name in model.gate.state_dict()}
    assert_same_embeddings(model, loaded)

    converted = run("convert-release", release, "-o", tmp_path / "converted", "--backbone", toy_backbone_dir, "--device", "cpu")
    assert converted.exit_code == 0, converted.stderr
    assert converted.stdout.strip() == str(tmp_path / "converted")
    from_checkpoint = load_checkpoint(tmp_path / "converted", device="cpu")
    assert from_checkpoint.config == model.config
    assert "gate" in from_checkpoint.manifest and from_checkpoint.manifest["stages"][0]["stage"] == "convert-release"
    assert_same_embeddings(model, from_checkpoint)

    # Every command loads a release through the checkpoint layer: `twn embed` gives what our checkpoint gives.
    records = tmp_path / "inputs.jsonl"
    records.write_text("".join(json.dumps({"id": str(n), "text": item.text}) + "\n" for n, item in enumerate(INPUTS)))
    for name, source in (("ours", checkpoint), ("release", release)):
        result = run("embed", records, "--checkpoint", source, "--backbone", toy_backbone_dir, "--device", "cpu", "-o", tmp_path / f"{name}.pt")
        assert result.exit_code == 0, result.stderr
    assert torch.equal(read_embeddings(tmp_path / "ours.pt")[1], read_embeddings(tmp_path / "release.pt")[1])


def test_settings_a_release_does_not_carry_are_set_when_converting(original, toy_backbone_dir, tmp_path):
    _, checkpoint = original
    release = write_release(checkpoint, tmp_path / "release")
    result = run("convert-release", release, "-o", tmp_path / "c", "--backbone", toy_backbone_dir, "--device", "cpu",
                 "--set", "gate_threshold=0.7", "--set", "max_think_tokens=12")
    assert result.exit_code == 0, result.stderr
    settings = json.loads((tmp_path / "c" / "twn.json").read_text())["model"]
    assert (settings["gate_threshold"], settings["max_think_tokens"], settings["num_queries"]) == (0.7, 12, 4)
    assert settings["interface"] == "reasoning-prefill"
    refused = run("convert-release", release, "-o", tmp_path / "d", "--backbone", toy_backbone_dir, "--set", "num_queries=8")
    assert refused.exit_code == 1
    assert "num_queries cannot be set" in refused.stderr and not (tmp_path / "d").exists()


@pytest.mark.parametrize(
    "names, nest",
    [
        ({"mlp.0.weight": "fc1.weight", "mlp.0.bias": "fc1.bias", "mlp.2.weight": "fc2.weight", "mlp.2.bias": "fc2.bias"}, "state_dict"),
        ({"mlp.0.weight": "w_in", "mlp.0.bias": "b_in", "mlp.2.weight": "w_out", "mlp.2.bias": "b_out"}, None),
    ],
    ids=["other-layer-names-nested", "names-without-weight-or-bias"],
)
def test_a_gate_under_unfamiliar_key_names_is_mapped_by_names_and_shapes(original, toy_backbone_dir, tmp_path, names, nest):
    model, checkpoint = original
    release = write_release(checkpoint, tmp_path / "release", names, nest)
    loaded = load_checkpoint(release, load_backbone(str(toy_backbone_dir), device="cpu"))
    prefix = f"{nest}." if nest else ""
    assert loaded.manifest["release"]["gate_keys"] == {ours: prefix + theirs for ours, theirs in names.items()}
    for name, tensor in model.gate.state_dict().items():
        assert torch.equal(loaded.gate.state_dict()[name], tensor)


def gate(width=8, **extra):
    state = {"a.weight": torch.randn(width, HIDDEN), "a.bias": torch.randn(width), "b.weight": torch.randn(1, width), "b.bias": torch.randn(1)}
    return {**state, **extra}


def test_a_gate_layer_without_bias_gets_a_zero_one_and_layer_order_does_not_matter():
    state = gate()
    del state["b.bias"]
    mapped, keys = map_gate_state(dict(reversed(state.items())), HIDDEN, Path("gate_mlp.pt"))
    assert keys == {"mlp.0.weight": "a.weight", "mlp.0.bias": "a.bias", "mlp.2.weight": "b.weight"}
    assert torch.equal(mapped["mlp.2.bias"], torch.zeros(1)) and torch.equal(mapped["mlp.2.weight"], state["b.weight"])


@pytest.mark.parametrize(
    "state",
    [
        gate(**{"norm.weight": torch.ones(HIDDEN), "norm.bias": torch.zeros(HIDDEN)}),  # a LayerNorm we do not have
        {**gate(), "b.weight": torch.randn(2, 8), "b.bias": torch.randn(2)},  # two outputs: which one is "think"?
        {"w1": torch.randn(8, HIDDEN), "v1": torch.randn(8), "v2": torch.randn(8), "c": torch.randn(1)},  # weight or bias?
        {"a.weight": torch.randn(8, 32), "a.bias": torch.randn(8), "b.weight": torch.randn(1, 8)},  # another hidden size
    ],
    ids=["extra-layer", "two-outputs", "ambiguous-vectors", "other-input-size"],
)
def test_a_gate_that_cannot_be_mapped_is_one_line_listing_keys_and_shapes(state):
    with pytest.raises(TWNError) as error:
        map_gate_state(state, HIDDEN, Path("release/gate_mlp.pt"))
    message = str(error.value)
    assert "\n" not in message and message.startswith("cannot map 'release/gate_mlp.pt' onto the gate Linear(64, G)")
    for name, tensor in state.items():
        assert f"{name} {list(tensor.shape)}" in message


class Payload:
    """Not a tensor: unpickling it would run this module's code."""


def test_release_files_are_read_with_weights_only_and_bad_ones_are_named(original, toy_backbone_dir, tmp_path):
    _, checkpoint = original
    release = write_release(checkpoint, tmp_path / "release")
    backbone = load_backbone(str(toy_backbone_dir), device="cpu")
    torch.save({"queries": torch.zeros(4, HIDDEN), "hook": Payload()}, release / "queries.pt")
    with pytest.raises(TWNError, match=r"queries.pt' is not a plain tensor file \(refused with weights_only=True") as error:
        load_checkpoint(release, backbone)
    assert "\n" not in str(error.value)
    torch.save({"a": torch.zeros(4, HIDDEN), "b": torch.zeros(4, HIDDEN)}, release / "queries.pt")
    with pytest.raises(TWNError, match=r"must hold one \[K, hidden\] tensor of queries; found a \[4, 64\], b \[4, 64\]"):
        load_checkpoint(release, backbone)
    torch.save(torch.zeros(4, 32), release / "queries.pt")
    with pytest.raises(TWNError, match="queries of size 32, but backbone .* has hidden size 64"):
        load_checkpoint(release, backbone)
