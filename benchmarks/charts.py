"""Charts for the benchmark and quality reports, drawn with Pillow (matplotlib is not a dependency): bars, lines
and a labelled scatter, each one PIL image, and save_panels to put them side by side in one PNG."""
from __future__ import annotations

import math
from pathlib import Path

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def _nice_ticks(top: float, count: int = 5) -> list[float]:
    if top <= 0:
        return [0.0, 1.0]
    raw = top / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    return [i * step for i in range(int(math.ceil(top / step)) + 1)]


def bars(title: str, categories: list[str], series: dict[str, list], ylabel: str):
    """A grouped bar chart as a PIL image: one group per category, one bar per series (None leaves a gap); None when
    there is nothing to draw."""
    from PIL import Image, ImageDraw

    values = [v for vs in series.values() for v in vs if v is not None]
    if not categories or not values:
        return None
    width, height = max(560, 120 + 55 * len(categories) * max(1, len(series))), 460
    left, right, top, bottom = 80, 20, 50, 110
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    f_title, f_small = _font(16), _font(11)
    d.text((left, 15), title, fill="black", font=f_title)
    ticks = _nice_ticks(max(values) * 1.05)
    ymax = ticks[-1]
    plot_h, plot_w = height - top - bottom, width - left - right

    def y_of(v):
        return top + plot_h * (1 - v / ymax)

    for t in ticks:
        y = y_of(t)
        d.line([(left, y), (width - right, y)], fill=(225, 225, 225))
        d.text((left - 8, y), f"{t:g}", fill="black", font=f_small, anchor="rm")
    d.text((10, top - 20), ylabel, fill="black", font=f_small)
    d.line([(left, top), (left, top + plot_h), (width - right, top + plot_h)], fill="black")
    group_w = plot_w / len(categories)
    bar_w = group_w * 0.8 / len(series)
    for i, cat in enumerate(categories):
        x0 = left + i * group_w + group_w * 0.1
        for j, (name, vs) in enumerate(series.items()):
            v = vs[i] if i < len(vs) else None
            if v is None:
                continue
            bx = x0 + j * bar_w
            d.rectangle([bx, y_of(v), bx + bar_w - 2, top + plot_h], fill=PALETTE[j % len(PALETTE)])
            d.text((bx + bar_w / 2, y_of(v) - 2), f"{v:.3g}", fill="black", font=f_small, anchor="mb")
        d.text((left + (i + 0.5) * group_w, top + plot_h + 6), cat, fill="black", font=f_small, anchor="ma")
    lx, ly = left, height - bottom + 40
    for j, name in enumerate(series):
        d.rectangle([lx, ly, lx + 12, ly + 12], fill=PALETTE[j % len(PALETTE)])
        d.text((lx + 16, ly + 6), name, fill="black", font=f_small, anchor="lm")
        lx += 30 + int(d.textlength(name, font=f_small))
        if lx > width - 150:
            lx, ly = left, ly + 20
    return img


def _axes(d, title, xlabel, ylabel, width, height, left, right, top, bottom, x_of, y_of, xticks, yticks, fonts):
    f_title, f_small = fonts
    d.text((left, 15), title, fill="black", font=f_title)
    for t in yticks:
        d.line([(left, y_of(t)), (width - right, y_of(t))], fill=(225, 225, 225))
        d.text((left - 8, y_of(t)), f"{t:g}", fill="black", font=f_small, anchor="rm")
    for t in xticks:
        d.line([(x_of(t), top), (x_of(t), height - bottom)], fill=(235, 235, 235))
        d.text((x_of(t), height - bottom + 6), f"{t:g}", fill="black", font=f_small, anchor="ma")
    d.line([(left, top), (left, height - bottom), (width - right, height - bottom)], fill="black")
    d.text((10, top - 20), ylabel, fill="black", font=f_small)
    d.text(((left + width - right) / 2, height - bottom + 24), xlabel, fill="black", font=f_small, anchor="ma")


