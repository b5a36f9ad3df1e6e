"""quality_vs_tokens.png: overall score against mean reasoning tokens per query, drawn with Pillow.

Pillow is a dependency already; matplotlib is not, and one scatter plot does not justify adding it. A sweep
draws its curve (never -> thresholds -> always, in order of cost) with never, always and the chosen
threshold marked; a single mode draws its one point.
"""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from twn_cli.eval.report import is_chosen_point

WIDTH, HEIGHT = 900, 560
LEFT, RIGHT, TOP, BOTTOM = 90, 40, 60, 80
CURVE, NEVER, ALWAYS, CHOSEN, GRID, INK = "#4c72b0", "#1f77b4", "#d62728", "#2ca02c", "#e5e5e5", "#222222"


def plot_quality_vs_tokens(report: dict, path: str | Path) -> None:
    points = report["sweep"] or [report["result"]]
    xy = [(point["overall"]["reasoning_tokens_per_query"], 100 * point["overall"]["score"]) for point in points]
    # Room beyond the extreme points, so that their markers and labels stay inside the frame.
    x_high = max(x for x, _ in xy) or 1.0
    x_ticks = _ticks(0.0, 1.12 * x_high)
    y_low, y_high = min(y for _, y in xy), max(y for _, y in xy)
    margin = 0.08 * (y_high - y_low) or 0.5
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
    draw.text((WIDTH / 2, HEIGHT - 30), "mean reasoning tokens per query", fill=INK, font=font, anchor="mm")
    _vertical_text(image, (22, (TOP + HEIGHT - BOTTOM) / 2), "overall score", font)
    title = f"{report['dataset']['split']} split, mode {report['mode']}: overall score (x100) vs reasoning tokens"
    draw.text((WIDTH / 2, 25), title, fill=INK, font=font, anchor="mm")

    pixels = [to_pixel(x, y) for x, y in xy]
    if len(pixels) > 1:
        draw.line(sorted(pixels), fill=CURVE, width=2)
    for point, (px, py) in zip(points, pixels):
        if point["mode"] == "never":
            draw.rectangle([px - 6, py - 6, px + 6, py + 6], fill=NEVER)
            draw.text((px + 10, py - 10), "never", fill=NEVER, font=small, anchor="ls")
        elif point["mode"] == "always":
            draw.polygon([(px, py - 8), (px - 7, py + 6), (px + 7, py + 6)], fill=ALWAYS)
            draw.text((px - 10, py - 10), "always", fill=ALWAYS, font=small, anchor="rs")
        elif is_chosen_point(point, report):
            draw.polygon([(px, py - 9), (px + 9, py), (px, py + 9), (px - 9, py)], fill=CHOSEN)
            draw.text((px + 12, py + 14), f"tau = {point['threshold']:.3g}", fill=CHOSEN, font=small, anchor="ls")
        else:
            draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill=CURVE)
    image.save(path, format="PNG")


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
