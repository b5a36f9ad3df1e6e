"""The `route` stage: the gate's decision for each input, from the prefill alone (nothing is decoded)."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable
from typing import TextIO

from twn_cli.data.inputs import InputRecord, loaded_batches
from twn_cli.engine.gate import thinks
from twn_cli.engine.model import TWNModel
from twn_cli.errors import BadRecordError, TWNError

log = logging.getLogger(__name__)


def run_route(
    model: TWNModel,
    records: Iterable[InputRecord],
    output: TextIO,
    *,
    threshold: float,
    batch_size: int,
    skip_bad: bool,
    on_batch: Callable[[int], None] = lambda count: None,
) -> tuple[int, int, list[BadRecordError]]:
    """Write one JSON line per input (id, p_think, think); returns (routed, thinking, skipped)."""
    if not math.isfinite(threshold):
        raise TWNError(f"--threshold must be a finite number, not {threshold}")
    routed = thinking = 0
    skipped: list[BadRecordError] = []
    for ids, inputs in loaded_batches(records, batch_size, skip_bad, skipped):
        probabilities = model.think_probability(inputs)
        for record_id, probability, think in zip(ids, probabilities.tolist(), thinks(probabilities, threshold).tolist()):
            output.write(json.dumps({"id": record_id, "p_think": round(probability, 6), "think": think}) + "\n")
            thinking += think
        output.flush()
        routed += len(ids)
        on_batch(len(ids))
    return routed, thinking, skipped
