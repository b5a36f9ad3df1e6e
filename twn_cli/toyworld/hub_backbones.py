"""Tiny random-weight backbones of the real Qwen-VL architectures, laid out as the hub lays them out.

What a user downloads from the hub is a folder whose preprocessor_config.json names the processor class and a
"Fast" (torchvision) image processor, and whose video_preprocessor_config.json names the family's video
processor. These folders are built the same way from each architecture's own config class, at toy size and
with random weights, so that the path users take (`--backbone DIR` on a downloaded folder) is tested without
downloading anything. The processor settings are the hub's, with pixel budgets shrunk so that a picture is a
few dozen tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from twn_cli.toyworld.backbone import train_tokenizer, write_processor_files

CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
HALF = [0.5, 0.5, 0.5]


@dataclass(frozen=True)
class HubArchitecture:
    """One family as the hub ships it: config and model classes, processor class, and processor settings."""

    config_class: str
    model_class: str
    processor_class: str
    video_processor_type: str
    patch_size: int
    text_config: dict
    vision_config: dict
    image_mean: list
    image_std: list
    # Qwen3-VL's video processor bounds the pixels of a whole clip, Qwen2-VL's those of each frame.
    video_budget_per_clip: bool


_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=4096)
ARCHITECTURES = {
    "qwen2_vl": HubArchitecture(
        "Qwen2VLConfig", "Qwen2VLForConditionalGeneration", "Qwen2VLProcessor", "Qwen2VLVideoProcessor", 14,
        dict(_TEXT, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}),
        dict(depth=1, embed_dim=32, num_heads=2, hidden_size=64, patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        CLIP_MEAN, CLIP_STD, False,
    ),
    "qwen2_5_vl": HubArchitecture(
        "Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor", "Qwen2VLVideoProcessor", 14,
        dict(_TEXT, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}),
        dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
             spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=2, window_size=56, fullatt_block_indexes=[1]),
        CLIP_MEAN, CLIP_STD, False,
    ),
    "qwen3_vl": HubArchitecture(
        "Qwen3VLConfig", "Qwen3VLForConditionalGeneration", "Qwen3VLProcessor", "Qwen3VLVideoProcessor", 16,
        dict(_TEXT, head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                  "mrope_section": [4, 2, 2], "mrope_interleaved": True}),
        dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=16,
             spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64, deepstack_visual_indexes=[0, 1]),
        HALF, HALF, True,
    ),
    "qwen3_vl_moe": HubArchitecture(
        "Qwen3VLMoeConfig", "Qwen3VLMoeForConditionalGeneration", "Qwen3VLProcessor", "Qwen3VLVideoProcessor", 16,
        dict(_TEXT, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1,
             rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2],
                              "mrope_interleaved": True}),
        dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=16,
             spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64, deepstack_visual_indexes=[0, 1]),
        HALF, HALF, True,
    ),
}
# Pictures become at most 4 x 4 merged patches (16 tokens) per image and per temporal patch of a video.
MERGED_SIDE = 4


def write_hub_backbone(output_dir: str | Path, architecture: str, seed: int = 0, frames_per_video: int = 8) -> Path:
    """Write a tiny random-weight backbone of `architecture` (a key of ARCHITECTURES) in the hub's layout.

    `frames_per_video` sizes a Qwen3-VL clip budget so that each of that many frames gets the per-frame budget.
    """
    import torch
    import transformers

    spec = ARCHITECTURES[architecture]
    tokenizer = train_tokenizer(1024, seed)
    token_id = tokenizer.convert_tokens_to_ids
    special = {"eos_token_id": token_id("<|im_end|>"), "pad_token_id": token_id("<|endoftext|>"), "bos_token_id": None}
    config = getattr(transformers, spec.config_class)(
        text_config=dict(spec.text_config, vocab_size=len(tokenizer), **special),
        vision_config=spec.vision_config,
        image_token_id=token_id("<|image_pad|>"),
        video_token_id=token_id("<|video_pad|>"),
        vision_start_token_id=token_id("<|vision_start|>"),
        vision_end_token_id=token_id("<|vision_end|>"),
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = getattr(transformers, spec.model_class)(config).eval()

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    factor = spec.patch_size * 2
    frame_pixels, smallest = (factor * MERGED_SIDE) ** 2, factor**2
    shared = {"patch_size": spec.patch_size, "temporal_patch_size": 2, "merge_size": 2, "image_mean": spec.image_mean,
              "image_std": spec.image_std}
    image = {**shared, "size": {"longest_edge": frame_pixels, "shortest_edge": smallest},
             "image_processor_type": "Qwen2VLImageProcessorFast"}
    if spec.video_budget_per_clip:
        video = {**shared, "size": {"longest_edge": frame_pixels * frames_per_video, "shortest_edge": smallest},
                 "fps": 2, "min_frames": 4, "max_frames": 768, "do_sample_frames": True}
    else:
        video = {**shared, "min_pixels": smallest, "max_pixels": frame_pixels}
    video["video_processor_type"] = spec.video_processor_type
    write_processor_files(output_dir, tokenizer, spec.processor_class, image, video)
    return output_dir
