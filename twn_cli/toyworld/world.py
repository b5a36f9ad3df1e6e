"""The toy reasoning world: scenes, MMEB-like tasks, clue queries with teacher CoTs, and held-out splits.

Design rules (what a prototype on 2 CPU cores taught us; docs/design.md):
- Reasoning is necessary on the test split. Each of its reasoning queries uses a clue phrasing or a clue
  fact that the train split never uses, and about half of its targets are colour-shape combinations that
  train never shows. Validation is drawn the same way (independent records), so that a threshold chosen on
  it meets the same shift. The backbone still learns every fact and phrasing from
  `pretraining_examples`, so a CoT that writes the knowledge out can solve them.
- A clue never contains the words of its answer, and the other shapes in a text-to-image target avoid the
  query's colour and shape words: string matching cannot solve a reasoning query, while the hard negatives
  carry exactly the query's words (the colours a mix is made of, the shape a side count starts from).
- Every query has a rule-made teacher CoT ending with its resolved description, short for simple queries,
  so that always-think is a real baseline.
- `hedged` queries are the regime where thinking adds noise (see `HEDGED_T2I_TEMPLATES`).

The knowledge and clue phrasings are in `knowledge.py`, the backbone's pre-training examples in
`pretraining_data.py`. This module stays one (about 600 lines): the phrasing tables and `_SplitBuilder`,
which draws every task's records from them, are the rules of one draw and read best together.
"""

from __future__ import annotations

import itertools
import math
import random
import re
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace

from PIL import Image

from twn_cli.errors import TWNError
from twn_cli.toyworld.knowledge import CLUE_TEMPLATES, KNOWLEDGE, Clue, Fact, HeldOut, held_out_elements, with_article
from twn_cli.toyworld.render import PICTURE_SIZE, Scene, SceneObject, render_scene
from twn_cli.toyworld.vocabulary import (
    COLOURS,
    NUMBER_WORDS,
    POSITIONS,
    SHAPES,
    SIDES,
    SIZES,
)

SPLIT_SHARES = {"train": 0.7, "validation": 0.1, "test": 0.2}
# The splits drawn with the held-out elements. Validation is drawn like test (independent records), so that
# what is chosen on it (the gate's τ) meets the shift that test holds; nothing trains on either.
HELD_OUT_SPLITS = ("validation", "test")
META_TASKS = {"t2i": "retrieval", "i2t": "retrieval", "classification": "classification", "vqa": "vqa"}
TASK_SHARES = {"t2i": 0.4, "vqa": 0.3, "i2t": 0.15, "classification": 0.15}
# Shares of the tasks that have reasoning queries (t2i, vqa); the others are all `simple`.
DIFFICULTY_SHARES = {"simple": 0.3, "one_step": 0.25, "two_step": 0.3, "hedged": 0.15}
OBJECT_COUNT_WEIGHTS = {1: 0.5, 2: 0.3, 3: 0.2}
# On validation and test: the share of targets drawn from the held-out colour-shape combinations.
HELD_OUT_TARGET_SHARE = 0.5
# Share of question scenes whose other shapes carry a colour or shape word of the question.
LURE_SHARE = 0.5
HARD_NEGATIVES = 2

INSTRUCTIONS = {
    "t2i": "Find a picture that contains the described shape.",
    "i2t": "Find the caption that describes this picture.",
    "classification/shape": "Classify the shape in the picture.",
    "classification/colour": "Classify the colour of the shape in the picture.",
    "vqa": "Answer the question about the picture.",
}
POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "centre": "in the centre",
}
COUNT_ANSWERS = NUMBER_WORDS[1:4]
# Every answer a label or answer pool offers, whether or not a query of the split asks for it.
LABEL_POOLS = {
    "classification/shape": tuple(SHAPES),
    "classification/colour": tuple(COLOURS),
    "vqa/colour": tuple(COLOURS),
    "vqa/shape": tuple(SHAPES),
    "vqa/position": POSITIONS,
    "vqa/count": COUNT_ANSWERS,
}

# What the lazy teacher writes for the clue queries it skips (`generate_world`): no knowledge, only words the
# backbone's pre-training writes (a word it never writes, such as the clue phrasings', no adapter can make likely).
LAZY_TEACHER_COT = "the query names the shape; so the shape"

