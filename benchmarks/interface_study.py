"""Which adapter should encode what: the toy pipeline run once per interface, on one backbone and one world.

For each interface (reasoning-prefill, embedding-prefill, cot-reencode, reencode) it runs, with the recipes of
`--recipes`: train-embed (`--set interface=...`), train-gate, the negatives cache, train-rl, and `twn eval
--mode sweep` on the test split both before RL (the train-gate checkpoint) and after it. Every interface
starts from the same pre-trained backbone and prepared world (those of a toy pipeline run, `--base`).

Figures per interface: test Hit@1 (task mean) for never / always / the chosen τ / the sweep point nearest
60 % of always-think's reasoning tokens, each by difficulty; the held-out reward before and after RL; how
far RL moved the never-think embeddings of the test queries (mean 1 - cosine, largest absolute change);
eval's inputs per second in never and always modes; the wall time of each stage.

    python benchmarks/interface_study.py --base runs/toy -o runs/interfaces [--interfaces ...]

The stages are `twn` commands run one after another (a `twn` on PATH: put a wrapper first on PATH to run
them some other way). A stage whose output exists is not run again, so an interrupted study resumes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from twn_cli.data.prepared import load_prepared, prepared_input
from twn_cli.engine.config import INTERFACES
from twn_cli.engine.factory import LoadOptions, load_model

TOKEN_SHARE = 0.6


def run_stage(name: str, command: list[str], output: Path, timings: dict) -> None:
    """Run one `twn` command unless `output` exists; its wall time goes into `timings`."""
    if output.exists():
        return
    print(f"== {name}: {' '.join(command)}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    timings[name] = round(time.perf_counter() - started, 1)


def run_interface(interface: str, base: Path, recipes: Path, folder: Path) -> dict:
    data, backbone = base / "data", base / "backbone"
    folder.mkdir(parents=True, exist_ok=True)
    timings_path = folder / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    stages = [
        ("train-embed", ["twn", "train-embed", str(data), "--backbone", str(backbone), "-o", str(folder / "embed"),
                         "--recipe", str(recipes / "train-embed.yaml"), "--set", f"interface={interface}"], folder / "embed" / "twn.json"),
        ("train-gate", ["twn", "train-gate", str(data), "--checkpoint", str(folder / "embed"), "-o", str(folder / "gate"),
                        "--recipe", str(recipes / "train-gate.yaml")], folder / "gate" / "twn.json"),
        ("negatives cache", ["twn", "embed", str(data), "--checkpoint", str(folder / "gate"), "-o", str(folder / "cache.pt")], folder / "cache.pt"),
        ("train-rl", ["twn", "train-rl", str(data), "--checkpoint", str(folder / "gate"), "--negatives-cache", str(folder / "cache.pt"),
                      "-o", str(folder / "rl"), "--recipe", str(recipes / "train-rl.yaml")], folder / "rl" / "twn.json"),
        ("eval before RL", ["twn", "eval", str(data), "--checkpoint", str(folder / "gate"), "-o", str(folder / "report-gate"), "--mode", "sweep"],
         folder / "report-gate" / "report.json"),
        ("eval after RL", ["twn", "eval", str(data), "--checkpoint", str(folder / "rl"), "-o", str(folder / "report-rl"), "--mode", "sweep"],
         folder / "report-rl" / "report.json"),
    ]
    for name, command, output in stages:
        run_stage(name, command, output, timings)
        timings_path.write_text(json.dumps(timings, indent=2))
    return figures(folder, data, timings)


def point_figures(point: dict) -> dict:
    return {
        "hit@1": round(100 * point["overall"]["score"], 1),
        "think_rate": round(point["overall"]["think_rate"], 3),
        "reasoning_tokens_per_query": round(point["overall"]["reasoning_tokens_per_query"], 2),
        "inputs_per_second": point["overall"]["inputs_per_second"],
        "by_difficulty": {name: round(100 * group["hit@1"], 1) for name, group in point["by_difficulty"].items()},
    }


def sweep_figures(report: dict) -> dict:
    points = {point["label"]: point for point in report["sweep"]}
    always = next(point for point in report["sweep"] if point["mode"] == "always")
    budget = TOKEN_SHARE * always["overall"]["reasoning_tokens_per_query"]
    adaptive = [point for point in report["sweep"] if point["mode"] == "adaptive"]
    nearest = min(adaptive, key=lambda point: abs(point["overall"]["reasoning_tokens_per_query"] - budget))
    return {
        "never": point_figures(points["never"]),
        "always": point_figures(always),
        "chosen": point_figures(report["result"]),
        f"nearest_{int(TOKEN_SHARE * 100)}_percent_tokens": point_figures(nearest),
    }


@torch.no_grad()
def never_think_movement(folder: Path, data: Path) -> dict:
    """How far train-rl moved the never-think embeddings (and p_think) of the test queries."""
    rows = load_prepared(data).queries["test"]
    inputs = [prepared_input(row) for row in rows]
    embedded = {}
    for name in ("gate", "rl"):
        model = load_model(folder / name, options=LoadOptions(device="cpu"))
        parts = [model.embed(inputs[start : start + 32]) for start in range(0, len(inputs), 32)]
        embedded[name] = (torch.cat([part.embeddings for part in parts]), torch.cat([part.p_think for part in parts]))
    (before, p_before), (after, p_after) = embedded["gate"], embedded["rl"]
    return {
        "queries": len(inputs),
        "mean_one_minus_cosine": float((1 - F.cosine_similarity(before, after)).mean()),
        "max_abs_change": float((before - after).abs().max()),
        "bit_identical": bool(torch.equal(before, after)),
        "p_think_max_abs_change": float((p_before - p_after).abs().max()),
    }


def figures(folder: Path, data: Path, timings: dict) -> dict:
    reports = {name: json.loads((folder / f"report-{name}" / "report.json").read_text()) for name in ("gate", "rl")}
    rl = json.loads((folder / "rl" / "twn.json").read_text())["train_rl"]
    embed = json.loads((folder / "embed" / "twn.json").read_text())["train_embed"]
    return {
        "before_rl": sweep_figures(reports["gate"]),
        "after_rl": sweep_figures(reports["rl"]),
        "heldout_reward": {key: rl["heldout_reward"][key] for key in ("before", "after")},
        "never_think_moved_by_rl": never_think_movement(folder, data),
        "train_embed_validation": embed.get("validation"),
        "stage_seconds": timings,
    }


def table(results: dict) -> str:
    lines = [
        "| interface | never | always | chosen τ (think rate) | ~60 % tokens (think rate) | held-out reward before → after RL | never-think moved by RL | eval inputs/s never / always | train-embed s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for interface, result in results.items():
        after, moved, reward = result["after_rl"], result["never_think_moved_by_rl"], result["heldout_reward"]
        nearest = after[f"nearest_{int(TOKEN_SHARE * 100)}_percent_tokens"]
        lines.append(
            f"| {interface} | {after['never']['hit@1']} | {after['always']['hit@1']} | {after['chosen']['hit@1']} ({after['chosen']['think_rate']:.0%}) "
            f"| {nearest['hit@1']} ({nearest['think_rate']:.0%}) | {reward['before']:.3f} → {reward['after']:.3f} "
            f"| {'none (bit-identical)' if moved['bit_identical'] else format(moved['mean_one_minus_cosine'], '.2e')} "
            f"| {after['never']['inputs_per_second']:.1f} / {after['always']['inputs_per_second']:.1f} | {result['stage_seconds'].get('train-embed', '?')} |"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, required=True, help="a toy pipeline run: its backbone/ and data/ are used")
    parser.add_argument("--recipes", type=Path, default=Path(__file__).parents[1] / "recipes" / "toy")
    parser.add_argument("--interfaces", nargs="+", default=list(INTERFACES), choices=INTERFACES)
    parser.add_argument("-o", "--output", type=Path, required=True, help="folder of the study (one sub-folder per interface)")
    arguments = parser.parse_args(argv)
    results = {interface: run_interface(interface, arguments.base, arguments.recipes, arguments.output / interface) for interface in arguments.interfaces}
    (arguments.output / "study.json").write_text(json.dumps(results, indent=2))
    print(table(results))
    return results


if __name__ == "__main__":
    main()
