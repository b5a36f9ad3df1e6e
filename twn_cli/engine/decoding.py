"""Decoding a CoT with the reasoning adapter: batched, bounded, each row ending at the end marker."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from twn_cli.engine.kv_cache import Prefix

if TYPE_CHECKING:
    from twn_cli.engine.model import TWNModel


@dataclass
class Sampling:
    """How CoTs are decoded: greedy when temperature is 0."""

    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int | None = None
    generator: torch.Generator | None = None
    # False: run all max_new_tokens decode steps even once every row has ended (the same CoTs), so that
    # processes sharing a sharded backbone run the same layer calls whatever their rows decode.
    stop_early: bool = True


@dataclass
class Thoughts:
    """Decoded CoTs: the prefix they extended, their token ids (end marker included where written), text and length."""

    prefix: Prefix
    token_ids: list[list[int]]
    texts: list[str]
    reasoning_tokens: list[int]


@torch.no_grad()
def decode_thoughts(model: TWNModel, prefix: Prefix, sampling: Sampling) -> Thoughts:
    """Decode a CoT for every row of `prefix` with the reasoning adapter, extending `prefix` in place.

    Each CoT starts with the start marker (fed, not generated) and ends at the end marker; a row that hits
    the token budget or emits end-of-sequence gets the end marker appended, so every thinking prefix ends
    the same way. Finished rows keep decoding padding that is masked out (holes the queries never see).
    """
    prompts = model.prompts
    model.use_adapter("reasoning")
    rows = prefix.rows
    state = Prefix(prefix.cache, prefix.attention_mask, prefix.next_position.clone())
    every_row = torch.ones(rows, dtype=torch.bool, device=model.device)
    hidden = model.feed(state, model.token_block(prompts.think_start_ids, rows), every_row)
    generated: list[list[int]] = [[] for _ in range(rows)]
    finished = torch.zeros(rows, dtype=torch.bool, device=model.device)
    needs_end = torch.zeros_like(finished)
    for _ in range(sampling.max_new_tokens or model.config.max_think_tokens):
        tokens = pick_tokens(model.lm_head(hidden[:, -1]), sampling, model.never_generated)
        is_eos = torch.tensor([token in prompts.eos_ids for token in tokens.tolist()], device=model.device)
        for row in (~finished).nonzero().flatten().tolist():
            generated[row].append(int(tokens[row]))
        reached_end = torch.tensor([prompts.ends_with_marker(ids) for ids in generated], device=model.device)
        feeding = ~finished & ~is_eos
        needs_end |= ~finished & is_eos
        finished |= is_eos | reached_end
        hidden = model.feed(state, torch.where(feeding, tokens, prompts.pad_id)[:, None], feeding)
        if sampling.stop_early and bool(finished.all()):
            break
    needs_end |= ~finished
    if bool(needs_end.any()) or not sampling.stop_early:
        model.feed(state, model.token_block(prompts.think_end_ids, rows), needs_end)
    texts = [prompts.cot_text(ids) for ids in generated]
    return Thoughts(state, generated, texts, [len(ids) for ids in generated])


def pick_tokens(logits: torch.Tensor, sampling: Sampling, never_generated: list[int]) -> torch.Tensor:
    """The next token of each row: greedy, or sampled with temperature and nucleus; never one of `never_generated`."""
    logits = logits.clone()
    logits[:, never_generated] = float("-inf")
    if sampling.temperature <= 0:
        return logits.argmax(-1)
    probabilities = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probabilities, order = probabilities.sort(dim=-1, descending=True)
        outside = sorted_probabilities.cumsum(-1) - sorted_probabilities > sampling.top_p
        sorted_probabilities[outside] = 0
        probabilities = torch.zeros_like(probabilities).scatter(-1, order, sorted_probabilities)
    return torch.multinomial(probabilities, 1, generator=sampling.generator).squeeze(-1)
