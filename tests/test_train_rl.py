"""train-rl: GRPO maths on hand-computed cases, rewards, the cache's checks, what a step trains, resume, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import cache_for
from typer.testing import CliRunner

from twn_cli.cli import app
from twn_cli.data.embedding_files import EmbeddingBatch, EmbeddingWriter, read_embeddings
from twn_cli.data.inputs import read_inputs
from twn_cli.data.negatives_cache import NegativesCache, load_negatives_cache
from twn_cli.data.prepared import load_prepared, prepared_input
from twn_cli.data.training_data import TrainingData
from twn_cli.engine.checkpoint import load_checkpoint, read_manifest, save_checkpoint
from twn_cli.engine.config import INTERFACES
from twn_cli.engine.decoding import Sampling
from twn_cli.engine.training_passes import cot_log_probs, training_views
from twn_cli.errors import TWNError
from twn_cli.eval.metrics import hit_at_1
from twn_cli.stages import train_rl
from twn_cli.stages.common import CandidateEmbedder
from twn_cli.stages.grpo import (
    clipped_surrogate,
    embed_rl_reward,
    group_advantages,
    hit_reward,
    k3_kl,
    loss_normaliser,
    softmax_reward,
    ume_r1_reward,
)
from twn_cli.stages.train_rl import RLTrainer, TrainRLConfig, run_train_rl

SMALL = dict(batch_size=2, group_size=3, max_think_tokens=5, learning_rate=1e-2, hardest_negatives=8, random_negatives=4, validation_queries=3)


class NotATensor:
    """A custom class: unpickling it would run code that `weights_only=True` refuses."""


# ------------------------------------------------------------------------------------------- maths
def test_group_advantages_normalise_each_group_and_count_zero_spread():
    advantages, zero_spread = group_advantages(torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0]]))
    std = math.sqrt(5 / 3)  # unbiased std of 1, 2, 3, 4
    expected = torch.tensor([-1.5, -0.5, 0.5, 1.5]) / (std + 1e-4)
    assert torch.allclose(advantages[0], expected)
    assert torch.equal(advantages[1], torch.zeros(4))
    assert zero_spread.tolist() == [False, True]


def test_mean_advantages_keep_the_size_of_a_groups_differences():
    """Dr. GRPO: r - mean, with no division by the spread: a group of near-equal rewards keeps small advantages."""
    rewards = torch.tensor([[0.30, 0.31, 0.29, 0.30], [1.0, 0.0, 0.0, 0.0]])
    advantages, zero_spread = group_advantages(rewards, "mean")
    assert torch.allclose(advantages, torch.tensor([[0.0, 0.01, -0.01, 0.0], [0.75, -0.25, -0.25, -0.25]]), atol=1e-6)
    standardised, _ = group_advantages(rewards, "grpo")
    assert float(standardised[0].abs().max()) > 1.2  # GRPO blows the first group's 0.01 up past 1
    assert zero_spread.tolist() == [False, False]


def test_the_loss_is_divided_by_the_tokens_or_by_a_constant_budget():
    tokens = torch.tensor(37.0)
    assert float(loss_normaliser(tokens, sequences=6, kind="tokens", max_think_tokens=32)) == 37.0
    assert float(loss_normaliser(tokens, sequences=6, kind="budget", max_think_tokens=32)) == 6 * 32
    assert float(loss_normaliser(torch.tensor(0.0), sequences=6, kind="tokens", max_think_tokens=32)) == 1.0


def test_clipped_surrogate_takes_the_pessimistic_term_with_asymmetric_epsilon():
    ratios = torch.tensor([1.5, 0.5, 0.5, 1.5])
    advantages = torch.tensor([1.0, 1.0, -1.0, -1.0])
    surrogate, clipped = clipped_surrogate(ratios.log(), torch.zeros(4), advantages, 0.2, 0.28)
    # ρ=1.5, A=+1: min(1.5, 1.28); ρ=0.5, A=+1: min(0.5, 0.8); ρ=0.5, A=-1: min(-0.5, -0.8); ρ=1.5, A=-1: min(-1.5, -1.28).
    assert torch.allclose(surrogate, torch.tensor([1.28, 0.5, -0.8, -1.5]))
    assert clipped.tolist() == [True, False, True, False]


def test_k3_kl_matches_the_hand_computed_value_and_is_zero_at_the_reference():
    log_probs, reference = torch.tensor([math.log(0.5), -1.0]), torch.tensor([math.log(0.25), -1.0])
    # ref - logp = log 0.5: 0.5 - log 0.5 - 1
    assert torch.allclose(k3_kl(log_probs, reference), torch.tensor([0.5 + math.log(2) - 1, 0.0]))


def test_softmax_reward_is_the_positive_probability():
    cots = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    reward = softmax_reward(cots, torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), temperature=1.0, top_n=1)
    e = math.e
    assert torch.allclose(reward, torch.tensor([e / (e + 1), 1 / (e + 1)]))


def test_ume_r1_reward_is_top_k_share_times_similarity_gap():
    cots = torch.tensor([[1.0, 0.0], [-0.6, 0.8]])
    positives = torch.tensor([[1.0, 0.0]])
    negatives = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    reward = ume_r1_reward(cots, positives, negatives, temperature=1.0, top_n=2)
    # First CoT: the positive ranks first (share 1), gap 1 - (0 + -1)/2 = 1.5. Second: both negatives outrank it.
    assert torch.allclose(reward, torch.tensor([1.5, 0.0]))


def test_embed_rl_reward_is_half_top_n_share_and_half_the_gap_to_softmax_weighted_negatives():
    cots = torch.tensor([[1.0, 0.0], [-0.6, 0.8]])
    positives = torch.tensor([[1.0, 0.0]])
    negatives = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    reward = embed_rl_reward(cots, positives, negatives, temperature=0.5, top_n=1)
    # First CoT: similarities to the negatives 0 and -1, weights softmax(0/0.5, -1/0.5) = (1, e^-2)/(1 + e^-2).
    first_weighted = (0.0 * 1 + -1.0 * math.exp(-2)) / (1 + math.exp(-2))
    # Second: 0.8 and 0.6 to the negatives (the first is nearest: no positive in the top 1), -0.6 to the positive.
    second_weighted = (0.8 * math.exp(1.6) + 0.6 * math.exp(1.2)) / (math.exp(1.6) + math.exp(1.2))
    expected = torch.tensor([0.5 * 1 + 0.5 * (1.0 - first_weighted), 0.5 * 0 + 0.5 * (-0.6 - second_weighted)])
    assert torch.allclose(reward, expected, atol=1e-6)


def test_hit_reward_is_the_share_of_positives_among_the_nearest():
    cots = torch.tensor([[1.0, 0.0], [0.6, 0.8], [-0.6, 0.8]])
    positives = torch.tensor([[1.0, 0.0], [0.8, 0.6]])
    negatives = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    # Similarities to (positive, positive, negative, negative): first CoT 1, 0.8, 0, -1; second 0.6, 0.96,
    # 0.8, -0.6; third -0.6, 0.0, 0.8, 0.6.
    assert torch.equal(hit_reward(cots, positives, negatives, temperature=1.0, top_n=1), torch.tensor([1.0, 1.0, 0.0]))
    assert torch.equal(hit_reward(cots, positives, negatives, temperature=1.0, top_n=2), torch.tensor([1.0, 0.5, 0.0]))


# ------------------------------------------------------------------------------------------- the cache
def write_pt(path, ids, embeddings, **more):
    torch.save({"ids": ids, "embeddings": embeddings, **more}, path)
    return path


def test_cache_checks_refuse_bad_files(tmp_path):
    good = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    assert load_negatives_cache(write_pt(tmp_path / "ok.pt", ["a", "b", "c"], good.half()), 8).embeddings.dtype == torch.float32
    with pytest.raises(TWNError, match="8-dimensional embeddings, the checkpoint makes 16"):
        load_negatives_cache(write_pt(tmp_path / "dim.pt", ["a", "b", "c"], good), 16)
    with pytest.raises(TWNError, match="holds id 'a' more than once"):
        load_negatives_cache(write_pt(tmp_path / "dup.pt", ["a", "b", "a"], good), 8)
    poisoned = good.clone()
    poisoned[1, 2] = float("nan")
    with pytest.raises(TWNError, match="non-finite values"):
        load_negatives_cache(write_pt(tmp_path / "nan.pt", ["a", "b", "c"], poisoned), 8)
    with pytest.raises(TWNError, match="refused to unpickle"):
        load_negatives_cache(write_pt(tmp_path / "code.pt", ["a", "b", "c"], good, extra=NotATensor()), 8)
    with pytest.raises(TWNError, match="no 'ids' and 'embeddings'"):
        torch.save({"vectors": good}, tmp_path / "keys.pt")
        load_negatives_cache(tmp_path / "keys.pt", 8)


def test_cache_reads_safetensors_written_by_twn_embed(tmp_path):
    writer = EmbeddingWriter(str(tmp_path / "cache.safetensors"), {"embedding_dim": 8})
    writer.add(EmbeddingBatch(["x", "y"], torch.randn(2, 8), [False, False], [0.0, 0.0], ["", ""], [0, 0]))
    cache = load_negatives_cache(writer.close(), 8)
    assert cache.ids == ["x", "y"] and cache.embeddings.shape == (2, 8)


def test_read_inputs_gives_a_prepared_datasets_candidates(toy_dataset_dir):
    records = list(read_inputs(str(toy_dataset_dir)))
    candidates = load_prepared(toy_dataset_dir).candidates
    assert [record.id for record in records] == list(candidates["id"])
    assert len({record.id for record in records}) == len(records)
    for record, row in zip(records[:20], candidates.select(range(20))):
        loaded, expected = record.load(), prepared_input(row)
        assert (loaded.text, loaded.instruction, len(loaded.images)) == (expected.text, expected.instruction, len(expected.images))


# ------------------------------------------------------------------------------------------- training
@pytest.fixture
def setup(make_model, toy_dataset_dir):
    dataset = load_prepared(toy_dataset_dir)
    model = make_model()
    return model, dataset, cache_for(model, dataset)


@pytest.mark.parametrize("interface", INTERFACES)
def test_steps_train_only_the_reasoning_adapter(make_model, toy_dataset_dir, interface):
    """The stage's own steps with every parameter of the model in its optimiser: only the reasoning adapter moves."""
    model, dataset = make_model(interface=interface), load_prepared(toy_dataset_dir)
    trainer = RLTrainer(model, TrainingData(dataset, "train", 0, 0), cache_for(model, dataset), TrainRLConfig(**SMALL))
    trainer.optimizer = torch.optim.AdamW(model.parameters(), lr=SMALL["learning_rate"])
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for _ in range(2):  # LoRA A only gets a gradient once B has left zero
        metrics = trainer.step()
    assert metrics["kl"] > 0 and metrics["clip_fraction"] == 0.0  # one update per batch: ratio 1
    trained = {name for name, p in model.named_parameters() if not torch.equal(before[name], p.detach())}
    assert trained == {name for name in before if "lora_" in name and ".reasoning." in name}