def lines(title: str, series: dict[str, list[tuple[float, float]]], xlabel: str, ylabel: str, *, logx: bool = False,
          hline: tuple[str, float] | None = None):
    """A line chart as a PIL image: one polyline with markers per series of (x, y) points; logx puts x on a log
    scale; hline draws one labelled horizontal reference line. None when there is nothing to draw."""
    from PIL import Image, ImageDraw

    pts = [p for ps in series.values() for p in ps]
    if not pts:
        return None
    width, height, left, right, top, bottom = 620, 440, 70, 20, 50, 90
    xs = [math.log10(x) if logx else x for x, _ in pts]
    lo, hi = min(xs), max(xs)
    lo, hi = (lo - 0.5, hi + 0.5) if hi == lo else (lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
    ymax = max([y for _, y in pts] + ([hline[1]] if hline else [])) * 1.05
    yticks = _nice_ticks(ymax)
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    fonts = (_font(16), _font(11))

    def x_of(x):
        v = math.log10(x) if logx else x
        return left + (width - left - right) * (v - lo) / (hi - lo)

    def y_of(y):
        return top + (height - top - bottom) * (1 - y / yticks[-1])

    xticks = sorted({x for x, _ in pts})
    _axes(d, title, xlabel, ylabel, width, height, left, right, top, bottom, x_of, y_of, xticks, yticks, fonts)
    if hline:
        d.line([(left, y_of(hline[1])), (width - right, y_of(hline[1]))], fill=(120, 120, 120), width=1)
        d.text((width - right - 4, y_of(hline[1]) - 3), hline[0], fill=(90, 90, 90), font=fonts[1], anchor="rb")
    for j, (name, ps) in enumerate(series.items()):
        color = PALETTE[j % len(PALETTE)]
        xy = [(x_of(x), y_of(y)) for x, y in sorted(ps)]
        if len(xy) > 1:
            d.line(xy, fill=color, width=2)
        for x, y in xy:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
    lx, ly = left, height - bottom + 45
    for j, name in enumerate(series):
        d.rectangle([lx, ly, lx + 12, ly + 12], fill=PALETTE[j % len(PALETTE)])
        d.text((lx + 16, ly + 6), name, fill="black", font=fonts[1], anchor="lm")
        lx += 30 + int(d.textlength(name, font=fonts[1]))
    return img


def scatter(title: str, points: list[tuple[str, float, float]], xlabel: str, ylabel: str, *, limit: float = 1.0):
    """A labelled scatter plot on [0, limit] x [0, limit] as a PIL image (precision-recall); None when empty."""
    from PIL import Image, ImageDraw

    if not points:
        return None
    legend_rows = (len(points) + 1) // 2
    width, height, left, right, top, bottom = 620, 560 + 18 * legend_rows, 70, 30, 50, 60 + 18 * legend_rows
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    fonts = (_font(16), _font(11))

    def x_of(x):
        return left + (width - left - right) * x / limit

    def y_of(y):
        return top + (height - top - bottom) * (1 - y / limit)

    ticks = [limit * i / 5 for i in range(6)]
    _axes(d, title, xlabel, ylabel, width, height, left, right, top, bottom, x_of, y_of, ticks, ticks, fonts)
    for j, (label, x, y) in enumerate(points):  # numbered points, names in a legend below (labels overlap)
        color = PALETTE[j % len(PALETTE)]
        d.ellipse([x_of(x) - 4, y_of(y) - 4, x_of(x) + 4, y_of(y) + 4], fill=color)
        d.text((x_of(x) + 6, y_of(y)), str(j + 1), fill=color, font=fonts[1], anchor="lm")
        lx, ly = left + (j % 2) * (width - left) // 2, height - bottom + 40 + 18 * (j // 2)
        d.text((lx, ly), f"{j + 1}  {label}", fill=color, font=fonts[1], anchor="lm")
    return img


def save_panels(path: Path, panels: list) -> Path | None:
    """Charts side by side in one PNG; None (and no file) when none has data."""
    from PIL import Image

    panels = [p for p in panels if p is not None]
    if not panels:
        return None
    out = Image.new("RGB", (sum(p.width for p in panels), max(p.height for p in panels)), "white")
    x = 0
    for p in panels:
        out.paste(p, (x, 0))
        x += p.width
    out.save(path)
    return path
