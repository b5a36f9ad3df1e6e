"""Cached prefixes: a transformers KV cache with, per row, which positions are attended and the next position.

Rows have different lengths and, after decoding, masked holes, so positions are carried explicitly rather
than read from the cache length. The helpers copy a cache: detached (the interface between the adapters),
sharing the tensors (a pass that appends must not extend the original), by rows, and joined.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache


def _layers(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(keys, values) for keys, values, *_ in cache]


def detached_copy(cache: DynamicCache) -> DynamicCache:
    """A cache holding the same keys and values, cut from the autograd graph (the tensors are not copied)."""
    return DynamicCache(ddp_cache_data=[(keys.detach(), values.detach()) for keys, values in _layers(cache)])


def shared_copy(cache: DynamicCache) -> DynamicCache:
    """A cache holding the same keys and values, gradients included: appending to it leaves `cache` as it was."""
    return DynamicCache(ddp_cache_data=_layers(cache))


def select_rows(cache: DynamicCache, rows: torch.Tensor) -> DynamicCache:
    """A cache of only the batch rows `rows`, in that order."""
    return DynamicCache(ddp_cache_data=[(keys.index_select(0, rows), values.index_select(0, rows)) for keys, values in _layers(cache)])


def concatenate_left_padded(caches: list[DynamicCache]) -> DynamicCache:
    """The rows of several caches in one, each left-padded with zeros to the longest (mask those positions)."""
    layers = [_layers(cache) for cache in caches]
    length = max(layer_list[0][0].shape[2] for layer_list in layers)

    def padded(tensor: torch.Tensor) -> torch.Tensor:
        return F.pad(tensor, (0, 0, length - tensor.shape[2], 0))

    return DynamicCache(
        ddp_cache_data=[
            (torch.cat([padded(cache[layer][0]) for cache in layers]), torch.cat([padded(cache[layer][1]) for cache in layers]))
            for layer in range(len(layers[0]))
        ]
    )


def spliced(head: DynamicCache, tail: DynamicCache, start: int) -> DynamicCache:
    """Positions before `start` from `head` (gradients included), those from `start` on from `tail`, detached.

    An embedding-adapter prompt cache that InfoNCE trains, followed by a CoT's cache that it must not reach.
    """
    return DynamicCache(
        ddp_cache_data=[
            (torch.cat([head_keys[:, :, :start], keys[:, :, start:].detach()], 2), torch.cat([head_values[:, :, :start], values[:, :, start:].detach()], 2))
            for (head_keys, head_values), (keys, values) in zip(_layers(head), _layers(tail))
        ]
    )


@dataclass
class Prefix:
    """A cached prefix per row: KV cache, which cached positions are attended, and the next position."""

    cache: DynamicCache
    attention_mask: torch.Tensor
    next_position: torch.Tensor

    @property
    def rows(self) -> int:
        return self.attention_mask.shape[0]

    @property
    def length(self) -> int:
        return self.attention_mask.shape[1]

    def select(self, rows: torch.Tensor) -> Prefix:
        return Prefix(select_rows(self.cache, rows), self.attention_mask.index_select(0, rows), self.next_position.index_select(0, rows))

    def copy(self, detach: bool) -> Prefix:
        """The same prefix in a cache of its own (detached, or sharing the gradient), so that appending leaves this one as it is."""
        cache = detached_copy(self.cache) if detach else shared_copy(self.cache)
        return Prefix(cache, self.attention_mask, self.next_position.clone())

    @staticmethod
    def concatenate(prefixes: list[Prefix]) -> Prefix:
        """The rows of several prefixes in one batch; shorter ones are left-padded and the padding masked
        (positions are explicit, so padding moves none)."""
        if len(prefixes) == 1:
            return prefixes[0]
        length = max(prefix.length for prefix in prefixes)
        masks = [F.pad(prefix.attention_mask, (length - prefix.length, 0)) for prefix in prefixes]
        return Prefix(
            concatenate_left_padded([prefix.cache for prefix in prefixes]),
            torch.cat(masks),
            torch.cat([prefix.next_position for prefix in prefixes]),
        )