def split_samples(rows: list[dict], sampled: dict, rewards: torch.Tensor, group_size: int, parts: int) -> list:
    """One micro-batch's (rows, sampled groups, rewards) as `parts` micro-batches of the same samples."""
    size = len(rows) // parts
    pieces = []
    for part in range(parts):
        queries, cots = slice(part * size, (part + 1) * size), slice(part * size * group_size, (part + 1) * size * group_size)
        piece = {key: value[queries] if key == "no_think" else value[cots] for key, value in sampled.items()}
        pieces.append((rows[queries], piece, rewards[queries]))
    return pieces


def gradient(trainer: RLTrainer, samples: list) -> dict[str, torch.Tensor]:
    trainer.policy_gradient(samples)
    return {name: p.grad.clone() for name, p in trainer.parameters.items()}


@pytest.mark.parametrize("advantage, normalisation", [("grpo", "tokens"), ("mean", "budget")])
def test_micro_batches_accumulate_the_whole_batchs_gradient(setup, advantage, normalisation):
    model, dataset, cache = setup
    with torch.no_grad():  # a reasoning adapter that is not the reference, so that the KL term has a gradient
        for parameter in model.adapter_parameters("reasoning").values():
            parameter.add_(0.01 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(0)))
    config = TrainRLConfig(**{**SMALL, "batch_size": 4, "advantage": advantage, "loss_normalisation": normalisation})
    trainer = RLTrainer(model, TrainingData(dataset, "train", 0, 0), cache, config)
    trainer.reference = {name: p + 0.01 for name, p in trainer.reference.items()}
    rows = trainer.local_rows()
    sampled = trainer.sample_groups(rows)
    rewards = trainer.rewards(rows, sampled)
    whole = gradient(trainer, [(rows, sampled, rewards)])
    accumulated = gradient(trainer, split_samples(rows, sampled, rewards, config.group_size, parts=2))
    assert any(float(g.abs().sum()) > 0 for g in whole.values())
    for name, value in whole.items():
        assert torch.allclose(accumulated[name], value, rtol=1e-3, atol=1e-6), name  # prompts padded to other lengths


