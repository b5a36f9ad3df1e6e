"""How costs grow: embedding time with the number of inputs, ranking time and memory with the candidate pool.

    python benchmarks/scaling.py --inputs 64 128 256 --pools 10000 100000 300000 -o scaling.json            # CPU
    python benchmarks/scaling.py --backbone Qwen/Qwen2-VL-2B-Instruct --device cuda --dtype bfloat16 \\
        --attn-implementation sdpa --inputs 256 512 1024 --batch-size 32 --pools 100000 1000000 3000000 \\
        --max-think-tokens 128 --image-size 448 -o scaling.json                                            # GPU

Embedding: the first N of the same inputs (toy-world queries unless `--data`) through one loaded model, in
each mode of `--modes`; the seconds per input should not grow with N. The N are interleaved round by round
(`--repeats`, medians), after one warm-up batch.

Ranking: `--queries` random unit vectors against pools of random unit vectors of `--dim` dimensions (default
1536, Qwen2-VL-2B's embedding size), through `rank_in_chunks`, the chunked exact ranking `twn eval` uses,
with its default chunk of 8192 candidates; one gold per query at a random position. Random vectors are the
worst case for it: a gold outside the top 10 is ranked in a second pass over the pool, which a good model
rarely needs. Each pool size runs in a fresh process (`--in-process` to skip that); memory is the peak above
what the process held with the pool already in memory (CPU: peak resident set; GPU: the allocator's peak, the
pool staying on the CPU as in `twn eval`). The time per query-candidate pair should stay flat.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

import _common as common


# --------------------------------------------------------------------------------------------- ranking
def measure_ranking(settings: dict) -> dict:
    """Rank random queries against a random pool of `settings['pool']` unit vectors; time and peak memory."""
    import torch.nn.functional as F

    from twn_cli.eval.metrics import rank_in_chunks

    generator = torch.Generator().manual_seed(settings.get("seed", 0))
    pool, queries, dim, device = settings["pool"], settings["queries"], settings["dim"], settings["device"]
    candidates = F.normalize(torch.randn(pool, dim, generator=generator), dim=-1)
    query_embeddings = F.normalize(torch.randn(queries, dim, generator=generator), dim=-1)
    golds = [{int(position): 1.0} for position in torch.randint(pool, (queries,), generator=generator)]
    arguments = dict(chunk_size=settings["chunk_size"], device=device)
    rank_in_chunks(query_embeddings[:2], candidates[: min(pool, settings["chunk_size"])], [{0: 1.0}, {0: 1.0}], **arguments)  # warm-up
    with common.PeakMemory(device) as peak:
        seconds = common.timed(lambda: rank_in_chunks(query_embeddings, candidates, golds, **arguments), device)
    return {
        "pool": pool,
        "queries": queries,
        "seconds": round(seconds, 4),
        "queries_per_second": round(queries / seconds, 2),
        "ns_per_query_candidate": round(1e9 * seconds / (queries * pool), 3),
        "pool_mib": common.mib(candidates.numel() * 4),
        "peak_above_start_mib": common.mib(peak.extra_bytes),
        "memory_method": peak.method,
    }


# --------------------------------------------------------------------------------------------- embedding
def embedding_scaling(arguments, work: Path) -> dict:
    model = common.load_model(arguments, work)
    largest = max(arguments.inputs)
    inputs = common.make_inputs(arguments, largest)
    device = model.device
    tokens: dict[str, int] = {}

    def embed(mode: str, count: int, limit: int | None = None):
        def run():
            batches = common.batched(inputs[:count], arguments.batch_size)[:limit]
            tokens[f"{mode} n={count}"] = sum(
                sum(model.embed(batch, think=mode).reasoning_tokens) for batch in batches
            )
        return run

    with common.fixed_length_thoughts(model):
        measured = {f"{mode} n={count}": embed(mode, count) for mode in arguments.modes for count in arguments.inputs}
        for mode in arguments.modes:
            embed(mode, arguments.batch_size, limit=1)()  # warm-up
        seconds = common.interleaved(measured, arguments.repeats, device, warmup=False)
    rows = []
    for mode in arguments.modes:
        for count in arguments.inputs:
            name = f"{mode} n={count}"
            middle = common.median(seconds[name])
            rows.append({
                "mode": mode, "inputs": count, "seconds": round(middle, 4),
                "seconds_each_round": [round(value, 4) for value in seconds[name]],
                "ms_per_input": round(1000 * middle / count, 3),
                "reasoning_tokens_per_input": round(tokens[name] / count, 2),
            })
    return {"model": common.model_facts(model), "input_source": common.input_source(arguments),
            "batch_size": arguments.batch_size, "repeats": arguments.repeats, "cot_length": "fixed", "rows": rows}


def run(arguments) -> dict:
    figures = {"benchmark": "scaling", "command": " ".join(sys.argv)}
    if arguments.inputs:
        with tempfile.TemporaryDirectory() as work:
            figures["embedding"] = embedding_scaling(arguments, Path(work))
    if arguments.pools:
        ranking = []
        for pool in arguments.pools:
            settings = {"pool": pool, "queries": arguments.queries, "dim": arguments.dim,
                        "chunk_size": arguments.chunk_size, "device": arguments.device}
            if arguments.in_process:
                result = measure_ranking(settings)
            else:
                result = common.run_worker(__file__, settings, timeout=arguments.timeout)
                result.setdefault("pool", pool)
            print(f"  pool {pool}: {result.get('seconds', result.get('error'))} s", file=sys.stderr)
            ranking.append(result)
        figures["ranking"] = {"dim": arguments.dim, "queries": arguments.queries, "chunk_size": arguments.chunk_size,
                              "golds": "one per query, random position", "rows": ranking}
    figures["machine"] = common.machine_info(arguments.device)
    return figures


def report(figures: dict) -> None:
    if "embedding" in figures:
        part = figures["embedding"]
        print(f"embedding ({part['model']['backbone']} on {part['model']['device']}, batch {part['batch_size']}, "
              f"CoT fixed at {part['model']['max_think_tokens']} tokens)")
        common.print_table(["mode, inputs", "seconds", "ms/input"],
                           [(f"{row['mode']}, {row['inputs']}", row["seconds"], row["ms_per_input"]) for row in part["rows"]])
    if "ranking" in figures:
        part = figures["ranking"]
        print(f"ranking ({part['queries']} queries, dim {part['dim']}, chunks of {part['chunk_size']})")
        rows = []
        for row in part["rows"]:
            if "error" in row:
                rows.append((row["pool"], row["error"][:50], None, None, None))
            else:
                rows.append((row["pool"], row["seconds"], row["ns_per_query_candidate"], row["pool_mib"], row["peak_above_start_mib"]))
        common.print_table(["pool", "seconds", "ns/(q x cand)", "pool MiB", "peak above MiB"], rows)


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_arguments(parser)
    common.add_input_arguments(parser)
    parser.add_argument("--inputs", type=int, nargs="*", default=[64, 128, 256], help="numbers of inputs to embed (none: skip)")
    parser.add_argument("--modes", nargs="+", default=["never", "always"], choices=["never", "always"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--pools", type=int, nargs="*", default=[10_000, 100_000, 300_000], help="pool sizes to rank (none: skip)")
    parser.add_argument("--queries", type=int, default=256)
    parser.add_argument("--dim", type=int, default=1536)
    parser.add_argument("--chunk-size", type=int, default=8192, help="rank_in_chunks' chunk (twn eval's default)")
    parser.add_argument("--in-process", action="store_true", help="rank every pool in this process")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("-o", "--output", help="write the figures as JSON here too")
    return parser.parse_args(argv)


def main(argv=None) -> dict | None:
    return common.measuring_main(parse(argv), measure_ranking, run, report)


if __name__ == "__main__":
    main()
