"""Explicit position ids for every forward pass.

The engine appends CoT tokens and query tokens to cached prefixes whose rows have different lengths and,
after decoding, masked holes. Positions therefore cannot be inferred from cache length: each row carries its
own next position. Qwen-VL backbones use multimodal RoPE (3 position axes, image tokens laid out on a grid,
a video's temporal patches along the first axis) and keep `rope_deltas` as state between calls; passing
positions explicitly also keeps that state out of the way.
"""

from __future__ import annotations

import torch


class PositionScheme:
    """Positions for one backbone: 3-axis M-RoPE if the backbone has `get_rope_index`, 1-D otherwise."""

    def __init__(self, model):
        inner = getattr(model, "model", model)
        self._rope_index = getattr(inner, "get_rope_index", None)

    @property
    def axes(self) -> int | None:
        return 3 if self._rope_index is not None else None

    def prompt_positions(self, encoded: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions of a left-padded batch of prompts, and each row's next free position."""
        mask = encoded["attention_mask"]
        has_vision = encoded.get("image_grid_thw") is not None or encoded.get("video_grid_thw") is not None
        if self._rope_index is not None and has_vision:
            positions, _ = self._rope_index(
                encoded["input_ids"],
                mm_token_type_ids=encoded["mm_token_type_ids"],
                image_grid_thw=encoded.get("image_grid_thw"),
                video_grid_thw=encoded.get("video_grid_thw"),
                # Qwen2.5-VL spaces a video's temporal positions by the seconds between its temporal patches.
                second_per_grid_ts=encoded.get("second_per_grid_ts"),
                attention_mask=mask,
            )
            next_position = positions.amax(dim=(0, 2)) + 1
            return positions, next_position
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        next_position = positions.amax(dim=-1) + 1
        return self._spread(positions), next_position

    def text_positions(self, start: torch.Tensor, length: int) -> torch.Tensor:
        """Positions of `length` text tokens that follow each row's `start` position."""
        return self.offset_positions(start, torch.arange(length, device=start.device)[None])

    def offset_positions(self, start: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Positions of text tokens at `offsets` [rows, length] after each row's `start` position."""
        return self._spread(start[:, None] + offsets)

    def _spread(self, positions: torch.Tensor) -> torch.Tensor:
        if self.axes is None:
            return positions
        return positions[None].expand(self.axes, -1, -1)
