"""quality_vs_tokens.png, drawn with Pillow (a dependency already; one chart does not justify matplotlib).

A sweep draws the overall score against the share of always-think's reasoning tokens: the gate's
thresholds (never -> always) with the chosen one marked, random routing (the chord from never to always),
the per-input oracle's curve, the kind oracle's where the data tags its queries, and task-level routing
where the checkpoint records it. A single mode draws
its one point against reasoning tokens per query.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from twn_cli.eval.report import is_chosen_point

WIDTH, HEIGHT = 900, 560
LEFT, RIGHT, TOP, BOTTOM = 90, 40, 60, 80
CURVE, NEVER, ALWAYS, CHOSEN, GRID, INK = "#4c72b0", "#1f77b4", "#d62728", "#2ca02c", "#e5e5e5", "#222222"
CHORD, ORACLE, KIND_ORACLE, TASK_LEVEL = "#999999", "#8c564b", "#9467bd", "#ff7f0e"


def plot_quality_vs_tokens(report: dict, path: str | Path) -> None:
    if report.get("routing"):
        _plot_routing(report, path)
    else:
        _plot_point(report, path)


def _plot_routing(report: dict, path: str | Path) -> None:
    routing = report["routing"]
    never, always = routing["never"], routing["always"]
    gate = [(0.0, never), *sorted((entry["token_share"], entry["score"]) for entry in routing["gate"]["points"]), (1.0, always)]
    oracle = [(0.0, never), *(tuple(point) for point in routing["oracle"]["curve"])]
    kind_oracle = [(0.0, never), *(tuple(point) for point in routing["kind_oracle"]["curve"])] if routing.get("kind_oracle") else []
    scores = [100 * y for _, y in gate + oracle + kind_oracle]
    image, draw, to_pixel, small = _canvas(
        (0.0, 1.0), (min(scores), max(scores)), "share of always-think's reasoning tokens",
        f"{report['dataset']['split']} split: overall score (x100) vs share of always-think's reasoning tokens",
    )

    def line(points: Sequence[tuple[float, float]], colour: str, width: int = 2) -> None:
        draw.line([to_pixel(x, 100 * y) for x, y in points], fill=colour, width=width)

    line([(0.0, never), (1.0, always)], CHORD)
    line(oracle, ORACLE)
    if kind_oracle:
        line(kind_oracle, KIND_ORACLE)
    line(gate, CURVE)
    for entry in routing["gate"]["points"]:
        px, py = to_pixel(entry["token_share"], 100 * entry["score"])
        if entry["threshold"] == report["threshold"]:
            draw.polygon([(px, py - 9), (px + 9, py), (px, py + 9), (px - 9, py)], fill=CHOSEN)
            draw.text((px + 12, py + 14), f"tau = {entry['threshold']:.3g}", fill=CHOSEN, font=small, anchor="ls")
        else:
            draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill=CURVE)
    if routing["task_level"]:
        task = routing["task_level"]
        px, py = to_pixel(task["token_share"], 100 * task["score"])
        draw.rectangle([px - 5, py - 5, px + 5, py + 5], fill=TASK_LEVEL)
    _ends(draw, to_pixel, never, always, small)
    legend = [("gate", CURVE), ("random (chord)", CHORD), ("per-input oracle", ORACLE)]
    legend += ([("kind oracle", KIND_ORACLE)] if kind_oracle else []) + ([("task-level", TASK_LEVEL)] if routing["task_level"] else [])
    for row, (label, colour) in enumerate(legend):
        y = TOP + 14 + 18 * row
        draw.line([(LEFT + 12, y), (LEFT + 36, y)], fill=colour, width=3)
        draw.text((LEFT + 42, y), label, fill=INK, font=small, anchor="lm")
    image.save(path, format="PNG")


def _plot_point(report: dict, path: str | Path) -> None:
    points = report["sweep"] or [report["result"]]
    xy = [(point["overall"]["reasoning_tokens_per_query"], 100 * point["overall"]["score"]) for point in points]
    image, draw, to_pixel, small = _canvas(
        (0.0, 1.12 * (max(x for x, _ in xy) or 1.0)), (min(y for _, y in xy), max(y for _, y in xy)), "mean reasoning tokens per query",
        f"{report['dataset']['split']} split, mode {report['mode']}: overall score (x100) vs reasoning tokens",
    )
    for point, (x, y) in zip(points, xy):
        px, py = to_pixel(x, y)
        if point["mode"] == "never":
            draw.rectangle([px - 6, py - 6, px + 6, py + 6], fill=NEVER)
        elif point["mode"] == "always":
            draw.polygon([(px, py - 8), (px - 7, py + 6), (px + 7, py + 6)], fill=ALWAYS)
        elif is_chosen_point(point, report):
            draw.polygon([(px, py - 9), (px + 9, py), (px, py + 9), (px - 9, py)], fill=CHOSEN)
            draw.text((px + 12, py + 14), f"tau = {point['threshold']:.3g}", fill=CHOSEN, font=small, anchor="ls")
    image.save(path, format="PNG")


def _ends(draw, to_pixel, never: float, always: float, font) -> None:
    px, py = to_pixel(0.0, 100 * never)
    draw.rectangle([px - 6, py - 6, px + 6, py + 6], fill=NEVER)
    draw.text((px + 10, py - 10), "never", fill=NEVER, font=font, anchor="ls")
    px, py = to_pixel(1.0, 100 * always)
    draw.polygon([(px, py - 8), (px - 7, py + 6), (px + 7, py + 6)], fill=ALWAYS)
    draw.text((px - 10, py - 10), "always", fill=ALWAYS, font=font, anchor="rs")


def _canvas(x_range: tuple[float, float], y_range: tuple[float, float], x_label: str, title: str) -> tuple[Image.Image, ImageDraw.ImageDraw, Callable, object]:
    """A white image with gridlines, axes, labels and title; and the function from data to pixel coordinates."""
    x_ticks = _ticks(*x_range)
    y_low, y_high = y_range
    margin = 0.08 * (y_high - y_low) or 0.5  # room beyond the extreme points for their markers and labels
    y_ticks = _ticks(max(0.0, y_low - margin), min(100.0, y_high + margin))
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    font, small = ImageFont.load_default(size=15), ImageFont.load_default(size=12)

    def to_pixel(x: float, y: float) -> tuple[float, float]:
        fx = (x - x_ticks[0]) / (x_ticks[-1] - x_ticks[0])
        fy = (y - y_ticks[0]) / (y_ticks[-1] - y_ticks[0])
        return LEFT + fx * (WIDTH - LEFT - RIGHT), HEIGHT - BOTTOM - fy * (HEIGHT - TOP - BOTTOM)

    for tick in x_ticks:
        px, _ = to_pixel(tick, y_ticks[0])
        draw.line([(px, TOP), (px, HEIGHT - BOTTOM)], fill=GRID)
        draw.text((px, HEIGHT - BOTTOM + 8), _label(tick), fill=INK, font=small, anchor="mt")
    for tick in y_ticks:
        _, py = to_pixel(x_ticks[0], tick)
        draw.line([(LEFT, py), (WIDTH - RIGHT, py)], fill=GRID)
        draw.text((LEFT - 8, py), _label(tick), fill=INK, font=small, anchor="rm")
    draw.rectangle([LEFT, TOP, WIDTH - RIGHT, HEIGHT - BOTTOM], outline=INK)
    draw.text((WIDTH / 2, HEIGHT - 30), x_label, fill=INK, font=font, anchor="mm")
    _vertical_text(image, (22, (TOP + HEIGHT - BOTTOM) / 2), "overall score", font)
    draw.text((WIDTH / 2, 25), title, fill=INK, font=font, anchor="mm")
    return image, draw, to_pixel, small


def _vertical_text(image: Image.Image, centre: tuple[float, float], text: str, font) -> None:
    left, top, right, bottom = font.getbbox(text)
    label = Image.new("RGBA", (right - left + 4, bottom - top + 4), (255, 255, 255, 0))
    ImageDraw.Draw(label).text((2 - left, 2 - top), text, fill=INK, font=font)
    label = label.rotate(90, expand=True)
    image.paste(label, (int(centre[0] - label.width / 2), int(centre[1] - label.height / 2)), label)


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values that span [low, high]."""
    raw_step = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw_step))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw_step)
    first = math.floor(low / step) * step
    ticks = [first]
    while ticks[-1] < high - 1e-9:
        ticks.append(ticks[-1] + step)
    return ticks


def _label(value: float) -> str:
    return f"{value:.6g}"
