"""The sample MMEB-V2-style eval set: real pictures, read by `twn prepare` into the right tasks, pools and golds."""

from __future__ import annotations

from pathlib import Path

import pytest

from twn_cli.data.prepared import load_prepared
from twn_cli.data.sample_eval import CAPTIONS, VOC_CLASSES, VOC_LABELS, VQA, write_sample_mmeb_eval
from twn_cli.stages.prepare import run_prepare

TASKS = {"MSCOCO_i2t": "retrieval", "MSCOCO_t2i": "retrieval", "VOC2007": "classification", "OK-VQA": "vqa"}


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> tuple[Path, list[Path]]:
    folder = tmp_path_factory.mktemp("sample") / "mmeb-eval"
    return folder, write_sample_mmeb_eval(folder)


@pytest.fixture(scope="module")
def prepared(sample, tmp_path_factory):
    folder, _ = sample
    output = tmp_path_factory.mktemp("prepared") / "out"
    run_prepare(str(folder), output, skip_bad=False, cot_column=None, instruction=None, split=None)
    return load_prepared(output)


def queries(prepared, task: str) -> list[dict]:
    """The task's query rows in file order (ids are <task>-<row>)."""
    rows = {row["id"]: row for row in prepared.queries["test"] if row["task"] == task}
    return [rows[f"{task}-{index}"] for index in range(len(rows))]


def gold(prepared, row: dict) -> dict:
    (gold_id,) = row["positive_ids"]
    (index,) = [i for i, candidate_id in enumerate(prepared.candidates["id"]) if candidate_id == gold_id]
    return prepared.candidates[index]


def test_it_writes_one_parquet_per_task_and_copies_its_images(sample):
    folder, written = sample
    assert [path.name for path in written] == [f"{task}.parquet" for task in TASKS]
    assert sorted(path.name for path in (folder / "images").iterdir()) == sorted(CAPTIONS)


def test_prepare_files_the_tasks_under_their_meta_tasks(prepared):
    assert list(prepared.queries) == ["test"]
    assert prepared.manifest["splits"]["test"]["tasks"] == {
        "MSCOCO_i2t": len(CAPTIONS), "MSCOCO_t2i": len(CAPTIONS), "VOC2007": len(VOC_LABELS), "OK-VQA": len(VQA)
    }
    assert prepared.manifest["tasks"] == {
        task: {"meta_task": meta_task, "modality": "image", "pool": "per_query"} for task, meta_task in TASKS.items()
    }
    assert prepared.manifest["skipped"] == []


def test_every_query_is_ranked_against_its_pool_with_the_first_target_gold(prepared):
    pool_sizes = {"MSCOCO_i2t": len(CAPTIONS), "MSCOCO_t2i": len(CAPTIONS), "VOC2007": len(VOC_CLASSES),
                  "OK-VQA": len({answer for _, _, answer in VQA})}
    for task, size in pool_sizes.items():
        for row in queries(prepared, task):
            assert len(set(row["candidate_ids"])) == size
            assert prepared.candidate_pool(row) == row["candidate_ids"]
            assert row["positive_ids"] == row["candidate_ids"][:1]


def test_queries_and_golds_are_the_pictures_and_their_descriptions(prepared, sample):
    images = sample[0] / "images"
    for row, (name, caption) in zip(queries(prepared, "MSCOCO_i2t"), CAPTIONS.items()):
        assert row["instruction"] == "Find an image caption describing the given everyday image."
        assert (row["text"], row["images"]) == ("", [str(images / name)])
        assert gold(prepared, row)["text"] == caption

    for row, (name, caption) in zip(queries(prepared, "MSCOCO_t2i"), CAPTIONS.items()):
        assert row["instruction"] == "Find me an everyday image that matches the given caption:"
        assert (row["text"], row["images"]) == (caption, [])
        target = gold(prepared, row)
        assert (target["instruction"], target["images"]) == ("Represent the given image.", [str(images / name)])

    for row, (name, label) in zip(queries(prepared, "VOC2007"), VOC_LABELS.items()):
        assert row["instruction"] == "Represent the given image for classification"
        assert row["images"] == [str(images / name)]
        assert gold(prepared, row)["text"] == label

    for row, (name, question, answer) in zip(queries(prepared, "OK-VQA"), VQA):
        assert row["instruction"] == "Represent the given image with the following question:"
        assert (row["text"], row["images"]) == (question, [str(images / name)])
        assert gold(prepared, row)["text"] == answer
