"""train-gate's threshold τ, chosen on the validation split: for a think budget, the best Hit@1, or the
least thinking that validation cannot tell from the best."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from twn_cli.data.prepared import PreparedDataset
from twn_cli.engine.gate import thinks
from twn_cli.engine.model import TWNModel
from twn_cli.errors import TWNError
from twn_cli.stages.gate_labelling import Progress
from twn_cli.stages.pool_scoring import PoolViews, pool_views, task_weights, weighted_hit_rate

if TYPE_CHECKING:
    from twn_cli.stages.train_gate import TrainGateConfig


# ----------------------------------------------------------------------------------------- the threshold
def choosing_probabilities(p_validation: torch.Tensor, validation_ids: list[str], labelled_ids: list[str], p_heldout: torch.Tensor) -> torch.Tensor:
    """The p_think that τ is chosen on: a validation input the gate trained on carries its held-out p_think instead.

    On inputs it learnt from, the gate ranks where thinking helped better than it will on new inputs, so a
    τ chosen on them thinks where it happened to pay there (the toy recipe labels the validation split).
    """
    heldout = dict(zip(labelled_ids, p_heldout.tolist()))
    return torch.tensor([heldout.get(input_id, float(p)) for input_id, p in zip(validation_ids, p_validation)])


def validation_views(model: TWNModel, dataset: PreparedDataset, config: TrainGateConfig, progress: Progress = lambda phase, done, total: None) -> PoolViews:
    """Both views of up to `validation_queries` validation queries, judged against their candidate pools."""
    split = dataset.queries[config.validation_split]
    rows = [split[i] for i in range(min(config.validation_queries, len(split)))]
    if not rows:
        raise TWNError(f"the '{config.validation_split}' split is empty: τ is chosen on it")
    return pool_views(model, dataset, rows, batch_size=config.label_batch_size, max_think_tokens=config.max_think_tokens, progress=progress)


def threshold_for_budget(p_think: torch.Tensor, budget: float) -> float:
    """The highest τ at which a share `budget` of these inputs think (p_think ≥ τ): their (1 - budget) quantile."""
    ordered = p_think.float().sort(descending=True).values
    thinking = round(budget * len(ordered))
    if thinking == 0:
        return float(torch.nextafter(ordered[0], torch.tensor(float("inf"))))  # just above every p_think
    return float(ordered[thinking - 1])


def candidate_thresholds(p_think: torch.Tensor) -> torch.Tensor:
    """Every τ that routes these inputs differently, highest (no input thinks) first."""
    p_think = p_think.float()
    above_all = torch.nextafter(p_think.max(), torch.tensor(float("inf")))
    return torch.cat([above_all[None], p_think.unique().flip(0)])


def routed_hits(p_think: torch.Tensor, hit_never: torch.Tensor, hit_think: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
    """[inputs, thresholds]: whether each input hits when the gate routes it at each τ."""
    return torch.where(thinks(p_think.float()[:, None], taus[None]), hit_think[:, None], hit_never[:, None]).double()


def best_threshold(
    p_think: torch.Tensor, hit_never: torch.Tensor, hit_think: torch.Tensor, weights: torch.Tensor, tolerance: float = 0.0
) -> float:
    """The highest τ whose score (the `weights`-weighted Hit@1, inputs with p_think ≥ τ using their think
    view) is within `tolerance` of the best.

    With no tolerance, ties go to the higher τ, which thinks less; a tolerance (a share of Hit@1, 0.005 for
    half a point) trades that much validation score for fewer reasoning tokens.
    """
    taus = candidate_thresholds(p_think)
    weights = weights.double()
    scores = weights @ routed_hits(p_think, hit_never, hit_think, taus) / weights.sum()
    return float(taus[int((scores >= scores.max() - tolerance - 1e-9).nonzero()[0])])


def threshold_within_noise(
    p_think: torch.Tensor, hit_never: torch.Tensor, hit_think: torch.Tensor, tasks: list[str],
    standard_errors: float = 1.0, samples: int = 200, seed: int = 0,
) -> tuple[float, dict]:
    """The highest τ (the least thinking) whose validation score validation cannot tell from the best's.

    The score is Hit@1 averaged over tasks. Its noise is estimated by the bootstrap: the queries of each task
    are drawn again with replacement `samples` times, and for every τ the standard error of its score's
    shortfall from the best τ's (paired, on the same draws) is their spread. τ is the highest whose shortfall
    is at most `standard_errors` of those (the one-standard-error rule). On few noisy queries the best τ
    is often a lucky one, and thinks where it happened to pay; the rule keeps only what the data can show.
    Returns τ and what chose it.
    """
    taus = candidate_thresholds(p_think)
    hits = routed_hits(p_think, hit_never, hit_think, taus)
    weights = task_weights(tasks)
    scores = weights @ hits
    best = int(torch.nonzero(scores >= scores.max() - 1e-12)[0])
    generator = torch.Generator().manual_seed(seed)
    members = {task: torch.tensor([row for row, name in enumerate(tasks) if name == task]) for task in dict.fromkeys(tasks)}
    draws = torch.zeros(samples, len(tasks), dtype=torch.float64)
    for rows in members.values():
        picked = rows[torch.randint(len(rows), (samples, len(rows)), generator=generator)]
        draws.scatter_add_(1, picked, torch.ones_like(picked, dtype=torch.float64))
    resampled = (draws * weights) @ hits  # [samples, thresholds]
    shortfall = scores[best] - scores
    noise = (resampled[:, best : best + 1] - resampled).std(0)
    chosen = int(torch.nonzero(shortfall <= standard_errors * noise + 1e-12)[0])
    return float(taus[chosen]), {
        "best_threshold": float(taus[best]), "best_score": float(scores[best]), "score": float(scores[chosen]),
        "shortfall": float(shortfall[chosen]), "standard_error": float(noise[chosen]),
    }


def adaptive_outcome(p_think: torch.Tensor, tau: float, validation: PoolViews) -> dict:
    """Think rate, Hit@1 (mean over tasks) and reasoning tokens per query on validation at τ, beside never and
    always; each task's Hit@1 never and always, and the tasks in which thinking won (task-level routing)."""
    thinking = thinks(p_think.float(), tau)
    count = len(thinking)
    by_task = {}
    for task in dict.fromkeys(validation.tasks):
        rows = torch.tensor([name == task for name in validation.tasks])
        by_task[task] = {
            "queries": int(rows.sum()),
            "hit@1_never": float(validation.hit_never[rows].double().mean()),
            "hit@1_always": float(validation.hit_think[rows].double().mean()),
        }
    return {
        "queries": count,
        "think_rate": float(thinking.double().mean()),
        "hit@1_never": weighted_hit_rate(validation.hit_never, validation.weights),
        "hit@1_always": weighted_hit_rate(validation.hit_think, validation.weights),
        "hit@1_adaptive": weighted_hit_rate(torch.where(thinking, validation.hit_think, validation.hit_never), validation.weights),
        "reasoning_tokens_per_query": float((validation.reasoning_tokens * thinking).sum()) / count,
        "reasoning_tokens_per_query_always": float(validation.reasoning_tokens.sum()) / count,
        "tasks": by_task,
        "think_tasks": [task for task, hits in by_task.items() if hits["hit@1_always"] > hits["hit@1_never"]],
    }

