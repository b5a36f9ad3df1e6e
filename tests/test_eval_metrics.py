"""Ranking metrics against hand-computed rankings, the tie rule, chunked ranking of big pools, aggregation."""

from __future__ import annotations

import math
import random

import pytest
import torch

from twn_cli.eval.aggregate import TaskCost, aggregate, task_summary
from twn_cli.eval.metrics import METRICS, query_metrics, rank_in_chunks


def rank(scores: list[float], golds: dict[int, float], **options):
    """Rank one query whose score for candidate i is scores[i] (1-d embeddings make the dot product exact)."""
    candidates = torch.tensor(scores, dtype=torch.float32)[:, None]
    (ranked,) = rank_in_chunks(torch.ones(1, 1), candidates, [golds], **options)
    return ranked


def test_one_gold_ranked_third():
    ranked = rank([0.1, 0.9, 0.5, 0.7], {2: 1.0})
    assert ranked.top_positions == [1, 3, 2, 0]
    assert ranked.top_scores == pytest.approx([0.9, 0.7, 0.5, 0.1])
    assert ranked.gold_ranks == [3]
    metrics = query_metrics(ranked.gold_ranks, [1.0])
    assert metrics == pytest.approx(
        {"hit@1": 0, "hit@5": 1, "hit@10": 1, "ndcg@5": 0.5, "ndcg@10": 0.5, "mrr": 1 / 3,
         "recall@1": 0, "recall@5": 1, "recall@10": 1}
    )
    assert list(metrics) == list(METRICS)


@pytest.mark.parametrize("chunk_size", [1, 2, 8192])
def test_ties_count_against_the_gold(chunk_size):
    # Gold listed first, as MMEB-V2 does: a tie must not hand it the top rank.
    ranked = rank([0.8, 0.8, 0.8, 0.2], {0: 1.0}, chunk_size=chunk_size)
    assert ranked.top_positions == [1, 2, 0, 3] and ranked.gold_ranks == [3]
    ranked = rank([0.8, 0.8, 0.8, 0.2], {2: 1.0}, chunk_size=chunk_size)
    assert ranked.top_positions == [0, 1, 2, 3] and ranked.gold_ranks == [3]
    # A collapsed model (all scores equal) gets no credit.
    assert query_metrics(rank([0.3] * 5, {0: 1.0}, chunk_size=chunk_size).gold_ranks, [1.0])["hit@1"] == 0


@pytest.mark.parametrize("chunk_size", [1, 8192])
def test_tied_golds_put_the_less_relevant_first(chunk_size):
    ranked = rank([0.5, 0.5, 0.5], {0: 2.0, 2: 1.0}, chunk_size=chunk_size)
    assert ranked.top_positions == [1, 2, 0]
    assert ranked.gold_ranks == [3, 2]
    dcg = 2 / math.log2(4) + 1 / math.log2(3)
    ideal = 2 / math.log2(2) + 1 / math.log2(3)
    assert query_metrics(ranked.gold_ranks, [2.0, 1.0])["ndcg@5"] == pytest.approx(dcg / ideal)  # 0.6199


def test_several_golds():
    ranked = rank([0.9, 0.3, 0.8, 0.1, 0.6, 0.4], {2: 1.0, 5: 1.0})
    assert ranked.top_positions == [0, 2, 4, 5, 1, 3]
    assert ranked.gold_ranks == [2, 4]
    metrics = query_metrics(ranked.gold_ranks, [1.0, 1.0])
    ndcg = (1 / math.log2(3) + 1 / math.log2(5)) / (1 + 1 / math.log2(3))
    assert metrics == pytest.approx(
        {"hit@1": 0, "hit@5": 1, "hit@10": 1, "ndcg@5": ndcg, "ndcg@10": ndcg, "mrr": 0.5,
         "recall@1": 0, "recall@5": 1, "recall@10": 1}
    )


@pytest.mark.parametrize("chunk_size", [3, 8192])
def test_golds_beyond_the_top_ten_are_ranked_by_counting(chunk_size):
    scores = [1.0 - i / 20 for i in range(14)]  # candidate i ranks i + 1
    ranked = rank(scores, {2: 1.0, 6: 1.0, 11: 1.0, 13: 1.0}, chunk_size=chunk_size)
    assert ranked.top_positions == list(range(10))
    assert ranked.gold_ranks == [3, 7, 12, 14]
    metrics = query_metrics(ranked.gold_ranks, [1.0] * 4)
    assert (metrics["hit@1"], metrics["hit@5"], metrics["mrr"]) == (0, 1, pytest.approx(1 / 3))
    assert (metrics["recall@1"], metrics["recall@5"], metrics["recall@10"]) == (0, 0.25, 0.5)


def test_graded_ndcg():
    # Relevance 1 at rank 1, relevance 3 at rank 3: DCG = 1 + 3/2, ideal = 3 + 1/log2(3).
    ranked = rank([0.9, 0.8, 0.7, 0.1], {0: 1.0, 2: 3.0})
    assert ranked.gold_ranks == [1, 3]
    metrics = query_metrics(ranked.gold_ranks, [1.0, 3.0])
    assert metrics["ndcg@5"] == pytest.approx(2.5 / (3 + 1 / math.log2(3)))  # 0.6885
    assert metrics["ndcg@10"] == metrics["ndcg@5"]
    assert (metrics["hit@1"], metrics["mrr"], metrics["recall@1"]) == (1, 1, 0.5)
    # Only the top k count: at k=1 neither DCG nor ideal DCG sees the second gold.
    assert query_metrics([2, 1], [1.0, 3.0])["ndcg@5"] == pytest.approx(
        (1 / math.log2(3) + 3) / (3 + 1 / math.log2(3))
    )


