"""Small line plots and image sheets drawn with PIL alone.

matplotlib would pull plain Pillow, which shadows pillow-simd (see README, "pillow-simd"), so the
report draws its own figures: axes, "nice" ticks with labels, optional log-scale y, a legend and a
title. Enough for training curves; not a plotting library.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

# A colour-blind-safe cycle (Okabe-Ito).
PALETTE = ((0, 114, 178), (213, 94, 0), (0, 158, 115), (204, 121, 167), (230, 159, 0), (86, 180, 233), (0, 0, 0))
BACKGROUND = (255, 255, 255)
INK = (30, 30, 30)
GRID = (225, 225, 225)


@dataclass(frozen=True)
class Series:
    """One line: points (x, y); non-finite points are skipped."""

    label: str
    xs: Sequence[float]
    ys: Sequence[float]
    color: tuple[int, int, int] | None = None
    width: int = 2
    markers: bool = False
    dashed: bool = False


@dataclass(frozen=True)
class Axes:
    title: str
    xlabel: str
    ylabel: str
    size: tuple[int, int] = (640, 420)  # pixels
    logy: bool = False
    ylim: tuple[float, float] | None = None
    hlines: Sequence[tuple[float, str]] = field(default_factory=tuple)  # (y, label), drawn dotted


@lru_cache(maxsize=8)
def font(size: int = 13) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # scalable when PIL has FreeType
    except (TypeError, OSError, ImportError):  # older PIL or no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def text_size(draw: ImageDraw.ImageDraw, text: str, fnt) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=fnt)
    return right - left, bottom - top


def nice_ticks(lo: float, hi: float, target: int = 6) -> list[float]:
    """Ticks at 1, 2 or 5 times a power of ten covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(target - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    ticks, t = [], math.ceil(lo / step - 1e-9) * step
    while t <= hi + step * 1e-9:
        ticks.append(0.0 if abs(t) < step * 1e-9 else t)
        t += step
    return ticks


def format_tick(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e6:
        return f"{v / 1e6:g}M"
    if a >= 1e4:
        return f"{v / 1e3:g}k"
    if a < 1e-3:
        return f"{v:.0e}".replace("e-0", "e-")
    if a >= 100 or float(v).is_integer():
        return f"{v:,.0f}"
    return f"{v:.3g}"


def _finite_points(s: Series, logy: bool) -> list[tuple[float, float]]:
    pts = [(float(x), float(y)) for x, y in zip(s.xs, s.ys, strict=False) if x is not None and y is not None]
    return [(x, y) for x, y in pts if math.isfinite(x) and math.isfinite(y) and (y > 0 or not logy)]


def _vertical_text(text: str, fnt, color) -> Image.Image:
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    w, h = text_size(probe, text, fnt)
    img = Image.new("RGBA", (w + 4, h + 6), (0, 0, 0, 0))
    ImageDraw.Draw(img).text((2, 0), text, font=fnt, fill=(*color, 255))
    return img.rotate(90, expand=True)


def _dashed_line(draw, p0, p1, color, width, dash=6):
    (x0, y0), (x1, y1) = p0, p1
    length = math.hypot(x1 - x0, y1 - y0)
    if length == 0:
        return
    n = max(int(length // dash), 1)
    for i in range(0, n, 2):
        a, b = i / n, min((i + 1) / n, 1.0)
        draw.line(
            [(x0 + (x1 - x0) * a, y0 + (y1 - y0) * a), (x0 + (x1 - x0) * b, y0 + (y1 - y0) * b)],
            fill=color,
            width=width,
        )


def _marker(draw, x: float, y: float, r: float, color, hollow: bool) -> None:
    # Hollow markers tell the dashed series (ten patches) from the solid ones when a line has one point.
    if hollow:
        draw.rectangle([x - r, y - r, x + r, y + r], outline=color, width=2)  # unfilled: what is under shows
    else:
        draw.ellipse([x - r, y - r, x + r, y + r], fill=color)


def line_plot(series: Sequence[Series], axes: Axes) -> Image.Image:
    """Draw ``series`` on one set of axes; an empty plot says "no data" instead of failing."""
    img = Image.new("RGB", axes.size, BACKGROUND)
    draw = ImageDraw.Draw(img)
    box = _draw_labels(img, draw, axes)
    points = [_finite_points(s, axes.logy) for s in series]
    if not any(points):
        left, top, right, bottom = box
        mw, mh = text_size(draw, "no data", font(13))
        draw.text(((left + right - mw) // 2, (top + bottom - mh) // 2), "no data", font=font(13), fill=INK)
        return img
    frame = _Frame(box, axes, points, any(s.markers for s in series))
    _draw_grid(draw, frame)
    _draw_hlines(draw, frame, axes)
    _draw_legend(draw, frame, _draw_series(draw, frame, series, points))
    return img


def _draw_labels(img: Image.Image, draw: ImageDraw.ImageDraw, axes: Axes) -> tuple[int, int, int, int]:
    """Title, axis labels and the plot area's box; returns the box (left, top, right, bottom)."""
    W, H = axes.size
    left, top, right, bottom = 74, 34, W - 16, H - 48
    tw, _ = text_size(draw, axes.title, font(15))
    draw.text(((W - tw) // 2, 8), axes.title, font=font(15), fill=INK)
    draw.rectangle([left, top, right, bottom], outline=INK)
    xw, _ = text_size(draw, axes.xlabel, font(13))
    draw.text(((left + right - xw) // 2, H - 20), axes.xlabel, font=font(13), fill=INK)
    ylab = _vertical_text(axes.ylabel, font(13), INK)
    img.paste(ylab, (4, (top + bottom - ylab.height) // 2), ylab)
    return left, top, right, bottom


class _Frame:
    """The plot area's box in pixels and the data range it shows (on a log axis, y0 and y1 are exponents)."""

    def __init__(
        self, box: tuple[int, int, int, int], axes: Axes, points: list[list[tuple[float, float]]], markers: bool
    ) -> None:
        self.left, self.top, self.right, self.bottom = box
        self.logy = axes.logy
        xs = [x for ps in points for x, _ in ps]
        x0, x1 = min(xs), max(xs)
        if x1 == x0:
            x0, x1 = x0 - 1, x1 + 1
        elif markers:  # room for markers at the ends
            pad = (x1 - x0) * 0.03
            x0, x1 = x0 - pad, x1 + pad
        ys = [y for ps in points for _, y in ps] + [y for y, _ in axes.hlines if y > 0 or not axes.logy]
        y0, y1 = axes.ylim if axes.ylim is not None else (min(ys), max(ys))
        if axes.logy:
            y0, y1 = math.floor(math.log10(y0)), math.ceil(math.log10(y1))
            if y1 == y0:
                y1 += 1
            self.yticks = [10.0**k for k in range(y0, y1 + 1)]
        else:
            if y1 == y0:
                y0, y1 = y0 - 0.5, y1 + 0.5
            pad = (y1 - y0) * 0.05 if axes.ylim is None else 0.0
            y0, y1 = y0 - pad, y1 + pad
            self.yticks = [t for t in nice_ticks(y0, y1) if y0 <= t <= y1]
        self.x0, self.x1, self.y0, self.y1 = x0, x1, y0, y1

    def tx(self, x: float) -> float:
        return self.left + (x - self.x0) / (self.x1 - self.x0) * (self.right - self.left)

    def ty(self, y: float) -> float:
        v = math.log10(y) if self.logy else y
        return self.bottom - (v - self.y0) / (self.y1 - self.y0) * (self.bottom - self.top)

    def clamp(self, py: float) -> float:
        return min(max(py, self.top), self.bottom)


def _draw_grid(draw: ImageDraw.ImageDraw, f: _Frame) -> None:
    """Grid lines, ticks and tick labels on both axes, then the box again over the grid's ends."""
    for t in f.yticks:
        py = f.ty(t)
        draw.line([(f.left + 1, py), (f.right - 1, py)], fill=GRID)
        draw.line([(f.left - 4, py), (f.left, py)], fill=INK)
        lw, lh = text_size(draw, format_tick(t), font(11))
        draw.text((f.left - 7 - lw, py - lh / 2 - 2), format_tick(t), font=font(11), fill=INK)
    for t in nice_ticks(f.x0, f.x1):
        if not f.x0 <= t <= f.x1:
            continue
        px = f.tx(t)
        draw.line([(px, f.top + 1), (px, f.bottom - 1)], fill=GRID)
        draw.line([(px, f.bottom), (px, f.bottom + 4)], fill=INK)
        lw, _ = text_size(draw, format_tick(t), font(11))
        draw.text((px - lw / 2, f.bottom + 6), format_tick(t), font=font(11), fill=INK)
    draw.rectangle([f.left, f.top, f.right, f.bottom], outline=INK)


def _draw_hlines(draw: ImageDraw.ImageDraw, f: _Frame, axes: Axes) -> None:
    """The dotted reference lines (chance levels), each labelled above its left end."""
    for y, label in axes.hlines:
        if axes.logy and y <= 0:
            continue
        py = f.clamp(f.ty(y))
        _dashed_line(draw, (f.left, py), (f.right, py), (120, 120, 120), 1, dash=3)
        _, lh = text_size(draw, label, font(11))
        draw.text((f.left + 6, py - lh - 5), label, font=font(11), fill=(90, 90, 90))


def _draw_series(draw, f: _Frame, series: Sequence[Series], points) -> list[tuple[str, tuple, bool, bool]]:
    """Each series' line and markers (a lone point gets a marker); returns the legend's entries. Dashed
    series are drawn first, so a solid series' point at the same place (the last centre-crop evaluation
    beside the ten patches of the same checkpoint) stays on top."""
    legend = []
    for i, (s, pts) in sorted(enumerate(zip(series, points, strict=True)), key=lambda e: not e[1][0].dashed):
        color = s.color or PALETTE[i % len(PALETTE)]
        ps = [(f.tx(x), f.clamp(f.ty(y))) for x, y in pts]
        if len(ps) > 1 and s.dashed:
            for a, b in zip(ps, ps[1:], strict=False):
                _dashed_line(draw, a, b, color, s.width)
        elif len(ps) > 1:
            draw.line(ps, fill=color, width=s.width, joint="curve")
        marked = s.markers or len(ps) == 1
        if marked:
            for px, py in ps:
                _marker(draw, px, py, s.width + 2, color, hollow=s.dashed)
        if s.label:
            legend.append((i, (s.label, color, s.dashed, marked)))
    return [entry for _, entry in sorted(legend)]


def _draw_legend(draw: ImageDraw.ImageDraw, f: _Frame, legend: list[tuple[str, tuple, bool, bool]]) -> None:
    """A boxed legend in the top right corner: a line sample (and marker) per entry, then its label."""
    if not legend:
        return
    heights = [max(text_size(draw, label, font(11))[1], 10) for label, *_ in legend]
    lw = max(text_size(draw, label, font(11))[0] for label, *_ in legend) + 34
    lx, ly = f.right - lw - 8, f.top + 8
    draw.rectangle([lx, ly, lx + lw, ly + sum(h + 6 for h in heights) + 6], fill=BACKGROUND, outline=(170, 170, 170))
    y = ly + 5
    for (label, color, dashed, marked), h in zip(legend, heights, strict=True):
        mid = y + h / 2 + 1
        if dashed:
            _dashed_line(draw, (lx + 6, mid), (lx + 26, mid), color, 2, dash=4)
        else:
            draw.line([(lx + 6, mid), (lx + 26, mid)], fill=color, width=3)
        if marked:
            _marker(draw, lx + 16, mid, 4, color, hollow=dashed)
        draw.text((lx + 30, y), label, font=font(11), fill=INK)
        y += h + 6


def hstack(images: Sequence[Image.Image], gap: int = 8) -> Image.Image:
    """Images side by side, top-aligned."""
    w = sum(im.width for im in images) + gap * (len(images) - 1)
    out = Image.new("RGB", (w, max(im.height for im in images)), BACKGROUND)
    x = 0
    for im in images:
        out.paste(im, (x, 0))
        x += im.width + gap
    return out
