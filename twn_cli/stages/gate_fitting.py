"""train-gate's gate: an MLP fitted to the labels with early stopping, and its held-out estimate by k-fold
cross-validation; routing by task (and difficulty) alone, fitted on the same folds, for comparison."""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from twn_cli.engine.gate import RoutingGate
from twn_cli.eval.metrics import auroc

if TYPE_CHECKING:
    from twn_cli.stages.train_gate import TrainGateConfig


# ----------------------------------------------------------------------------------------- the gate
def sample_weights(labels: torch.Tensor, margin_change: torch.Tensor, margin_weighting: bool) -> torch.Tensor:
    """BCE weights: each class present weighs half the total; optionally scaled by the size of the margin change."""
    weights = torch.ones(len(labels))
    for value in (True, False):
        members = labels == value
        if members.any() and not members.all():
            weights[members] = 0.5 * len(labels) / int(members.sum())
    if margin_weighting:
        size = margin_change.abs()
        if float(size.mean()) > 0:
            weights = weights * size / size.mean()
    return weights


def fitting_targets(
    labels: torch.Tensor, margin_change: torch.Tensor, margin_weighting: bool, soft_targets: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(BCE targets, weights): the labels, class-weighted (`sample_weights`), or `soft_targets` in [0, 1],
    each weighing alike (a soft target already says how much each input pulls either way)."""
    if soft_targets is not None:
        return soft_targets.float(), torch.ones(len(soft_targets))
    return labels.float(), sample_weights(labels, margin_change, margin_weighting)


def seeded_split(count: int, fraction: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random `fraction` of the rows 0..count-1 (leaving at least one), and the other rows."""
    order = torch.randperm(count, generator=generator)
    taken = min(round(fraction * count), count - 1)
    return order[:taken], order[taken:]


@dataclass
class GateFit:
    """The losses per logged epoch (the kept one marked `kept`), and the rows that picked that epoch."""

    history: list[dict]
    stopping_rows: torch.Tensor

    @property
    def kept(self) -> dict:
        return next(entry for entry in self.history if entry["kept"])


def fit_gate(gate: RoutingGate, features: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, config: TrainGateConfig) -> GateFit:
    """Train `gate` on (last prompt state, target) pairs: labels, or soft targets in [0, 1].

    A seeded `stopping_fraction` of the pairs is kept out of training; the gate ends with the weights of the
    epoch whose weighted loss on them was lowest (marked `kept` in the history). The states are
    standardised for training (hidden states have a few huge dimensions that would dominate the first
    layer), and the standardisation is then folded into the first layer, so the gate reads raw states.
    """
    device = next(gate.parameters()).device
    mean = features.mean(0)
    scale = features.std(0, unbiased=False).clamp_min(1e-3)
    inputs = ((features - mean) / scale).to(device)
    targets, weights = targets.float().to(device), weights.to(device)
    generator = torch.Generator().manual_seed(config.seed)
    stopping, training = (rows.to(device) for rows in seeded_split(len(inputs), config.stopping_fraction, generator))
    if not float(weights[stopping].sum()) > 0:  # nothing to stop on (margin weights can all be zero on a small slice)
        stopping, training = stopping[:0], torch.cat([stopping, training])

    def weighted_loss(rows: torch.Tensor) -> torch.Tensor:
        losses = F.binary_cross_entropy_with_logits(gate.logits(inputs[rows]), targets[rows], reduction="none")
        return (losses * weights[rows]).sum() / weights[rows].sum()

    optimizer = torch.optim.AdamW(gate.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    history, best_loss, best_state, best_epoch = [], float("inf"), None, config.epochs
    with torch.enable_grad():
        for epoch in range(1, config.epochs + 1):
            gate.train()
            train_loss = 0.0
            for rows in training[torch.randperm(len(training), generator=generator).to(device)].split(config.batch_size):
                loss = weighted_loss(rows)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                train_loss += loss.item() * float(weights[rows].sum())
            entry = {"epoch": epoch, "loss": train_loss / float(weights[training].sum())}
            if len(stopping):
                gate.eval()
                with torch.no_grad():
                    entry["stopping_loss"] = weighted_loss(stopping).item()
                if entry["stopping_loss"] < best_loss:
                    best_loss, best_epoch = entry["stopping_loss"], epoch
                    best_state = {name: value.clone() for name, value in gate.state_dict().items()}
            history.append(entry)
    if best_state is not None:
        gate.load_state_dict(best_state)
    gate.eval()
    gate.absorb_input_scaling(mean, scale)
    logged = (entry for entry in history if entry["epoch"] % config.log_every == 0 or entry["epoch"] in (config.epochs, best_epoch))
    return GateFit([{**entry, "kept": entry["epoch"] == best_epoch} for entry in logged], stopping.cpu())


def assign_folds(labels: torch.Tensor, folds: int, seed: int) -> torch.Tensor:
    """Each input's fold, 0 to folds - 1: a seeded shuffle dealt out in turn, 'think' labels first, so that
    every fold holds its share of each class."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    order = torch.cat([order[labels[order]], order[~labels[order]]])
    fold_of = torch.empty(len(labels), dtype=torch.int64)
    fold_of[order] = torch.arange(len(labels)) % folds
    return fold_of


def out_of_fold_scores(
    labels: torch.Tensor, folds: int, seed: int, score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(each input's fold, its score from `score(trained rows, scored rows)` fitted on the other folds)."""
    fold_of = assign_folds(labels, folds, seed)
    scores = torch.empty(len(labels))
    for fold in range(folds):
        scored, trained = (fold_of == fold).nonzero().flatten(), (fold_of != fold).nonzero().flatten()
        scores[scored] = score(trained, scored)
    return fold_of, scores


def probabilities_of_a_copy_trained_on(
    gate: RoutingGate, features: torch.Tensor, labels: torch.Tensor, margin_change: torch.Tensor,
    trained: torch.Tensor, scored: torch.Tensor, config: TrainGateConfig, soft_targets: torch.Tensor | None = None,
) -> torch.Tensor:
    """p_think of the `scored` rows from a copy of `gate` trained as `fit_gate` trains, on the `trained` rows
    (on their `soft_targets`, given them; see `fitting_targets`)."""
    fold_gate = copy.deepcopy(gate)
    soft = None if soft_targets is None else soft_targets[trained]
    fit_gate(fold_gate, features[trained], *fitting_targets(labels[trained], margin_change[trained], config.margin_weighting, soft), config)
    return gate_probabilities(fold_gate, features[scored])


def heldout_probabilities(
    gate: RoutingGate, features: torch.Tensor, labels: torch.Tensor, margin_change: torch.Tensor, config: TrainGateConfig,
    soft_targets: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(each input's fold, its p_think from a copy of `gate` trained as `fit_gate` trains, on the other folds);
    the folds keep each label's share."""

    def score(trained: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
        return probabilities_of_a_copy_trained_on(gate, features, labels, margin_change, trained, scored, config, soft_targets)

    return out_of_fold_scores(labels, min(config.heldout_folds, len(labels)), config.seed + 1, score)


@torch.no_grad()
def gate_probabilities(gate: RoutingGate, features: torch.Tensor) -> torch.Tensor:
    return gate(features.to(next(gate.parameters()).device)).cpu()


# ----------------------------------------------------------------------------------------- routing by group
def group_rates(groups: Sequence[Hashable]) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """A predictor `(trained rows, scored rows, labels) -> scores`: each scored input's share of 'think' labels
    among the trained inputs of its group (a task, or a task and difficulty); the trained inputs' overall
    share for a group none of them is in. What a router that knows only the group can reach."""

    def predict(trained: torch.Tensor, scored: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        members = defaultdict(list)
        for row in trained.tolist():
            members[groups[row]].append(float(labels[row]))
        overall = float(labels[trained].float().mean())
        return torch.tensor([sum(members[groups[row]]) / len(members[groups[row]]) if members[groups[row]] else overall for row in scored.tolist()])

    return predict


def heldout_group_auroc(
    groups: Sequence[Hashable], labels: torch.Tensor, folds: int, seed: int,
    fitted_to: torch.Tensor | None = None, judged: torch.Tensor | None = None,
) -> float | None:
    """The k-fold AUROC of routing by group (`group_rates`), on the folds `heldout_probabilities` uses:
    each group's mean of `fitted_to` (default: the labels) on the other folds, judged on the `judged` inputs
    (a mask; default: all)."""
    predict = group_rates(groups)
    values = labels if fitted_to is None else fitted_to
    _, scores = out_of_fold_scores(labels, folds, seed, lambda trained, scored: predict(trained, scored, values))
    judged = torch.ones(len(labels), dtype=torch.bool) if judged is None else judged
    return auroc(scores[judged], labels[judged])
