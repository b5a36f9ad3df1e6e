"""`twn train-gate`: self-supervised labels for the routing gate, the gate itself, and its threshold τ.

1. Labels. Each training input is embedded twice from one reasoning-adapter prefill: without thinking, and
   with the CoT that the reasoning adapter writes (greedy). A view's retrieval margin is
   s(query, positive) - max s(query, negative), the negatives being the other targets of its labelling batch
   and its hard negatives, all embedded without thinking, and, given one, every entry of a global negatives
   cache (`twn embed DATA -o cache.pt`); never one of the query's positives or a copy of one under another
   id (PreparedDataset.with_copies: an answer that recurs across tasks and splits). The label
   says whether thinking raised the margin by more than δ. The prefill's last prompt state, which the gate
   reads, is kept beside the margins. On a real backbone this is the expensive part, so it is batched and
   every batch is cached in RUN/train/gate-labels/: a rerun labels only what is missing. Margins rather than
   labels are cached, so another δ reuses the cache.
2. The gate, an MLP on the detached last prompt state, trains on those cached states with a class-weighted
   BCE (optionally weighted by the size of the margin change): no backbone pass, and only the gate's
   parameters change. Labels are noisy (most CoTs move the margin a little either way), and an MLP on a
   few thousand states learns them by heart within tens of epochs, so a slice of its training labels
   picks the epoch to keep (early stopping). Its AUROC against labels it never saw is estimated by k-fold
   cross-validation: the labels are split in k folds, each scored by a gate trained the same way on the
   others; the gate that ships then trains on every label (a slice of them picking its epoch). One
   held-out share would waste labels and, on a few hundred, swing by ±0.1 with the draw. Every gate
   starts from a fresh, seeded initialisation, so one trained before cannot leak the folds.
3. τ, on the validation split: the (1 - F) quantile of p_think for a think budget F, or the τ with the best
   validation Hit@1 averaged over tasks, `twn eval`'s headline for image and video tasks (each validation
   query is embedded in both views once; ties go to the higher τ, which thinks less). A validation input
   that was also labelled counts with its held-out p_think, from the fold's gate that never saw it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from twn_cli.atomic import atomic_file, write_text_atomically
from twn_cli.data.negatives_cache import NegativesCache
from twn_cli.data.prepared import CandidateEmbedder, PreparedDataset, prepared_input
from twn_cli.distributed import Distributed
from twn_cli.engine.checkpoint import check_checkpoint_output
from twn_cli.engine.gate import RoutingGate
from twn_cli.engine.model import ModelInput, Sampling, TWNModel
from twn_cli.errors import TWNError
from twn_cli.eval.metrics import auroc
from twn_cli.training import TRAIN_DIR

log = logging.getLogger(__name__)

LABELS_DIR = "gate-labels"  # RUN/train/gate-labels/batch-00000.safetensors, ...
LABELS_LOG = "gate-labels.jsonl"  # RUN/train/: one line per labelled input, for analysis
METRICS_LOG = "gate-metrics.jsonl"  # RUN/train/: the gate's training loss
TARGETS = ("best", "budget")

Progress = Callable[[str, int, int], None]


@dataclass
class TrainGateConfig:
    """Hyper-parameters of train-gate; recipes/<backbone>/train-gate.yaml sets them."""

    # Labels.
    split: str = "train"
    label_queries: int = 2000
    label_batch_size: int = 16  # also the batch of the validation passes
    hard_negatives: int = 4
    delta: float = 0.0
    max_think_tokens: int | None = None  # None: the checkpoint's
    # The gate.
    epochs: int = 200
    batch_size: int = 256
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    margin_weighting: bool = False
    stopping_fraction: float = 0.2  # of the gate's training labels: the epoch with the lowest loss on them is kept
    heldout_folds: int = 5  # the held-out AUROC: each fold scored by a gate trained on the others
    # The threshold.
    target: str = "best"
    think_budget: float = 0.5
    best_tolerance: float = 0.0  # target best: the τ that thinks least within this share of the best Hit@1
    validation_split: str = "validation"
    validation_queries: int = 200
    # Bookkeeping.
    log_every: int = 10
    seed: int = 0

    def __post_init__(self):
        if self.target not in TARGETS:
            raise TWNError(f"target must be 'best' or 'budget', not '{self.target}'")
        if not 0.0 <= self.think_budget <= 1.0:
            raise TWNError(f"think_budget is a share of inputs, between 0 and 1, not {self.think_budget}")
        if not 0.0 <= self.stopping_fraction < 1.0:
            raise TWNError(f"stopping_fraction must be in [0, 1), not {self.stopping_fraction}")
        if self.heldout_folds < 2:
            raise TWNError(f"heldout_folds must be at least 2 (each fold is scored by a gate trained on the others), not {self.heldout_folds}")
        if self.label_batch_size < 2:
            raise TWNError("label_batch_size must be at least 2: the batch's other targets are the negatives")
        if min(self.label_queries, self.validation_queries, self.epochs, self.batch_size, self.log_every) < 1 or self.hard_negatives < 0:
            raise TWNError("label_queries, validation_queries, epochs, batch_size and log_every must be positive, hard_negatives not negative")


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
    encoded = model.encode(inputs)
    prefix, last_state = model.prefill(encoded)
    if model.config.interface == "reencode":
        thoughts = model.think(prefix, sampling)
        never = model.reencode(encoded, [None] * len(inputs))
        think = model.reencode(encoded, [model.strip_end_marker(ids) for ids in thoughts.token_ids])
    else:
        never = model.query_pass(prefix)  # before think(), which extends the prefix's cache in place
        thoughts = model.think(prefix, sampling)
        think = model.query_pass(thoughts.prefix)
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

    @classmethod
    def concatenate(cls, parts: list["LabelledInputs"]) -> "LabelledInputs":
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


# ----------------------------------------------------------------------------------------- the gate
def sample_weights(labels: torch.Tensor, margin_change: torch.Tensor, margin_weighting: bool) -> torch.Tensor:
    """BCE weights: each class present weighs half the total; optionally scaled by the size of the margin change."""
    weights = torch.ones(len(labels))
    for value in (True, False):
        members = labels == value
        if members.any() and not members.all():
            weights[members] = 0.5 * len(labels) / int(members.sum())
    if margin_weighting:
        size = margin_change.abs()
        if float(size.mean()) > 0:
            weights = weights * size / size.mean()
    return weights


def seeded_split(count: int, fraction: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random `fraction` of the rows 0..count-1 (leaving at least one), and the other rows."""
    order = torch.randperm(count, generator=generator)
    taken = min(round(fraction * count), count - 1)
    return order[:taken], order[taken:]


