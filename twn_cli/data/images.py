"""Opening the images that records refer to, with errors that name the file and what is wrong."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
# Qwen-VL image processors refuse a longer side over 200 times the shorter one; any image that far from
# square is a strip, not a picture.
MAX_ASPECT_RATIO = 200
# Grey modes of 16 bits (PNG and TIFF; Pillow may open them as its 32-bit "I").
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


def load_image(path: str | Path) -> Image.Image:
    """The image at `path` as RGB, fully decoded, turned upright as its EXIF orientation says.

    Raises ValueError with a short reason ("not found", ...) that callers prefix with the record and path.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError("not found")
    try:
        image = Image.open(path)
    except Image.DecompressionBombError as error:
        raise ValueError(f"is too large to open safely ({error})") from None
    except UnidentifiedImageError:
        raise ValueError("not in an image format Pillow can decode") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"corrupt or truncated ({error})") from None
    with image:
        width, height = image.size
        if max(width, height) > MAX_ASPECT_RATIO * max(1, min(width, height)):
            raise ValueError(f"is {width}x{height} pixels: a side over {MAX_ASPECT_RATIO} times the other is not a picture a backbone takes")
        try:
            image.load()
            upright = ImageOps.exif_transpose(image)
        except (OSError, SyntaxError, ValueError) as error:
            raise ValueError(f"corrupt or truncated ({error})") from None
    return _as_rgb(upright)


def _as_rgb(image: Image.Image) -> Image.Image:
    """RGB with 8 bits per channel; 16-bit grey levels are scaled down, not clipped at 255 as Pillow's convert does."""
    if image.mode in _SIXTEEN_BIT_MODES:
        image = image.convert("I").point(lambda level: level * (255 / 65535) + 0.5).convert("L")
    return image.convert("RGB")