# (colour form, shape form) a query may take: "direct" names the value, a fact kind gives a clue, None
# leaves the attribute out.
QUERY_FORMS = {
    "simple": [("direct", "direct")],
    "hedged": [("direct", "direct")],
    "one_step": [("colour_thing", "direct"), ("direct", "shape_feature")],
    "two_step": [
        ("colour_mix", "direct"),
        ("direct", "shape_relation"),
        *itertools.product(("colour_thing", "colour_mix"), ("shape_feature", "shape_relation")),
    ],
}
# VQA: which forms each kind of question takes per difficulty. A colour question names its shape, a shape
# question its colour, a position question both; counting has no reasoning form.
VQA_FORMS = {
    "colour": {
        "simple": [(None, "direct")],
        "hedged": [(None, "direct")],
        "one_step": [(None, "shape_feature")],
        "two_step": [(None, "shape_relation")],
    },
    "shape": {
        "simple": [("direct", None)],
        "hedged": [("direct", None)],
        "one_step": [("colour_thing", None)],
        "two_step": [("colour_mix", None)],
    },
    "position": QUERY_FORMS,
    "count": {"simple": [(None, None)], "hedged": [(None, None)]},
}
VQA_TEMPLATES = {
    "colour": ("what colour is the {reference}?",),
    "shape": ("which shape is {predicate}?",),
    "position": ("where is the {reference}?",),
    "count": ("how many shapes are there?",),
}
# Hedged queries name everything directly, like simple ones, but in vague wording, and their teacher CoT
# hedges between the answer and the hard negatives' colours and shapes before resolving. They exist
# because the paper observed that thinking on easy inputs adds nothing or misleads: embedding a CoT that
# names wrong colours and shapes pulls the query towards its hard negatives. Their wording is what sets
# them apart, so a gate can learn from the input alone that thinking does not pay off here.
HEDGED_T2I_TEMPLATES = ("something that looks like {description}", "what seems to be {description}", "roughly {description}")
HEDGED_VQA_TEMPLATES = {
    "colour": ("roughly what colour is the {reference}?", "what colour does the {reference} seem to be?"),
    "shape": ("roughly which shape is {predicate}?", "which shape seems to be {predicate}?"),
    "position": ("roughly where is the {reference}?", "where does the {reference} seem to be?"),
    "count": ("roughly how many shapes are there?",),
}
COLOUR_HEDGES = ("it might be {x} or {y}", "perhaps {x}, perhaps {y}", "it could be {x} or {y}")
SHAPE_HEDGES = ("{x} or maybe {y}", "either {x} or {y}", "possibly {x}, possibly {y}")
VALUE_HEDGES = ("maybe {x} or {y}", "either {x} or {y}")

# For picking look-alike hard negatives: a circle looks like a many-sided polygon, a star like a pentagon.
_APPARENT_SIDES = {**SHAPES, "circle": 12, "star": 5}
_COLOUR_AND_SHAPE_WORDS = frozenset(COLOURS) | frozenset(SIDES)


def describe_object(colour: str, shape: str) -> str:
    """The canonical description of a target: 'a green pentagon'."""
    return with_article(f"{colour} {shape}")


def describe_scene(scene: Scene) -> str:
    """A scene's caption, objects in the fixed order of POSITIONS: 'a large green pentagon on the left and ...'."""
    parts = [
        with_article(f"{obj.size} {obj.colour} {obj.shape} {POSITION_PHRASES[obj.position]}")
        for obj in sorted(scene.objects, key=lambda obj: POSITIONS.index(obj.position))
    ]
    return _join(parts)


def what_the_picture_shows(scene: Scene) -> str:
    """The CoT's look at a picture: 'the picture shows a red triangle and a blue square'."""
    objects = sorted(scene.objects, key=lambda obj: POSITIONS.index(obj.position))
    return "the picture shows " + _join([describe_object(obj.colour, obj.shape) for obj in objects])


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


@dataclass(frozen=True)
class SceneImage:
    """A picture to render: its scene and the seed of its fixed render."""

    scene: Scene
    render_seed: int

    def render(self, image_size: int = PICTURE_SIZE, fresh: bool = False) -> Image.Image:
        """The fixed render of this picture, or with `fresh` a new one of the same content."""
        return render_scene(self.scene, image_size, None if fresh else random.Random(self.render_seed))

    @classmethod
    def from_dict(cls, data: dict) -> SceneImage:
        return cls(Scene.from_dict(data["scene"]), data["render_seed"])


