"""`twn prepare synthetic`: the toy world written as a prepared dataset, like any real source.

Pictures are rendered once (each picture's fixed render) into `images/` inside the dataset, so every stage
reads the toy world exactly as it reads MMEB. Every query carries its own candidate pool: pools belong to
a split, and a test query must never be ranked against training pictures. `positive_ids` lists the
query's own target first, then every other candidate that also answers it (t2i: every picture of the pool
that contains the described shape). `analysis.jsonl` keeps, per query, what the world knows about it
(resolved description, held-out elements used, clues) for breaking results down; no stage trains on it.
"""

from __future__ import annotations

import json
from pathlib import Path

from twn_cli.data.prepared import MODALITY_OF_META_TASK, check_output_dir, write_prepared
from twn_cli.locks import lock_output
from twn_cli.toyworld.render import PICTURE_SIZE
from twn_cli.toyworld.world import Record, SceneImage, Split, generate_world

ANALYSIS_FILE = "analysis.jsonl"


def write_synthetic_dataset(output_dir: str | Path, n: int = 4000, seed: int = 0, image_size: int = PICTURE_SIZE, validation_size: int | None = None, rl_size: int = 0, lazy_teacher_share: float = 0.0, near_miss_teacher_share: float = 0.0) -> dict:
    """Generate the toy world of `n` queries for `seed` (validation: `validation_size` queries instead of its
    share), an `rl` split of `rl_size` and an imperfect teacher (see `generate_world`), and write it to `output_dir`;
    returns the manifest counts."""
    output_dir = Path(output_dir).resolve()
    check_output_dir(output_dir)
    world = generate_world(n=n, seed=seed, validation_size=validation_size, rl_size=rl_size, lazy_teacher_share=lazy_teacher_share, near_miss_teacher_share=near_miss_teacher_share)
    pictures: dict[str, SceneImage] = {}

    def picture_paths(kind: str, item_id: str, images) -> list[str]:
        paths = []
        for index, image in enumerate(images):
            relative = f"images/{kind}/{item_id}-{index}.png"
            pictures[relative] = image
            paths.append(str(output_dir / relative))
        return paths

    queries, candidates, tasks, analysis = {}, [], {}, []
    for split in [*world.splits.values(), *world.more_validation]:
        queries.setdefault(split.name, []).extend(_query_row(record, split, picture_paths) for record in split.records)
        for pool, ids in split.pools.items():
            for candidate_id in ids:
                candidate = split.candidates[candidate_id]
                candidates.append(
                    {
                        "id": candidate_id,
                        "task": pool,
                        "instruction": "",
                        "text": candidate.text,
                        "images": picture_paths("candidates", candidate_id, candidate.images),
                    }
                )
        for record in split.records:
            tasks[record.pool] = {"meta_task": record.meta_task, "modality": MODALITY_OF_META_TASK[record.meta_task], "pool": "per_query"}
            analysis.append(
                {
                    "id": record.id,
                    "resolved": record.resolved,
                    "held_out": list(record.held_out),
                    "clues": [clue.text for clue in record.clues],
                }
            )

    def render_pictures(staging: Path) -> None:
        for relative, image in pictures.items():
            path = staging / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            image.render(image_size).save(path)
        with open(staging / ANALYSIS_FILE, "w") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in analysis)

    with lock_output(output_dir):
        write_prepared(
            output_dir,
            queries,
            candidates,
            {
                "source": "synthetic",
                "tasks": tasks,
                "skipped": [],
                "frames_per_video": 0,
                "cot": {"source": "rules"},
                "world": {
                    "n": n,
                    "seed": seed,
                    "validation_size": validation_size,
                    "rl_size": rl_size,
                    "lazy_teacher_share": lazy_teacher_share,
                    "near_miss_teacher_share": near_miss_teacher_share,
                    "image_size": image_size,
                    "held_out": {
                        "combinations": sorted(" ".join(pair) for pair in world.held_out.combinations),
                        "facts": sorted(fact.answer + ": " + ", ".join(fact.key) for fact in world.held_out.facts),
                        "phrasings": sorted(world.held_out.templates),
                    },
                },
            },
            write_files=render_pictures,
        )
    return {split: len(rows) for split, rows in queries.items()} | {"candidates": len(candidates)}


def _query_row(record: Record, split: Split, picture_paths) -> dict:
    positives = list(record.positive_ids) + [gold for gold in record.gold_ids if gold not in record.positive_ids]
    return {
        "id": record.id,
        "task": record.pool,
        "meta_task": record.meta_task,
        "modality": MODALITY_OF_META_TASK[record.meta_task],
        "instruction": record.instruction,
        "text": record.text,
        "images": picture_paths("queries", record.id, record.images),
        "positive_ids": positives,
        "positive_relevance": [1.0] * len(positives),
        "negative_ids": list(record.hard_negative_ids),
        "candidate_ids": list(split.pools[record.pool]),
        "cot": record.cot,
        "difficulty": record.difficulty,
    }
