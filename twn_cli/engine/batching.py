"""Embedding many inputs: batches of like prompt length, and the thinking inputs of several batches decoded together."""

from __future__ import annotations

import torch

from twn_cli.engine.config import ThinkMode
from twn_cli.engine.decoding import Sampling
from twn_cli.engine.gate import thinks
from twn_cli.engine.kv_cache import Prefix
from twn_cli.engine.model import EmbedResult, TWNModel
from twn_cli.types import ModelInput

# Inputs are embedded this many batches at a time (`embed_block`): room to batch inputs of like length
# together and, when the gate decides, to decode the thinking ones in full batches.
BLOCK_BATCHES = 8


def block_size(batch_size: int) -> int:
    """How many inputs to hand `embed_block` at once."""
    return batch_size * BLOCK_BATCHES


@torch.no_grad()
def embed_block(
    model: TWNModel,
    inputs: list[ModelInput],
    think: ThinkMode,
    batch_size: int,
    threshold: float | None = None,
    sampling: Sampling = Sampling(),
) -> EmbedResult:
    """`model.embed` over many inputs, `batch_size` at a time, in batches of like prompt length; results in input order.

    Every row of a batch is padded to its longest prompt, and the model computes the padding too: a short
    text batched with pictures of hundreds of tokens costs what they cost. So the inputs are sorted by
    `prompt_length` before they are cut into batches.
    """
    order = sorted(range(len(inputs)), key=lambda row: model.prompts.prompt_length(inputs[row]))
    result = _embed_in_batches(model, [inputs[row] for row in order], think, batch_size, threshold, sampling)
    in_input_order = [0] * len(order)
    for position, row in enumerate(order):
        in_input_order[row] = position
    return result.take(in_input_order)


def _embed_in_batches(
    model: TWNModel, inputs: list[ModelInput], think: ThinkMode, batch_size: int, threshold: float | None, sampling: Sampling
) -> EmbedResult:
    """`model.embed` over `inputs`, `batch_size` at a time; when the gate decides, in full decode batches.

    A decode step costs about as much for a few rows as for a whole batch, so deciding batch by batch
    makes a think rate r cost nearly what thinking always costs. So with think="auto" the inputs are
    prefilled and routed `batch_size` at a time, which also gives their no-think embeddings; the cached
    prefixes of those that think are gathered across the batches (left-padded to one length) and decoded
    as soon as `batch_size` of them are waiting.
    """
    batches = [inputs[start : start + batch_size] for start in range(0, len(inputs), batch_size)]
    if think != "auto":
        return EmbedResult.concatenate([model.embed(batch, think, threshold, sampling) for batch in batches])
    tau = model.config.gate_threshold if threshold is None else threshold
    parts, decoded = [], []
    # The inputs that think, not yet decoded: their rows, their inputs, and their prefixes as one batch.
    waiting_rows: list[int] = []
    waiting_inputs: list[ModelInput] = []
    waiting: Prefix | None = None
    for first, batch in zip(range(0, len(inputs), batch_size), batches):
        prefix, last_state = model.prefill(model.prompts.encode(batch))
        p_think = model.gate_probability(last_state)
        decision = thinks(p_think, tau)
        parts.append(EmbedResult(model.query_pass(prefix), decision, p_think, [""] * len(batch), [0] * len(batch)))
        thinking = decision.nonzero().flatten()
        if len(thinking):
            waiting_rows += (thinking + first).tolist()
            waiting_inputs += [batch[row] for row in thinking.tolist()]
            waiting = prefix.select(thinking) if waiting is None else Prefix.concatenate([waiting, prefix.select(thinking)])
        # Decode as soon as a batch is full, so that at most two batches of thinking prefixes are held.
        is_last = first + batch_size >= len(inputs)
        while len(waiting_rows) >= batch_size or (waiting_rows and is_last):
            count = min(batch_size, len(waiting_rows))
            embeddings, thoughts = model.thought_embeddings(
                waiting.select(torch.arange(count, device=model.device)), waiting_inputs[:count], sampling
            )
            decoded.append((waiting_rows[:count], embeddings, thoughts))
            waiting = waiting.select(torch.arange(count, len(waiting_rows), device=model.device)) if count < len(waiting_rows) else None
            waiting_rows, waiting_inputs = waiting_rows[count:], waiting_inputs[count:]
    routed = EmbedResult.concatenate(parts)
    for rows, embeddings, thoughts in decoded:
        routed.fill(rows, embeddings, thoughts)
    return routed
