"""TWN under mteb: a tiny any-to-any retrieval task of real pictures, defined here, run through
`mteb.evaluate` end to end, scores and rankings equal to `twn eval` on the same data prepared by `twn prepare`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

mteb = pytest.importorskip("mteb")

from mteb.abstasks.retrieval import AbsTaskRetrieval  # noqa: E402
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData  # noqa: E402
from mteb.abstasks.task_metadata import TaskMetadata  # noqa: E402
from mteb.types import PromptType  # noqa: E402

from twn_cli.cli import app  # noqa: E402
from twn_cli.data.prepared import load_prepared  # noqa: E402
from twn_cli.engine.checkpoint import save_checkpoint  # noqa: E402
from twn_cli.mteb_encoder import TWNEncoder, batch_inputs, load_encoder  # noqa: E402

TASK = "TWNTinyAnyToAny"
QUERY_INSTRUCTION = "Find the picture or caption that matches."
# (id, text, picture) of each document and query; a picture is a name from conftest.REAL_IMAGE_NAMES.
DOCUMENTS = [
    ("d-astronaut", "an astronaut in a white suit", "astronaut.png"),
    ("d-cat", "", "chelsea.png"),
    ("d-coffee", "", "coffee.png"),
    ("d-rocket", "a rocket on its launch pad", "rocket.jpg"),
    ("d-camera", "a man with a camera on a tripod", None),
    ("d-horse", "", "horse.png"),
]
QUERIES = [
    ("q-cat", "a cat", None, "d-cat"),
    ("q-astronaut", "what is this person's job?", "astronaut.png", "d-astronaut"),
    ("q-camera", "", "camera.png", "d-camera"),
    ("q-coffee", "a cup of coffee", None, "d-coffee"),
    ("q-rocket", "", "rocket.jpg", "d-rocket"),
    ("q-horse", "the animal in this silhouette", "horse.png", "d-horse"),
]
# mteb's metric names for twn eval's (mteb rounds most to 5 decimals; MRR@10 is MRR for a pool of 6).
SAME_METRICS = {"ndcg_at_5": "ndcg@5", "ndcg_at_10": "ndcg@10", "recall_at_1": "recall@1", "recall_at_5": "recall@5",
                "recall_at_10": "recall@10", "hit_rate_at_1": "hit@1", "hit_rate_at_5": "hit@5", "mrr_at_10": "mrr"}


def tiny_task(pictures: dict[str, Path]) -> AbsTaskRetrieval:
    import datasets

    def rows(items):
        columns = {"id": [item[0] for item in items], "text": [item[1] for item in items],
                   "image": [str(pictures[item[2]]) if item[2] else None for item in items]}
        return datasets.Dataset.from_dict(columns).cast_column("image", datasets.Image())

    class TinyAnyToAny(AbsTaskRetrieval):
        metadata = TaskMetadata(
            name=TASK, description="Real pictures and captions, queries and documents of any modality.",
            reference="https://scikit-image.org", dataset={"path": "local", "revision": "local"},
            type="Any2AnyRetrieval", category="it2it", modalities=["image", "text"], eval_splits=["test"],
            eval_langs=["eng-Latn"], main_score="ndcg_at_10", date=("2024-01-01", "2024-01-01"), domains=[],
            task_subtypes=[], license="cc-by-4.0", annotations_creators="derived", dialect=[], sample_creation="found",
            bibtex_citation="",
        )

        def load_data(self, num_proc=None, **kwargs) -> None:
            split = RetrievalSplitData(
                queries=rows(QUERIES), corpus=rows(DOCUMENTS),
                relevant_docs={query: {document: 1} for query, _, _, document in QUERIES}, top_ranked=None,
            )
            self.dataset = {"default": {"test": split}}
            self.data_loaded = True

    return TinyAnyToAny()


def prepare_for_twn_eval(pictures: dict[str, Path], folder: Path) -> Path:
    """The same task as `twn prepare` input: one record per query, its document the positive; the task's
    global pool is then every document."""
    documents = {document: (text, image) for document, text, image in DOCUMENTS}
    records = folder / "tiny.jsonl"
    with records.open("w") as handle:
        for query, text, image, gold in QUERIES:
            record = {"id": query, "task": TASK, "split": "test", "instruction": QUERY_INSTRUCTION}
            record |= {"query_text": text} if text else {}
            record |= {"query_image": str(pictures[image])} if image else {}
            gold_text, gold_image = documents[gold]
            record |= {"pos_text": gold_text} if gold_text else {}
            record |= {"pos_image": str(pictures[gold_image])} if gold_image else {}
            handle.write(json.dumps(record) + "\n")
    result = CliRunner().invoke(app, ["prepare", str(records), "-o", str(folder / "prepared")])
    assert result.exit_code == 0, result.stderr
    return folder / "prepared"


@pytest.fixture(scope="module")
def setup(toy_backbone_dir, real_image_paths, tmp_path_factory):
    from twn_cli.data.images import load_image
    from twn_cli.engine.backbone import load_backbone
    from twn_cli.engine.config import TWNConfig
    from twn_cli.engine.model import TWNModel
    from twn_cli.types import ModelInput

    root = tmp_path_factory.mktemp("mteb")
    pictures = {path.name: path for path in real_image_paths}
    model = TWNModel(load_backbone(str(toy_backbone_dir), device="cpu"), TWNConfig(lora_rank=4, max_think_tokens=8))
    checkpoint = save_checkpoint(model, root / "checkpoint", stages=[])
    # A threshold between the gate's 3rd and 4th p_think: half the queries think.
    queries = [ModelInput(text, [load_image(pictures[image])] if image else [], QUERY_INSTRUCTION) for _, text, image, _ in QUERIES]
    p_think = sorted(model.think_probability(queries).tolist())
    threshold = (p_think[2] + p_think[3]) / 2
    return {"root": root, "pictures": pictures, "checkpoint": checkpoint, "data": prepare_for_twn_eval(pictures, root), "threshold": threshold}


@pytest.mark.parametrize("think", ["always", "adaptive"])
def test_mteb_evaluate_scores_and_ranks_as_twn_eval_does(setup, think, tmp_path):
    checkpoint = setup["checkpoint"]
    encoder = load_encoder(checkpoint, device="cpu", think=think, threshold=setup["threshold"], instructions={f"{TASK}-query": QUERY_INSTRUCTION})
    results = mteb.evaluate(encoder, tiny_task(setup["pictures"]), cache=None, encode_kwargs={"batch_size": 4},
                            prediction_folder=tmp_path, show_progress_bar=False)
    scores = results.task_results[0].scores["test"][0]

    report_dir = tmp_path / "report"
    evaluated = CliRunner().invoke(app, ["eval", str(setup["data"]), "-o", str(report_dir), "--checkpoint", str(checkpoint),
                                         "--mode", think, "--threshold", str(setup["threshold"]), "--device", "cpu", "--batch-size", "4"])
    assert evaluated.exit_code == 0, evaluated.stderr
    report = json.loads((report_dir / "report.json").read_text())
    ours = report["result"]["tasks"][TASK]["metrics"]
    assert {name: round(scores[name], 5) for name in SAME_METRICS} == {name: round(ours[metric], 5) for name, metric in SAME_METRICS.items()}
    assert 0 < scores["ndcg_at_10"] < 1  # neither a perfect nor an empty ranking: the comparison means something
    if think == "adaptive":
        thought = [json.loads(line)["think"] for line in (report_dir / "predictions.jsonl").read_text().splitlines()]
        assert any(thought) and not all(thought)

    # Beyond the averages: every query ranks every document in the same order.
    candidates = load_prepared(setup["data"]).candidates
    pictures = {str(path): name for name, path in setup["pictures"].items()}
    content_to_document = {(text, image): document for document, text, image in DOCUMENTS}
    document_of = {row["id"]: content_to_document[(row["text"], pictures[row["images"][0]] if row["images"] else None)] for row in candidates}
    predicted = json.loads((tmp_path / f"{TASK}_predictions.json").read_text())["default"]["test"]
    for line in (report_dir / "predictions.jsonl").read_text().splitlines():
        record = json.loads(line)
        ranked_by_mteb = sorted(predicted[record["query_id"]].items(), key=lambda item: -item[1])
        assert [document for document, _ in ranked_by_mteb] == [document_of[candidate] for candidate in record["top_ids"]]


def test_model_meta_is_built_from_the_checkpoint(setup, tmp_path):
    import shutil

    encoder = load_encoder(setup["checkpoint"], device="cpu", think="adaptive", threshold=0.4)
    meta = encoder.mteb_model_meta
    counts = encoder.model.parameter_overhead()
    assert meta.name == "twn/checkpoint" and len(meta.revision) == 12
    assert (meta.embed_dim, meta.similarity_fn_name.value, meta.modalities) == (64, "cosine", ["text", "image", "video"])
    assert meta.n_parameters == counts["backbone"] + counts["added"] and meta.use_instructions
    assert meta.experiment_kwargs == {"think": "adaptive", "document_think": "never", "threshold": 0.4}
    # The revision follows the weights, not the folder: a copy keeps it, retrained weights change it.
    copy = shutil.copytree(setup["checkpoint"], tmp_path / "copy")
    assert load_encoder(copy, device="cpu").mteb_model_meta.revision == meta.revision
    with torch.no_grad():
        encoder.model.queries.add_(1e-3)
    retrained = save_checkpoint(encoder.model, tmp_path / "retrained", stages=[])
    assert load_encoder(retrained, device="cpu").mteb_model_meta.revision != meta.revision


def test_instructions_follow_mteb_precedence_and_video_frames_become_pictures(setup):
    encoder = TWNEncoder.__new__(TWNEncoder)
    encoder.instructions = {"query": "any query", "Any2AnyRetrieval": "any retrieval", f"{TASK}-document": "tiny documents"}
    metadata = tiny_task(setup["pictures"]).metadata
    assert encoder.instruction(metadata, PromptType.document) == "tiny documents"
    assert encoder.instruction(metadata, PromptType.query) == "any retrieval"  # the task type before the prompt type
    encoder.instructions = {"query": "any query"}
    assert encoder.instruction(metadata, PromptType.query) == "any query"
    assert encoder.instruction(metadata, PromptType.document) is None  # the model's default

    from PIL import Image

    picture = Image.open(setup["pictures"]["chelsea.png"]).convert("RGB")
    frames = torch.from_numpy(np.stack([np.asarray(picture)] * 3)).permute(0, 3, 1, 2)  # as mteb's FramesCollator gives them
    batch = {"text": ["a cat, twice", "a query"], "query": ["a cat", "a query"], "instruction": [None, "its own"], "video": [frames, None]}
    inputs = batch_inputs(batch, "the task's", TASK)
    assert [item.text for item in inputs] == ["a cat", "a query"]  # the query's own text, not mteb's text + instruction
    assert [item.instruction for item in inputs] == ["the task's", "its own"]
    assert len(inputs[0].images) == 3 and inputs[0].images[0].tobytes() == picture.tobytes() and not inputs[1].images
