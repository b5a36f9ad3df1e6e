"""Toy-world scenes and their pictures: one to three upright coloured shapes on a plain neutral background.

Every render jitters rotation (at most ±8°), size, position and colour a little, so that fresh renders of
one scene differ in pixels but never in content: a tiny vision tower then learns shapes instead of
memorising pictures (a prototype's vision tower memorised fixed renders: 45 % shape accuracy on new ones).
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass

from PIL import Image, ImageDraw

from twn_cli.toyworld.vocabulary import COLOURS, POSITIONS, SHAPES, SIZES

# The side of toy pictures in pixels. With the toy backbone's 14-px patches merged 2x2 (as on Qwen2-VL), an
# 84-px picture is 3x3 image tokens, one per grid cell, so each object lies inside one token: the tiny
# vision tower then names shapes from a few hundred warm-up steps, where 56-px pictures with 7-px patches,
# whose objects straddle token borders, needed thousands (BENCHMARKS.md).
PICTURE_SIZE = 84
# Objects sit in the cells of a 3x3 grid; the five positions are the middle row, middle column and centre.
GRID_CELLS: dict[str, tuple[int, int]] = {"left": (0, 1), "right": (2, 1), "top": (1, 0), "bottom": (1, 2), "centre": (1, 1)}
# Circumradius per size as a share of the picture side. A cell is a third of the side wide, so a large
# shape with its size jitter still fits its cell and neighbouring objects never overlap.
# Small shapes stay about 15 px across at 84 px (at 56 px, 10 px across was the least a tiny vision tower
# could name), and the size jitter is small enough that the sizes' areas still differ by half.
SIZE_RADII: dict[str, float] = {"small": 0.088, "medium": 0.12, "large": 0.157}
MAX_ROTATION_DEGREES = 8.0
SIZE_JITTER = 0.03
# Position jitter per axis as a share of the object's radius: small enough that the grid-cell centre stays
# inside even a triangle (inradius half the circumradius) or a star.
POSITION_JITTER = 0.15
COLOUR_JITTER = 8
STAR_INNER_RADIUS = 0.45
# Drawn at this multiple of the final size and box-filtered down, for clean anti-aliased edges.
SUPERSAMPLING = 4
# Minimum RGB distance between the background and every object colour (white on a dark background,
# black on a light one, ...).
MIN_BACKGROUND_CONTRAST = 80.0
LIGHT_BACKGROUNDS = (185, 230)
DARK_BACKGROUNDS = (35, 75)
BACKGROUND_TINT = 6


@dataclass(frozen=True)
class SceneObject:
    """One shape in a scene, by its vocabulary names."""

    shape: str
    colour: str
    size: str
    position: str

    def __post_init__(self) -> None:
        for value, known in ((self.shape, SHAPES), (self.colour, COLOURS), (self.size, SIZES), (self.position, POSITIONS)):
            if value not in known:
                raise ValueError(f"unknown toy-world word {value!r}; expected one of {sorted(known)}")


@dataclass(frozen=True)
class Scene:
    """One to three objects at distinct positions."""

    objects: tuple[SceneObject, ...]

    def __post_init__(self) -> None:
        if not 1 <= len(self.objects) <= 3:
            raise ValueError(f"a scene holds 1 to 3 objects, got {len(self.objects)}")
        if len({obj.position for obj in self.objects}) != len(self.objects):
            raise ValueError("objects of a scene must have distinct positions")

    def to_dict(self) -> dict:
        return {"objects": [asdict(obj) for obj in self.objects]}

    @classmethod
    def from_dict(cls, data: dict) -> Scene:
        return cls(tuple(SceneObject(**obj) for obj in data["objects"]))


@dataclass(frozen=True)
class Placement:
    """Where one object of a scene is drawn in a picture, in pixels (also its grounding box)."""

    object: SceneObject
    centre: tuple[float, float]
    radius: float
    rotation_degrees: float
    rgb: tuple[int, int, int]

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        x, y = self.centre
        return (x - self.radius, y - self.radius, x + self.radius, y + self.radius)


def cell_centre(position: str, image_size: int) -> tuple[float, float]:
    """The centre of a position's grid cell: where an object at that position is drawn, before jitter."""
    column, row = GRID_CELLS[position]
    cell = image_size / 3
    return ((column + 0.5) * cell, (row + 0.5) * cell)


