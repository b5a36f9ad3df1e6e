"""MMEB-V2 as the field runs it: the task registry, `twn prepare mmeb-v2` on tiny replicas of every layout,
the leaderboard table of `twn eval` checked against numbers computed by hand, and one-line errors."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch
from mmeb_v2_replica import (
    CLASSIFY,
    GROUNDING,
    HMDB51,
    IMAGENET,
    MSRVTT,
    SSV2_CHOICES,
    T2I_QUERY,
    T2I_TARGET,
    VIDEO_MME,
    VIDORE_QUERIES,
    VISRAG_LONG_NAME,
    build_replica,
    png_bytes,
    visrag_page_file,
)
from safetensors import safe_open
from typer.testing import CliRunner

from twn_cli.cli import app
from twn_cli.data.mmeb_v2_sources import _class_names
from twn_cli.data.mmeb_v2_tasks import (
    DOCUMENT_QUERY,
    DOCUMENT_TARGET,
    GROUPS,
    TASK_BY_NAME,
    TASKS,
    VIDEO_QA_PROMPT,
    VIDEO_TARGET,
    select_tasks,
)
from twn_cli.data.prepared import load_prepared
from twn_cli.errors import TWNError
from twn_cli.eval.cache import EmbeddingTable, model_key, task_cache_dir
from twn_cli.stages.evaluate import CACHE_DIR, load_task, run_eval
from twn_cli.stages.prepare_mmeb_v2 import run_prepare_mmeb_v2

DOCS = Path(__file__).parent.parent / "docs" / "mmeb-v2.md"
SAMPLED = [0, 1, 3, 4, 5, 6, 8, 9]  # the 8 frames sample_frames keeps of 10: the middle of 8 equal segments


def frames_of(folder: Path) -> list[str]:
    return [str(folder / f"frame_{index:04d}.jpg") for index in SAMPLED]


def video_frames(row: dict) -> list[str]:
    """The sampled frames of a prepared row's video (its own column; the row then holds no images)."""
    assert row["images"] == [] and row["video"]["frame_indices"] == SAMPLED and row["video"]["total_frames"] == 10
    return row["video"]["paths"]


@pytest.fixture(scope="module")
def replica(tmp_path_factory) -> tuple[Path, object]:
    """Every replica layout, prepared once: (root, prepared dataset)."""
    root = build_replica(tmp_path_factory.mktemp("mmeb") / "root")
    output = root.parent / "prepared"
    run_prepare_mmeb_v2(root, output)
    return root, load_prepared(output)


def queries_of(dataset, task: str) -> list[dict]:
    return [row for row in dataset.queries["test"] if row["task"] == task]


def candidates_by_id(dataset) -> dict[str, dict]:
    return {row["id"]: row for row in dataset.candidates}


def texts(dataset, ids) -> list[str]:
    candidates = candidates_by_id(dataset)
    return [candidates[i]["text"] for i in ids]


# ------------------------------------------------------------------------------------------- the registry
def test_the_registry_is_the_published_benchmark():
    assert len(TASKS) == len(TASK_BY_NAME) == 78
    counts = {}
    for task in TASKS:
        counts[task.column] = counts.get(task.column, 0) + 1
    assert counts == {"I-CLS": 10, "I-QA": 10, "I-RET": 12, "I-VG": 4, "V-CLS": 5, "V-QA": 5, "V-RET": 5, "V-MRET": 3,
                      "ViDoRe-V1": 10, "ViDoRe-V2": 4, "VisRAG": 6, "VisDoc-OOD": 4}
    assert [sum(task.modality == m for task in TASKS) for m in ("image", "video", "visdoc")] == [36, 18, 24]
    assert {task.metric for task in TASKS if task.modality == "visdoc"} == {"ndcg@5"}
    assert {task.metric for task in TASKS if task.modality != "visdoc"} == {"hit@1"}
    assert len({task.data for task in TASKS}) == 78  # every task has files of its own
    # Video and document tasks carry their published instructions; image tasks carry theirs in their parquet.
    assert all(task.query_instruction for task in TASKS if task.modality != "image")
    assert TASK_BY_NAME["MSR-VTT"].target_instruction == VIDEO_TARGET
    assert [task.name for task in select_tasks(["V-MRET", "ImageNet_1K", "Kinetics-700"])] == [
        "ImageNet-1K", "K700", "QVHighlight", "Charades-STA", "MomentSeeker"]
    with pytest.raises(ValueError, match="'ImageNet-2K' is not an MMEB-V2 task"):
        select_tasks(["ImageNet-2K"])


