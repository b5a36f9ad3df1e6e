"""`twn train-embed`: joint training of the reasoning adapter (SFT on teacher CoT) and the embedding side.

One step, for a global batch of queries (docs/design.md):
1. the reasoning adapter prefills prompt + teacher CoT (teacher forcing): SFT cross-entropy on the CoT;
2. the embedding adapter and the queries read the *detached* cache of that same prefill twice, with the CoT
   (think view) and with the CoT masked out (no-think view); targets and hard negatives are embedded
   without thinking;
3. InfoNCE for each view against the batch's targets (in-batch negatives) and the hard negatives; a
   candidate that is also a positive of the query (several gold ids, shared labels) is masked, not a
   negative.
The SFT loss is backpropagated while the reasoning adapter is active, the contrastive loss while the
embedding adapter is: peft only lets the active adapter receive gradients.

Large batches use a gradient cache (Gao et al., 2021): embed the whole batch without gradients, take the
loss's gradient with respect to the embeddings, then re-run each chunk with gradients and backpropagate
those cached embedding gradients. The result is the gradient of the whole-batch loss with the memory of
one chunk. With several processes (torchrun / accelerate launch), each process holds a slice of the global
batch, embeddings are gathered so that every query sees the global batch's negatives, and the trainable
parameters' gradients are summed across processes. For large backbones the language model's frozen layer
weights can be sharded over the processes (`shard_backbone`, see `twn_cli.distributed.shard_language_model`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from twn_cli.data.prepared import PreparedDataset, prepared_input
from twn_cli.data.training_data import TrainingData
from twn_cli.distributed import Distributed, backbone_is_sharded
from twn_cli.engine.checkpoint import save_checkpoint
from twn_cli.engine.config import TWNConfig
from twn_cli.engine.decoding import Sampling
from twn_cli.engine.model import TWNModel
from twn_cli.engine.training_passes import teacher_cot_embeddings, training_views
from twn_cli.errors import TWNError
from twn_cli.eval.metrics import hit_at_1
from twn_cli.recipes import AT_LEAST_ONE, NOT_NEGATIVE, POSITIVE, check_ranges
from twn_cli.stages.common import CandidateEmbedder, stage_record
from twn_cli.training import (
    RunDirectory,
    finite_optimizer_step,
    restore_rng_state,
    resume_latest_state,
    rng_state,
    warmup_cosine,
)
from twn_cli.types import ModelInput

log = logging.getLogger(__name__)

# Settings that define the model (used when training starts from a backbone); the rest drive training.
MODEL_SETTINGS = (
    "lora_rank", "lora_alpha", "lora_dropout", "lora_target_modules", "num_queries", "pooling", "interface", "gate_hidden_size",
    "max_think_tokens", "temperature", "seed",
)


@dataclass
class TrainEmbedConfig:
    """Hyper-parameters of train-embed; recipes/<backbone>/train-embed.yaml sets them."""

    # The model, when training starts from a backbone (defaults: the engine's).
    lora_rank: int = TWNConfig.lora_rank
    lora_alpha: int = TWNConfig.lora_alpha
    lora_dropout: float = TWNConfig.lora_dropout
    lora_target_modules: list[str] | None = TWNConfig.lora_target_modules
    num_queries: int = TWNConfig.num_queries
    pooling: str = TWNConfig.pooling
    interface: str = TWNConfig.interface  # reasoning-prefill, embedding-prefill or reencode (docs/design.md)
    gate_hidden_size: int = TWNConfig.gate_hidden_size
    max_think_tokens: int = TWNConfig.max_think_tokens
    # The objective.
    temperature: float = TWNConfig.temperature
    sft_weight: float = 1.0
    think_view_weight: float = 1.0
    no_think_view_weight: float = 1.0
    hard_negatives: int = 1
    # Optimisation.
    steps: int = 300
    batch_size: int = 32
    chunk_size: int = 32
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 20
    max_grad_norm: float = 1.0  # each adapter's gradient (the embedding side with its queries) clipped on its own
    # Recompute each decoder layer's activations in backward instead of keeping them: less memory, one more
    # forward. Safe with two adapters because every loss is backpropagated while its own adapter is active,
    # so the recomputation runs the adapter that ran forward (peft issue 2832). interface reasoning-prefill only.
    gradient_checkpointing: bool = False
    # Under several processes, keep one share of each language-model layer's frozen weights per process
    # (FSDP2), gathered layer by layer as it runs: for backbones too large for one device. Adapters,
    # queries and gate stay whole, so results match an unsharded run. interface reasoning-prefill only.
    shard_backbone: bool = False
    # Bookkeeping.
    checkpoint_every: int = 100
    log_every: int = 10
    tensorboard: bool = False  # also log the metrics as TensorBoard scalars in RUN/train/tensorboard
    validation_queries: int = 200
    split: str = "train"
    validation_split: str = "validation"
    seed: int = 0

    def __post_init__(self):
        if self.batch_size < 2:
            raise TWNError("batch_size must be at least 2: InfoNCE needs in-batch negatives")
        check_ranges(self, {
            "temperature": POSITIVE, "sft_weight": NOT_NEGATIVE, "think_view_weight": NOT_NEGATIVE,
            "no_think_view_weight": NOT_NEGATIVE, "hard_negatives": NOT_NEGATIVE, "steps": AT_LEAST_ONE,
            "chunk_size": AT_LEAST_ONE, "learning_rate": POSITIVE, "weight_decay": NOT_NEGATIVE,
            "warmup_steps": NOT_NEGATIVE, "max_grad_norm": POSITIVE, "checkpoint_every": AT_LEAST_ONE,
            "log_every": AT_LEAST_ONE, "validation_queries": NOT_NEGATIVE,
        })
        model = self.model_config()  # checks the model settings too, before a model is built from them
        # Under the other interfaces InfoNCE trains the prompt prefill through its KV cache: checkpointed layers
        # keep no cache, and FSDP2 frees a sharded layer's gathered weights before the query passes read the cache.
        for name in ("gradient_checkpointing", "shard_backbone"):
            if getattr(self, name) and model.interface != "reasoning-prefill":
                raise TWNError(f"{name} works with interface reasoning-prefill only, not {model.interface}")

    def model_config(self) -> TWNConfig:
        return TWNConfig(**{name: getattr(self, name) for name in MODEL_SETTINGS})


def contrastive_loss(
    think: torch.Tensor,
    no_think: torch.Tensor,
    targets: torch.Tensor,
    negatives: torch.Tensor,
    candidate_ids: list[str],
    positive_ids: list[set[str]],
    config: TrainEmbedConfig,
) -> torch.Tensor:
    """Weighted InfoNCE of both query views against targets + hard negatives, other positives masked.

    `candidate_ids` names the columns (targets then negatives); query i's own target is column i.
    """
    candidates = torch.cat([targets, negatives])
    own = torch.arange(len(think), device=think.device)
    also_positive = torch.tensor(
        [[candidate in positives for candidate in candidate_ids] for positives in positive_ids], device=think.device
    )
    also_positive[own, own] = False
    loss = think.new_zeros(())
    for weight, queries in ((config.think_view_weight, think), (config.no_think_view_weight, no_think)):
        if weight:
            logits = (queries @ candidates.T / config.temperature).masked_fill(also_positive, float("-inf"))
            loss = loss + weight * F.cross_entropy(logits, own)
    return loss


class EmbedTrainer:
    """One model, one dataset, one optimiser: `step()` does a full (chunked) update."""

    def __init__(self, model: TWNModel, data: TrainingData, config: TrainEmbedConfig, distributed: Distributed | None = None):
        self.model = model
        self.data = data
        self.config = config
        self.distributed = distributed or Distributed()
        if config.batch_size % self.distributed.world_size:
            raise TWNError(f"batch_size {config.batch_size} must divide evenly over {self.distributed.world_size} processes")
        if config.gradient_checkpointing:
            self._enable_checkpointing()
        parts = model.trainable_parameters()
        self.parameters = {**parts["reasoning"], **parts["embedding"]}
        self.clipping_groups = [list(parts["reasoning"].values()), list(parts["embedding"].values())]  # SFT's and InfoNCE's
        self.optimizer = torch.optim.AdamW(
            list(self.parameters.values()), lr=config.learning_rate, weight_decay=config.weight_decay
        )
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_cosine(config.warmup_steps, config.steps))
        self.step_done = 0

    # ------------------------------------------------------------------ one update
    def step(self) -> dict:
        """Train on global batch number `step_done`: gradients, clipping, one optimiser step (unless anything is
        non-finite: FloatingPointError); returns its losses."""
        metrics = self.compute_gradients()
        metrics["grad_norm"] = finite_optimizer_step(self.optimizer, self.clipping_groups, self.config.max_grad_norm, self.step_done + 1)
        self.schedule.step()
        self.step_done += 1
        metrics["learning_rate"] = self.schedule.get_last_lr()[0]
        return metrics

    def compute_gradients(self) -> dict:
        """The whole global batch's gradient in the trainable parameters (summed over processes)."""
        config, model = self.config, self.model
        indices = self.data.batch_indices(self.step_done, config.batch_size)
        share = config.batch_size // self.distributed.world_size
        local = indices[self.distributed.rank * share : (self.distributed.rank + 1) * share]
        examples = self.data.examples(local, self.step_done)
        model.train()
        self.optimizer.zero_grad(set_to_none=True)

        cot_ids = model.prompts.cot_token_ids([example.cot or "" for example in examples])
        cot_ids = [ids if example.cot else None for ids, example in zip(cot_ids, examples)]
        sft_tokens = sum(len(ids) + len(model.prompts.think_end_ids) for ids in cot_ids if ids is not None)
        sft_tokens = int(self.distributed.gather(torch.tensor([sft_tokens])).sum())

        chunks = [range(start, min(start + config.chunk_size, len(examples))) for start in range(0, len(examples), config.chunk_size)]
        candidate_ids = self.distributed.gather_objects([e.target_id for e in examples]) + self.distributed.gather_objects(
            [candidate for e in examples for candidate in e.negative_ids]
        )
        positive_ids = self.distributed.gather_objects([e.positive_ids for e in examples])
        sft_values: list[float] = []
        if len(chunks) == 1 and not self.distributed.active:
            # The whole batch fits one chunk: one pass with gradients is the gradient cache's result without
            # its extra no-gradient pass (the same gradient, and the RNG advances by the same one pass).
            outputs = self._forward_chunk(examples, cot_ids, chunks[0], self._sft_backward(sft_tokens, sft_values))
            contrastive = contrastive_loss(**outputs, candidate_ids=candidate_ids, positive_ids=positive_ids, config=config)
            contrastive.backward()
        else:
            rng_states = []
            with torch.no_grad():
                embedded = [self._embed_chunk(examples, cot_ids, chunk, rng_states) for chunk in chunks]
            local_reps = {key: torch.cat([part[key] for part in embedded]) for key in ("think", "no_think", "targets", "negatives")}
            global_reps = {key: self.distributed.gather(value).detach().requires_grad_() for key, value in local_reps.items()}
            contrastive = contrastive_loss(**global_reps, candidate_ids=candidate_ids, positive_ids=positive_ids, config=config)
            contrastive.backward()
            offset = self.distributed.rank * share
            upstream = {
                "think": global_reps["think"].grad[offset : offset + share],
                "no_think": global_reps["no_think"].grad[offset : offset + share],
                "targets": global_reps["targets"].grad[offset : offset + share],
                "negatives": global_reps["negatives"].grad[offset * config.hard_negatives : (offset + share) * config.hard_negatives],
            }
            for chunk, state in zip(chunks, rng_states):
                self._backward_chunk(examples, cot_ids, chunk, state, upstream, self._sft_backward(sft_tokens, sft_values))
        sft_loss = float(self.distributed.gather(torch.tensor([sum(sft_values)])).sum()) / max(sft_tokens, 1)
        total = contrastive.item() + config.sft_weight * sft_loss
        if not torch.isfinite(torch.tensor(total)):
            raise FloatingPointError(f"loss became {total} at step {self.step_done + 1}")

        self.distributed.sum_gradients(list(self.parameters.values()))
        model.eval()
        return {"step": self.step_done + 1, "loss": total, "contrastive_loss": contrastive.item(), "sft_loss": sft_loss}

    def _embed_chunk(self, examples, cot_ids, chunk, rng_states) -> dict:
        """The no-gradient pass of the gradient cache; remembers the RNG so the re-run matches it exactly."""
        rng_states.append(rng_state())
        return self._forward_chunk(examples, cot_ids, chunk)

    def _forward_chunk(self, examples, cot_ids, chunk, sft_backward: Callable[[torch.Tensor], None] | None = None) -> dict:
        model = self.model
        picked = [examples[i] for i in chunk]
        encoded = model.prompts.encode([e.query for e in picked])
        chunk_cots = [cot_ids[i] for i in chunk]
        forced = training_views(model, encoded, chunk_cots)
        if sft_backward is not None:
            sft_backward(forced)  # now, while the reasoning adapter is active
        if self.config.gradient_checkpointing and torch.is_grad_enabled():
            # Checkpointed layers keep no KV cache (their backward replay would write it twice): the views
            # come from a pass without gradients, which is all the detached interface needs anyway.
            with torch.no_grad():
                forced = training_views(model, encoded, chunk_cots)
        with self._query_passes():
            return {
                "think": model.query_pass(forced.think_view),
                "no_think": model.query_pass(forced.no_think_view),
                "targets": self._embed_candidates([e.target for e in picked]),
                "negatives": self._embed_candidates([n for e in picked for n in e.negatives]),
            }

    @contextmanager
    def _query_passes(self):
        """Query passes append K tokens to a cache, which checkpointed layers refuse; K tokens need no checkpointing."""
        if not self.config.gradient_checkpointing:
            yield
            return
        self.model.backbone.model.activation_checkpointing_disable()
        try:
            yield
        finally:
            self._enable_checkpointing()

    def _enable_checkpointing(self) -> None:
        self.model.backbone.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})

    def _embed_candidates(self, inputs: list[ModelInput]) -> torch.Tensor:
        """No-think embeddings. A reasoning-adapter prefill needs no graph (the queries read it detached); an
        embedding-adapter prefill is trained by InfoNCE like the queries."""
        if not inputs:
            return torch.empty(0, self.model.embedding_dim, device=self.model.device)
        with nullcontext() if self.model.config.prefill_adapter == "embedding" else torch.no_grad():
            prefix, _ = self.model.prefill(self.model.prompts.encode(inputs))
        return self.model.query_pass(prefix)

    def _sft_backward(self, sft_tokens: int, values: list[float]) -> Callable:
        """Backpropagates a chunk's SFT loss (a share of the batch's `sft_tokens`) and records its sum in `values`."""

        def backward(forced) -> None:
            values.append(forced.sft_loss_sum.item())
            # Also a chunk without CoT tokens (a zero loss): processes sharing a sharded backbone must run
            # the same backward passes.
            if self.config.sft_weight and sft_tokens:
                (self.config.sft_weight * forced.sft_loss_sum / sft_tokens).backward()

        return backward

    def _backward_chunk(self, examples, cot_ids, chunk, state, upstream, sft_backward: Callable) -> None:
        """Re-run one chunk with gradients: SFT backward, then the cached embedding gradients."""
        restore_rng_state(state)
        outputs = self._forward_chunk(examples, cot_ids, chunk, sft_backward)
        negatives = range(chunk.start * self.config.hard_negatives, chunk.stop * self.config.hard_negatives)
        surrogate = sum(
            (outputs[key] * upstream[key][rows]).sum()
            for key, rows in (("think", chunk), ("no_think", chunk), ("targets", chunk), ("negatives", negatives))
        )
        surrogate.backward()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {
            "step": self.step_done,
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "rng": rng_state(),
            "config": asdict(self.config),
        }

    def load_state_dict(self, state: dict) -> None:
        self.step_done = state["step"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        restore_rng_state(state["rng"])


@torch.no_grad()
def validation_hit_at_1(
    model: TWNModel, dataset: PreparedDataset, split: str, limit: int, batch_size: int = 16, lockstep: bool = False
) -> dict[str, float]:
    """Hit@1 of up to `limit` queries of `split` against their pools: never-think, teacher CoT, generated CoT.

    `lockstep`: every CoT batch runs its whole token budget, so that processes sharing a sharded backbone
    make the same layer calls even if their decoding differed.
    """
    rows = dataset.queries[split].select(range(min(limit, len(dataset.queries[split]))))
    pools = [dataset.candidate_pool(row) for row in rows]
    needed = sorted({candidate for pool in pools for candidate in pool})
    candidate_embeddings = dict(zip(needed, CandidateEmbedder(model, dataset.candidates, batch_size)(needed).to(model.device)))
    hits = {"never": 0, "teacher_cot": 0, "generated_cot": 0}
    for start in range(0, len(rows), batch_size):
        batch = [rows[i] for i in range(start, min(start + batch_size, len(rows)))]
        inputs = [prepared_input(row) for row in batch]
        views = {
            "never": model.embed(inputs).embeddings,
            "teacher_cot": teacher_cot_embeddings(model, inputs, [row["cot"] for row in batch]),
            "generated_cot": model.embed(inputs, think="always", sampling=Sampling(stop_early=not lockstep)).embeddings,
        }
        for offset, row in enumerate(batch):
            pool = pools[start + offset]
            pool_embeddings = torch.stack([candidate_embeddings[c] for c in pool])
            gold = torch.tensor([candidate in row["positive_ids"] for candidate in pool])
            for name, queries in views.items():
                hits[name] += hit_at_1(pool_embeddings @ queries[offset], gold)
    return {f"hit@1_{name}": count / len(rows) for name, count in hits.items()}


def run_train_embed(
    model: TWNModel,
    dataset: PreparedDataset,
    run_dir: Path,
    config: TrainEmbedConfig,
    *,
    resume: bool = False,
    on_step: Callable[[dict], None] = lambda metrics: None,
) -> dict:
    """Train, saving a resumable state every `checkpoint_every` steps in `run_dir/train/states`, then the
    checkpoint in `run_dir` (by the first process); returns the summary, which twn.json keeps."""
    stages = (model.manifest["stages"] if model.manifest else []) + [stage_record("train-embed", dataset, config, checkpoint=model.checkpoint_dir)]
    distributed = Distributed()
    run = RunDirectory(run_dir, tensorboard=config.tensorboard)
    data = TrainingData(dataset, config.split, config.hard_negatives, config.seed)
    trainer = EmbedTrainer(model, data, config, distributed)
    run.start(resume)  # in every process, so that all of them refuse a used directory, not only the first
    if resume:
        resume_latest_state(run, model, trainer, config, main_process=distributed.is_main)
    started = time.perf_counter()
    samples = 0
    while trainer.step_done < config.steps:
        metrics = run.guarded_step(trainer)
        samples += config.batch_size
        metrics["samples_per_second"] = samples / (time.perf_counter() - started)
        if distributed.is_main:
            run.after_step(model, trainer, metrics, total_steps=config.steps, log_every=config.log_every,
                           checkpoint_every=config.checkpoint_every, stages=stages)
        on_step(metrics)
    run.finish()
    summary = {"steps": trainer.step_done, "parameters": model.parameter_overhead()}
    # A sharded backbone runs only in lockstep, so every process then computes the same validation.
    sharded = backbone_is_sharded(model)
    if (distributed.is_main or sharded) and config.validation_queries and config.validation_split in dataset.queries:
        summary["validation"] = validation_hit_at_1(model, dataset, config.validation_split, config.validation_queries, lockstep=sharded)
    if distributed.is_main:
        save_checkpoint(model, run_dir, stages=stages, extra={"train_embed": summary})
    return summary

