"""`run_eval` on a tiny toy world and hand-built datasets, with a fresh model on the tiny backbone."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from PIL import Image

from twn_cli.data.prepared import load_prepared, prepared_input, write_prepared
from twn_cli.errors import TWNError
from twn_cli.eval.metrics import METRICS
from twn_cli.stages.evaluate import REPORT_FILES, run_eval
from twn_cli.toyworld.dataset import write_synthetic_dataset

# Numbers that depend on how long this run took, not on what the model ranked.
TIMING_KEYS = {"wall_seconds", "inputs_per_second", "created", "run"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy_dataset(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("toy") / "prepared"
    write_synthetic_dataset(path, n=60, seed=0)
    return path


@pytest.fixture
def counting(monkeypatch):
    """Makes a model count, in `model.embedded`, the inputs that evaluation embeds with it, per think mode."""
    from twn_cli.stages import evaluate

    embed_block = evaluate.embed_block

    def counting_embed_block(model, inputs, think, *options, **named_options):
        model.embedded[think] += len(inputs)
        return embed_block(model, inputs, think, *options, **named_options)

    monkeypatch.setattr(evaluate, "embed_block", counting_embed_block)

    def count(model):
        model.embedded = {"never": 0, "always": 0, "auto": 0}
        return model

    return count


@pytest.fixture
def counted_model(make_model, counting):
    """A fresh model that counts the inputs it embeds, per think mode."""
    return counting(make_model())


def read_predictions(report_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (report_dir / "predictions.jsonl").read_text().splitlines()]


def without_timings(value):
    if isinstance(value, dict):
        return {key: without_timings(item) for key, item in value.items() if key not in TIMING_KEYS}
    if isinstance(value, list):
        return [without_timings(item) for item in value]
    return value


def recomputed_metrics(prediction: dict, relevance: dict[str, float]) -> dict[str, float]:
    """A query's metrics from its top-10 ids and the dataset's gold ids (MRR from the recorded gold ranks)."""
    top = prediction["top_ids"]
    golds = {gold_id: value for gold_id, value in relevance.items() if value > 0}
    metrics = {}
    for k in (1, 5, 10):
        found = [candidate for candidate in top[:k] if candidate in golds]
        metrics[f"hit@{k}"] = float(bool(found))
        metrics[f"recall@{k}"] = len(found) / len(golds)
    for k in (5, 10):
        dcg = sum(golds.get(candidate, 0.0) / math.log2(rank + 1) for rank, candidate in enumerate(top[:k], start=1))
        ideal = sorted(golds.values(), reverse=True)[:k]
        metrics[f"ndcg@{k}"] = dcg / sum(value / math.log2(rank + 2) for rank, value in enumerate(ideal))
    ranks = [rank for rank in prediction["gold_ranks"] if rank is not None]
    metrics["mrr"] = 1 / min(ranks) if ranks else 0.0
    # The recorded ranks must agree with the listed top-10.
    for gold_id, rank in zip(prediction["gold_ids"], prediction["gold_ranks"]):
        assert (rank is not None and rank <= len(top)) == (gold_id in top)
        if gold_id in top:
            assert top[rank - 1] == gold_id
    return metrics


def check_report_against_predictions(report_dir: Path, dataset_dir: Path) -> dict:
    """report.json's task, modality and overall numbers, recomputed from predictions.jsonl and the dataset."""
    report = json.loads((report_dir / "report.json").read_text())
    dataset = load_prepared(dataset_dir)
    relevance = {row["id"]: dict(zip(row["positive_ids"], row["positive_relevance"])) for row in dataset.queries["test"]}
    by_task: dict[str, list[dict]] = {}
    for prediction in read_predictions(report_dir):
        assert prediction["top_scores"] == sorted(prediction["top_scores"], reverse=True)
        by_task.setdefault(prediction["task"], []).append(prediction)
    result = report["result"]
    assert set(by_task) == set(result["tasks"])
    headline = {"image": "hit@1", "video": "hit@1", "visdoc": "ndcg@5"}
    scores = {}
    for task, predictions in by_task.items():
        per_query = [recomputed_metrics(p, relevance[p["query_id"]]) for p in predictions]
        entry = result["tasks"][task]
        for metric in METRICS:
            assert entry["metrics"][metric] == pytest.approx(sum(m[metric] for m in per_query) / len(per_query))
        assert entry["score"] == entry["metrics"][headline[entry["modality"]]]
        assert entry["queries"] == len(predictions)
        assert entry["think_rate"] == pytest.approx(sum(p["think"] for p in predictions) / len(predictions))
        tokens = sum(p["reasoning_tokens"] for p in predictions) / len(predictions)
        assert entry["reasoning_tokens_per_query"] == pytest.approx(tokens)
        scores[task] = entry["score"]
    assert result["overall"]["score"] == pytest.approx(sum(scores.values()) / len(scores))
    for modality, group in result["modalities"].items():
        members = [scores[task] for task, entry in result["tasks"].items() if entry["modality"] == modality]
        assert group["score"] == pytest.approx(sum(members) / len(members))
    difficulty = {row["id"]: row["difficulty"] for row in dataset.queries["test"]}
    by_difficulty: dict[str, list[dict]] = {}
    for prediction in read_predictions(report_dir):
        if difficulty[prediction["query_id"]]:
            by_difficulty.setdefault(difficulty[prediction["query_id"]], []).append(prediction)
    assert set(result["by_difficulty"]) == set(by_difficulty)
    for tag, predictions in by_difficulty.items():
        group = result["by_difficulty"][tag]
        hits = [recomputed_metrics(p, relevance[p["query_id"]])["hit@1"] for p in predictions]
        assert group["queries"] == len(predictions) and group["hit@1"] == pytest.approx(sum(hits) / len(hits))
        assert group["think_rate"] == pytest.approx(sum(p["think"] for p in predictions) / len(predictions))
    if by_difficulty:
        assert "## By difficulty tag" in (report_dir / "report.md").read_text()
    return report