def test_the_user_doc_lists_every_task_and_column():
    doc = DOCS.read_text()
    missing = [name for name in [task.name for task in TASKS] + list(GROUPS) if f"`{name}`" not in doc]
    assert not missing


# ------------------------------------------------------------------------------------------- every layout
def test_image_tasks_keep_their_instructions_pools_and_gold(replica):
    root, dataset = replica
    images = root / "image-tasks"
    for row, (picture, labels) in zip(queries_of(dataset, "ImageNet-1K"), IMAGENET):
        assert (row["instruction"], row["text"]) == (CLASSIFY.removeprefix("<|image_1|> "), "")
        assert row["images"] == [str(images / "ImageNet-1K" / picture)]
        assert texts(dataset, row["candidate_ids"]) == labels
        assert row["positive_ids"] == row["candidate_ids"][:1]
    [t2i] = queries_of(dataset, "MSCOCO_t2i")
    assert (t2i["instruction"], t2i["text"], t2i["images"]) == (T2I_QUERY, "A cat.", [])
    targets = [candidates_by_id(dataset)[i] for i in t2i["candidate_ids"]]
    assert {(target["instruction"], target["text"]) for target in targets} == {(T2I_TARGET.removeprefix("<|image_1|> "), "")}
    assert targets[0]["images"] == [str(images / "MSCOCO_t2i" / "chelsea.png")] and t2i["positive_ids"] == [targets[0]["id"]]
    # Two regions of one picture are two candidates: the caption tells them apart.
    [grounding] = queries_of(dataset, "RefCOCO-Matching")
    assert texts(dataset, grounding["candidate_ids"]) == ["the left ear", "the right eye"]
    assert candidates_by_id(dataset)[grounding["positive_ids"][0]]["instruction"] == GROUNDING.removeprefix("<|image_1|> ")


def test_video_classification_ranks_against_every_class_or_its_own_choices(replica):
    root, dataset = replica
    frames = root / "video-tasks" / "frames" / "video_cls"
    hmdb = queries_of(dataset, "HMDB51")
    assert dataset.manifest["tasks"]["HMDB51"]["pool"] == "global"
    assert sorted(texts(dataset, dataset.candidate_pool(hmdb[0]))) == sorted(_class_names()["HMDB51"])
    assert len(_class_names()["HMDB51"]) == 51
    for row, (video, label, _) in zip(hmdb, HMDB51):
        assert row["instruction"] == TASK_BY_NAME["HMDB51"].query_instruction
        assert video_frames(row) == frames_of(frames / "HMDB51" / video)
        assert texts(dataset, row["positive_ids"]) == [label]
    [ssv2] = queries_of(dataset, "SmthSmthV2")
    assert texts(dataset, ssv2["candidate_ids"]) == SSV2_CHOICES
    assert texts(dataset, ssv2["positive_ids"]) == [SSV2_CHOICES[1]]
    assert video_frames(ssv2) == frames_of(frames / "SSv2" / "12345")


def test_video_retrieval_ranks_each_caption_against_every_video(replica):
    root, dataset = replica
    frames = root / "video-tasks" / "frames" / "video_ret"
    msrvtt = queries_of(dataset, "MSR-VTT")  # the test_1k config only
    assert [row["text"] for row in msrvtt] == [caption for _, caption, _ in MSRVTT]
    assert {row["instruction"] for row in msrvtt} == {TASK_BY_NAME["MSR-VTT"].query_instruction}
    pool = dataset.candidate_pool(msrvtt[0])
    assert len(pool) == 3 and all(not row["candidate_ids"] for row in msrvtt)
    for row, (video, _, _) in zip(msrvtt, MSRVTT):
        [gold] = [candidates_by_id(dataset)[i] for i in row["positive_ids"]]
        assert (gold["instruction"], video_frames(gold)) == (VIDEO_TARGET, frames_of(frames / "MSR-VTT" / video))
    first_caption_and_folder = {
        "MSVD": ("a horse stands", "-4wsuPCjDBc_5_15"), "DiDeMo": ("a man looks through a camera", "10015567@N08_3655084291"),
        "YouCook2": ("pour the coffee", "GLd3aX16zBg_0"), "VATEX": ("an astronaut smiles", "Ptf_2VRj-V0_000122_000132"),
    }
    for task, (caption, video) in first_caption_and_folder.items():
        [row] = queries_of(dataset, task)
        assert row["text"] == caption
        assert video_frames(candidates_by_id(dataset)[row["positive_ids"][0]]) == frames_of(frames / task / video)


