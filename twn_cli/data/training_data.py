"""Training examples from a prepared dataset: queries with their target, hard negatives and teacher CoT,
in a seeded order that a resumed run reproduces (train-embed and train-rl read the same)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from twn_cli.data.prepared import PreparedDataset, prepared_input
from twn_cli.errors import TWNError
from twn_cli.types import ModelInput


@dataclass
class Example:
    """One query of a batch with its target, hard negatives and teacher CoT, images opened."""

    query: ModelInput
    cot: str | None
    target_id: str
    target: ModelInput
    negative_ids: list[str]
    negatives: list[ModelInput]
    positive_ids: set[str]  # its positives and their copies (PreparedDataset.with_copies): never its negatives


class TrainingData:
    """Batches of examples from a prepared dataset, in a seeded order that a resumed run reproduces."""

    def __init__(self, dataset: PreparedDataset, split: str, hard_negatives: int, seed: int):
        if split not in dataset.queries:
            raise TWNError(f"prepared dataset '{dataset.path}' has no '{split}' split (it has {', '.join(dataset.queries)})")
        self.dataset = dataset
        self.rows = dataset.queries[split]
        self.candidates = dataset.candidates
        self.candidate_index = {candidate_id: index for index, candidate_id in enumerate(dataset.candidates["id"])}
        self.hard_negatives = hard_negatives
        self.seed = seed

    def __len__(self) -> int:
        return len(self.rows)

    def batch_indices(self, step: int, batch_size: int) -> list[int]:
        """The query indices of global batch `step` (0-based): epochs of seeded permutations, end to end."""
        count = len(self.rows)
        indices = []
        for position in range(step * batch_size, (step + 1) * batch_size):
            epoch, offset = divmod(position, count)
            order = torch.randperm(count, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
            indices.append(int(order[offset]))
        return indices

    def examples(self, indices: list[int], step: int) -> list[Example]:
        rng = random.Random(f"{self.seed}/{step}")
        return [self._example(self.rows[index], rng) for index in indices]

    def _example(self, row: dict, rng: random.Random) -> Example:
        positives = self.dataset.with_copies(row["positive_ids"])
        negative_ids = list(row["negative_ids"])[: self.hard_negatives]
        while len(negative_ids) < self.hard_negatives:
            # Topped up with random candidates so every query brings as many negatives (equal shapes across processes).
            candidate_id = self.candidates[rng.randrange(len(self.candidates))]["id"]
            if candidate_id not in positives:
                negative_ids.append(candidate_id)
        target_id = row["positive_ids"][0]
        return Example(
            query=prepared_input(row),
            cot=row["cot"] or None,
            target_id=target_id,
            target=self._candidate_input(target_id),
            negative_ids=negative_ids,
            negatives=[self._candidate_input(candidate_id) for candidate_id in negative_ids],
            positive_ids=positives,
        )

    def _candidate_input(self, candidate_id: str) -> ModelInput:
        return prepared_input(self.candidates[self.candidate_index[candidate_id]])
