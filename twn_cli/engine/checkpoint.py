"""Checkpoint directories, written atomically and checked on load.

    twn.json               manifest: backbone + fingerprint + pixel bounds, model settings, what the adapters
                           cover, stages run, versions, file hashes
    reasoning/             PEFT LoRA adapter dir (loadable by peft alone)
    embedding/             PEFT LoRA adapter dir
    queries.safetensors    the K learnable query embeddings
    gate.safetensors       the routing gate MLP

`load_checkpoint` also loads a folder laid out like the TWN authors' release (twn_cli/engine/release.py).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from twn_cli.atomic import atomic_directory
from twn_cli.engine.adapter_coverage import adapter_coverage
from twn_cli.engine.backbone import Backbone, load_backbone
from twn_cli.engine.config import ADAPTERS, TWNConfig
from twn_cli.engine.model import TWNModel
from twn_cli.engine.release import is_release_layout, load_release
from twn_cli.errors import TWNError

MANIFEST = "twn.json"
FORMAT = "twn-checkpoint"
FORMAT_VERSION = 1
REQUIRED_FILES = (
    "reasoning/adapter_config.json",
    "reasoning/adapter_model.safetensors",
    "embedding/adapter_config.json",
    "embedding/adapter_model.safetensors",
    "queries.safetensors",
    "gate.safetensors",
)


def package_versions() -> dict[str, str]:
    import peft
    import transformers

    import twn_cli

    return {"twn": twn_cli.__version__, "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


RUN_FILES = ("train",)  # what a training run keeps beside its checkpoint: metrics and resumable states
# The top-level entries of a checkpoint (a run folder whose final save was interrupted holds some of them).
CHECKPOINT_ENTRIES = (MANIFEST, *ADAPTERS, "queries.safetensors", "gate.safetensors")


def save_checkpoint(
    model: TWNModel,
    output_dir: str | Path,
    stages: list[dict],
    extra: dict | None = None,
    write_files: Callable[[Path], None] | None = None,
) -> Path:
    """Write `model` to `output_dir` atomically: a temporary sibling directory renamed into place.

    `stages` is the history of stages that produced the model (each: name, arguments, time); `extra` holds
    stage results that later stages read (gate statistics, ...); `write_files(staging_dir)` may add files
    (a trainer's state). An existing checkpoint at `output_dir` is replaced only once the new one is
    complete; a training run's `train/` folder beside it never moves (twn.json, written last, says the
    checkpoint is complete: an interrupted save leaves a run folder without it, which `--resume` finishes).
    """
    output_dir = Path(output_dir)
    check_checkpoint_output(output_dir)
    with atomic_directory(output_dir, keep=RUN_FILES, marker=MANIFEST) as staging:
        if write_files is not None:
            write_files(staging)
        model.peft.save_pretrained(staging, selected_adapters=list(ADAPTERS))
        (staging / "README.md").unlink(missing_ok=True)  # peft's generic model card; twn.json describes the model
        save_file({"queries": model.queries.detach().float().cpu().contiguous()}, staging / "queries.safetensors")
        save_file(
            {name: tensor.detach().float().cpu().contiguous() for name, tensor in model.gate.state_dict().items()},
            staging / "gate.safetensors",
        )
        manifest = {
            **describe_model(model),
            "stages": stages,
            **(extra or {}),
            "saved": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "files": {name: _sha256(staging / name) for name in REQUIRED_FILES},
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return output_dir


def describe_model(model: TWNModel) -> dict:
    """What a manifest says of a model: its format, backbone, settings, adapters, sizes and package versions."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "backbone": {
            "source": model.backbone.source,
            "fingerprint": model.backbone.fingerprint,
            "model_type": model.backbone.model.config.model_type,
            "pixels": model.backbone.pixels,
        },
        "model": model.config.to_dict(),
        "adapters": adapter_coverage(model.backbone.model.get_decoder()),
        "embedding_dim": model.embedding_dim,
        "parameters": model.parameter_overhead(),
        "versions": package_versions(),
    }


