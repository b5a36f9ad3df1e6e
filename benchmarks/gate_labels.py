"""How predictable a train-gate run's labels are, and from what: the gate against routing by task alone.

    python benchmarks/gate_labels.py runs/toy/gate [--deltas 0 0.05 0.1] [--folds 5] [-o result.json]

Reads what `twn train-gate` left in RUN/train (the cached margins and last prompt states, and the labels
log with each input's task and difficulty); no model is loaded. For each δ, every figure is a k-fold
AUROC against the labels at that δ, each fold scored by a predictor fitted on the other folds:

- `gate`: the gate as the run's train-gate settings train it (its hidden size read from the checkpoint);
- `gate_on_<share>_of_labels`: the same on a share of each fold's training labels, a learning curve that
  says whether more labels would help;
- `task_rate`, `task_difficulty_rate`: each input scored by the share of 'think' labels among the
  training labels of its task (and difficulty, where the data has it). A gate that reaches no more than
  these routes by task, not by input.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

import torch
from safetensors import safe_open

import _common as common
from twn_cli.engine.gate import RoutingGate
from twn_cli.eval.metrics import auroc
from twn_cli.stages.train_gate import LABELS_DIR, LABELS_LOG, TrainGateConfig, fit_gate, gate_probabilities, sample_weights
from twn_cli.training import TRAIN_DIR

LEARNING_CURVE_SHARES = (0.25, 0.5)

# A predictor: (training rows, scored rows, labels) -> scores of the scored rows.
Predictor = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def read_run(run_dir: Path) -> tuple[dict[str, torch.Tensor], list[dict], TrainGateConfig, int]:
    """(the cached features and margins in labelling order, the labels log's records, the run's settings, the gate's hidden size)."""
    manifest = json.loads((run_dir / "twn.json").read_text())
    stage = next(stage for stage in reversed(manifest["stages"]) if stage["stage"] == "train-gate")
    known = {field.name for field in fields(TrainGateConfig)}
    config = TrainGateConfig(**{name: value for name, value in stage["arguments"].items() if name in known})
    records = [json.loads(line) for line in (run_dir / TRAIN_DIR / LABELS_LOG).read_text().splitlines()]
    parts, ids = defaultdict(list), []
    for path in sorted((run_dir / TRAIN_DIR / LABELS_DIR).glob("batch-*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            ids += json.loads(handle.metadata()["ids"])
            for name in ("features", "margin_never", "margin_think"):
                parts[name].append(handle.get_tensor(name))
    if ids != [record["id"] for record in records]:
        raise SystemExit(f"{run_dir}: the label cache and {LABELS_LOG} hold different inputs (rerun train-gate)")
    return {name: torch.cat(tensors) for name, tensors in parts.items()}, records, config, manifest["model"]["gate_hidden_size"]


def cross_validated_auroc(predict: Predictor, labels: torch.Tensor, folds: int, seed: int) -> float | None:
    count = len(labels)
    fold_of = torch.empty(count, dtype=torch.int64)
    fold_of[torch.randperm(count, generator=torch.Generator().manual_seed(seed))] = torch.arange(count) % folds
    scores = torch.empty(count)
    for fold in range(folds):
        scored, trained = (fold_of == fold).nonzero().flatten(), (fold_of != fold).nonzero().flatten()
        scores[scored] = predict(trained, scored, labels)
    return auroc(scores, labels)


def gate_predictor(features: torch.Tensor, margin_change: torch.Tensor, config: TrainGateConfig, hidden_size: int, share: float = 1.0) -> Predictor:
    def predict(trained: torch.Tensor, scored: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        trained = trained[torch.randperm(len(trained), generator=torch.Generator().manual_seed(config.seed))[: max(2, round(share * len(trained)))]]
        torch.manual_seed(config.seed)
        gate = RoutingGate(features.shape[1], hidden_size)
        fit_gate(gate, features[trained], labels[trained], sample_weights(labels[trained], margin_change[trained], config.margin_weighting), config)
        return gate_probabilities(gate, features[scored])

    return predict


def group_rate_predictor(groups: list[tuple]) -> Predictor:
    def predict(trained: torch.Tensor, scored: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        members = defaultdict(list)
        for row in trained.tolist():
            members[groups[row]].append(float(labels[row]))
        overall = float(labels[trained].float().mean())
        return torch.tensor([sum(members[groups[row]]) / len(members[groups[row]]) if members[groups[row]] else overall for row in scored.tolist()])

    return predict


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a checkpoint written by twn train-gate (its train/ folder holds the labels)")
    parser.add_argument("--deltas", type=float, nargs="+", help="label thresholds δ (default: the run's)")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("-o", "--output", help="write the figures as JSON here too")
    arguments = parser.parse_args(argv)

    cached, records, config, hidden_size = read_run(arguments.run)
    margin_change = cached["margin_think"] - cached["margin_never"]
    predictors = {"gate": gate_predictor(cached["features"], margin_change, config, hidden_size)}
    for share in LEARNING_CURVE_SHARES:
        predictors[f"gate_on_{share:g}_of_labels"] = gate_predictor(cached["features"], margin_change, config, hidden_size, share)
    predictors["task_rate"] = group_rate_predictor([(record["task"],) for record in records])
    if any(record["difficulty"] for record in records):
        predictors["task_difficulty_rate"] = group_rate_predictor([(record["task"], record["difficulty"]) for record in records])

    by_delta = {}
    for delta in arguments.deltas or [config.delta]:
        labels = margin_change > delta
        by_delta[f"{delta:g}"] = {
            "think_rate": round(float(labels.float().mean()), 4),
            **{name: cross_validated_auroc(predict, labels, arguments.folds, config.seed + 1) for name, predict in predictors.items()},
        }
    figures = {
        "run": str(arguments.run),
        "inputs": len(records),
        "split": config.split,
        "folds": arguments.folds,
        "auroc_by_delta": by_delta,
        "command": " ".join(sys.argv),
        "machine": common.machine_info("cpu"),
    }
    print(f"{len(records)} {config.split} labels of {arguments.run}: {arguments.folds}-fold AUROC against the labels at each δ")
    names = list(next(iter(by_delta.values())))
    common.print_table(["δ"] + names, [[delta] + [row[name] for name in names] for delta, row in by_delta.items()])
    common.finish(figures, arguments.output)
    return figures

if __name__ == "__main__":
    main(sys.argv[1:])