def test_adaptive_report_files_and_numbers_match_the_predictions(counted_model, toy_dataset, tmp_path):
    # τ at the median p_think of the test queries, so that the untrained gate sends some to think and not others.
    queries = [prepared_input(row) for row in load_prepared(toy_dataset).queries["test"]]
    threshold = counted_model.think_probability(queries).median().item()
    counted_model.config.gate_threshold = threshold
    report = run_eval(counted_model, toy_dataset, tmp_path / "report", mode="adaptive", batch_size=4, command="twn eval ...")
    for name in REPORT_FILES:
        assert (tmp_path / "report" / name).is_file()
    with Image.open(tmp_path / "report" / "quality_vs_tokens.png") as plot:
        assert plot.format == "PNG" and plot.size[0] > 300
    assert json.loads((tmp_path / "report" / "report.json").read_text()) == json.loads(json.dumps(report))
    report = check_report_against_predictions(tmp_path / "report", toy_dataset)
    assert {"simple", "one_step", "two_step"} <= set(report["result"]["by_difficulty"])
    predictions = read_predictions(tmp_path / "report")
    assert {p["think"] for p in predictions} == {True, False}
    assert all(p["think"] == (p["p_think"] >= threshold) for p in predictions)
    assert all(bool(p["cot"]) == p["think"] and (p["reasoning_tokens"] > 0) == p["think"] for p in predictions)
    # Adaptive embeds each query once (the gate's choice) and each candidate once, never thinking.
    candidates = sum(task["candidates"] for task in report["result"]["tasks"].values())
    assert counted_model.embedded == {"never": candidates, "always": 0, "auto": len(predictions)}
    assert report["mode"] == "adaptive" and report["threshold"] == threshold and report["command"] == "twn eval ..."
    assert "## Tasks" in (tmp_path / "report" / "report.md").read_text()


def test_sweep_endpoints_equal_the_never_and_always_modes(counted_model, toy_dataset, tmp_path):
    sweep = run_eval(counted_model, toy_dataset, tmp_path / "sweep", mode="sweep", batch_size=4)
    queries = sum(task["queries"] for task in sweep["result"]["tasks"].values())
    candidates = sum(task["candidates"] for task in sweep["result"]["tasks"].values())
    # Every threshold is answered from two embeddings per query.
    assert counted_model.embedded == {"never": candidates + queries, "always": queries, "auto": 0}
    points = sweep["sweep"]
    assert [points[0]["mode"], points[-1]["mode"]] == ["never", "always"]
    think_rates = [point["overall"]["think_rate"] for point in points]
    assert think_rates == sorted(think_rates) and think_rates[0] == 0 and think_rates[-1] == 1
    assert sweep["result"]["threshold"] == 0.5 and sweep["result"] in points
    for mode, point in (("never", points[0]), ("always", points[-1])):
        single = run_eval(counted_model, toy_dataset, tmp_path / mode, mode=mode, batch_size=4)
        assert without_timings(single["result"]) == without_timings(point)
    check_report_against_predictions(tmp_path / "sweep", toy_dataset)
    # A later run in the same directory answers from the cache alone.
    before = dict(counted_model.embedded)
    adaptive = run_eval(counted_model, toy_dataset, tmp_path / "sweep", mode="adaptive", batch_size=4)
    assert counted_model.embedded == before
    assert adaptive["run"]["tasks_from_cache"] == list(adaptive["result"]["tasks"])
    assert without_timings(adaptive["result"]) == without_timings(sweep["result"])


