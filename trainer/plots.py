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
PALETTE = (
    (0, 114, 178),
    (213, 94, 0),
    (0, 158, 115),
    (204, 121, 167),
    (230, 159, 0),
    (86, 180, 233),
    (0, 0, 0),
)
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
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    t = first
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
    pts = []
    for x, y in zip(s.xs, s.ys, strict=False):
        if x is None or y is None:
            continue
        x, y = float(x), float(y)
        if math.isfinite(x) and math.isfinite(y) and (y > 0 or not logy):
            pts.append((x, y))
    return pts


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
        draw.line([(x0 + (x1 - x0) * a, y0 + (y1 - y0) * a), (x0 + (x1 - x0) * b, y0 + (y1 - y0) * b)],
                  fill=color, width=width)  # fmt: skip


def _marker(draw, x: float, y: float, r: float, color, hollow: bool) -> None:
    # Hollow markers tell the dashed series (ten patches) from the solid ones when a line has one point.
    if hollow:
        draw.rectangle([x - r, y - r, x + r, y + r], fill=BACKGROUND, outline=color, width=2)
    else:
        draw.ellipse([x - r, y - r, x + r, y + r], fill=color)


def line_plot(series: Sequence[Series], axes: Axes) -> Image.Image:
    """Draw ``series`` on one set of axes; an empty plot says "no data" instead of failing."""
    W, H = axes.size
    img = Image.new("RGB", (W, H), BACKGROUND)
    draw = ImageDraw.Draw(img)
    f_title, f_label, f_tick = font(15), font(13), font(11)

    # Plot area, leaving room for the title, tick labels and axis labels.
    left, right, top, bottom = 74, W - 16, 34, H - 48
    tw, _ = text_size(draw, axes.title, f_title)
    draw.text(((W - tw) // 2, 8), axes.title, font=f_title, fill=INK)

    pts = {id(s): _finite_points(s, axes.logy) for s in series}
    all_pts = [p for ps in pts.values() for p in ps]
    xs = [p[0] for p in all_pts]
    ys = [p[1] for p in all_pts] + [y for y, _ in axes.hlines if y > 0 or not axes.logy]

    draw.rectangle([left, top, right, bottom], outline=INK)
    xw, _ = text_size(draw, axes.xlabel, f_label)
    draw.text(((left + right - xw) // 2, H - 20), axes.xlabel, font=f_label, fill=INK)
    ylab = _vertical_text(axes.ylabel, f_label, INK)
    img.paste(ylab, (4, (top + bottom - ylab.height) // 2), ylab)
    if not all_pts:
        msg = "no data"
        mw, mh = text_size(draw, msg, f_label)
        draw.text(((left + right - mw) // 2, (top + bottom - mh) // 2), msg, font=f_label, fill=INK)
        return img

    x0, x1 = min(xs), max(xs)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    elif any(s.markers for s in series):  # room for markers at the ends
        pad = (x1 - x0) * 0.03
        x0, x1 = x0 - pad, x1 + pad
    if axes.ylim is not None:
        y0, y1 = axes.ylim
    else:
        y0, y1 = min(ys), max(ys)
    if axes.logy:
        ly0, ly1 = math.floor(math.log10(y0)), math.ceil(math.log10(y1))
        if ly1 == ly0:
            ly1 += 1
        yticks = [10.0**k for k in range(ly0, ly1 + 1)]

        def ty(y: float) -> float:
            return bottom - (math.log10(y) - ly0) / (ly1 - ly0) * (bottom - top)
    else:
        if y1 == y0:
            y0, y1 = y0 - 0.5, y1 + 0.5
        pad = (y1 - y0) * 0.05 if axes.ylim is None else 0.0
        y0, y1 = y0 - pad, y1 + pad
        yticks = [t for t in nice_ticks(y0, y1) if y0 <= t <= y1]

        def ty(y: float) -> float:
            return bottom - (y - y0) / (y1 - y0) * (bottom - top)

    def tx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (right - left)

    # Grid and ticks.
    for t in yticks:
        py = ty(t)
        draw.line([(left + 1, py), (right - 1, py)], fill=GRID)
        draw.line([(left - 4, py), (left, py)], fill=INK)
        label = format_tick(t)
        lw, lh = text_size(draw, label, f_tick)
        draw.text((left - 7 - lw, py - lh / 2 - 2), label, font=f_tick, fill=INK)
    for t in nice_ticks(x0, x1):
        if not x0 <= t <= x1:
            continue
        px = tx(t)
        draw.line([(px, top + 1), (px, bottom - 1)], fill=GRID)
        draw.line([(px, bottom), (px, bottom + 4)], fill=INK)
        label = format_tick(t)
        lw, _ = text_size(draw, label, f_tick)
        draw.text((px - lw / 2, bottom + 6), label, font=f_tick, fill=INK)
    draw.rectangle([left, top, right, bottom], outline=INK)

    def clamp(p: tuple[float, float]) -> tuple[float, float]:
        return (p[0], min(max(p[1], top), bottom))

    for y, label in axes.hlines:
        if axes.logy and y <= 0:
            continue
        py = min(max(ty(y), top), bottom)
        _dashed_line(draw, (left, py), (right, py), (120, 120, 120), 1, dash=3)
        lw, lh = text_size(draw, label, f_tick)
        draw.text((left + 6, py - lh - 5), label, font=f_tick, fill=(90, 90, 90))

    # Lines, then markers.
    legend = []
    for i, s in enumerate(series):
        color = s.color or PALETTE[i % len(PALETTE)]
        ps = [clamp((tx(x), ty(y))) for x, y in pts[id(s)]]
        if len(ps) > 1:
            if s.dashed:
                for a, b in zip(ps, ps[1:], strict=False):
                    _dashed_line(draw, a, b, color, s.width)
            else:
                draw.line(ps, fill=color, width=s.width, joint="curve")
        marked = s.markers or len(ps) == 1
        if marked:
            r = s.width + 2
            for px, py in ps:
                _marker(draw, px, py, r, color, hollow=s.dashed)
        if s.label:
            legend.append((s.label, color, s.dashed, marked))

    if legend:
        rows = [text_size(draw, lab, f_tick) for lab, *_ in legend]
        lw = max(w for w, _ in rows) + 34
        lh = sum(max(h, 10) + 6 for _, h in rows) + 6
        lx, ly = right - lw - 8, top + 8
        draw.rectangle([lx, ly, lx + lw, ly + lh], fill=BACKGROUND, outline=(170, 170, 170))
        y = ly + 5
        for (label, color, dashed, marked), (_, h) in zip(legend, rows, strict=True):
            mid = y + max(h, 10) / 2 + 1
            if dashed:
                _dashed_line(draw, (lx + 6, mid), (lx + 26, mid), color, 2, dash=4)
            else:
                draw.line([(lx + 6, mid), (lx + 26, mid)], fill=color, width=3)
            if marked:
                _marker(draw, lx + 16, mid, 4, color, hollow=dashed)
            draw.text((lx + 30, y), label, font=f_tick, fill=INK)
            y += max(h, 10) + 6
    return img


def hstack(images: Sequence[Image.Image], gap: int = 8, background=BACKGROUND) -> Image.Image:
    """Images side by side, top-aligned."""
    w = sum(im.width for im in images) + gap * (len(images) - 1)
    h = max(im.height for im in images)
    out = Image.new("RGB", (w, h), background)
    x = 0
    for im in images:
        out.paste(im, (x, 0))
        x += im.width + gap
    return out
