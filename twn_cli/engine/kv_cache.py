"""Copies of a transformers KV cache: detached (the interface between the adapters), row-selected, and joined."""

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


def concatenate_left_padded(caches: list[DynamicCache]) -> DynamicCache:
    """The rows of several caches in one, each left-padded with zeros to the longest (mask those positions)."""
    layers = [list(cache) for cache in caches]
    length = max(layer_list[0][0].shape[2] for layer_list in layers)

    def padded(tensor: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(tensor, (0, 0, length - tensor.shape[2], 0))

    return DynamicCache(
        ddp_cache_data=[
            (torch.cat([padded(cache[layer][0]) for cache in layers]), torch.cat([padded(cache[layer][1]) for cache in layers]))
            for layer in range(len(layers[0]))
        ]
    )
