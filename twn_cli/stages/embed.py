"""The `embed` stage: inputs -> batches -> shared-prefill embeddings (thinking never, always or by gate) -> file."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from twn_cli.data.embedding_files import EmbeddingBatch, EmbeddingWriter
from twn_cli.data.inputs import InputRecord
from twn_cli.engine.model import ModelInput, Sampling, ThinkMode, TWNModel
from twn_cli.errors import BadRecordError

log = logging.getLogger(__name__)


@dataclass
class EmbedSettings:
    think: ThinkMode = "never"
    threshold: float | None = None
    batch_size: int = 16
    skip_bad: bool = False
    sampling: Sampling = field(default_factory=Sampling)


@dataclass
class EmbedSummary:
    embedded: int = 0
    thought: int = 0
    reasoning_tokens: int = 0
    skipped: list[BadRecordError] = field(default_factory=list)


def run_embed(
    model: TWNModel,
    records: Iterable[InputRecord],
    writer: EmbeddingWriter,
    settings: EmbedSettings,
    on_batch: Callable[[int], None] = lambda count: None,
) -> EmbedSummary:
    """Embed every record into `writer`; a bad record stops the run unless `skip_bad` (then it is reported).

    On any failure the writer's partial output is dropped.
    """
    summary = EmbedSummary()
    try:
        for ids, inputs in loaded_batches(records, settings.batch_size, settings.skip_bad, summary.skipped):
            result = model.embed(inputs, think=settings.think, threshold=settings.threshold, sampling=settings.sampling)
            writer.add(
                EmbeddingBatch(
                    ids=ids,
                    embeddings=result.embeddings.cpu(),
                    think=result.think.tolist(),
                    p_think=result.p_think.tolist(),
                    cot=result.cot,
                    reasoning_tokens=result.reasoning_tokens,
                )
            )
            summary.embedded += len(ids)
            summary.thought += int(result.think.sum())
            summary.reasoning_tokens += sum(result.reasoning_tokens)
            on_batch(len(ids))
        writer.metadata["skipped"] = [{"record": error.record, "reason": error.reason} for error in summary.skipped]
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return summary


def loaded_batches(
    records: Iterable[InputRecord], batch_size: int, skip_bad: bool, skipped: list[BadRecordError]
) -> Iterator[tuple[list[str], list[ModelInput]]]:
    """Batches of (ids, loaded inputs); a bad record raises, or with `skip_bad` is logged and added to `skipped`."""
    ids: list[str] = []
    inputs: list[ModelInput] = []
    for record in records:
        try:
            loaded = record.load()
        except BadRecordError as error:
            if not skip_bad:
                raise
            log.warning("skipped %s", error)
            skipped.append(error)
            continue
        ids.append(record.id)
        inputs.append(loaded)
        if len(ids) == batch_size:
            yield ids, inputs
            ids, inputs = [], []
    if ids:
        yield ids, inputs