def test_moment_retrieval_ranks_the_clips_of_the_video(replica):
    root, dataset = replica
    media = root / "video-tasks" / "frames" / "video_mret"
    [qv] = queries_of(dataset, "QVHighlight")
    video = media / "QVHighlight" / "RoripwjYFp8_360.0_510.0"
    assert (qv["text"], video_frames(qv)) == ("the rocket on its launch pad", frames_of(video / "query"))
    clips = [video_frames(candidates_by_id(dataset)[i]) for i in qv["candidate_ids"]]
    assert clips == [frames_of(video / name) for name in ("negative_0", "negative_1", "positive_0")]
    assert video_frames(candidates_by_id(dataset)[qv["positive_ids"][0]]) == frames_of(video / "positive_0")
    text, image, segment = queries_of(dataset, "MomentSeeker")
    task = TASK_BY_NAME["MomentSeeker"]
    assert (text["instruction"], text["images"]) == (task.query_instruction, [])
    assert (image["instruction"], image["images"]) == (task.query_instruction_for("image"), [str(media / "MomentSeeker" / "query_look.jpg")])
    assert segment["instruction"] == task.query_instruction_for("video")
    assert video_frames(segment) == frames_of(media / "MomentSeeker" / "video_frames" / "clips_a_full")
    assert [video_frames(candidates_by_id(dataset)[i]) for i in text["candidate_ids"]] == [
        frames_of(media / "MomentSeeker" / "video_frames" / clip) for clip in ("clips_a_pos", "clips_a_neg")]
    assert text["positive_ids"] == text["candidate_ids"][:1]


@pytest.mark.parametrize("task, text, choices, gold, video", [
    ("Video-MME", "What drink is shown?\nA. Tea.\nB. Coffee.\nC. Milk.\nD. Juice.", ["Tea", "Coffee", "Milk", "Juice"],
     "Coffee", VIDEO_MME["videoID"]),
    ("NExTQA", "what is the animal\nOptions:\n(A) a cat\n(B) a horse\n(C) a dog\n(D) a cow\n(E) a bird",
     ["(A) a cat", "(B) a horse", "(C) a dog", "(D) a cow", "(E) a bird"], "(B) a horse", "4010069381"),
    ("EgoSchema", "What is c making?A. tea B. soup C. coffee D. bread E. salad", ["tea", "soup", "coffee", "bread", "salad"],
     "coffee", "ego-1"),
    ("MVBench", "What is the action performed?\nOptions:\n(A) Taking a photo\n(B) Not sure\n(C) Dropping a camera",
     ["(A) Taking a photo", "(B) Not sure", "(C) Dropping a camera"], "(A) Taking a photo", "action_antonym/166583.webm"),
    ("ActivityNetQA", "is the person smiling? (A) yes; (B) no.", ["yes", "no"], "yes", "v_abc123"),
])
def test_video_qa_asks_the_question_with_its_options(replica, task, text, choices, gold, video):
    root, dataset = replica
    [row] = queries_of(dataset, task)
    assert (row["instruction"], row["text"]) == (VIDEO_QA_PROMPT, text)
    assert texts(dataset, row["candidate_ids"]) == choices
    assert texts(dataset, row["positive_ids"]) == [gold]
    assert video_frames(row) == frames_of(root / "video-tasks" / "frames" / "video_qa" / task / video)


