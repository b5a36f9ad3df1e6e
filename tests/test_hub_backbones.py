"""Backbones as users download them: Qwen2-VL, Qwen2.5-VL, Qwen3-VL and Qwen3-VL-MoE folders in the hub's
layout (a "Fast" image processor and the family's video processor named in their configs), without torchvision.

Each folder is built once per session from the architecture's real config class, tiny and with random weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from parameter_checks import distinct_adapters, gradient_parts
from PIL import Image
from typer.testing import CliRunner

from twn_cli.cli import app
from twn_cli.data.embedding_files import read_embeddings
from twn_cli.engine.backbone import load_backbone
from twn_cli.engine.config import INTERFACES, TWNConfig
from twn_cli.engine.factory import LoadOptions, load_model
from twn_cli.engine.processors import Qwen3VLVideoProcessorPil, temporal_patches
from twn_cli.engine.training_passes import training_views
from twn_cli.toyworld.hub_backbones import ARCHITECTURES, write_hub_backbone
from twn_cli.types import ModelInput, Video

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="session")
def hub_backbone_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hub")
    return {architecture: write_hub_backbone(root / architecture, architecture) for architecture in ARCHITECTURES}


@pytest.fixture(scope="module")
def cat(real_image_paths) -> Image.Image:
    return Image.open(real_image_paths[1]).convert("RGB")


def pan(picture: Image.Image, count: int, width: int = 300, height: int = 240) -> list[Image.Image]:
    """`count` frames of a camera panning across `picture`."""
    return [picture.crop((index * 12, 0, index * 12 + width, height)) for index in range(count)]


def run(*arguments):
    result = CliRunner().invoke(app, [str(argument) for argument in arguments])
    assert result.exit_code == 0, result.stderr[-3000:]
    return result.stdout.strip()


# ------------------------------------------------------------------------------------------- the interfaces
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_every_interface_embeds_and_trains_on_each_architecture(hub_backbone_dirs, architecture, cat):
    """Each interface with two different non-zero adapters: a padded batch (picture, text, video) embeds as its
    inputs one at a time do, in both modes; the interfaces but reasoning-prefill run the embedding adapter over
    the prompt and the queries alike, so their never-think embeddings agree and differ from reasoning-prefill's;
    the training views give both adapters a gradient."""
    inputs = [ModelInput(text="a cat on a chair", images=[cat]), ModelInput(text="the shape with one more side than a square"),
              ModelInput(video=Video(frames=pan(cat, 4), frame_indices=[0, 8, 16, 24], total_frames=32, fps=8.0))]
    never = {}
    for interface in INTERFACES:
        model = load_model(backbone=str(hub_backbone_dirs[architecture]), config=TWNConfig(lora_rank=2, max_think_tokens=4, interface=interface),
                           options=LoadOptions(device="cpu"))
        distinct_adapters(model)
        model.eval()
        with torch.no_grad():
            for think in ("never", "always"):
                batch = model.embed(inputs, think=think).embeddings
                alone = torch.cat([model.embed([item], think=think).embeddings for item in inputs])
                assert torch.isfinite(batch).all() and torch.allclose(batch, alone, atol=1e-4), (interface, think)
            never[interface] = model.embed(inputs, think="never").embeddings
        model.train()
        cot_ids = [model.prompts.tokenizer.encode(cot, add_special_tokens=False) for cot in ("a cat", "a pentagon", "a pan")]
        views = training_views(model, model.prompts.encode(inputs), cot_ids)
        views.sft_loss.backward()  # now, while the reasoning adapter is the trainable one (peft)
        sum(model.query_pass(view).sum() for view in (views.think_view, views.no_think_view)).backward()
        assert gradient_parts(model) == {"reasoning", "embedding"}, interface
    assert torch.allclose(never["embedding-prefill"], never["reencode"], atol=1e-5)
    assert torch.allclose(never["cot-reencode"], never["reencode"], atol=1e-5)
    assert not torch.allclose(never["reasoning-prefill"], never["reencode"], atol=1e-3)


# ------------------------------------------------------------------------------------------- the processors
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_a_hub_folder_loads_with_pillow_processors_configured_from_its_files(hub_backbone_dirs, architecture):
    backbone = load_backbone(str(hub_backbone_dirs[architecture]), device="cpu")
    processor = backbone.processor
    hub = json.loads((hub_backbone_dirs[architecture] / "video_preprocessor_config.json").read_text())
    assert type(processor).__name__ == f"{hub['processor_class']}Pil"
    assert type(processor.image_processor).__name__ == "Qwen2VLImageProcessorPil"
    assert type(processor.video_processor).__name__ == f"{hub['video_processor_type']}Pil"
    assert processor.video_processor.patch_size == processor.image_processor.patch_size == ARCHITECTURES[architecture].patch_size
    assert list(processor.video_processor.image_mean) == hub["image_mean"]


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_two_frames_of_one_picture_give_its_image_patches(hub_backbone_dirs, architecture, cat):
    """The native processors' invariant: an image is a video of one frame repeated over a temporal patch."""
    processor = load_backbone(str(hub_backbone_dirs[architecture]), device="cpu").processor
    video_processor = processor.video_processor
    if ARCHITECTURES[architecture].video_budget_per_clip:
        # Qwen3-VL bounds a clip: give two frames twice an image's budget, so that each gets an image's.
        settings = video_processor.to_dict()
        settings["size"] = {"shortest_edge": 2 * processor.image_processor.size.shortest_edge,
                            "longest_edge": 2 * processor.image_processor.size.longest_edge}
        video_processor = Qwen3VLVideoProcessorPil(**{key: value for key, value in settings.items() if key != "video_processor_type"})
    image = processor.image_processor([cat], return_tensors="pt")
    video = video_processor([[cat, cat]], do_sample_frames=False, return_tensors="pt")
    assert image["image_grid_thw"].tolist() == video["video_grid_thw"].tolist()
    assert torch.equal(image["pixel_values"], video["pixel_values_videos"])


