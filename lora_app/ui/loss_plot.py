"""The live loss plot as one SVG string, drawn by the server and shown in a gr.HTML.

Why not gr.LinePlot (which the Compare tab uses): on each update it runs Vega's whole dataflow in the page,
including a Voronoi diagram over every point for its hover, ~25 ms of chromium CPU per update on a 2-core
machine with an empty plot and more with each point; a run that reports twice a second lost that CPU from its
own training there (bench/page_cpu.py). Setting a finished SVG costs the page a few ms.

Each series is one path (an element per point cost the page ~20 ms an update at 200 points): its points are in
its data-points attribute ("x,y,step,loss ..."), which HOVER_JS reads to show the point under the pointer and
tests read to see what is drawn. The colours are the theme's (CSS variables), so dark mode follows."""

from __future__ import annotations

import math
import re
from html import escape

import numpy as np
import pandas as pd

WIDTH, HEIGHT = 1000, 320  # scaled to the page's width: about its size on a laptop's screen
LEFT, RIGHT, TOP, BOTTOM = 64, 20, 36, 64  # room for the y labels, the title, the x labels and the legend
# Series -> (colour, dash); the colours follow the page's theme.
STYLE = {"train": ("var(--color-accent)", ""), "valid": ("var(--body-text-color-subdued)", "6 4")}
TEXT = 'fill="var(--body-text-color)" font-size="13" font-family="inherit"'
GRID = 'stroke="var(--border-color-primary)" stroke-width="1"'
SERIES_POINTS = re.compile(r'data-series="(\w+)" data-points="([^"]*)"')
METRIC_POINTS = re.compile(r'data-metric="(\w+)".*?(?=data-metric="|$)', re.S)
SERIES_METRIC_POINTS = re.compile(r'data-series="(\w+)" data-metric-points="([^"]*)"')


