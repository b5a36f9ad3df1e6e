"""What the toy backbone is pre-trained on: captions, scene questions and thinking answers on random scenes,
and the world's knowledge as text (every fact and clue phrasing, the held-out ones included)."""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from dataclasses import replace
from typing import NamedTuple

from twn_cli.toyworld.knowledge import KNOWLEDGE, Clue, Fact, held_out_elements, with_article
from twn_cli.toyworld.render import Scene
from twn_cli.toyworld.vocabulary import (
    COLOURS,
    KNOWN_POLYGONS,
    NUMBER_WORDS,
    SHAPES,
    SIDES,
    THINK_END,
    THINK_START,
)
from twn_cli.toyworld.world import (
    COLOUR_HEDGES,
    POSITION_PHRASES,
    SHAPE_HEDGES,
    VALUE_HEDGES,
    confusable_colours,
    describe_object,
    describe_scene,
    generate_world,
    hedge,
    noun_phrase,
    random_scene,
    what_the_picture_shows,
)


class PretrainingExample(NamedTuple):
    """One pre-training example for the backbone: a scene to render (or None for text only), a prompt and its answer."""

    scene: Scene | None
    prompt: str
    answer: str


# Shares of caption, scene question, fact, side count, clue and thinking examples. Pictures dominate: a tiny
# vision tower needs tens of thousands of fresh renders to ground colours and shapes, text facts are learned fast.
PRETRAINING_MIX = (0.3, 0.3, 0.1, 0.05, 0.15, 0.1)
# Share of clue examples that name both colour and shape by clues (the others name one).
TWO_CLUE_SHARE = 0.5


def pretraining_examples(seed: int = 0, include_held_out_combinations: bool = True) -> Iterator[PretrainingExample]:
    """An endless, seeded stream of captioning, scene QA and thinking answers on random scenes, and of world
    knowledge as text.

    The knowledge covers every fact and every clue phrasing, the held-out ones included ("explain: a
    square coloured like a lime" -> "a lime is green"), alone or with a second clue ("explain: a shape with
    five corners, coloured like a lime" -> "a shape with five corners is a pentagon; a lime is green"), so
    that a CoT can solve held-out test queries.
    Clues never appear with a scene here: combining a clue with a picture is left to the reasoner.
    Held-out colour-shape combinations are shown unless `include_held_out_combinations` is False (pass the
    world's seed then).
    """
    rng = random.Random(f"toyworld/{seed}/pretraining")
    held_out = held_out_elements(seed)
    pairs = [(c, s) for c in COLOURS for s in SHAPES if include_held_out_combinations or (c, s) not in held_out.combinations]
    makers = (_caption_example, _scene_question_example, _fact_example, _side_count_example, _clue_example, _thinking_example)
    while True:
        yield rng.choices(makers, weights=PRETRAINING_MIX)[0](rng, pairs)


def _caption_example(rng: random.Random, pairs: list[tuple[str, str]]) -> PretrainingExample:
    scene = random_scene(rng, pairs, rng.choice(pairs))
    return PretrainingExample(scene, "describe the picture.", describe_scene(scene))


def _scene_question_example(rng: random.Random, pairs: list[tuple[str, str]]) -> PretrainingExample:
    scene = random_scene(rng, pairs, rng.choice(pairs))
    obj = rng.choice(scene.objects)
    prompt, answer = rng.choice(
        [
            (f"what colour is the {obj.shape}?", obj.colour),
            (f"which shape is {obj.colour}?", obj.shape),
            (f"where is the {obj.colour} {obj.shape}?", obj.position),
            (f"how big is the {obj.colour} {obj.shape}?", obj.size),
            ("how many shapes are there?", NUMBER_WORDS[len(scene.objects)]),
        ]
    )
    return PretrainingExample(scene, prompt, answer)


