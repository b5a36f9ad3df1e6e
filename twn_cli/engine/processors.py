"""Loading a backbone's processor, and video processors that work without torchvision.

A Qwen2-VL, Qwen2.5-VL, Qwen3-VL or Qwen3-VL-MoE folder from the hub names its processor class, a "Fast"
image processor and a video processor, and transformers builds both of those on torchvision. With
torchvision installed they are used as they are. Without it (torchvision's wheels cannot be installed beside
a CPU build of torch), transformers falls back to its own Pillow image processor (`Qwen2VLImageProcessorPil`)
but has no Pillow video processor, so this module provides one per family: the native video processor's
arithmetic (frame size, temporal patches, token layout) with each frame resized, rescaled and normalised
exactly as that Pillow image processor does it. So a video of two copies of one picture gives that
picture's image patches, as it does natively.

Everything that processes inputs for the backbone goes through `process` (the encoder and the CoT teacher),
so images and videos always reach the model the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import (
    IMAGENET_STANDARD_MEAN,
    IMAGENET_STANDARD_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    PILImageResampling,
    SizeDict,
)
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as frame_smart_resize
from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize as clip_smart_resize
from transformers.processing_utils import VideosKwargs
from transformers.utils import is_torchvision_available
from transformers.video_processing_utils import VideoProcessorMixin
from transformers.video_utils import is_valid_video, make_batched_metadata, make_batched_videos

from twn_cli.errors import TWNError
from twn_cli.types import Video


class QwenVideoKwargs(VideosKwargs, total=False):
    """The settings a Qwen video processor config may hold, beside transformers' common video ones."""

    min_pixels: int
    max_pixels: int
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    min_frames: int
    max_frames: int
    cap_pixels_per_frame: bool
    max_video_tokens: int


