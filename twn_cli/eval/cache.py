"""Per-task embedding cache of an evaluation, so that an interrupted run resumes without recomputing.

For each task, REPORT_DIR/cache/<task>/ holds `candidates.safetensors` and `queries.safetensors`. Each is
an `EmbeddingTable`: the embeddings of a fixed list of inputs in the views computed so far ("no_think",
"think"), which rows have each view, the gate's p_think (the same for both views: it reads the shared
prefill), the CoT and reasoning-token count of the think view, and the seconds each row's view took. A
query needs at most its two views whatever the mode, so never, always, adaptive and every threshold of a
sweep are all answered from these two. Files are replaced atomically; a table whose key (model, dataset,
task, input ids) differs from the run's is ignored and recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from twn_cli.atomic import atomic_file
from twn_cli.engine.identity import model_identity

log = logging.getLogger(__name__)

VIEWS = ("no_think", "think")


class EmbeddingTable:
    """Embeddings of `ids` in `views` (candidates: no_think only; queries: both), filled batch by batch."""

    def __init__(self, ids: list[str], dim: int, key: dict, views: tuple[str, ...] = VIEWS):
        count = len(ids)
        self.ids = ids
        self.key = key
        self.views = views
        self.embeddings = {view: torch.zeros(count, dim) for view in views}
        self.present = {view: torch.zeros(count, dtype=torch.bool) for view in views}
        self.seconds = {view: torch.zeros(count, dtype=torch.float64) for view in views}
        self.p_think = torch.full((count,), math.nan)
        self.reasoning_tokens = torch.zeros(count, dtype=torch.int64)
        self.cot = [""] * count

    def missing(self, view: str) -> list[int]:
        return (~self.present[view]).nonzero().flatten().tolist()

    def record(self, rows: Sequence[int], view_of_row: list[str], result, seconds: float) -> None:
        """Store one model batch (an EmbedResult for `rows`); its seconds are shared equally by its rows."""
        share = seconds / len(rows)
        for position, (row, view) in enumerate(zip(rows, view_of_row)):
            self.embeddings[view][row] = result.embeddings[position].float().cpu()
            self.present[view][row] = True
            self.seconds[view][row] = share
            self.p_think[row] = float(result.p_think[position])
            if view == "think":
                self.cot[row] = result.cot[position]
                self.reasoning_tokens[row] = result.reasoning_tokens[position]

    def save(self, path: Path) -> None:
        tensors = {"p_think": self.p_think, "reasoning_tokens": self.reasoning_tokens}
        for view in self.views:
            tensors[f"{view}.embeddings"] = self.embeddings[view]
            tensors[f"{view}.present"] = self.present[view]
            tensors[f"{view}.seconds"] = self.seconds[view]
        header = {"key": json.dumps(self.key), "ids": json.dumps(self.ids), "cot": json.dumps(self.cot)}
        with atomic_file(path) as staging:
            save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, staging, metadata=header)

    @classmethod
    def load_or_new(cls, path: Path, ids: list[str], dim: int, key: dict, views: tuple[str, ...] = VIEWS) -> EmbeddingTable:
        """The table saved at `path` if it was made for `key` and `ids`, else an empty one."""
        table = cls(ids, dim, key, views)
        if not path.is_file():
            return table
        try:
            with safe_open(str(path), framework="pt") as handle:
                header = handle.metadata() or {}
                if json.loads(header["key"]) != key or json.loads(header["ids"]) != ids:
                    log.warning("cache %s was made by another model or dataset: recomputing it", path)
                    return table
                for view in views:
                    table.embeddings[view] = handle.get_tensor(f"{view}.embeddings")
                    table.present[view] = handle.get_tensor(f"{view}.present")
                    table.seconds[view] = handle.get_tensor(f"{view}.seconds")
                table.p_think = handle.get_tensor("p_think")
                table.reasoning_tokens = handle.get_tensor("reasoning_tokens")
                table.cot = json.loads(header["cot"])
        except (OSError, KeyError, ValueError, RuntimeError) as error:  # safetensors raises several kinds
            log.warning("cache %s is unreadable (%s): recomputing it", path, error)
            return cls(ids, dim, key, views)
        return table


def task_cache_dir(cache_root: Path, task: str) -> Path:
    """A file-system-safe, collision-free directory name for a task name (which may hold '/')."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", task).strip("._") or "task"
    return cache_root / f"{readable}-{hashlib.sha256(task.encode()).hexdigest()[:8]}"


def model_key(model) -> dict:
    """What identifies the model's embeddings: its checkpoint files (or, for a fresh model, its weights) and settings."""
    if model.manifest is not None:
        identity = hashlib.sha256(json.dumps(model.manifest["files"], sort_keys=True).encode()).hexdigest()
    else:
        identity = model_identity(model)
    key = {"weights": identity, "config": model.config.to_dict(), "max_text_tokens": model.prompts.user_text.max_tokens}
    if any(model.backbone.pixels.values()):  # pictures bounded otherwise than the backbone bounds them
        key["pixels"] = model.backbone.pixels
    return key