def test_visual_documents_rank_the_whole_corpus_with_graded_qrels(replica):
    root, dataset = replica
    pages = root / "visdoc-tasks" / "ViDoRe_arxivqa"
    first, second = queries_of(dataset, "ViDoRe_arxivqa")
    assert (first["instruction"], first["text"]) == (DOCUMENT_QUERY, VIDORE_QUERIES[1][0])
    corpus = [candidates_by_id(dataset)[i] for i in dataset.candidate_pool(first)]
    assert sorted(row["images"][0] for row in corpus) == [str(pages / f"{page}.png") for page in (101, 102, 103, 104, 105)]
    assert {row["instruction"] for row in corpus} == {DOCUMENT_TARGET}
    gold_pages = [candidates_by_id(dataset)[i]["images"][0] for i in first["positive_ids"]]
    assert (gold_pages, first["positive_relevance"]) == ([str(pages / "101.png"), str(pages / "102.png")], [2.0, 1.0])
    assert second["positive_relevance"] == [1.0]
    # VisRAG's pages come from its corpus parquet, written under the maintainers' shortened names.
    long_page = root / "visdoc-tasks" / "VisRAG_ArxivQA" / visrag_page_file(VISRAG_LONG_NAME)
    assert long_page.name.startswith(VISRAG_LONG_NAME[:50] + "_") and long_page.read_bytes() == png_bytes("text.png")
    _, handwritten = queries_of(dataset, "VisRAG_ArxivQA")
    assert candidates_by_id(dataset)[handwritten["positive_ids"][0]]["images"] == [str(long_page)]
    assert len(dataset.candidate_pool(handwritten)) == 3


# ------------------------------------------------------------------------------------------- missing and broken
def test_missing_tasks_are_listed_and_skipped(tmp_path, caplog):
    root = build_replica(tmp_path / "root", ["ImageNet-1K"])
    with caplog.at_level(logging.WARNING):
        run_prepare_mmeb_v2(root, tmp_path / "out", tasks=["ImageNet-1K", "MSR-VTT", "VisDoc-OOD"])
    benchmark = load_prepared(tmp_path / "out").manifest["benchmark"]
    ood = ["ViDoSeek-page", "ViDoSeek-doc", "MMLongBench-page", "MMLongBench-doc"]
    assert benchmark == {"name": "mmeb-v2", "selected": ["ImageNet-1K", "MSR-VTT", *ood], "missing": ["MSR-VTT", *ood]}
    assert "5 of the 6 selected MMEB-V2 tasks are not under" in caplog.text and "MMLongBench-doc" in caplog.text
    with pytest.raises(TWNError, match="none of the 1 selected MMEB-V2 tasks is under"):
        run_prepare_mmeb_v2(root, tmp_path / "none", tasks=["EDIS"])


def _break(root: Path, damage: str) -> str:
    """Damage one file of the replica; the path the error must name."""
    if damage == "frame folder":
        target = root / "video-tasks" / "frames" / "video_ret" / "MSR-VTT" / "video7011"
        shutil.rmtree(target)
    elif damage == "frame":
        target = root / "video-tasks" / "frames" / "video_ret" / "MSR-VTT" / "video7012" / "frame_0003.jpg"
        target.write_bytes(b"not a jpeg")
    elif damage == "qrels":
        target = root / "visdoc-tasks" / "arxivqa_test_subsampled_beir" / "qrels"
        shutil.rmtree(target)
    elif damage == "page":
        target = root / "visdoc-tasks" / "ViDoRe_arxivqa" / "102.png"
        target.unlink()
    elif damage == "parquet":
        target = root / "video-tasks" / "HMDB51" / "data" / "test-00000-of-00001.parquet"
        target.write_bytes(b"PAR1 and then nothing useful")
    else:  # picture
        target = root / "image-tasks" / "ImageNet-1K" / "coffee.png"
        target.unlink()
    return str(target.relative_to(root)) if damage in ("qrels", "parquet") else str(target)


