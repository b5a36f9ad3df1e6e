"""train-embed throughput and peak memory against the global batch, with and without the gradient cache.

    python benchmarks/train_embed_memory.py --batch-sizes 16 32 64 --chunks none full 8 -o train_memory.json   # toy, CPU
    python benchmarks/train_embed_memory.py --backbone Qwen/Qwen2-VL-2B-Instruct --device cuda --dtype bfloat16 \\
        --attn-implementation sdpa --data data/mmeb-train --split train --batch-sizes 256 1024 --chunks none 32 \\
        --lora-rank 32 --num-queries 8 --max-think-tokens 256 -o train_memory.json                         # GPU

Each configuration (global batch x chunk) runs in a fresh Python process: it builds a fresh TWN model on the
backbone, does one warm-up step and `--steps` timed steps of `EmbedTrainer` (SFT + InfoNCE on both views, one
hard negative per query), and reports samples/s and peak memory over the warm-up and timed steps: on a GPU
`torch.cuda.max_memory_allocated` (absolute, weights included); on a CPU the peak resident set, reset before
the steps through /proc/self/clear_refs, and the part of it above what the process held before them.

Chunks: `none` is a plain step without gradient cache (one forward with gradients over the whole batch, then
backward: the baseline the cache is measured against); `full` is the engine's gradient cache with one chunk
(chunk size = batch, which still pays the cache's extra no-gradient pass); a number is the cache's chunk size.
A configuration that runs out of memory is reported as such. Inputs: the train split of a prepared dataset
(`--data`), by default a toy world written here (`--toy-queries`).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

import _common as common


# --------------------------------------------------------------------------------------------- one configuration
def plain_step(trainer) -> dict:
    """One update without the gradient cache: forward with gradients over the whole batch, losses, backward.

    The same losses as `EmbedTrainer.step` (SFT backpropagated while the reasoning adapter is active, then
    InfoNCE while the embedding adapter is), built from the trainer's own pieces.
    """
    from twn_cli.stages.train_embed import contrastive_loss

    config, model = trainer.config, trainer.model
    examples = trainer.data.examples(trainer.data.batch_indices(trainer.step_done, config.batch_size), trainer.step_done)
    model.train()
    trainer.optimizer.zero_grad(set_to_none=True)
    cot_ids = model.prompts.cot_token_ids([example.cot or "" for example in examples])
    cot_ids = [ids if example.cot else None for ids, example in zip(cot_ids, examples)]
    sft_tokens = sum(len(ids) + len(model.prompts.think_end_ids) for ids in cot_ids if ids is not None)

    def sft_backward(forced) -> None:
        if config.sft_weight and forced.sft_tokens:
            (config.sft_weight * forced.sft_loss_sum / sft_tokens).backward()

    outputs = trainer._forward_chunk(examples, cot_ids, range(len(examples)), sft_backward)
    candidate_ids = [e.target_id for e in examples] + [c for e in examples for c in e.negative_ids]
    loss = contrastive_loss(outputs["think"], outputs["no_think"], outputs["targets"], outputs["negatives"],
                            candidate_ids=candidate_ids, positive_ids=[e.positive_ids for e in examples], config=config)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(list(trainer.parameters.values()), config.max_grad_norm)
    trainer.optimizer.step()
    trainer.schedule.step()
    trainer.step_done += 1
    model.eval()
    return {"contrastive_loss": loss.item()}


def measure(settings: dict) -> dict:
    """Build a fresh model on the backbone and measure one configuration (see `train_and_measure`)."""
    from twn_cli.data.prepared import load_prepared
    from twn_cli.engine.backbone import load_backbone
    from twn_cli.engine.config import TWNConfig
    from twn_cli.engine.model import TWNModel

    torch.manual_seed(0)
    backbone = load_backbone(settings["backbone"], dtype=settings["dtype"], device=settings["device"],
                             attn_implementation=settings.get("attn_implementation"))
    # Gradient checkpointing works under reasoning-prefill only (a checkpointed prefill keeps no KV cache).
    interface = "reasoning-prefill" if settings.get("gradient_checkpointing") else TWNConfig.interface
    config = TWNConfig(lora_rank=settings["lora_rank"], lora_alpha=2 * settings["lora_rank"], interface=interface,
                       num_queries=settings["num_queries"], max_think_tokens=settings["max_think_tokens"])
    model = TWNModel(backbone, config)
    result = train_and_measure(
        model, load_prepared(settings["data"]), batch_size=settings["batch_size"], chunk=settings["chunk"],
        steps=settings["steps"], split=settings["split"], device=settings["device"],
        gradient_checkpointing=settings.get("gradient_checkpointing", False),
    )
    return {**result, "backbone_parameters": backbone.parameter_count()}


def train_and_measure(model, dataset, *, batch_size: int, chunk, steps: int, split: str, device,
                      gradient_checkpointing: bool = False) -> dict:
    """One warm-up step and `steps` timed steps of train-embed on `model`; times and peak memory over all of them.

    `chunk`: "none" (no gradient cache, `plain_step`), "full" (the cache with one chunk) or a chunk size.
    """
    from twn_cli.data.training_data import TrainingData
    from twn_cli.stages.train_embed import EmbedTrainer, TrainEmbedConfig

    config = TrainEmbedConfig(
        batch_size=batch_size, chunk_size=batch_size if chunk in ("none", "full") else int(chunk), steps=steps + 1,
        warmup_steps=1, learning_rate=1e-4, gradient_checkpointing=gradient_checkpointing, split=split,
        validation_queries=0,
    )
    trainer = EmbedTrainer(model, TrainingData(dataset, split, config.hard_negatives, config.seed), config)
    step = (lambda: plain_step(trainer)) if chunk == "none" else trainer.step
    result = {"batch_size": batch_size, "chunk": chunk}
    try:
        with common.PeakMemory(device) as peak:
            step()  # warm-up: allocates the optimiser's state; inside the peak, outside the timing
            seconds = [common.timed(step, device) for _ in range(steps)]
    except torch.OutOfMemoryError:
        return {**result, "error": "out of memory"}
    finally:
        if gradient_checkpointing:
            model.backbone.model.activation_checkpointing_disable()
        model.eval()
    middle = common.median(seconds)
    return {
        **result,
        "seconds_per_step": round(middle, 4),
        "seconds_each_step": [round(value, 4) for value in seconds],
        "samples_per_second": round(batch_size / middle, 2),
        "peak_mib": common.mib(peak.peak_bytes),
        "peak_above_start_mib": common.mib(peak.extra_bytes),
        "memory_method": peak.method,
    }


# --------------------------------------------------------------------------------------------- the sweep
def run(arguments) -> dict:
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        if arguments.backbone:
            backbone = arguments.backbone
        else:
            backbone = str(common.toy_backbone_dir(work))
        data = arguments.data
        if not data:
            from twn_cli.toyworld.dataset import write_synthetic_dataset

            data = str(work / "toy-data")
            write_synthetic_dataset(data, n=arguments.toy_queries, seed=0)
        configurations = []
        for batch in arguments.batch_sizes:
            for chunk in arguments.chunks:
                if chunk not in ("none", "full") and int(chunk) >= batch:
                    continue  # the same as `full`
                settings = {
                    "backbone": backbone, "data": data, "split": arguments.split if arguments.data else "train",
                    "batch_size": batch, "chunk": chunk, "steps": arguments.steps, "device": arguments.device,
                    "dtype": arguments.dtype, "attn_implementation": arguments.attn_implementation,
                    "lora_rank": arguments.lora_rank, "num_queries": arguments.num_queries,
                    "max_think_tokens": arguments.max_think_tokens,
                    "gradient_checkpointing": arguments.gradient_checkpointing,
                }
                if arguments.in_process:
                    result = measure(settings)
                else:
                    result = common.run_worker(__file__, settings, timeout=arguments.timeout)
                    result.setdefault("batch_size", batch)
                    result.setdefault("chunk", chunk)
                print(f"  batch {batch}, chunk {chunk}: {result.get('samples_per_second', result.get('error'))}", file=sys.stderr)
                configurations.append(result)
    return {
        "benchmark": "train_embed_memory",
        "command": " ".join(sys.argv),
        "backbone": arguments.backbone or "toy backbone (toy recipe size, built here)",
        "data": arguments.data or f"toy world of {arguments.toy_queries} queries (written here)",
        "steps_timed": arguments.steps,
        "lora_rank": arguments.lora_rank,
        "num_queries": arguments.num_queries,
        "hard_negatives": 1,
        "gradient_checkpointing": arguments.gradient_checkpointing,
        "configurations": configurations,
        "machine": common.machine_info(arguments.device),
    }


def report(figures: dict) -> None:
    rows = []
    for item in figures["configurations"]:
        if "error" in item:
            rows.append((f"batch {item['batch_size']}, chunk {item['chunk']}", item["error"][:60], None, None, None))
            continue
        rows.append((f"batch {item['batch_size']}, chunk {item['chunk']}", item["seconds_per_step"],
                     item["samples_per_second"], item["peak_mib"], item["peak_above_start_mib"]))
    common.print_table(["configuration", "s/step", "samples/s", "peak MiB", "above start MiB"], rows)
    method = next((item["memory_method"] for item in figures["configurations"] if "memory_method" in item), "")
    print(f"memory: {method}; chunk none = no gradient cache, full = cache with one chunk")


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_arguments(parser, max_think_tokens=48)
    parser.add_argument("--data", help="a prepared dataset (default: a toy world written here)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--toy-queries", type=int, default=200, help="size of the toy world written when no --data")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--chunks", nargs="+", default=["none", "full", "8"],
                        help="'none' (no gradient cache), 'full' (one chunk), or chunk sizes")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per configuration (after one warm-up)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--in-process", action="store_true",
                        help="measure every configuration in this process (faster; CPU peak memory less clean)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per configuration")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("-o", "--output", help="write the figures as JSON here too")
    arguments = parser.parse_args(argv)
    if arguments.checkpoint:
        parser.error("--checkpoint is not used here: train-embed starts from a backbone (--backbone)")
    return arguments


def main(argv=None) -> dict | None:
    return common.measuring_main(parse(argv), measure, run, report)


if __name__ == "__main__":
    main()
