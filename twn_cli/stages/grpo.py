"""The pieces of train-rl's objective: negatives from the cache, rewards, advantages and the per-token loss.

Rewards are plain functions of one query's group: `reward(cot_embeddings [G, d], positives [P, d],
negatives [N, d], *, temperature, top_n) -> [G]`, every embedding L2-normalised; each uses the settings it
needs. `REWARDS` names them for the recipes.
"""

from __future__ import annotations

import random

import torch

from twn_cli.data.negatives_cache import NegativesCache


# ----------------------------------------------------------------------------------------- negatives
def pick_negatives(
    cache: NegativesCache, query: torch.Tensor, positive_ids: set[str], hardest: int, random_count: int, rng: random.Random
) -> torch.Tensor:
    """Rows of the cache used as one query's negatives: the `hardest` most similar to `query` plus random
    ones, none of them in `positive_ids` (its positives and their copies)."""
    allowed = torch.tensor([item not in positive_ids for item in cache.ids])
    candidates = allowed.nonzero().flatten()
    if hardest == 0 or hardest >= len(candidates):
        return candidates
    similarity = cache.embeddings[candidates] @ query.float().cpu()
    order = similarity.argsort(descending=True)
    chosen = candidates[order[:hardest]].tolist()
    rest = candidates[order[hardest:]].tolist()
    chosen += rng.sample(rest, min(random_count, len(rest)))
    return torch.tensor(chosen)


# ----------------------------------------------------------------------------------------- rewards
def softmax_reward(cot_embeddings: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor, *, temperature: float, top_n: int) -> torch.Tensor:
    """The softmax probability of the positive(s) among positives + negatives at `temperature` (InfoNCE's own target)."""
    logits = cot_embeddings @ torch.cat([positives, negatives]).T / temperature
    return logits.softmax(-1)[:, : len(positives)].sum(-1)


def _share_in_top(positive_similarity: torch.Tensor, negative_similarity: torch.Tensor, top_n: int) -> torch.Tensor:
    """The share of each row's positives among its `top_n` most similar candidates, over min(top_n, positives),
    so that one positive found first scores 1."""
    similarity = torch.cat([positive_similarity, negative_similarity], dim=1)
    nearest = similarity.topk(min(top_n, similarity.shape[1]), dim=1).indices
    return (nearest < positive_similarity.shape[1]).sum(1).float() / min(top_n, positive_similarity.shape[1])


def ume_r1_reward(cot_embeddings: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor, *, temperature: float, top_n: int) -> torch.Tensor:
    """UME-R1's reward: (share of positives in the top n) × (mean positive − mean negative similarity).

    UME-R1 takes n = G, the group size. A CoT with no positive in its top n earns 0.
    """
    positive_similarity, negative_similarity = cot_embeddings @ positives.T, cot_embeddings @ negatives.T
    share = _share_in_top(positive_similarity, negative_similarity, top_n)
    return share * (positive_similarity.mean(1) - negative_similarity.mean(1))


def embed_rl_reward(cot_embeddings: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor, *, temperature: float, top_n: int) -> torch.Tensor:
    """Embed-RL's outcome reward: 0.5 × the share of positives in the top n + 0.5 × (mean positive similarity
    − the softmax-weighted mean negative similarity, weights softmax(similarity / temperature)), so the
    hardest negatives count most."""
    positive_similarity, negative_similarity = cot_embeddings @ positives.T, cot_embeddings @ negatives.T
    share = _share_in_top(positive_similarity, negative_similarity, top_n)
    weighted_negative = (negative_similarity.div(temperature).softmax(-1) * negative_similarity).sum(-1)
    return 0.5 * share + 0.5 * (positive_similarity.mean(1) - weighted_negative)


def hit_reward(cot_embeddings: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor, *, temperature: float, top_n: int) -> torch.Tensor:
    """The share of positives among the n nearest candidates; for n = 1, 1 where a positive ranks first
    (Hit@1 against the negatives) and 0 elsewhere.

    Only retrieval counts: CoTs that all rank the positive first tie, whatever their wording, so their
    group has no spread, where a continuous reward's small differences would be scaled up to full
    advantages by GRPO's normalisation.
    """
    return _share_in_top(cot_embeddings @ positives.T, cot_embeddings @ negatives.T, top_n)


REWARDS = {"softmax": softmax_reward, "ume_r1": ume_r1_reward, "embed_rl": embed_rl_reward, "hit": hit_reward}


def format_reward(ended_with_marker: torch.Tensor, weight: float) -> torch.Tensor:
    """`weight` for each CoT that closed itself with the end marker (not cut at the budget)."""
    return weight * ended_with_marker.float()


def length_cost(cot_tokens: torch.Tensor, cost_per_token: float) -> torch.Tensor:
    return -cost_per_token * cot_tokens.float()


# ----------------------------------------------------------------------------------------- advantages and loss
ADVANTAGES = ("grpo", "mean")
LOSS_NORMALISATIONS = ("tokens", "budget")


def group_advantages(rewards: torch.Tensor, kind: str = "grpo") -> tuple[torch.Tensor, torch.Tensor]:
    """[queries, G] rewards -> advantages per group, and which groups had no spread (every reward equal).

    grpo: (r - mean) / (std + 1e-4), GRPO's; it blows a group's tiny differences up to ±1.
    mean: r - mean, Dr. GRPO's; a group's differences keep their size.
    """
    centred = rewards - rewards.mean(1, keepdim=True)
    zero_spread = (rewards == rewards[:, :1]).all(1)
    if kind == "mean":
        return centred, zero_spread
    return centred / (rewards.std(1, keepdim=True) + 1e-4), zero_spread


def loss_normaliser(tokens: torch.Tensor, sequences: int, kind: str, max_think_tokens: int) -> torch.Tensor:
    """What the batch's summed per-token loss is divided by: its scored CoT tokens (tokens), or a constant
    token budget, sequences × max_think_tokens (budget, Dr. GRPO's: a long CoT's tokens weigh no less)."""
    if kind == "budget":
        return torch.tensor(float(sequences * max_think_tokens))
    return tokens.clamp(min=1)


def clipped_surrogate(log_probs, old_log_probs, advantages, epsilon_low: float, epsilon_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO surrogate min(ρA, clip(ρ, 1-ε_low, 1+ε_high)A), and where the clipped term was chosen."""
    ratio = torch.exp(log_probs - old_log_probs)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - epsilon_low, 1 + epsilon_high) * advantages
    return torch.minimum(unclipped, clipped), clipped < unclipped


def k3_kl(log_probs: torch.Tensor, reference_log_probs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(policy || reference): exp(ref - logp) - (ref - logp) - 1 (non-negative)."""
    difference = reference_log_probs - log_probs
    return torch.exp(difference) - difference - 1
