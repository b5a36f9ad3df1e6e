"""One way to get a TWN model: a trained checkpoint, or fresh adapters on a backbone."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from twn_cli.engine.backbone import load_backbone
from twn_cli.engine.checkpoint import load_checkpoint
from twn_cli.engine.config import TWNConfig
from twn_cli.engine.model import TWNModel
from twn_cli.errors import TWNError


@dataclass
class LoadOptions:
    """How a backbone is loaded: where, in which dtype and attention kernel, whether its own code may run, and
    the pixel bounds of its pictures (None: a checkpoint's, else the backbone's own)."""

    device: str = "auto"
    dtype: str = "float32"
    attn_implementation: str | None = None
    trust_remote_code: bool = False
    min_pixels: int | None = None
    max_pixels: int | None = None

    def as_kwargs(self) -> dict:
        return dict(device=self.device, dtype=self.dtype, attn_implementation=self.attn_implementation, trust_remote_code=self.trust_remote_code,
                    min_pixels=self.min_pixels, max_pixels=self.max_pixels)


def load_model(
    checkpoint: str | Path | None = None,
    backbone: str | None = None,
    *,
    config: TWNConfig | None = None,
    options: LoadOptions = LoadOptions(),
) -> TWNModel:
    """A trained model from `checkpoint` (onto the backbone it names, or onto `backbone`, a local copy of
    it), or, without a checkpoint, fresh adapters on `backbone` with `config` (default settings if None)."""
    if checkpoint is None and backbone is None:
        raise TWNError("give a checkpoint (a trained model) or a backbone (fresh, untrained adapters)")
    loaded = load_backbone(backbone, **options.as_kwargs()) if backbone is not None else None
    if checkpoint is None:
        return TWNModel(loaded, config or TWNConfig())
    if config is not None:
        raise TWNError("model settings come from the checkpoint: give settings only for fresh adapters on a backbone")
    return load_checkpoint(checkpoint, loaded, **options.as_kwargs())
