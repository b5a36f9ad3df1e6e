"""Prompts and token blocks: an input as the backbone's chat prompt, and the think markers around a CoT."""

from __future__ import annotations

import torch

from twn_cli.engine.backbone import Backbone
from twn_cli.engine.config import TWNConfig
from twn_cli.engine.processors import process, vision_token_count
from twn_cli.engine.user_text import UserText
from twn_cli.types import ModelInput


class Prompts:
    """Builds and tokenises the prompts of one model, and the token blocks of its CoTs."""

    def __init__(self, backbone: Backbone, config: TWNConfig):
        self.backbone = backbone
        self.config = config
        self.tokenizer = backbone.tokenizer
        self.tokenizer.padding_side = "left"
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.think_start_ids = self.tokenizer.encode(config.think_start, add_special_tokens=False)
        self.think_end_ids = self.tokenizer.encode(config.think_end, add_special_tokens=False)
        eos = backbone.model.config.get_text_config(decoder=True).eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        text_config = backbone.model.config.get_text_config(decoder=True)
        self.user_text = UserText(self.tokenizer, getattr(text_config, "max_position_embeddings", None), (config.think_start, config.think_end))

    # ----------------------------------------------------------------- prompts
    def encode(self, inputs: list[ModelInput]) -> dict:
        """Tokenise a batch of inputs into left-padded prompts (with image and video placeholders) on the device."""
        prompts = [self._prompt(item) for item in inputs]
        images = [image for item in inputs for image in item.images]
        videos = [item.video for item in inputs if item.video is not None]
        encoded = process(self.backbone.processor, prompts, images, videos)
        encoded = {key: value.to(self.backbone.device) for key, value in encoded.items()}
        for key in ("pixel_values", "pixel_values_videos"):
            if key in encoded:
                encoded[key] = encoded[key].to(self.backbone.dtype)
        return encoded

    def prompt_length(self, item: ModelInput) -> int:
        """About how many tokens `item`'s prompt holds: its text and instruction, and its images' and video's placeholders.

        Counted without building the prompt or processing the pictures (`processors.vision_token_count`, from
        their sizes); the chat template's few tokens are left out.
        """
        instruction = item.instruction if item.instruction is not None else self.config.default_instruction
        length = len(self.tokenizer(f"{instruction} {item.text}", add_special_tokens=False)["input_ids"])
        return length + vision_token_count(self.backbone.processor, item.images, item.video)

    def _prompt(self, item: ModelInput) -> str:
        instruction = item.instruction if item.instruction is not None else self.config.default_instruction
        text = self.user_text("\n".join(part for part in (instruction, item.text) if part), self.config.max_think_tokens + self.config.num_queries)
        content = [{"type": "image"} for _ in item.images] + [{"type": "video"}] * (item.video is not None)
        content.append({"type": "text", "text": text})
        messages = [{"role": "user", "content": content}]
        if self.config.system_prompt is not None:
            messages.insert(0, {"role": "system", "content": self.config.system_prompt})
        return self.backbone.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    # ----------------------------------------------------------------- CoT tokens
    def cot_token_ids(self, cots: list[str]) -> list[list[int]]:
        """Token ids of CoT texts, as the reasoning adapter writes them (between the think markers)."""
        return [self.tokenizer.encode(cot, add_special_tokens=False) for cot in cots]

    def think_block(self, cot_ids: list[int]) -> list[int]:
        """A CoT between its markers, as it stands in the sequence."""
        return self.think_start_ids + list(cot_ids) + self.think_end_ids

    def ends_with_marker(self, ids: list[int]) -> bool:
        return ids[-len(self.think_end_ids):] == self.think_end_ids

    def strip_end_marker(self, ids: list[int]) -> list[int]:
        """The CoT tokens of a decoded thought, without end marker or end-of-sequence."""
        if self.ends_with_marker(ids):
            ids = ids[: -len(self.think_end_ids)]
        return [token for token in ids if token not in self.eos_ids]

    def cot_text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(self.strip_end_marker(ids), skip_special_tokens=True).strip()


def append_tokens(encoded: dict, suffixes: list[list[int]], pad_id: int) -> dict:
    """`encoded` with each row's prompt followed by its own suffix tokens, left-padded again."""
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    token_types = encoded.get("mm_token_type_ids")
    lengths = mask.sum(1).tolist()
    width = max(length + len(suffix) for length, suffix in zip(lengths, suffixes))
    new_ids = ids.new_full((len(suffixes), width), pad_id)
    new_mask = mask.new_zeros((len(suffixes), width))
    new_types = token_types.new_zeros((len(suffixes), width)) if token_types is not None else None
    for row, (length, suffix) in enumerate(zip(lengths, suffixes)):
        prompt = mask[row].bool()
        start = width - length - len(suffix)
        new_ids[row, start : start + length] = ids[row, prompt]
        new_ids[row, start + length :] = torch.tensor(suffix, dtype=ids.dtype, device=ids.device)
        new_mask[row, start:] = 1
        if new_types is not None:
            new_types[row, start : start + length] = token_types[row, prompt]
    appended = {**encoded, "input_ids": new_ids, "attention_mask": new_mask}
    if new_types is not None:
        appended["mm_token_type_ids"] = new_types
    return appended


def right_aligned(blocks: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token blocks of different lengths as one [rows, longest] batch, each block at the right end of its
    row (ids, and a mask of the real tokens); so column -1 is every block's last token."""
    width = max(len(block) for block in blocks)
    ids = torch.full((len(blocks), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(blocks), width), dtype=torch.long, device=device)
    for row, block in enumerate(blocks):
        if block:
            ids[row, width - len(block) :] = torch.tensor(block, device=device)
            mask[row, width - len(block) :] = 1
    return ids, mask
