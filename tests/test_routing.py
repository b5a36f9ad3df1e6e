"""What routing buys, on hand-built queries: the chord, the oracle, task-level routing, areas, and the
threshold rule that keeps only what validation can tell apart."""

from __future__ import annotations

import pytest
import torch

from twn_cli.eval.routing import area_above_chord, oracle_curve, routing_inputs, routing_report, value_at
from twn_cli.stages.gate_fitting import heldout_group_auroc
from twn_cli.stages.gate_threshold import best_threshold, threshold_within_noise
from twn_cli.stages.pool_scoring import task_weights

# Two tasks of two queries each: (never hit, think hit, CoT tokens) per query.
PER_TASK = {
    "t2i": ([0, 0], [1, 1], [10, 30]),  # thinking helps both queries of this task
    "cls": ([1, 0], [0, 0], [20, 40]),  # thinking loses the first query, the second misses either way
}


def sweep_point(mode: str, threshold: float | None, score: float, think_rate: float, tokens: float) -> dict:
    return {"mode": mode, "threshold": threshold, "overall": {"score": score, "think_rate": think_rate, "reasoning_tokens_per_query": tokens}}


def test_areas_are_integrals_of_the_curve_above_the_chord():
    # The chord from (0, 0.2) to (1, 0.6); one point 0.2 above it at the middle: a triangle of area 0.1.
    assert area_above_chord([(0.5, 0.6)], 0.2, 0.6) == pytest.approx(0.1)
    assert area_above_chord([], 0.2, 0.6) == pytest.approx(0.0)
    assert area_above_chord([(0.5, 0.2)], 0.2, 0.6) == pytest.approx(-0.1)  # a point below the chord counts against
    assert value_at([(0.5, 0.6)], 0.25, 0.2, 0.6) == pytest.approx(0.4)


def test_routing_compares_the_gate_with_random_task_level_and_oracle_routing():
    inputs = routing_inputs(PER_TASK)
    # Overall scores are means over tasks: never (0 + 0.5) / 2, always (1 + 0) / 2.
    assert inputs.never_score == pytest.approx(0.25) and inputs.always_score == pytest.approx(0.5)
    # The oracle thinks for t2i's two queries only: 40 of the 100 tokens, score (1 + 0.5) / 2.
    curve = oracle_curve(inputs)
    assert curve[0] == pytest.approx((0.1, 0.5))  # t2i's cheaper query first: +0.25 for 10 tokens
    assert curve[1] == pytest.approx((0.4, 0.75))
    assert curve[-1] == pytest.approx((1.0, 0.5))
    # A gate that thinks for the same two queries at one threshold, and for all but cls's second at another.
    sweep = [sweep_point("never", None, 0.25, 0.0, 0.0), sweep_point("adaptive", 0.7, 0.75, 0.5, 10.0),
             sweep_point("adaptive", 0.3, 0.5, 0.75, 15.0), sweep_point("always", None, 0.5, 1.0, 25.0)]
    report = routing_report(inputs, sweep, chosen_threshold=0.7, think_tasks=["t2i"])
    first = report["gate"]["points"][0]
    assert first["token_share"] == pytest.approx(0.4) and first["random_at_think_rate"] == pytest.approx(0.25 + 0.5 * 0.25)
    assert first["chord_at_token_share"] == pytest.approx(0.25 + 0.4 * 0.25) and first["above_chord"]
    assert report["oracle"]["score"] == pytest.approx(0.75) and report["oracle"]["token_share"] == pytest.approx(0.4)
    assert report["task_level"]["score"] == pytest.approx(0.75) and report["task_level"]["token_share"] == pytest.approx(0.4)
    expected_gate_area = area_above_chord([(0.4, 0.75), (0.6, 0.5)], 0.25, 0.5)
    assert report["gate"]["area"] == pytest.approx(expected_gate_area)
    assert report["oracle"]["area"] >= report["gate"]["area"] > 0
    assert report["chosen"]["score"] == pytest.approx(0.75) and report["chosen"]["task_level_at_token_share"] == pytest.approx(0.75)


