"""`twn train-gate`: self-supervised labels for the routing gate, the gate itself, and its threshold τ.

1. Labels. Each training input is embedded twice from one prompt prefill: without thinking, and
   with the CoT that the reasoning adapter writes (greedy). A view's retrieval margin is
   s(query, positive) - max s(query, negative), the negatives being the other targets of its labelling batch
   and its hard negatives, all embedded without thinking, and, given one, every entry of a global negatives
   cache (`twn embed DATA -o cache.pt`); never one of the query's positives or a copy of one under another
   id (PreparedDataset.with_copies: an answer that recurs across tasks and splits). The label
   says whether thinking raised the margin by more than δ. The prefill's last prompt state, which the gate
   reads, is kept beside the margins. On a real backbone this is the expensive part, so it is batched and
   every batch is cached in RUN/train/gate-labels/: a rerun labels only what is missing. Margins rather than
   labels are cached, so another δ reuses the cache.
   `label: expected_hit` labels against what `twn eval` measures instead: each view's margin against the
   query's own candidate pool (the best gold's score minus the best other candidate's), and the rise of the
   smoothed Hit@1 σ(margin / T) from never to think, in [-1, 1]. A margin far from zero moves it little
   either way, so it counts what carries a query across the first rank, and what thinking costs a query
   it had right; the batch margin counts every rise alike, also of queries that rank first either way.
   The gate is fitted to (1 + rise) / 2 (a soft BCE target: its p_think ranks inputs by expected gain);
   a label says the rise exceeds δ, and the AUROCs judge the inputs it helps against those whose smoothed
   Hit@1 fell by more than δ (the others, most of them, neither gain nor lose). Validation queries are
   judged once, for the labels and for τ.
2. The gate, an MLP on the detached last prompt state, trains on those cached states with a class-weighted
   BCE (optionally weighted by the size of the margin change): no backbone pass, and only the gate's
   parameters change. Labels are noisy (most CoTs move the margin a little either way), and an MLP on a
   few thousand states learns them by heart within tens of epochs, so a slice of its training labels
   picks the epoch to keep (early stopping). Its AUROC against labels it never saw is estimated by k-fold
   cross-validation: the labels are split in k folds, each scored by a gate trained the same way on the
   others; the gate that ships then trains on every label (a slice of them picking its epoch). One
   held-out share would waste labels and, on a few hundred, swing by ±0.1 with the draw. Every gate
   starts from a fresh, seeded initialisation, so one trained before cannot leak the folds. Routing by task
   (and difficulty, where the data tags it) alone is scored on the same folds: a gate that ranks no better
   has learnt only the task.
3. τ, on the validation split (each validation query embedded in both views once), from Hit@1 averaged over
   tasks, `twn eval`'s headline for image and video tasks: the τ with the best score (ties go to the higher
   τ, which thinks less), the least thinking whose score the validation noise cannot tell from the best
   (`within_noise`, a bootstrap one-standard-error rule), or the (1 - F) quantile of p_think for a think
   budget F. A validation input that was also labelled counts with its held-out p_think, from the fold's
   gate that never saw it; the shipped gate, another fit, then gets the τ at which it thinks on the same
   share of the validation queries (its p_think quantile at the chosen think rate). The tasks in which
   thinking won on validation are recorded, for task-level routing in `twn eval`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from twn_cli.atomic import write_text_atomically
from twn_cli.data.negatives_cache import NegativesCache
from twn_cli.data.prepared import PreparedDataset
from twn_cli.distributed import Distributed
from twn_cli.engine.checkpoint import check_checkpoint_output, save_checkpoint, stage_results
from twn_cli.engine.gate import thinks
from twn_cli.engine.model import TWNModel
from twn_cli.errors import TWNError
from twn_cli.eval.metrics import auroc
from twn_cli.recipes import AT_LEAST_ONE, NOT_NEGATIVE, POSITIVE, Range, check_ranges
from twn_cli.stages.common import stage_record
from twn_cli.stages.gate_fitting import fit_gate, fitting_targets, gate_probabilities, heldout_group_auroc, heldout_probabilities
from twn_cli.stages.gate_labelling import LABELS_DIR, LabelledInputs, Progress, label_inputs, labelling_rows
from twn_cli.stages.gate_threshold import (
    adaptive_outcome,
    best_threshold,
    choosing_probabilities,
    threshold_for_budget,
    threshold_within_noise,
    validation_views,
)
from twn_cli.stages.pool_scoring import PoolViews, pool_views
from twn_cli.training import TRAIN_DIR

log = logging.getLogger(__name__)

LABELS_LOG = "gate-labels.jsonl"  # RUN/train/: one line per labelled input, for analysis
METRICS_LOG = "gate-metrics.jsonl"  # RUN/train/: the gate's training loss
TARGETS = ("best", "within_noise", "budget")
LABELS = ("margin", "expected_hit")


@dataclass
class TrainGateConfig:
    """Hyper-parameters of train-gate; recipes/<backbone>/train-gate.yaml sets them."""

    # Labels (see the module's docstring): margin, or expected_hit.
    label: str = "margin"
    label_temperature: float = 0.05  # expected_hit: T of σ(margin / T)
    split: str = "train"
    label_queries: int = 2000
    label_batch_size: int = 16  # also the batch of the validation passes
    hard_negatives: int = 4
    delta: float = 0.0
    max_think_tokens: int | None = None  # None: the checkpoint's
    # The gate.
    epochs: int = 200
    batch_size: int = 256
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    margin_weighting: bool = False
    stopping_fraction: float = 0.2  # of the gate's training labels: the epoch with the lowest loss on them is kept
    heldout_folds: int = 5  # the held-out AUROC: each fold scored by a gate trained on the others
    # The threshold.
    target: str = "best"  # best, within_noise or budget (see the module's docstring)
    think_budget: float = 0.5
    best_tolerance: float = 0.0  # target best: the τ that thinks least within this share of the best Hit@1
    noise_standard_errors: float = 1.0  # target within_noise: how many standard errors below the best still count
    bootstrap_samples: int = 200  # target within_noise: draws of the validation queries that estimate the noise
    validation_split: str = "validation"
    validation_queries: int = 200
    # Bookkeeping.
    log_every: int = 10
    seed: int = 0

    def __post_init__(self):
        if self.label not in LABELS:
            raise TWNError(f"label must be one of {', '.join(LABELS)}, not '{self.label}'")
        if self.target not in TARGETS:
            raise TWNError(f"target must be one of {', '.join(TARGETS)}, not '{self.target}'")
        if not 0.0 <= self.think_budget <= 1.0:
            raise TWNError(f"think_budget is a share of inputs, between 0 and 1, not {self.think_budget}")
        if not 0.0 <= self.stopping_fraction < 1.0:
            raise TWNError(f"stopping_fraction must be in [0, 1), not {self.stopping_fraction}")
        if self.heldout_folds < 2:
            raise TWNError(f"heldout_folds must be at least 2 (each fold is scored by a gate trained on the others), not {self.heldout_folds}")
        if self.label_batch_size < 2:
            raise TWNError("label_batch_size must be at least 2: the batch's other targets are the negatives")
        if min(self.label_queries, self.validation_queries, self.epochs, self.batch_size, self.log_every) < 1 or self.hard_negatives < 0:
            raise TWNError("label_queries, validation_queries, epochs, batch_size and log_every must be positive, hard_negatives not negative")
        check_ranges(self, {
            "max_think_tokens": AT_LEAST_ONE, "learning_rate": POSITIVE, "label_temperature": POSITIVE, "weight_decay": NOT_NEGATIVE, "best_tolerance": NOT_NEGATIVE,
            "noise_standard_errors": NOT_NEGATIVE, "bootstrap_samples": Range(2, 100_000),
        })


# ----------------------------------------------------------------------------------------- the stage
def run_train_gate(
    model: TWNModel,
    dataset: PreparedDataset,
    run_dir: Path,
    config: TrainGateConfig,
    *,
    negatives: NegativesCache | None = None,
    progress: Progress = lambda phase, done, total: None,
) -> dict:
    """Label (against `negatives` too, given a cache), train the gate, pick τ (set as `model.config.gate_threshold`),
    and save the checkpoint in `run_dir` (by the first process); returns the summary, which twn.json keeps."""
    run_dir = Path(run_dir)
    check_checkpoint_output(run_dir)
    record = stage_record("train-gate", dataset, config, checkpoint=model.checkpoint_dir, negatives_cache=negatives.path if negatives else None)
    if negatives is not None and config.label == "expected_hit":
        raise TWNError("label: expected_hit judges each query against its own candidate pool and reads no negatives cache (it sharpens the batch margins of label: margin)")
    for split in (config.split, config.validation_split):
        if split not in dataset.queries:
            raise TWNError(f"prepared dataset '{dataset.path}' has no '{split}' split (it has {', '.join(dataset.queries)})")
    rows = labelling_rows(dataset, config)
    if len(rows) < 2:
        raise TWNError(f"the '{config.split}' split has {len(rows)} queries: labelling needs at least 2")
    train_dir = run_dir / TRAIN_DIR
    validation = validation_views(model, dataset, config, progress)
    if config.label == "expected_hit":
        labelled = pool_labels(model, dataset, rows, validation, config, progress)
        gain = labelled.expected_hit_gain(config.label_temperature)
        labels, soft_targets = gain > config.delta, ((1 + gain) / 2).float()
        judged = gain.abs() > config.delta  # AUROCs judge the inputs thinking helps against those it hurts
    else:
        labelled = label_inputs(model, dataset, rows, train_dir / LABELS_DIR, config, progress, negatives)
        labels, soft_targets = labelled.labels(config.delta), None
        judged = torch.ones(len(labels), dtype=torch.bool)

    if labels.all() or not labels.any():
        log.warning("all %d labels are %s: the gate can only learn one answer", len(labels), "'think'" if labels.all() else "'do not think'")
    progress("gate", 0, 2)
    model.gate.reset(config.seed)  # a gate trained before (a train-rl checkpoint's) has seen every fold
    fold_of, p_heldout = heldout_probabilities(model.gate, labelled.features, labels, labelled.margin_change, config, soft_targets)
    progress("gate", 1, 2)
    fit = fit_gate(model.gate, labelled.features, *fitting_targets(labels, labelled.margin_change, config.margin_weighting, soft_targets), config)
    stopping = fit.stopping_rows
    trained = (~torch.isin(torch.arange(len(labels)), stopping)).nonzero().flatten()
    progress("gate", 2, 2)
    p_labelled = gate_probabilities(model.gate, labelled.features)
    p_shipped = gate_probabilities(model.gate, validation.features)
    p_validation = choosing_probabilities(p_shipped, validation.ids, labelled.ids, p_heldout)

    choice = None
    if config.target == "budget":
        chosen = threshold_for_budget(p_validation, config.think_budget)
    elif config.target == "within_noise":
        chosen, choice = threshold_within_noise(p_validation, validation.hit_never, validation.hit_think, validation.tasks,
                                                config.noise_standard_errors, config.bootstrap_samples, config.seed)
    else:
        chosen = best_threshold(p_validation, validation.hit_never, validation.hit_think, validation.weights, config.best_tolerance)
    # A labelled validation input was chosen on with its fold gate's p_think; the shipped gate is another
    # fit and calibrated otherwise (on the toy world its p_think at the same τ thought on 50 % of the inputs
    # where the fold gates' thought on 60 %). What transfers is the think rate: τ is the shipped gate's
    # p_think quantile over the validation queries at the rate chosen.
    think_rate = float(thinks(p_validation, chosen).double().mean())
    tau = threshold_for_budget(p_shipped, think_rate)
    model.config.gate_threshold = tau
    folds = min(config.heldout_folds, len(labels))
    routing_by = {"task": [(row["task"],) for row in rows]}
    if any(row.get("difficulty") for row in rows):
        routing_by["task_difficulty"] = [(row["task"], row.get("difficulty") or "") for row in rows]
    summary = {
        "threshold": tau,
        "target": config.target,
        "think_budget": config.think_budget if config.target == "budget" else None,
        "label": config.label,
        "delta": config.delta,
        "feature": f"last prompt state of the {model.config.prefill_adapter}-adapter prefill",
        "labels": label_statistics(rows, labelled, labels, config),
        "negatives_cache": {"entries": len(negatives.ids), "sha256": negatives.digest()} if negatives is not None else None,
        "auroc": {
            "heldout": auroc(p_heldout[judged], labels[judged]),
            "heldout_inputs": len(labels),
            "judged_inputs": int(judged.sum()),
            "heldout_folds": len(fold_of.unique()),
            "train": auroc(p_labelled[trained][judged[trained]], labels[trained][judged[trained]]),
            "train_inputs": len(trained),
            "stopping": auroc(p_labelled[stopping][judged[stopping]], labels[stopping][judged[stopping]]),
            "stopping_inputs": len(stopping),
            # Routing by group alone, fitted to the gate's targets on the gate's folds: what the gate must beat
            # to route by input.
            **{
                f"heldout_{name}_lookup": heldout_group_auroc(groups, labels, folds, config.seed + 1, soft_targets, judged)
                for name, groups in routing_by.items()
            },
        },
        "threshold_choice": choice,
        "threshold_on_choosing_p": chosen,
        "gate_loss": fit.kept["loss"],
        "gate_epoch": fit.kept["epoch"],
        "validation": {"split": config.validation_split, **adaptive_outcome(p_validation, chosen, validation)},
    }
    if Distributed().is_main:
        _write_logs(train_dir, rows, labelled, labels, fold_of, p_heldout, set(stopping.tolist()), p_labelled, fit.history)
        manifest = model.manifest or {"stages": []}
        save_checkpoint(model, run_dir, stages=manifest["stages"] + [record], extra={**stage_results(manifest), "gate": summary})
    return summary


def pool_labels(
    model: TWNModel, dataset: PreparedDataset, rows: list[dict], validation: PoolViews, config: TrainGateConfig, progress: Progress
) -> LabelledInputs:
    """Pool margins of the labelled `rows`: from the validation views where τ's pass judged them already
    (labelling the validation split, no query is embedded twice), the others judged here."""
    known = set(validation.ids)
    missing = [row for row in rows if row["id"] not in known]
    judged = [validation]
    if missing:
        judged.append(pool_views(model, dataset, missing, batch_size=config.label_batch_size, max_think_tokens=config.max_think_tokens,
                                 progress=progress, phase="labelling"))
    return LabelledInputs.concatenate([views.labelled() for views in judged]).select([row["id"] for row in rows])


def label_statistics(rows: list[dict], labelled: LabelledInputs, labels: torch.Tensor, config: TrainGateConfig) -> dict:
    """How often thinking helped (overall and by the queries' difficulty tag, where the data has one)."""
    statistics = {
        "split": config.split,
        "inputs": len(labels),
        "think_helps": int(labels.sum()),
        "think_helps_rate": float(labels.double().mean()),
        "mean_margin_change": float(labelled.margin_change.mean()),
        "mean_reasoning_tokens": float(labelled.reasoning_tokens.float().mean()),
    }
    by_difficulty: dict[str, list[bool]] = {}
    for row, label in zip(rows, labels.tolist()):
        if row.get("difficulty"):
            by_difficulty.setdefault(row["difficulty"], []).append(label)
    if by_difficulty:
        statistics["think_helps_rate_by_difficulty"] = {name: sum(values) / len(values) for name, values in sorted(by_difficulty.items())}
    return statistics


def _write_logs(train_dir, rows, labelled, labels, fold_of, p_heldout, stopping, p_think, history) -> None:
    """RUN/train/gate-labels.jsonl (every labelled input) and gate-metrics.jsonl, each written atomically."""
    records = [
        {
            "id": row["id"],
            "task": row["task"],
            "difficulty": row.get("difficulty", ""),
            "label": bool(labels[i]),
            "margin_never": float(labelled.margin_never[i]),
            "margin_think": float(labelled.margin_think[i]),
            "reasoning_tokens": int(labelled.reasoning_tokens[i]),
            "cot": labelled.cots[i],
            "fold": int(fold_of[i]),
            "p_think_heldout": float(p_heldout[i]),
            "stopping": i in stopping,
            "p_think": float(p_think[i]),
        }
        for i, row in enumerate(rows)
    ]
    for name, lines in ((LABELS_LOG, records), (METRICS_LOG, history)):
        write_text_atomically(train_dir / name, "".join(json.dumps(line) + "\n" for line in lines))