def layout_scene(scene: Scene, image_size: int = PICTURE_SIZE, rng: random.Random | None = None) -> list[Placement]:
    """Jittered placements of a scene's objects; `rng=None` draws a fresh layout."""
    rng = rng or random.Random()
    cell_half = image_size / 6
    placements = []
    for obj in scene.objects:
        radius = SIZE_RADII[obj.size] * image_size * rng.uniform(1 - SIZE_JITTER, 1 + SIZE_JITTER)
        # Never past the cell border, so that objects in neighbouring cells cannot touch.
        max_shift = max(0.0, min(POSITION_JITTER * radius, cell_half - radius))
        x, y = cell_centre(obj.position, image_size)
        centre = (x + rng.uniform(-max_shift, max_shift), y + rng.uniform(-max_shift, max_shift))
        rotation = rng.uniform(-MAX_ROTATION_DEGREES, MAX_ROTATION_DEGREES)
        rgb = tuple(min(255, max(0, channel + rng.randint(-COLOUR_JITTER, COLOUR_JITTER))) for channel in COLOURS[obj.colour])
        placements.append(Placement(obj, centre, radius, rotation, rgb))
    return placements


def render_scene(scene: Scene | dict, image_size: int = PICTURE_SIZE, rng: random.Random | None = None) -> Image.Image:
    """An RGB picture of a scene. Same `rng` state, same pixels; `rng=None` gives a fresh render."""
    if isinstance(scene, dict):
        scene = Scene.from_dict(scene)
    rng = rng or random.Random()
    placements = layout_scene(scene, image_size, rng)
    canvas_size = image_size * SUPERSAMPLING
    canvas = Image.new("RGB", (canvas_size, canvas_size), _background(rng, [placement.rgb for placement in placements]))
    draw = ImageDraw.Draw(canvas)
    for placement in placements:
        x, y = placement.centre
        centre = (x * SUPERSAMPLING, y * SUPERSAMPLING)
        radius = placement.radius * SUPERSAMPLING
        if placement.object.shape == "circle":
            draw.ellipse((centre[0] - radius, centre[1] - radius, centre[0] + radius, centre[1] + radius), fill=placement.rgb)
        else:
            draw.polygon(_outline(placement.object.shape, centre, radius, placement.rotation_degrees), fill=placement.rgb)
    return canvas.resize((image_size, image_size), Image.Resampling.BOX)


def _outline(shape: str, centre: tuple[float, float], radius: float, rotation_degrees: float) -> list[tuple[float, float]]:
    """Vertices of an upright polygon (flat bottom edge) or a five-pointed star (point up), in image coordinates."""
    if shape == "star":
        # Angles grow clockwise on screen (y points down): -90° is straight up.
        angles = [-90 + 36 * k for k in range(10)]
        radii = [radius if k % 2 == 0 else radius * STAR_INNER_RADIUS for k in range(10)]
    else:
        sides = SHAPES[shape]
        # Two vertices symmetric about straight down (90°) make the bottom edge flat: squares sit
        # axis-aligned and odd polygons point up.
        angles = [90 + 180 / sides + 360 * k / sides for k in range(sides)]
        radii = [radius] * sides
    x, y = centre
    return [
        (x + r * math.cos(math.radians(angle + rotation_degrees)), y + r * math.sin(math.radians(angle + rotation_degrees)))
        for angle, r in zip(angles, radii)
    ]


def _background(rng: random.Random, object_colours: list[tuple[int, int, int]]) -> tuple[int, int, int]:
    """A light or dark near-grey, drawn among those that contrast with every object colour."""
    tint = [rng.randint(-BACKGROUND_TINT, BACKGROUND_TINT) for _ in range(3)]
    levels = [*range(LIGHT_BACKGROUNDS[0], LIGHT_BACKGROUNDS[1] + 1), *range(DARK_BACKGROUNDS[0], DARK_BACKGROUNDS[1] + 1)]
    candidates = [tuple(level + offset for offset in tint) for level in levels]

    def contrast(background: tuple[int, ...]) -> float:
        return min(math.dist(background, colour) for colour in object_colours)

    visible = [candidate for candidate in candidates if contrast(candidate) >= MIN_BACKGROUND_CONTRAST]
    return rng.choice(visible) if visible else max(candidates, key=contrast)
