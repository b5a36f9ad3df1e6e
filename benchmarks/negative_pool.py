"""Does a larger, more diverse pool of negatives give GRPO a better reward signal? (TWN paper's claim, issue 6)

    python benchmarks/negative_pool.py --checkpoint runs/toy/gate --data runs/toy/data --cache runs/toy/cache.pt \
        [--queries 64] [--sizes 64 256 1024] [-o result.json]

For the same training queries and the same sampled CoTs (G per query, seeded as train-rl samples them), the
rewards are computed against pools of negatives of growing size: the batch's own targets only (in-batch
negatives), random subsets of the global cache, and the whole cache, every entry counted; and the whole
cache as the recipe samples it (its M hardest plus random ones per query). Per pool and reward shape it prints
the share of groups whose rewards do not spread (all G equal: no advantage, no gradient; also below 0.01
for the continuous softmax reward), the mean within-group standard deviation, and how well the reward
follows retrieval: each CoT's reciprocal rank of the query's best positive in its own candidate pool (as
`twn eval` ranks it, against the cache's no-think embeddings), correlated with the CoT's reward by Spearman's
rho over all CoTs, and within groups (what GRPO's advantages use: the mean rho over the groups in which
both the reward and the rank vary). Nothing trains.
"""

from __future__ import annotations

import argparse
import random
import sys
from dataclasses import replace

import torch

import _common as common
from twn_cli.data.negatives_cache import NegativesCache, load_negatives_cache
from twn_cli.data.prepared import load_prepared
from twn_cli.data.training_data import TrainingData
from twn_cli.engine.factory import LoadOptions, load_model
from twn_cli.recipes import load_recipe
from twn_cli.stages.train_rl import RLTrainer, TrainRLConfig, group_advantages


