"""Tiny replicas of the MMEB-V2 layouts, from the photographs that ship inside scikit-image.

`build_replica(root, tasks)` writes, for each named task, its annotation files where the registry says
(parquet in the hub's layout, with the columns the maintainers' evaluation reads) and its media: pictures,
frame folders (ten frames each, made from one photograph shifted and tinted frame by frame) and document
pages. The constants below are what the tests expect back.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pyarrow
import pyarrow.parquet
import skimage.data
from PIL import Image, ImageEnhance

SKIMAGE_DATA = Path(os.path.dirname(skimage.data.__file__))
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "camera.png", "horse.png", "coins.png", "moon.png")
SIDE = 56  # pixels: small pictures keep the tiny model's image tokens few
FRAMES_PER_VIDEO = 10

CLASSIFY = "<|image_1|> Represent the given image for classification"
IMAGENET = [("chelsea.png", ["cat", "cup of coffee", "rocket"]), ("coffee.png", ["cup of coffee", "horse", "cat"]),
            ("rocket.jpg", ["rocket", "cat", "horse"])]
T2I_QUERY = "Find me an everyday image that matches the given caption:"
T2I_TARGET = "<|image_1|> Represent the given image."
GROUNDING = "<|image_1|> Select the portion of the image that follows the language expressions:"
HMDB51 = [("brush_hair_1", "brush_hair", "astronaut.png"), ("ride_bike_3", "ride_bike", "horse.png")]
SSV2_CHOICES = ["Pushing something from left to right", "Dropping something", "Lifting something up"]
MSRVTT = [("video7010", "a cat stares at the camera", "chelsea.png"), ("video7011", "a rocket on its pad", "rocket.jpg"),
          ("video7012", "a cup of coffee on a table", "coffee.png")]
VIDEO_MME = {"question": "What drink is shown?", "videoID": "mme_001",
             "options": ["A. Tea.", "B. Coffee.", "C. Milk.", "D. Juice."], "answer": "B"}
VIDORE_PAGES = {101: "page.png", 102: "text.png", 103: "coins.png", 104: "moon.png", 105: "camera.png"}
# query-id -> (query, {corpus-id: score}); a score of 0 is not relevant.
VIDORE_QUERIES = {1: ("Which page explains region-based segmentation?", {101: 2, 102: 1, 103: 0}),
                  2: ("Where are the old coins?", {103: 1})}
VISRAG_LONG_NAME = "a-page-name-that-is-far-longer-than-fifty-characters-as-some-arxiv-ones-are_2.jpg"
VISRAG_PAGES = {"2010.05458_3.jpg": "page.png", VISRAG_LONG_NAME: "text.png", "0912.3245_0.jpg": "coins.png"}


def photo(name: str, shift: int = 0) -> Image.Image:
    """A small square of a scikit-image photograph; `shift` moves and tints it (a video's later frames)."""
    with Image.open(SKIMAGE_DATA / name) as image:
        image = image.convert("RGB")
    side = min(image.size) - 4 * FRAMES_PER_VIDEO
    box = (shift * 4, shift * 4, shift * 4 + side, shift * 4 + side)
    picture = image.crop(box).resize((SIDE, SIDE))
    return ImageEnhance.Brightness(picture).enhance(1 + shift / 20)


def save_photo(path: Path, name: str, shift: int = 0) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    photo(name, shift).save(path)
    return str(path)


def write_frames(folder: Path, name: str) -> Path:
    for index in range(FRAMES_PER_VIDEO):
        save_photo(folder / f"frame_{index:04d}.jpg", name, index)
    return folder


def write_parquet(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)
    return path


def png_bytes(name: str) -> bytes:
    buffer = io.BytesIO()
    photo(name).save(buffer, format="PNG")
    return buffer.getvalue()


def visrag_page_file(corpus_id: str) -> str:
    base, extension = os.path.splitext(corpus_id)
    return f"{base[:50]}_{hashlib.md5(corpus_id.encode()).hexdigest()[:8]}{extension}"


# ------------------------------------------------------------------------------------------- image tasks
def _imagenet(root: Path) -> None:
    images = root / "image-tasks"
    rows = []
    for picture, labels in IMAGENET:
        save_photo(images / "ImageNet-1K" / picture, picture)
        rows.append({"qry_inst": CLASSIFY, "qry_text": "", "qry_img_path": f"ImageNet-1K/{picture}", "tgt_inst": "",
                     "tgt_text": labels, "tgt_img_path": [""] * len(labels)})
    write_parquet(images / "ImageNet-1K" / "test-00000-of-00001.parquet", rows)


def _mscoco_t2i(root: Path) -> None:
    images = root / "image-tasks"
    pictures = ["chelsea.png", "coffee.png", "rocket.jpg"]
    for picture in pictures:
        save_photo(images / "MSCOCO_t2i" / picture, picture)
    write_parquet(images / "MSCOCO_t2i" / "test-00000-of-00001.parquet", [
        {"qry_inst": T2I_QUERY, "qry_text": "A cat.", "qry_img_path": "", "tgt_inst": T2I_TARGET,
         "tgt_text": [""] * 3, "tgt_img_path": [f"MSCOCO_t2i/{p}" for p in pictures]},
    ])


def _refcoco_matching(root: Path) -> None:
    images = root / "image-tasks"
    save_photo(images / "RefCOCO-Matching" / "chelsea.png", "chelsea.png")
    path = "RefCOCO-Matching/chelsea.png"
    write_parquet(images / "RefCOCO-Matching" / "test-00000-of-00001.parquet", [
        {"qry_inst": GROUNDING, "qry_text": "the left ear", "qry_img_path": path, "tgt_inst": GROUNDING,
         "tgt_text": ["the left ear", "the right eye"], "tgt_img_path": [path, path]},
    ])


# ------------------------------------------------------------------------------------------- video tasks
def _videos(root: Path, kind: str, dataset: str, names_and_photos) -> Path:
    folder = root / "video-tasks" / "frames" / kind / dataset
    for name, picture in names_and_photos:
        write_frames(folder / name, picture)
    return folder


def _hmdb51(root: Path) -> None:
    _videos(root, "video_cls", "HMDB51", [(video, picture) for video, _, picture in HMDB51])
    write_parquet(root / "video-tasks" / "HMDB51" / "data" / "test-00000-of-00001.parquet",
                  [{"video_id": video, "pos_text": label} for video, label, _ in HMDB51])


def _ssv2(root: Path) -> None:
    _videos(root, "video_cls", "SSv2", [("12345", "coffee.png")])
    write_parquet(root / "video-tasks" / "SmthSmthV2" / "test-00000-of-00001.parquet",
                  [{"video_id": 12345, "pos_text": SSV2_CHOICES[1], "neg_text": SSV2_CHOICES}])


def _msrvtt(root: Path) -> None:
    _videos(root, "video_ret", "MSR-VTT", [(video, picture) for video, _, picture in MSRVTT])
    rows = [{"video_id": video, "video": f"{video}.mp4", "caption": caption} for video, caption, _ in MSRVTT]
    write_parquet(root / "video-tasks" / "MSR-VTT" / "test_1k" / "test-00000-of-00001.parquet", rows)
    # Another hub config of the same dataset: not MMEB-V2's, never read.
    write_parquet(root / "video-tasks" / "MSR-VTT" / "train_9k" / "test-00000-of-00001.parquet",
                  [{"video_id": "video1", "video": "video1.mp4", "caption": "not in the benchmark"}])


def _msvd(root: Path) -> None:
    _videos(root, "video_ret", "MSVD", [("-4wsuPCjDBc_5_15", "horse.png")])
    write_parquet(root / "video-tasks" / "MSVD" / "test-00000-of-00001.parquet", [
        {"video_id": "-4wsuPCjDBc_5_15", "video": "-4wsuPCjDBc_5_15.avi", "caption": ["a horse stands", "a horse"]}])


def _didemo(root: Path) -> None:
    _videos(root, "video_ret", "DiDeMo", [("10015567@N08_3655084291", "camera.png")])
    write_parquet(root / "video-tasks" / "DiDeMo" / "test-00000-of-00001.parquet", [
        {"video": "videos/10015567@N08_3655084291.mp4", "caption": "a man looks through a camera"}])


def _youcook2(root: Path) -> None:
    _videos(root, "video_ret", "YouCook2", [("GLd3aX16zBg_0", "coffee.png")])
    write_parquet(root / "video-tasks" / "YouCook2" / "val-00000-of-00001.parquet", [
        {"id": "GLd3aX16zBg_0", "video_path": "validation/GLd3aX16zBg.mp4", "sentence": "pour the coffee"}])


def _vatex(root: Path) -> None:
    _videos(root, "video_ret", "VATEX", [("Ptf_2VRj-V0_000122_000132", "astronaut.png")])
    write_parquet(root / "video-tasks" / "VATEX" / "test-00000-of-00001.parquet", [
        {"videoID": "Ptf_2VRj-V0_000122_000132", "enCap": ["an astronaut smiles", "a smiling astronaut"]}])


def _qvhighlight(root: Path) -> None:
    video = root / "video-tasks" / "frames" / "video_mret" / "QVHighlight" / "RoripwjYFp8_360.0_510.0"
    for clip, picture in (("query", "astronaut.png"), ("negative_0", "moon.png"), ("positive_0", "rocket.jpg"),
                          ("negative_1", "coins.png")):
        write_frames(video / clip, picture)
    write_parquet(root / "video-tasks" / "QVHighlight" / "test-00000-of-00001.parquet", [
        {"query": "the rocket on its launch pad", "video_path": "videos/RoripwjYFp8_360.0_510.0.mp4"}])


def _momentseeker(root: Path) -> None:
    media = root / "video-tasks" / "frames" / "video_mret" / "MomentSeeker"
    for clip, picture in (("clips_a_pos", "rocket.jpg"), ("clips_a_neg", "moon.png"), ("clips_a_full", "astronaut.png")):
        write_frames(media / "video_frames" / clip, picture)
    save_photo(media / "query_look.jpg", "chelsea.png")
    clips = {"positive_frames": [{"output_path": "clips/a/pos.mp4"}], "negative_frames": [{"output_path": "clips/a/neg.mp4"}]}
    write_parquet(root / "video-tasks" / "MomentSeeker" / "test-00000-of-00001.parquet", [
        {"query": "the rocket", "input_frames": "", **clips},
        {"query": "the same rocket", "input_frames": "look.jpg", **clips},
        {"query": "what follows", "input_frames": "clips/a/full.mp4", **clips},
    ])


def _video_mme(root: Path) -> None:
    _videos(root, "video_qa", "Video-MME", [(VIDEO_MME["videoID"], "coffee.png")])
    write_parquet(root / "video-tasks" / "Video-MME" / "test-00000-of-00001.parquet",
                  [{**VIDEO_MME, "question_id": "001-1", "domain": "Life", "sub_category": "Food"}])


def _nextqa(root: Path) -> None:
    _videos(root, "video_qa", "NExTQA", [("4010069381", "horse.png")])
    write_parquet(root / "video-tasks" / "NExTQA" / "MC" / "test-00000-of-00001.parquet", [
        {"video": 4010069381, "question": "what is the animal", "answer": 1, "qid": 7, "type": "DC",
         **{f"a{i}": answer for i, answer in enumerate(["a cat", "a horse", "a dog", "a cow", "a bird"])}}])


def _egoschema(root: Path) -> None:
    _videos(root, "video_qa", "EgoSchema", [("ego-1", "coffee.png")])
    write_parquet(root / "video-tasks" / "EgoSchema" / "Subset" / "test-00000-of-00001.parquet", [
        {"video_idx": "ego-1", "question": "What is c making?", "answer": "2", "question_idx": "q1",
         "option": ["A. tea", "B. soup", "C. coffee", "D. bread", "E. salad"]}])


def _mvbench(root: Path) -> None:
    _videos(root, "video_qa", "MVBench", [("action_antonym/166583.webm", "camera.png")])
    write_parquet(root / "video-tasks" / "MVBench" / "action_antonym" / "train-00000-of-00001.parquet", [
        {"video": "166583.webm", "question": "What is the action performed?",
         "candidates": ["Taking a photo", "Not sure", "Dropping a camera"], "answer": "Taking a photo"}])


def _activitynetqa(root: Path) -> None:
    _videos(root, "video_qa", "ActivityNetQA", [("v_abc123", "astronaut.png")])
    write_parquet(root / "video-tasks" / "ActivityNetQA" / "test-00000-of-00001.parquet", [
        {"video_name": "abc123", "question": "is the person smiling", "answer": "yes", "question_id": "q9"}])


# ------------------------------------------------------------------------------------------- visual documents
def _beir(folder: Path, split: str, queries: dict, corpus: list[dict]) -> None:
    write_parquet(folder / "queries" / f"{split}-00000-of-00001.parquet",
                  [{"query-id": qid, "query": query, "language": "english"} for qid, (query, _) in queries.items()])
    write_parquet(folder / "corpus" / f"{split}-00000-of-00001.parquet", corpus)
    write_parquet(folder / "qrels" / f"{split}-00000-of-00001.parquet",
                  [{"query-id": qid, "corpus-id": page, "score": score}
                   for qid, (_, pages) in queries.items() for page, score in pages.items()])


def _vidore_arxivqa(root: Path) -> None:
    pages = root / "visdoc-tasks" / "ViDoRe_arxivqa"
    for page, picture in VIDORE_PAGES.items():
        save_photo(pages / f"{page}.png", picture)
    corpus = [{"corpus-id": page, "image": {"bytes": None, "path": f"{page}.png"}} for page in VIDORE_PAGES]
    _beir(root / "visdoc-tasks" / "arxivqa_test_subsampled_beir", "test", VIDORE_QUERIES, corpus)


def _visrag_arxivqa(root: Path) -> None:
    # The pages only in the corpus parquet, as the hub dataset holds them.
    corpus = [{"corpus-id": page, "image": {"bytes": png_bytes(picture), "path": None}}
              for page, picture in VISRAG_PAGES.items()]
    queries = {"q-1": ("Which page shows coins?", {"0912.3245_0.jpg": 1}),
               "q-2": ("Which page is handwritten?", {VISRAG_LONG_NAME: 1})}
    _beir(root / "visdoc-tasks" / "VisRAG-Ret-Test-ArxivQA", "train", queries, corpus)


BUILDERS = {
    "ImageNet-1K": _imagenet, "MSCOCO_t2i": _mscoco_t2i, "RefCOCO-Matching": _refcoco_matching,
    "HMDB51": _hmdb51, "SmthSmthV2": _ssv2, "MSR-VTT": _msrvtt, "MSVD": _msvd, "DiDeMo": _didemo,
    "YouCook2": _youcook2, "VATEX": _vatex, "QVHighlight": _qvhighlight, "MomentSeeker": _momentseeker,
    "Video-MME": _video_mme, "NExTQA": _nextqa, "EgoSchema": _egoschema, "MVBench": _mvbench,
    "ActivityNetQA": _activitynetqa, "ViDoRe_arxivqa": _vidore_arxivqa, "VisRAG_ArxivQA": _visrag_arxivqa,
}


def build_replica(root: Path, tasks=tuple(BUILDERS)) -> Path:
    for task in tasks:
        BUILDERS[task](root)
    return root
