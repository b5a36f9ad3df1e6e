"""The words of the toy world: colours, shapes and the text a toy tokenizer is trained on."""

from __future__ import annotations

from collections.abc import Callable

# The markers around a CoT: added tokens of the toy tokenizer, and the engine's default think_start/think_end.
THINK_START, THINK_END = "<think>", "</think>"

# Named colours with the RGB they are rendered in.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "orange": (240, 140, 30),
    "purple": (140, 60, 180),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
    "pink": (240, 130, 180),
    "brown": (130, 80, 40),
    "grey": (128, 128, 128),
}

# Shapes drawn in pictures, by their number of sides (0 for round shapes, star as 10 edges of its outline).
SHAPES: dict[str, int] = {
    "circle": 0,
    "triangle": 3,
    "square": 4,
    "pentagon": 5,
    "hexagon": 6,
    "star": 10,
}
# Polygons the world knows by their sides but never draws: at 10-20 px a heptagon or an octagon is all but
# a circle to a tiny vision tower (BENCHMARKS.md, toy backbone pre-training). They remain references of
# side-counting clues whose answer is drawn ("half as many sides as an octagon" -> a square).
REFERENCE_POLYGONS: dict[str, int] = {"heptagon": 7, "octagon": 8}
SIDES: dict[str, int] = {**SHAPES, **REFERENCE_POLYGONS}

SIZES = ("small", "medium", "large")
POSITIONS = ("left", "right", "top", "bottom", "centre")

NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")

# World knowledge behind the clues. The backbone learns all of it in pre-training; contrastive training
# sees only part of it, so that the rest has to be written out in a CoT to be used.
# Things of a colour; no name contains a colour or shape word, so a clue never gives its answer away.
COLOUR_THINGS: dict[str, tuple[str, ...]] = {
    "red": ("a ripe tomato", "a strawberry", "a fire engine", "a ripe cherry"),
    "green": ("grass", "a fresh leaf", "a lime", "a frog"),
    "blue": ("a clear sky", "the deep sea", "a sapphire", "a cornflower"),
    "yellow": ("a banana", "a lemon", "a sunflower", "an egg yolk"),
    "orange": ("a carrot", "a pumpkin", "a tangerine", "a basketball"),
    "purple": ("a plum", "lavender", "an aubergine", "an amethyst"),
    "white": ("snow", "milk", "a swan", "chalk"),
    "black": ("coal", "a crow", "ink", "soot"),
    "pink": ("a flamingo", "candy floss", "a piglet", "bubble gum"),
    "brown": ("chocolate", "a tree trunk", "a coffee bean", "a chestnut"),
    "grey": ("an elephant", "ash", "a donkey", "a pigeon"),
}

# Paint mixing: (first, second, result).
COLOUR_MIXES: tuple[tuple[str, str, str], ...] = (
    ("blue", "yellow", "green"),
    ("red", "yellow", "orange"),
    ("red", "blue", "purple"),
    ("red", "white", "pink"),
    ("black", "white", "grey"),
    ("red", "green", "brown"),
    ("orange", "blue", "brown"),
)

# Polygons: the drawn shapes that side counting applies to (a star's ten outline edges are not "sides").
POLYGONS: tuple[str, ...] = tuple(shape for shape, sides in SHAPES.items() if 3 <= sides <= 8)
# Every polygon a side-counting clue may start from.
KNOWN_POLYGONS: tuple[str, ...] = (*POLYGONS, *REFERENCE_POLYGONS)

# Features that name a shape on their own.
SHAPE_FEATURES: dict[str, tuple[str, ...]] = {
    "circle": ("no corners", "no straight sides"),
    **{shape: (f"{NUMBER_WORDS[SHAPES[shape]]} sides", f"{NUMBER_WORDS[SHAPES[shape]]} corners") for shape in POLYGONS},
    "star": ("five points", "five tips"),
}

# Relations between side counts: phrase -> (the CoT's words for the step, sides of the reference -> sides
# of the answer). A relation applies where the result is the side count of a polygon.
SIDE_RELATIONS: dict[str, tuple[str, Callable[[int], float]]] = {
    "one more side than": ("one more makes", lambda sides: sides + 1),
    "one fewer side than": ("one fewer makes", lambda sides: sides - 1),
    "two more sides than": ("two more make", lambda sides: sides + 2),
    "two fewer sides than": ("two fewer make", lambda sides: sides - 2),
    "twice as many sides as": ("twice that makes", lambda sides: sides * 2),
    "half as many sides as": ("half of that makes", lambda sides: sides / 2),
}

# Everyday objects the real sample images show, so that a toy tokenizer also covers their captions.
EVERYDAY_WORDS = (
    "photo picture image of a the an and with in on is are what which how many colour shape side sides "
    "cat astronaut coffee cup rocket camera coins moon page text clock brick grass gravel horse face "
    "retina galaxy stars sky flower building tree person man woman dog car road water table logo letters "
    "question answer think thinking reason step one two three four five six seven eight nine ten more "
    "less than like as same different not no yes first second third there here this that it its"
).split()