def test_a_sweep_reports_routing_against_random_task_level_and_oracle_routing(make_model, toy_dataset, tmp_path):
    from twn_cli.engine.checkpoint import load_checkpoint, save_checkpoint

    checkpoint = save_checkpoint(make_model(), tmp_path / "gate", stages=[], extra={"gate": {"validation": {"think_tasks": ["t2i"]}}})
    report = run_eval(load_checkpoint(checkpoint, device="cpu"), toy_dataset, tmp_path / "sweep", mode="sweep", batch_size=4)
    points, routing = report["sweep"], report["routing"]
    never, always = points[0]["overall"]["score"], points[-1]["overall"]["score"]
    assert routing["never"] == pytest.approx(never) and routing["always"] == pytest.approx(always)
    gate = routing["gate"]["points"]
    assert [entry["score"] for entry in gate] == [point["overall"]["score"] for point in points[1:-1]]
    for entry, point in zip(gate, points[1:-1]):
        share = point["overall"]["reasoning_tokens_per_query"] / points[-1]["overall"]["reasoning_tokens_per_query"]
        assert entry["token_share"] == pytest.approx(share) and entry["chord_at_token_share"] == pytest.approx(never + share * (always - never))
    # Task-level routing: the think view's score for t2i, the no-think view's for every other task.
    tasks = {name: (points[-1] if name == "t2i" else points[0])["tasks"][name]["score"] for name in points[0]["tasks"]}
    assert routing["task_level"]["score"] == pytest.approx(sum(tasks.values()) / len(tasks))
    assert routing["task_level"]["tasks"] == ["t2i"]
    assert routing["oracle"]["score"] >= max(never, always, *(entry["score"] for entry in gate)) - 1e-12
    assert routing["oracle"]["area"] >= routing["gate"]["area"]
    markdown = (tmp_path / "sweep" / "report.md").read_text()
    assert "Routing: the gate's thresholds against random routing" in markdown and "task-level (t2i)" in markdown


def test_an_interrupted_evaluation_resumes_without_recomputing_finished_tasks(make_model, counting, toy_dataset, tmp_path):
    uninterrupted_model = counting(make_model())
    uninterrupted = run_eval(uninterrupted_model, toy_dataset, tmp_path / "whole", mode="sweep", batch_size=4)
    first_task = next(iter(uninterrupted["result"]["tasks"].values()))
    first_task_inputs = first_task["candidates"] + 2 * first_task["queries"]

    def stop_after_the_first_task(event):
        if event.step == "done":
            raise KeyboardInterrupt

    interrupted_model = counting(make_model())
    with pytest.raises(KeyboardInterrupt):
        run_eval(interrupted_model, toy_dataset, tmp_path / "resumed", mode="sweep", batch_size=4, progress=stop_after_the_first_task)
    assert sum(interrupted_model.embedded.values()) == first_task_inputs
    assert not (tmp_path / "resumed" / "report.json").exists()

    resumed_model = counting(make_model())
    resumed = run_eval(resumed_model, toy_dataset, tmp_path / "resumed", mode="sweep", batch_size=4)
    assert sum(resumed_model.embedded.values()) == sum(uninterrupted_model.embedded.values()) - first_task_inputs
    assert resumed["run"]["tasks_from_cache"] == [next(iter(resumed["result"]["tasks"]))]
    assert without_timings(resumed) == without_timings(uninterrupted)
    assert read_predictions(tmp_path / "resumed") == read_predictions(tmp_path / "whole")


def test_an_interrupted_task_keeps_its_finished_blocks(counted_model, toy_dataset, tmp_path, monkeypatch):
    def stop_after_the_first_block(event):
        assert event.task_number == 1 and event.step == "candidates" and event.done < event.total
        raise KeyboardInterrupt

    monkeypatch.setattr("twn_cli.engine.batching.BLOCK_BATCHES", 1)  # blocks of one batch: the first task has several
    with pytest.raises(KeyboardInterrupt):
        run_eval(counted_model, toy_dataset, tmp_path, mode="never", batch_size=2, progress=stop_after_the_first_block)
    assert counted_model.embedded["never"] == 2
    report = run_eval(counted_model, toy_dataset, tmp_path, mode="never", batch_size=2)
    inputs = sum(task["inputs"] for task in report["result"]["tasks"].values())
    assert counted_model.embedded["never"] == inputs  # one block before the interruption, the rest after it


