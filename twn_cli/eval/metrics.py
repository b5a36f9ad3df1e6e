"""Ranking metrics for one query, and exact ranking of queries against candidate pools of any size.

Scores are cosine similarities of L2-normalised embeddings. A query's gold candidates carry a graded
relevance (> 0); every other candidate has relevance 0.

Ties count against the gold. Candidates are ordered by score (descending), then by relevance (ascending),
then by position in the pool; so among equal scores a non-gold ranks ahead of a gold, and a less relevant
gold ahead of a more relevant one. The rule is deterministic and never flatters a model: MMEB-V2 lists the
gold first in every pool, and breaking ties by pool order alone would give a collapsed model (all scores
equal) a perfect Hit@1.

NDCG@k uses linear gains with the standard log2 discount, DCG@k = sum over ranks r <= k of rel_r / log2(r + 1),
normalised by the DCG of the golds in ideal order (as pytrec_eval's ndcg_cut, which ViDoRe reports).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

KS = (1, 5, 10)
METRICS = ("hit@1", "hit@5", "hit@10", "ndcg@5", "ndcg@10", "mrr", "recall@1", "recall@5", "recall@10")
TOP_K = 10


def hit_at_1(scores: torch.Tensor, gold: torch.Tensor) -> bool:
    """Whether a gold candidate ranks first among `scores` (one query against its pool; `gold` marks the
    golds), under the tie rule above: it must score strictly above every non-gold."""
    if not gold.any():
        return False
    return not bool((~gold).any()) or float(scores[gold].max()) > float(scores[~gold].max())


def query_metrics(gold_ranks: Sequence[int | None], gold_relevance: Sequence[float]) -> dict[str, float]:
    """Every metric of METRICS for one query, from the 1-based rank of each gold (None: not in the pool)."""
    relevant = [(rank, relevance) for rank, relevance in zip(gold_ranks, gold_relevance) if relevance > 0]
    found = sorted(rank for rank, _ in relevant if rank is not None)
    metrics = {}
    for k in KS:
        within = sum(1 for rank in found if rank <= k)
        metrics[f"hit@{k}"] = float(within > 0)
        metrics[f"recall@{k}"] = within / len(relevant) if relevant else 0.0
    for k in (5, 10):
        metrics[f"ndcg@{k}"] = ndcg_at(k, relevant)
    metrics["mrr"] = 1.0 / found[0] if found else 0.0
    return {name: metrics[name] for name in METRICS}


def ndcg_at(k: int, ranked_golds: Sequence[tuple[int | None, float]]) -> float:
    """NDCG@k from (rank, relevance) pairs of a query's golds."""
    ideal = sorted((relevance for _, relevance in ranked_golds), reverse=True)[:k]
    ideal_dcg = sum(relevance / math.log2(position + 2) for position, relevance in enumerate(ideal))
    dcg = sum(relevance / math.log2(rank + 1) for rank, relevance in ranked_golds if rank is not None and rank <= k)
    return dcg / ideal_dcg if ideal_dcg > 0 else 0.0


@dataclass
class RankedQuery:
    """One query's ranking: its top candidates (pool positions, best first, with scores) and each gold's rank."""

    top_positions: list[int]
    top_scores: list[float]
    gold_ranks: list[int | None]


def rank_in_chunks(
    query_embeddings: torch.Tensor,
    candidate_embeddings: torch.Tensor,
    golds: Sequence[Mapping[int, float]],
    *,
    pool: torch.Tensor | None = None,
    k: int = TOP_K,
    chunk_size: int = 8192,
    query_block: int = 256,
    device: torch.device | str = "cpu",
) -> list[RankedQuery]:
    """Rank every query against one pool, under the tie rule above, with memory bounded by the chunk sizes.

    The pool is `candidate_embeddings[pool]` (all rows when `pool` is None). `golds[i]` maps the pool
    positions of query i's golds to their relevance; `gold_ranks` follow that mapping's order. Candidates
    are scored `chunk_size` at a time for `query_block` queries at a time, keeping a running top-k, so no
    [queries x pool] matrix is ever held. A gold outside the top-k is ranked by counting, in a second pass,
    the candidates ahead of it; both passes compute the same chunk products, so they agree exactly.
    """
    pool_size = candidate_embeddings.shape[0] if pool is None else pool.numel()
    for gold in golds:
        if any(not 0 <= position < pool_size or relevance <= 0 for position, relevance in gold.items()):
            raise ValueError(f"golds {dict(gold)} need positions inside the pool of {pool_size} and relevance > 0")
    results: list[RankedQuery] = []
    for start in range(0, query_embeddings.shape[0], query_block):
        block = query_embeddings[start : start + query_block].to(device, torch.float32)
        chunks = _Chunks(candidate_embeddings, pool, pool_size, chunk_size, golds[start : start + query_block], device)
        results.extend(_rank_block(block, chunks, k))
    return results


