"""Shared fixtures: one tiny offline backbone per test session, a fresh TWN model per test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from twn_cli.toyworld.backbone import ToyBackboneSpec, build_toy_backbone  # noqa: E402

# Smaller than the toy recipe: the tests check mechanics, not what the model can learn.
TEST_SPEC = ToyBackboneSpec(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vision_depth=1,
    vision_embed_dim=64,
    vision_num_heads=2,
)
# Real photographs and scans that ship inside scikit-image, of different sizes and aspect ratios.
REAL_IMAGE_NAMES = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "camera.png", "horse.png"]


@pytest.fixture(scope="session")
def toy_backbone_dir(tmp_path_factory) -> Path:
    return build_toy_backbone(tmp_path_factory.mktemp("backbone") / "toy", seed=0, spec=TEST_SPEC)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: the tiny model's matrices are too small for threads to pay (on a busy
    2-core machine they cost ~10x), and each torchrun process runs with one (OMP_NUM_THREADS=1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def other_backbone_dir(tmp_path_factory) -> Path:
    """A second toy backbone (another seed): same architecture, different model."""
    return build_toy_backbone(tmp_path_factory.mktemp("backbone") / "other", seed=1, spec=TEST_SPEC)


@pytest.fixture(scope="session")
def real_image_paths() -> list[Path]:
    import skimage.data

    folder = Path(skimage.data.__file__).parent
    return [folder / name for name in REAL_IMAGE_NAMES]


@pytest.fixture
def make_model(toy_backbone_dir):
    """Build a fresh TWN model on the session's toy backbone (settings overridable)."""
    from twn_cli.engine.config import TWNConfig
    from twn_cli.engine.factory import LoadOptions, load_model

    def build(**settings):
        config = TWNConfig(**{"lora_rank": 4, "max_think_tokens": 12, **settings})
        return load_model(backbone=str(toy_backbone_dir), config=config, options=LoadOptions(device="cpu"))

    return build


def cache_for(model, dataset):
    """A negatives cache of every candidate of a prepared dataset, embedded by `model` without thinking (as `twn embed` writes one)."""
    from twn_cli.data.negatives_cache import NegativesCache
    from twn_cli.data.prepared import prepared_input

    ids = list(dataset.candidates["id"])
    with torch.no_grad():
        embeddings = torch.cat(
            [model.embed([prepared_input(dataset.candidates[i]) for i in range(start, min(start + 64, len(ids)))]).embeddings for start in range(0, len(ids), 64)]
        )
    return NegativesCache(ids, embeddings.cpu())


@pytest.fixture(scope="session")
def toy_dataset_dir(tmp_path_factory) -> Path:
    """A small toy world as a prepared dataset (pictures rendered into it)."""
    from twn_cli.toyworld.dataset import write_synthetic_dataset

    output = tmp_path_factory.mktemp("data") / "toy"
    write_synthetic_dataset(output, n=80, seed=0)
    return output
