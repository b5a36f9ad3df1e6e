"""TWN models under mteb (`pip install 'twn-cli[mteb]'`): `mteb.evaluate(load_encoder("runs/rl"), tasks)`.

`TWNEncoder` implements mteb's encoder protocol: `encode(DataLoader[BatchedInput], *, task_metadata, hf_split,
hf_subset, prompt_type)` returns one L2-normalised vector per input, and its `mteb_model_meta` (a `ModelMeta`
built from the checkpoint) says cosine similarity, so mteb's own search, classifiers and clustering use
them unchanged. An input is its text (a query's own text, without the instruction mteb appends to it), its
image or images, and a video's frames (`frames` of them, sampled uniformly as `twn prepare` does).

Instructions go where TWN puts them, into the prompt's instruction slot, chosen as mteb chooses prompts:
from `instructions` by "TaskName-query", "TaskName", "TaskType-query", "TaskType", then "query" (or
"document"); else the task's own prompt (for documents only a prompt given for documents); else the
model's default instruction. A query's own `instruction` column, where a task has one, comes first.

Queries (and the inputs of tasks without queries and documents) think as `think` says (never, always, or
adaptive: the gate decides at `threshold`); documents as `document_think` says, by default never, as
candidates are embedded in training and in `twn eval`. Both are recorded in the ModelMeta's
experiment_kwargs, so mteb keeps their results apart. CoTs are decoded greedily.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from mteb.models.abs_encoder import AbsEncoder
from mteb.models.model_meta import ModelMeta, ScoringFunction
from mteb.types import PromptType
from PIL import Image

from twn_cli.engine.batching import block_size, embed_block
from twn_cli.engine.identity import model_identity
from twn_cli.engine.model import TWNModel
from twn_cli.errors import TWNError
from twn_cli.types import ModelInput

THINK_MODES = {"never": "never", "always": "always", "adaptive": "auto"}


class TWNEncoder(AbsEncoder):
    """A loaded TWN model as an mteb encoder (see the module's docstring)."""

    def __init__(
        self,
        model: TWNModel,
        *,
        think: str = "never",
        document_think: str = "never",
        threshold: float | None = None,
        instructions: Mapping[str, str] | None = None,
        frames: int = 8,
        batch_size: int | None = None,
        name: str | None = None,
    ):
        for option, value in (("think", think), ("document_think", document_think)):
            if value not in THINK_MODES:
                raise TWNError(f"{option} must be one of {', '.join(THINK_MODES)}, not '{value}'")
        self.model = model
        self.think, self.document_think, self.threshold = think, document_think, threshold
        self.instructions = dict(instructions or {})
        self.frames = frames
        self.batch_size = batch_size
        self.mteb_model_meta = model_meta(model, name=name, experiment={"think": think, "document_think": document_think, "threshold": threshold})

    def instruction(self, task_metadata, prompt_type: PromptType | None) -> str | None:
        """The instruction of a task's queries or documents (None: the model's default)."""
        kind = prompt_type.value if prompt_type is not None else None
        names = (task_metadata.name, task_metadata.type)
        keys = [f"{name}-{kind}" if suffixed else name for name in names for suffixed in ((True, False) if kind else (False,))]
        for key in [*keys, kind] if kind else keys:
            if key in self.instructions:
                return self.instructions[key]
        prompt = task_metadata.prompt
        if isinstance(prompt, Mapping):
            return prompt.get(kind) or None
        return (prompt or None) if prompt_type is not PromptType.document else None

    def encode(self, inputs, *, task_metadata, hf_split: str, hf_subset: str, prompt_type: PromptType | None = None, **kwargs: Any) -> torch.Tensor:
        """One float32 L2-normalised vector per input of `inputs`, in order."""
        if "video" in inputs.dataset.features:
            from mteb.models.modality_collators import FramesCollator

            inputs.collate_fn = FramesCollator(num_frames=self.frames)
        instruction = self.instruction(task_metadata, prompt_type)
        think = THINK_MODES[self.document_think if prompt_type is PromptType.document else self.think]
        batch_size = self.batch_size or kwargs.get("batch_size") or 16
        block = block_size(batch_size)
        pending: list[ModelInput] = []
        parts: list[torch.Tensor] = []
        for batch in inputs:
            pending += batch_inputs(batch, instruction, task_metadata.name)
            while len(pending) >= block:
                parts.append(self._embed(pending[:block], think, batch_size))
                pending = pending[block:]
        if pending:
            parts.append(self._embed(pending, think, batch_size))
        return torch.cat(parts) if parts else torch.empty(0, self.model.embedding_dim)

    def _embed(self, inputs: list[ModelInput], think: str, batch_size: int) -> torch.Tensor:
        return embed_block(self.model, inputs, think, batch_size, self.threshold).embeddings.float().cpu()


def batch_inputs(batch: Mapping[str, Any], instruction: str | None, task: str) -> list[ModelInput]:
    """The model inputs of one mteb batch (its "text", "query", "instruction", "image" and "video" columns)."""
    columns = [name for name in ("query", "text", "image", "video") if name in batch]
    if not columns:
        raise TWNError(f"mteb task '{task}' gave a batch with no text, image or video (columns: {', '.join(batch)})")
    texts = batch.get("query", batch.get("text"))
    row_instructions = batch.get("instruction")
    inputs = []
    for row in range(len(batch[columns[0]])):
        images = _images(batch["image"][row]) if "image" in batch else []
        if "video" in batch and batch["video"][row] is not None:
            images += _frames(batch["video"][row])
        text = texts[row] if texts is not None and texts[row] is not None else ""
        own = row_instructions[row] if row_instructions is not None else None
        if not text.strip() and not images:
            raise TWNError(f"mteb task '{task}': input {row} of a batch has neither text nor image")
        inputs.append(ModelInput(text=text, images=images, instruction=own or instruction))
    return inputs


def _images(value) -> list[Image.Image]:
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else [value]
    return [item.convert("RGB") for item in items if item is not None]


def _frames(video) -> list[Image.Image]:
    """A video's frames: a uint8 [T, C, H, W] tensor (mteb's FramesCollator) or a list of pictures."""
    if isinstance(video, torch.Tensor):
        if video.dtype != torch.uint8 or video.dim() != 4:
            raise TWNError(f"video frames must be a uint8 [frames, channels, height, width] tensor, not {video.dtype} {list(video.shape)}")
        return [Image.fromarray(frame.permute(1, 2, 0).contiguous().numpy()).convert("RGB") for frame in video]
    return _images(list(video))


def model_meta(model: TWNModel, *, name: str | None = None, experiment: dict | None = None) -> ModelMeta:
    """mteb's description of a TWN model: its name, a revision that changes with every trained weight, its
    modalities, embedding size, parameter counts and memory, and cosine similarity.

    It names no loader: mteb's `ModelMeta.load_model` requires torchvision and torchcodec (its image and
    video extras) of any image or video model, and twn is used without torchvision. Give mteb the encoder.
    """
    manifest = model.manifest or {}
    counts = model.parameter_overhead()
    text_config = model.backbone.model.config.get_text_config(decoder=True)
    backbone_bytes = counts["backbone"] * model.backbone.dtype.itemsize
    saved = manifest.get("saved")
    return ModelMeta(
        loader=None,
        name=name or f"twn/{Path(model.backbone.source).name}",
        revision=model_identity(model).removeprefix("sha256:")[:12],
        release_date=saved[:10] if saved else None,
        languages=None,
        n_parameters=int(counts["backbone"] + counts["added"]),
        n_embedding_parameters=model.backbone.model.get_input_embeddings().weight.numel(),
        memory_usage_mb=round((backbone_bytes + 4 * counts["added"]) / 2**20, 1),
        max_tokens=getattr(text_config, "max_position_embeddings", None),
        embed_dim=model.embedding_dim,
        license=None,
        open_weights=None,
        public_training_code=None,
        public_training_data=None,
        framework=["PyTorch", "Transformers", "safetensors"],
        similarity_fn_name=ScoringFunction.COSINE,
        use_instructions=True,
        training_datasets=None,
        adapted_from=model.backbone.source,
        modalities=["text", "image", "video"],
        model_type=["dense"],
        experiment_kwargs=experiment,
    )


def load_encoder(
    checkpoint: str | Path,
    *,
    backbone: str | None = None,
    device: str = "auto",
    dtype: str = "float32",
    name: str | None = None,
    **options,
) -> TWNEncoder:
    """A checkpoint (or a release folder), optionally on a local copy of its backbone, as an mteb encoder named
    "twn/<folder name>" unless `name`; `options` are TWNEncoder's."""
    from twn_cli.engine.factory import LoadOptions, load_model

    checkpoint = Path(checkpoint)
    model = load_model(checkpoint, backbone, options=LoadOptions(device=device, dtype=dtype))
    return TWNEncoder(model, name=name or f"twn/{checkpoint.resolve().name}", **options)
