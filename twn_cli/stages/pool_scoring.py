"""Queries judged against their own candidate pools, as `twn eval` ranks them: both views of each query (never
and always think, CoTs greedy), whether each ranks a gold first, and its pool margin. train-gate labels and
chooses τ with them; train-rl measures its held-out always-think Hit@1 with them."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from twn_cli.data.prepared import PreparedDataset, prepared_input
from twn_cli.distributed import Distributed
from twn_cli.engine.decoding import Sampling
from twn_cli.engine.model import TWNModel
from twn_cli.eval.metrics import hit_at_1
from twn_cli.stages.common import CandidateEmbedder
from twn_cli.stages.gate_labelling import LabelledInputs, Progress, embed_views
from twn_cli.types import ModelInput


@dataclass
class PoolViews:
    """Queries in both views, each judged against its own candidate pool as `twn eval` ranks it: the gate
    input, whether each view ranks a gold first, each view's pool margin (the best gold's score minus the
    best other candidate's, copies of a gold excepted), the CoT and its length, and each query's weight in
    the score (a mean over tasks)."""

    ids: list[str]
    tasks: list[str]
    features: torch.Tensor
    hit_never: torch.Tensor
    hit_think: torch.Tensor
    margin_never: torch.Tensor
    margin_think: torch.Tensor
    reasoning_tokens: torch.Tensor
    cots: list[str]
    weights: torch.Tensor

    def labelled(self) -> LabelledInputs:
        """Their pool margins and gate inputs, as labels are kept."""
        return LabelledInputs(self.ids, self.features, self.margin_never, self.margin_think, self.reasoning_tokens, self.cots)


def task_weights(tasks: list[str]) -> torch.Tensor:
    """Weights that make a weighted mean of per-query hits the mean over tasks of each task's Hit@1: the
    MMEB-style score `twn eval` reports for image and video tasks, in which a task of 25 queries counts as
    much as one of 300."""
    sizes = Counter(tasks)
    return torch.tensor([1.0 / (len(sizes) * sizes[task]) for task in tasks], dtype=torch.float64)


# The margin of a query whose pool holds no gold (`twn eval` counts it a miss in either view): the lowest
# a margin of cosine scores can be, the same in both views.
NO_GOLD_MARGIN = -2.0


def pool_margin(scores: torch.Tensor, gold: torch.Tensor, negative: torch.Tensor) -> float:
    """The best gold's score minus the best negative's (0 where the pool has no negative, NO_GOLD_MARGIN where
    it has no gold)."""
    if not gold.any():
        return NO_GOLD_MARGIN
    best_gold = float(scores[gold].max())
    return best_gold - float(scores[negative].max()) if negative.any() else 0.0


def pool_views(
    model: TWNModel, dataset: PreparedDataset, rows: list[dict], *, batch_size: int, max_think_tokens: int,
    progress: Progress = lambda phase, done, total: None, phase: str = "validation",
) -> PoolViews:
    """Both views of the query `rows`, judged against their candidate pools; CoTs greedy, as `twn eval` writes them.

    Under several processes each embeds its share of the candidate and query batches, and every process
    receives all of them in order.
    """
    distributed = Distributed()
    pools = [dataset.candidate_pool(row) for row in rows]
    needed = sorted({candidate for pool in pools for candidate in pool})
    embeddings = dict(zip(needed, CandidateEmbedder(model, dataset.candidates, batch_size).shared_by(distributed, needed)))
    sampling = Sampling(max_new_tokens=max_think_tokens)

    def judge(read_batch: tuple[int, list[dict], list[ModelInput]]) -> tuple[torch.Tensor, list[int], list[str], list[list[float]]]:
        """The batch's gate inputs, reasoning tokens, CoTs and, per query, [hit never, hit think, margin never,
        margin think] (the embeddings stay in the process that made them)."""
        start, batch, inputs = read_batch
        views = embed_views(model, inputs, sampling)
        judged = []
        for offset, row in enumerate(batch):
            pool = pools[start + offset]
            pool_embeddings = torch.stack([embeddings[c] for c in pool])
            gold = torch.tensor([c in row["positive_ids"] for c in pool])
            copies = dataset.with_copies(row["positive_ids"])
            negative = torch.tensor([c not in copies for c in pool])
            scores = [pool_embeddings.float() @ view[offset].float() for view in (views.never, views.think)]
            judged.append([*(hit_at_1(view_scores, gold) for view_scores in scores), *(pool_margin(view_scores, gold, negative) for view_scores in scores)])
        return views.last_prompt_state, views.reasoning_tokens, views.cots, judged

    def read(start: int) -> tuple[int, list[dict], list[ModelInput]]:
        batch = rows[start : start + batch_size]
        return start, batch, [prepared_input(row) for row in batch]

    features, tokens, cots, judged = [], [], [], []
    progress(phase, 0, len(rows))
    for state, reasoning_tokens, batch_cots, batch_judged in distributed.map_in_order(judge, range(0, len(rows), batch_size), prepare=read):
        features.append(state)
        tokens.extend(reasoning_tokens)
        cots.extend(batch_cots)
        judged.extend(batch_judged)
        progress(phase, len(judged), len(rows))
    hit_never, hit_think, margin_never, margin_think = (list(column) for column in zip(*judged))
    return PoolViews(
        [row["id"] for row in rows],
        [row["task"] for row in rows],
        torch.cat(features),
        torch.tensor(hit_never),
        torch.tensor(hit_think),
        torch.tensor(margin_never),
        torch.tensor(margin_think),
        torch.tensor(tokens, dtype=torch.int64),
        cots,
        task_weights([row["task"] for row in rows]),
    )


def weighted_hit_rate(hits: torch.Tensor, weights: torch.Tensor) -> float:
    return float((hits.double() * weights).sum() / weights.sum())
