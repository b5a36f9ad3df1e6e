"""A small real-image eval set in the MMEB-V2 eval layout, from the photographs that ship inside scikit-image.

Four tasks, one parquet file each, named after the MMEB-V2 task whose format it copies, so that `twn
prepare` files them under the right meta-tasks: image->caption retrieval (MSCOCO_i2t), caption->image
retrieval (MSCOCO_t2i), classification into the PASCAL VOC classes (VOC2007) and knowledge-based visual
questions (OK-VQA). Every query's pool is all of its task's candidates, the gold one first, as in
MMEB-V2. Each caption, label and answer was written after looking at the image it describes.

scikit-learn's sample images are not used: they could not be looked at when the captions were written.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow
import pyarrow.parquet

from twn_cli.errors import TWNError

IMAGES_DIR = "images"

CAPTIONS = {
    "astronaut.png": "An astronaut in an orange spacesuit smiles beside an American flag and a model of the "
    "space shuttle.",
    "chelsea.png": "A close-up of the face of a tabby cat with green eyes.",
    "coffee.png": "A cup of coffee with a spoon on a red saucer on a wooden table.",
    "rocket.jpg": "A rocket stands on its launch pad between tall towers under a dark blue sky.",
    "camera.png": "A black-and-white photo of a man looking through a camera on a tripod on a lawn.",
    "horse.png": "The black silhouette of a horse on a white background.",
    "motorcycle_left.png": "A red motorcycle parked in a garage in front of shelves of boxes.",
    "coins.png": "Four rows of old coins on a dark background, in greyscale.",
    "moon.png": "The cratered surface of the moon, in greyscale.",
    "page.png": "A scanned page of printed text about region-based segmentation, with a line of code.",
    "text.png": "Handwritten mathematical formulas on a sheet of paper, seen at a slant, in greyscale.",
    "clock_motion.png": "A round object smeared by motion blur against a plain grey background.",
    "brick.png": "A greyscale texture of bricks laid in staggered rows.",
    "grass.png": "A greyscale close-up of blades of grass.",
    "gravel.png": "A greyscale close-up of gravel stones.",
    "hubble_deep_field.jpg": "Many small distant galaxies scattered across black space.",
    "retina.jpg": "A photograph of the back of a human eye: red retina, blood vessels and the optic disc.",
    "logo.png": "The scikit-image logo: a snake on a green and orange circle.",
    "cell.png": "A microscope image of a single round cell on a grey background.",
    "ihc.png": "A microscope image of tissue with brown-stained glands and blue-stained nuclei.",
}

# The twenty PASCAL VOC classes as MMEB-V2's VOC2007 task spells them.
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
VOC_LABELS = {
    "chelsea.png": "cat",
    "horse.png": "horse",
    "camera.png": "person",
    "astronaut.png": "person",
    "motorcycle_left.png": "motorbike",
}

# (image, question, answer): questions whose answer needs the image and a little world knowledge.
VQA = (
    ("chelsea.png", "What animal is this?", "cat"),
    ("coffee.png", "What drink is in the cup?", "coffee"),
    ("rocket.jpg", "What kind of vehicle is on the launch pad?", "rocket"),
    ("astronaut.png", "What is the job of the person in this picture?", "astronaut"),
    ("camera.png", "What is the man looking through?", "camera"),
    ("coins.png", "What objects are laid out in rows?", "coins"),
    ("moon.png", "Which celestial body has this surface?", "moon"),
    ("hubble_deep_field.jpg", "What are the small bright spots in this picture?", "galaxies"),
)

# MMEB-V2's instructions; <|image_1|> marks where the image goes.
I2T_QUERY = "<|image_1|>\nFind an image caption describing the given everyday image."
T2I_QUERY = "Find me an everyday image that matches the given caption: {caption}"
IMAGE_TARGET = "<|image_1|>\nRepresent the given image."
CLASSIFICATION_QUERY = "<|image_1|>\nRepresent the given image for classification"
VQA_QUERY = "<|image_1|>\nRepresent the given image with the following question: {question}"

SCHEMA = pyarrow.schema(
    {
        "qry_text": pyarrow.string(),
        "qry_img_path": pyarrow.string(),
        "tgt_text": pyarrow.list_(pyarrow.string()),
        "tgt_img_path": pyarrow.list_(pyarrow.string()),
    }
)


def write_sample_mmeb_eval(output_dir: str | Path) -> list[Path]:
    """Write the sample set to `output_dir` (`<task>.parquet` files and `images/`) and return the parquet paths.

    Image paths are relative to `output_dir`, which is where `twn prepare` resolves them by default.
    """
    source_dir = _skimage_data_dir()
    output_dir = Path(output_dir)
    (output_dir / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    for name in CAPTIONS:
        shutil.copyfile(source_dir / name, output_dir / IMAGES_DIR / name)

    tasks = {
        "MSCOCO_i2t": _image_to_text_rows(),
        "MSCOCO_t2i": _text_to_image_rows(),
        "VOC2007": _classification_rows(),
        "OK-VQA": _vqa_rows(),
    }
    written = []
    for task, rows in tasks.items():
        path = output_dir / f"{task}.parquet"
        pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows, schema=SCHEMA), path)
        written.append(path)
    return written


def _image_path(name: str) -> str:
    return f"{IMAGES_DIR}/{name}"


def _gold_first(gold: str, candidates) -> list[str]:
    return [gold, *(candidate for candidate in candidates if candidate != gold)]


def _image_to_text_rows() -> list[dict]:
    rows = []
    for name, caption in CAPTIONS.items():
        texts = _gold_first(caption, CAPTIONS.values())
        rows.append(_row(I2T_QUERY, _image_path(name), texts, [""] * len(texts)))
    return rows


def _text_to_image_rows() -> list[dict]:
    rows = []
    for name, caption in CAPTIONS.items():
        images = [_image_path(image) for image in _gold_first(name, CAPTIONS)]
        rows.append(_row(T2I_QUERY.format(caption=caption), "", [IMAGE_TARGET] * len(images), images))
    return rows


def _classification_rows() -> list[dict]:
    rows = []
    for name, label in VOC_LABELS.items():
        labels = _gold_first(label, VOC_CLASSES)
        rows.append(_row(CLASSIFICATION_QUERY, _image_path(name), labels, [""] * len(labels)))
    return rows


def _vqa_rows() -> list[dict]:
    answers = list(dict.fromkeys(answer for _, _, answer in VQA))
    rows = []
    for name, question, answer in VQA:
        pool = _gold_first(answer, answers)
        rows.append(_row(VQA_QUERY.format(question=question), _image_path(name), pool, [""] * len(pool)))
    return rows


def _row(query_text: str, query_image: str, target_texts: list[str], target_images: list[str]) -> dict:
    return {
        "qry_text": query_text,
        "qry_img_path": query_image,
        "tgt_text": target_texts,
        "tgt_img_path": target_images,
    }


def _skimage_data_dir() -> Path:
    try:
        import skimage.data
    except ImportError:
        raise TWNError("the sample eval set is built from scikit-image's pictures: pip install scikit-image") from None
    source_dir = Path(skimage.data.__file__).parent
    missing = [name for name in CAPTIONS if not (source_dir / name).is_file()]
    if missing:
        raise TWNError(f"scikit-image in {source_dir} lacks the pictures {', '.join(missing)}")
    return source_dir
