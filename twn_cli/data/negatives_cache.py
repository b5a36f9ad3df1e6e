"""The global negatives cache: `twn embed` output over a candidate pool, read by train-gate and train-rl.

Validated before any use: embedding size against the checkpoint's, unique ids, finite values; a .pt file
is read with weights_only=True, so a pickle that carries code is refused.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from twn_cli.data.embedding_files import read_embeddings
from twn_cli.errors import TWNError


@dataclass
class NegativesCache:
    ids: list[str]
    embeddings: torch.Tensor  # [N, d], float32, L2-normalised as `twn embed` writes them
    path: Path | None = None  # the file it was read from
    row_of: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self):
        self.row_of = {item: row for row, item in enumerate(self.ids)}

    def digest(self) -> str:
        """SHA-256 of the ids and embeddings: what results computed against this cache depend on."""
        digest = hashlib.sha256("\n".join(self.ids).encode())
        digest.update(self.embeddings.contiguous().numpy().tobytes())
        return digest.hexdigest()

    def hardest_scores(self, queries: torch.Tensor, positive_ids: list[set[str]]) -> torch.Tensor:
        """Each query's highest similarity to an entry that is not one of its own positives (nor their copies,
        given `PreparedDataset.with_copies`)."""
        scores = queries.float() @ self.embeddings.T
        for row, positives in enumerate(positive_ids):
            own = [self.row_of[item] for item in positives if item in self.row_of]
            scores[row, own] = float("-inf")
        return scores.max(1).values


def load_negatives_cache(path: str | Path, expected_dim: int) -> NegativesCache:
    """The global negatives cache (`twn embed` output, .pt or .safetensors), checked before any training."""
    path = Path(path)
    if path.suffix not in (".pt", ".safetensors"):
        raise TWNError(f"negatives cache '{path}' must be a .pt or .safetensors file written by `twn embed`")
    try:
        # .pt files are read with weights_only=True there: a pickle that carries code is refused.
        ids, embeddings, _ = read_embeddings(path)
    except (KeyError, AttributeError, TypeError):
        raise TWNError(f"negatives cache '{path}' holds no 'ids' and 'embeddings' (write it with `twn embed DATA -o cache.pt`)") from None
    if embeddings.ndim != 2 or len(ids) != embeddings.shape[0]:
        raise TWNError(f"negatives cache '{path}': {len(ids)} ids for embeddings of shape {tuple(embeddings.shape)}")
    if embeddings.shape[1] != expected_dim:
        raise TWNError(f"negatives cache '{path}' has {embeddings.shape[1]}-dimensional embeddings, the checkpoint makes {expected_dim}")
    if len(set(ids)) != len(ids):
        duplicate = next(item for item in ids if ids.count(item) > 1)
        raise TWNError(f"negatives cache '{path}' holds id '{duplicate}' more than once")
    if not bool(torch.isfinite(embeddings).all()):
        raise TWNError(f"negatives cache '{path}' holds non-finite values (NaN or inf)")
    if not ids:
        raise TWNError(f"negatives cache '{path}' is empty")
    return NegativesCache([str(item) for item in ids], embeddings, path)
