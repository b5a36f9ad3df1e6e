"""Copies of a transformers KV cache: detached (the interface between the adapters) and row-selected."""

from __future__ import annotations

import torch
from transformers import DynamicCache


def detached_copy(cache: DynamicCache) -> DynamicCache:
    """A cache holding the same keys and values, cut from the autograd graph.

    The query pass appends to its own copy, so the original (shared by the think and no-think views) is
    never extended; the tensors themselves are not copied.
    """
    return DynamicCache(ddp_cache_data=[(keys.detach(), values.detach()) for keys, values, *_ in cache])


def select_rows(cache: DynamicCache, rows: torch.Tensor) -> DynamicCache:
    """A cache of only the batch rows `rows`, in that order."""
    return DynamicCache(
        ddp_cache_data=[(keys.index_select(0, rows), values.index_select(0, rows)) for keys, values, *_ in cache]
    )