@pytest.mark.parametrize("damage, task", [
    ("frame folder", "MSR-VTT"), ("frame", "MSR-VTT"), ("qrels", "ViDoRe_arxivqa"), ("page", "ViDoRe_arxivqa"),
    ("parquet", "HMDB51"), ("picture", "ImageNet-1K"),
])
def test_an_incomplete_task_is_one_line_naming_its_file_and_writes_nothing(tmp_path, damage, task):
    root = build_replica(tmp_path / "root", ["ImageNet-1K", task])
    named = _break(root, damage)
    with pytest.raises(TWNError) as error:
        run_prepare_mmeb_v2(root, tmp_path / "out")
    message = str(error.value)
    assert message.startswith(f"MMEB-V2 task '{task}' is incomplete: ") and named in message and "\n" not in message
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------- the table, by hand
HAND_TASKS = ["ImageNet-1K", "MSR-VTT", "ViDoRe_arxivqa"]
# Per task, per query: the candidates best first in each view (by label, video or page), p_think, reasoning tokens.
HAND_RANKINGS = {
    "ImageNet-1K": [({"no_think": ["cat"], "think": ["rocket"]}, 0.2, 5),
                    ({"no_think": ["horse"], "think": ["cup of coffee"]}, 0.9, 7),
                    ({"no_think": ["rocket"], "think": ["rocket"]}, 0.7, 9)],
    "MSR-VTT": [({"no_think": ["video7010"], "think": ["video7011"]}, 0.1, 4),
                ({"no_think": ["video7012"], "think": ["video7011"]}, 0.6, 6),
                ({"no_think": ["video7012"], "think": ["video7010"]}, 0.4, 8)],
    "ViDoRe_arxivqa": [({"no_think": ["103", "101", "105", "102", "104"], "think": ["102", "101", "103", "104", "105"]}, 0.8, 10),
                       ({"no_think": ["103", "101", "102", "104", "105"], "think": ["101", "102", "104", "105", "103"]}, 0.3, 12)],
}


def _name_of(candidate: dict) -> str:
    """A candidate's name in HAND_RANKINGS: its label, its video folder or its page number."""
    if candidate["video"]["paths"]:
        return Path(candidate["video"]["paths"][0]).parent.name
    return Path(candidate["images"][0]).stem if candidate["images"] else candidate["text"]


def _write_hand_made_cache(model, dataset, report_dir: Path) -> None:
    """Embeddings that rank as HAND_RANKINGS says, in the eval cache: `twn eval` embeds nothing and must
    score these rankings. Candidate k of a task is the basis vector e_k; a query is a descending sum."""
    key = {"model": model_key(model), "dataset": {"path": str(dataset.path.resolve()), "created": dataset.manifest["created"], "split": "test"}}
    rows: dict[str, list[int]] = {}
    for row, name in enumerate(dataset.queries["test"]["task"]):
        rows.setdefault(name, []).append(row)
    candidates = candidates_by_id(dataset)
    for name, task_rows in rows.items():
        task = load_task(dataset, "test", name, task_rows)
        folder = task_cache_dir(report_dir / CACHE_DIR, name)
        task_key = {**key, "task": name}
        table = EmbeddingTable(task.candidate_ids, model.embedding_dim, task_key, views=("no_think",))
        table.embeddings["no_think"] = torch.eye(len(task.candidate_ids), model.embedding_dim)
        table.present["no_think"][:] = True
        table.save(folder / "candidates.safetensors")
        position = {_name_of(candidates[c]): k for k, c in enumerate(task.candidate_ids)}
        queries = EmbeddingTable([row["id"] for row in task.queries], model.embedding_dim, task_key)
        for index, (ranking, p_think, tokens) in enumerate(HAND_RANKINGS[name]):
            for view, best_first in ranking.items():
                for rank, candidate in enumerate(best_first):
                    queries.embeddings[view][index, position[candidate]] = 10 - rank
                queries.present[view][index] = True
            queries.p_think[index], queries.reasoning_tokens[index] = p_think, tokens
            queries.cot[index] = "a thought"
        queries.save(folder / "queries.safetensors")


