"""Opening the images that records refer to, with errors that name the file and what is wrong."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def load_image(path: str | Path) -> Image.Image:
    """The image at `path` as RGB, fully decoded.

    Raises ValueError with a short reason ("not found", ...) that callers prefix with the record and path.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError("not found")
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except UnidentifiedImageError:
        raise ValueError("not in an image format Pillow can decode") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"corrupt or truncated ({error})") from None