def check_checkpoint_output(output_dir: Path) -> None:
    """Refuse, before any work, an output path that holds something other than a checkpoint or a run's files."""
    output_dir = Path(output_dir)
    if not output_dir.exists() or (output_dir / MANIFEST).is_file():
        return
    if not output_dir.is_dir():
        raise TWNError(f"'{output_dir}' exists and is not a TWN checkpoint: refusing to replace it")
    entries = {path.name for path in output_dir.iterdir()}
    # Beside a run's train/ folder, the part of a checkpoint that an interrupted final save left.
    allowed = set(RUN_FILES) | (set(CHECKPOINT_ENTRIES) if entries & set(RUN_FILES) else set())
    if entries - allowed:
        raise TWNError(f"'{output_dir}' exists and is not a TWN checkpoint: refusing to replace it")


# What save_checkpoint writes into every manifest; any other top-level key is a stage's result (`extra`).
_MANIFEST_KEYS = {"format", "format_version", "backbone", "model", "adapters", "embedding_dim", "parameters", "stages", "versions", "saved", "files"}


def stage_results(manifest: dict) -> dict:
    """The `extra` entries of a manifest (train_embed, gate, ...), for a later stage to carry forward."""
    return {key: value for key, value in manifest.items() if key not in _MANIFEST_KEYS}