def test_groups_without_spread_can_be_left_out_of_the_loss(setup):
    """A group whose CoTs all earned the same reward, left out, adds nothing (its KL term included) and its
    tokens do not count: the batch's gradient is that of the other groups alone."""
    model, dataset, cache = setup
    with torch.no_grad():  # a reasoning adapter that is not the reference, so that every group's KL term has a gradient
        for parameter in model.adapter_parameters("reasoning").values():
            parameter.add_(0.01 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(0)))
    data = TrainingData(dataset, "train", 0, 0)
    kept, dropped = (RLTrainer(model, data, cache, TrainRLConfig(**SMALL, drop_zero_spread=drop)) for drop in (False, True))
    for trainer in (kept, dropped):
        trainer.reference = {name: p + 0.01 for name, p in trainer.reference.items()}
    rows = kept.local_rows()
    sampled = kept.sample_groups(rows)
    rewards = kept.rewards(rows, sampled)
    rewards[1] = 0.5  # the second query's group has no spread
    first_group_alone = gradient(kept, split_samples(rows, sampled, rewards, SMALL["group_size"], parts=2)[:1])
    assert dropped.policy_gradient([(rows, sampled, rewards)])["dropped_groups"] == 1
    for name, parameter in dropped.parameters.items():
        assert torch.allclose(parameter.grad, first_group_alone[name], rtol=1e-3, atol=1e-6), name  # prompts padded to other lengths
    assert not all(torch.allclose(gradient(kept, [(rows, sampled, rewards)])[name], first_group_alone[name], rtol=1e-3, atol=1e-6)
                   for name in first_group_alone)


