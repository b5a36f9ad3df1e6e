"""How predictable a train-gate run's labels are, and from what: the gate against routing by task alone.

    python benchmarks/gate_labels.py runs/toy/gate [--deltas 0 0.05 0.1] [--folds 5] [-o result.json]

Reads what `twn train-gate` left in RUN/train (the cached margins and last prompt states, and the labels
log with each input's task and difficulty); no model is loaded. For each δ, every figure is a k-fold
AUROC against the labels at that δ, each fold scored by a predictor fitted on the other folds:

- `gate`: train-gate's own k-fold estimate (the same folds, fresh seeded gates and settings), so at the
  run's δ it is the AUROC in the run's twn.json;
- `gate_on_<share>_of_labels`: the same, each fold's gate trained on that share of the other folds'
  labels: a learning curve that says whether more labels would help;
- `task_rate`, `task_difficulty_rate`: each input scored by the share of 'think' labels among the other
  folds' labels of its task (and difficulty, where the data has it). A gate that reaches no more than
  these routes by task, not by input.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Callable
from dataclasses import fields, replace
from pathlib import Path

import torch
from safetensors import safe_open

import _common as common
from twn_cli.engine.gate import RoutingGate
from twn_cli.eval.metrics import auroc
from twn_cli.stages.gate_fitting import group_rates, heldout_probabilities, out_of_fold_scores, probabilities_of_a_copy_trained_on
from twn_cli.stages.gate_labelling import LABELS_DIR
from twn_cli.stages.train_gate import LABELS_LOG, TrainGateConfig
from twn_cli.training import TRAIN_DIR

LEARNING_CURVE_SHARES = (0.25, 0.5)

# A predictor: (training rows, scored rows, labels) -> scores of the scored rows.
Predictor = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def read_run(run_dir: Path) -> tuple[dict[str, torch.Tensor], list[dict], TrainGateConfig, int]:
    """(the cached features and margins of the logged inputs, in the log's order; the log's records; the run's
    train-gate settings; the gate's hidden size)."""
    labels_log = run_dir / TRAIN_DIR / LABELS_LOG
    if not (run_dir / "twn.json").is_file():
        raise SystemExit(f"{run_dir}: not a TWN checkpoint (no twn.json)")
    manifest = json.loads((run_dir / "twn.json").read_text())
    stage = next((stage for stage in reversed(manifest["stages"]) if stage["stage"] == "train-gate"), None)
    if stage is None or not labels_log.is_file():
        raise SystemExit(f"{run_dir}: not a checkpoint written by twn train-gate (no train-gate stage, or no {TRAIN_DIR}/{LABELS_LOG})")
    known = {field.name for field in fields(TrainGateConfig)}
    config = TrainGateConfig(**{name: value for name, value in stage["arguments"].items() if name in known})
    records = [json.loads(line) for line in labels_log.read_text().splitlines()]
    parts, row_of = defaultdict(list), {}
    for path in sorted((run_dir / TRAIN_DIR / LABELS_DIR).glob("batch-*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for input_id in json.loads(handle.metadata()["ids"]):
                row_of[input_id] = len(row_of)
            for name in ("features", "margin_never", "margin_think"):
                parts[name].append(handle.get_tensor(name))
    missing = next((record["id"] for record in records if record["id"] not in row_of), None)
    if missing is not None:
        raise SystemExit(f"{run_dir}: input '{missing}' of {LABELS_LOG} is not in the label cache")
    rows = torch.tensor([row_of[record["id"]] for record in records])
    return {name: torch.cat(tensors)[rows] for name, tensors in parts.items()}, records, config, manifest["model"]["gate_hidden_size"]


def fresh_gate(input_size: int, hidden_size: int, config: TrainGateConfig) -> RoutingGate:
    gate = RoutingGate(input_size, hidden_size)
    gate.reset(config.seed)
    return gate


def heldout_auroc(predict: Predictor, labels: torch.Tensor, folds: int, seed: int) -> float | None:
    """AUROC of `predict`'s scores, each fold's from a fit on the other folds (train-gate's folds)."""
    _, scores = out_of_fold_scores(labels, folds, seed, lambda trained, scored: predict(trained, scored, labels))
    return auroc(scores, labels)


def gate_on_share(cached: dict[str, torch.Tensor], margin_change: torch.Tensor, config: TrainGateConfig, hidden_size: int, share: float) -> Predictor:
    def predict(trained: torch.Tensor, scored: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        kept = trained[torch.randperm(len(trained), generator=torch.Generator().manual_seed(config.seed))[: max(2, round(share * len(trained)))]]
        gate = fresh_gate(cached["features"].shape[1], hidden_size, config)
        return probabilities_of_a_copy_trained_on(gate, cached["features"], labels, margin_change, kept, scored, config)

    return predict


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a checkpoint written by twn train-gate (its train/ folder holds the labels)")
    parser.add_argument("--deltas", type=float, nargs="+", help="label thresholds δ (default: the run's)")
    parser.add_argument("--folds", type=int, help="default: the run's heldout_folds")
    parser.add_argument("-o", "--output", help="write the figures as JSON here too")
    arguments = parser.parse_args(argv)

    cached, records, config, hidden_size = read_run(arguments.run)
    folds = arguments.folds or config.heldout_folds
    if not 2 <= folds <= len(records):
        raise SystemExit(f"--folds must be between 2 and the number of labels ({len(records)}), not {folds}")
    margin_change = cached["margin_think"] - cached["margin_never"]
    groups = {"task_rate": group_rates([(record["task"],) for record in records])}
    if any(record["difficulty"] for record in records):
        groups["task_difficulty_rate"] = group_rates([(record["task"], record["difficulty"]) for record in records])

    by_delta = {}
    for delta in arguments.deltas or [config.delta]:
        labels = margin_change > delta
        settings = replace(config, heldout_folds=folds)
        _, p_heldout = heldout_probabilities(fresh_gate(cached["features"].shape[1], hidden_size, config), cached["features"], labels, margin_change, settings)
        row = {"think_rate": round(float(labels.float().mean()), 4), "gate": auroc(p_heldout, labels)}
        for share in LEARNING_CURVE_SHARES:
            row[f"gate_on_{share:g}_of_labels"] = heldout_auroc(gate_on_share(cached, margin_change, config, hidden_size, share), labels, folds, config.seed + 1)
        for name, predict in groups.items():
            row[name] = heldout_auroc(predict, labels, folds, config.seed + 1)
        by_delta[f"{delta:g}"] = row
    figures = {
        "run": str(arguments.run),
        "inputs": len(records),
        "split": config.split,
        "folds": folds,
        "auroc_by_delta": by_delta,
        "command": " ".join(sys.argv),
        "machine": common.machine_info("cpu"),
    }
    print(f"{len(records)} {config.split} labels of {arguments.run}: {folds}-fold AUROC against the labels at each δ")
    names = list(next(iter(by_delta.values())))
    common.print_table(["δ"] + names, [[delta] + [row[name] for name in names] for delta, row in by_delta.items()])
    common.finish(figures, arguments.output)
    return figures


if __name__ == "__main__":
    main(sys.argv[1:])
