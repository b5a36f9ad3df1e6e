"""Loading a frozen multimodal LLM backbone and its processor, from a local directory or a hub id."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from twn_cli.errors import TWNError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Config keys that say how a model was loaded or saved, not what it is.
_VOLATILE_CONFIG_KEYS = {
    "_name_or_path",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "_attn_implementation",
    "_attn_implementation_autoset",
    "attn_implementation",
    "_commit_hash",
    "use_cache",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
}


@dataclass
class Backbone:
    """A frozen image-text-to-text model with the processor that prepares its inputs."""

    model: Any
    processor: Any
    source: str
    fingerprint: str
    # Bounds on the pixels of each image and video frame the processor makes; None: the backbone's own.
    pixels: dict = field(default_factory=lambda: {"min_pixels": None, "max_pixels": None})

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def hidden_size(self) -> int:
        return self.model.config.get_text_config(decoder=True).hidden_size

    def parameter_count(self) -> int:
        return sum(parameter.numel() for parameter in self.model.parameters())

    def bound_pixels(self, min_pixels: int | None, max_pixels: int | None) -> None:
        """Bound the pixels of each image and video frame (see `processors.bound_pixels`); None keeps a bound as it is."""
        from twn_cli.engine.processors import bound_pixels

        bound_pixels(self.processor, self.model.config.model_type, min_pixels, max_pixels)
        self.pixels = {
            "min_pixels": self.pixels["min_pixels"] if min_pixels is None else min_pixels,
            "max_pixels": self.pixels["max_pixels"] if max_pixels is None else max_pixels,
        }


def config_fingerprint(config) -> str:
    """A hash of everything in a model config that defines the model (not how it was loaded)."""

    def strip(value):
        if isinstance(value, dict):
            return {key: strip(item) for key, item in sorted(value.items()) if key not in _VOLATILE_CONFIG_KEYS}
        if isinstance(value, (list, tuple)):
            return [strip(item) for item in value]
        return value

    canonical = json.dumps(strip(config.to_dict()), sort_keys=True, default=str)
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_backbone(
    source: str,
    *,
    dtype: str = "float32",
    device: str = "auto",
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> Backbone:
    """Load `source` (a directory or hub id) frozen and in eval mode.

    `attn_implementation` is passed through to transformers (`sdpa`, `eager`, `flash_attention_2`, ...); the
    default lets transformers choose. Remote code runs only with `trust_remote_code=True`. `min_pixels` and
    `max_pixels` bound each image and video frame (None: the backbone's own bounds).
    """
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForImageTextToText

    from twn_cli.engine.hub import hub_load_options
    from twn_cli.engine.processors import load_processor

    if dtype not in DTYPES:
        raise TWNError(f"unknown dtype '{dtype}': choose one of {', '.join(DTYPES)}")
    hub_options = hub_load_options(source)
    try:
        model_type = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, **hub_options).model_type
        processor = load_processor(source, model_type, trust_remote_code=trust_remote_code, **hub_options)
        model = AutoModelForImageTextToText.from_pretrained(
            source,
            dtype=DTYPES[dtype],
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
            **hub_options,
        )
    except (OSError, ValueError, SafetensorError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TWNError(f"cannot load backbone '{source}': {first_line}") from None
    if not hasattr(processor, "tokenizer") or not hasattr(processor, "image_processor"):
        raise TWNError(f"backbone '{source}' has no image processor: it is not an image-text model")
    model.requires_grad_(False)
    model.eval()
    model.to(resolve_device(device))
    # A local directory is recorded absolute, so a checkpoint made from it loads from any working directory.
    recorded = str(Path(source).resolve()) if Path(source).is_dir() else str(source)
    backbone = Backbone(model=model, processor=processor, source=recorded, fingerprint=config_fingerprint(model.config))
    backbone.bound_pixels(min_pixels, max_pixels)
    return backbone
