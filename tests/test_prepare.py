"""`twn prepare`: every source layout into the one prepared format, validation, atomic writes, loading."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
from pathlib import Path

import datasets
import pyarrow
import pyarrow.parquet
import pytest
import skimage.data
from PIL import Image

from twn_cli.data.prepared import load_prepared
from twn_cli.errors import TWNError
from twn_cli.stages.prepare import run_prepare

SKIMAGE_DATA = Path(os.path.dirname(skimage.data.__file__))
PICTURES = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "camera.png", "page.png")

# Generic records: image->text (with hard negatives and a shared target) and text->image.
RECORDS = [
    {"id": "q1", "task": "pets", "split": "train", "instruction": "Find the caption.",
     "query_image": "images/chelsea.png", "pos_text": "a cat", "neg_text": ["a cup of coffee", "a rocket"],
     "cot": "whiskers and fur: a cat"},
    {"id": "q2", "task": "pets", "split": "train", "instruction": "Find the caption.",
     "query_image": "images/coffee.png", "pos_text": "a cup of coffee"},
    {"id": "q3", "task": "space", "split": "test", "query_text": "an astronaut in a space suit",
     "pos_image": "images/astronaut.png", "neg_image": ["images/rocket.jpg"]},
]


def copy_pictures(folder: Path, names=PICTURES) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(SKIMAGE_DATA / name, folder / name)
    return folder


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A folder with images/ (real pictures) where the record files go."""
    copy_pictures(tmp_path / "data" / "images")
    return tmp_path / "data"


def prepare(source, output_dir, **options):
    arguments = {"skip_bad": False, "cot_column": None, "instruction": None, "split": None, **options}
    return run_prepare(str(source), Path(output_dir), **arguments)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, list(all_columns(rows)[0]))
        writer.writeheader()
        for row in rows:  # lists travel as JSON inside a cell
            writer.writerow({key: json.dumps(value) if isinstance(value, list) else value
                             for key, value in row.items()})
    return path


