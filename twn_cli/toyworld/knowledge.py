"""The toy world's knowledge: facts that resolve a clue to a colour or a shape, the phrasings of clues,
and what a world holds out of training (combinations, facts, phrasings)."""

from __future__ import annotations

import random
from dataclasses import dataclass

from twn_cli.toyworld.vocabulary import (
    COLOUR_MIXES,
    COLOUR_THINGS,
    COLOURS,
    KNOWN_POLYGONS,
    NUMBER_WORDS,
    POLYGONS,
    SHAPE_FEATURES,
    SHAPES,
    SIDE_RELATIONS,
    SIDES,
)

# Clue phrasings per fact kind. The fixed words of each template occur in no other template, so a held-out
# phrasing is recognisable in any text. Colour templates read both after a noun ("a square coloured like
# grass") and after "is" ("which shape is coloured like grass?"); shape templates are noun phrases.
COLOUR_THING_TEMPLATES = (
    "coloured like {thing}",
    "the colour of {thing}",
    "in the shade of {thing}",
    "the same colour as {thing}",
    "coloured the way {thing} is",
    "tinted like {thing}",
)
COLOUR_MIX_TEMPLATES = (
    "the colour you get by mixing {a} and {b}",
    "the colour that {a} and {b} make together",
    "in the blend of {a} with {b}",
    "painted with {a} and {b} stirred together",
)
SHAPE_TEMPLATES = ("shape with {property}", "shape that has {property}", "figure having {property}", "form with {property}")
CLUE_TEMPLATES = {
    "colour_thing": COLOUR_THING_TEMPLATES,
    "colour_mix": COLOUR_MIX_TEMPLATES,
    "shape_feature": SHAPE_TEMPLATES,
    "shape_relation": SHAPE_TEMPLATES,
}
HELD_OUT_TEMPLATE_COUNTS = ((COLOUR_THING_TEMPLATES, 2), (COLOUR_MIX_TEMPLATES, 1), (SHAPE_TEMPLATES, 1))
# Facts held out of train: one thing per colour, one feature of each of two shapes (the
# other feature stays), and a few mixes and side relations.
HELD_OUT_FEATURE_SHAPES = 2
HELD_OUT_MIXES = 2
HELD_OUT_RELATIONS = 5
POLYGON_BY_SIDES = {SHAPES[shape]: shape for shape in POLYGONS}


def with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


@dataclass(frozen=True)
class Fact:
    """One piece of knowledge that resolves a clue to a colour or a shape.

    kind: colour_thing (key: the thing), colour_mix (key: the two colours), shape_feature (key: the
    feature) or shape_relation (key: the relation and the reference shape).
    """

    kind: str
    key: tuple[str, ...]
    answer: str

    @property
    def attribute(self) -> str:
        return "colour" if self.kind.startswith("colour") else "shape"

    @property
    def templates(self) -> tuple[str, ...]:
        return CLUE_TEMPLATES[self.kind]

    def phrase(self, template: str, swap: bool = False) -> str:
        """The clue in a phrasing; `swap` names the two colours of a mix in the other order."""
        if self.kind == "colour_thing":
            return template.format(thing=self.key[0])
        if self.kind == "colour_mix":
            first, second = reversed(self.key) if swap else self.key
            return template.format(a=first, b=second)
        return template.format(property=self._shape_property())

    def explanation(self, swap: bool = False) -> str:
        """The CoT step that resolves the clue."""
        if self.kind == "colour_thing":
            return f"{self.key[0]} is {self.answer}"
        if self.kind == "colour_mix":
            first, second = reversed(self.key) if swap else self.key
            return f"{first} mixed with {second} makes {self.answer}"
        if self.kind == "shape_feature":
            return f"a shape with {self.key[0]} is {with_article(self.answer)}"
        relation, reference = self.key
        step = SIDE_RELATIONS[relation][0]
        return (
            f"{with_article(reference)} has {NUMBER_WORDS[SIDES[reference]]} sides and {step} "
            f"{NUMBER_WORDS[SHAPES[self.answer]]}, {with_article(self.answer)}"
        )

    def question(self) -> str:
        """The fact asked as a plain question, for pre-training."""
        if self.kind == "colour_thing":
            return f"what colour is {self.key[0]}?"
        if self.kind == "colour_mix":
            return f"what colour do {self.key[0]} and {self.key[1]} make when mixed?"
        return f"which shape has {self._shape_property()}?"

    def _shape_property(self) -> str:
        if self.kind == "shape_feature":
            return self.key[0]
        relation, reference = self.key
        return f"{relation} {with_article(reference)}"


def _knowledge() -> tuple[Fact, ...]:
    facts = [Fact("colour_thing", (thing,), colour) for colour, things in COLOUR_THINGS.items() for thing in things]
    facts += [Fact("colour_mix", (first, second), result) for first, second, result in COLOUR_MIXES]
    facts += [Fact("shape_feature", (feature,), shape) for shape, features in SHAPE_FEATURES.items() for feature in features]
    for relation, (_, apply) in SIDE_RELATIONS.items():
        for reference in KNOWN_POLYGONS:
            sides = apply(SIDES[reference])
            if float(sides).is_integer() and int(sides) in POLYGON_BY_SIDES:
                facts.append(Fact("shape_relation", (relation, reference), POLYGON_BY_SIDES[int(sides)]))
    return tuple(facts)


KNOWLEDGE: tuple[Fact, ...] = _knowledge()


@dataclass(frozen=True)
class Clue:
    """A fact as one query phrases it, with the CoT step that resolves it."""

    fact: Fact
    template: str
    text: str
    explanation: str

    @classmethod
    def of(cls, fact: Fact, template: str, swap: bool) -> Clue:
        """`fact` phrased with `template` (`swap`: a mix's two colours in the other order)."""
        return cls(fact, template, fact.phrase(template, swap), fact.explanation(swap))


@dataclass(frozen=True)
class HeldOut:
    """What train never uses and validation and test do: combinations (colour, shape), facts, phrasings."""

    combinations: frozenset[tuple[str, str]]
    facts: frozenset[Fact]
    templates: frozenset[str]


def held_out_elements(seed: int) -> HeldOut:
    """The held-out elements of the world of a seed; each colour and each shape is in some held-out combination."""
    rng = random.Random(f"toyworld/{seed}/held-out")
    shapes = list(SHAPES)
    rng.shuffle(shapes)
    combinations = frozenset((colour, shapes[index % len(shapes)]) for index, colour in enumerate(COLOURS))
    # Held-out things and features leave at least one fact per colour and per shape in training.
    def facts_of(kind: str, answer: str) -> list[Fact]:
        return [fact for fact in KNOWLEDGE if fact.kind == kind and fact.answer == answer]

    facts = {rng.choice(facts_of("colour_thing", colour)) for colour in COLOURS}
    feature_shapes = rng.sample(sorted(SHAPE_FEATURES), HELD_OUT_FEATURE_SHAPES)
    facts |= {rng.choice(facts_of("shape_feature", shape)) for shape in feature_shapes}
    for kind, count in (("colour_mix", HELD_OUT_MIXES), ("shape_relation", HELD_OUT_RELATIONS)):
        facts.update(rng.sample([fact for fact in KNOWLEDGE if fact.kind == kind], count))
    templates = frozenset(template for family, count in HELD_OUT_TEMPLATE_COUNTS for template in rng.sample(family, count))
    return HeldOut(combinations, frozenset(facts), templates)
