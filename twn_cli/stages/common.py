"""What the stages share: the record a stage leaves in a checkpoint's history, and no-think embeddings
of a prepared dataset's candidates."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import datasets
import torch

from twn_cli.data.prepared import PreparedDataset, prepared_input
from twn_cli.engine.model import TWNModel
from twn_cli.errors import TWNError


def stage_record(stage: str, dataset: PreparedDataset, config, **sources: str | Path | None) -> dict:
    """What a stage adds to the `stages` history of the checkpoint it writes: its name, the data and the
    other files it read (absolute), its settings (a dataclass) and when it started."""
    return {
        "stage": stage,
        "data": str(Path(dataset.path).resolve()),
        **{name: str(Path(path).resolve()) if path is not None else None for name, path in sources.items()},
        "arguments": asdict(config),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


class CandidateEmbedder:
    """No-think embeddings of a prepared dataset's candidates, by id, `batch_size` at a time (on the CPU, in the model's dtype)."""

    def __init__(self, model: TWNModel, candidates: datasets.Dataset, batch_size: int):
        self.model = model
        self.candidates = candidates
        self.index = {candidate_id: i for i, candidate_id in enumerate(candidates["id"])}
        self.batch_size = batch_size

    def __call__(self, ids: Sequence[str]):
        unknown = next((item for item in ids if item not in self.index), None)
        if unknown is not None:
            raise TWNError(f"candidate '{unknown}' is not among the prepared dataset's candidates")
        parts = []
        with torch.no_grad():
            for start in range(0, len(ids), self.batch_size):
                inputs = [prepared_input(self.candidates[self.index[i]]) for i in ids[start : start + self.batch_size]]
                parts.append(self.model.embed(inputs).embeddings.cpu())
        return torch.cat(parts)

    def shared_by(self, distributed, ids: Sequence[str]):
        """What `self(ids)` gives, each process (a `twn_cli.distributed.Distributed`) embedding its share of
        blocks of eight batches; the batches are those of one process, so the embeddings are too."""
        block = self.batch_size * 8
        blocks = [ids[start : start + block] for start in range(0, len(ids), block)]
        return torch.cat(list(distributed.map_in_order(self, blocks, prepare=lambda ids: ids)))
