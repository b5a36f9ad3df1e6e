"""Plain types shared by the data layer and the engine, so that neither imports the other for them.

A video is what the backbone sees of it: sampled frames, and where they sit in the source video.
Qwen2-VL-style backbones encode a video as one vision input: pairs of consecutive frames share a temporal
patch (half the tokens of encoding each frame as an image), the language model gets a temporal position
axis, Qwen2.5-VL spaces those positions by the frames' seconds apart, and Qwen3-VL writes each patch's time
into the prompt ("<0.9 seconds>"). The times come from `frame_indices` and `fps`, as transformers' video
metadata has them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image

# What transformers' Qwen video processors assume when a video's frame rate is unknown (a folder of frames).
DEFAULT_FPS = 24.0


@dataclass
class Video:
    """Sampled frames (RGB, of one size), their positions among the source's `total_frames`, and its frame rate."""

    frames: list[Image.Image]
    frame_indices: list[int]
    total_frames: int
    fps: float | None = None  # None: unknown, taken as DEFAULT_FPS

    def __post_init__(self):
        if len(self.frames) != len(self.frame_indices):
            raise ValueError(f"{len(self.frames)} frames but {len(self.frame_indices)} frame indices")

    def metadata(self) -> dict:
        """transformers' `VideoMetadata` fields of this video (what the processors compute times from)."""
        width, height = self.frames[0].size
        return {
            "total_num_frames": self.total_frames,
            "fps": self.fps or DEFAULT_FPS,
            "frames_indices": list(self.frame_indices),
            "width": width,
            "height": height,
        }


@dataclass
class ModelInput:
    """One input: an optional task instruction, text, images, and a video (encoded by the backbone's video path)."""

    text: str = ""
    images: list[Image.Image] = field(default_factory=list)
    instruction: str | None = None
    video: Video | None = None
