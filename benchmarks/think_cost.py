"""What thinking costs, and what the shared-prefill design saves: one loaded model, all modes side by side.

    python benchmarks/think_cost.py --n 128 --batch-size 16 --repeats 3 -o think_cost.json        # toy, CPU
    python benchmarks/think_cost.py --backbone Qwen/Qwen2-VL-2B-Instruct --device cuda --dtype bfloat16 \\
        --attn-implementation sdpa --n 512 --batch-size 32 --max-think-tokens 128 --image-size 448 \
        --lora-rank 32 --num-queries 8 -o think_cost.json                                           # GPU

Measures embedding time (inputs/s) and reasoning tokens per input over the same inputs in these modes:
- never, always, and adaptive at think rates r (the gate threshold set to the quantile of p_think that makes
  the think rate r, which works with any gate, trained or not). Target: adaptive takes at most 1.05 times
  r * always + (1 - r) * never (batching must not waste);
- always with `interface=reencode` (UME-R1-style: the embedding adapter re-encodes prompt + CoT + queries)
  against the shared prefill. Target: shared at least 1.3 times faster;
- never against a plain single-pass last-token embedder on the same backbone, adapter and inputs (VLM2Vec-style:
  one forward over the prompt with the embedding adapter, last token's final state, L2-normalised). Target:
  never takes at most 1.05 times the plain embedder's time (both batch the same inputs together);
- never with batches of like prompt length (as `embed_block` cuts them) against batches in input order: what
  sorting by length saves where text-only inputs and pictures are mixed.

Timing covers `TWNModel.embed` on inputs already in memory (prompt building, image processing, the model);
reading files is not timed. Modes are interleaved round by round (`--repeats` rounds, medians reported) after
one warm-up batch each, so a shared machine's slow phases hit every mode alike. By default every CoT runs to
`--max-think-tokens` (`--cot natural` lets the model stop), so all thinking inputs do equal work.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

import _common as common
from twn_cli.engine.batching import block_size, embed_block

ADAPTIVE_TARGET = 1.05  # adaptive time / (r * always + (1 - r) * never), at most
REENCODE_TARGET = 1.3  # reencode time / shared time, at least
PLAIN_TARGET = 1.05  # never time / plain embedder time, at most


@torch.no_grad()
def plain_embed(model, inputs) -> torch.Tensor:
    """A VLM2Vec-style embedder on the same backbone: one pass over the prompt with the embedding adapter,
    no KV cache kept, the last token's final hidden state L2-normalised (prompts are left-padded)."""
    encoded = model.prompts.encode(inputs)
    model.use_adapter("embedding")
    output = model.backbone.model.base_model(**encoded, use_cache=False)
    return F.normalize(output.last_hidden_state[:, -1].float(), dim=-1)


def threshold_for_rate(p_think: torch.Tensor, rate: float) -> float:
    """A threshold at which round(rate * n) of these inputs think (midway between neighbouring p_think)."""
    count = len(p_think)
    thinking = round(rate * count)
    ordered = p_think.sort(descending=True).values.tolist()
    if thinking <= 0:
        return ordered[0] + 1.0
    if thinking >= count:
        return ordered[-1]
    return (ordered[thinking - 1] + ordered[thinking]) / 2


