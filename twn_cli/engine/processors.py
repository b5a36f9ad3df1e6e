"""Processors that work without torchvision.

transformers' Qwen2-VL processor insists on a video processor, and video processors need torchvision, which
cannot be installed beside a CPU build of torch. The image-only processor keeps everything else of the stock
processor (image placeholder expansion, `mm_token_type_ids`), so the engine treats it like any other.
"""

from __future__ import annotations

from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor
from transformers.utils import is_torchvision_available


class Qwen2VLImageOnlyProcessor(Qwen2VLProcessor):
    """A Qwen2-VL processor for images and text, without the video processor."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, video_processor=None, chat_template=chat_template, **kwargs)


def register_image_only_processors() -> None:
    """Make AutoProcessor build image-only Qwen2-VL processors where torchvision is missing."""
    from transformers import AutoProcessor, Qwen2VLConfig

    if not is_torchvision_available():
        AutoProcessor.register(Qwen2VLConfig, Qwen2VLImageOnlyProcessor, exist_ok=True)
