"""How good the reasoning adapter's CoTs are: greedy CoTs against the dataset's teacher CoTs, per task and difficulty.

    python benchmarks/cot_quality.py --checkpoint runs/toy/embed --data runs/toy/data --split validation [-o result.json]

For every query of the split that has a teacher CoT (at most --per-group per task and difficulty tag), one
reasoning-adapter pass scores the teacher CoT (cross-entropy per token, teacher-forced as in train-embed) and
greedy decoding writes the adapter's own CoT. A CoT *concludes right* when its conclusion, the text after its
last "; so " (the toy world's teacher CoTs end "...; so a green pentagon"), equals the teacher's; a CoT without
one concludes nothing. *Exact*: the whole CoT equals the teacher's. Quality, not cost: no timing here.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path
from tempfile import TemporaryDirectory

import torch

import _common as common
from twn_cli.data.prepared import load_prepared, prepared_input
from twn_cli.engine.training_passes import training_views
from twn_cli.errors import TWNError


def conclusion(cot: str) -> str | None:
    return cot.rsplit("; so ", 1)[1].strip() if "; so " in cot else None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_arguments(parser, max_think_tokens=48)
    parser.add_argument("--data", required=True, help="prepared dataset with teacher CoTs")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--per-group", type=int, default=200, help="at most this many queries per task and difficulty tag (at least 1)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("-o", "--output", help="write the figures as JSON here too")
    arguments = parser.parse_args(argv)
    if arguments.per_group < 1:
        parser.error("--per-group must be at least 1")
    try:
        queries = load_prepared(arguments.data).queries
    except TWNError as error:
        parser.error(str(error))
    if arguments.split not in queries:
        parser.error(f"'{arguments.data}' has no split '{arguments.split}' (it has {', '.join(queries)})")
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in queries[arguments.split]:
        key = (row["task"], row.get("difficulty") or "")
        if row["cot"] and len(groups[key]) < arguments.per_group:
            groups[key].append(row)

    torch.manual_seed(0)
    with TemporaryDirectory() as work_dir:
        model = common.load_model(arguments, Path(work_dir))
        model.eval()

        results = []
        for (task, difficulty), rows in sorted(groups.items()):
            loss_sum, tokens, concluded, exact = 0.0, 0, 0, 0
            for batch in common.batched(rows, arguments.batch_size):
                with torch.no_grad():
                    inputs = [prepared_input(row) for row in batch]
                    encoded = model.prompts.encode(inputs)
                    forced = training_views(model, encoded, model.prompts.cot_token_ids([row["cot"] for row in batch]))
                    loss_sum, tokens = loss_sum + float(forced.sft_loss_sum), tokens + forced.sft_tokens
                    prefix, _ = model.prefill(encoded)
                    written = model.thought_embeddings(prefix, inputs)[1].texts
                concluded += sum(
                    conclusion(row["cot"]) is not None and conclusion(cot) == conclusion(row["cot"]) for cot, row in zip(written, batch)
                )
                exact += sum(cot.strip() == row["cot"].strip() for cot, row in zip(written, batch))
            results.append(
                {
                    "task": task,
                    "difficulty": difficulty,
                    "queries": len(rows),
                    "concluded_right": concluded,
                    "concludes_right": round(concluded / len(rows), 4),
                    "exact": round(exact / len(rows), 4),
                    "teacher_loss_per_token": round(loss_sum / max(tokens, 1), 4),
                }
            )

    by_difficulty = {}
    for difficulty in sorted({row["difficulty"] for row in results}):
        members = [row for row in results if row["difficulty"] == difficulty]
        count = sum(row["queries"] for row in members)
        by_difficulty[difficulty] = {
            "queries": count,
            "concludes_right": round(sum(row["concluded_right"] for row in members) / count, 4),
        }
    figures = {
        "benchmark": "cot_quality",
        "split": arguments.split,
        "groups": results,
        "by_difficulty": by_difficulty,
        "model": common.model_facts(model),
        "command": " ".join(sys.argv),
        "machine": common.machine_info(arguments.device),
    }
    common.print_table(
        ["task", "difficulty", "queries", "concludes right", "exact", "teacher loss/token"],
        [[row["task"], row["difficulty"], row["queries"], row["concludes_right"], row["exact"], row["teacher_loss_per_token"]] for row in results],
    )
    print("concludes right, by difficulty: " + ", ".join(f"{name or '-'} {100 * value['concludes_right']:.1f} % of {value['queries']}" for name, value in by_difficulty.items()))
    common.finish(figures, arguments.output)
    return figures


if __name__ == "__main__":
    main()