class _Chunks:
    """The pool in chunks, each (first position, candidate embeddings, [queries x chunk] relevance)."""

    def __init__(self, candidates, pool, pool_size, chunk_size, golds, device):
        self.candidates, self.pool, self.pool_size = candidates, pool, pool_size
        self.chunk_size, self.golds, self.device = chunk_size, golds, device

    def __iter__(self):
        for begin in range(0, self.pool_size, self.chunk_size):
            end = min(begin + self.chunk_size, self.pool_size)
            rows = self.candidates[begin:end] if self.pool is None else self.candidates[self.pool[begin:end]]
            # Filled on the CPU: one element write per gold would be one kernel launch each on a GPU.
            relevance = torch.zeros(len(self.golds), end - begin)
            for query, gold in enumerate(self.golds):
                for position, value in gold.items():
                    if begin <= position < end:
                        relevance[query, position - begin] = value
            yield begin, rows.to(self.device, torch.float32), relevance.to(self.device)


def _rank_block(block: torch.Tensor, chunks: _Chunks, k: int) -> list[RankedQuery]:
    rows = block.shape[0]
    scores = block.new_empty(rows, 0)
    relevance = block.new_empty(rows, 0)
    positions = torch.empty(rows, 0, dtype=torch.long, device=block.device)
    # (query, gold position) -> its (score, relevance) exactly as the chunk products gave them
    gold_keys: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
    for begin, candidates, chunk_relevance in chunks:
        chunk_scores = block @ candidates.T
        for query, position in (chunk_relevance > 0).nonzero().tolist():
            # Cloned: an indexed element is a view that would keep the whole chunk's score matrix alive.
            gold_keys[(query, begin + position)] = (chunk_scores[query, position].clone(), chunk_relevance[query, position].clone())
        chunk_positions = torch.arange(begin, begin + candidates.shape[0], device=block.device).expand(rows, -1)
        scores = torch.cat([scores, chunk_scores], dim=1)
        relevance = torch.cat([relevance, chunk_relevance], dim=1)
        positions = torch.cat([positions, chunk_positions], dim=1)
        # Running entries precede the chunk's and are in pool order among equal (score, relevance), so two
        # stable sorts (least significant key first) give the full (-score, relevance, position) order.
        order = relevance.sort(dim=1, stable=True).indices
        scores, relevance, positions = (t.gather(1, order) for t in (scores, relevance, positions))
        order = scores.sort(dim=1, descending=True, stable=True).indices[:, :k]
        scores, relevance, positions = (t.gather(1, order) for t in (scores, relevance, positions))

    ranks: dict[tuple[int, int], int] = {}
    for query, top in enumerate(positions.tolist()):
        ranks.update({(query, position): rank for rank, position in enumerate(top, start=1) if position in chunks.golds[query]})
    outside = {key: gold_keys[key] for key in gold_keys if key not in ranks}
    if outside:
        ranks.update(_count_ahead(block, chunks, outside))
    return [
        RankedQuery(
            top_positions=positions[query].tolist(),
            top_scores=scores[query].tolist(),
            gold_ranks=[ranks[(query, position)] for position in gold],
        )
        for query, gold in enumerate(chunks.golds)
    ]


def _count_ahead(block, chunks: _Chunks, gold_keys: dict) -> dict[tuple[int, int], int]:
    """The rank of each (query, gold position): 1 + the candidates before it in the tie rule's order."""
    ranks = dict.fromkeys(gold_keys, 1)
    for begin, candidates, relevance in chunks:
        scores = block @ candidates.T
        chunk_positions = torch.arange(begin, begin + candidates.shape[0], device=block.device)
        for (query, position), (gold_score, gold_relevance) in gold_keys.items():
            tied = scores[query] == gold_score
            ahead = (scores[query] > gold_score) | (tied & (relevance[query] < gold_relevance)) | (
                tied & (relevance[query] == gold_relevance) & (chunk_positions < position)
            )
            ranks[(query, position)] += int(ahead.sum())
    return ranks


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float | None:
    """Area under the ROC curve of `scores` for boolean `labels` (Mann-Whitney U, tied scores share their
    average rank, so a tie between a positive and a negative counts one half); None without both classes."""
    labels = labels.bool().flatten()
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        return None
    _, inverse, counts = torch.unique(scores.flatten().double(), return_inverse=True, return_counts=True)
    last_rank = counts.cumsum(0).double()
    average_rank = (last_rank - (counts - 1) / 2)[inverse]
    return float((average_rank[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))