def test_a_step_makes_the_better_rewarded_cots_more_likely(setup):
    """The policy gradient points uphill: after one step on a batch (no KL), each CoT's log-likelihood moved
    with its own advantage: a flipped sign, a detached ratio or advantages paired with other CoTs fail."""
    model, dataset, cache = setup
    trainer = RLTrainer(model, TrainingData(dataset, "train", 0, 0), cache, TrainRLConfig(**{**SMALL, "batch_size": 4, "group_size": 4, "kl_beta": 0.0}))
    rows = trainer.local_rows()
    sampled = trainer.sample_groups(rows)
    rewards = trainer.rewards(rows, sampled)
    advantages, zero_spread = group_advantages(rewards)
    assert not zero_spread.all()
    encoded = model.prompts.encode([prepared_input(row) for row in rows for _ in range(trainer.config.group_size)])

    def cot_log_likelihoods() -> torch.Tensor:
        with torch.no_grad():
            log_probs, mask = cot_log_probs(model, encoded, sampled["cot_ids"])
        mask[~sampled["ended"], -len(model.prompts.think_end_ids):] = False  # an end marker forced by the budget is no action
        return (log_probs * mask).sum(1)

    before = cot_log_likelihoods()
    trainer.update([(rows, sampled, rewards)])
    moved = cot_log_likelihoods() - before
    # Near-proportional with Adam's first step (0.94 here); CoTs paired with another CoT's advantage give 0.24.
    assert float(torch.corrcoef(torch.stack([advantages.flatten(), moved]))[0, 1]) > 0.7


def weights_at_checkpoints(monkeypatch) -> dict[int, dict[str, torch.Tensor]]:
    """The reasoning adapter's weights at each checkpoint a run records, by step (filled as the run goes)."""
    weights_at = {}
    record = RLTrainer.record_heldout

    def remember(self, score):
        weights_at[self.step_done] = {name: p.detach().clone() for name, p in self.parameters.items()}
        return record(self, score)

    monkeypatch.setattr(RLTrainer, "record_heldout", remember)
    return weights_at


def test_a_run_whose_heldout_reward_falls_twice_in_a_row_stops_and_keeps_its_best_checkpoint(setup, make_model, tmp_path, monkeypatch):
    model, dataset, cache = setup
    rewards = iter([0.30, 0.32, 0.35, 0.33, 0.31, 0.40])  # before RL, then steps 1-5: best at step 2, falls at 3 and 4
    monkeypatch.setattr(RLTrainer, "heldout_reward", lambda self, rows: next(rewards))
    weights_at = weights_at_checkpoints(monkeypatch)
    summary = run_train_rl(model, dataset, cache, tmp_path / "rl", TrainRLConfig(**SMALL, steps=5, checkpoint_every=1))
    assert summary["steps"] == 4 and summary["kept_best"] == {
        "stopped_at_step": 4, "step": 2, "heldout_reward": 0.35, "heldout_hit": None, "why": "the held-out score fell at 2 checkpoints in a row"
    }
    assert summary["heldout_reward"]["before"] == 0.30 and summary["heldout_reward"]["after"] == 0.35
    saved = load_checkpoint(tmp_path / "rl", device="cpu")
    for name, parameter in saved.adapter_parameters("reasoning").items():
        assert torch.equal(parameter.detach(), weights_at[2][name]), name
    assert not all(torch.equal(weights_at[4][name], weights_at[2][name]) for name in weights_at[2])
    # Resumed, a run that stopped stays stopped: no step is taken, and the best checkpoint is kept again.
    resumed = run_train_rl(make_model(), dataset, cache, tmp_path / "rl", TrainRLConfig(**SMALL, steps=5, checkpoint_every=1), resume=True)
    assert resumed["steps"] == 4 and resumed["kept_best"]["step"] == 2 and resumed["heldout_reward"]["after"] == 0.35


