"""How much reward train-rl could gain: the policy's sampled CoTs against the best of each group and the teacher's CoT.

    python benchmarks/rl_headroom.py --checkpoint runs/toy/gate --data runs/toy/data --cache runs/toy/cache.pt \
        [--recipe recipes/toy/train-rl.yaml] [--split validation] [--queries 64] [--device cpu] [-o result.json]

On the queries train-rl's held-out reward reads (the first --queries of the split; CoTs sampled under its
fixed seed, G per query, rewarded against the cache as the recipe says), three rewards per query:
- *sampled*: the mean over the group, which is train-rl's held-out reward (run on the device train-rl ran
  on: a GPU's generator samples other CoTs than a CPU's);
- *best of group*: the group's best CoT, what a policy that always wrote the best of its own samples earns;
- *teacher*: the dataset's CoT written in place of a sampled one (teacher-forced into the interface's think
  view, as in train-embed), what a policy that reasoned like the teacher earns.
The embedding adapter, which train-rl does not train, is the same in all three, so teacher / sampled bounds
the rise a reasoning adapter can bring, and best / sampled the part its own samples already show GRPO.
By difficulty tag too; queries without a teacher CoT count in sampled and best only, and teacher / sampled
compares the queries with one. Teacher CoTs longer than the recipe's max_think_tokens, which the policy
could not write, are counted.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict

import torch

import _common as common
from twn_cli.data.negatives_cache import load_negatives_cache
from twn_cli.data.prepared import load_prepared, prepared_input
from twn_cli.data.training_data import TrainingData
from twn_cli.engine.factory import LoadOptions, load_model
from twn_cli.engine.training_passes import training_views
from twn_cli.errors import TWNError
from twn_cli.recipes import load_recipe
from twn_cli.stages.train_rl import HELDOUT_KEY, RLTrainer, TrainRLConfig


def forced_cot_rewards(trainer: RLTrainer, rows: list[dict], groups: dict, cot_ids: list[list[int] | None]) -> torch.Tensor:
    """[queries] reward of each row with the CoT `cot_ids` written for it (None: its prompt alone), against the
    negatives its sampled group was scored with."""
    model, group_size = trainer.model, trainer.config.group_size
    encoded = model.prompts.encode([prepared_input(row) for row in rows])
    embeddings = model.query_pass(training_views(model, encoded, cot_ids).think_view).float().cpu()
    forced = {
        "no_think": groups["no_think"],
        "cot_embeddings": embeddings.repeat_interleave(group_size, 0),
        "ended": torch.ones(len(rows) * group_size, dtype=torch.bool),
        "cot_tokens": torch.tensor([len(ids or []) for ids in cot_ids]).repeat_interleave(group_size),
    }
    return trainer.rewards(rows, forced, key=HELDOUT_KEY)[:, 0]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="the checkpoint train-rl starts from (or one it wrote)")
    parser.add_argument("--data", required=True, help="prepared dataset with teacher CoTs")
    parser.add_argument("--cache", required=True, help="the global negatives cache (twn embed DATA -o cache.pt)")
    parser.add_argument("--recipe", default=None, help="train-rl recipe: G, temperature, CoT length, reward (default: built-in)")
    parser.add_argument("--split", default=None, help="default: the recipe's validation split")
    parser.add_argument("--queries", type=int, default=None, help="default: the recipe's validation_queries")
    # A CUDA generator samples other CoTs than a CPU one under the same seed.
    parser.add_argument("--device", default="cpu", help="the device train-rl ran on, for its held-out reward's CoTs (cpu, cuda)")
    parser.add_argument("-o", "--output")
    arguments = parser.parse_args(argv)

    torch.manual_seed(0)
    try:
        model = load_model(arguments.checkpoint, options=LoadOptions(device=arguments.device))
        dataset = load_prepared(arguments.data)
        config = load_recipe(arguments.recipe, TrainRLConfig)
        cache = load_negatives_cache(arguments.cache, model.embedding_dim)
    except TWNError as error:
        parser.error(str(error))
    split = arguments.split or config.validation_split
    if split not in dataset.queries:
        parser.error(f"'{arguments.data}' has no split '{split}' (it has {', '.join(dataset.queries)})")
    count = config.validation_queries if arguments.queries is None else arguments.queries
    if count < 1:
        parser.error(f"--queries (or the recipe's validation_queries) must be at least 1, not {count}")
    trainer = RLTrainer(model, TrainingData(dataset, split, hard_negatives=0, seed=config.seed), cache, config)
    queries = dataset.queries[split]
    rows = [queries[index] for index in range(min(count, len(queries)))]

    per_difficulty: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    with torch.no_grad():
        # The held-out reward's batches: the same CoTs and negatives as train-rl's held-out reward.
        for batch in common.batched(rows, trainer.heldout_batch):
            groups = trainer.sample_groups(batch, key=HELDOUT_KEY)
            sampled = trainer.rewards(batch, groups, key=HELDOUT_KEY)
            teacher_cots = [model.prompts.cot_token_ids([row["cot"]])[0] if row["cot"] else None for row in batch]
            teacher = forced_cot_rewards(trainer, batch, groups, teacher_cots)
            for row, group, taught, cot in zip(batch, sampled, teacher.tolist(), teacher_cots):
                for tag in ("all", row.get("difficulty") or "-"):
                    tagged = per_difficulty[tag]
                    tagged["sampled"].append(group.mean().item())
                    tagged["best"].append(group.max().item())
                    if cot is not None:
                        tagged["teacher"].append(taught)
                        tagged["sampled_where_taught"].append(group.mean().item())
                        tagged["teacher_over_budget"].append(len(cot) > config.max_think_tokens)

    def mean(values: list[float]) -> float | None:
        return round(sum(values) / len(values), 4) if values else None

    # teacher / sampled compares the same queries: those with a teacher CoT.
    results = [
        {"difficulty": tag, "queries": len(values["sampled"]), "sampled": mean(values["sampled"]), "best_of_group": mean(values["best"]),
         "teacher": mean(values["teacher"]), "with_teacher_cot": len(values["teacher"]),
         "teacher_over_sampled": round(sum(values["teacher"]) / sum(values["sampled_where_taught"]), 4) if sum(values["sampled_where_taught"]) else None,
         "teacher_cots_over_budget": sum(values["teacher_over_budget"])}
        for tag, values in sorted(per_difficulty.items(), key=lambda item: item[0] != "all")
    ]
    figures = {
        "benchmark": "rl_headroom",
        "split": split,
        "queries": len(rows),
        "group_size": config.group_size,
        "temperature": config.temperature,
        "reward": config.reward,
        "results": results,
        "command": " ".join(sys.argv),
        "machine": common.machine_info(model.device),
    }
    common.print_table(
        ["difficulty", "queries", "sampled", "best of group", "teacher CoT", "teacher / sampled", f"teacher CoTs over {config.max_think_tokens} tokens"],
        [[row["difficulty"], row["queries"], row["sampled"], row["best_of_group"], row["teacher"], row["teacher_over_sampled"] or "-",
          row["teacher_cots_over_budget"]] for row in results],
    )
    common.finish(figures, arguments.output)
    return figures


if __name__ == "__main__":
    main()