def test_the_leaderboard_table_is_the_hand_computed_one(tmp_path, make_model):
    root = build_replica(tmp_path / "root", HAND_TASKS)
    run_prepare_mmeb_v2(root, tmp_path / "prepared", tasks=[*HAND_TASKS, "UCF101"])  # UCF101 is not under root
    dataset = load_prepared(tmp_path / "prepared")
    model = make_model()
    _write_hand_made_cache(model, dataset, tmp_path / "report")
    report = run_eval(model, tmp_path / "prepared", tmp_path / "report", mode="sweep", threshold=0.5, thresholds=[0.5])
    assert report["run"]["tasks_from_cache"] == HAND_TASKS  # nothing was embedded: the rankings are ours

    # Graded NDCG@5 with linear gain, by hand. Query 1 has pages 101 (grade 2) and 102 (grade 1).
    ideal = 2 + 1 / math.log2(3)
    q1_never = (2 / math.log2(3) + 1 / math.log2(5)) / ideal  # 101 second, 102 fourth: 0.6399
    q1_think = (1 + 2 / math.log2(3)) / ideal  # 102 first, 101 second: 0.8597
    q2_think = 1 / math.log2(6)  # the one relevant page fifth
    expected = {
        "never": {"ImageNet-1K": 2 / 3, "MSR-VTT": 2 / 3, "ViDoRe_arxivqa": (q1_never + 1) / 2},
        "adaptive": {"ImageNet-1K": 1.0, "MSR-VTT": 1.0, "ViDoRe_arxivqa": (q1_think + 1) / 2},
        "always": {"ImageNet-1K": 2 / 3, "MSR-VTT": 1 / 3, "ViDoRe_arxivqa": (q1_think + q2_think) / 2},
    }
    tokens = {"never": 0.0, "adaptive": (7 + 9 + 6 + 10) / 8, "always": (5 + 7 + 9 + 4 + 6 + 8 + 10 + 12) / 8}
    think_rate = {"never": 0.0, "adaptive": 4 / 8, "always": 1.0}
    points = {point["mode"]: point for point in report["sweep"]}
    assert points["never"]["tasks"]["ViDoRe_arxivqa"]["metrics"]["ndcg@5"] == pytest.approx((q1_never + 1) / 2)
    assert points["never"]["tasks"]["ViDoRe_arxivqa"]["metrics"]["hit@1"] == pytest.approx(0.5)

    board = report["leaderboard"]
    assert [row["mode"] for row in board["rows"]] == ["never", "adaptive", "always"]
    for row in board["rows"]:
        scores = expected[row["mode"]]
        by_column = {"Overall": sum(scores.values()) / 3, "Image": scores["ImageNet-1K"], "Video": scores["MSR-VTT"],
                     "VisDoc": scores["ViDoRe_arxivqa"], "I-CLS": scores["ImageNet-1K"], "V-RET": scores["MSR-VTT"],
                     "ViDoRe-V1": scores["ViDoRe_arxivqa"]}
        assert row["scores"] == pytest.approx({name: by_column.get(name) for name in row["scores"]})
        assert row["reasoning_tokens_per_query"] == pytest.approx(tokens[row["mode"]])
        assert row["think_rate"] == pytest.approx(think_rate[row["mode"]])
    assert board["columns"]["Overall"] == {"tasks": 3, "of": 78} and board["columns"]["I-QA"] == {"tasks": 0, "of": 10}
    assert board["columns"]["ViDoRe-V1"] == {"tasks": 1, "of": 10} and not board["complete"]
    assert board["columns"]["V-CLS"] == {"tasks": 0, "of": 5} and board["rows"][0]["scores"]["V-CLS"] is None
    assert board["not_evaluated"]["missing_from_root"] == ["UCF101"] and len(board["not_evaluated"]["not_selected"]) == 74

    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "## MMEB-V2 leaderboard (3 of 78 tasks; missing from the root: UCF101; not selected: N24News, HatefulMemes" in markdown
    never = next(line for line in markdown.splitlines() if line.startswith("| never | 0.0 | 0% |"))
    overall = 100 * sum(expected["never"].values()) / 3
    assert never.split(" | ")[3:8] == [f"{overall:.1f}", "66.7", "66.7", f"{100 * (q1_never + 1) / 2:.1f}", "66.7"]
    assert "I-QA (0/10)" in markdown and "| Overall (3/78) |" in markdown


# ------------------------------------------------------------------------------------------- as a user
def run(*arguments):
    return CliRunner().invoke(app, [str(argument) for argument in arguments])