def test_a_gold_missing_from_the_pool_is_a_miss():
    metrics = query_metrics([1, None], [1.0, 1.0])
    assert (metrics["hit@1"], metrics["recall@1"], metrics["mrr"]) == (1, 0.5, 1)
    assert metrics["ndcg@5"] == pytest.approx(1 / (1 + 1 / math.log2(3)))
    assert query_metrics([None], [1.0]) == dict.fromkeys(METRICS, 0.0)


def reference_ranking(scores: list[float], golds: dict[int, float]):
    """The tie rule spelled out: sort by (-score, relevance, position)."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], golds.get(i, 0.0), i))
    rank_of = {position: rank for rank, position in enumerate(order, start=1)}
    return order[:10], [rank_of[position] for position in golds]


def test_chunked_ranking_of_a_large_pool_equals_the_full_sort():
    generator = torch.Generator().manual_seed(0)
    # Small integer vectors: exact dot products and very many ties, across chunk boundaries.
    candidates = torch.randint(-2, 3, (120_000, 3), generator=generator).float()
    queries = torch.randint(-2, 3, (5, 3), generator=generator).float()
    picker = random.Random(0)
    pool = torch.randperm(120_000, generator=generator)[:50_000]
    for pool_index, pool_size in ((None, 120_000), (pool, 50_000)):
        golds = [{picker.randrange(pool_size): picker.choice([1.0, 2.0]) for _ in range(3)} for _ in queries]
        ranked = rank_in_chunks(queries, candidates, golds, pool=pool_index, chunk_size=7000, query_block=2)
        pool_embeddings = candidates if pool_index is None else candidates[pool_index]
        for query, gold, result in zip(queries, golds, ranked):
            scores = (pool_embeddings @ query).tolist()
            top, gold_ranks = reference_ranking(scores, gold)
            assert result.top_positions == top
            assert result.gold_ranks == gold_ranks
            assert result.top_scores == [scores[position] for position in top]


def test_gold_positions_must_lie_in_the_pool():
    with pytest.raises(ValueError, match="inside the pool"):
        rank([0.1, 0.2], {5: 1.0})


def test_aggregation_averages_tasks_and_uses_each_modalitys_headline_metric():
    def metrics(hit1: float, ndcg5: float) -> dict:
        return {name: 0.0 for name in METRICS} | {"hit@1": hit1, "ndcg@5": ndcg5}

    # task: (meta-task, modality, per-query metrics, cost: queries, thought, reasoning tokens, inputs, seconds)
    specification = {
        "cls-a": ("classification", "image", [metrics(1, 0.5), metrics(0, 0.5)], TaskCost(2, 2, 20, 12, 2.0)),
        "cls-b": ("classification", "image", [metrics(1, 1.0)], TaskCost(1, 0, 0, 11, 1.0)),
        "vqa-a": ("vqa", "image", [metrics(0, 0.2)], TaskCost(1, 1, 5, 6, 1.0)),
        "doc-a": ("visdoc", "visdoc", [metrics(1, 0.25), metrics(1, 0.75)], TaskCost(2, 0, 0, 102, 4.0)),
    }
    tasks = {name: task_summary(*spec) for name, spec in specification.items()}
    costs = {name: spec[3] for name, spec in specification.items()}
    assert tasks["cls-a"]["score"] == 0.5 and tasks["doc-a"]["score"] == 0.5  # Hit@1 vs NDCG@5
    assert tasks["cls-a"]["think_rate"] == 1.0 and tasks["cls-a"]["reasoning_tokens_per_query"] == 10.0
    assert tasks["cls-a"]["inputs_per_second"] == 6.0
    result = aggregate(tasks, costs)
    assert result["meta_tasks"]["classification"]["score"] == pytest.approx(0.75)  # mean of 0.5 and 1
    assert result["modalities"]["image"]["score"] == pytest.approx((0.5 + 1 + 0) / 3)  # tasks, not meta-tasks
    assert result["modalities"]["image"]["headline_metric"] == "hit@1"
    visdoc = result["modalities"]["visdoc"]
    assert (visdoc["headline_metric"], visdoc["score"], visdoc["tasks"]) == ("ndcg@5", 0.5, 1)
    assert result["overall"]["score"] == pytest.approx((0.5 + 1 + 0 + 0.5) / 4)
    assert result["overall"]["metrics"]["hit@1"] == pytest.approx((0.5 + 1 + 0 + 1) / 4)
    # Cost pools queries and inputs: 3 of 6 queries thought, 25 tokens, 131 inputs in 8 s.
    overall = result["overall"]
    assert (overall["queries"], overall["think_rate"], overall["inputs"]) == (6, 0.5, 131)
    assert overall["reasoning_tokens_per_query"] == pytest.approx(25 / 6)
    assert overall["inputs_per_second"] == pytest.approx(131 / 8)
