"""The TWN authors' release layout, loaded as a model and converted into a twn checkpoint.

    reasoning/     PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors or .bin)
    embedding/     PEFT LoRA adapter folder
    queries.pt     the K learnable query embeddings, [K, hidden]
    gate_mlp.pt    the routing gate's state dict

The release names no backbone but through its adapters' `base_model_name_or_path`, carries no settings
but what its tensors' shapes say (K from the queries, the gate's width from its first layer), and has no
twn.json. Every other setting takes TWNConfig's default (`twn convert-release --set KEY=VALUE` changes
it in the converted checkpoint). Its .pt files are read with `weights_only=True`: they can hold tensors and
plain containers, never code.

The gate's state dict is mapped onto ours (Linear(hidden, G), GELU, Linear(G, 1)) by names and shapes: a
first layer whose weight is [G, hidden], a second whose weight has G entries (and one output), their biases
(a missing one is zero). What does not fit that, or fits it more than one way, is an error that lists
every key and shape found. The activation between the layers cannot be read from weights: it is taken
to be GELU, as in ours.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import torch

from twn_cli.engine.backbone import Backbone, load_backbone
from twn_cli.engine.config import ADAPTERS, FORMER_DEFAULT_INTERFACE, TWNConfig
from twn_cli.engine.model import TWNModel
from twn_cli.errors import TWNError

QUERIES_FILE = "queries.pt"
GATE_FILE = "gate_mlp.pt"
RELEASE_FORMAT = "twn-release"
_LAYER_KEY = re.compile(r"^(?P<layer>.*?)\.?(?P<part>weight|bias)$")


def is_release_layout(folder: str | Path) -> bool:
    """Whether `folder` is laid out like the authors' release (and is not a twn checkpoint)."""
    folder = Path(folder)
    return (
        folder.is_dir()
        and not (folder / "twn.json").exists()
        and all((folder / adapter / "adapter_config.json").is_file() for adapter in ADAPTERS)
        and (folder / QUERIES_FILE).is_file()
        and (folder / GATE_FILE).is_file()
    )


def load_release(
    folder: str | Path,
    backbone: Backbone | None = None,
    *,
    settings: dict | None = None,
    **load_options,
) -> TWNModel:
    """The release in `folder` on `backbone` (by default the one its adapters name, loaded with `load_options`:
    those of `load_backbone`), with `settings` over TWNConfig's defaults. The pixel bounds of `load_options`
    apply to a given backbone too. Its `manifest` describes it as a twn checkpoint manifest would."""
    folder = Path(folder)
    adapter_config = _adapter_config(folder, "reasoning")
    if backbone is None:
        source = adapter_config.get("base_model_name_or_path")
        if not source:
            raise TWNError(f"release '{folder}': its adapters name no backbone: give one with --backbone")
        try:
            backbone = load_backbone(source, **load_options)
        except TWNError as error:
            raise TWNError(f"release '{folder}' names its backbone, but: {error} (give a local copy with --backbone DIR)") from None
    else:
        backbone.bound_pixels(load_options.get("min_pixels"), load_options.get("max_pixels"))
    queries = release_queries(folder / QUERIES_FILE)
    if queries.shape[1] != backbone.hidden_size:
        raise TWNError(
            f"release '{folder}': {QUERIES_FILE} holds queries of size {queries.shape[1]}, but backbone "
            f"'{backbone.source}' has hidden size {backbone.hidden_size}: it belongs to another backbone"
        )
    gate_state, gate_keys = map_gate_state(load_tensors(folder / GATE_FILE), backbone.hidden_size, folder / GATE_FILE)
    lora = {
        "lora_rank": adapter_config.get("r", TWNConfig.lora_rank),
        "lora_alpha": adapter_config.get("lora_alpha", TWNConfig.lora_alpha),
        "lora_dropout": adapter_config.get("lora_dropout", TWNConfig.lora_dropout),
    }
    if isinstance(adapter_config.get("target_modules"), list):
        lora["lora_target_modules"] = sorted(adapter_config["target_modules"])
    shapes = {"num_queries": queries.shape[0], "gate_hidden_size": gate_state["mlp.0.weight"].shape[0]}
    fixed = sorted((settings or {}).keys() & (shapes.keys() | lora.keys() | {"lora_target_modules"}))
    if fixed:
        raise TWNError(f"release '{folder}': {', '.join(fixed)} cannot be set: the release's tensors and adapters fix them")
    # The authors' model prefills the prompt with its reasoning adapter.
    config = TWNConfig.from_dict({**TWNConfig().to_dict(), "interface": FORMER_DEFAULT_INTERFACE, **lora, **shapes, **(settings or {})})
    try:
        model = TWNModel(backbone, config, adapter_dirs={name: folder / name for name in ADAPTERS})
    except (RuntimeError, ValueError, KeyError, OSError) as error:
        raise TWNError(f"release '{folder}': its adapters do not load onto backbone '{backbone.source}' ({_first_line(error)})") from None
    model.queries.data.copy_(queries.to(model.device))
    model.gate.load_state_dict({name: tensor.to(model.device) for name, tensor in gate_state.items()})
    model.checkpoint_dir, model.manifest = folder, _release_manifest(folder, model, gate_keys)
    return model


