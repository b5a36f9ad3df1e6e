"""Teacher CoT: written for the queries that lack one, batched, resumable from its cache, told in the manifest."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import skimage.data
import torch

from twn_cli.data.prepared import load_prepared
from twn_cli.engine.backbone import load_backbone
from twn_cli.errors import TWNError
from twn_cli.stages.prepare import run_prepare, teacher_cot_cache_path
from twn_cli.stages.teacher_cot import generate_teacher_cots

SKIMAGE_DATA = Path(os.path.dirname(skimage.data.__file__))
MAX_NEW_TOKENS = 6


def picture(name: str) -> str:
    return str(SKIMAGE_DATA / name)


# Prepared query rows (only the fields the teacher reads); q3 has its CoT already.
ROWS = [
    {"id": "q1", "instruction": "Find the caption.", "text": "", "images": [picture("chelsea.png")], "cot": ""},
    {"id": "q2", "instruction": "", "text": "an astronaut in a space suit", "images": [], "cot": ""},
    {"id": "q3", "instruction": "Find the caption.", "text": "", "images": [picture("coffee.png")],
     "cot": "a cup: coffee"},
    {"id": "q4", "instruction": "Which one is older?", "text": "",
     "images": [picture("rocket.jpg"), picture("camera.png")], "cot": ""},
    {"id": "q5", "instruction": "Find an image.", "text": "a horse", "images": [], "cot": ""},
    {"id": "q6", "instruction": "", "text": "", "images": [picture("horse.png")], "cot": ""},
]
LACKING = [row["id"] for row in ROWS if not row["cot"]]


@pytest.fixture(scope="module")
def teacher_dir(toy_backbone_dir, tmp_path_factory) -> Path:
    """The toy backbone with larger random weights, saved: a freshly initialised one greedily writes only
    newlines (empty once stripped), whatever the query, which would make every check below pass vacuously."""
    teacher = load_backbone(str(toy_backbone_dir), device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in teacher.model.parameters():
            if parameter.dim() >= 2:
                parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
    directory = tmp_path_factory.mktemp("teacher") / "toy-teacher"
    teacher.model.save_pretrained(directory)
    teacher.processor.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def teacher(teacher_dir):
    return load_backbone(str(teacher_dir), device="cpu")


@pytest.fixture(scope="module")
def reference_cots(teacher, tmp_path_factory) -> dict[str, str]:
    """An uninterrupted run, one query at a time."""
    cache = tmp_path_factory.mktemp("reference") / "cache.jsonl"
    return generate_teacher_cots(ROWS, teacher, cache, batch_size=1, max_new_tokens=MAX_NEW_TOKENS)


@pytest.fixture
def generated_rows(teacher, monkeypatch) -> list[int]:
    """The number of queries in each `generate` call the teacher makes from now on."""
    calls: list[int] = []
    generate = teacher.model.generate

    def counting_generate(**inputs):
        calls.append(inputs["input_ids"].shape[0])
        return generate(**inputs)

    monkeypatch.setattr(teacher.model, "generate", counting_generate)
    return calls


def cache_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_cots_are_written_for_the_queries_without_one(reference_cots):
    assert list(reference_cots) == LACKING
    assert all(reference_cots.values())
    assert len(set(reference_cots.values())) > 1  # the CoT depends on the query


def test_batches_give_the_cots_of_one_query_at_a_time(teacher, reference_cots, tmp_path, generated_rows):
    cots = generate_teacher_cots(ROWS, teacher, tmp_path / "cache.jsonl", batch_size=3, max_new_tokens=MAX_NEW_TOKENS)
    assert generated_rows == [3, 2]
    assert cots == reference_cots


def test_an_interrupted_run_resumes_with_only_the_missing_queries(teacher, reference_cots, tmp_path, generated_rows):
    cache = tmp_path / "cache.jsonl"
    reports = []

    def interrupt_after_first_batch(done: int, total: int):
        reports.append((done, total))
        if done:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate_teacher_cots(ROWS, teacher, cache, batch_size=2, max_new_tokens=MAX_NEW_TOKENS,
                              progress=interrupt_after_first_batch)
    assert reports == [(0, 5), (2, 5)]
    assert [entry["id"] for entry in cache_lines(cache)] == ["q1", "q2"]

    generated_rows.clear()
    reports.clear()
    cots = generate_teacher_cots(ROWS, teacher, cache, batch_size=2, max_new_tokens=MAX_NEW_TOKENS,
                                 progress=lambda done, total: reports.append((done, total)))
    assert generated_rows == [2, 1]
    assert reports == [(2, 5), (4, 5), (5, 5)]
    assert cots == reference_cots
    assert [entry["id"] for entry in cache_lines(cache)] == LACKING


def test_a_half_written_last_cache_line_is_ignored(teacher, reference_cots, tmp_path, generated_rows):
    cache = tmp_path / "cache.jsonl"
    generate_teacher_cots(ROWS, teacher, cache, batch_size=5, max_new_tokens=MAX_NEW_TOKENS)
    text = cache.read_text()
    cache.write_text(text[: text.rindex('"cot"')])  # the write of the last line was cut short

    generated_rows.clear()
    cots = generate_teacher_cots(ROWS, teacher, cache, batch_size=5, max_new_tokens=MAX_NEW_TOKENS)
    assert generated_rows == [1]
    assert cots == reference_cots
    assert [entry["id"] for entry in cache_lines(cache)] == LACKING


def test_a_cache_of_other_settings_is_not_reused(teacher, tmp_path, generated_rows):
    cache = tmp_path / "cache.jsonl"
    generate_teacher_cots(ROWS[:2], teacher, cache, batch_size=2, max_new_tokens=MAX_NEW_TOKENS)
    generated_rows.clear()
    generate_teacher_cots(ROWS[:2], teacher, cache, batch_size=2, max_new_tokens=MAX_NEW_TOKENS + 1)
    assert generated_rows == [2]


def test_a_corrupt_cache_line_or_template_is_a_user_error(teacher, tmp_path):
    cache = tmp_path / "cache.jsonl"
    cache.write_text('not json\n{"id": "q1", "cot": "x", "key": "k"}\n')
    with pytest.raises(TWNError, match="line 1 is corrupt"):
        generate_teacher_cots(ROWS, teacher, cache)
    with pytest.raises(TWNError, match=r"\{query\}"):
        generate_teacher_cots(ROWS, teacher, tmp_path / "other.jsonl", prompt_template="Think about {topic}.")


# ------------------------------------------------------------------------------------------------- twn prepare


def write_records(folder: Path) -> Path:
    records = [
        {"id": "r1", "instruction": "Find the caption.", "query_image": picture("chelsea.png"), "pos_text": "a cat"},
        {"id": "r2", "query_text": "a cup of coffee", "pos_image": picture("coffee.png"), "cot": "a drink: coffee"},
        {"id": "r3", "query_text": "a rocket on its launch pad", "pos_image": picture("rocket.jpg")},
    ]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def prepare(source: Path, output_dir: Path, **options):
    return run_prepare(str(source), output_dir, skip_bad=False, cot_column=None, instruction=None, split=None,
                       **options)


def test_prepare_fills_missing_cots_with_the_teacher_and_resumes(teacher_dir, tmp_path):
    # The output sits inside the source folder, so the cache does too: it must not be read as records.
    write_records(tmp_path)
    output = tmp_path / "prepared"
    settings = {"cot_teacher": str(teacher_dir), "teacher_batch_size": 1, "teacher_max_new_tokens": MAX_NEW_TOKENS,
                "teacher_device": "cpu"}

    def interrupt_after_first_query(done: int, total: int):
        if done:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare(tmp_path, output, cot_progress=interrupt_after_first_query, **settings)
    assert not output.exists()
    assert [entry["id"] for entry in cache_lines(teacher_cot_cache_path(output))] == ["r1"]

    prepare(tmp_path, output, **settings)
    prepared = load_prepared(output)
    cots = dict(zip(prepared.queries["train"]["id"], prepared.queries["train"]["cot"]))
    assert cots["r2"] == "a drink: coffee"
    assert cots["r1"] and cots["r3"]
    assert prepared.manifest["cot"] == {
        "source": "teacher", "teacher": str(teacher_dir), "generated": 2, "from_column": 1
    }
    assert not teacher_cot_cache_path(output).exists()


def test_prepare_without_teacher_tells_where_cots_came_from(tmp_path):
    source = write_records(tmp_path / "data")
    prepare(source, tmp_path / "with-column")
    assert load_prepared(tmp_path / "with-column").manifest["cot"] == {
        "source": "column", "teacher": None, "generated": 0, "from_column": 1
    }
    source.write_text("".join(line for line in source.read_text().splitlines(True) if '"cot"' not in line))
    prepare(source, tmp_path / "without")
    assert load_prepared(tmp_path / "without").manifest["cot"]["source"] == "none"


def test_prepare_with_teacher_does_not_load_it_when_every_query_has_a_cot(tmp_path):
    source = write_records(tmp_path / "data")
    source.write_text("".join(line for line in source.read_text().splitlines(True) if '"cot"' in line))
    prepare(source, tmp_path / "out", cot_teacher=str(tmp_path / "no-such-teacher"))
    assert load_prepared(tmp_path / "out").manifest["cot"]["source"] == "column"
