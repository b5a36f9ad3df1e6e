"""train-gate's labels: does thinking raise an input's retrieval margin? Both views from one prefill,
margins against the batch's candidates (and a negatives cache), cached batch by batch."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from twn_cli.atomic import atomic_file
from twn_cli.data.negatives_cache import NegativesCache
from twn_cli.data.prepared import PreparedDataset, prepared_input
from twn_cli.distributed import Distributed
from twn_cli.engine.decoding import Sampling
from twn_cli.engine.model import TWNModel
from twn_cli.errors import TWNError
from twn_cli.stages.common import CandidateEmbedder
from twn_cli.types import ModelInput

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from twn_cli.stages.train_gate import TrainGateConfig

LABELS_DIR = "gate-labels"  # RUN/train/gate-labels/batch-00000.safetensors, ...

Progress = Callable[[str, int, int], None]


# ----------------------------------------------------------------------------------------- both views
@dataclass
class Views:
    """Both embeddings of a batch of inputs from one prefill, and the state that the gate reads."""

    last_prompt_state: torch.Tensor
    never: torch.Tensor
    think: torch.Tensor
    reasoning_tokens: list[int]
    cots: list[str]


@torch.no_grad()
def embed_views(model: TWNModel, inputs: list[ModelInput], sampling: Sampling) -> Views:
    """The no-think and think embeddings of `inputs` (on the CPU), sharing one prefill as `embed` does."""
    prefix, last_state = model.prefill(model.prompts.encode(inputs))
    never = model.query_pass(prefix)  # before the CoTs, which may extend the prefix's cache in place
    think, thoughts = model.thought_embeddings(prefix, inputs, sampling)
    return Views(last_state.float().cpu(), never.cpu(), think.cpu(), thoughts.reasoning_tokens, thoughts.texts)


# ----------------------------------------------------------------------------------------- labels
def retrieval_margins(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    positive_column: torch.Tensor,
    negative_mask: torch.Tensor,
    hardest_elsewhere: torch.Tensor | None = None,
) -> torch.Tensor:
    """s(query, its positive) - max s(query, negative) per query; `negative_mask[i, j]`: candidate j is one of i's negatives.

    `hardest_elsewhere`: each query's highest score against negatives outside `candidates` (a negatives cache).
    """
    scores = queries.float() @ candidates.float().T
    positive = scores.gather(1, positive_column[:, None]).squeeze(1)
    hardest = scores.masked_fill(~negative_mask, float("-inf")).max(1).values
    if hardest_elsewhere is not None:
        hardest = torch.maximum(hardest, hardest_elsewhere)
    return positive - hardest


def thinking_labels(margin_never: torch.Tensor, margin_think: torch.Tensor, delta: float) -> torch.Tensor:
    """Whether thinking improved each input's retrieval margin by more than `delta`."""
    return margin_think - margin_never > delta


def candidate_columns(
    rows: list[Mapping], positives: list[set[str]], hard_negatives: int
) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """The candidates a labelling batch is scored against: (ids, each query's positive column, negative mask).

    A query's negatives are the batch's targets and its own first `hard_negatives` hard negatives, except
    any of its `positives` (a shared class, several gold ids, copies of a positive under other ids).
    """
    targets = [row["positive_ids"][0] for row in rows]
    own_negatives = [list(row["negative_ids"])[:hard_negatives] for row in rows]
    ids = list(dict.fromkeys(targets + [n for negatives in own_negatives for n in negatives]))
    column = {candidate_id: j for j, candidate_id in enumerate(ids)}
    negative_mask = torch.zeros(len(rows), len(ids), dtype=torch.bool)
    for i, (row, negatives) in enumerate(zip(rows, own_negatives)):
        for candidate_id in dict.fromkeys(targets + negatives):
            if candidate_id not in positives[i]:
                negative_mask[i, column[candidate_id]] = True
        if not negative_mask[i].any():
            raise TWNError(f"query '{row['id']}' has no negative to be scored against (its batch's targets are all its positives)")
    return ids, torch.tensor([column[target] for target in targets]), negative_mask