def read_manifest(checkpoint_dir: str | Path) -> dict:
    """The checked manifest of a checkpoint: every file present and unchanged since it was written."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise TWNError(f"checkpoint '{checkpoint_dir}' does not exist")
    manifest_path = checkpoint_dir / MANIFEST
    if not manifest_path.is_file():
        raise TWNError(
            f"'{checkpoint_dir}' is not a TWN checkpoint (no {MANIFEST}; an interrupted write leaves none) nor a TWN "
            "release (reasoning/ and embedding/ adapters, gate_mlp.pt, queries.pt)"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise TWNError(f"checkpoint '{checkpoint_dir}': {MANIFEST} is corrupted ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise TWNError(
            f"checkpoint '{checkpoint_dir}': {MANIFEST} is not a version-{FORMAT_VERSION} TWN manifest"
        )
    backbone = manifest.get("backbone")
    if not (isinstance(backbone, dict) and isinstance(backbone.get("source"), str) and isinstance(backbone.get("fingerprint"), str)
            and isinstance(manifest.get("files"), dict) and isinstance(manifest.get("stages"), list)):
        raise TWNError(f"checkpoint '{checkpoint_dir}': {MANIFEST} lacks its backbone, files or stages")
    for name in REQUIRED_FILES:
        path = checkpoint_dir / name
        if not path.is_file():
            raise TWNError(f"checkpoint '{checkpoint_dir}' is incomplete: {name} is missing")
        if _sha256(path) != manifest.get("files", {}).get(name):
            raise TWNError(f"checkpoint '{checkpoint_dir}' is corrupted: {name} differs from what was saved")
    return manifest


def load_checkpoint(
    checkpoint_dir: str | Path,
    backbone: Backbone | None = None,
    *,
    dtype: str = "float32",
    device: str = "auto",
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> TWNModel:
    """Load a checkpoint onto its backbone (by default the one it names) and check they belong together.

    A folder laid out like the TWN authors' release loads too, with its settings read from its tensors.
    Images and video frames are bounded to `min_pixels` / `max_pixels`, by default to the bounds the
    checkpoint was trained with (twn.json), so that a model sees pictures at the resolution it learnt them.
    """
    checkpoint_dir = Path(checkpoint_dir)
    if is_release_layout(checkpoint_dir):
        return load_release(
            checkpoint_dir, backbone, dtype=dtype, device=device, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code,
            min_pixels=min_pixels, max_pixels=max_pixels,
        )
    manifest = read_manifest(checkpoint_dir)
    config = model_settings(manifest, checkpoint_dir)
    recorded = manifest["backbone"].get("pixels") or {}
    min_pixels = recorded.get("min_pixels") if min_pixels is None else min_pixels
    max_pixels = recorded.get("max_pixels") if max_pixels is None else max_pixels
    if backbone is None:
        try:
            backbone = load_backbone(
                manifest["backbone"]["source"],
                dtype=dtype,
                device=device,
                attn_implementation=attn_implementation,
                trust_remote_code=trust_remote_code,
                min_pixels=min_pixels,
                max_pixels=max_pixels,
            )
        except TWNError as error:
            raise TWNError(f"checkpoint '{checkpoint_dir}' names its backbone, but: {error} (give a local copy with --backbone DIR)") from None
    else:
        backbone.bound_pixels(min_pixels, max_pixels)
    expected = manifest["backbone"]["fingerprint"]
    if backbone.fingerprint != expected:
        raise TWNError(
            f"checkpoint '{checkpoint_dir}' was trained on backbone '{manifest['backbone']['source']}' "
            f"({expected[:19]}), not on '{backbone.source}' ({backbone.fingerprint[:19]})"
        )
    weights = {name: read_safetensors(checkpoint_dir / name) for name in REQUIRED_FILES if name.endswith(".safetensors")}
    model = TWNModel(backbone, config, adapter_dirs={name: checkpoint_dir / name for name in ADAPTERS})
    queries = weights["queries.safetensors"].get("queries")
    if queries is None or queries.shape != model.queries.shape:
        found = "no tensor 'queries'" if queries is None else f"shape {tuple(queries.shape)}"
        raise TWNError(f"checkpoint '{checkpoint_dir}': queries.safetensors has {found}, expected {tuple(model.queries.shape)}")
    model.queries.data.copy_(queries.to(model.device))
    try:
        model.gate.load_state_dict({name: tensor.to(model.device) for name, tensor in weights["gate.safetensors"].items()})
    except RuntimeError as error:
        raise TWNError(f"checkpoint '{checkpoint_dir}': gate.safetensors does not fit the gate ({str(error).splitlines()[0]})") from None
    model.checkpoint_dir, model.manifest = checkpoint_dir, manifest
    return model


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_trained_weights(model: TWNModel, checkpoint_dir: Path) -> None:
    """Copy a saved checkpoint's adapters and queries into `model` (same backbone, same settings)."""
    from peft import set_peft_model_state_dict

    for adapter in ADAPTERS:
        saved = read_safetensors(checkpoint_dir / adapter / "adapter_model.safetensors")
        result = set_peft_model_state_dict(model.peft, saved, adapter_name=adapter)
        if any(adapter in key for key in result.missing_keys):
            raise TWNError(f"state '{checkpoint_dir}' does not match the model's {adapter} adapter")
    queries = read_safetensors(checkpoint_dir / "queries.safetensors").get("queries")
    if queries is None or queries.shape != model.queries.shape:
        raise TWNError(f"state '{checkpoint_dir}': queries.safetensors does not hold the model's queries")
    model.queries.data.copy_(queries)


def model_settings(manifest: dict, checkpoint_dir: Path) -> TWNConfig:
    """The checkpoint's model settings, checked for type and range before anything is allocated from them."""
    settings = manifest.get("model")
    if not isinstance(settings, dict):
        raise TWNError(f"checkpoint '{checkpoint_dir}': {MANIFEST} has no model settings")
    try:
        return TWNConfig.from_dict(settings)
    except TWNError as error:
        raise TWNError(f"checkpoint '{checkpoint_dir}': {MANIFEST}: {error}") from None


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file on the CPU; a TWNError naming the file if it is malformed."""
    from safetensors import SafetensorError

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise TWNError(f"'{path}' is not a readable safetensors file ({str(error).strip().splitlines()[0]})") from None


def non_finite_weights(checkpoint_dir: Path) -> dict[str, int]:
    """How many NaN or inf values each weight file of a checkpoint (or training state) holds; empty if none."""
    counts = {}
    for name in REQUIRED_FILES:
        if name.endswith(".safetensors"):
            broken = sum(int((~torch.isfinite(tensor)).sum()) for tensor in read_safetensors(checkpoint_dir / name).values() if tensor.is_floating_point())
            if broken:
                counts[name] = broken
    return counts