def test_resuming_with_other_heldout_settings_is_refused(setup, make_model, tmp_path):
    """The scores before and after would measure different things, and the best checkpoint would be chosen across them."""
    _, dataset, cache = setup
    config = TrainRLConfig(**SMALL, steps=1, checkpoint_every=1)
    run_train_rl(make_model(), dataset, cache, tmp_path / "rl", config)
    for key, value in (("heldout_hit_queries", 2), ("validation_queries", 2)):
        with pytest.raises(TWNError, match=f"trained with {key}: .*resume with the same setting"):
            run_train_rl(make_model(), dataset, cache, tmp_path / "rl", TrainRLConfig(**{**SMALL, key: value}, steps=2, checkpoint_every=1), resume=True)


@pytest.mark.parametrize(
    ("hits", "rewards", "kept_step"),
    [
        ([0.50, 0.60, 0.55], [0.30, 0.20, 0.40], 1),  # Hit@1 outranks the reward
        ([0.50, 0.50, 0.50], [0.30, 0.20, 0.30], 0),  # a tie keeps the earlier checkpoint: RL must beat pre-RL
    ],
)
def test_the_run_keeps_its_checkpoint_with_the_best_heldout_hit_at_1(setup, tmp_path, monkeypatch, hits, rewards, kept_step):
    model, dataset, cache = setup
    hit_values, reward_values = iter(hits), iter(rewards)
    monkeypatch.setattr(RLTrainer, "heldout_hit", lambda self, rows: next(hit_values))
    monkeypatch.setattr(RLTrainer, "heldout_reward", lambda self, rows: next(reward_values))
    weights_at = weights_at_checkpoints(monkeypatch)
    weights_at[0] = {name: p.detach().clone() for name, p in model.adapter_parameters("reasoning").items()}
    summary = run_train_rl(model, dataset, cache, tmp_path / "rl", TrainRLConfig(**SMALL, steps=2, checkpoint_every=1, heldout_hit_queries=4))
    assert summary["steps"] == 2 and summary["kept_best"] == {
        "stopped_at_step": 2, "step": kept_step, "heldout_reward": rewards[kept_step], "heldout_hit": hits[kept_step],
        "why": f"step {kept_step} had the run's best held-out score",
    }
    assert summary["heldout_hit"] == {"split": "validation", "queries": 4, "before": hits[0], "after": hits[kept_step], "by_step": [(1, hits[1]), (2, hits[2])]}
    assert summary["heldout_reward"]["after"] == rewards[kept_step]
    saved = load_checkpoint(tmp_path / "rl", device="cpu")
    for name, parameter in saved.adapter_parameters("reasoning").items():
        assert torch.equal(parameter.detach(), weights_at[kept_step][name]), name
    assert not all(torch.equal(weights_at[2][name], weights_at[kept_step][name]) for name in weights_at[2])


def test_heldout_hit_is_always_think_hit_at_1_of_each_query_against_its_own_pool(make_model, toy_dataset_dir):
    """What `twn eval --mode always` scores: the greedy CoT's embedding ranked in the query's pool, a mean over tasks."""
    dataset = load_prepared(toy_dataset_dir)
    model = make_model()
    torch.manual_seed(0)
    with torch.no_grad():  # two different non-zero adapters, so that the views differ
        for part in model.trainable_parameters().values():
            for parameter in part.values():
                parameter.add_(0.2 * torch.randn_like(parameter))
    trainer = RLTrainer(model, TrainingData(dataset, "train", 0, 0), NegativesCache(["x"], torch.zeros(1, model.embedding_dim)), TrainRLConfig(**SMALL))
    rows = list(dataset.queries["validation"])
    candidates = CandidateEmbedder(model, dataset.candidates, 16)
    by_view = {}
    for think in ("never", "always"):
        by_task = {}
        for row in rows:
            pool = dataset.candidate_pool(row)
            with torch.no_grad():
                query = model.embed([prepared_input(row)], think=think, sampling=Sampling(max_new_tokens=model.config.max_think_tokens)).embeddings[0]
            scores = candidates(pool).float() @ query.float()
            by_task.setdefault(row["task"], []).append(hit_at_1(scores, torch.tensor([c in row["positive_ids"] for c in pool])))
        by_view[think] = sum(sum(hits) / len(hits) for hits in by_task.values()) / len(by_task)
    assert by_view["always"] != by_view["never"]  # the two views tell apart, so the check below can fail
    assert trainer.heldout_hit(rows) == pytest.approx(by_view["always"], abs=1e-9)