@dataclass
class LabelledInputs:
    """What labelling found for each input, in order: the gate's input, both margins, the CoT."""

    ids: list[str]
    features: torch.Tensor
    margin_never: torch.Tensor
    margin_think: torch.Tensor
    reasoning_tokens: torch.Tensor
    cots: list[str]

    @property
    def margin_change(self) -> torch.Tensor:
        return self.margin_think - self.margin_never

    def labels(self, delta: float) -> torch.Tensor:
        return thinking_labels(self.margin_never, self.margin_think, delta)

    def expected_hit_gain(self, temperature: float) -> torch.Tensor:
        """σ(margin_think / T) - σ(margin_never / T): the rise of a smoothed Hit@1, in [-1, 1]. A margin far from
        zero moves it little either way; it counts what carries the query across the first rank, and what
        thinking costs a query it had right."""
        return torch.sigmoid(self.margin_think.double() / temperature) - torch.sigmoid(self.margin_never.double() / temperature)

    def select(self, ids: list[str]) -> LabelledInputs:
        """These inputs' entries for `ids` (each one of them), in that order."""
        position = {input_id: i for i, input_id in enumerate(self.ids)}
        rows = torch.tensor([position[input_id] for input_id in ids], dtype=torch.long)
        return LabelledInputs(list(ids), self.features[rows], self.margin_never[rows], self.margin_think[rows],
                              self.reasoning_tokens[rows], [self.cots[i] for i in rows.tolist()])

    @classmethod
    def concatenate(cls, parts: list[LabelledInputs]) -> LabelledInputs:
        return cls(
            ids=[i for part in parts for i in part.ids],
            features=torch.cat([part.features for part in parts]),
            margin_never=torch.cat([part.margin_never for part in parts]),
            margin_think=torch.cat([part.margin_think for part in parts]),
            reasoning_tokens=torch.cat([part.reasoning_tokens for part in parts]),
            cots=[cot for part in parts for cot in part.cots],
        )


def label_batch(
    model: TWNModel,
    rows: list[Mapping],
    positives: list[set[str]],
    inputs: list[ModelInput],
    embed_candidates: CandidateEmbedder,
    hard_negatives: int,
    sampling: Sampling,
    negatives: NegativesCache | None = None,
) -> LabelledInputs:
    """Both views of a batch of training queries (`inputs`: their opened rows) and their margins against the
    batch's candidates (and the cache); no candidate in a query's `positives` counts as its negative."""
    ids, positive_column, negative_mask = candidate_columns(rows, positives, hard_negatives)
    candidates = embed_candidates(ids)
    views = embed_views(model, inputs, sampling)

    def margins(queries: torch.Tensor) -> torch.Tensor:
        from_cache = negatives.hardest_scores(queries, positives) if negatives is not None else None
        return retrieval_margins(queries, candidates, positive_column, negative_mask, from_cache)

    return LabelledInputs(
        ids=[row["id"] for row in rows],
        features=views.last_prompt_state,
        margin_never=margins(views.never),
        margin_think=margins(views.think),
        reasoning_tokens=torch.tensor(views.reasoning_tokens, dtype=torch.int64),
        cots=views.cots,
    )


class LabelCache:
    """One safetensors file per labelling batch; the header holds the key, the input ids and the CoTs.

    A file is reused only if it was made with the same key (model, dataset, labelling settings) for the same
    inputs; files are written atomically, so an interruption loses at most the batch in flight.
    """

    def __init__(self, folder: Path, key: dict):
        self.folder = folder
        self.key = json.dumps(key, sort_keys=True)

    def path(self, number: int) -> Path:
        return self.folder / f"batch-{number:05d}.safetensors"

    def load(self, number: int, ids: list[str]) -> LabelledInputs | None:
        path = self.path(number)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as handle:
                header = handle.metadata() or {}
                if header.get("key") != self.key or json.loads(header["ids"]) != ids:
                    return None
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
            return LabelledInputs(ids=ids, cots=json.loads(header["cots"]), **tensors)
        except (OSError, KeyError, ValueError, TypeError, RuntimeError) as error:  # safetensors raises several kinds
            log.warning("label cache %s is unreadable (%s): labelling that batch again", path, error)
            return None

    def save(self, number: int, labelled: LabelledInputs) -> None:
        tensors = {
            "features": labelled.features,
            "margin_never": labelled.margin_never,
            "margin_think": labelled.margin_think,
            "reasoning_tokens": labelled.reasoning_tokens,
        }
        header = {"key": self.key, "ids": json.dumps(labelled.ids), "cots": json.dumps(labelled.cots)}
        with atomic_file(self.path(number)) as staging:
            save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, staging, metadata=header)