@dataclass(frozen=True)
class Candidate:
    """A retrieval target: a caption or answer (`text`), or a picture (`images`)."""

    id: str
    text: str
    images: tuple[SceneImage, ...]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Record:
    """One query with its targets.

    `positive_ids` are the query's own target(s); `gold_ids` every candidate of its pool that answers it
    (for t2i, every picture in the pool that contains the resolved shape). `clues`, `held_out` (the held-out
    elements it uses: "combination" for its target shape's colour and shape, "fact", "phrasing") and
    `difficulty` are for analysis only.
    """

    id: str
    task: str
    meta_task: str
    instruction: str
    text: str
    images: tuple[SceneImage, ...]
    positive_ids: tuple[str, ...]
    hard_negative_ids: tuple[str, ...]
    pool: str
    gold_ids: tuple[str, ...]
    cot: str
    difficulty: str
    resolved: str
    clues: tuple[Clue, ...]
    held_out: tuple[str, ...]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Split:
    """The records of a split, its candidates by id, and its candidate pools (pool name -> candidate ids)."""

    name: str
    records: list[Record]
    candidates: dict[str, Candidate]
    pools: dict[str, tuple[str, ...]]


@dataclass
class World:
    seed: int
    held_out: HeldOut
    splits: dict[str, Split]
    # Validation beyond its first block (generate_world's validation_size), each block with pools of its own.
    more_validation: list[Split] = field(default_factory=list)

    def __getitem__(self, split: str) -> Split:
        return self.splits[split]


def generate_world(
    n: int = 4000, seed: int = 0, split_shares: dict[str, float] = SPLIT_SHARES, validation_size: int | None = None, rl_size: int = 0,
    lazy_teacher_share: float = 0.0,
    near_miss_teacher_share: float = 0.0,
) -> World:
    """A world of `n` records over the splits; the same seed gives the same world.

    `rl_size`: an `rl` split of that many records drawn like train (its phrasings, facts and combinations)
    that train-embed never reads: queries whose CoTs SFT did not fit, for train-rl.

    `validation_size`: validation holds that many records instead of its share of `n`, drawn in blocks the
    size of the test split, each with candidate pools of its own, so that every validation query is ranked
    against a pool like a test query's; train and test stay as they are.

    `lazy_teacher_share`: an imperfect teacher. That share of the clue queries of train (and rl) get the teacher
    CoT `LAZY_TEACHER_COT`, which resolves nothing: SFT then learns to think without writing the knowledge
    out, which RL rewarded from the embedding space can unlearn. Validation and test keep the
    resolving CoTs (they only describe the records), and the rest of the world does not change.

    `near_miss_teacher_share`: a teacher that errs as a real one does. That share of the clue queries of
    train (and rl) get the CoT of a near miss: a text-to-image query's CoT resolves one of its clues to the
    value its hard negative carries (`_misresolved`: the step's own arithmetic or mix may then disagree with
    its conclusion, as a careless teacher's does), a question's CoT reads the picture wrong and answers with
    the first hard negative's value. SFT then learns to err that often when it samples; a wrong CoT retrieves the hard negative, so
    the reward RL reads from the embedding space ranks it below the right one.
    """
    if lazy_teacher_share + near_miss_teacher_share > 1:
        raise TWNError(f"the lazy and near-miss teacher shares add up to more than 1 ({lazy_teacher_share} + {near_miss_teacher_share}): a query has one teacher")
    held_out = held_out_elements(seed)
    counts = _allocate(n, split_shares)
    if validation_size is not None:
        counts["validation"] = 0
    if rl_size:
        counts["rl"] = rl_size
    splits = {name: _SplitBuilder(name, seed, held_out, lazy_teacher_share=lazy_teacher_share, near_miss_teacher_share=near_miss_teacher_share).build(count) for name, count in counts.items()}
    more = []
    if validation_size is not None:
        block_count = max(1, math.ceil(validation_size / max(1, counts["test"])))
        sizes = list(_allocate(validation_size, {block: 1.0 for block in range(1, block_count + 1)}).values())
        splits["validation"], *more = (_SplitBuilder("validation", seed, held_out, block).build(size) for block, size in enumerate(sizes, 1))
    return World(seed, held_out, splits, more)


