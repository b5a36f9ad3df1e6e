"""Plain types shared by the data layer and the engine, so that neither imports the other for them."""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image


@dataclass
class ModelInput:
    """One input: an optional task instruction, text, and images (video = its frames)."""

    text: str = ""
    images: list[Image.Image] = field(default_factory=list)
    instruction: str | None = None