def subset(cache: NegativesCache, ids: list[str]) -> NegativesCache:
    rows = [cache.row_of[item] for item in ids]
    return NegativesCache([cache.ids[row] for row in rows], cache.embeddings[rows])


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks from 0, ties sharing the mean of their positions."""
    unique, inverse, counts = torch.unique(values, return_inverse=True, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    return (starts + (counts - 1) / 2).double()[inverse]


def spearman(x: torch.Tensor, y: torch.Tensor) -> float | None:
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = float(rx.norm() * ry.norm())
    return float((rx * ry).sum()) / denominator if denominator > 0 else None


def reciprocal_ranks(cache: NegativesCache, dataset, rows: list[dict], cot_embeddings: torch.Tensor, group_size: int) -> torch.Tensor:
    """[queries, G]: each CoT embedding's reciprocal rank of the query's best positive in its own pool."""
    ranks = torch.empty(len(rows), group_size)
    for query, row in enumerate(rows):
        pool = dataset.candidate_pool(row)
        embeddings = cache.embeddings[[cache.row_of[item] for item in pool]].float()
        gold = torch.tensor([item in set(row["positive_ids"]) for item in pool])
        scores = cot_embeddings[query * group_size : (query + 1) * group_size].float() @ embeddings.T
        best_gold = scores[:, gold].max(1).values
        ranks[query] = 1.0 / (1 + (scores[:, ~gold] > best_gold[:, None]).sum(1)).float()
    return ranks


def following_figures(rewards: torch.Tensor, ranks: torch.Tensor) -> dict:
    within = [spearman(r, q) for r, q in zip(rewards, ranks) if r.unique().numel() > 1 and q.unique().numel() > 1]
    within = [value for value in within if value is not None]
    return {
        "rho_all": round(spearman(rewards.flatten(), ranks.flatten()) or float("nan"), 4),
        "rho_within_groups": round(sum(within) / len(within), 4) if within else None,
        "groups_ranked": len(within),
    }


def spread_figures(rewards: torch.Tensor) -> dict:
    _, zero_spread = group_advantages(rewards)
    spread = rewards.std(1)
    return {
        "zero_spread_groups": round(zero_spread.float().mean().item(), 4),
        "spread_below_0.01": round((spread < 0.01).float().mean().item(), 4),
        "mean_spread": round(spread.mean().item(), 5),
        "mean_reward": round(rewards.mean().item(), 5),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="the checkpoint train-rl would start from")
    parser.add_argument("--data", required=True)
    parser.add_argument("--cache", required=True, help="the global negatives cache (twn embed DATA -o cache.pt)")
    parser.add_argument("--recipe", default=None, help="train-rl recipe for G, temperature, CoT length (default: built-in)")
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8, help="queries sampled together; their targets are the in-batch pool")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--split", default=None, help="the split whose queries are sampled (default: the recipe's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-o", "--output")
    arguments = parser.parse_args()

    model = load_model(arguments.checkpoint, options=LoadOptions(device="cpu"))
    dataset = load_prepared(arguments.data)
    cache = load_negatives_cache(arguments.cache, model.embedding_dim)
    recipe = replace(load_recipe(arguments.recipe, TrainRLConfig), batch_size=arguments.batch_size)
    # Every negative of a pool counts (no hardest-M selection), so that the pool's size is the only variable.
    config = replace(recipe, hardest_negatives=0, random_negatives=0, split=arguments.split or recipe.split)
    data = TrainingData(dataset, config.split, hard_negatives=0, seed=arguments.seed)
    rng = random.Random(arguments.seed)
    shuffled = rng.sample(cache.ids, len(cache.ids))
    pools = {"in-batch": None, **{f"cache {size}": shuffled[:size] for size in arguments.sizes if size < len(cache.ids)}}
    pools[f"cache {len(cache.ids)} (all)"] = cache.ids
    selected = f"cache, {recipe.hardest_negatives} hardest + {recipe.random_negatives} random"

    rewards: dict[tuple[str, str], list[torch.Tensor]] = {}
    ranks: list[torch.Tensor] = []
    batches = (arguments.queries + arguments.batch_size - 1) // arguments.batch_size
    for batch in range(batches):
        rows = [data.rows[index] for index in data.batch_indices(batch, arguments.batch_size)]
        in_batch = list(dict.fromkeys(item for row in rows for item in row["positive_ids"]))
        sampler = RLTrainer(model, data, cache, config)
        sampler.step_done = batch
        groups = sampler.sample_groups(rows)  # one set of CoTs, scored against every pool
        ranks.append(reciprocal_ranks(cache, dataset, rows, groups["cot_embeddings"], config.group_size))
        for name, ids in pools.items():
            pool = subset(cache, in_batch if ids is None else ids)
            for shape in ("softmax", "ume_r1"):
                scorer = RLTrainer(model, data, pool, replace(config, reward=shape))
                rewards.setdefault((name, shape), []).append(scorer.rewards(rows, groups))
        # hardest_negatives 0 means every entry: the "all" pool above.
        for shape in ("softmax", "ume_r1") if recipe.hardest_negatives else ():
            scorer = RLTrainer(model, data, cache, replace(recipe, reward=shape))
            scorer.step_done = batch
            rewards.setdefault((selected, shape), []).append(scorer.rewards(rows, groups))

    ranks_all = torch.cat(ranks)
    figures = {
        "split": config.split,
        "queries": batches * arguments.batch_size,
        "group_size": config.group_size,
        "temperature": config.temperature,
        "results": [
            {"pool": name, "reward": shape, **spread_figures(torch.cat(parts)), **following_figures(torch.cat(parts), ranks_all)}
            for (name, shape), parts in rewards.items()
        ],
        "command": " ".join(sys.argv),
        "machine": common.machine_info(model.device),
    }
    print(f"{'pool':<34}{'reward':<9}{'zero spread':>12}{'spread<0.01':>12}{'mean spread':>12}{'mean reward':>12}{'rho all':>9}{'rho groups':>11}")
    for result in figures["results"]:
        within = result["rho_within_groups"]
        print(f"{result['pool']:<34}{result['reward']:<9}{result['zero_spread_groups']:>12.1%}{result['spread_below_0.01']:>12.1%}"
              f"{result['mean_spread']:>12.4f}{result['mean_reward']:>12.4f}{result['rho_all']:>9.3f}{within if within is not None else float('nan'):>11.3f}")
    common.finish(figures, arguments.output)


if __name__ == "__main__":
    main()