class _QwenVideoProcessorPil(VideoProcessorMixin, PilBackend):
    """A Qwen video processor on Pillow and NumPy, for frames the caller has sampled already.

    Subclasses say how a frame's size is chosen (`frame_size`); the rest is the native processors' own:
    frames resized to multiples of patch_size * merge_size, rescaled, normalised, padded with copies of the last
    frame to a whole number of temporal patches, and laid out patch by patch as the vision tower reads them.
    """

    resample = PILImageResampling.BICUBIC
    do_resize = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True
    temporal_patch_size = 2
    merge_size = 2
    min_frames = 4
    max_frames = 768
    do_sample_frames = False
    cap_pixels_per_frame = None
    valid_kwargs = QwenVideoKwargs
    model_input_names = ["pixel_values_videos", "video_grid_thw"]

    def __init__(self, **kwargs):
        # Older configs give the size as min_pixels / max_pixels, as the native processors accept it.
        size = dict(kwargs.pop("size", None) or self.size)
        if (min_pixels := kwargs.pop("min_pixels", None)) is not None:
            size["shortest_edge"] = min_pixels
        if (max_pixels := kwargs.pop("max_pixels", None)) is not None:
            size["longest_edge"] = max_pixels
        size = {key: value for key, value in size.items() if key in ("shortest_edge", "longest_edge")}
        super().__init__(size=size, **kwargs)

    def frame_size(self, frames: int, height: int, width: int, size: SizeDict, factor: int, temporal_factor: int,
                   cap_pixels_per_frame: bool | None, max_video_tokens: int | None) -> tuple[int, int]:
        raise NotImplementedError

    def _decode_and_sample_videos(self, videos, video_metadata, do_sample_frames=None, sample_indices_fn=None):
        videos = make_batched_videos(videos)
        if do_sample_frames:
            raise ValueError("this video processor takes frames sampled already: call it with do_sample_frames=False")
        if not all(is_valid_video(video) for video in videos):
            raise ValueError("this video processor takes decoded frames (PIL images or arrays), not paths or URLs")
        return videos, make_batched_metadata(videos, video_metadata=video_metadata)

    def _prepare_input_videos(self, videos, do_convert_rgb=None, input_data_format=None, device=None):
        """Each video as a list of channels-first frames, as the Pillow image processor prepares an image."""
        return [[self.process_image(frame, do_convert_rgb=do_convert_rgb, input_data_format=input_data_format) for frame in video]
                for video in videos]

    def _preprocess(self, videos, do_resize, size, resample, do_rescale, rescale_factor, do_normalize, image_mean,
                    image_std, patch_size, temporal_patch_size, merge_size, cap_pixels_per_frame=None,
                    max_video_tokens=None, return_tensors=None, **kwargs):
        pixel_values, grids = [], []
        for frames in videos:
            if do_resize:
                height, width = self.frame_size(len(frames), *frames[0].shape[-2:], size, patch_size * merge_size,
                                                temporal_patch_size, cap_pixels_per_frame, max_video_tokens)
                # The Pillow image processor's own resize, so that a frame becomes what an image of it becomes.
                frames = [PilBackend.resize(self, frame, SizeDict(height=height, width=width), resample) for frame in frames]
            if do_rescale:
                frames = [self.rescale(frame, rescale_factor) for frame in frames]
            if do_normalize:
                frames = [self.normalize(frame, image_mean, image_std) for frame in frames]
            patches, grid = temporal_patches(np.stack(frames).astype(np.float32), patch_size, merge_size, temporal_patch_size)
            pixel_values.append(patches)
            grids.append(grid)
        return BatchFeature(
            data={"pixel_values_videos": np.concatenate(pixel_values), "video_grid_thw": np.array(grids, dtype=np.int64)},
            tensor_type=return_tensors,
        )

    def get_num_of_video_patches(self, num_frames: int, height: int, width: int, videos_kwargs=None) -> int:
        """Patches of a video of `num_frames` frames of height x width, counted without processing it."""
        settings = self._merge_and_standardize_kwargs(**(videos_kwargs or {}))
        factor = settings["patch_size"] * settings["merge_size"]
        resized_height, resized_width = self.frame_size(
            num_frames, height, width, settings["size"], factor, settings["temporal_patch_size"],
            settings["cap_pixels_per_frame"], settings["max_video_tokens"],
        )
        grid_t = math.ceil(num_frames / settings["temporal_patch_size"])
        return grid_t * (resized_height // settings["patch_size"]) * (resized_width // settings["patch_size"])


class Qwen2VLVideoProcessorPil(_QwenVideoProcessorPil):
    """Qwen2-VL and Qwen2.5-VL video processing (transformers' `Qwen2VLVideoProcessor`): a pixel budget per frame."""

    size = {"shortest_edge": 128 * 28 * 28, "longest_edge": 28 * 28 * 768}
    image_mean = OPENAI_CLIP_MEAN
    image_std = OPENAI_CLIP_STD
    patch_size = 14
    max_video_tokens = 128000

    def frame_size(self, frames, height, width, size, factor, temporal_factor, cap_pixels_per_frame, max_video_tokens):
        max_pixels = size.longest_edge
        if cap_pixels_per_frame:
            total_pixels = int((max_video_tokens or self.max_video_tokens) * factor * factor * 0.9)
            max_pixels = max(min(max_pixels, total_pixels * temporal_factor // frames), int(size.shortest_edge * 1.05))
        return frame_smart_resize(height, width, factor=factor, min_pixels=size.shortest_edge, max_pixels=max_pixels)


class Qwen3VLVideoProcessorPil(_QwenVideoProcessorPil):
    """Qwen3-VL video processing (transformers' `Qwen3VLVideoProcessor`): a pixel budget for the whole clip."""

    size = {"shortest_edge": 128 * 32 * 32, "longest_edge": 32 * 32 * 768}
    image_mean = IMAGENET_STANDARD_MEAN
    image_std = IMAGENET_STANDARD_STD
    patch_size = 16
    max_video_tokens = 768

    def frame_size(self, frames, height, width, size, factor, temporal_factor, cap_pixels_per_frame, max_video_tokens):
        max_pixels = size.longest_edge
        if cap_pixels_per_frame:
            frame_cap = (max_video_tokens or self.max_video_tokens) * factor * factor
            max_pixels = max(min(frame_cap, size.longest_edge // frames), int(size.shortest_edge * 1.05)) * frames
        return clip_smart_resize(frames, height, width, temporal_factor=temporal_factor, factor=factor,
                                 min_pixels=size.shortest_edge, max_pixels=max_pixels)


def temporal_patches(frames: np.ndarray, patch_size: int, merge_size: int, temporal_patch_size: int) -> tuple[np.ndarray, list[int]]:
    """Frames [T, C, H, W] as the vision tower's rows, one per patch, and the grid (t, h, w) of patches.

    The layout of transformers' Qwen video processors: the clip padded with copies of its last frame to a
    whole number of temporal patches; rows ordered by temporal patch, then merge window, then position in it;
    each row holds channel, then frame within the temporal patch, then the pixels of the patch.
    """
    if pad := -len(frames) % temporal_patch_size:
        frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)])
    count, channels, height, width = frames.shape
    grid_t, grid_h, grid_w = count // temporal_patch_size, height // patch_size, width // patch_size
    patches = frames.reshape(grid_t, temporal_patch_size, channels, grid_h // merge_size, merge_size, patch_size,
                             grid_w // merge_size, merge_size, patch_size)
    patches = patches.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return patches.reshape(grid_t * grid_h * grid_w, -1), [grid_t, grid_h, grid_w]


class _AcceptsPilVideoProcessor:
    """A processor that takes this module's video processors: transformers checks a video processor's class
    against `VideoProcessorMixin`, which it cannot look up without torchvision."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor" and isinstance(argument, _QwenVideoProcessorPil):
            return type(argument)
        return super().check_argument_for_proper_class(argument_name, argument)


class Qwen2VLProcessorPil(_AcceptsPilVideoProcessor, Qwen2VLProcessor):
    """`Qwen2VLProcessor` with the Pillow video processor."""


class Qwen2_5_VLProcessorPil(_AcceptsPilVideoProcessor, Qwen2_5_VLProcessor):
    """`Qwen2_5_VLProcessor` with the Pillow video processor."""


class Qwen3VLProcessorPil(_AcceptsPilVideoProcessor, Qwen3VLProcessor):
    """`Qwen3VLProcessor` with the Pillow video processor."""


# The processor and video processor of each model family this module covers, as transformers names them.
QWEN_PROCESSORS = {
    "qwen2_vl": ("Qwen2VLProcessor", "Qwen2VLVideoProcessor"),
    "qwen2_5_vl": ("Qwen2_5_VLProcessor", "Qwen2VLVideoProcessor"),
    "qwen3_vl": ("Qwen3VLProcessor", "Qwen3VLVideoProcessor"),
    "qwen3_vl_moe": ("Qwen3VLProcessor", "Qwen3VLVideoProcessor"),
}
_PIL_COUNTERPARTS = {
    "Qwen2VLProcessor": Qwen2VLProcessorPil,
    "Qwen2_5_VLProcessor": Qwen2_5_VLProcessorPil,
    "Qwen3VLProcessor": Qwen3VLProcessorPil,
    "Qwen2VLVideoProcessor": Qwen2VLVideoProcessorPil,
    "Qwen3VLVideoProcessor": Qwen3VLVideoProcessorPil,
}


def qwen_processor_classes(model_type: str) -> tuple[type, type]:
    """The processor and video processor classes of a Qwen family: transformers' own with torchvision, this
    module's Pillow ones without it."""
    import transformers

    names = QWEN_PROCESSORS[model_type]
    if is_torchvision_available():
        return tuple(getattr(transformers, name) for name in names)
    return tuple(_PIL_COUNTERPARTS[name] for name in names)


def load_processor(source: str, model_type: str, trust_remote_code: bool = False, **hub_options):
    """The processor of the backbone at `source` (a directory or hub id) of `model_type`.

    The Qwen families get their processor class with its video processor (`qwen_processor_classes`) and the
    image processor transformers picks (the Pillow one without torchvision), each configured from the
    backbone's files; a folder without video processor settings (toy backbones of earlier twn versions) has
    its video frames processed with its image processor's settings. Other backbones get what transformers builds.
    `hub_options` go to every `from_pretrained` (`local_files_only` where the hub cannot be reached).
    """
    from transformers import AutoImageProcessor, AutoProcessor

    if model_type in QWEN_PROCESSORS:
        processor_class, video_processor_class = qwen_processor_classes(model_type)
        try:
            video_processor = video_processor_class.from_pretrained(source, **hub_options)
        except OSError:
            settings = AutoImageProcessor.from_pretrained(source, **hub_options).to_dict()
            video_processor = video_processor_class(**{key: value for key, value in settings.items() if key in QwenVideoKwargs.__annotations__})
        processor = processor_class.from_pretrained(source, video_processor=video_processor, **hub_options)
        # transformers hands the given video processor to the tokenizer too, which would then try to save it.
        processor.tokenizer.init_kwargs.pop("video_processor", None)
        return processor
    try:
        return AutoProcessor.from_pretrained(source, trust_remote_code=trust_remote_code, **hub_options)
    except ImportError as error:
        first_line = str(error).strip().splitlines()[0]
        raise TWNError(
            f"backbone '{source}' ({model_type}) needs a library that is not installed: {first_line} "
            f"(twn processes {', '.join(sorted(QWEN_PROCESSORS))} backbones without torchvision)"
        ) from None


def process(processor, prompts: list[str], images: Sequence, videos: Sequence[Video], **options) -> BatchFeature:
    """The processor's tensors for `prompts` holding these images and videos (in the order their placeholders
    appear), padded to one length; `options` go to the processor (padding_side, ...)."""
    video_inputs = {}
    if videos:
        # Frames are sampled already: the processor must neither sample again nor read frame rates of its own.
        video_inputs = dict(
            videos=[video.frames for video in videos],
            video_metadata=[video.metadata() for video in videos],
            do_sample_frames=False,
        )
    return processor(text=prompts, images=list(images) or None, padding=True, return_tensors="pt", **video_inputs, **options)


def vision_token_count(processor, images: Sequence, video: Video | None) -> int:
    """About how many prompt tokens these images and this video take: their placeholders, counted from their sizes.

    A Qwen3-VL video's timestamps and per-frame markers (a few tokens per temporal patch) are left out.
    Processors that cannot count (tiling ones answer with a tuple) count each image or video as one token.
    """
    count = 0
    image_processor = getattr(processor, "image_processor", None)
    if images and hasattr(image_processor, "get_number_of_image_patches"):
        merged = getattr(image_processor, "merge_size", 1) ** 2
        for image in images:
            patches = image_processor.get_number_of_image_patches(image.height, image.width, {})
            count += patches // merged if isinstance(patches, int) else 1
    video_processor = getattr(processor, "video_processor", None)
    if video is not None and hasattr(video_processor, "get_num_of_video_patches"):
        width, height = video.frames[0].size
        patches = video_processor.get_num_of_video_patches(len(video.frames), height, width)
        count += patches // getattr(video_processor, "merge_size", 1) ** 2 if isinstance(patches, int) else 1
    return count


def bound_pixels(processor, model_type: str, min_pixels: int | None, max_pixels: int | None) -> None:
    """Bound the pixels of each image and each video frame the processor makes (None: the backbone's own bound).

    Qwen2-VL and Qwen2.5-VL video processors bound each frame; Qwen3-VL's bound a whole clip, so there the
    largest frame is set by transformers' per-frame cap (`cap_pixels_per_frame`, counted in tokens of
    (patch_size * merge_size)^2 pixels), as the Qwen reference implementation bounds frames, and the smallest
    stays a bound on the clip.
    """
    for part in ("image_processor", "video_processor"):
        sub_processor = getattr(processor, part, None)
        if sub_processor is None:
            continue
        size = dict(sub_processor.size)
        per_clip = part == "video_processor" and QWEN_PROCESSORS.get(model_type, (None, None))[1] == "Qwen3VLVideoProcessor"
        if min_pixels is not None:
            size["shortest_edge"] = min_pixels
        if max_pixels is not None and per_clip:
            sub_processor.cap_pixels_per_frame = True
            sub_processor.max_video_tokens = max(1, max_pixels // (sub_processor.patch_size * sub_processor.merge_size) ** 2)
        elif max_pixels is not None:
            size["longest_edge"] = max_pixels
        if size.get("shortest_edge") and size.get("longest_edge") and size["shortest_edge"] > size["longest_edge"]:
            raise TWNError(f"--min-pixels {size['shortest_edge']} is above the largest {size['longest_edge']} pixels allowed")
        sub_processor.size = SizeDict(**size)

