"""What a downloaded Qwen-VL backbone costs: prompt tokens of a video record, and memory computed from parameter counts.

    python benchmarks/hub_backbones.py -o hub_backbones.json

Video tokens (measured): for each of Qwen2-VL, Qwen2.5-VL, Qwen3-VL and Qwen3-VL-MoE, a tiny random-weight
folder in the hub's layout with the processor settings its published checkpoints ship (only the pixel
budgets matter: token counts depend on the processor, not on the weights), and one video record of
`--frames` frames of `--frame-size` pixels, encoded by `TWNModel.encode` through the backbone's video path
and, as twn did before it had one, as that many separate images. Counted: the prompt's tokens and its
vision placeholders.

Memory (computed, not measured): parameters of the published Qwen2-VL-2B and Qwen3-VL-4B configs (built on
PyTorch's meta device: no weights, no memory), of TWN's two adapters at the backbone recipe's LoRA rank, the
queries and the gate; bytes of the frozen backbone in bfloat16 and of the trained parameters in float32
with their gradients and two Adam moments. Activations, the KV cache and the CUDA context are not counted.
For a Qwen3-VL-MoE backbone, the share of the language model's parameters the adapters cover (attention
only: its experts are fused tensors, see `twn_cli/engine/adapter_coverage.py`), computed from the Qwen3-30B-A3B
language model's published shape.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from gpu import QWEN2_VL_2B, QWEN3_VL_4B

import _common as common

# The pixel budgets of the published checkpoints' processors (Qwen2-VL's video ones are transformers'
# defaults for its video processor), which decide how many tokens a picture becomes.
PUBLISHED_PROCESSING = {
    "qwen2_vl": ({"min_pixels": 56 * 56, "max_pixels": 28 * 28 * 16384}, {"min_pixels": 128 * 28 * 28, "max_pixels": 768 * 28 * 28}),
    "qwen2_5_vl": ({"min_pixels": 56 * 56, "max_pixels": 28 * 28 * 16384}, {"min_pixels": 128 * 28 * 28, "max_pixels": 768 * 28 * 28}),
    "qwen3_vl": ({"size": {"shortest_edge": 65536, "longest_edge": 16777216}}, {"size": {"shortest_edge": 4096, "longest_edge": 25165824}}),
    "qwen3_vl_moe": ({"size": {"shortest_edge": 65536, "longest_edge": 16777216}}, {"size": {"shortest_edge": 4096, "longest_edge": 25165824}}),
}
# The LoRA rank of each backbone's recipe (recipes/<backbone>/train-embed.yaml), queries and gate width.
RECIPES = {"qwen2-vl-2b": (QWEN2_VL_2B, 32, 8, 1024), "qwen3-vl-4b": (QWEN3_VL_4B, 40, 8, 1280)}
# The language model of Qwen3-30B-A3B (and of Qwen3-VL-30B-A3B), as published.
QWEN3_30B_A3B_TEXT = {"hidden_size": 2048, "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4,
                      "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768,
                      "vocab_size": 151936}


def video_tokens(frames: int, frame_size: tuple[int, int], max_pixels: int | None, work_dir: Path) -> list[dict]:
    from PIL import Image

    from twn_cli.engine.config import TWNConfig
    from twn_cli.engine.factory import LoadOptions, load_model
    from twn_cli.toyworld.hub_backbones import ARCHITECTURES, write_hub_backbone
    from twn_cli.types import ModelInput, Video

    rows = []
    generator = torch.Generator().manual_seed(0)
    pictures = [Image.fromarray(torch.randint(0, 256, (*frame_size[::-1], 3), generator=generator, dtype=torch.uint8).numpy())
                for _ in range(frames)]
    for architecture in ARCHITECTURES:
        folder = write_hub_backbone(work_dir / architecture, architecture)
        image_settings, video_settings = PUBLISHED_PROCESSING[architecture]
        for name, settings in (("preprocessor_config.json", image_settings), ("video_preprocessor_config.json", video_settings)):
            written = json.loads((folder / name).read_text())
            for key in ("size", "min_pixels", "max_pixels"):
                written.pop(key, None)
            (folder / name).write_text(json.dumps({**written, **settings}))
        model = load_model(backbone=str(folder), config=TWNConfig(lora_rank=2), options=LoadOptions(device="cpu", max_pixels=max_pixels))
        config = model.backbone.model.config
        video = Video(frames=pictures, frame_indices=list(range(frames)), total_frames=frames, fps=1.0)
        counts = {}
        for path, item in (("video path", ModelInput(text="a video", video=video)), ("frames as images", ModelInput(text="a video", images=pictures))):
            ids = model.prompts.encode([item])["input_ids"][0]
            counts[path] = {"prompt_tokens": len(ids), "vision_tokens": int(((ids == config.video_token_id) | (ids == config.image_token_id)).sum())}
        rows.append({"architecture": architecture, **counts,
                     "ratio": counts["frames as images"]["vision_tokens"] / counts["video path"]["vision_tokens"]})
    return rows


def memory() -> dict:
    import transformers

    from twn_cli.engine.gate import RoutingGate

    result = {}
    for name, (published, rank, queries, gate_width) in RECIPES.items():
        config_class = transformers.Qwen3VLConfig if "text_config" in published else transformers.Qwen2VLConfig
        model_class = transformers.Qwen3VLForConditionalGeneration if "text_config" in published else transformers.Qwen2VLForConditionalGeneration
        with torch.device("meta"):
            model = model_class(config_class(**published))
        backbone = sum(parameter.numel() for parameter in model.parameters())
        vision = sum(parameter.numel() for parameter in model.model.visual.parameters())
        decoder = model.get_decoder()
        # One adapter: rank x (in + out) per linear layer of the language model, as twn targets them by default.
        adapter = sum(rank * (module.in_features + module.out_features) for module in decoder.modules() if isinstance(module, torch.nn.Linear))
        hidden = config_class(**published).get_text_config(decoder=True).hidden_size
        gate = sum(parameter.numel() for parameter in RoutingGate(hidden, gate_width).parameters())
        trained = 2 * adapter + queries * hidden + gate
        frozen_gib = 2 * backbone / 2**30
        result[name] = {
            "parameters": backbone, "vision_parameters": vision, "lora_rank": rank, "adapter_parameters": adapter,
            "trained_parameters": trained, "trained_percent": round(100 * trained / backbone, 2),
            "weights_bf16_gib": round(frozen_gib, 2),
            "inference_gib": round(frozen_gib + 4 * trained / 2**30, 2),
            # float32 trained weights, their gradients and Adam's two moments.
            "training_gib": round(frozen_gib + 16 * trained / 2**30, 2),
        }
    text = QWEN3_30B_A3B_TEXT
    layers, width, head_dim = text["num_hidden_layers"], text["hidden_size"], text["head_dim"]
    attention = layers * width * head_dim * (2 * text["num_attention_heads"] + 2 * text["num_key_value_heads"])
    experts = layers * text["num_experts"] * 3 * width * text["moe_intermediate_size"]
    router = layers * text["num_experts"] * width
    embeddings = 2 * text["vocab_size"] * width  # input embeddings and the untied output layer
    total = attention + experts + router + embeddings
    result["qwen3-vl-30b-a3b language model"] = {
        "parameters": total, "attention_percent": round(100 * attention / total, 2), "experts_percent": round(100 * experts / total, 2),
        "router_percent": round(100 * router / total, 2), "embeddings_percent": round(100 * embeddings / total, 2),
        "adapted_percent": round(100 * attention / total, 2),
    }
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=8, help="frames of the video record (MMEB-V2: 8)")
    parser.add_argument("--frame-size", type=int, nargs=2, default=(640, 360), metavar=("WIDTH", "HEIGHT"))
    parser.add_argument("--max-pixels", type=int, default=None, help="bound every image and frame (twn's --max-pixels)")
    parser.add_argument("--no-memory", action="store_true", help="count video tokens only")
    parser.add_argument("-o", "--output", help="write the figures as JSON")
    arguments = parser.parse_args(argv)
    figures = {"benchmark": "hub_backbones", "command": " ".join(sys.argv), "machine": common.machine_info("cpu"),
               "settings": {"frames": arguments.frames, "frame_size": list(arguments.frame_size), "max_pixels": arguments.max_pixels}}
    with tempfile.TemporaryDirectory() as work_dir:
        figures["video_tokens"] = video_tokens(arguments.frames, tuple(arguments.frame_size), arguments.max_pixels, Path(work_dir))
    print(f"one video record of {arguments.frames} frames of {arguments.frame_size[0]}x{arguments.frame_size[1]}: prompt tokens (vision tokens)")
    common.print_table(["backbone", "video path", "frames as images", "ratio"], [
        (row["architecture"], f"{row['video path']['prompt_tokens']} ({row['video path']['vision_tokens']})",
         f"{row['frames as images']['prompt_tokens']} ({row['frames as images']['vision_tokens']})", round(row["ratio"], 2))
        for row in figures["video_tokens"]])
    if not arguments.no_memory:
        figures["memory"] = memory()
        print("\nmemory on one GPU, computed from parameter counts (GiB; activations and KV cache not counted)")
        common.print_table(["backbone", "parameters", "trained", "bf16 weights", "inference", "training"], [
            (name, f"{row['parameters'] / 1e9:.2f} B", f"{row['trained_parameters'] / 1e6:.0f} M ({row['trained_percent']} %)",
             row["weights_bf16_gib"], row["inference_gib"], row["training_gib"])
            for name, row in figures["memory"].items() if "weights_bf16_gib" in row])
    common.finish(figures, arguments.output)
    return figures


if __name__ == "__main__":
    main()