def test_a_copy_of_the_positive_in_the_cache_is_not_a_negative(setup):
    model, dataset, cache = setup
    data = TrainingData(dataset, "train", 0, 0)
    row = next(row for row in data.rows if row["task"].startswith("classification"))
    copies = dataset.with_copies(row["positive_ids"]) - set(row["positive_ids"])
    assert copies & set(cache.ids)  # the same class name in the other splits
    trainer = RLTrainer(model, data, cache, TrainRLConfig(**SMALL))
    groups = trainer.sample_groups([row])
    kept = [index for index, item in enumerate(cache.ids) if item not in copies]
    without_copies = NegativesCache([cache.ids[index] for index in kept], cache.embeddings[kept])
    expected = RLTrainer(model, data, without_copies, TrainRLConfig(**SMALL)).rewards([row], groups)
    assert torch.allclose(trainer.rewards([row], groups), expected)


def test_heldout_reward_is_measured_with_fixed_cots_before_rl_and_at_checkpoints(setup, tmp_path):
    model, dataset, cache = setup
    trainer = RLTrainer(model, TrainingData(dataset, "train", 0, 0), cache, TrainRLConfig(**SMALL))
    rows = [dataset.queries["validation"][i] for i in range(3)]
    untrained = trainer.heldout_reward(rows)
    assert trainer.heldout_reward(rows) == untrained == trainer.measure_heldout(rows, [], reference=True).reward  # one fixed seed
    # Two steps, a checkpoint after the second: one measurement; the run keeps whichever of it and pre-RL is better.
    summary = run_train_rl(model, dataset, cache, tmp_path / "rl", TrainRLConfig(**SMALL, steps=2, checkpoint_every=2), resume=False)
    heldout = summary["heldout_reward"]
    assert heldout["before"] == untrained and heldout["queries"] == 3 and [step for step, _ in heldout["by_step"]] == [2]
    trained = heldout["by_step"][-1][1]
    assert trained != untrained and heldout["after"] == max(trained, untrained) == trainer.heldout_reward(rows)
    # The pre-RL adapter is the reference: measuring with it leaves the kept weights in place.
    assert trainer.measure_heldout(rows, [], reference=True).reward == untrained and trainer.heldout_reward(rows) == heldout["after"]


def test_cache_refresh_re_embeds_every_entry_with_the_trained_model(make_model, toy_dataset_dir, setup, tmp_path):
    """Under reasoning-prefill, RL moves the no-think embeddings the cache holds; a refresh catches up."""
    _, dataset, _ = setup
    model = make_model(interface="reasoning-prefill")
    cache = cache_for(model, dataset)
    trainer = RLTrainer(model, TrainingData(dataset, "train", 0, 0), cache, TrainRLConfig(**SMALL, refresh_cache_every=1))
    for _ in range(2):
        trainer.step()
    trainer.refresh_cache()
    assert trainer.cache.ids == cache.ids
    assert not torch.allclose(trainer.cache.embeddings, cache.embeddings, atol=1e-5)
    assert torch.allclose(trainer.cache.embeddings, cache_for(model, dataset).embeddings, atol=1e-5)
    assert not torch.allclose(trainer.cache.embeddings, cache.embeddings, atol=1e-4)  # the reasoning prefill moved
    with pytest.raises(TWNError, match="multiple of refresh_cache_every"):
        TrainRLConfig(**SMALL, refresh_cache_every=3, checkpoint_every=4)
    foreign = NegativesCache(["elsewhere/0", *cache.ids[1:]], cache.embeddings)
    with pytest.raises(TWNError, match="'elsewhere/0' is not a candidate"):
        run_train_rl(model, dataset, foreign, tmp_path / "x", TrainRLConfig(**SMALL, refresh_cache_every=1), resume=False)


