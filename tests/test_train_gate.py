"""train-gate: labels say whether thinking helped, only the gate trains, τ meets a budget, labelling resumes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from twn_cli.cli import app
from twn_cli.data.embedding_files import read_embeddings
from twn_cli.data.negatives_cache import NegativesCache
from twn_cli.data.prepared import load_prepared, prepared_input
from twn_cli.engine.checkpoint import load_checkpoint, save_checkpoint
from twn_cli.engine.config import INTERFACES
from twn_cli.engine.decoding import Sampling
from twn_cli.engine.gate import RoutingGate
from twn_cli.errors import TWNError
from twn_cli.eval.metrics import auroc
from twn_cli.stages import gate_fitting, gate_labelling, gate_threshold, pool_scoring
from twn_cli.stages.gate_labelling import candidate_columns, embed_views, label_inputs, labelling_rows, retrieval_margins, thinking_labels
from twn_cli.stages.gate_threshold import best_threshold, threshold_for_budget
from twn_cli.stages.pool_scoring import task_weights
from twn_cli.stages.train_gate import TrainGateConfig, run_train_gate

SMALL = dict(label_queries=12, label_batch_size=6, hard_negatives=2, max_think_tokens=6, epochs=20, batch_size=8, validation_queries=8)


def test_auroc_is_the_rank_statistic_with_ties_counting_one_half():
    assert auroc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])) == pytest.approx(0.75)
    # pairs (positive, negative): 0.5~0.5 ties (1/2), 0.5>0.2, 0.9>0.5, 0.9>0.2
    assert auroc(torch.tensor([0.5, 0.5, 0.2, 0.9]), torch.tensor([1, 0, 0, 1])) == pytest.approx(0.875)
    assert auroc(torch.tensor([0.3, 0.3, 0.3]), torch.tensor([1, 0, 1])) == pytest.approx(0.5)
    assert auroc(torch.tensor([0.9, 0.1]), torch.tensor([0, 1])) == 0.0
    assert auroc(torch.tensor([0.2, 0.7]), torch.tensor([1, 1])) is None


def test_labels_say_whether_thinking_moved_the_query_towards_its_positive():
    rows = [
        {"id": "q0", "positive_ids": ["a"], "negative_ids": ["n"]},
        {"id": "q1", "positive_ids": ["b"], "negative_ids": []},
        {"id": "q2", "positive_ids": ["a", "b"], "negative_ids": ["n"]},  # shares both targets: they are no negatives
    ]
    ids, positive_column, negative_mask = candidate_columns(rows, [set(row["positive_ids"]) for row in rows], hard_negatives=4)
    assert ids == ["a", "b", "n"] and positive_column.tolist() == [0, 1, 0]
    assert negative_mask.tolist() == [[False, True, True], [True, False, False], [False, False, True]]
    # b is a copy of q0's positive under another id (PreparedDataset.with_copies): no negative of q0 either.
    copies = [{"a", "b"}, {"b"}, {"a", "b"}]
    assert candidate_columns(rows, copies, hard_negatives=4)[2].tolist() == [[False, False, True], [True, False, False], [False, False, True]]

    candidates = torch.eye(3)  # a, b, n
    def unit(*values: float) -> torch.Tensor:
        return F.normalize(torch.tensor([values], dtype=torch.float32), dim=-1)

    never = torch.cat([unit(1, 1, 0), unit(0.2, 1, 0), unit(1, 0, 0.5)])
    think = torch.cat([unit(1, 0.2, 0), unit(1, 0.3, 0), unit(1, 0, 0.1)])  # q0 and q2 closer to a; q1 led away from b
    margin_never = retrieval_margins(never, candidates, positive_column, negative_mask)
    margin_think = retrieval_margins(think, candidates, positive_column, negative_mask)
    assert margin_never[0] == pytest.approx(0.0, abs=1e-6) and margin_think[0] > 0.5
    assert thinking_labels(margin_never, margin_think, delta=0.0).tolist() == [True, False, True]
    # δ demands a larger improvement than q0's and q2's
    assert thinking_labels(margin_never, margin_think, delta=1.0).tolist() == [False, False, False]

    lonely = [{"id": "q", "positive_ids": ["a"], "negative_ids": []}, {"id": "r", "positive_ids": ["a"], "negative_ids": []}]
    with pytest.raises(TWNError, match="no negative"):
        candidate_columns(lonely, [{"a"}, {"a"}], hard_negatives=4)


def test_a_negatives_cache_adds_its_hardest_entry_that_is_not_the_querys_positive():
    rows = [{"id": "q0", "positive_ids": ["a"], "negative_ids": []}, {"id": "q1", "positive_ids": ["b", "c"], "negative_ids": []}]
    ids, positive_column, negative_mask = candidate_columns(rows, [set(row["positive_ids"]) for row in rows], hard_negatives=0)
    candidates = torch.eye(4)[:2]  # a, b
    # The cache: a (q0's own positive: excluded for q0), c (q1's second positive: excluded for q1), d.
    cache = NegativesCache(["a", "c", "d"], torch.eye(4)[[0, 2, 3]])
    queries = torch.tensor([[0.8, 0.0, 0.0, 0.6], [0.6, 0.0, 0.8, 0.0]])
    from_cache = cache.hardest_scores(queries, [row["positive_ids"] for row in rows])
    assert from_cache.tolist() == pytest.approx([0.6, 0.6])  # q0: d (a is its own); q1: a (c is its own)
    margins = retrieval_margins(queries, candidates, positive_column, negative_mask, from_cache)
    # q0: positive a 0.8, in-batch b 0.0, cache d 0.6; q1: positive b 0.0, in-batch a 0.6, cache a 0.6.
    assert margins.tolist() == pytest.approx([0.2, -0.6])
    assert retrieval_margins(queries, candidates, positive_column, negative_mask).tolist() == pytest.approx([0.8, -0.6])


def test_labelling_against_a_negatives_cache_is_keyed_by_it(make_model, toy_dataset_dir, tmp_path):
    model, dataset = make_model(), load_prepared(toy_dataset_dir)
    config = TrainGateConfig(**{**SMALL, "label_queries": 6})
    rows = labelling_rows(dataset, config)
    pool = dataset.candidates.select(range(20))
    cache = NegativesCache(list(pool["id"]), model.embed([prepared_input(row) for row in pool]).embeddings.cpu())
    plain = label_inputs(model, dataset, rows, tmp_path / "labels", config)
    against_cache = label_inputs(model, dataset, rows, tmp_path / "labels", config, negatives=cache)
    # More negatives can only lower a margin; lower ones show the labels were computed, not read from the plain run's.
    assert (against_cache.margin_never <= plain.margin_never + 1e-6).all()
    assert (against_cache.margin_never < plain.margin_never - 1e-6).any()


def test_labelling_never_scores_a_copy_of_the_positive_as_a_negative(make_model, toy_dataset_dir, tmp_path):
    model, dataset = make_model(), load_prepared(toy_dataset_dir)
    config = TrainGateConfig(**SMALL)
    rows = labelling_rows(dataset, config)
    plain = label_inputs(model, dataset, rows, tmp_path / "plain", config)
    copies_of = [sorted(dataset.with_copies(row["positive_ids"]) - set(row["positive_ids"])) for row in rows]
    index = next(i for i, copies in enumerate(copies_of) if copies)  # a query whose answer recurs under other ids
    copies = copies_of[index]
    # Cache entries for the copies that sit exactly on the query's no-think embedding: as negatives they would
    # be its hardest, and its margin would drop to s(query, positive) - 1.
    query = model.embed([prepared_input(rows[index])]).embeddings.cpu()
    cache = NegativesCache(copies, query.expand(len(copies), -1).clone())
    against_copies = label_inputs(model, dataset, rows, tmp_path / "copies", config, negatives=cache)
    assert float(against_copies.margin_never[index]) == pytest.approx(float(plain.margin_never[index]), abs=1e-5)
    assert float(against_copies.margin_think[index]) == pytest.approx(float(plain.margin_think[index]), abs=1e-5)


@pytest.mark.parametrize("interface", INTERFACES)
def test_both_views_from_one_prefill_equal_what_embed_gives(make_model, toy_dataset_dir, interface):
    model = make_model(interface=interface)
    rows = load_prepared(toy_dataset_dir).queries["train"].select(range(3))
    inputs = [prepared_input(row) for row in rows]
    views = embed_views(model, inputs, Sampling())
    assert torch.allclose(views.never, model.embed(inputs, think="never").embeddings, atol=1e-5)
    always = model.embed(inputs, think="always")
    assert torch.allclose(views.think, always.embeddings, atol=1e-5)
    assert views.cots == always.cot and views.reasoning_tokens == always.reasoning_tokens
    assert torch.allclose(model.gate_probability(views.last_prompt_state), model.think_probability(inputs), atol=1e-6)


def test_the_gate_reads_raw_states_once_its_training_standardisation_is_folded_in():
    states = torch.randn(16, 8, generator=torch.Generator().manual_seed(0)) * torch.tensor([1, 1, 1, 1, 1, 1, 1, 300.0]) + 5
    mean, scale = states.mean(0), states.std(0)
    gate = RoutingGate(8, 4)
    on_standardised = gate((states - mean) / scale)
    gate.absorb_input_scaling(mean, scale)
    assert torch.allclose(gate(states), on_standardised, atol=1e-5)


def test_the_gate_keeps_the_epoch_with_the_lowest_loss_on_its_stopping_slice():
    """Noise labels: an MLP learns them by heart, so the loss on unseen labels is lowest early on."""

    generator = torch.Generator().manual_seed(0)
    states, labels = torch.randn(200, 16, generator=generator), torch.rand(200, generator=generator) < 0.5
    config = TrainGateConfig(epochs=60, batch_size=32, learning_rate=1e-2, log_every=1)
    torch.manual_seed(0)
    history = gate_fitting.fit_gate(RoutingGate(16, 64), states, labels, torch.ones(200), config).history
    kept = [entry for entry in history if entry["kept"]]
    assert len(history) == 60 and len(kept) == 1
    assert kept[0]["stopping_loss"] == min(entry["stopping_loss"] for entry in history)
    assert kept[0]["epoch"] < 60 and history[-1]["loss"] < kept[0]["loss"]  # it went on to fit the noise

    torch.manual_seed(0)
    gate = RoutingGate(16, 64)
    gate_fitting.fit_gate(gate, states, labels, torch.ones(200), TrainGateConfig(**{**vars(config), "epochs": kept[0]["epoch"]}))
    torch.manual_seed(0)
    stopped = RoutingGate(16, 64)
    gate_fitting.fit_gate(stopped, states, labels, torch.ones(200), config)
    assert torch.allclose(gate(states), stopped(states), atol=1e-6)  # the kept weights are that epoch's

    without = gate_fitting.fit_gate(RoutingGate(16, 64), states, labels, torch.ones(200), TrainGateConfig(**{**vars(config), "stopping_fraction": 0.0})).history
    assert [entry["epoch"] for entry in without if entry["kept"]] == [60] and "stopping_loss" not in without[0]


def test_training_changes_every_gate_parameter_and_nothing_else(make_model, toy_dataset_dir, tmp_path):
    model = make_model()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    summary = run_train_gate(model, load_prepared(toy_dataset_dir), tmp_path / "run", TrainGateConfig(**SMALL))
    changed = {name for name, p in model.named_parameters() if not torch.equal(before[name], p.detach())}
    assert changed == {name for name in before if name.startswith("gate.")} and changed
    assert model.config.gate_threshold == summary["threshold"]
    assert summary["labels"]["inputs"] == 12 and summary["validation"]["queries"] == 8
    by_task = summary["validation"]["tasks"]
    assert sum(task["queries"] for task in by_task.values()) == 8
    assert summary["validation"]["think_tasks"] == [name for name, task in by_task.items() if task["hit@1_always"] > task["hit@1_never"]]
    assert {"heldout_task_lookup", "heldout_task_difficulty_lookup"} <= summary["auroc"].keys()
    lines = (tmp_path / "run" / "train" / "gate-labels.jsonl").read_text().splitlines()
    assert len(lines) == 12 and {"label", "margin_never", "margin_think", "cot", "fold", "p_think_heldout", "stopping"} <= set(json.loads(lines[0]))
    records = [json.loads(line) for line in lines]
    # The shipped gate trains on every label but its stopping slice; every label is held out in one fold.
    stopping = sum(r["stopping"] for r in records)
    assert stopping == summary["auroc"]["stopping_inputs"] > 0 and summary["auroc"]["train_inputs"] == 12 - stopping
    folds = summary["auroc"]["heldout_folds"]
    assert summary["auroc"]["heldout_inputs"] == 12 and sorted({r["fold"] for r in records}) == list(range(folds)) and folds == TrainGateConfig().heldout_folds


def test_heldout_probabilities_come_from_gates_that_never_saw_their_fold():
    # Labels a gate can learn only by heart: each state's label is random. Out of fold it must guess, so its
    # AUROC is near chance, while the in-sample AUROC of a gate trained on all is near 1.
    generator = torch.Generator().manual_seed(0)
    states, labels = torch.randn(120, 16, generator=generator), torch.rand(120, generator=generator) < 0.5
    config = TrainGateConfig(epochs=300, stopping_fraction=0.0, learning_rate=1e-2, weight_decay=0.0, heldout_folds=4)
    torch.manual_seed(0)
    fold_of, p_heldout = gate_fitting.heldout_probabilities(RoutingGate(16, 64), states, labels, labels.float(), config)
    assert torch.bincount(fold_of).tolist() == [30, 30, 30, 30]
    thinking = torch.bincount(fold_of[labels]).tolist()  # every fold holds its share of each class
    assert max(thinking) - min(thinking) <= 1
    full = RoutingGate(16, 64)
    gate_fitting.fit_gate(full, states, labels, torch.ones(120), config)
    assert auroc(full(states).detach(), labels) > 0.95 and abs(auroc(p_heldout, labels) - 0.5) < 0.15


def test_a_reset_gate_is_the_fresh_gate_of_its_seed():
    trained = RoutingGate(16, 8)
    torch.nn.init.constant_(trained.mlp[0].weight, 3.0)
    trained.reset(7)
    torch.manual_seed(123)  # the reset does not depend on (or move) the global generator
    again = RoutingGate(16, 8)
    again.reset(7)
    assert all(torch.equal(a, b) for a, b in zip(trained.state_dict().values(), again.state_dict().values()))
    assert not torch.equal(trained.mlp[0].weight, torch.full_like(trained.mlp[0].weight, 3.0))


def test_tau_is_chosen_on_held_out_p_think_where_the_gate_trained_on_validation():
    p_validation = torch.tensor([0.9, 0.8, 0.1])
    chosen_on = gate_threshold.choosing_probabilities(p_validation, ["a", "b", "c"], ["b", "x"], torch.tensor([0.2, 0.7]))
    assert chosen_on.tolist() == pytest.approx([0.9, 0.2, 0.1])  # only b was labelled (and so trained on)


def test_tau_comes_from_the_held_out_p_think_of_labelled_validation_inputs(make_model, toy_dataset_dir, tmp_path):
    dataset = load_prepared(toy_dataset_dir)
    config = TrainGateConfig(**{**SMALL, "split": "validation", "label_queries": 1000, "target": "budget", "think_budget": 0.5})
    summary = run_train_gate(make_model(), dataset, tmp_path / "run", config)
    logged = {r["id"]: r for r in map(json.loads, (tmp_path / "run" / "train" / "gate-labels.jsonl").read_text().splitlines())}
    chosen_on = torch.tensor([logged[dataset.queries["validation"][i]["id"]]["p_think_heldout"] for i in range(config.validation_queries)])
    assert summary["threshold_on_choosing_p"] == threshold_for_budget(chosen_on, 0.5)
    # The shipped gate thinks on the share of the validation queries chosen there, at its own τ.
    shipped = torch.tensor([logged[dataset.queries["validation"][i]["id"]]["p_think"] for i in range(config.validation_queries)])
    assert summary["threshold"] == pytest.approx(threshold_for_budget(shipped, float((chosen_on >= summary["threshold_on_choosing_p"]).double().mean())))
    assert float((shipped >= summary["threshold"]).double().mean()) == pytest.approx(float((chosen_on >= summary["threshold_on_choosing_p"]).double().mean()))
    assert any(r["p_think_heldout"] != r["p_think"] for r in logged.values())  # the shipped gate's p would differ


def test_validation_weighs_each_query_by_its_task(make_model, toy_dataset_dir):
    dataset = load_prepared(toy_dataset_dir)
    config = TrainGateConfig(**{**SMALL, "validation_queries": 30})
    validation = gate_threshold.validation_views(make_model(), dataset, config)
    tasks = [dataset.queries["validation"][i]["task"] for i in range(len(validation.hit_never))]
    assert len(set(tasks)) > 1 and torch.equal(validation.weights, task_weights(tasks))


def test_think_budget_is_the_quantile_of_validation_p_think(make_model, toy_dataset_dir, tmp_path):
    p_think = torch.rand(1000, generator=torch.Generator().manual_seed(0))
    for budget in (0.0, 0.3, 0.5, 1.0):
        assert float((p_think >= threshold_for_budget(p_think, budget)).double().mean()) == pytest.approx(budget, abs=1e-3)
    # On a real validation set (the toy train split has 56 queries) the rate is within one input of 30 %.
    config = TrainGateConfig(**{**SMALL, "target": "budget", "think_budget": 0.3, "validation_split": "train", "validation_queries": 200})
    summary = run_train_gate(make_model(), load_prepared(toy_dataset_dir), tmp_path / "run", config)
    assert summary["validation"]["queries"] == 56
    assert summary["validation"]["think_rate"] == pytest.approx(0.3, abs=0.03)


def test_within_noise_is_chosen_on_the_stage_validation_and_recorded(make_model, toy_dataset_dir, tmp_path):
    config = TrainGateConfig(**{**SMALL, "target": "within_noise", "bootstrap_samples": 50})
    summary = run_train_gate(make_model(), load_prepared(toy_dataset_dir), tmp_path / "run", config)
    choice = summary["threshold_choice"]
    assert summary["threshold"] >= choice["best_threshold"] and choice["shortfall"] <= choice["standard_error"] + 1e-12
    assert summary["validation"]["hit@1_adaptive"] == pytest.approx(choice["score"])


def test_best_threshold_takes_the_best_hit_at_1_and_thinks_less_on_ties():
    p_think = torch.tensor([0.9, 0.7, 0.5, 0.2])
    # thinking helps the 0.9 input, hurts the 0.5 one; the 0.7 one is a hit either way
    hit_never = torch.tensor([False, True, True, False])
    hit_think = torch.tensor([True, True, False, False])
    weights = task_weights(["a"] * 4)
    assert best_threshold(p_think, hit_never, hit_think, weights) == pytest.approx(0.9)
    assert best_threshold(p_think, hit_never, hit_never, weights) > 0.9  # thinking never helps: nobody thinks


def test_a_tolerance_takes_the_threshold_that_thinks_least_within_it_of_the_best():
    p_think = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05])
    hit_never = torch.zeros(10, dtype=torch.bool)
    hit_think = torch.tensor([True, False, False, False, False, False, False, False, False, True])
    weights = task_weights(["a"] * 10)
    assert best_threshold(p_think, hit_never, hit_think, weights) == pytest.approx(0.05)  # 2 hits, everyone thinks
    assert best_threshold(p_think, hit_never, hit_think, weights, tolerance=0.1) == pytest.approx(0.9)  # 1 hit, one thinks
    assert best_threshold(p_think, hit_never, hit_think, weights, tolerance=0.09) == pytest.approx(0.05)


def test_best_threshold_weighs_every_task_alike_as_the_eval_headline_does():
    # Task "big" has four queries, task "small" one. At τ ≤ 0.8 thinking turns the small task's hit into a
    # miss, and at τ ≤ 0.6 two of big's misses into hits: pooled Hit@1 gains (2 hits against 1), the mean over
    # tasks loses (big +0.5, small -1), so only the pooled choice thinks.
    p_think = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    hit_never = torch.tensor([False, True, False, False, False])
    hit_think = torch.tensor([False, False, True, True, False])
    weights = task_weights(["big", "small", "big", "big", "big"])
    assert weights.sum().item() == pytest.approx(1.0) and weights[1].item() == pytest.approx(0.5)
    assert best_threshold(p_think, hit_never, hit_think, weights) > 0.9
    assert best_threshold(p_think, hit_never, hit_think, torch.ones(5)) == pytest.approx(0.6)


def test_label_cache_resumes_with_only_the_missing_inputs(make_model, toy_dataset_dir, tmp_path, monkeypatch):
    dataset = load_prepared(toy_dataset_dir)
    config = TrainGateConfig(**{**SMALL, "label_batch_size": 4})
    model = make_model()
    rows = labelling_rows(dataset, config)
    straight = label_inputs(model, dataset, rows, tmp_path / "straight", config)

    def stop_after_the_first_batch(phase: str, done: int, total: int) -> None:
        if done == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        label_inputs(model, dataset, rows, tmp_path / "resumed", config, progress=stop_after_the_first_batch)
    labelled_inputs = []
    original = gate_labelling.embed_views

    def counting(model, inputs, sampling):
        labelled_inputs.append(len(inputs))
        return original(model, inputs, sampling)

    monkeypatch.setattr(gate_labelling, "embed_views", counting)
    resumed = label_inputs(model, dataset, rows, tmp_path / "resumed", config)
    assert labelled_inputs == [4, 4]
    assert resumed.ids == straight.ids and resumed.cots == straight.cots
    for name in ("features", "margin_never", "margin_think", "reasoning_tokens"):
        assert torch.equal(getattr(resumed, name), getattr(straight, name)), name
    assert torch.equal(resumed.labels(config.delta), straight.labels(config.delta))
    # Margins are cached, not labels: another δ needs no labelling at all.
    label_inputs(model, dataset, rows, tmp_path / "resumed", TrainGateConfig(**{**SMALL, "label_batch_size": 4, "delta": 0.1}))
    assert labelled_inputs == [4, 4]


def test_train_gate_command_end_to_end(make_model, toy_dataset_dir, tmp_path):
    start = save_checkpoint(make_model(), tmp_path / "embed", stages=[{"stage": "train-embed"}], extra={"train_embed": {"steps": 3}})
    recipe = Path(__file__).parents[1] / "recipes" / "toy" / "train-gate.yaml"
    settings = [f"--set={key}={value}" for key, value in {**SMALL, "label_queries": 8, "label_batch_size": 4}.items()]
    result = CliRunner().invoke(
        app, ["train-gate", str(toy_dataset_dir), "--checkpoint", str(start), "-o", str(tmp_path / "gate"), "--recipe", str(recipe), "--target", "best", "--delta", "0.01", *settings],
    )
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path / "gate")
    assert "threshold τ" in result.stderr and "gate AUROC" in result.stderr and "think rate" in result.stderr
    assert "expected_hit:" in result.stderr and "hurts" in result.stderr  # the table wraps its rows on a narrow terminal
    model = load_checkpoint(tmp_path / "gate", device="cpu")
    gate = model.manifest["gate"]
    assert model.config.gate_threshold == gate["threshold"] and gate["target"] == "best" and gate["delta"] == 0.01
    assert {"labels", "auroc", "validation"} <= set(gate) and gate["labels"]["inputs"] == 8
    assert model.manifest["train_embed"] == {"steps": 3}
    assert [stage["stage"] for stage in model.manifest["stages"]] == ["train-embed", "train-gate"]
    # The toy recipe's labels come from the validation views, judged once: no batch of margins is cached.
    assert gate["label"] == "expected_hit" and not (tmp_path / "gate" / "train" / "gate-labels").exists()

    queries = tmp_path / "queries.jsonl"
    queries.write_text('{"id": "a", "text": "a red triangle"}\n{"id": "b", "text": "the colour of grass"}\n')
    embedded = CliRunner().invoke(app, ["embed", str(queries), "--checkpoint", str(tmp_path / "gate"), "--adaptive", "-o", str(tmp_path / "e.safetensors")])
    assert embedded.exit_code == 0, embedded.stderr
    assert "no trained gate" not in embedded.stderr
    assert read_embeddings(tmp_path / "e.safetensors")[2]["threshold"] == gate["threshold"]

    both = CliRunner().invoke(app, ["train-gate", str(toy_dataset_dir), "--checkpoint", str(start), "-o", str(tmp_path / "x"), "--think-budget", "0.3", "--target", "best"])
    assert both.exit_code == 1 and "contradict" in both.stderr
    torch.save({"ids": ["a", "b"], "embeddings": torch.ones(2, 3)}, tmp_path / "narrow.pt")
    narrow = CliRunner().invoke(app, ["train-gate", str(toy_dataset_dir), "--checkpoint", str(start), "-o", str(tmp_path / "y"), "--negatives-cache", str(tmp_path / "narrow.pt")])
    assert narrow.exit_code == 1 and "3-dimensional embeddings" in narrow.stderr and not (tmp_path / "y").exists()
    cache = tmp_path / "cache.pt"
    assert CliRunner().invoke(app, ["embed", str(toy_dataset_dir), "--checkpoint", str(start), "-o", str(cache)]).exit_code == 0
    unread = CliRunner().invoke(app, ["train-gate", str(toy_dataset_dir), "--checkpoint", str(start), "-o", str(tmp_path / "z"), "--recipe", str(recipe), "--negatives-cache", str(cache)])
    assert unread.exit_code == 1 and "expected_hit" in unread.stderr and not (tmp_path / "z").exists()


def test_expected_hit_labels_count_what_crosses_the_first_rank():
    scores = torch.tensor([0.9, 0.7, 0.95, 0.2])
    gold, negative = torch.tensor([False, True, False, False]), torch.tensor([True, False, False, True])
    # candidate 2 is a copy of the gold: neither gold nor negative; the best negative is candidate 0
    assert pool_scoring.pool_margin(scores, gold, negative) == pytest.approx(0.7 - 0.9)
    assert pool_scoring.pool_margin(scores, gold, torch.zeros(4, dtype=torch.bool)) == 0.0
    no_gold = torch.zeros(4, dtype=torch.bool)  # a miss in either view: no rise to count
    assert pool_scoring.pool_margin(scores, no_gold, negative) == pool_scoring.pool_margin(scores * 0.5, no_gold, negative) == -2.0
    labelled = gate_labelling.LabelledInputs(
        ids=["across", "far above", "lost"], features=torch.zeros(3, 2),
        margin_never=torch.tensor([-0.05, 0.5, 0.02]), margin_think=torch.tensor([0.05, 0.7, -0.1]),
        reasoning_tokens=torch.zeros(3, dtype=torch.int64), cots=["", "", ""],
    )
    gain = labelled.expected_hit_gain(0.05)
    expected = [torch.sigmoid(torch.tensor(t / 0.05)) - torch.sigmoid(torch.tensor(n / 0.05)) for n, t in ((-0.05, 0.05), (0.5, 0.7), (0.02, -0.1))]
    assert gain.tolist() == pytest.approx([float(e) for e in expected], abs=1e-6)
    assert gain[0] > 0.4 and abs(gain[1]) < 1e-3 and gain[2] < -0.4  # the batch margin ranks "far above" over "across"
    assert labelled.margin_change[1] > labelled.margin_change[0]


def test_a_gate_fitted_to_soft_targets_learns_their_level_not_their_side():
    generator = torch.Generator().manual_seed(0)
    states = torch.randn(400, 4, generator=generator)
    soft = torch.where(states[:, 0] > 0, 0.7, 0.3)
    labels = soft > 0.5
    config = TrainGateConfig(epochs=150, stopping_fraction=0.0, learning_rate=1e-2, weight_decay=0.0)
    torch.manual_seed(0)
    gate = RoutingGate(4, 16)
    gate_fitting.fit_gate(gate, states, *gate_fitting.fitting_targets(labels, torch.zeros(400), False, soft), config)
    p = gate(states).detach()
    assert 0.6 < float(p[labels].mean()) < 0.8 and 0.2 < float(p[~labels].mean()) < 0.4
    targets, weights = gate_fitting.fitting_targets(labels, torch.zeros(400), False)
    assert torch.equal(targets, labels.float()) and torch.equal(weights, gate_fitting.sample_weights(labels, torch.zeros(400), False))


@pytest.mark.parametrize("split", ["validation", "train"])
def test_expected_hit_labels_are_the_pool_margins_of_each_query_judged_once(make_model, toy_dataset_dir, tmp_path, monkeypatch, split):
    dataset = load_prepared(toy_dataset_dir)
    config = TrainGateConfig(**{**SMALL, "label": "expected_hit", "split": split, "label_queries": 6, "delta": 0.01})
    judged = []
    real_embed_views = pool_scoring.embed_views
    monkeypatch.setattr(pool_scoring, "embed_views", lambda model, inputs, sampling: judged.extend(inputs) or real_embed_views(model, inputs, sampling))
    model = make_model()
    summary = run_train_gate(model, dataset, tmp_path / "run", config)
    rows = labelling_rows(dataset, config)
    expected_judged = config.validation_queries + (len(rows) if split == "train" else 0)
    assert len(judged) == expected_judged  # a validation query labelled is not embedded again
    views = pool_scoring.pool_views(model, dataset, rows, batch_size=config.label_batch_size, max_think_tokens=config.max_think_tokens)  # train-gate changed only the gate
    logged = [json.loads(line) for line in (tmp_path / "run" / "train" / "gate-labels.jsonl").read_text().splitlines()]
    assert [r["id"] for r in logged] == [row["id"] for row in rows]
    assert [r["margin_never"] for r in logged] == pytest.approx(views.margin_never.tolist(), abs=1e-5)
    assert [r["margin_think"] for r in logged] == pytest.approx(views.margin_think.tolist(), abs=1e-5)
    gain = views.labelled().expected_hit_gain(0.05)
    assert [r["label"] for r in logged] == (gain > 0.01).tolist()
    assert summary["label"] == "expected_hit" and summary["labels"]["inputs"] == len(rows)
    assert summary["auroc"]["judged_inputs"] == int((gain.abs() > 0.01).sum())
    assert views.hit_never.tolist() == [m > 0 for m in views.margin_never.tolist()]  # a positive margin is a hit
