"""The passes of training: teacher-forced views for SFT + InfoNCE, and the CoT log-probabilities of RL.

Which adapter encodes what follows `config.interface` (see `config.py`). Each function ends with the
reasoning adapter's pass, so that its loss can be backpropagated at once, while that adapter is active:
peft only lets the active adapter receive gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from twn_cli.engine.kv_cache import Prefix, spliced
from twn_cli.engine.model import TWNModel
from twn_cli.engine.prompts import append_tokens, right_aligned
from twn_cli.types import ModelInput


@dataclass
class TrainingViews:
    """A batch's SFT cross-entropy on its teacher CoTs and the two prefixes its queries read in training.

    The cross-entropy is kept as a sum over labelled tokens with their count, so that a batch split into
    chunks (gradient cache, several processes) can be normalised by the whole batch's token count.
    """

    sft_loss_sum: torch.Tensor
    sft_tokens: int
    think_view: Prefix
    no_think_view: Prefix

    @property
    def sft_loss(self) -> torch.Tensor:
        """Mean cross-entropy per CoT token."""
        return self.sft_loss_sum / max(self.sft_tokens, 1)


def training_views(model: TWNModel, encoded: dict, cot_ids: list[list[int] | None]) -> TrainingViews:
    """Teacher forcing of `cot_ids` (None: the row has no CoT) after the prompts, as in training.

    Returns the SFT cross-entropy on the CoT and end-marker tokens, and the think view (prompt + CoT) and
    no-think view (prompt alone) for the query passes; the reasoning adapter is active on return.
    - reasoning-prefill: one reasoning-adapter pass over prompt + CoT; both views are its cache, the CoT
      masked out for the no-think view (the query pass detaches it).
    - embedding-prefill: the embedding adapter prefills the prompt (the no-think view, with its gradient);
      the reasoning adapter reads that cache detached and encodes the CoT; the think view is the prompt
      cache with the CoT's cache, detached, after it.
    - cot-reencode: the embedding adapter prefills the prompt and encodes the CoT after it (both views with
      their gradient); the reasoning adapter reads the prompt cache detached and encodes the CoT (SFT).
    - reencode: the embedding adapter prefills the prompt and encodes the CoT after it (both views with
      their gradient); the reasoning adapter's own pass over prompt + CoT gives the SFT loss.
    """
    prompts = model.prompts
    blocks = [prompts.think_block(ids) if ids is not None else [] for ids in cot_ids]
    lengths = torch.tensor([len(block) for block in blocks], device=model.device)
    if model.config.interface == "reasoning-prefill":
        full = append_tokens(encoded, blocks, prompts.pad_id)
        hidden, think_view = model.prefill_with("reasoning", full)
        in_suffix = torch.arange(full["input_ids"].shape[1], device=model.device)[None] >= full["input_ids"].shape[1] - lengths[:, None]
        no_think_view = Prefix(think_view.cache, full["attention_mask"] * (~in_suffix).long(), think_view.next_position - lengths)
        loss_sum, tokens = _sft_loss_sum(model, hidden, full["input_ids"], lengths)
        return TrainingViews(loss_sum, tokens, think_view, no_think_view)

    _, prompt = model.prefill_with("embedding", encoded)
    if model.config.embedding_reads_cot:
        _, think_view = model.extend(prompt.copy(detach=False), blocks, "embedding")
    if model.config.interface == "reencode":
        full = append_tokens(encoded, blocks, prompts.pad_id)
        hidden, _ = model.prefill_with("reasoning", full)
        loss_sum, tokens = _sft_loss_sum(model, hidden, full["input_ids"], lengths)
        return TrainingViews(loss_sum, tokens, think_view, prompt)

    hidden, extended = model.extend(prompt.copy(detach=True), blocks, "reasoning")
    if not model.config.embedding_reads_cot:
        think_view = Prefix(spliced(prompt.cache, extended.cache, prompt.length), extended.attention_mask, extended.next_position)
    if hidden.shape[1] == 0:  # no row has a CoT: a zero loss that backpropagates to nothing
        return TrainingViews(torch.zeros((), device=model.device, requires_grad=True), 0, think_view, prompt)
    loss_sum, tokens = _sft_loss_sum(model, hidden, right_aligned(blocks, prompts.pad_id, model.device)[0], lengths)
    return TrainingViews(loss_sum, tokens, think_view, prompt)


def _sft_loss_sum(model: TWNModel, hidden: torch.Tensor, ids: torch.Tensor, block_lengths: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy of each row's CoT and end-marker tokens, which end its `ids` (the start marker
    is fed at inference, never generated, so it is no label); and how many tokens that is."""
    width = ids.shape[1]
    columns = torch.arange(width, device=ids.device)[None]
    labelled = columns >= width - block_lengths[:, None] + len(model.prompts.think_start_ids)
    labelled &= block_lengths[:, None] > 0
    predictors = hidden[:, :-1][labelled[:, 1:]]
    targets = ids[:, 1:][labelled[:, 1:]]
    return F.cross_entropy(model.lm_head(predictors).float(), targets, reduction="sum"), len(targets)


def cot_log_probs(model: TWNModel, encoded: dict, cot_ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities of each row's CoT + end marker under the reasoning adapter (RL's policy),
    given the prompt as the interface encodes it for decoding.

    Returns [rows, T] log-probabilities and a mask of the real tokens, right-aligned (a shorter CoT is
    padded on the left). Backpropagate before switching adapters.
    """
    prompts = model.prompts
    blocks = [prompts.think_block(ids) for ids in cot_ids]
    if model.config.decoding_adapter == "embedding":
        with torch.no_grad():  # the prompt cache is the embedding adapter's: RL must not reach it
            _, prompt = model.prefill_with("embedding", encoded)
        hidden, _ = model.extend(prompt, blocks, "reasoning")
        ids = right_aligned(blocks, prompts.pad_id, model.device)[0]
    else:
        full = append_tokens(encoded, blocks, prompts.pad_id)
        hidden, _ = model.prefill_with("reasoning", full)
        ids = full["input_ids"]
    scored = torch.tensor([len(block) - len(prompts.think_start_ids) for block in blocks], device=model.device)
    width, longest = ids.shape[1], int(scored.max())
    # Position p predicts token p + 1: the last `longest` tokens are predicted by the states just before them.
    logits = model.lm_head(hidden[:, width - longest - 1 : width - 1]).float()
    targets = ids[:, width - longest :]
    log_probs = torch.log_softmax(logits, dim=-1).gather(-1, targets[..., None]).squeeze(-1)
    mask = torch.arange(longest, device=model.device)[None] >= longest - scored[:, None]
    return log_probs * mask, mask


@torch.no_grad()
def teacher_cot_embeddings(model: TWNModel, inputs: list[ModelInput], cots: list[str]) -> torch.Tensor:
    """Embeddings of inputs that think the given CoTs (a teacher's, say) instead of decoding their own."""
    views = training_views(model, model.prompts.encode(inputs), model.prompts.cot_token_ids(cots))
    return model.query_pass(views.think_view)