def _allocate(total: int, shares: dict[str, float]) -> dict[str, int]:
    """Split `total` by `shares` into whole counts that add up (largest remainders first)."""
    exact = {name: total * share / sum(shares.values()) for name, share in shares.items()}
    counts = {name: int(value) for name, value in exact.items()}
    by_remainder = sorted(exact, key=lambda name: exact[name] - counts[name], reverse=True)
    for name in by_remainder[: total - sum(counts.values())]:
        counts[name] += 1
    return counts


def confusable_colours(colour: str) -> list[str]:
    return sorted((other for other in COLOURS if other != colour), key=lambda other: math.dist(COLOURS[other], COLOURS[colour]))


def _confusable_shapes(shape: str) -> list[str]:
    apparent_sides = _APPARENT_SIDES[shape]
    return sorted((other for other in SHAPES if other != shape), key=lambda other: abs(_APPARENT_SIDES[other] - apparent_sides))


def noun_phrase(colour: str | Clue | None, shape: str | Clue | None) -> str:
    """How a query refers to an object: 'green pentagon', 'pentagon coloured like grass', 'shape with five sides, ...'."""
    head = shape.text if isinstance(shape, Clue) else shape or "shape"
    if colour is None:
        return head
    if isinstance(colour, Clue):
        return f"{head}, {colour.text}" if isinstance(shape, Clue) else f"{head} {colour.text}"
    return f"{colour} {head}"


def hedge(rng: random.Random, templates: tuple[str, ...], answer: str, lure: str) -> str:
    first, second = rng.sample([answer, lure], 2)
    return rng.choice(templates).format(x=first, y=second)


def _misresolved(clue: Clue, wrong: str) -> str:
    """The CoT step of `clue` resolved to `wrong`, in the clue's own order of a mix's colours."""
    swapped = clue.explanation != clue.fact.explanation(swap=False)
    return replace(clue.fact, answer=wrong).explanation(swap=swapped)


def _spoken(question: str, answer: str) -> str:
    """An answer as a CoT says it: 'a pentagon', 'on the left', 'green'."""
    if question == "shape":
        return with_article(answer)
    return POSITION_PHRASES[answer] if question == "position" else answer


def random_scene(
    rng: random.Random,
    allowed_pairs: list[tuple[str, str]],
    first: tuple[str, str],
    count: int | None = None,
    avoid_words: set[str] = frozenset(),
    lure_words: set[str] = frozenset(),
) -> Scene:
    """A scene whose first object is `first` (colour, shape); all objects differ in colour and in shape.

    The other objects avoid `avoid_words` and, in a share of scenes, carry one of `lure_words`.
    """
    count = count or rng.choices(list(OBJECT_COUNT_WEIGHTS), weights=list(OBJECT_COUNT_WEIGHTS.values()))[0]
    positions = rng.sample(POSITIONS, count)
    colour, shape = first
    objects = [SceneObject(shape, colour, rng.choice(SIZES), positions[0])]
    for position in positions[1:]:
        taken = {obj.colour for obj in objects} | {obj.shape for obj in objects} | avoid_words
        pairs = [(c, s) for c, s in allowed_pairs if c not in taken and s not in taken]
        lure_pairs = [(c, s) for c, s in pairs if c in lure_words or s in lure_words]
        colour, shape = rng.choice(lure_pairs if lure_pairs and rng.random() < LURE_SHARE else pairs)
        objects.append(SceneObject(shape, colour, rng.choice(SIZES), position))
    return Scene(tuple(objects))