def test_a_folder_without_video_settings_processes_frames_with_its_image_settings(hub_backbone_dirs, tmp_path, cat):
    """The layout toy backbones of earlier twn versions were saved in: one processor_config.json, no video processor."""
    import shutil

    folder = shutil.copytree(hub_backbone_dirs["qwen2_vl"], tmp_path / "old-toy")
    image = json.loads((folder / "preprocessor_config.json").read_text())
    for name in ("preprocessor_config.json", "video_preprocessor_config.json"):
        (folder / name).unlink()
    image["image_processor_type"] = "Qwen2VLImageProcessorPil"
    (folder / "processor_config.json").write_text(json.dumps({"image_processor": image, "processor_class": "Qwen2VLImageOnlyProcessor"}))
    processor = load_backbone(str(folder), device="cpu").processor
    assert processor.video_processor.size == processor.image_processor.size
    video = processor.video_processor([[cat, cat]], do_sample_frames=False, return_tensors="pt")
    assert torch.equal(video["pixel_values_videos"], processor.image_processor([cat], return_tensors="pt")["pixel_values"])


def test_video_patches_are_laid_out_as_transformers_lays_them_out():
    """`temporal_patches` against transformers' own Qwen3-VL video patchify (which needs no torchvision),
    with an odd number of frames so that the last one is repeated."""
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    frames = torch.randn(5, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    native, *grid = Qwen3VLVideoProcessor().patchify(frames[None], patch_size=16, merge_size=2, temporal_patch_size=2)
    ours, our_grid = temporal_patches(frames.numpy(), patch_size=16, merge_size=2, temporal_patch_size=2)
    assert our_grid == list(grid) == [3, 4, 6]
    assert torch.equal(torch.from_numpy(ours), native[0])


@pytest.mark.parametrize("cap", [False, True])
@pytest.mark.parametrize("frames, height, width", [(8, 480, 640), (3, 100, 1000), (16, 2000, 300)])
def test_qwen3_vl_video_sizes_are_transformers_sizes(frames, height, width, cap):
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    settings = {"size": {"shortest_edge": 4096, "longest_edge": 8 * 128 * 128}, "cap_pixels_per_frame": cap, "max_video_tokens": 20}
    native = Qwen3VLVideoProcessor(**settings).get_num_of_video_patches(frames, height, width)
    assert Qwen3VLVideoProcessorPil(**settings).get_num_of_video_patches(frames, height, width) == native


# ------------------------------------------------------------------------------------------- the video path
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_a_video_costs_half_the_tokens_of_its_frames_as_images(hub_backbone_dirs, architecture, cat):
    model = load_model(backbone=str(hub_backbone_dirs[architecture]), config=TWNConfig(lora_rank=2), options=LoadOptions(device="cpu"))
    frames = pan(cat, 8)
    video = Video(frames=frames, frame_indices=list(range(2, 32, 4)), total_frames=32, fps=4.0)
    config = model.backbone.model.config
    as_video = model.prompts.encode([ModelInput(video=video)])
    as_images = model.prompts.encode([ModelInput(images=frames)])
    video_tokens = int((as_video["input_ids"] == config.video_token_id).sum())
    image_tokens = int((as_images["input_ids"] == config.image_token_id).sum())
    grid_t, grid_h, grid_w = as_video["video_grid_thw"][0].tolist()
    assert grid_t == 4 and video_tokens == grid_t * grid_h * grid_w // 4 == image_tokens // 2
    assert model.prompts.prompt_length(ModelInput(video=video)) - model.prompts.prompt_length(ModelInput()) == video_tokens


def test_qwen3_vl_writes_each_temporal_patch_time_into_the_prompt(hub_backbone_dirs, cat):
    """Frames 2 and 6 of a 4 fps video share the first temporal patch: 0.5 s and 1.5 s, written as 1.0 s."""
    model = load_model(backbone=str(hub_backbone_dirs["qwen3_vl"]), config=TWNConfig(lora_rank=2), options=LoadOptions(device="cpu"))
    video = Video(frames=pan(cat, 8), frame_indices=[2, 6, 10, 14, 18, 22, 26, 30], total_frames=32, fps=4.0)
    prompt = model.prompts.tokenizer.decode(model.prompts.encode([ModelInput(video=video)])["input_ids"][0])
    assert [part.split(" seconds>")[0] for part in prompt.split("<")[1:] if " seconds>" in part] == ["1.0", "3.0", "5.0", "7.0"]


def test_qwen2_5_vl_spaces_temporal_positions_by_the_seconds_between_patches(hub_backbone_dirs, cat):
    """8 of 32 frames at 4 fps: 1 sampled frame per second, 2 s per temporal patch, 2 positions per second."""
    model = load_model(backbone=str(hub_backbone_dirs["qwen2_5_vl"]), config=TWNConfig(lora_rank=2), options=LoadOptions(device="cpu"))
    video = Video(frames=pan(cat, 8), frame_indices=[2, 6, 10, 14, 18, 22, 26, 30], total_frames=32, fps=4.0)
    encoded = model.prompts.encode([ModelInput(video=video)])
    assert encoded["second_per_grid_ts"].tolist() == [2.0]
    positions, _ = model.positions.prompt_positions(encoded)
    temporal = positions[0, 0][encoded["input_ids"][0] == model.backbone.model.config.video_token_id]
    starts = sorted(set(temporal.tolist()))
    tokens_per_second = model.backbone.model.config.vision_config.tokens_per_second
    assert np.diff(starts).tolist() == [2 * tokens_per_second] * 3


@pytest.mark.parametrize("architecture", ["qwen2_vl", "qwen3_vl"])
def test_pixel_bounds_hold_for_images_and_each_frame_and_travel_with_the_checkpoint(hub_backbone_dirs, architecture, cat, tmp_path):
    from twn_cli.engine.checkpoint import load_checkpoint, save_checkpoint

    factor = ARCHITECTURES[architecture].patch_size * 2
    # About 2 x 2 merged patches (4 tokens) per picture, whether it would be larger or smaller.
    bounds = {"min_pixels": 4 * factor**2 - factor, "max_pixels": 4 * factor**2 + factor}
    square, tiny = cat.crop((0, 0, 300, 300)), cat.resize((16, 16))
    video = Video(frames=[cat.crop((offset, 0, offset + 300, 300)) for offset in (0, 40, 80, 120)], frame_indices=[0, 1, 2, 3], total_frames=4)

    def vision_tokens(model) -> tuple[int, int]:
        encoded = model.prompts.encode([ModelInput(images=[square, tiny]), ModelInput(video=video)])
        config = model.backbone.model.config
        return int((encoded["input_ids"] == config.image_token_id).sum()), int((encoded["input_ids"] == config.video_token_id).sum())

    # The folder's own bounds (at most 4 x 4 merged patches) let the square picture and the frames be larger.
    image_tokens, video_tokens = vision_tokens(load_model(backbone=str(hub_backbone_dirs[architecture]), config=TWNConfig(lora_rank=2), options=LoadOptions(device="cpu")))
    assert image_tokens > 8 and video_tokens > 8
    model = load_model(backbone=str(hub_backbone_dirs[architecture]), config=TWNConfig(lora_rank=2), options=LoadOptions(device="cpu", **bounds))
    assert vision_tokens(model) == (4 + 4, 2 * 4)  # two temporal patches of four tokens
    saved = save_checkpoint(model, tmp_path / "run", stages=[])
    assert json.loads((saved / "twn.json").read_text())["backbone"]["pixels"] == bounds
    reloaded = load_checkpoint(saved, device="cpu")
    assert reloaded.backbone.pixels == bounds and vision_tokens(reloaded) == (8, 8)


# ------------------------------------------------------------------------------------------- every command
def write_video(folder: Path, picture: Image.Image, count: int = 6) -> Path:
    folder.mkdir(parents=True)
    for index, frame in enumerate(pan(picture, count), start=1):
        frame.resize((120, 96)).save(folder / f"frame_{index}.png")
    return folder


@pytest.fixture(scope="module")
def video_data(tmp_path_factory, real_image_paths) -> Path:
    """A few records of every kind (text -> image, image -> text, video -> text, text -> video, image + text)
    in train, validation and test splits, with teacher CoTs."""
    root = tmp_path_factory.mktemp("video-data")
    pictures = {path.stem: path for path in real_image_paths}
    for name in ("astronaut", "chelsea", "coffee", "horse"):
        write_video(root / "videos" / name, Image.open(pictures[name]).convert("RGB"))
    captions = {"astronaut": "an astronaut in a suit", "chelsea": "a cat looking up", "coffee": "a cup of coffee",
                "horse": "a horse drawn in black", "rocket": "a rocket on its pad", "camera": "a man with a camera"}
    records = []
    for split, names in (("train", ["astronaut", "chelsea", "coffee", "horse"]), ("validation", ["rocket", "chelsea"]),
                         ("test", ["coffee", "astronaut"])):
        for name in names:
            video = f"videos/{name}" if name in ("astronaut", "chelsea", "coffee", "horse") else None
            records.append({"id": f"{split}-t2i-{name}", "split": split, "task": "t2i", "query_text": captions[name],
                            "pos_image": str(pictures[name]), "cot": f"look for {captions[name]}"})
            records.append({"id": f"{split}-i2t-{name}", "split": split, "task": "i2t", "query_image": str(pictures[name]),
                            "query_text": "what is shown", "pos_text": captions[name], "cot": "name what the picture shows"})
            if video:
                records.append({"id": f"{split}-v2t-{name}", "split": split, "task": "v2t", "query_image": video,
                                "pos_text": captions[name], "cot": "follow the camera"})
                records.append({"id": f"{split}-t2v-{name}", "split": split, "task": "t2v", "query_text": captions[name],
                                "pos_image": video, "cot": ""})
    source = root / "records.jsonl"
    source.write_text("".join(json.dumps(record) + "\n" for record in records))
    return Path(run("prepare", source, "-o", root / "prepared", "--frames", 4))


RECIPES = {
    "train-embed": {"lora_rank": 2, "num_queries": 2, "gate_hidden_size": 8, "max_think_tokens": 3, "steps": 2,
                    "batch_size": 4, "chunk_size": 2, "hard_negatives": 1, "warmup_steps": 1, "checkpoint_every": 1,
                    "validation_queries": 4},
    "train-gate": {"label_queries": 6, "label_batch_size": 3, "hard_negatives": 1, "max_think_tokens": 3, "epochs": 2,
                   "batch_size": 4, "heldout_folds": 2, "validation_queries": 4},
    "train-rl": {"steps": 1, "batch_size": 2, "group_size": 2, "max_think_tokens": 3, "hardest_negatives": 2,
                 "random_negatives": 2, "checkpoint_every": 1, "validation_queries": 2},
}


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_every_command_runs_on_a_hub_backbone_with_videos(hub_backbone_dirs, video_data, architecture, tmp_path, real_image_paths):
    recipes = {}
    for stage, settings in RECIPES.items():
        recipes[stage] = tmp_path / f"{stage}.yaml"
        recipes[stage].write_text(yaml.safe_dump(settings))
    backbone = hub_backbone_dirs[architecture]
    embedded = run("train-embed", video_data, "--backbone", backbone, "-o", tmp_path / "embed", "--recipe", recipes["train-embed"])
    gated = run("train-gate", video_data, "--checkpoint", embedded, "-o", tmp_path / "gate", "--recipe", recipes["train-gate"])
    cache = run("embed", video_data, "--checkpoint", gated, "-o", tmp_path / "cache.pt")
    trained = run("train-rl", video_data, "--checkpoint", gated, "--negatives-cache", cache, "-o", tmp_path / "rl",
                  "--recipe", recipes["train-rl"])
    manifest = json.loads((Path(trained) / "twn.json").read_text())
    assert [stage["stage"] for stage in manifest["stages"]] == ["train-embed", "train-gate", "train-rl"]

    inputs = tmp_path / "inputs.jsonl"
    video = video_data.parent / "videos" / "horse"
    inputs.write_text("".join(json.dumps(record) + "\n" for record in [
        {"id": "image", "image": str(real_image_paths[0])},
        {"id": "text", "text": "a cup of coffee"},
        {"id": "video", "video": str(video), "num_frames": 4, "fps": 2},
        {"id": "mixed", "text": "the same horse?", "image": str(real_image_paths[5]), "video": sorted(map(str, video.iterdir()))},
    ]))
    ids, vectors, metadata = read_embeddings(run("embed", inputs, "--checkpoint", trained, "--think", "always", "-o", tmp_path / "out.safetensors"))
    assert ids == ["image", "text", "video", "mixed"] and torch.isfinite(vectors).all()
    routed = [json.loads(line) for line in run("route", inputs, "--checkpoint", trained).splitlines()]
    assert [line["id"] for line in routed] == ids
    report = json.loads((Path(run("eval", video_data, "--checkpoint", trained, "-o", tmp_path / "report")) / "report.json").read_text())
    assert set(report["result"]["tasks"]) == {"t2i", "i2t", "v2t", "t2v"}


def test_qwen3_vl_moe_adapters_cover_attention_only_and_say_so(hub_backbone_dirs, tmp_path):
    from twn_cli.engine.checkpoint import save_checkpoint

    coverage = {}
    for architecture in ("qwen3_vl", "qwen3_vl_moe"):
        model = load_model(backbone=str(hub_backbone_dirs[architecture]), config=TWNConfig(lora_rank=2), options=LoadOptions(device="cpu"))
        saved = save_checkpoint(model, tmp_path / architecture, stages=[])
        coverage[architecture] = json.loads((saved / "twn.json").read_text())["adapters"]
    assert coverage["qwen3_vl_moe"]["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert {"mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate"} <= set(coverage["qwen3_vl_moe"]["not_adapted_percent_by_weight"])
    assert coverage["qwen3_vl"]["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert coverage["qwen3_vl_moe"]["adapted_percent"] < coverage["qwen3_vl"]["adapted_percent"]