@pytest.mark.parametrize("refresh_cache_every", [0, 1])
def test_resumed_run_equals_uninterrupted_run_and_nan_stops(setup, make_model, tmp_path, monkeypatch, refresh_cache_every):
    _, dataset, cache = setup
    config = TrainRLConfig(**SMALL, steps=2, checkpoint_every=1, refresh_cache_every=refresh_cache_every)
    straight = make_model()
    run_train_rl(straight, dataset, cache, tmp_path / "straight", config, resume=False)

    def interrupt(metrics):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_train_rl(make_model(), dataset, cache, tmp_path / "resumed", config, resume=False, on_step=interrupt)
    resumed = make_model()
    run_train_rl(resumed, dataset, cache, tmp_path / "resumed", config, resume=True)
    lines = {run: (tmp_path / run / "train" / "metrics.jsonl").read_text().splitlines() for run in ("straight", "resumed")}
    strip = lambda line: {k: v for k, v in json.loads(line).items() if k != "seconds"}  # noqa: E731
    assert [strip(line) for line in lines["straight"]] == [strip(line) for line in lines["resumed"]]
    for name, parameter in straight.named_parameters():
        assert torch.equal(parameter, dict(resumed.named_parameters())[name]), name

    monkeypatch.setattr(train_rl, "k3_kl", lambda log_probs, reference: log_probs * float("nan"))
    with pytest.raises(TWNError, match=r"loss became nan at step 1.*none \(no checkpoint yet\)"):
        run_train_rl(make_model(), dataset, cache, tmp_path / "nan", config, resume=False)


def test_cli_embeds_a_cache_then_trains_rl_keeping_earlier_results(make_model, toy_dataset_dir, tmp_path):
    start = save_checkpoint(make_model(), tmp_path / "gate", stages=[{"stage": "train-gate"}], extra={"gate": {"threshold": 0.4}})
    runner = CliRunner()
    cache_path = tmp_path / "cache.pt"
    result = runner.invoke(app, ["embed", str(toy_dataset_dir), "--checkpoint", str(start), "--device", "cpu", "-o", str(cache_path)])
    assert result.exit_code == 0, result.stderr
    ids, embeddings, _ = read_embeddings(cache_path)
    assert ids == list(load_prepared(toy_dataset_dir).candidates["id"]) and embeddings.shape[1] == 64

    output = tmp_path / "rl"
    arguments = ["train-rl", str(toy_dataset_dir), "--checkpoint", str(start), "--negatives-cache", str(cache_path), "-o", str(output),
                 "--steps", "2", "--set", "max_think_tokens=5", "--set", "batch_size=2", "--set", "group_size=2", "--device", "cpu"]
    result = runner.invoke(app, arguments)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(output)
    manifest = read_manifest(output)
    assert manifest["gate"] == {"threshold": 0.4} and manifest["train_rl"]["steps"] == 2
    assert [stage["stage"] for stage in manifest["stages"]] == ["train-gate", "train-rl"]
    assert len((output / "train" / "metrics.jsonl").read_text().splitlines()) == 2
    assert "held-out reward (8 validation queries)" in result.stderr and manifest["train_rl"]["heldout_reward"]["after"] is not None

    result = runner.invoke(app, [*arguments[:5], str(tmp_path / "bad.pt"), "-o", str(tmp_path / "rl-again"), *arguments[8:]])
    assert result.exit_code == 1 and "does not exist" in result.stderr


def test_cot_log_probs_agree_with_the_sft_cross_entropy(make_model):
    model = make_model()
    inputs = [prepared_input({"id": "q", "text": text, "images": [], "instruction": ""}) for text in ("a red circle", "two")]
    cot_ids = model.prompts.cot_token_ids(["it is red", "a longer thought about the shape"])
    encoded = model.prompts.encode(inputs)
    with torch.no_grad():
        log_probs, mask = cot_log_probs(model, encoded, cot_ids)
        forced = training_views(model, encoded, cot_ids)
    assert mask.sum(1).tolist() == [len(ids) + len(model.prompts.think_end_ids) for ids in cot_ids]
    assert torch.allclose(-log_probs.sum(), forced.sft_loss_sum, rtol=1e-5)


TWO_PROCESS_SCRIPT = """
import sys, torch
from twn_cli.distributed import Distributed, end_process_group, start_process_group
start_process_group()
from twn_cli.data.negatives_cache import load_negatives_cache
from twn_cli.data.prepared import load_prepared
from twn_cli.engine.checkpoint import load_checkpoint
from twn_cli.data.training_data import TrainingData
from twn_cli.stages.train_rl import RLTrainer, TrainRLConfig
checkpoint, dataset_dir, cache_path, output = sys.argv[1:5]
model = load_checkpoint(checkpoint, device="cpu")
dataset = load_prepared(dataset_dir)
trainer = RLTrainer(model, TrainingData(dataset, "train", 0, 0), load_negatives_cache(cache_path, model.embedding_dim), TrainRLConfig(**SMALL))
trainer.candidates.batch_size = CANDIDATE_BATCH
rank = Distributed().rank
# The body of trainer.step(), kept apart to save what each process sampled.
rows = trainer.local_rows()
sampled = trainer.sample_groups(rows, stream=rank)
rewards = trainer.rewards(rows, sampled, stream=rank)
metrics = trainer.update([(rows, sampled, rewards)])
heldout = trainer.heldout_reward([dataset.queries["validation"][i] for i in range(HELDOUT)])
trainer.refresh_cache()
torch.save({
    "rows": [row["id"] for row in rows], "sampled": sampled, "rewards": rewards, "metrics": metrics, "heldout": heldout,
    "grads": {name: p.grad for name, p in trainer.parameters.items()},
    "parameters": {name: p.detach() for name, p in trainer.parameters.items()}, "cache": trainer.cache.embeddings,
}, f"{output}.{rank}")
end_process_group(finished=True)
"""


