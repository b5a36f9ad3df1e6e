"""`twn train-rl`: GRPO on the reasoning adapter, rewarded in the embedding space (METHOD sections 1 and 3).

One step, for a batch of queries:
1. one reasoning-adapter prefill per query; its rows are repeated G times and G CoTs are sampled from it;
2. each CoT's embedding is the frozen embedding side's query pass over the prompt + CoT cache, exactly
   what `twn embed --think always` produces; the reward compares it to the query's positive against
   negatives from the global cache (the hardest by similarity to the no-think query embedding, plus
   random ones), never one of its positives or a copy of one under another id (an answer or class name
   that recurs across tasks and splits would be the right answer scored as a wrong one);
3. advantages are the rewards normalised within each query's group: (r - mean) / (std + 1e-4);
4. the loss is the per-token clipped surrogate (asymmetric ε, as DAPO) plus β times the k3 estimate of
   the KL divergence to the frozen pre-RL reasoning adapter, averaged over the batch's CoT tokens.
Only the reasoning LoRA parameters are in the optimiser, and the loss is backpropagated while the reasoning
adapter is active, so the embedding adapter, the queries, the gate and the backbone cannot change.

One update per sampled batch: the "old" policy is the current one, so the ratio is 1 numerically; the
clipped form is kept so that several updates per batch only need a loop.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from twn_cli.data.negatives_cache import NegativesCache
from twn_cli.data.prepared import CandidateEmbedder, PreparedDataset, prepared_input
from twn_cli.distributed import Distributed
from twn_cli.engine.model import Sampling, TWNModel
from twn_cli.errors import TWNError
from twn_cli.recipes import AT_LEAST_ONE, NOT_NEGATIVE, POSITIVE, SHARE, check_ranges
from twn_cli.stages.train_embed import TrainingData
from twn_cli.training import RunDirectory, finite_optimizer_step, restore_rng_state, resume_latest_state, rng_state

log = logging.getLogger(__name__)

REWARDS = ("softmax", "ume_r1")


@dataclass
class TrainRLConfig:
    """Hyper-parameters of train-rl; recipes/<backbone>/train-rl.yaml sets them."""

    # Sampling: G CoTs per query.
    group_size: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_think_tokens: int = 32
    # The objective.
    reward: str = "softmax"
    reward_temperature: float = 0.05
    hardest_negatives: int = 0  # 0: every cache entry that is not a positive of the query
    random_negatives: int = 0
    format_reward: float = 0.0  # added when the CoT ended with the end marker itself
    token_cost: float = 0.0  # subtracted per CoT token
    epsilon_low: float = 0.2
    epsilon_high: float = 0.28
    kl_beta: float = 0.04
    # Optimisation.
    steps: int = 100
    batch_size: int = 4  # queries per step
    learning_rate: float = 1e-5
    max_grad_norm: float = 1.0
    # Bookkeeping.
    checkpoint_every: int = 50
    log_every: int = 1
    tensorboard: bool = False  # also log the metrics as TensorBoard scalars in RUN/train/tensorboard
    split: str = "train"
    # Held-out reward: the mean reward of the first `validation_queries` queries of `validation_split` (0: off),
    # their CoTs sampled under one fixed seed, before RL and at every checkpoint.
    validation_split: str = "validation"
    validation_queries: int = 32
    # Re-embed the negatives cache with the current model every this many steps (0: never). RL changes the
    # reasoning adapter, whose prefill every no-think embedding reads, so the cache drifts from the model.
    refresh_cache_every: int = 0
    seed: int = 0

    def __post_init__(self):
        if self.reward not in REWARDS:
            raise TWNError(f"reward must be one of {', '.join(REWARDS)}, not '{self.reward}'")
        if self.group_size < 2:
            raise TWNError("group_size must be at least 2: advantages are normalised within each query's group")
        check_ranges(self, {
            "temperature": NOT_NEGATIVE, "top_p": SHARE, "max_think_tokens": AT_LEAST_ONE,
            "reward_temperature": POSITIVE, "hardest_negatives": NOT_NEGATIVE, "random_negatives": NOT_NEGATIVE,
            "token_cost": NOT_NEGATIVE, "epsilon_low": SHARE, "epsilon_high": NOT_NEGATIVE, "kl_beta": NOT_NEGATIVE,
            "steps": AT_LEAST_ONE, "batch_size": AT_LEAST_ONE, "learning_rate": POSITIVE, "max_grad_norm": POSITIVE,
            "checkpoint_every": AT_LEAST_ONE, "log_every": AT_LEAST_ONE, "validation_queries": NOT_NEGATIVE,
            "refresh_cache_every": NOT_NEGATIVE,
        })
        if self.refresh_cache_every and self.checkpoint_every % self.refresh_cache_every:
            # Every saved state is then a refresh point, so a resumed run refreshes to the same cache.
            raise TWNError(f"checkpoint_every ({self.checkpoint_every}) must be a multiple of refresh_cache_every ({self.refresh_cache_every})")


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
def softmax_reward(cot_embeddings: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor, temperature: float) -> torch.Tensor:
    """[G] rewards: the softmax probability of the positive(s) among positives + negatives (InfoNCE's own target)."""
    positives = positives.reshape(-1, cot_embeddings.shape[1])
    logits = cot_embeddings @ torch.cat([positives, negatives]).T / temperature
    return logits.softmax(-1)[:, : len(positives)].sum(-1)


def ume_r1_reward(cot_embeddings: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor, top_k: int) -> torch.Tensor:
    """[G] rewards as UME-R1 (METHOD section 6): (share of positives in the top-k) × (mean positive − mean negative similarity).

    Our reading: each CoT embedding ranks positives + negatives by cosine similarity; the share is how many
    of the query's positives are among the k nearest, over min(k, positives) so that one positive found
    scores 1; k is the group size G as in UME-R1. The second factor is the mean similarity to the positives
    minus the mean similarity to the negatives. A CoT with no positive in its top-k earns 0.
    """
    positives = positives.reshape(-1, cot_embeddings.shape[1])
    positive_similarity = cot_embeddings @ positives.T
    negative_similarity = cot_embeddings @ negatives.T
    similarity = torch.cat([positive_similarity, negative_similarity], dim=1)
    nearest = similarity.topk(min(top_k, similarity.shape[1]), dim=1).indices
    found = (nearest < len(positives)).sum(1).float()
    share = found / min(top_k, len(positives))
    return share * (positive_similarity.mean(1) - negative_similarity.mean(1))


def format_reward(ended_with_marker: torch.Tensor, weight: float) -> torch.Tensor:
    """`weight` for each CoT that closed itself with the end marker (not cut at the budget)."""
    return weight * ended_with_marker.float()


def length_cost(cot_tokens: torch.Tensor, cost_per_token: float) -> torch.Tensor:
    return -cost_per_token * cot_tokens.float()


# ----------------------------------------------------------------------------------------- GRPO maths
def group_advantages(rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[queries, G] rewards -> advantages (r - mean) / (std + 1e-4) per group, and which groups had no spread."""
    mean = rewards.mean(1, keepdim=True)
    std = rewards.std(1, keepdim=True)
    zero_spread = (rewards == rewards[:, :1]).all(1)
    return (rewards - mean) / (std + 1e-4), zero_spread


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


# ----------------------------------------------------------------------------------------- trainer
class RLTrainer:
    """GRPO on the reasoning adapter of one model, against one negatives cache.

    Under several processes each takes a slice of every step's queries and samples their groups (its own
    random stream), the loss is normalised by the whole batch's CoT tokens, and the gradients are summed,
    so that a step is the single-process step on the union of the samples.
    """

    def __init__(self, model: TWNModel, data: TrainingData, cache: NegativesCache, config: TrainRLConfig, distributed: Distributed | None = None):
        self.model = model
        self.data = data
        self.cache = cache
        self.config = config
        self.distributed = distributed or Distributed()
        if config.batch_size % self.distributed.world_size:
            raise TWNError(f"batch_size {config.batch_size} must divide evenly over {self.distributed.world_size} processes")
        self.candidates = CandidateEmbedder(model, data.candidates, batch_size=64)
        self.parameters = model.adapter_parameters("reasoning")
        # The frozen reference: the reasoning adapter as it was before RL.
        self.reference = {name: p.detach().clone() for name, p in self.parameters.items()}
        self.optimizer = torch.optim.AdamW(list(self.parameters.values()), lr=config.learning_rate, weight_decay=0.0)
        self.step_done = 0

    def step(self) -> dict:
        """Sample and reward this process's share of the step's queries, then update on all of them."""
        rows = self.local_rows()
        sampled = self.sample_groups(rows, stream=self.distributed.rank)
        return self.update(rows, sampled, self.rewards(rows, sampled, stream=self.distributed.rank))

    def local_rows(self) -> list[dict]:
        """This process's slice of the current step's queries."""
        indices = self.data.batch_indices(self.step_done, self.config.batch_size)
        share = self.config.batch_size // self.distributed.world_size
        return [self.data.rows[index] for index in indices[self.distributed.rank * share : (self.distributed.rank + 1) * share]]

    def update(self, rows: list[dict], sampled: dict, rewards: torch.Tensor) -> dict:
        """One optimiser step on the GRPO loss of the processes' samples together; returns the step's metrics."""
        metrics = self.policy_gradient(rows, sampled, rewards)
        trainable = list(self.parameters.values())
        metrics["grad_norm"] = finite_optimizer_step(self.optimizer, trainable, self.config.max_grad_norm, self.step_done + 1)
        self.step_done += 1
        return {"step": self.step_done, **metrics}

    def policy_gradient(self, rows: list[dict], sampled: dict, rewards: torch.Tensor) -> dict:
        """The gradient of the batch's GRPO loss in the reasoning adapter (summed over processes), and its metrics."""
        config, model, distributed = self.config, self.model, self.distributed
        advantages, zero_spread = group_advantages(rewards)
        advantages = advantages.flatten().to(model.device)

        encoded = model.encode([prepared_input(row) for row in rows for _ in range(config.group_size)])
        with torch.no_grad(), self._reference_weights():
            reference_log_probs, _ = model.cot_log_probs(encoded, sampled["cot_ids"])
        model.train()
        self.optimizer.zero_grad(set_to_none=True)
        log_probs, mask = model.cot_log_probs(encoded, sampled["cot_ids"])
        mask = mask.clone()  # the log-probabilities' graph holds the original
        # An end marker that the budget or end-of-sequence forced in was not sampled: it is no action to score.
        mask[~sampled["ended"].to(model.device), -len(model.think_end_ids) :] = False
        old_log_probs = log_probs.detach()
        surrogate, clipped = clipped_surrogate(log_probs, old_log_probs, advantages[:, None], config.epsilon_low, config.epsilon_high)
        kl = k3_kl(log_probs, reference_log_probs)
        tokens = distributed.sum(mask.sum()).clamp(min=1)
        loss = ((-surrogate + config.kl_beta * kl) * mask).sum() / tokens
        batch_loss = distributed.sum(loss.detach())
        if not torch.isfinite(batch_loss):  # the same in every process, so all stop together
            raise FloatingPointError(f"loss became {batch_loss.item()} at step {self.step_done + 1}")
        loss.backward()  # now, while the reasoning adapter is active
        distributed.sum_gradients(list(self.parameters.values()))
        model.eval()
        # Processes hold equal shares, so means over the batch are means of their means.
        return {
            "loss": batch_loss.item(),
            "reward_mean": distributed.mean(rewards.mean()).item(),
            "reward_spread": distributed.mean(rewards.std(1).mean()).item(),
            "zero_spread_groups": distributed.mean(zero_spread.float().mean()).item(),
            "kl": (distributed.sum((kl * mask).sum()) / tokens).item(),
            "cot_tokens_mean": distributed.mean(sampled["cot_tokens"].float().mean()).item(),
            "clip_fraction": (distributed.sum((clipped & mask).sum()) / tokens).item(),
        }

    @torch.no_grad()
    def sample_groups(self, rows: list[dict], key: int | None = None, stream: int = 0) -> dict:
        """G CoTs per query from one prefill, and their embeddings; seeded by `key` (default: the step) and
        `stream` (a process's own), so a resumed run samples the same CoTs as an uninterrupted one."""
        config, model = self.config, self.model
        key = self.step_done if key is None else key
        model.eval()
        inputs = [prepared_input(row) for row in rows]
        prefix, _ = model.prefill(model.encode(inputs))
        no_think = model.query_pass(prefix).float().cpu()
        repeated = torch.arange(len(rows), device=model.device).repeat_interleave(config.group_size)
        generator = torch.Generator(device=model.device).manual_seed(config.seed * 1_000_003 + key + stream * 1_000_000_007)
        sampling = Sampling(config.temperature, config.top_p, config.max_think_tokens, generator)
        thoughts = model.think(prefix.select(repeated), sampling)
        cot_ids = [model.strip_end_marker(ids) for ids in thoughts.token_ids]
        end = model.think_end_ids
        return {
            "no_think": no_think,
            "cot_embeddings": model.query_pass(thoughts.prefix).float().cpu(),
            "cot_ids": cot_ids,
            "ended": torch.tensor([ids[-len(end) :] == end for ids in thoughts.token_ids]),
            "cot_tokens": torch.tensor([len(ids) for ids in cot_ids]),
        }

    @torch.no_grad()
    def rewards(self, rows: list[dict], groups: dict, key: int | None = None, stream: int = 0) -> torch.Tensor:
        """[queries, G] rewards of sampled groups against the cache's negatives for each query (random
        negatives drawn as `sample_groups` draws CoTs: by `key` and `stream`)."""
        config = self.config
        key = self.step_done if key is None else key
        rng = random.Random(f"{config.seed}/{key}" + (f"/{stream}" if stream else ""))
        rewards = torch.empty(len(rows), config.group_size)
        for query, row in enumerate(rows):
            positive_ids = self.data.dataset.with_copies(row["positive_ids"])
            positives = self.candidates(row["positive_ids"]).float()
            negatives = self.cache.embeddings[
                pick_negatives(self.cache, groups["no_think"][query], positive_ids, config.hardest_negatives, config.random_negatives, rng)
            ]
            group = slice(query * config.group_size, (query + 1) * config.group_size)
            cot_embeddings = groups["cot_embeddings"][group]
            if config.reward == "softmax":
                reward = softmax_reward(cot_embeddings, positives, negatives, config.reward_temperature)
            else:
                reward = ume_r1_reward(cot_embeddings, positives, negatives, config.group_size)
            rewards[query] = reward + format_reward(groups["ended"][group], config.format_reward) + length_cost(groups["cot_tokens"][group], config.token_cost)
        return rewards

    def refresh_cache(self) -> None:
        """Re-embed every cache entry (a candidate of the prepared dataset) with the current model; processes
        share the blocks of entries."""
        self.model.eval()
        self.cache = NegativesCache(self.cache.ids, self.candidates.shared_by(self.distributed, self.cache.ids).float())

    def heldout_reward(self, rows: list[dict], reference: bool = False) -> float:
        """Mean reward over `rows` with CoTs sampled under one fixed seed (so that values at different steps
        compare); `reference`: with the pre-RL reasoning adapter. Processes share the batches."""
        key = -1  # no training step uses it

        def reward_sum(batch: list[dict]) -> float:
            return self.rewards(batch, self.sample_groups(batch, key), key).sum().item()

        batches = [rows[start : start + self.config.batch_size] for start in range(0, len(rows), self.config.batch_size)]
        with self._reference_weights() if reference else nullcontext():
            total = sum(self.distributed.map_in_order(reward_sum, batches, prepare=lambda batch: batch))
        return total / (len(rows) * self.config.group_size)

    @contextmanager
    def _reference_weights(self):
        """Within the block the reasoning adapter holds the pre-RL weights; the trained ones come back after."""
        trained = {name: p.detach().clone() for name, p in self.parameters.items()}
        for name, p in self.parameters.items():
            p.data.copy_(self.reference[name])
        try:
            yield
        finally:
            for name, p in self.parameters.items():
                p.data.copy_(trained[name])

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {
            "step": self.step_done, "optimizer": self.optimizer.state_dict(), "rng": rng_state(), "config": asdict(self.config),
            "processes": self.distributed.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("processes", 1) != self.distributed.world_size:
            log.warning("resuming on %d processes a run that had %d: each process samples its own stream, so the "
                        "run will not match an uninterrupted one", self.distributed.world_size, state.get("processes", 1))
        self.step_done = state["step"]
        self.optimizer.load_state_dict(state["optimizer"])
        restore_rng_state(state["rng"])


def run_train_rl(
    model: TWNModel,
    dataset: PreparedDataset,
    cache: NegativesCache,
    run_dir: Path,
    config: TrainRLConfig,
    *,
    resume: bool,
    stages: list[dict],
    on_step: Callable[[dict], None] = lambda metrics: None,
) -> dict:
    """Train, saving a resumable state every `checkpoint_every` steps in `run_dir/train/states`; returns the summary.

    `model` must hold the pre-RL adapters (the input checkpoint) also when resuming: they are the KL reference.
    """
    run = RunDirectory(run_dir, tensorboard=config.tensorboard)
    data = TrainingData(dataset, config.split, hard_negatives=0, seed=config.seed)
    heldout_rows = []
    if config.validation_queries:
        if config.validation_split not in dataset.queries:
            raise TWNError(f"prepared dataset '{dataset.path}' has no '{config.validation_split}' split for the held-out reward "
                           "(set validation_queries: 0 to train without it)")
        validation = dataset.queries[config.validation_split]
        heldout_rows = [validation[i] for i in range(min(config.validation_queries, len(validation)))]
    if config.refresh_cache_every:
        unknown = next((item for item in cache.ids if item not in data.candidate_index), None)
        if unknown is not None:
            raise TWNError(f"negatives cache entry '{unknown}' is not a candidate of '{dataset.path}': only caches of the "
                           "dataset's candidates (twn embed DATA -o cache.pt) can be refreshed")
    distributed = Distributed()
    trainer = RLTrainer(model, data, cache, config, distributed)
    run.start(resume)  # in every process, so that all of them refuse a used directory, not only the first
    if resume:
        resume_latest_state(run, model, trainer, config, main_process=distributed.is_main)
        if config.refresh_cache_every and trainer.step_done:
            trainer.refresh_cache()
    heldout_before = trainer.heldout_reward(heldout_rows, reference=True) if heldout_rows else None
    started = time.perf_counter()
    history = []
    while trainer.step_done < config.steps:
        metrics = run.guarded_step(trainer)
        if config.refresh_cache_every and trainer.step_done % config.refresh_cache_every == 0:
            trainer.refresh_cache()
            metrics["cache_refreshed"] = True
        if heldout_rows and (trainer.step_done % config.checkpoint_every == 0 or trainer.step_done == config.steps):
            metrics["heldout_reward"] = trainer.heldout_reward(heldout_rows)
        metrics["seconds"] = time.perf_counter() - started
        history.append(metrics)
        if distributed.is_main:
            run.after_step(model, trainer, metrics, total_steps=config.steps, log_every=config.log_every,
                           checkpoint_every=config.checkpoint_every, stages=stages)
        on_step(metrics)
    run.finish()
    last = history[-min(len(history), 10) :]
    heldout_curve = [(m["step"], m["heldout_reward"]) for m in history if "heldout_reward" in m]
    return {
        "steps": trainer.step_done,
        "negatives_cache_size": len(cache.ids),
        "cache_refreshes": sum(1 for m in history if m.get("cache_refreshed")),
        "heldout_reward": {
            "split": config.validation_split,
            "queries": len(heldout_rows),
            "before": heldout_before,
            # A resumed run that had finished takes no step: measure the trained adapter now.
            "after": heldout_curve[-1][1] if heldout_curve else trainer.heldout_reward(heldout_rows),
            "by_step": heldout_curve,
        }
        if heldout_rows
        else None,
        # Means over the last (up to) ten steps of this process: a smoothed end point of the run.
        "final": {key: sum(m[key] for m in last) / len(last) for key in ("reward_mean", "kl", "cot_tokens_mean", "zero_spread_groups")}
        if last
        else {},
    }
