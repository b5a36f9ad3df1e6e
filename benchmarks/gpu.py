"""One short GPU run (well under 8 minutes on an H100/H200), nothing downloaded: real-size backbones with random weights.

    python benchmarks/gpu.py -o gpu.json                      # on the GPU machine (bf16, SDPA)
    python benchmarks/gpu.py --tiny -o gpu_tiny.json          # the same code on the CPU, toy-sized configs, < 1 min

Qwen2-VL-2B-shaped and Qwen3-VL-4B-shaped models are built from their published config.json (written below),
with random bf16 weights on the GPU, SDPA attention, a locally trained toy tokenizer (token ids are all that
matter for cost; the vocabulary and LM head keep their real size) and the Qwen image processor at the
backbone's patch size with every picture resized to 448 x 448 (256 image tokens for Qwen2-VL, 196 for
Qwen3-VL). Measured, in this order, each section saved to the JSON as soon as it ends:

- the card: bf16 matmul rate (8192^3 matmuls) and memory bandwidth (a 2 GiB device-to-device copy);
- per backbone: prefill tokens/s and model FLOP utilisation (2 x linear parameters x tokens + causal
  attention 2 x 2 x layers x batch x len^2 x heads x head_dim / 2) against the measured matmul rate and
  the card's spec; decode step time at batch 32 with `generate` (dynamic cache) against the bound
  bytes read per step (weights incl. LM head + KV cache) / measured bandwidth; TWN embed inputs/s with
  think never vs always (CoT of fixed length, `TWNModel` on that backbone, LoRA and queries of the
  backbone's recipe) and the engine's own decode step derived from them; a train-embed step (gradient
  cache, chunk 32) time and peak memory at two global batch sizes; last, if time is left, decode with a
  static cache + torch.compile (`generate(cache_implementation="static")`, which compiles on CUDA).

A section that fails is recorded with its error and the run goes on. No section starts that would, by its
own estimate, end after `--budget-s` seconds (default 330; the static-cache compile counts `--compile-s`);
one still running at `--hard-limit-s` (default 450) is interrupted. So the run ends within about 7.5 minutes
whatever happens, and the JSON holds every section that finished.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import _common as common

# Published config.json of Qwen/Qwen2-VL-2B-Instruct (token ids are replaced by the toy tokenizer's).
QWEN2_VL_2B = {
    "architectures": ["Qwen2VLForConditionalGeneration"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "hidden_act": "silu",
    "hidden_size": 1536,
    "initializer_range": 0.02,
    "intermediate_size": 8960,
    "max_position_embeddings": 32768,
    "max_window_layers": 28,
    "model_type": "qwen2_vl",
    "num_attention_heads": 12,
    "num_hidden_layers": 28,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_sliding_window": False,
    "vision_config": {
        "depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3, "hidden_size": 1536,
        "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
    },
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vocab_size": 151936,
}

# Published config.json of Qwen/Qwen3-VL-4B-Instruct.
QWEN3_VL_4B = {
    "architectures": ["Qwen3VLForConditionalGeneration"],
    "image_token_id": 151655,
    "model_type": "qwen3_vl",
    "text_config": {
        "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643, "dtype": "bfloat16",
        "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 2560, "initializer_range": 0.02,
        "intermediate_size": 9728, "max_position_embeddings": 262144, "model_type": "qwen3_vl_text",
        "num_attention_heads": 32, "num_hidden_layers": 36, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
        "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"},
        "rope_theta": 5000000, "tie_word_embeddings": True, "use_cache": True, "vocab_size": 151936,
    },
    "tie_word_embeddings": True,
    "video_token_id": 151656,
    "vision_config": {
        "deepstack_visual_indexes": [5, 11, 17], "depth": 24, "hidden_act": "gelu_pytorch_tanh", "hidden_size": 1024,
        "in_channels": 3, "initializer_range": 0.02, "intermediate_size": 4096, "model_type": "qwen3_vl",
        "num_heads": 16, "num_position_embeddings": 2304, "out_hidden_size": 2560, "patch_size": 16,
        "spatial_merge_size": 2, "temporal_patch_size": 2,
    },
    "vision_end_token_id": 151653,
    "vision_start_token_id": 151652,
}

# --tiny: the same configs shrunk to toy size (same architecture, same code path).
TINY_QWEN2_VL = {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_window_layers": 2, "vocab_size": 2048, "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
    "vision_config": {"depth": 1, "embed_dim": 32, "num_heads": 2, "hidden_size": 64},
}
TINY_QWEN3_VL = {
    "text_config": {
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 2048,
        "rope_scaling": {"mrope_interleaved": True, "mrope_section": [4, 2, 2], "rope_type": "default"},
    },
    "vision_config": {"depth": 2, "hidden_size": 32, "num_heads": 2, "intermediate_size": 64, "out_hidden_size": 64,
                      "deepstack_visual_indexes": [0, 1], "num_position_embeddings": 64},
}

BACKBONES = {
    # name: (published config, tiny overrides, LoRA rank and queries of its recipe)
    "qwen2-vl-2b": (QWEN2_VL_2B, TINY_QWEN2_VL, 32, 8),
    "qwen3-vl-4b": (QWEN3_VL_4B, TINY_QWEN3_VL, 40, 8),
}

# Dense bf16 tensor-core peaks from the spec sheets (FLOP/s) and memory bandwidth (bytes/s), by device name.
SPEC = [
    ("H200", 989e12, 4.8e12),
    ("H100 PCIe", 756e12, 2.0e12),
    ("H100 NVL", 835e12, 3.9e12),
    ("H100", 989e12, 3.35e12),  # SXM
    ("A100", 312e12, 2.0e12),
]


@dataclass
class Sizes:
    matmul_n: int = 8192
    matmul_iters: int = 20
    copy_bytes: int = 2 * 2**30
    copy_iters: int = 20
    prefill_shapes: tuple = ((8, 2048), (32, 512))
    prefill_repeats: int = 3
    decode_batch: int = 32
    decode_prompt: int = 256
    decode_steps: tuple = (16, 80)
    embed_inputs: int = 128
    embed_batch: int = 32
    think_tokens: int = 64
    image_side: int = 448
    embed_repeats: int = 2
    train_queries: int = 300
    train_batches: tuple = (32, 128)
    train_chunk: int = 32
    train_steps: int = 1
    tiny: bool = False


TINY = Sizes(
    matmul_n=256, matmul_iters=3, copy_bytes=16 * 2**20, copy_iters=3, prefill_shapes=((2, 32),), prefill_repeats=2,
    decode_batch=4, decode_prompt=16, decode_steps=(2, 6), embed_inputs=8, embed_batch=4, think_tokens=4,
    image_side=56, embed_repeats=1, train_queries=40, train_batches=(4, 8), train_chunk=4, train_steps=1, tiny=True,
)


def merge(base: dict, overrides: dict) -> dict:
    """`base` with `overrides` applied, nested dicts key by key (a rope_scaling dict is replaced whole)."""
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        nested = isinstance(value, dict) and isinstance(merged.get(key), dict) and key != "rope_scaling"
        merged[key] = merge(merged[key], value) if nested else value
    return merged


# --------------------------------------------------------------------------------------------- the run
class Run:
    """The figures of this run, saved after every section; a section that fails is recorded and the run goes on.

    No section starts once `budget_s` seconds (less the section's own estimate `needs_s`) have passed; a
    section still running at `hard_limit_s` is interrupted (SIGALRM) and recorded as timed out.
    """

    def __init__(self, output: str | None, budget_s: float, hard_limit_s: float):
        self.started = time.perf_counter()
        self.output = output
        self.budget_s = budget_s
        self.hard_limit_s = hard_limit_s
        self.figures: dict = {"benchmark": "gpu", "command": " ".join(sys.argv), "sections": {}, "errors": {}, "skipped": []}

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def section(self, name: str, function, needs_s: float = 0.0, summary=None):
        """Run `function()` as section `name` if time allows; its result (or `summary(result)`) goes into the figures."""
        if self.elapsed() + needs_s > self.budget_s or self.elapsed() + 1 >= self.hard_limit_s:
            self.figures["skipped"].append(name)
            print(f"[{self.elapsed():6.1f} s] {name}: skipped (time budget)", file=sys.stderr)
            return None
        print(f"[{self.elapsed():6.1f} s] {name} ...", file=sys.stderr)
        began = time.perf_counter()
        alarm = hasattr(signal, "setitimer")
        if alarm:
            signal.signal(signal.SIGALRM, _out_of_time)
            signal.setitimer(signal.ITIMER_REAL, max(1.0, self.hard_limit_s - self.elapsed()))
        try:
            result = function()
        except Exception as error:  # noqa: BLE001 - one failing section must not lose the others
            self.figures["errors"][name] = f"{type(error).__name__}: {error}"[:2000]
            traceback.print_exc()
            result = None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        else:
            self.figures["sections"][name] = summary(result) if summary else result
        finally:
            if alarm:
                signal.setitimer(signal.ITIMER_REAL, 0)
        self.figures.setdefault("section_seconds", {})[name] = round(time.perf_counter() - began, 1)
        self.save()
        return result

    def save(self) -> None:
        if self.output:
            self.figures["elapsed_s"] = round(self.elapsed(), 1)
            Path(self.output).parent.mkdir(parents=True, exist_ok=True)
            Path(self.output).write_text(json.dumps(self.figures, indent=2, default=str) + "\n")


def _out_of_time(signum, frame):
    raise TimeoutError("hard time limit reached (--hard-limit-s)")


# --------------------------------------------------------------------------------------------- the card
def spec_of(device) -> tuple[str, float | None, float | None]:
    if torch.device(device).type != "cuda":
        return "cpu", None, None
    name = torch.cuda.get_device_name(device)
    for key, flops, bandwidth in SPEC:
        if key in name:
            return name, flops, bandwidth
    return name, None, None


def card_rates(device, dtype, sizes: Sizes) -> dict:
    n = sizes.matmul_n
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty_like(a)

    def matmuls(count):
        for _ in range(count):
            torch.matmul(a, b, out=c)

    matmuls(3)  # warm-up
    seconds = common.timed(lambda: matmuls(sizes.matmul_iters), device)
    matmul = 2 * n**3 * sizes.matmul_iters / seconds
    source = torch.empty(sizes.copy_bytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)

    def copies(count):
        for _ in range(count):
            target.copy_(source)

    copies(2)  # warm-up
    seconds = common.timed(lambda: copies(sizes.copy_iters), device)
    bandwidth = 2 * sizes.copy_bytes * sizes.copy_iters / seconds  # each copy reads and writes every byte
    name, spec_flops, spec_bandwidth = spec_of(device)
    return {
        "device_name": name,
        "matmul_tflops": round(matmul / 1e12, 2),
        "matmul_shape": [n, n, n],
        "matmul_dtype": str(dtype).replace("torch.", ""),
        "bandwidth_gb_s": round(bandwidth / 1e9, 1),
        "copy_gib": round(sizes.copy_bytes / 2**30, 3),
        "spec_tflops": spec_flops and spec_flops / 1e12,
        "spec_bandwidth_gb_s": spec_bandwidth and spec_bandwidth / 1e9,
        "matmul_share_of_spec": spec_flops and round(matmul / spec_flops, 3),
        "bandwidth_share_of_spec": spec_bandwidth and round(bandwidth / spec_bandwidth, 3),
    }


# --------------------------------------------------------------------------------------------- the backbone
def build_backbone(name: str, sizes: Sizes, tokenizer, device, dtype, attn: str):
    """A `Backbone` with random weights of the published shape (toy-shrunk in --tiny) and a toy tokenizer."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen3VLConfig, Qwen3VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from twn_cli.engine.backbone import Backbone, config_fingerprint
    from twn_cli.engine.processors import qwen_processor_classes
    from twn_cli.toyworld.backbone import CHAT_TEMPLATE

    published, tiny, _, _ = BACKBONES[name]
    values = merge(published, tiny) if sizes.tiny else copy.deepcopy(published)
    token = tokenizer.convert_tokens_to_ids
    ids = {"image_token_id": token("<|image_pad|>"), "video_token_id": token("<|video_pad|>"),
           "vision_start_token_id": token("<|vision_start|>"), "vision_end_token_id": token("<|vision_end|>")}
    special = {"eos_token_id": token("<|im_end|>"), "pad_token_id": token("<|endoftext|>"), "bos_token_id": None}
    values.update(ids)
    values.pop("vision_token_id", None)
    if "text_config" in values:
        values["text_config"].update(special)
        config_class, model_class = Qwen3VLConfig, Qwen3VLForConditionalGeneration
    else:
        values.update(special)
        config_class, model_class = Qwen2VLConfig, Qwen2VLForConditionalGeneration
    config = config_class(**values)
    torch.manual_seed(0)
    with torch.device(device):
        model = model_class._from_config(config, dtype=dtype, attn_implementation=attn)
    model.to(device)  # in case the default-device context was not honoured
    model.requires_grad_(False)
    model.eval()
    vision = config.vision_config
    processing = dict(patch_size=vision.patch_size, merge_size=vision.spatial_merge_size, temporal_patch_size=vision.temporal_patch_size,
                      min_pixels=sizes.image_side**2, max_pixels=sizes.image_side**2)
    processor_class, video_processor_class = qwen_processor_classes(config.model_type)
    processor = processor_class(image_processor=Qwen2VLImageProcessorPil(**processing), tokenizer=tokenizer,
                                video_processor=video_processor_class(**processing), chat_template=CHAT_TEMPLATE)
    return Backbone(model=model, processor=processor, source=f"random-weights {name}{' (tiny)' if sizes.tiny else ''}",
                    fingerprint=config_fingerprint(config))


def parameter_counts(model) -> dict:
    text = model.config.get_text_config(decoder=True)
    language = model.model.language_model
    embedding = language.embed_tokens.weight.numel()
    language_total = sum(p.numel() for p in language.parameters())
    return {
        "total": sum(p.numel() for p in model.parameters()),
        "language_model": language_total,
        "embedding_table": embedding,
        "language_linear": language_total - embedding,  # decoder layers (norms are a rounding error)
        "vision": sum(p.numel() for p in model.model.visual.parameters()),
        "lm_head_tied": model.config.tie_word_embeddings,
        "layers": text.num_hidden_layers, "hidden": text.hidden_size, "heads": text.num_attention_heads,
        "kv_heads": text.num_key_value_heads, "head_dim": getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
        "vocab": text.vocab_size,
    }


def random_text(batch: int, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids from the byte range of the tokenizer: never a special or image token."""
    generator = torch.Generator().manual_seed(batch * 100_003 + length)
    ids = torch.randint(3, 256, (batch, length), generator=generator).to(device)
    return ids, torch.ones_like(ids)


# --------------------------------------------------------------------------------------------- measurements
def prefill(model, counts: dict, card: dict | None, sizes: Sizes, device) -> dict:
    rows = []
    peak_flops = (card or {}).get("spec_tflops")
    for batch, length in sizes.prefill_shapes:
        ids, mask = random_text(batch, length, device)

        def forward():
            with torch.no_grad():
                model.model(input_ids=ids, attention_mask=mask, use_cache=False)

        forward()
        seconds = common.median(common.timed(forward, device) for _ in range(sizes.prefill_repeats))
        tokens = batch * length
        linear = 2 * counts["language_linear"] * tokens
        attention = 2 * 2 * counts["layers"] * batch * length**2 * counts["heads"] * counts["head_dim"] / 2
        flops = (linear + attention) / seconds
        rows.append({
            "batch": batch, "length": length, "seconds": round(seconds, 4), "tokens_per_second": round(tokens / seconds),
            "tflops": round(flops / 1e12, 2), "attention_share_of_flops": round(attention / (linear + attention), 3),
            "mfu_vs_spec": peak_flops and round(flops / (peak_flops * 1e12), 3),
            "mfu_vs_measured_matmul": card and round(flops / (card["matmul_tflops"] * 1e12), 3),
        })
    return {"text_only": True, "rows": rows}


def decode(model, counts: dict, card: dict | None, sizes: Sizes, device, tokenizer, static: bool) -> dict:
    """Per-step decode time at batch `decode_batch` from two `generate` lengths (the prefill cancels out)."""
    batch, prompt = sizes.decode_batch, sizes.decode_prompt
    short, long = sizes.decode_steps
    ids, mask = random_text(batch, prompt, device)
    options = dict(do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
    if static:
        options.update(cache_implementation="static", max_cache_len=prompt + long + 8)

    def generate(steps):
        with torch.no_grad():
            output = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps, **options)
        assert output.shape[1] == prompt + steps, output.shape

    began = time.perf_counter()
    generate(short)
    generate(long)  # warm-up (and compilation, with a static cache on CUDA)
    first_calls = time.perf_counter() - began
    short_s = common.median(common.timed(lambda: generate(short), device) for _ in range(2))
    long_s = common.median(common.timed(lambda: generate(long), device) for _ in range(2))
    step = (long_s - short_s) / (long - short)
    result = {"batch": batch, "prompt": prompt, "steps": [short, long], "seconds": [round(short_s, 4), round(long_s, 4)],
              "step_ms": round(1000 * step, 3), "tokens_per_second": round(batch / step),
              "warmup_seconds": round(first_calls, 1), "cache": "static" if static else "dynamic"}
    if static:
        result["compiled"] = torch.device(device).type == "cuda"
    result.update(decode_bound(counts, card, batch, prompt + (short + long) // 2, step))
    return result


def decode_bound(counts: dict, card: dict | None, batch: int, context: int, step_s: float) -> dict:
    """Bytes one decode step must read (weights incl. LM head, KV cache) over the measured bandwidth."""
    if not card:
        return {}
    weights = 2 * (counts["language_linear"] + counts["embedding_table"])  # bf16; the tied LM head reads the table
    kv = 2 * 2 * counts["layers"] * counts["kv_heads"] * counts["head_dim"] * batch * context  # K and V, bf16
    bound = (weights + kv) / (card["bandwidth_gb_s"] * 1e9)
    return {"bytes_per_step_mib": common.mib(weights + kv), "context": context, "bound_ms": round(1000 * bound, 3),
            "step_over_bound": round(step_s / bound, 2)}


def twn_model(backbone, name: str, sizes: Sizes):
    from twn_cli.engine.config import TWNConfig
    from twn_cli.engine.model import TWNModel

    _, _, rank, queries = BACKBONES[name]
    if sizes.tiny:
        rank, queries = 4, 2
    return TWNModel(backbone, TWNConfig(lora_rank=rank, lora_alpha=2 * rank, num_queries=queries, max_think_tokens=sizes.think_tokens))


def embed(model, sizes: Sizes, device, hf_decode: dict | None) -> dict:
    inputs = common.toy_inputs(sizes.embed_inputs, image_size=sizes.image_side)
    batches = common.batched(inputs, sizes.embed_batch)
    tokens: dict[str, int] = {}

    def over(mode, selected):
        tokens[mode] = sum(sum(model.embed(batch, think=mode).reasoning_tokens) for batch in selected)

    with common.fixed_length_thoughts(model):
        for mode in ("never", "always"):
            over(mode, batches[:1])
        seconds = common.interleaved({mode: (lambda m=mode: over(m, batches)) for mode in ("never", "always")},
                                     sizes.embed_repeats, device, warmup=False)
    never, always = common.median(seconds["never"]), common.median(seconds["always"])
    n = len(inputs)
    forwards = len(batches) * (sizes.think_tokens + 2)  # start marker, the CoT, end marker: one forward each
    engine_step = (always - never) / forwards
    result = {
        "inputs": n, "batch": sizes.embed_batch, "image_tokens_per_input": None, "cot_tokens": sizes.think_tokens,
        "never_seconds": round(never, 4), "always_seconds": round(always, 4),
        "never_inputs_per_second": round(n / never, 2), "always_inputs_per_second": round(n / always, 2),
        "always_over_never": round(always / never, 2),
        "reasoning_tokens_per_input": round(tokens["always"] / n, 2),
        "engine_decode_step_ms": round(1000 * engine_step, 3),
        "lora_rank": model.config.lora_rank, "num_queries": model.config.num_queries,
    }
    encoded = model.prompts.encode(batches[0])
    result["prompt_tokens_per_input_first_batch"] = round(float(encoded["attention_mask"].sum()) / len(batches[0]), 1)
    if "image_grid_thw" in encoded:
        merge_size = model.backbone.processor.image_processor.merge_size
        image_tokens = int(encoded["image_grid_thw"].prod(-1).sum()) // merge_size**2
        result["image_tokens_per_input"] = round(image_tokens / len(batches[0]), 1)
    if hf_decode:
        result["engine_step_over_generate_step"] = round(engine_step * 1000 / hf_decode["step_ms"], 2)
    return result


def train(model, dataset, sizes: Sizes, device) -> dict:
    from train_embed_memory import train_and_measure

    rows = []
    for batch in sizes.train_batches:
        chunk = sizes.train_chunk if sizes.train_chunk < batch else "full"
        rows.append(train_and_measure(model, dataset, batch_size=batch, chunk=chunk, steps=sizes.train_steps,
                                      split="train", device=device))
        gc.collect()
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    return {"rows": rows, "hard_negatives": 1, "note": "peak = allocator peak over a warm-up and the timed step(s)"}


# --------------------------------------------------------------------------------------------- main
def toy_dataset(work: Path, sizes: Sizes):
    """The toy world as a prepared dataset (train-embed reads one); needs the `datasets` package."""
    from twn_cli.data.prepared import load_prepared
    from twn_cli.toyworld.dataset import write_synthetic_dataset

    write_synthetic_dataset(work / "data", n=sizes.train_queries, seed=0)
    return load_prepared(work / "data")


def run(arguments) -> dict:
    from twn_cli.toyworld.backbone import train_tokenizer

    sizes = TINY if arguments.tiny else Sizes()
    device = torch.device(arguments.device or ("cpu" if arguments.tiny else "cuda"))
    dtype = getattr(torch, arguments.dtype)
    run = Run(arguments.output, arguments.budget_s, arguments.hard_limit_s)
    run.figures.update({"sizes": asdict(sizes), "dtype": arguments.dtype, "attn_implementation": arguments.attn_implementation})
    run.figures["machine"] = common.machine_info(device)
    run.save()

    card = run.section("card", lambda: card_rates(device, dtype, sizes))
    if arguments.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(arguments.tokenizer)
    else:
        tokenizer = train_tokenizer(1024, seed=0)
    work = Path(tempfile.mkdtemp(prefix="twn-gpu-bench-"))
    dataset = run.section("toy_dataset", lambda: toy_dataset(work, sizes), summary=lambda data: {"train_queries": len(data.queries["train"])})
    scale = 0.05 if sizes.tiny else 1.0  # --tiny: the time estimates below shrink with the sizes

    def build(name):
        return build_backbone(name, sizes, tokenizer, device, dtype, arguments.attn_implementation)

    def release():
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    for name in arguments.backbones:
        backbone = run.section(f"{name}/build", lambda: build(name), needs_s=30 * scale,
                               summary=lambda built: parameter_counts(built.model))
        if backbone is None:
            continue
        counts = run.figures["sections"][f"{name}/build"]
        model = backbone.model
        run.section(f"{name}/prefill", lambda: prefill(model, counts, card, sizes, device), needs_s=10 * scale)
        hf_decode = run.section(f"{name}/decode_dynamic", lambda: decode(model, counts, card, sizes, device, tokenizer, static=False),
                                needs_s=20 * scale)
        twn = run.section(f"{name}/twn_model", lambda: twn_model(backbone, name, sizes), needs_s=60 * scale,
                          summary=lambda built: built.parameter_overhead())
        if twn is not None:
            run.section(f"{name}/embed", lambda: embed(twn, sizes, device, hf_decode), needs_s=40 * scale)
            if dataset is not None:
                run.section(f"{name}/train_embed", lambda: train(twn, dataset, sizes, device), needs_s=60 * scale)
        twn = model = backbone = None  # free this backbone before the next
        release()

    # Last, as compilation may take minutes: decode with a static cache (+ torch.compile on CUDA), model by model.
    if arguments.static_cache:
        for name in arguments.backbones:
            if f"{name}/build" not in run.figures["sections"]:
                continue
            counts = run.figures["sections"][f"{name}/build"]

            def static_decode():
                backbone = build(name)
                try:
                    return decode(backbone.model, counts, card, sizes, device, tokenizer, static=True)
                finally:
                    del backbone
                    release()

            run.section(f"{name}/decode_static_compiled", static_decode, needs_s=arguments.compile_s * scale)
    shutil.rmtree(work, ignore_errors=True)
    run.figures["machine"]["load_average_at_end"] = [round(value, 2) for value in os.getloadavg()]
    run.save()
    return run.figures


def report(figures: dict) -> None:
    sections = figures["sections"]
    card = sections.get("card")
    if card:
        print(f"{card['device_name']}: bf16 matmul {card['matmul_tflops']} TFLOP/s (spec {card['spec_tflops']}), "
              f"copy bandwidth {card['bandwidth_gb_s']} GB/s (spec {card['spec_bandwidth_gb_s']})")
    rows = []
    for name in BACKBONES:
        build = sections.get(f"{name}/build")
        if not build:
            continue
        rows.append((f"{name}: parameters", _count(build["total"]), f"LM linear {_count(build['language_linear'])}"))
        for row in (sections.get(f"{name}/prefill") or {}).get("rows", []):
            rows.append((f"  prefill {row['batch']} x {row['length']}", f"{row['tokens_per_second']} tok/s",
                         f"MFU {row['mfu_vs_spec']} (vs matmul {row['mfu_vs_measured_matmul']})"))
        for key in ("decode_dynamic", "decode_static_compiled"):
            item = sections.get(f"{name}/{key}")
            if item:
                rows.append((f"  decode b{item['batch']} {item['cache']}", f"{item['step_ms']} ms/step",
                             f"bound {item.get('bound_ms')} ms (x{item.get('step_over_bound')})"))
        item = sections.get(f"{name}/embed")
        if item:
            rows.append(("  embed never / always", f"{item['never_inputs_per_second']} / {item['always_inputs_per_second']} in/s",
                         f"engine step {item['engine_decode_step_ms']} ms, {item['cot_tokens']}-token CoTs"))
        for row in (sections.get(f"{name}/train_embed") or {}).get("rows", []):
            if "error" in row:
                rows.append((f"  train batch {row['batch_size']}", row["error"], ""))
            else:
                rows.append((f"  train batch {row['batch_size']} chunk {row['chunk']}", f"{row['seconds_per_step']} s/step",
                             f"peak {row['peak_mib']} MiB"))
    common.print_table(["measure", "value", "detail"], rows, first_width=34)
    for name, error in figures["errors"].items():
        print(f"ERROR in {name}: {error.splitlines()[0][:200]}")
    if figures["skipped"]:
        print(f"skipped (time budget): {', '.join(figures['skipped'])}")


def _count(number: int) -> str:
    return f"{number / 1e9:.3f} B" if number >= 1e9 else f"{number / 1e6:.2f} M"


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="toy-sized configs on the CPU: a smoke test of the same code")
    parser.add_argument("--device", help="default: cuda (cpu with --tiny)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--attn-implementation", default="sdpa")
    parser.add_argument("--tokenizer", help="a toy backbone dir whose tokenizer to use (default: train the toy tokenizer here, ~5 s)")
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=list(BACKBONES))
    parser.add_argument("--budget-s", type=float, default=330,
                        help="start no section that would (by its own estimate) end after this many seconds")
    parser.add_argument("--hard-limit-s", type=float, default=450, help="interrupt a section still running at this time")
    parser.add_argument("--no-static-cache", dest="static_cache", action="store_false",
                        help="leave out the static cache + torch.compile decode")
    parser.add_argument("--compile-s", type=float, default=150, help="seconds the static-cache compile section needs left")
    parser.add_argument("-o", "--output", help="write the figures as JSON here (after every section)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    arguments = parse(argv)
    figures = run(arguments)
    report(figures)
    return figures


if __name__ == "__main__":
    main()
