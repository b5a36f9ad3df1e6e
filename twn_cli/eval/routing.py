"""What routing buys: the gate's quality per reasoning token against random, task-level and oracle routing.

Every curve is the overall score (the mean over tasks of each task's headline metric, as the report's)
against the share of always-think's reasoning tokens spent, on the same queries and the same two views of
each (its no-think and its think embedding):

- random routing: thinking on a random share r of the queries is expected to score never + r·(always -
  never) and to spend r of the tokens: the chord from never to always, exact by linearity;
- the gate: the sweep's thresholds;
- task-level routing: think exactly for the tasks in which always beat never on validation (train-gate
  records them), one point;
- the per-input oracle: think exactly where it helps; as a curve, the inputs added in order of gain per
  token (the best routing for every budget), through the point where every helpful input thinks;
- the kind oracle, where the data tags its queries (the toy world's difficulty): think for whole kinds
  (task and tag), added in order of their gain per token on these very queries. No router that reads only
  an input's kind can do better; the per-input oracle also knows which inputs of a kind the CoT will
  rescue, which an input's prompt alone cannot tell.
The area between a curve and the chord over the token share [0, 1] says how much better than a coin it
routes; the oracle's area is the most any router can reach.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

# The oracle curve in the report keeps about this many points (its area is computed on every input).
ORACLE_POINTS = 50


@dataclass
class RoutingInputs:
    """Per query: its task, its weight in the overall score, both views' headline scores, its CoT's tokens."""

    tasks: list[str]
    weights: torch.Tensor
    never: torch.Tensor
    think: torch.Tensor
    tokens: torch.Tensor
    tags: list[str] | None = None  # each query's analysis tag (None: the data has none)

    @property
    def never_score(self) -> float:
        return float((self.weights * self.never).sum())

    @property
    def always_score(self) -> float:
        return float((self.weights * self.think).sum())

    def point(self, thinking: torch.Tensor) -> tuple[float, float]:
        """(share of always-think's tokens, overall score) when the queries in `thinking` think."""
        total = float(self.tokens.sum())
        share = float(self.tokens[thinking].sum()) / total if total > 0 else float(thinking.double().mean())
        return share, float((self.weights * torch.where(thinking, self.think, self.never)).sum())


def routing_inputs(per_task: Mapping[str, tuple[Sequence[float], Sequence[float], Sequence[int]]], tags: Sequence[str] | None = None) -> RoutingInputs:
    """From each task's per-query (never score, think score, reasoning tokens); every task weighs alike.
    `tags`: every query's analysis tag, in the same order (none, or all empty: untagged)."""
    tasks, weights, never, think, tokens = [], [], [], [], []
    for name, (task_never, task_think, task_tokens) in per_task.items():
        count = len(task_never)
        tasks += [name] * count
        weights += [1.0 / (len(per_task) * count)] * count
        never += list(task_never)
        think += list(task_think)
        tokens += list(task_tokens)
    return RoutingInputs(tasks, torch.tensor(weights, dtype=torch.float64), torch.tensor(never, dtype=torch.float64),
                         torch.tensor(think, dtype=torch.float64), torch.tensor(tokens, dtype=torch.float64),
                         list(tags) if tags is not None and any(tags) else None)


def area_above_chord(points: Sequence[tuple[float, float]], never: float, always: float) -> float:
    """∫ over the token share [0, 1] of (curve - chord), the curve being the polyline through (0, never),
    `points` in order of share, and (1, always)."""
    curve = sorted([(0.0, never), *points, (1.0, always)])
    above = [(x, y - (never + x * (always - never))) for x, y in curve]
    return sum((x1 - x0) * (d0 + d1) / 2 for (x0, d0), (x1, d1) in zip(above, above[1:]))


def value_at(points: Sequence[tuple[float, float]], share: float, never: float, always: float) -> float:
    """The curve's score at `share` of the tokens (linear between its points, with the ends at never and always)."""
    curve = sorted([(0.0, never), *points, (1.0, always)])
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if x0 <= share <= x1:
            return y0 if x1 == x0 else y0 + (share - x0) / (x1 - x0) * (y1 - y0)
    return always


def oracle_curve(inputs: RoutingInputs) -> list[tuple[float, float]]:
    """(share, score) after each input, in order of weighted gain per token: first those with the most gain for
    their tokens, then the inputs that gain nothing, then those that lose the least per token."""
    gain = inputs.weights * (inputs.think - inputs.never)
    return _in_order_of_gain_per_token(gain, inputs.tokens, inputs)


def kind_oracle_curve(inputs: RoutingInputs) -> list[tuple[float, float]]:
    """(share, score) after each kind (task and tag), in order of the kind's weighted gain per token."""
    kinds: dict[tuple[str, str], int] = {}
    kind_of = torch.tensor([kinds.setdefault(kind, len(kinds)) for kind in zip(inputs.tasks, inputs.tags or [""] * len(inputs.tasks))])
    gain = inputs.weights * (inputs.think - inputs.never)
    per_kind = [torch.zeros(len(kinds), dtype=torch.float64).index_add_(0, kind_of, values) for values in (gain, inputs.tokens)]
    return _in_order_of_gain_per_token(*per_kind, inputs)


def _in_order_of_gain_per_token(gain: torch.Tensor, tokens: torch.Tensor, inputs: RoutingInputs) -> list[tuple[float, float]]:
    """(share of all of `inputs`' tokens, score) after each part (an input or a kind) of weighted `gain` and
    `tokens`, taken in order of gain per token; a part without tokens first if it gains, last if it loses."""
    unbounded = torch.where(gain == 0, 0.0, gain.sign() * float("inf"))
    per_token = torch.where(tokens > 0, gain / tokens.clamp(min=1), unbounded)
    order = torch.argsort(per_token, descending=True, stable=True)
    total = float(inputs.tokens.sum()) or 1.0
    shares = torch.cumsum(tokens[order], 0) / total
    scores = inputs.never_score + torch.cumsum(gain[order], 0)
    return list(zip(shares.tolist(), scores.tolist()))


def _thinned(curve: list[tuple[float, float]], count: int) -> list[tuple[float, float]]:
    if len(curve) <= count:
        return curve
    best = max(range(len(curve)), key=lambda index: curve[index][1])
    keep = {round(step * (len(curve) - 1) / (count - 1)) for step in range(count)} | {best}
    return [curve[index] for index in sorted(keep)]


def routing_report(inputs: RoutingInputs, sweep: Sequence[dict], chosen_threshold: float | None, think_tasks: Sequence[str] | None) -> dict:
    """The four routings on these inputs: points, areas above the chord, and the comparisons at the chosen τ.

    `sweep`: the eval sweep's points (never, the gate's thresholds, always), each with its overall score,
    think rate and reasoning tokens per query; `think_tasks`: the tasks task-level routing thinks for (None:
    the checkpoint does not say, so that routing is left out).
    """
    never, always = inputs.never_score, inputs.always_score
    always_tokens = next(point for point in sweep if point["mode"] == "always")["overall"]["reasoning_tokens_per_query"]
    gate = []
    for point in sweep:
        if point["mode"] != "adaptive":
            continue
        share = point["overall"]["reasoning_tokens_per_query"] / always_tokens if always_tokens > 0 else point["overall"]["think_rate"]
        rate, score = point["overall"]["think_rate"], point["overall"]["score"]
        gate.append({
            "threshold": point["threshold"], "think_rate": rate, "token_share": share, "score": score,
            "random_at_think_rate": never + rate * (always - never), "chord_at_token_share": never + share * (always - never),
            "above_chord": score > never + share * (always - never),
        })
    gate_curve = [(entry["token_share"], entry["score"]) for entry in gate]
    oracle = oracle_curve(inputs)
    helps = inputs.think > inputs.never
    oracle_share, oracle_score = inputs.point(helps)
    report = {
        "never": never,
        "always": always,
        "gate": {"points": gate, "area": area_above_chord(gate_curve, never, always)},
        "oracle": {
            "think_rate": float(helps.double().mean()), "token_share": oracle_share, "score": oracle_score,
            "curve": _thinned(oracle, ORACLE_POINTS), "area": area_above_chord(oracle, never, always),
        },
        "task_level": None,
        "kind_oracle": None,
    }
    report["gate"]["share_of_oracle_area"] = report["gate"]["area"] / report["oracle"]["area"] if report["oracle"]["area"] > 0 else None
    if think_tasks is not None:
        thinking = torch.tensor([task in set(think_tasks) for task in inputs.tasks])
        share, score = inputs.point(thinking)
        report["task_level"] = {
            "tasks": sorted(set(think_tasks) & set(inputs.tasks)), "think_rate": float(thinking.double().mean()),
            "token_share": share, "score": score, "area": area_above_chord([(share, score)], never, always),
        }
    if inputs.tags is not None:
        kind_curve = kind_oracle_curve(inputs)
        best = max(kind_curve, key=lambda point: point[1])
        report["kind_oracle"] = {"token_share": best[0], "score": best[1], "curve": kind_curve, "area": area_above_chord(kind_curve, never, always)}
    chosen = next((entry for entry in gate if entry["threshold"] == chosen_threshold), None)
    if chosen is not None:
        report["chosen"] = {
            **chosen,
            "task_level_at_token_share": value_at([(report["task_level"]["token_share"], report["task_level"]["score"])], chosen["token_share"], never, always)
            if report["task_level"] else None,
        }
    return report