def run(arguments) -> dict:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as work:
        model = common.load_model(arguments, Path(work))
    inputs = common.make_inputs(arguments, arguments.n)
    batches = common.batched(inputs, arguments.batch_size)
    device = model.device
    counts: dict[str, dict] = {}

    with common.fixed_length_thoughts(model, arguments.cot == "fixed"):
        p_think = torch.cat([model.think_probability(batch).float().cpu() for batch in batches])
        thresholds = {rate: threshold_for_rate(p_think, rate) for rate in arguments.rates}

        def embedding(name: str, think: str, threshold: float | None = None, interface: str = "shared", per_batch: bool = False):
            """Timed as `twn embed` runs: `embed_block` over blocks of `block_size` inputs (per_batch: blocks of
            one batch, as before embed_block: batches keep the inputs' order, and when the gate decides each batch
            decodes its own thinking rows)."""
            def over(selected):
                model.config.interface = interface
                tokens = thought = 0
                flat = [item for batch in selected for item in batch]
                size = arguments.batch_size if per_batch else block_size(arguments.batch_size)
                try:
                    for start in range(0, len(flat), size):
                        result = embed_block(model, flat[start : start + size], think, arguments.batch_size, threshold)
                        tokens += sum(result.reasoning_tokens)
                        thought += int(result.think.sum())
                finally:
                    model.config.interface = "shared"
                counts[name] = {"reasoning_tokens": tokens, "thought": thought, "inputs": sum(len(b) for b in selected)}

            return over

        def plain(selected):
            """Batched as `embed_block` batches: blocks of inputs sorted by prompt length."""
            flat = [item for batch in selected for item in batch]
            size = block_size(arguments.batch_size)
            for start in range(0, len(flat), size):
                for batch in common.batched(sorted(flat[start : start + size], key=model.prompts.prompt_length), arguments.batch_size):
                    plain_embed(model, batch)

        measured = {
            "never": embedding("never", "never"),
            # One batch per block: nothing to sort across batches, so batches keep the inputs' order.
            "never, batches in input order": embedding("never, batches in input order", "never", per_batch=True),
            "always": embedding("always", "always"),
        }
        for rate in arguments.rates:
            measured[f"adaptive r={rate:g}"] = embedding(f"adaptive r={rate:g}", "auto", thresholds[rate])
            name = f"adaptive r={rate:g}, per batch"
            measured[name] = embedding(name, "auto", thresholds[rate], per_batch=True)
        if not arguments.skip_reencode:
            measured["always, interface=reencode"] = embedding("always, interface=reencode", "always", interface="reencode")
        measured["plain last-token embedder"] = plain

        for function in measured.values():  # warm-up: one batch each
            function(batches[:1])
        seconds = common.interleaved({name: (lambda f=f: f(batches)) for name, f in measured.items()},
                                     arguments.repeats, device, warmup=False)

    n = len(inputs)
    modes = {}
    for name, values in seconds.items():
        middle = common.median(values)
        count = counts.get(name, {"reasoning_tokens": 0, "thought": 0})
        modes[name] = {
            "seconds": round(middle, 4),
            "seconds_each_round": [round(value, 4) for value in values],
            "inputs_per_second": round(n / middle, 2),
            "reasoning_tokens_per_input": round(count["reasoning_tokens"] / n, 2),
            "think_rate": round(count["thought"] / n, 4),
        }
    never, always = modes["never"]["seconds"], modes["always"]["seconds"]
    adaptive = []
    for rate in arguments.rates:
        mode = modes[f"adaptive r={rate:g}"]
        actual = mode["think_rate"]
        expected = actual * always + (1 - actual) * never
        ratio = mode["seconds"] / expected
        adaptive.append({
            "target_rate": rate, "think_rate": actual, "threshold": thresholds[rate], "seconds": mode["seconds"],
            "mix_seconds": round(expected, 4), "ratio_to_mix": round(ratio, 4),
            "per_batch_seconds": modes[f"adaptive r={rate:g}, per batch"]["seconds"],
            "per_batch_ratio_to_mix": round(modes[f"adaptive r={rate:g}, per batch"]["seconds"] / expected, 4),
            "target": f"<= {ADAPTIVE_TARGET}", "met": ratio <= ADAPTIVE_TARGET,
        })
    figures = {
        "benchmark": "think_cost",
        "command": " ".join(sys.argv),
        "inputs": n,
        "input_source": common.input_source(arguments),
        "batch_size": arguments.batch_size,
        "repeats": arguments.repeats,
        "cot_length": arguments.cot,
        "model": common.model_facts(model),
        "modes": modes,
        "adaptive": adaptive,
    }
    if not arguments.skip_reencode:
        reencode = modes["always, interface=reencode"]["seconds"]
        figures["interface"] = {
            "shared_seconds": always, "reencode_seconds": reencode, "reencode_over_shared": round(reencode / always, 4),
            "target": f">= {REENCODE_TARGET}", "met": reencode / always >= REENCODE_TARGET,
        }
    unsorted = modes["never, batches in input order"]["seconds"]
    figures["length_sorting"] = {"input_order_seconds": unsorted, "sorted_seconds": never, "input_order_over_sorted": round(unsorted / never, 4)}
    plain_seconds = modes["plain last-token embedder"]["seconds"]
    figures["plain"] = {
        "never_seconds": never, "plain_seconds": plain_seconds, "never_over_plain": round(never / plain_seconds, 4),
        "target": f"<= {PLAIN_TARGET}", "met": never / plain_seconds <= PLAIN_TARGET,
    }
    figures["machine"] = common.machine_info(device)
    return figures


def report(figures: dict) -> None:
    model = figures["model"]
    print(f"{figures['inputs']} inputs, batch {figures['batch_size']}, {figures['repeats']} rounds (medians), "
          f"CoT {figures['cot_length']} at most {model['max_think_tokens']} tokens; {model['backbone']} on {model['device']}")
    common.print_table(
        ["mode", "seconds", "inputs/s", "think rate", "tokens/input"],
        [(name, m["seconds"], m["inputs_per_second"], m["think_rate"], m["reasoning_tokens_per_input"])
         for name, m in figures["modes"].items()],
    )
    for item in figures["adaptive"]:
        print(f"adaptive at think rate {item['think_rate']:.2f}: {item['seconds']:.3f} s vs mix {item['mix_seconds']:.3f} s "
              f"-> ratio {common.verdict(item['ratio_to_mix'], ADAPTIVE_TARGET, at_most=True)} "
              f"(deciding per batch: {item['per_batch_ratio_to_mix']:.3f})")
    if "interface" in figures:
        item = figures["interface"]
        print(f"always: reencode / shared = {common.verdict(item['reencode_over_shared'], REENCODE_TARGET, at_most=False)}")
    print(f"never: batches in input order / batches sorted by prompt length = {figures['length_sorting']['input_order_over_sorted']:.3f}")
    item = figures["plain"]
    print(f"never / plain last-token embedder = {common.verdict(item['never_over_plain'], PLAIN_TARGET, at_most=True)}")


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_arguments(parser)
    common.add_input_arguments(parser)
    parser.add_argument("--n", type=int, default=128, help="number of inputs")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rates", type=float, nargs="+", default=[0.25, 0.5, 0.75], help="adaptive think rates")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; medians are reported")
    parser.add_argument("--cot", choices=["fixed", "natural"], default="fixed",
                        help="fixed: every CoT runs to --max-think-tokens; natural: the model may stop early")
    parser.add_argument("--skip-reencode", action="store_true", help="leave out the interface=reencode comparison")
    parser.add_argument("-o", "--output", help="write the figures as JSON here too")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    arguments = parse(argv)
    figures = run(arguments)
    report(figures)
    common.finish(figures, arguments.output)
    return figures


if __name__ == "__main__":
    main()