def hand_built_dataset(path: Path, pools: dict[str, list[str]]) -> Path:
    """One visual-document task over six text pages; `pools[query id]` is its candidate list ([] = global)."""
    pages = [
        "the red circle sits above the blue square", "a green triangle beside a yellow star",
        "three grey hexagons in a row", "an orange pentagon at the bottom", "a purple star and a red square",
        "the picture shows nothing but a white circle",
    ]
    candidates = [{"id": f"page-{i}", "task": "docs", "instruction": "", "text": text, "images": []} for i, text in enumerate(pages)]
    golds = {"q-0": (["page-0", "page-4"], [2.0, 1.0]), "q-1": (["page-2"], [1.0]), "q-2": (["page-3", "page-5"], [1.0, 1.0])}
    texts = {"q-0": "where is the red shape", "q-1": "grey hexagons", "q-2": "which page shows an orange shape"}
    queries = [
        {
            "id": query_id, "task": "docs", "meta_task": "visdoc", "modality": "visdoc", "instruction": "Find the page.",
            "text": texts[query_id], "images": [], "positive_ids": gold_ids, "positive_relevance": relevance,
            "negative_ids": [], "candidate_ids": pools[query_id], "cot": "", "difficulty": "",
        }
        for query_id, (gold_ids, relevance) in golds.items()
    ]
    pool_kind = "global" if not any(pools.values()) else "per_query"
    tasks = {"docs": {"meta_task": "visdoc", "modality": "visdoc", "pool": pool_kind}}
    return write_prepared(path, {"test": queries}, candidates, {"source": "test", "tasks": tasks, "skipped": [], "frames_per_video": 0})


def test_a_global_pool_ranks_like_per_query_pools_that_list_the_task_and_smaller_pools_stay_inside(make_model, tmp_path):
    model = make_model()
    every_page = [f"page-{i}" for i in (5, 3, 1, 0, 4, 2)]  # the whole task, in another order
    global_pool = hand_built_dataset(tmp_path / "global", {"q-0": [], "q-1": [], "q-2": []})
    listed = hand_built_dataset(tmp_path / "listed", {"q-0": every_page, "q-1": every_page, "q-2": every_page})
    small = hand_built_dataset(tmp_path / "small", {"q-0": every_page, "q-1": ["page-2", "page-3"], "q-2": ["page-3", "page-1"]})

    reports = {name: run_eval(model, path, tmp_path / f"report-{name}", mode="never") for name, path in
               (("global", global_pool), ("listed", listed), ("small", small))}
    predictions = {name: read_predictions(tmp_path / f"report-{name}") for name in reports}
    for prediction in predictions["global"]:
        assert len(prediction["top_ids"]) == 6
    # Scores and therefore the rankings are the same; the pool order does not matter (no ties here).
    for key in ("top_ids", "gold_ranks", "top_scores"):
        assert [p[key] for p in predictions["global"]] == [p[key] for p in predictions["listed"]]
    assert without_timings(reports["global"]["result"]["overall"]) == without_timings(reports["listed"]["result"]["overall"])
    assert reports["global"]["result"]["tasks"]["docs"]["pool"] == "global"
    # A smaller pool ranks only its own candidates; a gold outside it is a miss (no rank).
    q1, q2 = predictions["small"][1], predictions["small"][2]
    assert sorted(q1["top_ids"]) == ["page-2", "page-3"] and q1["gold_ranks"][0] in (1, 2)
    assert sorted(q2["top_ids"]) == ["page-1", "page-3"] and q2["gold_ranks"][1] is None
    # Visual documents are scored by NDCG@5 with the graded relevances.
    for name, path in (("global", global_pool), ("small", small)):
        report = check_report_against_predictions(tmp_path / f"report-{name}", path)
        assert report["result"]["modalities"]["visdoc"]["headline_metric"] == "ndcg@5"
        assert report["result"]["tasks"]["docs"]["score"] == report["result"]["tasks"]["docs"]["metrics"]["ndcg@5"]


def test_it_refuses_a_report_directory_that_holds_something_else(make_model, toy_dataset, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(TWNError, match="not an eval report"):
        run_eval(make_model(), toy_dataset, tmp_path, mode="never")
    with pytest.raises(TWNError, match="mode must be"):
        run_eval(make_model(), toy_dataset, tmp_path / "new", mode="sometimes")
    with pytest.raises(TWNError, match="no split 'dev'"):
        run_eval(make_model(), toy_dataset, tmp_path / "new", mode="never", split="dev")
