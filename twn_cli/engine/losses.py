"""Training objectives shared by the stages."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(
    queries: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    hard_negatives: torch.Tensor | None = None,
) -> torch.Tensor:
    """InfoNCE of L2-normalised `queries` [B, d] against their `targets` [B, d] (row i is query i's positive).

    Every other target in the batch is a negative, and so is every row of `hard_negatives` [M, d].
    """
    candidates = targets if hard_negatives is None else torch.cat([targets, hard_negatives])
    logits = queries @ candidates.T / temperature
    return F.cross_entropy(logits, torch.arange(len(queries), device=queries.device))