@dataclass
class GateFit:
    """The losses per logged epoch (the kept one marked `kept`), and the rows that picked that epoch."""

    history: list[dict]
    stopping_rows: torch.Tensor

    @property
    def kept(self) -> dict:
        return next(entry for entry in self.history if entry["kept"])


def fit_gate(gate: RoutingGate, features: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, config: TrainGateConfig) -> GateFit:
    """Train `gate` on (last prompt state, label) pairs.

    A seeded `stopping_fraction` of the pairs is kept out of training; the gate ends with the weights of the
    epoch whose weighted loss on them was lowest (marked `kept` in the history). The states are
    standardised for training (hidden states have a few huge dimensions that would dominate the first
    layer), and the standardisation is then folded into the first layer, so the gate reads raw states.
    """
    device = next(gate.parameters()).device
    mean = features.mean(0)
    scale = features.std(0, unbiased=False).clamp_min(1e-3)
    inputs = ((features - mean) / scale).to(device)
    targets, weights = labels.float().to(device), weights.to(device)
    generator = torch.Generator().manual_seed(config.seed)
    stopping, training = (rows.to(device) for rows in seeded_split(len(inputs), config.stopping_fraction, generator))
    if not float(weights[stopping].sum()) > 0:  # nothing to stop on (margin weights can all be zero on a small slice)
        stopping, training = stopping[:0], torch.cat([stopping, training])

    def weighted_loss(rows: torch.Tensor) -> torch.Tensor:
        losses = F.binary_cross_entropy_with_logits(gate.logits(inputs[rows]), targets[rows], reduction="none")
        return (losses * weights[rows]).sum() / weights[rows].sum()

    optimizer = torch.optim.AdamW(gate.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    history, best_loss, best_state, best_epoch = [], float("inf"), None, config.epochs
    with torch.enable_grad():
        for epoch in range(1, config.epochs + 1):
            gate.train()
            train_loss = 0.0
            for rows in training[torch.randperm(len(training), generator=generator).to(device)].split(config.batch_size):
                loss = weighted_loss(rows)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                train_loss += loss.item() * float(weights[rows].sum())
            entry = {"epoch": epoch, "loss": train_loss / float(weights[training].sum())}
            if len(stopping):
                gate.eval()
                with torch.no_grad():
                    entry["stopping_loss"] = weighted_loss(stopping).item()
                if entry["stopping_loss"] < best_loss:
                    best_loss, best_epoch = entry["stopping_loss"], epoch
                    best_state = {name: value.clone() for name, value in gate.state_dict().items()}
            history.append(entry)
    if best_state is not None:
        gate.load_state_dict(best_state)
    gate.eval()
    gate.absorb_input_scaling(mean, scale)
    logged = (entry for entry in history if entry["epoch"] % config.log_every == 0 or entry["epoch"] in (config.epochs, best_epoch))
    return GateFit([{**entry, "kept": entry["epoch"] == best_epoch} for entry in logged], stopping.cpu())


def assign_folds(labels: torch.Tensor, folds: int, seed: int) -> torch.Tensor:
    """Each input's fold, 0 to folds - 1: a seeded shuffle dealt out in turn, 'think' labels first, so that
    every fold holds its share of each class."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    order = torch.cat([order[labels[order]], order[~labels[order]]])
    fold_of = torch.empty(len(labels), dtype=torch.int64)
    fold_of[order] = torch.arange(len(labels)) % folds
    return fold_of


def out_of_fold_scores(
    labels: torch.Tensor, folds: int, seed: int, score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(each input's fold, its score from `score(trained rows, scored rows)` fitted on the other folds)."""
    fold_of = assign_folds(labels, folds, seed)
    scores = torch.empty(len(labels))
    for fold in range(folds):
        scored, trained = (fold_of == fold).nonzero().flatten(), (fold_of != fold).nonzero().flatten()
        scores[scored] = score(trained, scored)
    return fold_of, scores


def probabilities_of_a_copy_trained_on(
    gate: RoutingGate, features: torch.Tensor, labels: torch.Tensor, margin_change: torch.Tensor,
    trained: torch.Tensor, scored: torch.Tensor, config: TrainGateConfig,
) -> torch.Tensor:
    """p_think of the `scored` rows from a copy of `gate` trained as `fit_gate` trains, on the `trained` rows."""
    fold_gate = copy.deepcopy(gate)
    fit_gate(fold_gate, features[trained], labels[trained], sample_weights(labels[trained], margin_change[trained], config.margin_weighting), config)
    return gate_probabilities(fold_gate, features[scored])


def heldout_probabilities(
    gate: RoutingGate, features: torch.Tensor, labels: torch.Tensor, margin_change: torch.Tensor, config: TrainGateConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """(each input's fold, its p_think from a copy of `gate` trained as `fit_gate` trains, on the other folds)."""

    def score(trained: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
        return probabilities_of_a_copy_trained_on(gate, features, labels, margin_change, trained, scored, config)

    return out_of_fold_scores(labels, min(config.heldout_folds, len(labels)), config.seed + 1, score)


@torch.no_grad()
def gate_probabilities(gate: RoutingGate, features: torch.Tensor) -> torch.Tensor:
    return gate(features.to(next(gate.parameters()).device)).cpu()


# ----------------------------------------------------------------------------------------- the threshold
def choosing_probabilities(p_validation: torch.Tensor, validation_ids: list[str], labelled_ids: list[str], p_heldout: torch.Tensor) -> torch.Tensor:
    """The p_think that τ is chosen on: a validation input the gate trained on carries its held-out p_think instead.

    On inputs it learnt from, the gate ranks where thinking helped better than it will on new inputs, so a
    τ chosen on them thinks where it happened to pay there (the toy recipe labels the validation split).
    """
    heldout = dict(zip(labelled_ids, p_heldout.tolist()))
    return torch.tensor([heldout.get(input_id, float(p)) for input_id, p in zip(validation_ids, p_validation)])


@dataclass
class ValidationViews:
    """Each validation query's gate input, whether each view ranks a gold first, its CoT length, and its
    weight in the validation score."""

    ids: list[str]
    features: torch.Tensor
    hit_never: torch.Tensor
    hit_think: torch.Tensor
    reasoning_tokens: torch.Tensor
    weights: torch.Tensor


def task_weights(tasks: list[str]) -> torch.Tensor:
    """Weights that make a weighted mean of per-query hits the mean over tasks of each task's Hit@1: the
    MMEB-style score `twn eval` reports for image and video tasks, in which a task of 25 queries counts as
    much as one of 300."""
    sizes = Counter(tasks)
    return torch.tensor([1.0 / (len(sizes) * sizes[task]) for task in tasks], dtype=torch.float64)


def is_hit(query: torch.Tensor, pool: torch.Tensor, gold: torch.Tensor) -> bool:
    """Whether a gold candidate ranks first; ties count against the gold, as in `twn eval`."""
    if not gold.any():
        return False
    scores = pool @ query
    return not bool((~gold).any()) or float(scores[gold].max()) > float(scores[~gold].max())


def validation_views(model: TWNModel, dataset: PreparedDataset, config: TrainGateConfig, progress: Progress = lambda phase, done, total: None) -> ValidationViews:
    """Both views of up to `validation_queries` validation queries, judged against their candidate pools.

    Under several processes each embeds its share of the candidate and query batches, and every process
    receives all of them in order.
    """
    split = dataset.queries[config.validation_split]
    rows = [split[i] for i in range(min(config.validation_queries, len(split)))]
    if not rows:
        raise TWNError(f"the '{config.validation_split}' split is empty: τ is chosen on it")
    distributed = Distributed()
    pools = [dataset.candidate_pool(row) for row in rows]
    needed = sorted({candidate for pool in pools for candidate in pool})
    embeddings = dict(zip(needed, CandidateEmbedder(model, dataset.candidates, config.label_batch_size).shared_by(distributed, needed)))
    sampling = Sampling(max_new_tokens=config.max_think_tokens)

    def judge(read_batch: tuple[int, list[dict], list[ModelInput]]) -> tuple[torch.Tensor, list[int], list[bool], list[bool]]:
        """The batch's gate inputs, reasoning tokens, and whether each view ranks a positive first."""
        start, batch, inputs = read_batch
        views = embed_views(model, inputs, sampling)
        hits_never, hits_think = [], []
        for offset, row in enumerate(batch):
            pool = pools[start + offset]
            pool_embeddings = torch.stack([embeddings[c] for c in pool])
            gold = torch.tensor([c in row["positive_ids"] for c in pool])
            hits_never.append(is_hit(views.never[offset], pool_embeddings, gold))
            hits_think.append(is_hit(views.think[offset], pool_embeddings, gold))
        return views.last_prompt_state, views.reasoning_tokens, hits_never, hits_think

    def read(start: int) -> tuple[int, list[dict], list[ModelInput]]:
        batch = rows[start : start + config.label_batch_size]
        return start, batch, [prepared_input(row) for row in batch]

    features, hit_never, hit_think, tokens = [], [], [], []
    progress("validation", 0, len(rows))
    for state, reasoning_tokens, never, think in distributed.map_in_order(judge, range(0, len(rows), config.label_batch_size), prepare=read):
        features.append(state)
        tokens.extend(reasoning_tokens)
        hit_never += never
        hit_think += think
        progress("validation", len(hit_never), len(rows))
    return ValidationViews(
        [row["id"] for row in rows],
        torch.cat(features),
        torch.tensor(hit_never),
        torch.tensor(hit_think),
        torch.tensor(tokens, dtype=torch.int64),
        task_weights([row["task"] for row in rows]),
    )


def threshold_for_budget(p_think: torch.Tensor, budget: float) -> float:
    """The highest τ at which a share `budget` of these inputs think (p_think ≥ τ): their (1 - budget) quantile."""
    ordered = p_think.float().sort(descending=True).values
    thinking = round(budget * len(ordered))
    if thinking == 0:
        return float(torch.nextafter(ordered[0], torch.tensor(float("inf"))))  # just above every p_think
    return float(ordered[thinking - 1])


def best_threshold(
    p_think: torch.Tensor, hit_never: torch.Tensor, hit_think: torch.Tensor, weights: torch.Tensor, tolerance: float = 0.0
) -> float:
    """The highest τ whose score (the `weights`-weighted Hit@1, inputs with p_think ≥ τ using their think
    view) is within `tolerance` of the best.

    With no tolerance, ties go to the higher τ, which thinks less; a tolerance (a share of Hit@1, 0.005 for
    half a point) trades that much validation score for fewer reasoning tokens.
    """
    p_think = p_think.float()
    above_all = float(torch.nextafter(p_think.max(), torch.tensor(float("inf"))))
    points = [(above_all, weighted_hit_rate(hit_never, weights))]
    for tau in sorted(set(p_think.tolist()), reverse=True):
        points.append((tau, weighted_hit_rate(torch.where(p_think >= tau, hit_think, hit_never), weights)))
    enough = max(score for _, score in points) - tolerance
    return next(tau for tau, score in points if score >= enough - 1e-9)


def weighted_hit_rate(hits: torch.Tensor, weights: torch.Tensor) -> float:
    return float((hits.double() * weights).sum() / weights.sum())


def adaptive_outcome(p_think: torch.Tensor, tau: float, validation: ValidationViews) -> dict:
    """Think rate, Hit@1 (mean over tasks) and reasoning tokens per query on validation at τ, beside never and always."""
    thinking = p_think.float() >= tau
    count = len(thinking)
    return {
        "queries": count,
        "think_rate": float(thinking.double().mean()),
        "hit@1_never": weighted_hit_rate(validation.hit_never, validation.weights),
        "hit@1_always": weighted_hit_rate(validation.hit_think, validation.weights),
        "hit@1_adaptive": weighted_hit_rate(torch.where(thinking, validation.hit_think, validation.hit_never), validation.weights),
        "reasoning_tokens_per_query": float((validation.reasoning_tokens * thinking).sum()) / count,
        "reasoning_tokens_per_query_always": float(validation.reasoning_tokens.sum()) / count,
    }


# ----------------------------------------------------------------------------------------- the stage
def run_train_gate(
    model: TWNModel,
    dataset: PreparedDataset,
    run_dir: Path,
    config: TrainGateConfig,
    *,
    negatives: NegativesCache | None = None,
    progress: Progress = lambda phase, done, total: None,
) -> dict:
    """Label (against `negatives` too, given a cache), train the gate, pick τ (set as `model.config.gate_threshold`);
    returns the summary for twn.json."""
    run_dir = Path(run_dir)
    check_checkpoint_output(run_dir)
    for split in (config.split, config.validation_split):
        if split not in dataset.queries:
            raise TWNError(f"prepared dataset '{dataset.path}' has no '{split}' split (it has {', '.join(dataset.queries)})")
    rows = labelling_rows(dataset, config)
    if len(rows) < 2:
        raise TWNError(f"the '{config.split}' split has {len(rows)} queries: labelling needs at least 2")
    train_dir = run_dir / TRAIN_DIR
    labelled = label_inputs(model, dataset, rows, train_dir / LABELS_DIR, config, progress, negatives)
    validation = validation_views(model, dataset, config, progress)

    labels = labelled.labels(config.delta)
    if labels.all() or not labels.any():
        log.warning("all %d labels are %s: the gate can only learn one answer", len(labels), "'think'" if labels.all() else "'do not think'")
    progress("gate", 0, 2)
    model.gate.reset(config.seed)  # a gate trained before (a train-rl checkpoint's) has seen every fold
    fold_of, p_heldout = heldout_probabilities(model.gate, labelled.features, labels, labelled.margin_change, config)
    progress("gate", 1, 2)
    fit = fit_gate(model.gate, labelled.features, labels, sample_weights(labels, labelled.margin_change, config.margin_weighting), config)
    stopping = fit.stopping_rows
    trained = (~torch.isin(torch.arange(len(labels)), stopping)).nonzero().flatten()
    progress("gate", 2, 2)
    p_labelled = gate_probabilities(model.gate, labelled.features)
    p_validation = choosing_probabilities(gate_probabilities(model.gate, validation.features), validation.ids, labelled.ids, p_heldout)

    if config.target == "budget":
        tau = threshold_for_budget(p_validation, config.think_budget)
    else:
        tau = best_threshold(p_validation, validation.hit_never, validation.hit_think, validation.weights, config.best_tolerance)
    model.config.gate_threshold = tau
    if Distributed().is_main:
        _write_logs(train_dir, rows, labelled, labels, fold_of, p_heldout, set(stopping.tolist()), p_labelled, fit.history)
    return {
        "threshold": tau,
        "target": config.target,
        "think_budget": config.think_budget if config.target == "budget" else None,
        "delta": config.delta,
        "feature": "last prompt state of the reasoning-adapter prefill",
        "labels": label_statistics(rows, labelled, labels, config),
        "negatives_cache": {"entries": len(negatives.ids), "sha256": negatives.digest()} if negatives is not None else None,
        "auroc": {
            "heldout": auroc(p_heldout, labels),
            "heldout_inputs": len(labels),
            "heldout_folds": len(fold_of.unique()),
            "train": auroc(p_labelled[trained], labels[trained]),
            "train_inputs": len(trained),
            "stopping": auroc(p_labelled[stopping], labels[stopping]),
            "stopping_inputs": len(stopping),
        },
        "gate_loss": fit.kept["loss"],
        "gate_epoch": fit.kept["epoch"],
        "validation": {"split": config.validation_split, **adaptive_outcome(p_validation, tau, validation)},
    }


def label_statistics(rows: list[dict], labelled: LabelledInputs, labels: torch.Tensor, config: TrainGateConfig) -> dict:
    """How often thinking helped (overall and by the queries' difficulty tag, where the data has one)."""
    statistics = {
        "split": config.split,
        "inputs": len(labels),
        "think_helps": int(labels.sum()),
        "think_helps_rate": float(labels.double().mean()),
        "mean_margin_change": float(labelled.margin_change.mean()),
        "mean_reasoning_tokens": float(labelled.reasoning_tokens.float().mean()),
    }
    by_difficulty: dict[str, list[bool]] = {}
    for row, label in zip(rows, labels.tolist()):
        if row.get("difficulty"):
            by_difficulty.setdefault(row["difficulty"], []).append(label)
    if by_difficulty:
        statistics["think_helps_rate_by_difficulty"] = {name: sum(values) / len(values) for name, values in sorted(by_difficulty.items())}
    return statistics


def _write_logs(train_dir, rows, labelled, labels, fold_of, p_heldout, stopping, p_think, history) -> None:
    """RUN/train/gate-labels.jsonl (every labelled input) and gate-metrics.jsonl, each written atomically."""
    records = [
        {
            "id": row["id"],
            "task": row["task"],
            "difficulty": row.get("difficulty", ""),
            "label": bool(labels[i]),
            "margin_never": float(labelled.margin_never[i]),
            "margin_think": float(labelled.margin_think[i]),
            "reasoning_tokens": int(labelled.reasoning_tokens[i]),
            "cot": labelled.cots[i],
            "fold": int(fold_of[i]),
            "p_think_heldout": float(p_heldout[i]),
            "stopping": i in stopping,
            "p_think": float(p_think[i]),
        }
        for i, row in enumerate(rows)
    ]
    for name, lines in ((LABELS_LOG, records), (METRICS_LOG, history)):
        write_text_atomically(train_dir / name, "".join(json.dumps(line) + "\n" for line in lines))
