"""The `embed` stage: inputs -> batches -> shared-prefill embeddings (thinking never, always or by gate) -> file."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice

import torch

from twn_cli.data.embedding_files import EmbeddingBatch, EmbeddingWriter
from twn_cli.data.inputs import InputRecord, load_block
from twn_cli.distributed import Distributed, batched
from twn_cli.engine.batching import block_size, embed_block
from twn_cli.engine.config import ThinkMode
from twn_cli.engine.decoding import Sampling
from twn_cli.engine.model import TWNModel
from twn_cli.errors import BadRecordError, TWNError
from twn_cli.recipes import NOT_NEGATIVE, SHARE
from twn_cli.types import ModelInput

log = logging.getLogger(__name__)


@dataclass
class EmbedSettings:
    think: ThinkMode = "never"
    threshold: float | None = None
    batch_size: int = 16
    skip_bad: bool = False
    sampling: Sampling = field(default_factory=Sampling)

    def __post_init__(self):
        if self.threshold is not None and not math.isfinite(self.threshold):
            raise TWNError(f"--threshold must be a finite number, not {self.threshold}")
        if not NOT_NEGATIVE.holds(self.sampling.temperature):
            raise TWNError(f"--temperature must be {NOT_NEGATIVE}, not {self.sampling.temperature}")
        if not SHARE.holds(self.sampling.top_p):
            raise TWNError(f"--top-p must be {SHARE}, not {self.sampling.top_p}")


@dataclass
class EmbedSummary:
    embedded: int = 0
    thought: int = 0
    reasoning_tokens: int = 0
    skipped: list[BadRecordError] = field(default_factory=list)
    truncated: int = 0  # texts cut to fit the backbone's positions (`Prompts.user_text`)


def run_embed(
    model: TWNModel,
    records: Iterable[InputRecord],
    writer: EmbeddingWriter | None,
    settings: EmbedSettings,
    on_batch: Callable[[int], None] = lambda count: None,
) -> EmbedSummary:
    """Embed every record into `writer`; a bad record stops the run unless `skip_bad` (then it is reported).

    Each process opens the images of its next blocks in a background thread while its model works. Under
    several processes each one embeds its share of the blocks of records (`engine.batching.block_size`), and
    every process receives every block in input order and counts it, so all return the same summary; only the
    first holds a writer (the others pass None). On any failure the writer's partial output is dropped (a
    parquet output keeps its finished parts). A writer that resumes has its records skipped here.
    """
    distributed = Distributed()
    summary = EmbedSummary()
    done_before, last_done = distributed.gather_objects([(writer.records_done, writer.last_record) if writer is not None else (0, None)])[0]
    records = skip_done_records(iter(records), done_before, last_done)

    def load(block: tuple[InputRecord, ...]) -> tuple[list[str], list[ModelInput], list[BadRecordError], int, str]:
        skipped: list[BadRecordError] = []
        ids, inputs = load_block(block, settings.skip_bad, skipped)
        return ids, inputs, skipped, len(block), block[-1].id

    def embed_loaded(loaded: tuple[list[str], list[ModelInput], list[BadRecordError], int, str]) -> tuple[EmbeddingBatch, list[BadRecordError], int, str, int]:
        ids, inputs, skipped, records_in_block, last_record = loaded
        if not ids:
            return EmbeddingBatch([], torch.empty(0, model.embedding_dim), [], [], [], []), skipped, records_in_block, last_record, 0
        truncated_before = model.prompts.user_text.truncated
        result = embed_block(model, inputs, settings.think, settings.batch_size, settings.threshold, settings.sampling)
        batch = EmbeddingBatch(
            ids=ids,
            embeddings=result.embeddings.cpu(),
            think=result.think.tolist(),
            p_think=result.p_think.tolist(),
            cot=result.cot,
            reasoning_tokens=result.reasoning_tokens,
        )
        return batch, skipped, records_in_block, last_record, model.prompts.user_text.truncated - truncated_before

    try:
        blocks = batched(records, block_size(settings.batch_size))
        for batch, skipped, records_in_block, last_record, truncated in distributed.map_in_order(embed_loaded, blocks, prepare=load):
            summary.skipped += skipped
            summary.truncated += truncated
            if writer is not None:
                reasons = [{"record": error.record, "reason": error.reason} for error in skipped]
                writer.add(batch, records_in_block, reasons, last_record, truncated)
            summary.embedded += len(batch.ids)
            summary.thought += sum(batch.think)
            summary.reasoning_tokens += sum(batch.reasoning_tokens)
            if batch.ids:
                on_batch(len(batch.ids))
        if writer is not None:
            writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return summary


def skip_done_records(records: Iterator[InputRecord], count: int, last_id: str | None) -> Iterator[InputRecord]:
    """`records` after the first `count`, which an interrupted run did, the last of them `last_id`."""
    consumed, last = 0, None
    for consumed, last in enumerate(islice(records, count), start=1):  # noqa: B007 (both are read after the loop)
        pass
    if consumed < count or (count and last.id != last_id):
        found = f"only {consumed} records" if consumed < count else f"'{last.id}' there"
        raise TWNError(f"cannot resume: the interrupted run's record {count} was '{last_id}', the inputs now have {found}: they changed")
    return records


