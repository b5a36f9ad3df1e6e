"""How much cheaper routing is than thinking: `route` (prefill + gate) vs `embed --think always` on the same inputs.

    python benchmarks/route_vs_embed.py --checkpoint runs/toy/gate --data runs/toy/data --n 1000 [-o result.json]

Both run in one process on one loaded model, over the same inputs (queries of a prepared dataset, images
opened from disk each time), so their ratio is measured side by side; loading is not timed.
"""

from __future__ import annotations

import argparse
import io
import sys
import time

import _common as common
from twn_cli.data.embedding_files import EmbeddingWriter
from twn_cli.data.inputs import InputRecord
from twn_cli.data.prepared import load_prepared
from twn_cli.engine.factory import LoadOptions, load_model
from twn_cli.stages.embed import EmbedSettings, run_embed
from twn_cli.stages.route import run_route


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", required=True, help="prepared dataset whose queries are the inputs")
    parser.add_argument("--split", default="test")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("-o", "--output", help="write the figures as JSON here too")
    arguments = parser.parse_args()

    model = load_model(arguments.checkpoint, options=LoadOptions(device=arguments.device))
    rows = load_prepared(arguments.data).queries[arguments.split]
    records = [
        InputRecord(id=row["id"], where=row["id"], text=row["text"], image_paths=list(row["images"]), instruction=row["instruction"] or None)
        for row in (rows[i % len(rows)] for i in range(arguments.n))
    ]
    for record_index, record in enumerate(records):
        record.id = f"{record.id}#{record_index}"  # inputs repeat when the split is smaller than n

    started = time.perf_counter()
    run_route(model, records, io.StringIO(), threshold=model.config.gate_threshold, batch_size=arguments.batch_size, skip_bad=False)
    route_seconds = time.perf_counter() - started

    writer = EmbeddingWriter("-", {"embedding_dim": model.embedding_dim}, stdout=io.StringIO())
    started = time.perf_counter()
    summary = run_embed(model, records, writer, EmbedSettings(think="always", batch_size=arguments.batch_size))
    think_seconds = time.perf_counter() - started

    figures = {
        "inputs": arguments.n,
        "route_seconds": round(route_seconds, 2),
        "embed_always_seconds": round(think_seconds, 2),
        "route_share_of_always": round(route_seconds / think_seconds, 4),
        "reasoning_tokens_per_input": round(summary.reasoning_tokens / arguments.n, 1),
        "batch_size": arguments.batch_size,
        "command": " ".join(sys.argv),
        "machine": common.machine_info(arguments.device),
    }
    print(f"{'':<28}{'seconds':>10}{'inputs/s':>10}")
    print(f"{'route (prefill + gate)':<28}{route_seconds:>10.2f}{arguments.n / route_seconds:>10.1f}")
    print(f"{'embed --think always':<28}{think_seconds:>10.2f}{arguments.n / think_seconds:>10.1f}")
    print(f"route takes {100 * figures['route_share_of_always']:.1f} % of always-think's time "
          f"({figures['reasoning_tokens_per_input']} reasoning tokens per input)")
    common.finish(figures, arguments.output)


if __name__ == "__main__":
    main()
