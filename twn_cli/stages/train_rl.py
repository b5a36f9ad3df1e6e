"""`twn train-rl`: GRPO on the reasoning adapter, rewarded in the embedding space.

One step, for a batch of queries, a micro-batch of them at a time (gradients accumulate):
1. one prefill per query; its rows are repeated G times and G CoTs are sampled by the reasoning adapter;
2. each CoT's embedding is the frozen embedding side's, exactly what `twn embed --think always` produces;
   the reward (`grpo.REWARDS`) compares it to the query's positive against negatives from the global
   cache (the hardest by similarity to the no-think query embedding, plus random ones), never one of its
   positives or a copy of one under another id (an answer or class name that recurs across tasks and
   splits would be the right answer scored as a wrong one);
3. advantages within each query's group (`advantage`: GRPO's (r - mean) / std, or Dr. GRPO's r - mean);
   groups whose CoTs all earned the same reward can be left out (`drop_zero_spread`);
4. the loss is the per-token clipped surrogate (asymmetric ε, as DAPO) plus β times the k3 estimate of
   the KL divergence to the frozen pre-RL reasoning adapter, summed over the batch's CoT tokens and divided
   by their number or by a constant token budget (`loss_normalisation`: tokens, or budget as Dr. GRPO).
Only the reasoning LoRA parameters are in the optimiser, and the loss is backpropagated while the reasoning
adapter is active, so the embedding adapter, the queries, the gate and the backbone cannot change.

The held-out score is measured before RL and at every checkpoint: the held-out reward (validation queries,
CoTs sampled under one fixed seed) and, where `heldout_hit_queries` asks for it, the held-out always-think
Hit@1 (validation queries with the CoTs `twn eval` writes, each ranked against its own candidate pool).
Hit@1 ranks checkpoints first where it is measured: it is what eval reports, while a reward rising on
sampled CoTs has come with a falling Hit@1. The run's checkpoint keeps the adapter of its best-scoring
checkpoint (the pre-RL one, if none was better), and says so; if the score falls at two checkpoints in a
row, the run stops.

One update per sampled batch: the "old" policy is the current one, so the ratio is 1 numerically; the
clipped form is kept so that several updates per batch only need a loop.

As trl keeps one trainer module per algorithm, this module holds train-rl's settings, trainer and run
(about 500 lines); the objective's pieces (negatives, rewards, advantages, the loss) are in `grpo.py`.
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
from twn_cli.data.prepared import PreparedDataset, prepared_input
from twn_cli.data.training_data import TrainingData
from twn_cli.distributed import Distributed
from twn_cli.engine.checkpoint import save_checkpoint, stage_results
from twn_cli.engine.decoding import Sampling
from twn_cli.engine.model import TWNModel
from twn_cli.engine.training_passes import cot_log_probs
from twn_cli.errors import TWNError
from twn_cli.recipes import AT_LEAST_ONE, NOT_NEGATIVE, POSITIVE, SHARE, check_ranges
from twn_cli.stages.common import CandidateEmbedder, stage_record
from twn_cli.stages.grpo import (
    ADVANTAGES,
    LOSS_NORMALISATIONS,
    REWARDS,
    clipped_surrogate,
    format_reward,
    group_advantages,
    k3_kl,
    length_cost,
    loss_normaliser,
    pick_negatives,
)
from twn_cli.stages.pool_scoring import pool_views, weighted_hit_rate
from twn_cli.training import RunDirectory, finite_optimizer_step, restore_rng_state, resume_latest_state, rng_state

log = logging.getLogger(__name__)

# The sampling and negatives key of the held-out reward: no training step uses it, so values at different steps compare.
HELDOUT_KEY = -1
# A held-out score that falls at this many checkpoints in a row stops the run (the best checkpoint is kept).
FALLS_TO_STOP = 2
# The settings that decide what the held-out score measures: a resumed run must keep them, or its scores
# before and after would not compare.
HELDOUT_SETTINGS = ("validation_split", "validation_queries", "heldout_hit_queries")


@dataclass
class TrainRLConfig:
    """Hyper-parameters of train-rl; recipes/<backbone>/train-rl.yaml sets them."""

    # Sampling: G CoTs per query.
    group_size: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_think_tokens: int = 32
    # The objective.
    reward: str = "softmax"  # softmax, ume_r1, embed_rl or hit (twn_cli/stages/grpo.py)
    reward_temperature: float = 0.05  # softmax: of the probability; embed_rl: of the weights of the negatives
    reward_top_n: int = 1  # ume_r1, embed_rl and hit: the share of positives among the n nearest candidates
    hardest_negatives: int = 0  # 0: every cache entry that is not a positive of the query
    random_negatives: int = 0
    format_reward: float = 0.0  # added when the CoT ended with the end marker itself
    token_cost: float = 0.0  # subtracted per CoT token
    advantage: str = "grpo"  # grpo: (r - mean) / std; mean: r - mean (Dr. GRPO)
    drop_zero_spread: bool = False  # leave out of the loss the groups whose CoTs all earned the same reward
    loss_normalisation: str = "tokens"  # tokens: by the batch's CoT tokens; budget: by sequences x max_think_tokens
    epsilon_low: float = 0.2
    epsilon_high: float = 0.28
    kl_beta: float = 0.04
    # Optimisation.
    steps: int = 100
    batch_size: int = 4  # queries per step
    micro_batch_size: int = 0  # queries per sampling and backward pass (gradients accumulate); 0: the whole batch
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
    # Held-out always-think Hit@1: the first `heldout_hit_queries` queries of `validation_split`, their CoTs
    # greedy as `twn eval` writes them, each ranked against its own candidate pool, mean over tasks (0: off).
    heldout_hit_queries: int = 0
    # Re-embed the negatives cache with the current model every this many steps (0: never). Under
    # reasoning-prefill every no-think embedding reads the reasoning adapter's prefill, so RL moves them and
    # the cache drifts from the model; under the other interfaces it cannot.
    refresh_cache_every: int = 0
    seed: int = 0

    def __post_init__(self):
        for name, value, allowed in (("reward", self.reward, tuple(REWARDS)), ("advantage", self.advantage, ADVANTAGES),
                                     ("loss_normalisation", self.loss_normalisation, LOSS_NORMALISATIONS)):
            if value not in allowed:
                raise TWNError(f"{name} must be one of {', '.join(allowed)}, not '{value}'")
        if self.group_size < 2:
            raise TWNError("group_size must be at least 2: advantages are normalised within each query's group")
        check_ranges(self, {
            "temperature": NOT_NEGATIVE, "top_p": SHARE, "max_think_tokens": AT_LEAST_ONE,
            "reward_temperature": POSITIVE, "reward_top_n": AT_LEAST_ONE, "hardest_negatives": NOT_NEGATIVE, "random_negatives": NOT_NEGATIVE,
            "token_cost": NOT_NEGATIVE, "epsilon_low": SHARE, "epsilon_high": NOT_NEGATIVE, "kl_beta": NOT_NEGATIVE,
            "steps": AT_LEAST_ONE, "batch_size": AT_LEAST_ONE, "micro_batch_size": NOT_NEGATIVE, "learning_rate": POSITIVE,
            "max_grad_norm": POSITIVE, "checkpoint_every": AT_LEAST_ONE, "log_every": AT_LEAST_ONE, "validation_queries": NOT_NEGATIVE,
            "heldout_hit_queries": NOT_NEGATIVE, "refresh_cache_every": NOT_NEGATIVE,
        })
        if self.micro_batch_size and self.batch_size % self.micro_batch_size:
            raise TWNError(f"micro_batch_size ({self.micro_batch_size}) must divide batch_size ({self.batch_size}), or be 0")
        if self.refresh_cache_every and self.checkpoint_every % self.refresh_cache_every:
            # Every saved state is then a refresh point, so a resumed run refreshes to the same cache.
            raise TWNError(f"checkpoint_every ({self.checkpoint_every}) must be a multiple of refresh_cache_every ({self.refresh_cache_every})")


@dataclass
class HeldoutScore:
    """The held-out measures at one checkpoint (None: not measured)."""

    step: int
    reward: float | None
    hit: float | None  # always-think Hit@1

    def rank(self) -> tuple[float, ...]:
        """Checkpoints compare by Hit@1 where measured, then by the reward."""
        return tuple(value for value in (self.hit, self.reward) if value is not None)


# ----------------------------------------------------------------------------------------- trainer
class RLTrainer:
    """GRPO on the reasoning adapter of one model, against one negatives cache.

    Under several processes each takes a slice of every step's queries and samples their groups (its own
    random stream), the loss is normalised over the whole batch, and the gradients are summed, so that a
    step is the single-process step on the union of the samples.
    """

    def __init__(self, model: TWNModel, data: TrainingData, cache: NegativesCache, config: TrainRLConfig, distributed: Distributed | None = None):
        self.model = model
        self.data = data
        self.cache = cache
        self.config = config
        self.distributed = distributed or Distributed()
        if config.batch_size % self.distributed.world_size:
            raise TWNError(f"batch_size {config.batch_size} must divide evenly over {self.distributed.world_size} processes")
        self.share = config.batch_size // self.distributed.world_size
        self.micro_batch = min(config.micro_batch_size or self.share, self.share)
        if self.share % self.micro_batch:
            raise TWNError(f"each process's {self.share} queries per step must split into micro-batches of {self.micro_batch}")
        # Held-out batches: a micro-batch of the whole step (memory a step's sampling fits in), the same batches
        # whatever the number of processes.
        self.heldout_batch = config.micro_batch_size or config.batch_size
        self.candidates = CandidateEmbedder(model, data.candidates, batch_size=64)
        self.parameters = model.adapter_parameters("reasoning")
        # The frozen reference: the reasoning adapter as it was before RL.
        self.reference = {name: p.detach().clone() for name, p in self.parameters.items()}
        self.optimizer = torch.optim.AdamW(list(self.parameters.values()), lr=config.learning_rate, weight_decay=0.0)
        self.step_done = 0
        # The held-out score at each checkpoint (step 0: before RL), and the adapter of the best one.
        self.heldout: list[HeldoutScore] = []
        self.best: tuple[int, dict[str, torch.Tensor]] = (0, self.reference)

    # ------------------------------------------------------------------ one step
    def step(self) -> dict:
        """Sample and reward this process's share of the step's queries, a micro-batch at a time, then update on all of them."""
        rows = self.local_rows()
        micro_batches = [rows[start : start + self.micro_batch] for start in range(0, len(rows), self.micro_batch)]
        samples = []
        for number, batch in enumerate(micro_batches):
            stream = self.distributed.rank + self.distributed.world_size * number
            sampled = self.sample_groups(batch, stream=stream)
            samples.append((batch, sampled, self.rewards(batch, sampled, stream=stream)))
        return self.update(samples)

    def local_rows(self) -> list[dict]:
        """This process's slice of the current step's queries."""
        indices = self.data.batch_indices(self.step_done, self.config.batch_size)
        return [self.data.rows[index] for index in indices[self.distributed.rank * self.share : (self.distributed.rank + 1) * self.share]]

    def update(self, samples: list[tuple[list[dict], dict, torch.Tensor]]) -> dict:
        """One optimiser step on the GRPO loss of the processes' samples together; returns the step's metrics."""
        metrics = self.policy_gradient(samples)
        metrics["grad_norm"] = finite_optimizer_step(self.optimizer, [list(self.parameters.values())], self.config.max_grad_norm, self.step_done + 1)
        self.step_done += 1
        return {"step": self.step_done, **metrics}

    def policy_gradient(self, samples: list[tuple[list[dict], dict, torch.Tensor]]) -> dict:
        """The gradient of the batch's GRPO loss in the reasoning adapter (summed over processes and micro-batches),
        and its metrics. `samples`: (rows, sampled groups, their rewards) of each micro-batch."""
        config, model, distributed = self.config, self.model, self.distributed
        end_length = len(model.prompts.think_end_ids)
        scored = []  # per micro-batch: which groups count, and which CoT tokens are actions to score
        for _, sampled, rewards in samples:
            advantages, zero_spread = group_advantages(rewards, config.advantage)
            kept = ~zero_spread if config.drop_zero_spread else torch.ones_like(zero_spread)
            lengths = sampled["cot_tokens"] + end_length * sampled["ended"].long()  # a forced end marker is no action
            scored.append((advantages, zero_spread, kept, lengths))
        tokens = int(distributed.sum(sum((lengths * kept.repeat_interleave(config.group_size)).sum() for _, _, kept, lengths in scored)))
        sequences = config.batch_size * config.group_size
        normaliser = loss_normaliser(torch.tensor(float(tokens)), sequences, config.loss_normalisation, config.max_think_tokens).to(model.device)

        model.train()
        self.optimizer.zero_grad(set_to_none=True)
        totals = {"loss": 0.0, "kl": 0.0, "clipped": 0.0}
        for (rows, sampled, _), (advantages, _, kept, _) in zip(samples, scored):
            encoded = model.prompts.encode([prepared_input(row) for row in rows for _ in range(config.group_size)])
            with torch.no_grad(), self._reference_weights():
                reference_log_probs, _ = cot_log_probs(model, encoded, sampled["cot_ids"])
            log_probs, mask = cot_log_probs(model, encoded, sampled["cot_ids"])
            mask = mask.clone()  # the log-probabilities' graph holds the original
            mask[~sampled["ended"].to(model.device), -end_length:] = False
            mask &= kept.repeat_interleave(config.group_size).to(model.device)[:, None]
            surrogate, clipped = clipped_surrogate(
                log_probs, log_probs.detach(), advantages.flatten().to(model.device)[:, None], config.epsilon_low, config.epsilon_high
            )
            kl = k3_kl(log_probs, reference_log_probs)
            loss = ((-surrogate + config.kl_beta * kl) * mask).sum() / normaliser
            loss.backward()  # now, while the reasoning adapter is active
            totals["loss"] += loss.item()
            totals["kl"] += float((kl.detach() * mask).sum())
            totals["clipped"] += float((clipped & mask).sum())
        batch_loss = distributed.sum(torch.tensor(totals["loss"]))
        if not torch.isfinite(batch_loss):  # the same in every process, so all stop together
            raise FloatingPointError(f"loss became {batch_loss.item()} at step {self.step_done + 1}")
        distributed.sum_gradients(list(self.parameters.values()))
        model.eval()
        rewards = torch.cat([rewards for _, _, rewards in samples])
        every = {key: torch.cat([sampled[key] for _, sampled, _ in samples]) for key in ("cot_tokens", "ended")}
        zero_spread = torch.cat([zero for _, zero, _, _ in scored])
        scored_tokens = max(tokens, 1)
        # Processes hold equal shares, so means over the batch are means of their means.
        return {
            "loss": batch_loss.item(),
            "reward_mean": distributed.mean(rewards.mean()).item(),
            "reward_spread": distributed.mean(rewards.std(1).mean()).item(),
            "zero_spread_groups": distributed.mean(zero_spread.float().mean()).item(),
            "dropped_groups": int(distributed.sum(zero_spread.sum())) if config.drop_zero_spread else 0,
            "kl": distributed.sum(torch.tensor(totals["kl"])).item() / scored_tokens,
            "cot_tokens_mean": distributed.mean(every["cot_tokens"].float().mean()).item(),
            "ended_share": distributed.mean(every["ended"].float().mean()).item(),
            "clip_fraction": distributed.sum(torch.tensor(totals["clipped"])).item() / scored_tokens,
        }

    @torch.no_grad()
    def sample_groups(self, rows: list[dict], key: int | None = None, stream: int = 0) -> dict:
        """G CoTs per query from one prefill, and their embeddings; seeded by `key` (default: the step) and
        `stream` (a process's and micro-batch's own), so a resumed run samples the same CoTs as an uninterrupted one."""
        config, model = self.config, self.model
        key = self.step_done if key is None else key
        model.eval()
        inputs = [prepared_input(row) for row in rows]
        prefix, _ = model.prefill(model.prompts.encode(inputs))
        no_think = model.query_pass(prefix).float().cpu()
        repeated = torch.arange(len(rows), device=model.device).repeat_interleave(config.group_size)
        generator = torch.Generator(device=model.device).manual_seed(config.seed * 1_000_003 + key + stream * 1_000_000_007)
        sampling = Sampling(config.temperature, config.top_p, config.max_think_tokens, generator)
        cot_embeddings, thoughts = model.thought_embeddings(prefix.select(repeated), [inputs[row] for row in repeated.tolist()], sampling)
        cot_ids = [model.prompts.strip_end_marker(ids) for ids in thoughts.token_ids]
        return {
            "no_think": no_think,
            "cot_embeddings": cot_embeddings.float().cpu(),
            "cot_ids": cot_ids,
            "ended": torch.tensor([model.prompts.ends_with_marker(ids) for ids in thoughts.token_ids]),
            "cot_tokens": torch.tensor([len(ids) for ids in cot_ids]),
        }

    @torch.no_grad()
    def rewards(self, rows: list[dict], groups: dict, key: int | None = None, stream: int = 0) -> torch.Tensor:
        """[queries, G] rewards of sampled groups against the cache's negatives for each query (random
        negatives drawn as `sample_groups` draws CoTs: by `key` and `stream`)."""
        config = self.config
        key = self.step_done if key is None else key
        rng = random.Random(f"{config.seed}/{key}" + (f"/{stream}" if stream else ""))
        reward = REWARDS[config.reward]
        rewards = torch.empty(len(rows), config.group_size)
        for query, row in enumerate(rows):
            positive_ids = self.data.dataset.with_copies(row["positive_ids"])
            positives = self.candidates(row["positive_ids"]).float()
            negatives = self.cache.embeddings[
                pick_negatives(self.cache, groups["no_think"][query], positive_ids, config.hardest_negatives, config.random_negatives, rng)
            ]
            group = slice(query * config.group_size, (query + 1) * config.group_size)
            rewards[query] = (
                reward(groups["cot_embeddings"][group], positives, negatives, temperature=config.reward_temperature, top_n=config.reward_top_n)
                + format_reward(groups["ended"][group], config.format_reward)
                + length_cost(groups["cot_tokens"][group], config.token_cost)
            )
        return rewards

    def refresh_cache(self) -> None:
        """Re-embed every cache entry (a candidate of the prepared dataset) with the current model; processes
        share the blocks of entries."""
        self.model.eval()
        self.cache = NegativesCache(self.cache.ids, self.candidates.shared_by(self.distributed, self.cache.ids).float(), self.cache.path)

    # ------------------------------------------------------------------ the held-out score
    def heldout_reward(self, rows: list[dict]) -> float:
        """Mean reward over `rows` with CoTs sampled under one fixed seed (so that values at different steps
        compare). Processes share the batches."""
        def reward_sum(batch: list[dict]) -> float:
            return self.rewards(batch, self.sample_groups(batch, HELDOUT_KEY), HELDOUT_KEY).sum().item()

        batches = [rows[start : start + self.heldout_batch] for start in range(0, len(rows), self.heldout_batch)]
        total = sum(self.distributed.map_in_order(reward_sum, batches, prepare=lambda batch: batch))
        return total / (len(rows) * self.config.group_size)

    def heldout_hit(self, rows: list[dict]) -> float:
        """Always-think Hit@1 of `rows` (mean over tasks), each query's greedy CoT ranked against its own
        candidate pool, as `twn eval` scores it."""
        views = pool_views(self.model, self.data.dataset, rows, batch_size=self.heldout_batch, max_think_tokens=self.model.config.max_think_tokens)
        return weighted_hit_rate(views.hit_think, views.weights)

    def record_heldout(self, score: HeldoutScore) -> bool:
        """Note the held-out score at this step (a checkpoint); True when it has now fallen FALLS_TO_STOP times in a row.
        Ties keep the earlier checkpoint: RL must beat what it started from."""
        self.heldout.append(score)
        if score.rank() > max(earlier.rank() for earlier in self.heldout[:-1]):
            self.best = (score.step, {name: p.detach().clone() for name, p in self.parameters.items()})
        return self.falling()

    def falling(self) -> bool:
        """Whether the held-out score fell at the last FALLS_TO_STOP checkpoints (also read when resuming a run that stopped)."""
        recent = [entry.rank() for entry in self.heldout[-FALLS_TO_STOP - 1 :]]
        return len(recent) == FALLS_TO_STOP + 1 and all(later < earlier for earlier, later in zip(recent, recent[1:]))

    def measure_heldout(self, reward_rows: list[dict], hit_rows: list[dict], reference: bool = False) -> HeldoutScore:
        """The held-out score of the adapter now, or (`reference`) of the pre-RL one, at step 0."""
        with self._reference_weights() if reference else nullcontext():
            return HeldoutScore(
                0 if reference else self.step_done,
                self.heldout_reward(reward_rows) if reward_rows else None,
                self.heldout_hit(hit_rows) if hit_rows else None,
            )

    def keep_best(self) -> None:
        """Give the reasoning adapter the weights of the checkpoint with the best held-out score."""
        for name, p in self.parameters.items():
            p.data.copy_(self.best[1][name])

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
            "processes": self.distributed.world_size, "heldout": [asdict(score) for score in self.heldout], "best_step": self.best[0], "best_weights": self.best[1],
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("processes", 1) != self.distributed.world_size:
            log.warning("resuming on %d processes a run that had %d: each process samples its own stream, so the "
                        "run will not match an uninterrupted one", self.distributed.world_size, state.get("processes", 1))
        self.step_done = state["step"]
        self.optimizer.load_state_dict(state["optimizer"])
        restore_rng_state(state["rng"])
        self.heldout = [HeldoutScore(**entry) if isinstance(entry, dict) else HeldoutScore(*entry, None) for entry in state.get("heldout", [])]
        self.best = (state.get("best_step", 0), state.get("best_weights", self.reference))


def run_train_rl(
    model: TWNModel,
    dataset: PreparedDataset,
    cache: NegativesCache,
    run_dir: Path,
    config: TrainRLConfig,
    *,
    resume: bool = False,
    on_step: Callable[[dict], None] = lambda metrics: None,
) -> dict:
    """Train, saving a resumable state every `checkpoint_every` steps in `run_dir/train/states`, then the
    checkpoint in `run_dir` (by the first process); returns the summary, which twn.json keeps.

    `model` must hold the pre-RL adapters (the input checkpoint) also when resuming: they are the KL reference.
    """
    manifest = model.manifest or {"stages": []}
    stages = manifest["stages"] + [stage_record("train-rl", dataset, config, checkpoint=model.checkpoint_dir, negatives_cache=cache.path)]
    run = RunDirectory(run_dir, tensorboard=config.tensorboard)
    data = TrainingData(dataset, config.split, hard_negatives=0, seed=config.seed)
    reward_rows, hit_rows = [], []
    if config.validation_queries or config.heldout_hit_queries:
        if config.validation_split not in dataset.queries:
            raise TWNError(f"prepared dataset '{dataset.path}' has no '{config.validation_split}' split for the held-out score "
                           "(set validation_queries: 0 and heldout_hit_queries: 0 to train without it)")
        validation = dataset.queries[config.validation_split]
        reward_rows = [validation[i] for i in range(min(config.validation_queries, len(validation)))]
        hit_rows = [validation[i] for i in range(min(config.heldout_hit_queries, len(validation)))]
    measured = bool(reward_rows or hit_rows)
    if config.refresh_cache_every:
        unknown = next((item for item in cache.ids if item not in data.candidate_index), None)
        if unknown is not None:
            raise TWNError(f"negatives cache entry '{unknown}' is not a candidate of '{dataset.path}': only caches of the "
                           "dataset's candidates (twn embed DATA -o cache.pt) can be refreshed")
    distributed = Distributed()
    trainer = RLTrainer(model, data, cache, config, distributed)
    run.start(resume)  # in every process, so that all of them refuse a used directory, not only the first
    if resume:
        resume_latest_state(run, model, trainer, config, main_process=distributed.is_main, fixed=HELDOUT_SETTINGS)
        if config.refresh_cache_every and trainer.step_done:
            trainer.refresh_cache()
    if measured and not trainer.heldout:  # a resumed run has it from its state
        trainer.heldout.append(trainer.measure_heldout(reward_rows, hit_rows, reference=True))
    started = time.perf_counter()
    history, falling = [], trainer.falling()  # a resumed run that had stopped stays stopped
    while trainer.step_done < config.steps and not falling:
        metrics = run.guarded_step(trainer)
        if config.refresh_cache_every and trainer.step_done % config.refresh_cache_every == 0:
            trainer.refresh_cache()
            metrics["cache_refreshed"] = True
        if measured and (trainer.step_done % config.checkpoint_every == 0 or trainer.step_done == config.steps):
            score = trainer.measure_heldout(reward_rows, hit_rows)
            metrics.update({f"heldout_{name}": value for name, value in (("reward", score.reward), ("hit", score.hit)) if value is not None})
            falling = trainer.record_heldout(score)
        metrics["seconds"] = time.perf_counter() - started
        history.append(metrics)
        if distributed.is_main:
            run.after_step(model, trainer, metrics, total_steps=config.steps, log_every=config.log_every,
                           checkpoint_every=config.checkpoint_every, stages=stages)
        on_step(metrics)
    run.finish()
    kept_best = None
    best_step, _ = trainer.best
    kept = next((score for score in trainer.heldout if score.step == best_step), None)  # None: nothing measured
    if kept is not None and kept is not trainer.heldout[-1]:
        trainer.keep_best()
        kept_best = {
            "stopped_at_step": trainer.step_done,
            "step": best_step,
            "heldout_reward": kept.reward,
            "heldout_hit": kept.hit,
            "why": f"the held-out score fell at {FALLS_TO_STOP} checkpoints in a row" if falling else f"step {best_step} had the run's best held-out score",
        }
        log.warning("train-rl at step %d: %s; the checkpoint keeps the adapter of step %d", trainer.step_done, kept_best["why"], best_step)
    last = history[-min(len(history), 10) :]

    def heldout_summary(name: str, rows: list[dict]) -> dict | None:
        if not rows:
            return None
        return {
            "split": config.validation_split,
            "queries": len(rows),
            "before": getattr(trainer.heldout[0], name),
            "after": getattr(kept, name),  # the kept adapter's
            "by_step": [(score.step, getattr(score, name)) for score in trainer.heldout[1:]],
        }

    summary = {
        "steps": trainer.step_done,
        "negatives_cache_size": len(cache.ids),
        "cache_refreshes": sum(1 for m in history if m.get("cache_refreshed")),
        "heldout_reward": heldout_summary("reward", reward_rows),
        "heldout_hit": heldout_summary("hit", hit_rows),
        "kept_best": kept_best,
        # Means over the last (up to) ten steps of this process: a smoothed end point of the run.
        "final": {
            key: sum(m[key] for m in last) / len(last)
            for key in ("reward_mean", "reward_spread", "kl", "cot_tokens_mean", "ended_share", "zero_spread_groups")
        }
        if last
        else {},
    }
    if distributed.is_main:
        save_checkpoint(model, run_dir, stages=stages, extra={**stage_results(manifest), "train_rl": summary})
    return summary