def convert_release(folder: str | Path, output: str | Path, *, backbone: str | None = None, overrides: dict | None = None, **load_options) -> Path:
    """Write the release in `folder` as a twn checkpoint at `output` (atomically), with `overrides` of the
    settings the release does not carry (pooling, think markers, gate threshold, ...); returns `output`."""
    from twn_cli.engine.checkpoint import check_checkpoint_output, save_checkpoint, stage_results
    from twn_cli.recipes import load_recipe

    folder = Path(folder)
    if not is_release_layout(folder):
        raise TWNError(f"'{folder}' is not laid out like a TWN release (reasoning/ and embedding/ adapters, {GATE_FILE}, {QUERIES_FILE})")
    check_checkpoint_output(Path(output))
    overrides = overrides or {}
    validated = load_recipe(None, TWNConfig, **overrides)
    settings = {key: getattr(validated, key) for key in overrides}
    model = load_release(folder, load_backbone(backbone, **load_options) if backbone else None, settings=settings, **load_options)
    record = {"stage": "convert-release", "source": str(folder.resolve()), "arguments": settings, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    return save_checkpoint(model, output, stages=[record], extra=stage_results(model.manifest))


def release_queries(path: Path) -> torch.Tensor:
    """The [K, hidden] query embeddings in `path`: a tensor, or a container holding exactly one."""
    tensors = load_tensors(path)
    found = [tensor for tensor in tensors.values() if tensor.dim() in (2, 3)]
    if len(found) != 1 or len(tensors) != 1 or (found[0].dim() == 3 and found[0].shape[0] != 1):
        raise TWNError(f"'{path}' must hold one [K, hidden] tensor of queries; found {_listing(tensors)}")
    return found[0].reshape(found[0].shape[-2:]).float()


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor in a .pt file, by dotted name (nested containers flattened), read with weights_only=True."""
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # UnpicklingError for code or unknown classes, and others for broken files
        raise TWNError(f"'{path}' is not a plain tensor file (refused with weights_only=True: {_first_line(error)})") from None
    tensors: dict[str, torch.Tensor] = {}

    def collect(prefix: str, value) -> None:
        if isinstance(value, torch.Tensor):
            tensors[prefix] = value
        elif isinstance(value, dict):
            for key, item in value.items():
                collect(f"{prefix}.{key}" if prefix else str(key), item)
        elif isinstance(value, (list, tuple)):
            for position, item in enumerate(value):
                collect(f"{prefix}.{position}" if prefix else str(position), item)

    collect("", content)
    if not tensors:
        raise TWNError(f"'{path}' holds no tensors")
    return tensors


def map_gate_state(state: dict[str, torch.Tensor], input_size: int, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """`state` as our gate's state dict, and which of its keys became which of ours.

    The first layer is the one 2-D weight with `input_size` columns; the second has one output and as many
    inputs as the first has outputs. With names ending in weight/bias, a bias belongs to its weight's layer;
    without, a bias is told apart by its shape alone, and two candidates for one place are an error.
    """
    unmappable = TWNError(
        f"cannot map '{path}' onto the gate Linear({input_size}, G) -> GELU -> Linear(G, 1): found {_listing(state)}"
    )
    state = {name: tensor.float() for name, tensor in state.items()}
    firsts = [name for name, tensor in state.items() if tensor.dim() == 2 and tensor.shape[1] == input_size]
    if len(firsts) == 2:  # a gate as wide as the hidden size: the second layer's [1, G] has `input_size` columns too
        firsts = [name for name in firsts if state[name].shape[0] != 1]
    if len(firsts) != 1:
        raise unmappable
    first = firsts[0]
    width = state[first].shape[0]
    named = {name: _LAYER_KEY.match(name) for name in state}
    if all(named.values()):
        layers: dict[str, dict[str, str]] = {}
        for name, match in named.items():
            layers.setdefault(match["layer"], {})[match["part"]] = name
        first_layer = named[first]["layer"]
        if len(layers) != 2 or "weight" not in layers[first_layer] or named[first]["part"] != "weight":
            raise unmappable
        second_layer = next(layer for layer in layers if layer != first_layer)
        mapping = {"mlp.0.weight": first, "mlp.0.bias": layers[first_layer].get("bias"),
                   "mlp.2.weight": layers[second_layer].get("weight"), "mlp.2.bias": layers[second_layer].get("bias")}
    else:
        rest = [name for name in state if name != first]
        vectors = [name for name in rest if state[name].dim() == 1 and state[name].numel() == width]
        rows = [name for name in rest if state[name].dim() == 2 and state[name].shape == (1, width)]
        scalars = [name for name in rest if state[name].numel() == 1 and name not in vectors + rows]
        if len(rows) == 1 and len(vectors) <= 1:
            second_weight, first_bias = rows[0], (vectors or [None])[0]
        elif not rows and len(vectors) == 1 and width > 1:
            second_weight, first_bias = vectors[0], None
        else:
            raise unmappable
        if len(scalars) > 1 or len(rest) != len(vectors) + len(rows) + len(scalars):
            raise unmappable
        mapping = {"mlp.0.weight": first, "mlp.0.bias": first_bias, "mlp.2.weight": second_weight, "mlp.2.bias": (scalars or [None])[0]}
    expected = {"mlp.0.weight": (width, input_size), "mlp.0.bias": (width,), "mlp.2.weight": (1, width), "mlp.2.bias": (1,)}
    mapped = {}
    for ours, theirs in mapping.items():
        if theirs is None:
            if ours == "mlp.0.weight" or ours == "mlp.2.weight":
                raise unmappable
            mapped[ours] = torch.zeros(expected[ours])
        elif state[theirs].numel() != torch.Size(expected[ours]).numel():
            raise unmappable
        else:
            mapped[ours] = state[theirs].reshape(expected[ours])
    return mapped, {ours: theirs for ours, theirs in mapping.items() if theirs is not None}


def _adapter_config(folder: Path, adapter: str) -> dict:
    path = folder / adapter / "adapter_config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise TWNError(f"release '{folder}': {adapter}/adapter_config.json is unreadable ({_first_line(error)})") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise TWNError(f"release '{folder}': the {adapter} adapter is {config['peft_type']}, not LoRA")
    return config


def _release_manifest(folder: Path, model: TWNModel, gate_keys: dict[str, str]) -> dict:
    """A twn checkpoint manifest for a release: what later stages, reports and caches read of one."""
    from twn_cli.engine.checkpoint import _sha256, describe_model

    files = sorted(path for path in folder.rglob("*") if path.is_file() and not path.name.startswith("."))
    return {
        **describe_model(model),
        "stages": [],
        "release": {"format": RELEASE_FORMAT, "source": str(folder.resolve()), "gate_keys": gate_keys},
        "gate": {"source": "release"},
        "saved": None,
        "files": {path.relative_to(folder).as_posix(): _sha256(path) for path in files},
    }


def _listing(tensors: dict[str, torch.Tensor]) -> str:
    return ", ".join(f"{name} {list(tensor.shape)}" for name, tensor in tensors.items()) or "nothing"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
