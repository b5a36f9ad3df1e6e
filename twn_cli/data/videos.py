"""Videos that records refer to: a folder of frame images, a list of frame images, or a video file.

A record's video is sampled once, when it is read: `num_frames` frames spread uniformly over it (the middle
frame of as many equal segments; all of them if it has fewer). The sample is a `VideoClip`, which says which
files and frames to open and where they sit in the video, and is what a prepared dataset stores; `load`
opens its frames for the model. A video file is decoded with whichever decoder transformers finds installed
(PyAV, decord, OpenCV or torchcodec: `pip install av`).

Errors are ValueErrors with a short reason, which callers prefix with the record, as for images.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from twn_cli.data.images import IMAGE_SUFFIXES, load_image
from twn_cli.types import Video

VIDEO_FILE_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv"}
# MMEB-V2 samples 8 frames of every video, uniformly.
DEFAULT_NUM_FRAMES = 8


@dataclass(frozen=True)
class VideoClip:
    """The sampled frames of a video: the frame images (or the one video file), their indices among the
    video's `total_frames`, and its frame rate (None: unknown)."""

    paths: tuple[str, ...]
    frame_indices: tuple[int, ...]
    total_frames: int
    fps: float | None = None

    @property
    def is_file(self) -> bool:
        return len(self.paths) == 1 and is_video_file(self.paths[0])

    def to_row(self) -> dict:
        """The clip as a prepared dataset stores it (`VIDEO_FEATURE`); fps 0 means unknown."""
        return {
            "paths": list(self.paths),
            "frame_indices": list(self.frame_indices),
            "total_frames": self.total_frames,
            "fps": self.fps or 0.0,
        }

    @classmethod
    def from_row(cls, row: Mapping | None) -> VideoClip | None:
        """The clip a prepared row stores; None for a row without a video."""
        if not row or not row["paths"]:
            return None
        return cls(tuple(row["paths"]), tuple(row["frame_indices"]), row["total_frames"], row["fps"] or None)

    def load(self) -> Video:
        """The sampled frames, opened (decoded from the file); ValueError naming what is wrong."""
        if self.is_file:
            frames = _decode(self.paths[0], list(self.frame_indices))[0]
        else:
            frames = []
            for path in self.paths:
                try:
                    frames.append(load_image(path))
                except ValueError as error:
                    raise ValueError(f"frame '{path}' {error}") from None
        sizes = {frame.size for frame in frames}
        if len(sizes) > 1:
            raise ValueError(f"frames differ in size ({', '.join(f'{w}x{h}' for w, h in sorted(sizes))}): a video's frames must share one")
        return Video(frames=frames, frame_indices=list(self.frame_indices), total_frames=self.total_frames, fps=self.fps)


def uniform_indices(total: int, count: int) -> list[int]:
    """`count` of `total` frames spread uniformly: the middle one of `count` equal segments (all if fewer),
    so that the first and last moments of the video are covered alike."""
    if total <= count:
        return list(range(total))
    return [int((index + 0.5) * total / count) for index in range(count)]


def sample_clip(source: str | Path | Sequence[str], num_frames: int = DEFAULT_NUM_FRAMES, fps: float | None = None) -> VideoClip:
    """The clip of `num_frames` frames sampled from `source`: a folder of frames, a list of frame paths, or a video file.

    `fps` is the frame rate of a folder's or list's frames (a file's own rate is read from it).
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be at least 1, not {num_frames}")
    if fps is not None and fps <= 0:
        raise ValueError(f"fps must be positive, not {fps}")
    if isinstance(source, (str, Path)) and is_video_file(source):
        return _sample_file(str(source), num_frames)
    frames = frame_files(Path(source)) if isinstance(source, (str, Path)) else [str(path) for path in source]
    if len(frames) < 2:
        raise ValueError(f"a video needs at least 2 frames, '{source}' has {len(frames)} (give one frame as an image)")
    indices = uniform_indices(len(frames), num_frames)
    return VideoClip(tuple(frames[index] for index in indices), tuple(indices), len(frames), fps)


def frame_files(directory: Path) -> list[str]:
    """The frame images in `directory`, in natural filename order (frame_2 before frame_10)."""
    if not directory.is_dir():
        raise ValueError(f"video '{directory}' is neither a folder of frames nor a video file ({', '.join(sorted(VIDEO_FILE_SUFFIXES))})")
    frames = sorted((path for path in directory.iterdir() if is_image_file(path)), key=lambda path: natural_key(path.name))
    if not frames:
        raise ValueError(f"video folder '{directory}' has no frame images")
    return [str(path) for path in frames]


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()


def is_video_file(path: str | Path) -> bool:
    """A path with a video file's suffix that is not a folder: MMEB-V2 ships frame folders named `166583.webm`."""
    return Path(path).suffix.lower() in VIDEO_FILE_SUFFIXES and not Path(path).is_dir()


def natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def _sample_file(path: str, num_frames: int) -> VideoClip:
    if not Path(path).is_file():
        raise ValueError(f"video '{path}' not found")
    # Decoding the sampled frames once checks that the file can be read, as an image is opened to check it.
    _, metadata, indices = _decode(path, None, num_frames)
    if len(indices) < 2:
        raise ValueError(f"video '{path}' has {metadata.total_num_frames} frames: a video needs at least 2")
    return VideoClip((path,), tuple(indices), int(metadata.total_num_frames), float(metadata.fps) if metadata.fps else None)


def _decode(path: str, indices: list[int] | None, num_frames: int = DEFAULT_NUM_FRAMES):
    """The frames at `indices` of the video file (or `num_frames` uniform ones), its metadata and the indices."""
    from PIL import Image
    from transformers.video_utils import load_video

    chosen: list[int] = []

    def pick(metadata, **kwargs):
        chosen.extend(indices if indices is not None else uniform_indices(int(metadata.total_num_frames), num_frames))
        return chosen

    backend = _decoder()
    try:
        frames, metadata = load_video(path, backend=backend, sample_indices_fn=pick)
    except Exception as error:  # each decoder raises errors of its own types for a file it cannot read
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"video '{path}' cannot be decoded ({reason})") from None
    if len(frames) != len(chosen):
        raise ValueError(f"video '{path}' ended after {len(frames)} of the frames asked for (it is shorter than its header says)")
    return [Image.fromarray(frame).convert("RGB") for frame in frames], metadata, chosen


def _decoder() -> str:
    from transformers.utils import is_av_available, is_cv2_available, is_decord_available, is_torchcodec_available

    for name, available in (("pyav", is_av_available), ("decord", is_decord_available), ("opencv", is_cv2_available),
                            ("torchcodec", is_torchcodec_available)):
        if available():
            return name
    raise ValueError("decoding a video file needs a video decoder: pip install av (or give the video as a folder of frames)")