def test_two_processes_take_the_step_of_their_samples_together(setup, toy_dataset_dir, tmp_path):
    """Each process samples its half of the batch from its own stream; the step (gradient, clipping,
    optimiser) is the one-process step on all the samples together, and the held-out reward and a refreshed
    cache, shared out batch by batch, are what one process computes."""
    import os
    import subprocess
    import sys

    model, dataset, cache = setup
    checkpoint = save_checkpoint(model, tmp_path / "start", stages=[])
    torch.save({"ids": cache.ids, "embeddings": cache.embeddings}, tmp_path / "cache.pt")
    settings, candidate_batch, heldout_queries = dict(SMALL, batch_size=4), 16, 8  # 2 held-out batches, 3 cache blocks
    assert len(cache.ids) > 2 * candidate_batch * 8
    script = tmp_path / "two.py"
    script.write_text(f"SMALL = {settings!r}\nCANDIDATE_BATCH = {candidate_batch}\nHELDOUT = {heldout_queries}\n" + TWO_PROCESS_SCRIPT)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
         str(checkpoint), str(toy_dataset_dir), str(tmp_path / "cache.pt"), str(tmp_path / "out")],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    parts = [torch.load(tmp_path / f"out.{rank}", weights_only=False) for rank in (0, 1)]

    single = RLTrainer(model, TrainingData(dataset, "train", 0, 0), cache, TrainRLConfig(**settings))
    single.candidates.batch_size = candidate_batch
    rows = [single.data.rows[i] for i in single.data.batch_indices(0, 4)]
    assert [row["id"] for row in rows] == parts[0]["rows"] + parts[1]["rows"]
    # Process 1 drew from its own stream: what it sampled is not what stream 0 gives for the same queries.
    assert single.sample_groups(rows[2:], stream=1)["cot_ids"] == parts[1]["sampled"]["cot_ids"]
    assert single.sample_groups(rows[2:], stream=0)["cot_ids"] != parts[1]["sampled"]["cot_ids"]
    together = {
        key: [*parts[0]["sampled"][key], *parts[1]["sampled"][key]] if isinstance(parts[0]["sampled"][key], list)
        else torch.cat([parts[0]["sampled"][key], parts[1]["sampled"][key]])
        for key in parts[0]["sampled"]
    }
    metrics = single.update([(rows, together, torch.cat([parts[0]["rewards"], parts[1]["rewards"]]))])
    assert any(float(parameter.grad.abs().sum()) > 0 for parameter in single.parameters.values())
    for name, parameter in single.parameters.items():
        # Adam's first step is lr·g/(|g| + 1e-8): where |g| is near 1e-8, the rounding of a gradient summed in
        # another order moves it by a good share of lr. Elsewhere it is lr·sign(g) to well within rounding.
        settled = parameter.grad.abs() > 1e-6
        for part in parts:
            assert torch.allclose(part["grads"][name], parameter.grad, rtol=1e-4, atol=1e-7), name
            assert torch.allclose(part["parameters"][name][settled], parameter.detach()[settled], rtol=1e-4, atol=1e-7), name
    assert parts[0]["metrics"] == parts[1]["metrics"]
    for key, value in metrics.items():
        assert parts[0]["metrics"][key] == pytest.approx(value, rel=1e-4, abs=1e-7), key
    # The updated weights agree to float rounding (gradients summed in another order), and so do these.
    heldout = single.heldout_reward([dataset.queries["validation"][i] for i in range(heldout_queries)])
    assert parts[0]["heldout"] == parts[1]["heldout"] == pytest.approx(heldout, rel=1e-5)
    single.refresh_cache()
    for part in parts:
        assert torch.allclose(part["cache"], single.cache.embeddings, atol=1e-5)
    assert torch.equal(parts[0]["cache"], parts[1]["cache"])
