"""Which parameters each loss trains, under each interface: SFT only the reasoning adapter, InfoNCE only the
embedding side, the backbone never (bit-identical), the gate neither. Every parameter of the model is handed
to the optimiser, so that "nothing else moved" can fail."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from twn_cli.data.images import load_image
from twn_cli.engine.config import INTERFACES
from twn_cli.engine.model import TWNModel
from twn_cli.engine.training_passes import training_views
from twn_cli.types import ModelInput


def info_nce(queries: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE of L2-normalised `queries` against their `targets` (row i is query i's positive; the others are negatives)."""
    return F.cross_entropy(queries @ targets.T / temperature, torch.arange(len(queries)))


@pytest.fixture(scope="module")
def batch(request):
    paths = request.getfixturevalue("real_image_paths")
    images = [load_image(path) for path in paths[:4]]
    queries = [
        ModelInput(text="an astronaut"),
        ModelInput(text="a cat, the animal that purrs"),
        ModelInput(text="a cup of coffee"),
        ModelInput(text="a rocket on its launch pad"),
    ]
    targets = [ModelInput(images=[image]) for image in images]
    cots = ["a person in a space suit", "cats purr; so a cat", "coffee", "a rocket"]
    return queries, targets, cots


def snapshot(model: TWNModel) -> dict[str, torch.Tensor]:
    return {name: parameter.detach().clone() for name, parameter in model.named_parameters()}


def train_steps(model: TWNModel, batch, sft: bool, contrastive: bool, steps: int = 2) -> None:
    """Optimizer over every parameter of the model, backbone included; the losses decide what moves.

    Two steps, because LoRA's B starts at zero: the first step moves B, only then does A get a gradient.
    """
    queries, targets, cots = batch
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    cot_ids = [model.prompts.tokenizer.encode(cot, add_special_tokens=False) for cot in cots]
    model.train()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        forced = training_views(model, model.prompts.encode(queries), cot_ids)
        if sft:
            forced.sft_loss.backward()  # while the reasoning adapter is active
        if contrastive:
            target_prefix, _ = model.prefill(model.prompts.encode(targets))
            target_embeddings = model.query_pass(target_prefix)
            think = model.query_pass(forced.think_view)
            no_think = model.query_pass(forced.no_think_view)
            loss = info_nce(think, target_embeddings, 0.05) + info_nce(no_think, target_embeddings, 0.05)
            loss.backward()  # while the embedding adapter is active
        optimizer.step()
    model.eval()


def changed(before: dict, model: TWNModel, names) -> dict[str, bool]:
    current = dict(model.named_parameters())
    return {name: not torch.equal(before[name], current[name].detach()) for name in names}


def parts(model: TWNModel) -> dict[str, list[str]]:
    """Parameter names (as in named_parameters) of each part of the model."""
    names = [name for name, _ in model.named_parameters()]
    return {
        "reasoning": [n for n in names if "lora_" in n and ".reasoning." in n],
        "embedding": [n for n in names if "lora_" in n and ".embedding." in n] + ["queries"],
        "gate": [n for n in names if n.startswith("gate.")],
        "backbone": [n for n in names if "lora_" not in n and n != "queries" and not n.startswith("gate.")],
    }


@pytest.mark.parametrize(
    "sft, contrastive, trained",
    [
        (True, False, {"reasoning"}),
        (False, True, {"embedding"}),
        (True, True, {"reasoning", "embedding"}),
    ],
    ids=["sft-only", "infonce-only", "both"],
)
@pytest.mark.parametrize("interface", INTERFACES)
def test_each_loss_trains_exactly_its_parameters(make_model, batch, sft, contrastive, trained, interface):
    model = make_model(interface=interface)
    before = snapshot(model)
    train_steps(model, batch, sft=sft, contrastive=contrastive)
    groups = parts(model)
    assert all(groups.values())
    for part, names in groups.items():
        moved = changed(before, model, names)
        if part in trained:
            assert all(moved.values()), f"{part}: unchanged {[n for n, m in moved.items() if not m][:5]}"
        else:
            assert not any(moved.values()), f"{part}: changed {[n for n, m in moved.items() if m][:5]}"


def test_trainable_parameters_are_found_by_name_whatever_adapter_is_active(make_model):
    model = make_model()
    counts = {part: len(params) for part, params in model.trainable_parameters().items()}
    for adapter in ("embedding", "reasoning"):
        model.use_adapter(adapter)
        assert {part: len(params) for part, params in model.trainable_parameters().items()} == counts