def all_columns(rows: list[dict]) -> list[dict]:
    """Rows with every column any row has (tables take their columns from the first row only)."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    return [{column: row.get(column) for column in columns} for row in rows]


def write_parquet(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(all_columns(rows)), path)
    return path


def content_view(prepared) -> tuple[dict, list]:
    """Queries and candidates with candidate references replaced by content, to compare across sources."""
    candidates = {row["id"]: row for row in prepared.candidates}

    def content(candidate_id):
        row = candidates[candidate_id]
        return row["task"], row["instruction"], row["text"], tuple(row["images"])

    queries = {}
    for split, table in prepared.queries.items():
        for row in table:
            queries[split, row["id"]] = {
                **{key: row[key] for key in ("task", "meta_task", "modality", "instruction", "text", "images", "cot",
                                             "difficulty", "positive_relevance")},
                "positives": [content(i) for i in row["positive_ids"]],
                "negatives": [content(i) for i in row["negative_ids"]],
                "pool": [content(i) for i in row["candidate_ids"]],
            }
    return queries, sorted(map(content, candidates))


def query(prepared, split, query_id) -> dict:
    return next(row for row in prepared.queries[split] if row["id"] == query_id)


def candidate(prepared, candidate_id) -> dict:
    return next(row for row in prepared.candidates if row["id"] == candidate_id)


def test_jsonl_records_become_the_prepared_schema(data_dir, tmp_path, capsys):
    source = write_jsonl(data_dir / "records.jsonl", RECORDS)
    summary = prepare(source, tmp_path / "out")
    prepared = load_prepared(tmp_path / "out")
    assert capsys.readouterr().out == ""  # stdout is for the command's result only

    manifest = prepared.manifest
    assert manifest["format"] == "twn-prepared" and manifest["schema_version"] == 2
    assert manifest["source"] == str(source)
    assert manifest["splits"] == {
        "train": {"queries": 2, "tasks": {"pets": 2}},
        "test": {"queries": 1, "tasks": {"space": 1}},
    }
    assert manifest["candidates"] == 5  # 3 captions (one shared by q1 and q2) + 2 images
    assert manifest["tasks"]["pets"] == {"meta_task": "retrieval", "modality": "image", "pool": "global"}
    assert manifest["skipped"] == [] and manifest["frames_per_video"] == 8
    assert summary.table() == [("train", "pets", 2), ("test", "space", 1)]
    assert (summary.candidates, summary.skipped, summary.output_dir) == (5, 0, tmp_path / "out")

    q1, q2 = query(prepared, "train", "q1"), query(prepared, "train", "q2")
    assert q1["images"] == [str(data_dir / "images" / "chelsea.png")]
    assert (q1["instruction"], q1["text"], q1["difficulty"]) == ("Find the caption.", "", "")
    assert q1["cot"] == "whiskers and fur: a cat"
    assert candidate(prepared, q1["positive_ids"][0])["text"] == "a cat"
    assert q1["positive_relevance"] == [1.0] and q1["candidate_ids"] == []
    assert [candidate(prepared, i)["text"] for i in q1["negative_ids"]] == ["a cup of coffee", "a rocket"]
    assert q2["positive_ids"] == q1["negative_ids"][:1]  # identical targets share one candidate
    assert sorted(prepared.candidate_pool(q1)) == sorted(q1["positive_ids"] + q1["negative_ids"])

    q3 = query(prepared, "test", "q3")
    gold = candidate(prepared, q3["positive_ids"][0])
    assert (gold["task"], gold["text"], gold["images"]) == ("space", "", [str(data_dir / "images" / "astronaut.png")])


@pytest.mark.parametrize("layout", ["csv", "parquet", "datasets", "datasets-dict"])
def test_every_record_layout_gives_the_same_dataset(layout, data_dir, tmp_path):
    prepare(write_jsonl(data_dir / "records.jsonl", RECORDS), tmp_path / "from-jsonl")
    options = {}
    if layout == "csv":
        source = write_csv(data_dir / "records.csv", RECORDS)
    elif layout == "parquet":
        source = write_parquet(data_dir / "records.parquet", RECORDS)
    else:
        source, options = tmp_path / "saved", {"image_root": data_dir}
        if layout == "datasets":
            datasets.Dataset.from_list(all_columns(RECORDS)).save_to_disk(str(source))
        else:  # splits as DatasetDict keys instead of a column
            rows = [{key: value for key, value in row.items() if key != "split"} for row in all_columns(RECORDS)]
            datasets.DatasetDict(
                {"train": datasets.Dataset.from_list(rows[:2]), "test": datasets.Dataset.from_list(rows[2:])}
            ).save_to_disk(str(source))
    prepare(source, tmp_path / "out", **options)
    assert content_view(load_prepared(tmp_path / "out")) == content_view(load_prepared(tmp_path / "from-jsonl"))


def test_missing_ids_and_tasks_come_from_the_file(data_dir, tmp_path):
    rows = [
        {"text": "a cat", "pos_image": "images/chelsea.png"},
        {"text": "coffee", "target_image": "images/coffee.png"},
    ]
    prepare(write_jsonl(data_dir / "captions.jsonl", rows), tmp_path / "out", instruction="Find the picture.")
    prepared = load_prepared(tmp_path / "out")
    assert prepared.queries["train"]["id"] == ["captions-0", "captions-1"]
    assert set(prepared.queries["train"]["task"]) == {"captions"}
    assert set(prepared.queries["train"]["instruction"]) == {"Find the picture."}


def test_mmeb_train_layout(tmp_path):
    image_root = tmp_path / "MMEB-train-images"
    copy_pictures(image_root / "images" / "OK-VQA" / "Train", ["chelsea.png"])
    copy_pictures(image_root / "images" / "MSCOCO_t2i" / "Train", ["astronaut.png"])
    source = tmp_path / "MMEB-train"
    # As on the hub: <subset>/<split>-00000-of-00001.parquet, so the task is the folder's name.
    write_parquet(source / "OK-VQA" / "original-00000-of-00001.parquet", [{
        "qry": "<|image_1|>\nRepresent the given image with the following question: What animal is this?\n",
        "qry_image_path": "images/OK-VQA/Train/chelsea.png",
        "pos_text": "cat", "pos_image_path": "", "neg_text": "", "neg_image_path": "",
    }])
    write_parquet(source / "MSCOCO_t2i" / "original-00000-of-00001.parquet", [{
        "qry": "Find me an everyday image that matches the given caption: An astronaut.\n",
        "qry_image_path": "",
        "pos_text": "<|image_1|>\nRepresent the given image.\n",
        "pos_image_path": "images/MSCOCO_t2i/Train/astronaut.png",
        "neg_text": "", "neg_image_path": "",
    }])
    prepare(source, tmp_path / "out", image_root=image_root)
    prepared = load_prepared(tmp_path / "out")

    assert prepared.manifest["tasks"]["OK-VQA"]["meta_task"] == "vqa"
    assert prepared.manifest["tasks"]["MSCOCO_t2i"]["meta_task"] == "retrieval"
    vqa = query(prepared, "train", "OK-VQA/original-00000-of-00001-0")
    assert vqa["instruction"] == "Represent the given image with the following question:"
    assert vqa["text"] == "What animal is this?"
    assert vqa["images"] == [str(image_root / "images" / "OK-VQA" / "Train" / "chelsea.png")]
    assert candidate(prepared, vqa["positive_ids"][0])["text"] == "cat"
    assert vqa["negative_ids"] == []

    t2i = query(prepared, "train", "MSCOCO_t2i/original-00000-of-00001-0")
    assert (t2i["instruction"], t2i["text"], t2i["images"]) == (
        "Find me an everyday image that matches the given caption:", "An astronaut.", [])
    target = candidate(prepared, t2i["positive_ids"][0])
    assert (target["instruction"], target["text"]) == ("Represent the given image.", "")
    assert target["images"] == [str(image_root / "images" / "MSCOCO_t2i" / "Train" / "astronaut.png")]
    candidate_texts = [*prepared.candidates["text"], *prepared.candidates["instruction"]]
    assert not any("<|image_1|>" in text for text in candidate_texts)


def test_mmeb_eval_layout(tmp_path):
    image_root = copy_pictures(tmp_path / "eval_images")
    source = tmp_path / "MMEB-eval"
    labels = ["cat", "cup of coffee", "rocket"]
    write_parquet(source / "ImageNet-1K" / "test-00000-of-00001.parquet", [
        {"qry_text": "<|image_1|> Represent the given image for classification", "qry_img_path": "chelsea.png",
         "tgt_text": labels, "tgt_img_path": ["", "", ""]},
        {"qry_text": "<|image_1|> Represent the given image for classification", "qry_img_path": "rocket.jpg",
         "tgt_text": labels[::-1], "tgt_img_path": ["", "", ""]},
    ])
    write_parquet(source / "MSCOCO_t2i.parquet", [
        {"qry_text": "Find me an everyday image that matches the given caption: A cat.", "qry_img_path": "",
         "tgt_text": ["<|image_1|> Represent the given image."] * 2, "tgt_img_path": ["chelsea.png", "coffee.png"]},
    ])
    prepare(source, tmp_path / "out", image_root=image_root)
    prepared = load_prepared(tmp_path / "out")

    assert list(prepared.queries) == ["test"]
    assert prepared.manifest["tasks"]["ImageNet-1K"] == {
        "meta_task": "classification", "modality": "image", "pool": "per_query"
    }
    assert prepared.manifest["tasks"]["MSCOCO_t2i"]["pool"] == "per_query"
    first, second = (query(prepared, "test", f"ImageNet-1K/test-00000-of-00001-{row}") for row in (0, 1))
    assert (first["instruction"], first["text"]) == ("Represent the given image for classification", "")
    assert first["images"] == [str(image_root / "chelsea.png")]
    assert [candidate(prepared, i)["text"] for i in first["candidate_ids"]] == labels
    assert first["positive_ids"] == first["candidate_ids"][:1]  # gold = the first target
    assert second["positive_ids"] == second["candidate_ids"][:1] == first["candidate_ids"][2:]
    assert prepared.candidate_pool(second) == second["candidate_ids"]

    t2i = query(prepared, "test", "MSCOCO_t2i-0")
    assert t2i["text"] == "A cat."
    assert [candidate(prepared, i)["images"] for i in t2i["positive_ids"]] == [[str(image_root / "chelsea.png")]]
    assert len(t2i["candidate_ids"]) == 2


def test_mmeb_eval_task_option_names_the_task(tmp_path):
    image_root = copy_pictures(tmp_path / "eval_images", ["chelsea.png", "coffee.png"])
    source = write_parquet(tmp_path / "subset.parquet", [
        {"qry_text": "<|image_1|> Given an image, find a similar image with the changes: no cat",
         "qry_img_path": "chelsea.png",
         "tgt_text": ["<|image_1|> Represent the given image."], "tgt_img_path": ["coffee.png"]},
    ])
    prepare(source, tmp_path / "out", image_root=image_root, task="CIRR", split="validation")
    prepared = load_prepared(tmp_path / "out")
    assert prepared.manifest["splits"] == {"validation": {"queries": 1, "tasks": {"CIRR": 1}}}
    assert prepared.manifest["tasks"]["CIRR"]["meta_task"] == "retrieval"


def test_image_folder_becomes_classification(tmp_path):
    root = tmp_path / "household"
    copy_pictures(root / "cat", ["chelsea.png"])
    copy_pictures(root / "coffee_cup", ["coffee.png"])
    copy_pictures(root / "rocket", ["rocket.jpg", "camera.png"])
    (root / "rocket" / "notes.txt").write_text("not an image")
    (root / "rocket" / "drafts").mkdir()  # holds no frames: not a video
    summary = prepare(root, tmp_path / "out")
    prepared = load_prepared(tmp_path / "out")

    assert summary.table() == [("train", "household", 4)]
    assert prepared.manifest["tasks"]["household"] == {
        "meta_task": "classification", "modality": "image", "pool": "global"
    }
    assert sorted(prepared.candidates["text"]) == ["cat", "coffee cup", "rocket"]
    coffee = query(prepared, "train", "household/coffee_cup/coffee")
    assert coffee["images"] == [str(root / "coffee_cup" / "coffee.png")]
    assert coffee["instruction"] == "Represent the given image for classification"
    assert candidate(prepared, coffee["positive_ids"][0])["text"] == "coffee cup"
    assert coffee["candidate_ids"] == []
    assert sorted(prepared.candidate_pool(coffee)) == sorted(prepared.candidates["id"])


def test_image_folder_with_split_folders(tmp_path):
    root = tmp_path / "pets"
    copy_pictures(root / "train" / "cat", ["chelsea.png"])
    copy_pictures(root / "train" / "astronaut", ["astronaut.png"])
    copy_pictures(root / "test" / "cat", ["chelsea.png"])
    prepare(root, tmp_path / "out", instruction="Which class?")
    prepared = load_prepared(tmp_path / "out")
    assert prepared.manifest["splits"]["train"]["queries"] == 2 and prepared.manifest["splits"]["test"]["queries"] == 1
    assert set(prepared.queries["test"]["instruction"]) == {"Which class?"}
    assert len(prepared.candidates) == 2  # "cat" of both splits is one candidate


def write_frames(folder: Path, count: int) -> Path:
    """`count` small frames named frame_1 .. frame_<count> (not zero-padded: order must be natural)."""
    folder.mkdir(parents=True)
    camera = Image.open(SKIMAGE_DATA / "camera.png").convert("RGB")
    for index in range(1, count + 1):
        camera.crop((index * 10, 0, index * 10 + 32, 32)).save(folder / f"frame_{index}.png")
    return folder


@pytest.mark.parametrize(
    "frames, expected", [(8, [2, 4, 7, 9, 12, 14, 17, 19]), (4, [3, 8, 13, 18]), (30, list(range(1, 21)))]
)
def test_frame_folder_is_a_video_of_uniformly_sampled_frames(frames, expected, data_dir, tmp_path):
    clip = write_frames(data_dir / "clips" / "clip-1", 20)
    record = {"id": "v1", "query_image": "clips/clip-1", "pos_text": "a cameraman"}
    source = write_jsonl(data_dir / "videos.jsonl", [record])
    prepare(source, tmp_path / "out", frames=frames)
    prepared = load_prepared(tmp_path / "out")
    video = query(prepared, "train", "v1")
    assert video["images"] == []
    assert video["video"] == {
        "paths": [str(clip / f"frame_{index}.png") for index in expected],
        "frame_indices": [index - 1 for index in expected],
        "total_frames": 20,
        "fps": 0.0,
    }
    assert (video["meta_task"], video["modality"]) == ("video_retrieval", "video")
    assert prepared.manifest["frames_per_video"] == frames


def test_frame_folders_in_an_image_folder_are_video_classification(tmp_path):
    write_frames(tmp_path / "actions" / "filming" / "clip-1", 10)
    prepare(tmp_path / "actions", tmp_path / "out", frames=5)
    prepared = load_prepared(tmp_path / "out")
    clip = query(prepared, "train", "actions/filming/clip-1")
    assert (clip["meta_task"], clip["modality"]) == ("video_classification", "video")
    assert [Path(frame).name for frame in clip["video"]["paths"]] == [f"frame_{index}.png" for index in (2, 4, 6, 8, 10)]


def test_document_pages_graded_relevance_and_cot_column(data_dir, tmp_path):
    rows = [{"id": "d1", "task": "ViDoRe_arxivqa", "query_text": "Which page shows text?",
             "pos_image": ["images/page.png", "images/camera.png"], "pos_relevance": [2, 1],
             "reasoning": "a text page"}]
    prepare(write_jsonl(data_dir / "docs.jsonl", rows), tmp_path / "out", cot_column="reasoning")
    prepared = load_prepared(tmp_path / "out")
    page_query = query(prepared, "train", "d1")
    assert (page_query["meta_task"], page_query["modality"], page_query["cot"]) == ("visdoc", "visdoc", "a text page")
    assert page_query["positive_relevance"] == [2.0, 1.0]
    pages = [Path(candidate(prepared, i)["images"][0]).name for i in page_query["positive_ids"]]
    assert pages == ["page.png", "camera.png"]

    with pytest.raises(TWNError, match="no record has a value in the CoT column 'rationale'"):
        prepare(data_dir / "docs.jsonl", tmp_path / "out2", cot_column="rationale")


def test_progress_is_reported_per_record(data_dir, tmp_path):
    seen = []
    prepare(write_jsonl(data_dir / "records.jsonl", RECORDS), tmp_path / "out", progress=seen.append)
    assert sum(seen) == 3


BAD_RECORDS = {
    "missing image": (
        {"id": "bad", "query_image": "images/nowhere.png", "pos_text": "x"}, "query: image '.*nowhere.png' not found"
    ),
    "corrupt image": (
        {"id": "bad", "query_image": "images/x.png", "pos_text": "x"}, "query: image '.*x.png' not in an image format"
    ),
    "missing target image": (
        {"id": "bad", "query_text": "a", "pos_image": "images/gone.jpg"}, "positive 1: image '.*gone.jpg' not found"
    ),
    "empty text": ({"id": "bad", "query_text": "  ", "pos_text": "x"}, "query has neither text nor image"),
    "no positive": ({"id": "bad", "query_text": "a question", "pos_text": ""}, "no positive target"),
    "duplicate id": ({"id": "q1", "query_text": "again", "pos_text": "x"}, "duplicate id 'q1'"),
    "broken JSON": ('{"id": "bad", "query_text": ', "not valid JSON"),
}


def write_with_bad_record(data_dir: Path, bad) -> Path:
    (data_dir / "images" / "x.png").write_bytes(b"this is not a PNG at all")
    path = write_jsonl(data_dir / "records.jsonl", RECORDS)
    with path.open("a") as handle:
        handle.write((bad if isinstance(bad, str) else json.dumps(bad)) + "\n")
    return path  # the bad record is on line 4


@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_a_bad_record_stops_the_run_and_names_itself(case, data_dir, tmp_path):
    bad, reason = BAD_RECORDS[case]
    source = write_with_bad_record(data_dir, bad)
    with pytest.raises(TWNError) as raised:
        prepare(source, tmp_path / "out")
    first_line, listed = str(raised.value).splitlines()
    assert "1 of 4 records are bad" in first_line and "--skip-bad" in first_line
    assert listed.strip().startswith("records.jsonl:4: ")
    assert re.search(reason, listed)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_skip_bad_leaves_bad_records_out_and_lists_them(case, data_dir, tmp_path):
    bad, reason = BAD_RECORDS[case]
    summary = prepare(write_with_bad_record(data_dir, bad), tmp_path / "out", skip_bad=True)
    prepared = load_prepared(tmp_path / "out")
    [skipped] = prepared.manifest["skipped"]
    assert skipped["record"] == "records.jsonl:4"
    assert re.search(reason, skipped["reason"])
    assert summary.skipped == 1
    assert sum(len(split) for split in prepared.queries.values()) == 3
    assert "x" not in prepared.candidates["text"]  # a skipped record adds no candidates


def test_the_error_lists_the_first_five_problems(data_dir, tmp_path):
    bad = [{"id": f"bad{n}", "query_image": f"images/missing-{n}.png", "pos_text": "x"} for n in range(7)]
    with pytest.raises(TWNError) as raised:
        prepare(write_jsonl(data_dir / "records.jsonl", RECORDS + bad), tmp_path / "out")
    lines = str(raised.value).splitlines()
    assert lines[0].startswith("7 of 10 records are bad")
    assert [line.split(":")[1] for line in lines[1:6]] == ["4", "5", "6", "7", "8"]
    assert lines[6].strip() == "... and 2 more"


def test_an_interrupted_write_leaves_nothing_that_looks_complete(data_dir, tmp_path, monkeypatch):
    source = write_jsonl(data_dir / "records.jsonl", RECORDS)
    save = datasets.Dataset.save_to_disk

    def fail_on_candidates(self, path, *args, **kwargs):
        if Path(path).name == "candidates":
            raise RuntimeError("disk full")
        return save(self, path, *args, **kwargs)

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", fail_on_candidates)
    with pytest.raises(RuntimeError, match="disk full"):
        prepare(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [path.name for path in tmp_path.iterdir()] == ["data"]  # no partial directory left behind


def test_an_interrupted_rewrite_keeps_the_previous_dataset(data_dir, tmp_path, monkeypatch):
    source = write_jsonl(data_dir / "records.jsonl", RECORDS)
    prepare(source, tmp_path / "out")
    before = content_view(load_prepared(tmp_path / "out"))
    write_jsonl(source, RECORDS[:1])

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", fail)
    with pytest.raises(KeyboardInterrupt):
        prepare(source, tmp_path / "out")
    monkeypatch.undo()
    assert content_view(load_prepared(tmp_path / "out")) == before

    prepare(source, tmp_path / "out")  # a completed rewrite replaces it
    assert load_prepared(tmp_path / "out").manifest["candidates"] == 3


def test_output_that_is_not_a_prepared_dataset_is_refused(data_dir, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "thesis.tex").write_text("precious")
    with pytest.raises(TWNError, match="exists and is not a prepared dataset"):
        prepare(write_jsonl(data_dir / "records.jsonl", RECORDS), tmp_path / "out")
    assert (tmp_path / "out" / "thesis.tex").read_text() == "precious"


def test_unrecognised_sources_are_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(TWNError, match="cannot tell what"):
        prepare(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(TWNError, match="does not exist"):
        prepare(tmp_path / "nowhere.jsonl", tmp_path / "out")
    (tmp_path / "table.xlsx").write_text("")
    with pytest.raises(TWNError, match="cannot read '.xlsx' files"):
        prepare(tmp_path / "table.xlsx", tmp_path / "out")


def corrupt_manifest(path: Path) -> None:
    (path / "manifest.json").write_text("{not json")


def other_version(path: Path) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**manifest, "schema_version": 3}))


def other_format(path: Path) -> None:
    (path / "manifest.json").write_text(json.dumps({"format": "something-else"}))


def lost_candidates(path: Path) -> None:
    shutil.rmtree(path / "candidates")


def garbled_arrow(path: Path) -> None:
    for arrow_file in (path / "queries").rglob("*.arrow"):
        arrow_file.write_bytes(b"garbage")


def interrupted(path: Path) -> None:
    (path / "manifest.json").unlink()


@pytest.mark.parametrize(
    "damage, message",
    [
        (corrupt_manifest, "manifest.json is corrupt"),
        (other_version, "schema version 3; this twn reads versions 1, 2"),
        (other_format, "is not a prepared dataset"),
        (lost_candidates, "is corrupt"),
        (garbled_arrow, "is corrupt"),
        (interrupted, "no manifest.json"),
        (shutil.rmtree, "does not exist"),
    ],
)
def test_load_prepared_refuses_damaged_directories(damage, message, data_dir, tmp_path):
    prepare(write_jsonl(data_dir / "records.jsonl", RECORDS), tmp_path / "out")
    damage(tmp_path / "out")
    with pytest.raises(TWNError, match=message) as raised:
        load_prepared(tmp_path / "out")
    assert "\n" not in str(raised.value)