def _thinking_example(rng: random.Random, pairs: list[tuple[str, str]]) -> PretrainingExample:
    """A question answered in the thinking format of instruction-tuned MLLMs, between think markers: what the
    picture shows (or a hedge between two values, or that the query names its answer directly), then "so"
    and the answer. Without it the backbone never writes the markers, "so" or the hedges, and with its tied
    embeddings no hidden state then makes them likelier than about 2 %: sampled CoTs ran on to the token
    limit and RL learnt from noise (BENCHMARKS.md). Clues never appear here either."""
    scene = random_scene(rng, pairs, rng.choice(pairs))
    obj = rng.choice(scene.objects)
    if rng.random() < 0.2:
        description = describe_object(obj.colour, obj.shape)
        return PretrainingExample(None, f"find {description}.", f"{THINK_START}the query names {description} directly; so {description}{THINK_END}")
    other = rng.choice([o for o in scene.objects if o is not obj] or [replace(obj, colour=confusable_colours(obj.colour)[0])])
    question, answer, lure, hedges = rng.choice(
        [
            (f"what colour is the {obj.shape}?", obj.colour, other.colour, COLOUR_HEDGES),
            (f"which shape is {obj.colour}?", with_article(obj.shape), with_article(other.shape), SHAPE_HEDGES),
            (f"where is the {obj.colour} {obj.shape}?", POSITION_PHRASES[obj.position], POSITION_PHRASES[other.position], VALUE_HEDGES),
        ]
    )
    look = hedge(rng, hedges, answer, lure) if rng.random() < 0.3 and lure != answer else what_the_picture_shows(scene)
    return PretrainingExample(scene, question, f"{THINK_START}{look}; so {answer}{THINK_END}")


def _fact_example(rng: random.Random, pairs: list[tuple[str, str]]) -> PretrainingExample:
    fact = rng.choice(KNOWLEDGE)
    return PretrainingExample(None, fact.question(), fact.explanation())


def _side_count_example(rng: random.Random, pairs: list[tuple[str, str]]) -> PretrainingExample:
    shape = rng.choice(KNOWN_POLYGONS)
    named = with_article(shape)
    return PretrainingExample(None, f"how many sides does {named} have?", f"{named} has {NUMBER_WORDS[SIDES[shape]]} sides")


def _clue_example(rng: random.Random, pairs: list[tuple[str, str]]) -> PretrainingExample:
    fact = rng.choice(KNOWLEDGE)
    if rng.random() < TWO_CLUE_SHARE:
        # Both attributes named by clues, explained one step after the other: the backbone can then write
        # out a compound reference, as an instruction-tuned MLLM can, which is what a CoT builds on.
        attribute = "shape" if fact.attribute == "colour" else "colour"
        other = rng.choice([candidate for candidate in KNOWLEDGE if candidate.attribute == attribute])
        first, second = _random_clue(rng, fact), _random_clue(rng, other)
        colour_clue, shape_clue = (first, second) if fact.attribute == "colour" else (second, first)
        phrase = noun_phrase(colour_clue, shape_clue)
        return PretrainingExample(None, f"explain: {with_article(phrase)}", f"{shape_clue.explanation}; {colour_clue.explanation}")
    clue = _random_clue(rng, fact)
    if fact.attribute == "colour":
        phrase = noun_phrase(clue, rng.choice(list(SHAPES)))
    else:
        phrase = noun_phrase(rng.choice(list(COLOURS)), clue)
    return PretrainingExample(None, f"explain: {with_article(phrase)}", clue.explanation)


def explanation_examples(count: int, seed: int) -> list[PretrainingExample]:
    """`count` text-only "explain:" examples, drawn like pre-training's, from their own seeded stream (an evaluation set)."""
    rng = random.Random(f"toyworld/{seed}/explanations")
    return [_clue_example(rng, []) for _ in range(count)]


def _random_clue(rng: random.Random, fact: Fact) -> Clue:
    template, swap = rng.choice(fact.templates), rng.random() < 0.5
    return Clue.of(fact, template, swap)


def corpus_sentences(seed: int = 0) -> list[str]:
    """The toy world's text for a tokenizer: every fact in every phrasing, a small world and pre-training examples."""
    lines = []
    for fact in KNOWLEDGE:
        lines.append(fact.question())
        for swap in (False, True):
            lines.append(fact.explanation(swap))
            lines += [fact.phrase(template, swap) for template in fact.templates]
    world = generate_world(n=400, seed=seed)
    for split in world.splits.values():
        lines += [line for record in split.records for line in (record.instruction, record.text, record.cot) if line]
        lines += [candidate.text for candidate in split.candidates.values() if candidate.text]
    lines += [f"{example.prompt} {example.answer}" for example in itertools.islice(pretraining_examples(seed), 1000)]
    return list(dict.fromkeys(lines))