def hits_of(pattern: str) -> torch.Tensor:
    return torch.tensor([character == "1" for character in pattern])


def test_within_noise_takes_the_least_thinking_that_validation_cannot_tell_from_the_best():
    """Thinking helps the two queries with the highest p_think; on the next three it flips coins (a loss,
    then two wins) that put the best validation score one query higher at five thinking. That is within one
    bootstrap standard error: within_noise keeps two thinking, best takes five."""
    tasks = ["a"] * 8
    p_think = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2])
    never, think = hits_of("00100000"), hits_of("11011000")
    weights = task_weights(tasks)
    lucky = best_threshold(p_think, never, think, weights)
    tau, choice = threshold_within_noise(p_think, never, think, tasks, standard_errors=1.0, samples=400, seed=0)
    assert lucky == pytest.approx(0.5)  # five think: 4/8
    # Two think: 3/8, a shortfall of 1/8 against a standard error of about 0.21; one thinking (2/8) falls 0.25 short of about 0.23.
    assert tau == pytest.approx(0.8) and choice["best_threshold"] == pytest.approx(0.5) and choice["score"] == pytest.approx(3 / 8)
    assert choice["shortfall"] <= choice["standard_error"]
    # Without noise allowed it is the best τ.
    assert threshold_within_noise(p_think, never, think, tasks, standard_errors=0.0, samples=50)[0] == pytest.approx(lucky)


def test_routing_by_group_alone_is_scored_on_held_out_folds():
    labels = torch.tensor([True, True, False, False] * 10)
    by_label = [("think",) if label else ("rest",) for label in labels.tolist()]
    assert heldout_group_auroc(by_label, labels, folds=5, seed=1) == pytest.approx(1.0)
    one_group = [("all",)] * len(labels)
    assert heldout_group_auroc(one_group, labels, folds=5, seed=1) == pytest.approx(0.5)
    # Fitted to targets that rank the groups the other way round, the lookup ranks the labels backwards;
    # judged on the 'think' inputs alone, it has no pair to order.
    assert heldout_group_auroc(by_label, labels, folds=5, seed=1, fitted_to=1.0 - labels.float()) == pytest.approx(0.0)
    assert heldout_group_auroc(by_label, labels, folds=5, seed=1, judged=labels) is None


def test_the_kind_oracle_thinks_for_whole_kinds_in_order_of_their_gain_per_token():
    # t2i's two queries are of two kinds; cls's two of one kind, on which thinking loses.
    inputs = routing_inputs(PER_TASK, tags=["one_step", "simple", "simple", "simple"])
    sweep = [sweep_point("never", None, 0.25, 0.0, 0.0), sweep_point("always", None, 0.5, 1.0, 25.0)]
    kind = routing_report(inputs, sweep, chosen_threshold=None, think_tasks=None)["kind_oracle"]
    # (t2i, one_step): +0.25 for 10 of 100 tokens; (t2i, simple): +0.25 for 30; (cls, simple): -0.25 for 60.
    assert kind["curve"] == [pytest.approx((0.1, 0.5)), pytest.approx((0.4, 0.75)), pytest.approx((1.0, 0.5))]
    assert (kind["token_share"], kind["score"]) == pytest.approx((0.4, 0.75))
    assert kind["area"] == pytest.approx(area_above_chord(kind["curve"], 0.25, 0.5))
    # One kind per task: the kind oracle is routing by task, ordered; untagged data has none.
    by_task = routing_report(routing_inputs(PER_TASK, tags=["x"] * 4), sweep, None, None)["kind_oracle"]
    assert by_task["curve"] == [pytest.approx((0.4, 0.75)), pytest.approx((1.0, 0.5))]
    assert routing_report(routing_inputs(PER_TASK, tags=[""] * 4), sweep, None, None)["kind_oracle"] is None
    assert routing_report(routing_inputs(PER_TASK), sweep, None, None)["kind_oracle"] is None