def _recomputed(report_dir: Path, dataset, threshold: float) -> dict[str, dict[str, float]]:
    """Each policy's headline score per task, ranked and scored here from the cached embeddings."""
    candidates = candidates_by_id(dataset)
    scores: dict[str, dict[str, float]] = {"never": {}, "adaptive": {}, "always": {}}
    for name in {row["task"] for row in dataset.queries["test"]}:
        folder = task_cache_dir(report_dir / CACHE_DIR, name)
        with safe_open(str(folder / "candidates.safetensors"), "pt") as handle:
            candidate_ids = json.loads(handle.metadata()["ids"])
            candidate_vectors = handle.get_tensor("no_think.embeddings")
        with safe_open(str(folder / "queries.safetensors"), "pt") as handle:
            views = {view: handle.get_tensor(f"{view}.embeddings") for view in ("no_think", "think")}
            p_think = handle.get_tensor("p_think")
        task_candidates = [c for c, row in candidates.items() if row["task"] == name]
        per_policy = {policy: [] for policy in scores}
        for index, query in enumerate(queries_of(dataset, name)):
            pool = query["candidate_ids"] or task_candidates
            relevance = dict(zip(query["positive_ids"], query["positive_relevance"]))
            for policy in scores:
                view = {"never": "no_think", "always": "think"}.get(policy) or ("think" if p_think[index] >= threshold else "no_think")
                score_of = {c: float(views[view][index] @ candidate_vectors[candidate_ids.index(c)]) for c in pool}
                ranked = sorted(pool, key=lambda c: (-score_of[c], relevance.get(c, 0.0)))
                if TASK_BY_NAME[name].metric == "hit@1":
                    per_policy[policy].append(float(ranked[0] in relevance))
                else:
                    dcg = sum(relevance.get(c, 0.0) / math.log2(rank + 2) for rank, c in enumerate(ranked[:5]))
                    ideal = sum(r / math.log2(rank + 2) for rank, r in enumerate(sorted(relevance.values(), reverse=True)[:5]))
                    per_policy[policy].append(dcg / ideal)
        for policy, values in per_policy.items():
            scores[policy][name] = sum(values) / len(values)
    return scores


def test_prepare_and_eval_from_the_command_line(tmp_path, toy_backbone_dir):
    tasks = ["ImageNet-1K", "MSR-VTT", "ViDoRe_arxivqa"]
    root = build_replica(tmp_path / "root", tasks)
    prepared = run("prepare", "mmeb-v2", root, "-o", tmp_path / "prepared", "--tasks", ",".join(tasks))
    assert prepared.exit_code == 0, prepared.stderr
    assert prepared.stdout.strip() == str(tmp_path / "prepared")
    evaluate = ["eval", tmp_path / "prepared", "--backbone", toy_backbone_dir, "--mode", "sweep", "--thresholds", "0.5",
                "--threshold", "0.5", "--max-think-tokens", "3", "--batch-size", "4"]
    first = run(*evaluate, "-o", tmp_path / "report")
    assert first.exit_code == 0, first.stderr
    assert "MMEB-V2 leaderboard (3 of 78 tasks" in first.stderr
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    by_hand = _recomputed(tmp_path / "report", load_prepared(tmp_path / "prepared"), 0.5)
    for row in report["leaderboard"]["rows"]:
        scores = by_hand[row["mode"]]
        assert row["scores"]["Overall"] == pytest.approx(sum(scores.values()) / 3)
        assert row["scores"]["Image"] == pytest.approx(scores["ImageNet-1K"])
        assert row["scores"]["V-RET"] == pytest.approx(scores["MSR-VTT"])
        assert row["scores"]["ViDoRe-V1"] == pytest.approx(scores["ViDoRe_arxivqa"])
    always = report["leaderboard"]["rows"][2]
    assert always["mode"] == "always" and 0 < always["reasoning_tokens_per_query"] <= 3

    # Resumable per task: a second run embeds nothing and reports the same table.
    again = run(*evaluate, "-o", tmp_path / "report")
    assert again.exit_code == 0, again.stderr
    resumed = json.loads((tmp_path / "report" / "report.json").read_text())
    assert resumed["run"]["tasks_from_cache"] == tasks and resumed["leaderboard"]["rows"] == report["leaderboard"]["rows"]

    # A frame that went missing after prepare: one line naming it, and no report that looks complete.
    frame = root / "video-tasks" / "frames" / "video_ret" / "MSR-VTT" / "video7011" / "frame_0004.jpg"
    frame.unlink()
    broken = run(*evaluate, "-o", tmp_path / "broken")
    assert broken.exit_code == 1
    errors = [line for line in broken.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1 and str(frame) in errors[0], broken.stderr
    assert not (tmp_path / "broken" / "report.json").exists()

    usage = run("prepare", "mmeb-v2", root, "-o", tmp_path / "x", "--skip-bad")
    assert usage.exit_code == 1 and "mmeb-v2 takes only ROOT" in usage.stderr