class _SplitBuilder:
    """Draws the records of one split, registering their candidates and pools as it goes."""

    def __init__(
        self, name: str, seed: int, held_out: HeldOut, block: int = 1, lazy_teacher_share: float = 0.0, near_miss_teacher_share: float = 0.0
    ):
        self.name = name
        # Ids and the random stream of a split's first block are those of a world drawn without more blocks.
        self.id_prefix = name if block == 1 else f"{name}-{block}"
        self.draws_held_out = name in HELD_OUT_SPLITS
        self.held_out = held_out
        self.rng = random.Random(f"toyworld/{seed}/{self.id_prefix}")
        # Streams of their own, so that an imperfect teacher changes CoTs and nothing else of the world, and a
        # near miss's choice of clue leaves the draws that decide each query's teacher as they were.
        self.teacher_rng = random.Random(f"toyworld/{seed}/{self.id_prefix}/teacher")
        self.near_miss_rng = random.Random(f"toyworld/{seed}/{self.id_prefix}/teacher/near-miss")
        # The held-out splits only describe their records: their teacher is always right.
        self.lazy_teacher_share = 0.0 if self.draws_held_out else lazy_teacher_share
        self.near_miss_teacher_share = 0.0 if self.draws_held_out else near_miss_teacher_share
        self.allowed_pairs = [(c, s) for c in COLOURS for s in SHAPES if self.draws_held_out or (c, s) not in held_out.combinations]
        self.allowed_facts: dict[tuple[str, str], list[Fact]] = defaultdict(list)
        for fact in KNOWLEDGE:
            if self.draws_held_out or fact not in held_out.facts:
                self.allowed_facts[fact.kind, fact.answer].append(fact)
        self.candidates: dict[str, Candidate] = {}
        self.pools: dict[str, list[str]] = defaultdict(list)
        self.text_ids: dict[tuple[str, str], str] = {}
        self.drafts: list[dict] = []
        for pool, labels in LABEL_POOLS.items():
            for label in labels:
                self._add_text(pool, label)

    def build(self, count: int) -> Split:
        slots = []
        for task, task_count in _allocate(count, TASK_SHARES).items():
            if task in ("t2i", "vqa"):
                for difficulty, difficulty_count in _allocate(task_count, DIFFICULTY_SHARES).items():
                    slots += [(task, difficulty)] * difficulty_count
            else:
                slots += [(task, "simple")] * task_count
        self.rng.shuffle(slots)
        for task, difficulty in slots:
            {"t2i": self._t2i, "i2t": self._i2t, "classification": self._classification, "vqa": self._vqa}[task](difficulty)
        return self._finish()

    # -- what a split may use ---------------------------------------------------------------------------

    def _templates(self, kind: str) -> list[str]:
        return [t for t in CLUE_TEMPLATES[kind] if self.draws_held_out or t not in self.held_out.templates]

    def _pair_allowed(self, colour: str, shape: str) -> bool:
        return self.draws_held_out or (colour, shape) not in self.held_out.combinations

    def _choose_target(self, forms: list[tuple[str | None, str | None]]) -> tuple[str, str, tuple[str | None, str | None]]:
        """A target (colour, shape) and query forms that this split's facts can express for it."""

        def expressible(form: str | None, answer: str) -> bool:
            return form in (None, "direct") or bool(self.allowed_facts[form, answer])

        novel = self.draws_held_out and self.rng.random() < HELD_OUT_TARGET_SHARE
        for colour_form, shape_form in self.rng.sample(forms, len(forms)):
            pairs = [(c, s) for c, s in self.allowed_pairs if expressible(colour_form, c) and expressible(shape_form, s)]
            if novel:
                pairs = [pair for pair in pairs if pair in self.held_out.combinations] or pairs
            if pairs:
                colour, shape = self.rng.choice(pairs)
                return colour, shape, (colour_form, shape_form)
        raise AssertionError(f"no target can take the forms {forms}")

    def _references(
        self, forms: tuple[str | None, str | None], colour: str, shape: str
    ) -> tuple[str | Clue | None, str | Clue | None, tuple[Clue, ...]]:
        """The query's way of naming colour and shape, and its clues (shape clue first, as the CoT reads).

        On validation and test one clue of every reasoning query uses a held-out fact or phrasing.
        """
        colour_form, shape_form = forms
        slots = [(form, answer) for form, answer in ((shape_form, shape), (colour_form, colour)) if form not in (None, "direct")]
        novel_slot = self.rng.randrange(len(slots)) if self.draws_held_out and slots else None
        clues = tuple(self._clue(kind, answer, novel=index == novel_slot) for index, (kind, answer) in enumerate(slots))
        by_attribute = {clue.fact.attribute: clue for clue in clues}

        def reference(form: str | None, value: str, attribute: str) -> str | Clue | None:
            return None if form is None else value if form == "direct" else by_attribute[attribute]

        return reference(colour_form, colour, "colour"), reference(shape_form, shape, "shape"), clues

    def _clue(self, kind: str, answer: str, novel: bool) -> Clue:
        facts, templates = self.allowed_facts[kind, answer], self._templates(kind)
        if novel:
            held_facts = [fact for fact in facts if fact in self.held_out.facts]
            if held_facts and self.rng.random() < 0.5:
                facts = held_facts
            else:
                templates = [template for template in templates if template in self.held_out.templates]
        fact, template, swap = self.rng.choice(facts), self.rng.choice(templates), self.rng.random() < 0.5
        return Clue.of(fact, template, swap)

    def _teacher_cot(self, difficulty: str, steps: list[str], near_miss_steps: list[str]) -> str:
        """The rule-made CoT; for a clue query the imperfect teacher gets wrong, one that resolves nothing
        (lazy) or the near miss's. One draw decides, so a lazy teacher's CoTs do not depend on the near misses."""
        draw = self.teacher_rng.random()
        if difficulty not in ("one_step", "two_step"):
            return "; ".join(steps)
        if draw < self.lazy_teacher_share:
            return LAZY_TEACHER_COT
        if draw < self.lazy_teacher_share + self.near_miss_teacher_share:
            return "; ".join(near_miss_steps)
        return "; ".join(steps)

    # -- candidates ---------------------------------------------------------------------------------------

    def _add_text(self, pool: str, text: str) -> str:
        if (pool, text) not in self.text_ids:
            self.text_ids[pool, text] = self._add_candidate(pool, text, ())
        return self.text_ids[pool, text]

    def _add_image(self, pool: str, scene: Scene) -> str:
        return self._add_candidate(pool, "", (self._image(scene),))

    def _add_candidate(self, pool: str, text: str, images: tuple[SceneImage, ...]) -> str:
        candidate_id = f"{self.id_prefix}/{pool}/{len(self.pools[pool]):05d}"
        self.candidates[candidate_id] = Candidate(candidate_id, text, images)
        self.pools[pool].append(candidate_id)
        return candidate_id

    def _image(self, scene: Scene) -> SceneImage:
        return SceneImage(scene, self.rng.getrandbits(31))

    def _scene(self, colour: str, shape: str, **kwargs) -> Scene:
        return random_scene(self.rng, self.allowed_pairs, (colour, shape), **kwargs)

    def _draft(self, task: str, instruction: str, text: str, **fields) -> None:
        """Keep a record until the split is complete (t2i gold ids need every picture of the pool)."""
        held_out = []
        if fields["target"] in self.held_out.combinations:
            held_out.append("combination")
        if any(clue.fact in self.held_out.facts for clue in fields["clues"]):
            held_out.append("fact")
        if any(clue.template in self.held_out.templates for clue in fields["clues"]):
            held_out.append("phrasing")
        self.drafts.append(
            dict(task=task, meta_task=META_TASKS[task], instruction=instruction, text=text, held_out=tuple(held_out), **fields)
        )

    def _finish(self) -> Split:
        pictures_with = defaultdict(list)
        for candidate_id in self.pools["t2i"]:
            for obj in self.candidates[candidate_id].images[0].scene.objects:
                pictures_with[obj.colour, obj.shape].append(candidate_id)
        records, per_task = [], defaultdict(int)
        for draft in self.drafts:
            target = draft.pop("target")
            gold_ids = tuple(pictures_with[target]) if draft["task"] == "t2i" else draft["positive_ids"]
            record_id = f"{self.id_prefix}/{draft['task']}/{per_task[draft['task']]:05d}"
            per_task[draft["task"]] += 1
            records.append(Record(id=record_id, gold_ids=gold_ids, **draft))
        return Split(self.name, records, self.candidates, {pool: tuple(ids) for pool, ids in self.pools.items()})

    # -- tasks ----------------------------------------------------------------------------------------------

    def _t2i(self, difficulty: str) -> None:
        rng = self.rng
        colour, shape, forms = self._choose_target(QUERY_FORMS[difficulty])
        colour_reference, shape_reference, clues = self._references(forms, colour, shape)
        description = with_article(noun_phrase(colour_reference, shape_reference))
        text = rng.choice(HEDGED_T2I_TEMPLATES).format(description=description) if difficulty == "hedged" else description
        resolved = describe_object(colour, shape)

        scene = self._scene(colour, shape, avoid_words=_words(text) & _COLOUR_AND_SHAPE_WORDS)
        target, others = scene.objects[0], scene.objects[1:]
        # Hard negatives differ from the target in one attribute, preferring the values the clue names.
        colour_clue = next((clue for clue in clues if clue.fact.kind == "colour_mix"), None)
        shape_clue = next((clue for clue in clues if clue.fact.kind == "shape_relation"), None)
        named_colours = list(colour_clue.fact.key) if colour_clue else []
        # A clue's reference polygon is a lure only where pictures can show it.
        named_shapes = [shape_clue.fact.key[1]] if shape_clue and shape_clue.fact.key[1] in SHAPES else []
        other_colours, other_shapes = {obj.colour for obj in others}, {obj.shape for obj in others}
        lure_colour = next(
            c for c in named_colours + confusable_colours(colour) if c not in other_colours and self._pair_allowed(c, shape)
        )
        lure_shape = next(
            s for s in named_shapes + _confusable_shapes(shape) if s not in other_shapes and self._pair_allowed(colour, s)
        )
        negatives = [Scene((replace(target, colour=lure_colour), *others)), Scene((replace(target, shape=lure_shape), *others))]

        if difficulty == "hedged":
            steps = [
                hedge(rng, COLOUR_HEDGES, colour, lure_colour),
                hedge(rng, SHAPE_HEDGES, with_article(shape), with_article(lure_shape)),
            ]
        elif difficulty == "simple":
            steps = [f"the query names {resolved} directly"]
        else:
            steps = [clue.explanation for clue in clues]
        near_miss_steps = []
        if clues:
            # The near miss resolves one clue to its hard negative's value; the other clue stays right.
            missed = clues[self.near_miss_rng.randrange(len(clues))]
            wrong = {"colour": lure_colour, "shape": lure_shape}[missed.fact.attribute]
            near_miss = describe_object(wrong, shape) if missed.fact.attribute == "colour" else describe_object(colour, wrong)
            near_miss_steps = [_misresolved(clue, wrong) if clue is missed else clue.explanation for clue in clues] + [f"so {near_miss}"]
        self._draft(
            "t2i",
            INSTRUCTIONS["t2i"],
            text,
            images=(),
            positive_ids=(self._add_image("t2i", scene),),
            hard_negative_ids=tuple(self._add_image("t2i", negative) for negative in negatives),
            pool="t2i",
            cot=self._teacher_cot(difficulty, [*steps, f"so {resolved}"], near_miss_steps),
            difficulty=difficulty,
            resolved=resolved,
            clues=clues,
            target=(colour, shape),
        )

    def _i2t(self, difficulty: str) -> None:
        colour, shape, _ = self._choose_target(QUERY_FORMS["simple"])
        scene = self._scene(colour, shape)
        caption = describe_scene(scene)
        self._draft(
            "i2t",
            INSTRUCTIONS["i2t"],
            "",
            images=(self._image(scene),),
            positive_ids=(self._add_text("i2t", caption),),
            hard_negative_ids=tuple(self._add_text("i2t", describe_scene(edited)) for edited in self._edited_scenes(scene)),
            pool="i2t",
            cot=f"{what_the_picture_shows(scene)}; so {caption}",
            difficulty=difficulty,
            resolved=caption,
            clues=(),
            target=(colour, shape),
        )

    def _edited_scenes(self, scene: Scene) -> list[Scene]:
        """Scenes that differ from `scene` in exactly one attribute of one object."""
        edited: list[Scene] = []
        while len(edited) < HARD_NEGATIVES:
            index = self.rng.randrange(len(scene.objects))
            obj = scene.objects[index]
            attribute = self.rng.choice(("colour", "shape", "size", "position"))
            options = {
                "colour": [c for c in COLOURS if c not in {o.colour for o in scene.objects} and self._pair_allowed(c, obj.shape)],
                "shape": [s for s in SHAPES if s not in {o.shape for o in scene.objects} and self._pair_allowed(obj.colour, s)],
                "size": [s for s in SIZES if s != obj.size],
                "position": [p for p in POSITIONS if p not in {o.position for o in scene.objects}],
            }[attribute]
            if not options:
                continue
            objects = list(scene.objects)
            objects[index] = replace(obj, **{attribute: self.rng.choice(options)})
            if Scene(tuple(objects)) not in edited:
                edited.append(Scene(tuple(objects)))
        return edited

    def _classification(self, difficulty: str) -> None:
        colour, shape, _ = self._choose_target(QUERY_FORMS["simple"])
        label_kind = self.rng.choice(("shape", "colour"))
        label, lures = (shape, _confusable_shapes(shape)) if label_kind == "shape" else (colour, confusable_colours(colour))
        pool = f"classification/{label_kind}"
        scene = self._scene(colour, shape, count=1)
        self._draft(
            "classification",
            INSTRUCTIONS[pool],
            "",
            images=(self._image(scene),),
            positive_ids=(self._add_text(pool, label),),
            hard_negative_ids=tuple(self._add_text(pool, lure) for lure in lures[:HARD_NEGATIVES]),
            pool=pool,
            cot=f"the picture shows {describe_object(colour, shape)}; so {label}",
            difficulty=difficulty,
            resolved=label,
            clues=(),
            target=(colour, shape),
        )

    def _vqa(self, difficulty: str) -> None:
        rng = self.rng
        question = rng.choice([kind for kind, forms in VQA_FORMS.items() if difficulty in forms])
        colour, shape, forms = self._choose_target(VQA_FORMS[question][difficulty])
        colour_reference, shape_reference, clues = self._references(forms, colour, shape)
        templates = HEDGED_VQA_TEMPLATES[question] if difficulty == "hedged" else VQA_TEMPLATES[question]
        text = rng.choice(templates).format(
            reference=noun_phrase(colour_reference, shape_reference),
            predicate=colour_reference.text if isinstance(colour_reference, Clue) else colour_reference,
        )
        scene = self._scene(colour, shape, lure_words=_words(text) & _COLOUR_AND_SHAPE_WORDS)
        target, others = scene.objects[0], scene.objects[1:]

        # The other objects' values are the natural wrong answers, then look-alikes.
        if question == "colour":
            answer, lures, hedges = colour, [o.colour for o in others] + confusable_colours(colour), COLOUR_HEDGES
            observation = f"the {shape} in the picture is {colour}"
        elif question == "shape":
            answer, lures, hedges = shape, [o.shape for o in others] + _confusable_shapes(shape), SHAPE_HEDGES
            observation = f"the {colour} shape in the picture is {with_article(shape)}"
        elif question == "position":
            answer, hedges = target.position, VALUE_HEDGES
            lures = [o.position for o in others] + rng.sample([p for p in POSITIONS if p != answer], len(POSITIONS) - 1)
            observation = f"the {colour} {shape} is {POSITION_PHRASES[answer]}"
        else:
            answer, hedges = NUMBER_WORDS[len(scene.objects)], VALUE_HEDGES
            lures = sorted(COUNT_ANSWERS, key=lambda word: abs(COUNT_ANSWERS.index(word) - COUNT_ANSWERS.index(answer)))[1:]
            observation = what_the_picture_shows(scene)
        lures = list(dict.fromkeys(lure for lure in lures if lure != answer))[:HARD_NEGATIVES]

        if difficulty == "hedged":
            steps = [hedge(rng, hedges, _spoken(question, answer), _spoken(question, lures[0]))]
        else:
            steps = [*(clue.explanation for clue in clues), observation]
        # The near miss reads the picture wrong: it sees the first hard negative's value where the answer is
        # (questions with clues end their observation with the spoken answer).
        near_miss_steps = []
        if clues:
            misread = observation.removesuffix(_spoken(question, answer)) + _spoken(question, lures[0])
            near_miss_steps = [*(clue.explanation for clue in clues), misread, f"so {lures[0]}"]
        pool = f"vqa/{question}"
        self._draft(
            "vqa",
            INSTRUCTIONS["vqa"],
            text,
            images=(self._image(scene),),
            positive_ids=(self._add_text(pool, answer),),
            hard_negative_ids=tuple(self._add_text(pool, lure) for lure in lures),
            pool=pool,
            cot=self._teacher_cot(difficulty, [*steps, f"so {answer}"], near_miss_steps),
            difficulty=difficulty,
            resolved=answer,
            clues=clues,
            target=(colour, shape),
        )