def labelling_key(model: TWNModel, dataset: PreparedDataset, config: TrainGateConfig, negatives: NegativesCache | None) -> dict:
    """What the cached margins depend on: the adapters and queries (not the gate), the data, the settings, the cache."""
    digest = hashlib.sha256(model.backbone.fingerprint.encode())
    parts = model.trainable_parameters()
    for name, parameter in sorted({**parts["reasoning"], **parts["embedding"]}.items()):
        digest.update(name.encode())
        digest.update(parameter.detach().float().cpu().numpy().tobytes())
    settings = {name: value for name, value in model.config.to_dict().items() if not name.startswith("gate_")}
    if any(model.backbone.pixels.values()):  # pictures bounded otherwise than the backbone bounds them
        settings["pixels"] = model.backbone.pixels
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return {
        "model": digest.hexdigest(),
        "dataset": {"path": str(Path(dataset.path).resolve()), "created": dataset.manifest.get("created")},
        "split": config.split,
        "hard_negatives": config.hard_negatives,
        "max_think_tokens": config.max_think_tokens or model.config.max_think_tokens,
        "negatives_cache": negatives.digest() if negatives is not None else None,
        # Margins cached before copies of a positive were excluded from its negatives are not reused.
        "negatives_exclude": "copies of the positives",
    }


def labelling_rows(dataset: PreparedDataset, config: TrainGateConfig) -> list[dict]:
    """The first `label_queries` queries of a seeded order of the split (asking for more keeps these first)."""
    rows = dataset.queries[config.split]
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(config.seed))
    return [rows[int(i)] for i in order[: config.label_queries]]


def labelling_batches(rows: list[dict], batch_size: int) -> list[list[dict]]:
    """Batches of `batch_size`; a lone last query joins the batch before it, so it has in-batch negatives."""
    batches = [rows[start : start + batch_size] for start in range(0, len(rows), batch_size)]
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches[-2] = batches[-2] + batches.pop()
    return batches


def label_inputs(
    model: TWNModel,
    dataset: PreparedDataset,
    rows: list[dict],
    cache_dir: Path,
    config: TrainGateConfig,
    progress: Progress = lambda phase, done, total: None,
    negatives: NegativesCache | None = None,
) -> LabelledInputs:
    """Margins and gate inputs of `rows`, batch by batch, from the label cache where it has them.

    Under several processes each labels (and caches) its share of the batches, and every process receives
    all of them in order. A batch's cache file and images are read in a background thread ahead of its turn.
    """
    cache = LabelCache(cache_dir, labelling_key(model, dataset, config, negatives))
    embed_candidates = CandidateEmbedder(model, dataset.candidates, config.label_batch_size)
    sampling = Sampling(max_new_tokens=config.max_think_tokens)

    def read(numbered: tuple[int, list[dict]]) -> tuple[int, list[dict], LabelledInputs | None, list[ModelInput]]:
        number, batch = numbered
        cached = cache.load(number, [row["id"] for row in batch])
        return number, batch, cached, [] if cached is not None else [prepared_input(row) for row in batch]

    def label(read_batch: tuple[int, list[dict], LabelledInputs | None, list[ModelInput]]) -> tuple[LabelledInputs, bool]:
        number, batch, cached, inputs = read_batch
        if cached is not None:
            return cached, True
        positives = [dataset.with_copies(row["positive_ids"]) for row in batch]
        labelled = label_batch(model, batch, positives, inputs, embed_candidates, config.hard_negatives, sampling, negatives)
        cache.save(number, labelled)
        return labelled, False

    parts, done, reused = [], 0, 0
    progress("labelling", 0, len(rows))
    numbered = enumerate(labelling_batches(rows, config.label_batch_size))
    for labelled, from_cache in Distributed().map_in_order(label, numbered, prepare=read):
        parts.append(labelled)
        done += len(labelled.ids)
        reused += len(labelled.ids) if from_cache else 0
        progress("labelling", done, len(rows))
    log.info("labelled %d inputs (%d from the cache in %s)", len(rows), reused, cache_dir)
    return LabelledInputs.concatenate(parts)