# gr.HTML(js_on_load=...): a tooltip naming the point nearest the pointer (within 24 px), as Vega's hover did.
# Listeners on the component's element, which outlives the SVG that each update replaces inside it.
HOVER_JS = """
const tip = document.createElement("div");
tip.className = "loss-tip";
document.body.appendChild(tip);
element.addEventListener("mousemove", event => {
  const svg = element.querySelector("svg");
  let best = null, nearest = 24;
  if (svg) {
    const box = svg.getBoundingClientRect(), k = box.width / svg.viewBox.baseVal.width;
    for (const series of svg.querySelectorAll("[data-points]")) {
      for (const point of series.dataset.points.split(" ")) {
        const [x, y, step, loss] = point.split(",");
        const d = Math.hypot(box.left + x * k - event.clientX, box.top + y * k - event.clientY);
        if (d < nearest) [nearest, best] = [d, `${series.dataset.series} · step ${step} · loss ${loss}`];
      }
    }
  }
  tip.style.display = best ? "block" : "none";
  tip.textContent = best || "";
  tip.style.left = `${event.clientX + 12}px`;
  tip.style.top = `${event.clientY + 12}px`;
});
element.addEventListener("mouseleave", () => { tip.style.display = "none"; });
"""


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About `count` round values (1, 2, 2.5 or 5 times a power of ten apart) covering [low, high]."""
    if not high > low:
        low, high = low - 1, high + 1
    raw = (high - low) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first = math.floor(low / step) * step
    ticks = [first + i * step for i in range(math.ceil((high - first) / step - 1e-9) + 1)]  # 1e-9: float error
    return [round(t, 12) for t in ticks]


def tick_labels(ticks: list[float]) -> list[str]:
    """The ticks with the fewest decimals that still tell them apart (2.5, 3.0 or 2.30001, 2.30002)."""
    decimals = next(d for d in range(13) if all(abs(round(t, d) - t) < 1e-12 for t in ticks))
    return [f"{t:,.{decimals}f}" for t in ticks]


def loss_svg(frame: pd.DataFrame, title: str = "Loss", y_label: str = "loss", points_attr: str = "data-points") -> str:
    """The plot of `frame` (columns step, loss, series); NaN and infinite losses (a diverged run) left out. Other
    quantities (metric_svg) are drawn the same way, their values in the `loss` column, under another y label and
    points attribute (so points_in() and the hover read the loss plot only)."""
    frame = frame[np.isfinite(frame["loss"])]
    x0, x1, y0, y1 = LEFT, WIDTH - RIGHT, HEIGHT - BOTTOM, TOP
    parts = [f'<svg viewBox="0 0 {WIDTH} {HEIGHT}" width="100%" role="img" aria-label="{escape(title)} plot" '
             f'xmlns="http://www.w3.org/2000/svg">',
             f'<text x="{WIDTH / 2}" y="22" text-anchor="middle" {TEXT}>{escape(title)}</text>']
    if frame.empty:
        parts.append(f'<text x="{WIDTH / 2}" y="{HEIGHT / 2}" text-anchor="middle" {TEXT}>'
                     f"No {escape(y_label)} reported yet</text></svg>")
        return "".join(parts)
    # The axes span the data exactly on x (the curve fills the width; one step: a step either side) and the
    # round ticks on y.
    lo_x, hi_x = float(frame["step"].min()), float(frame["step"].max())
    if hi_x == lo_x:
        lo_x, hi_x = lo_x - 1, hi_x + 1
    xs, ys = nice_ticks(lo_x, hi_x), nice_ticks(frame["loss"].min(), frame["loss"].max())
    lo_y, hi_y = ys[0], ys[-1]

    def px(step: float) -> float:
        return x0 + (step - lo_x) / (hi_x - lo_x) * (x1 - x0)

    def py(loss: float) -> float:
        return y0 + (loss - lo_y) / (hi_y - lo_y) * (y1 - y0)

    for t, label in zip(ys, tick_labels(ys)):
        parts.append(f'<line x1="{x0}" x2="{x1}" y1="{py(t):.1f}" y2="{py(t):.1f}" {GRID}/>'
                     f'<text x="{x0 - 8}" y="{py(t) + 4:.1f}" text-anchor="end" {TEXT}>{label}</text>')
    for t, label in zip(xs, tick_labels(xs)):
        if lo_x <= t <= hi_x:
            parts.append(f'<text x="{px(t):.1f}" y="{y0 + 20}" text-anchor="middle" {TEXT}>{label}</text>')
    parts.append(f'<text x="{(x0 + x1) / 2}" y="{y0 + 38}" text-anchor="middle" {TEXT}>step</text>'
                 f'<text transform="translate(16 {(y0 + y1) / 2}) rotate(-90)" text-anchor="middle" {TEXT}>'
                 f"{escape(y_label)}</text>")
    legend_x = (x0 + x1) / 2 - 60 * len(STYLE) / 2
    for i, (series, (colour, dash)) in enumerate(STYLE.items()):
        rows = frame[frame["series"] == series]
        coords = [(px(s), py(v), s, v) for s, v in zip(rows["step"], rows["loss"])]
        # A path, not a polyline: a lone first point, a zero-length line with round caps, shows as a dot.
        path = "M" + " L".join(f"{x:.1f} {y:.1f}" for x, y, _, _ in coords) + (
            f" L{coords[0][0]:.1f} {coords[0][1]:.1f}" if len(coords) == 1 else "")
        points = " ".join(f"{x:.1f},{y:.1f},{step},{loss:.6g}" for x, y, step, loss in coords)
        if coords:
            width = 6 if len(coords) == 1 else 2
            parts.append(f'<path d="{path}" fill="none" stroke="{colour}" stroke-width="{width}" '
                         f'stroke-linecap="round" stroke-linejoin="round" stroke-dasharray="{dash}" '
                         f'data-series="{series}" {points_attr}="{points}"/>')
        lx = legend_x + 60 * i
        parts.append(f'<line x1="{lx}" x2="{lx + 18}" y1="{HEIGHT - 8}" y2="{HEIGHT - 8}" stroke="{colour}" '
                     f'stroke-width="2" stroke-dasharray="{dash}"/>'
                     f'<text x="{lx + 22}" y="{HEIGHT - 4}" {TEXT}>{series}</text>')
    parts.append("</svg>")
    return "".join(parts)


def points_in(svg: str) -> list[tuple[int, float, str]]:
    """[(step, loss, series)] that loss_svg() drew into `svg`: for scripts reading /poll, and for tests."""
    return [(int(step), float(loss), series) for series, points in SERIES_POINTS.findall(svg)
            for _, _, step, loss in (point.split(",") for point in points.split())]


def metric_svg(frame: pd.DataFrame, metric: str, title: str) -> str:
    """One metric's plot (a `loss_svg` of its values), in a box that names it: data-metric="grad_norm"."""
    svg = loss_svg(frame, title, y_label=title.lower(), points_attr="data-metric-points")
    return f'<div class="metric-plot" data-metric="{metric}">{svg}</div>'


def metric_points_in(html: str) -> dict[str, list[tuple[int, float, str]]]:
    """{metric: [(step, value, series)]} that metric_svg() drew into `html`: for scripts and tests."""
    return {metric.group(1): [(int(step), float(value), series)
                              for series, points in SERIES_METRIC_POINTS.findall(metric.group(0))
                              for _, _, step, value in (point.split(",") for point in points.split())]
            for metric in METRIC_POINTS.finditer(html)}
