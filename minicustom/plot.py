"""Charts as PNG files, drawn by matplotlib: the trainer's loss curves and the comparison harness's scatter.

- `write_loss_chart(out, history)`: out/loss.png (the train loss as a line, the eval loss as a line with a
  marker per evaluation; x step, y loss) and out/loss.csv (step,loss,eval_loss: one row per record of
  metrics.jsonl that has either loss, the cells as Python writes the numbers, so nan/inf stay visible
  there; the chart skips non-finite points).
- `write_compare_chart(path, rows, task)`: two panels, accuracy against trainable parameters (symlog x so
  that the prompting methods' 0 fits) and against training seconds, each method one point named beside it.
  Names are placed without overlap by `place_labels`: candidate offsets on square rings around the point,
  nearest ring first (right, left, above, below, the diagonals, the directions between; from the second
  ring on with a leader line), the first whose box (the size the renderer measures) is inside the axes
  and clear of every placed name, leader and marker.
- `write_compare_csv(path, rows)`: the rows as a table, every key a column.

matplotlib is optional (`pip install 'minicustom[plot]'`): it is imported only when a chart is drawn, and
only its object API (Figure + the Agg canvas), so pyplot's global state and GUI backends stay untouched.
Without it loss.csv is still written (the caller writes comparison.csv with write_compare_csv either way)
and one line per chart kind, once per process, says what to install. Every file is written to a temporary
name and renamed (files.atomic_write), so a reader never sees half a PNG.

Left out: log-scale loss, smoothing, one chart per metric (lr, grad_norm are in metrics.jsonl), a label
solver better than greedy (adjustText repels labels iteratively; for a dozen names greedy suffices: with
14 methods on one point a leader may cross a name, and names overlap only if no candidate up to 135
points out is free).
"""

from __future__ import annotations

import csv
import math
import numbers
import sys
from pathlib import Path
from types import SimpleNamespace

from .files import atomic_write, atomic_write_all

LOSS_SIZE, COMPARE_SIZE, DPI = (8.0, 4.5), (11.0, 4.5), 100  # inches: 800x450 and 1100x450 pixels
LABEL_SIZE = 8  # points
MARKER_SIZE = 30  # points squared, matplotlib's scatter `s`
# Label offsets in points, on square rings (so that names stack in rows and columns): the first ring
# touches the marker; beyond it a leader line shows whose name it is.
_RINGS = (5, 12, 20, 30, 42, 56, 72, 90, 110, 135)
_DIRECTIONS = ((1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (1, -1), (-1, 1), (-1, -1),
               (1, .5), (1, -.5), (-1, .5), (-1, -.5), (.5, 1), (-.5, 1), (.5, -1), (-.5, -1))
_PAD = 2  # pixels kept clear around each label
_HINTED: set[str] = set()


def _matplotlib():
    """The few matplotlib names used here, or None when matplotlib is not installed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.path import Path as Polyline
        from matplotlib.transforms import Bbox, offset_copy
    except ImportError:
        return None
    return SimpleNamespace(Figure=Figure, FigureCanvasAgg=FigureCanvasAgg, Bbox=Bbox, Polyline=Polyline,
                           offset_copy=offset_copy)


def _hint(kind: str, message: str):
    if kind not in _HINTED:  # once per process: a run saves many checkpoints
        _HINTED.add(kind)
        print(message, file=sys.stderr)


def _finite(*values) -> bool:
    return all(isinstance(v, numbers.Real) and math.isfinite(v) for v in values)


def _csv_writer(rows: list[list]):
    def write(tmp: Path):
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows(rows)
    return write


def _png_writer(fig):
    # the temp name ends in .tmp, so the format cannot be guessed from it
    return lambda tmp: fig.savefig(tmp, format="png", dpi=DPI)


def loss_csv_rows(history: list[dict]) -> list[list]:
    rows = [["step", "loss", "eval_loss"]]
    for r in history:
        if "loss" in r or "eval_loss" in r:
            rows.append([r.get("step", ""), r.get("loss", ""), r.get("eval_loss", "")])
    return rows


def loss_figure(history: list[dict], title: str = "loss"):
    mpl = _matplotlib()
    fig = mpl.Figure(figsize=LOSS_SIZE, dpi=DPI, layout="constrained")
    mpl.FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    drawn = False
    for key, label, style in (("loss", "train", dict(color="C0", lw=1.5)),
                              ("eval_loss", "eval", dict(color="C1", lw=1.5, marker="o", ms=4))):
        pts = [(r["step"], r[key]) for r in history if key in r and _finite(r.get("step"), r[key])]
        if pts:
            ax.plot(*zip(*pts), label=label, **style)
            drawn = True
    if drawn:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no finite loss values yet", transform=ax.transAxes, ha="center", va="center")
    ax.set(xlabel="step", ylabel="loss", title=title)
    ax.grid(alpha=0.3)
    return fig


def write_loss_chart(out: Path, history: list[dict]) -> Path | None:
    """out/loss.png and out/loss.csv from the metric records; without matplotlib, the CSV alone."""
    out = Path(out)
    table = (out / "loss.csv", _csv_writer(loss_csv_rows(history)))
    if _matplotlib() is None:
        atomic_write(*table)
        _hint("loss", f"loss.png needs matplotlib: pip install 'minicustom[plot]' (the curves are in "
                      f"{out / 'loss.csv'} and metrics.jsonl)")
        return None
    png = out / "loss.png"
    atomic_write_all([table, (png, _png_writer(loss_figure(history, f"{out.name}: loss")))])
    return png


def write_compare_csv(path: Path, rows: list[dict]):
    keys = list(dict.fromkeys(k for r in rows for k in r))  # every key, in the order first seen
    atomic_write(Path(path), _csv_writer([keys] + [[r.get(k, "") for k in keys] for r in rows]))


def place_labels(ax, points: list[tuple[float, float, str]], renderer, mpl):
    """Name each (x, y, name) point beside it, at the first candidate offset whose box lies inside the axes
    and is clear of every marker, placed name and leader line, and whose own leader crosses no placed name
    and no other marker; when none is, the least bad (a crossed leader before a covered name). Greedy, in
    the order given: deterministic."""
    frame = ax.get_window_extent(renderer).padded(-_PAD)
    r = math.sqrt(MARKER_SIZE) / 2 * DPI / 72 + 1  # marker radius, pixels
    centres = [tuple(ax.transData.transform((x, y))) for x, y, _ in points]
    markers = [mpl.Bbox.from_bounds(cx - r, cy - r, 2 * r, 2 * r) for cx, cy in centres]
    labels, leaders = [], []
    for (x, y, name), (cx, cy) in zip(points, centres):
        probe = ax.text(0, 0, name, fontsize=LABEL_SIZE)
        w, h = probe.get_window_extent(renderer).size  # unrotated, so the same wherever it goes
        probe.remove()
        others = [m for m, (ox, oy) in zip(markers, centres) if math.hypot(ox - cx, oy - cy) > r]
        best = None
        for ring, d in enumerate(_RINGS):
            for ux, uy in _DIRECTIONS:
                px, py = cx + d * ux * DPI / 72, cy + d * uy * DPI / 72  # the text's anchor, pixels
                fx, fy = (ux < 0) + (ux == 0) / 2, (uy < 0) + (uy == 0) / 2  # its alignment: 0 left/bottom
                box = mpl.Bbox.from_bounds(px - fx * w, py - fy * h, w, h).padded(_PAD)
                leader = mpl.Polyline([(cx, cy), (px, py)]) if ring else None
                # worst first: outside the axes, covering a name or marker, then a leader crossing one
                score = (not (frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1)),
                         sum(box.overlaps(b) for b in markers + labels),
                         sum(line.intersects_bbox(box, filled=False) for line in leaders)
                         + (leader is not None and sum(leader.intersects_bbox(b, filled=False)
                                                       for b in labels + others)))
                if best is None or score < best[0]:
                    best = score, (ux, uy, d, fx, fy), box, leader
                if not any(best[0]):
                    break
            if not any(best[0]):
                break
        _, (ux, uy, d, fx, fy), box, leader = best
        ax.text(x, y, name, fontsize=LABEL_SIZE, zorder=4, ha={0: "left", .5: "center", 1: "right"}[fx],
                va={0: "bottom", .5: "center", 1: "top"}[fy],
                transform=mpl.offset_copy(ax.transData, fig=ax.figure, x=d * ux, y=d * uy, units="points"))
        labels.append(box)
        if leader is not None:  # drawn in data coordinates: it stays attached at any dpi
            leaders.append(leader)
            ax.plot(*ax.transData.inverted().transform(leader.vertices).T, color="0.6", lw=0.6, zorder=2)


def compare_figure(rows: list[dict], task: str):
    """The two-panel comparison Figure (on an Agg canvas), names placed."""
    mpl = _matplotlib()
    fig = mpl.Figure(figsize=COMPARE_SIZE, dpi=DPI)
    renderer = mpl.FigureCanvasAgg(fig).get_renderer()
    # a fixed layout: the names are placed in pixels, so nothing may move the axes afterwards
    fig.subplots_adjust(left=0.055, right=0.985, bottom=0.12, top=0.89, wspace=0.14)
    fig.suptitle(f"{task}: accuracy by method")
    panels = (("trainable_params", "trainable parameters (symlog axis: linear below 1, so 0 fits)", "symlog"),
              ("train_seconds", "training seconds", "linear"))
    for i, (key, xlabel, scale) in enumerate(panels):
        ax = fig.add_subplot(1, 2, i + 1)
        pts = [(r[key], r["accuracy"], str(r["method"])) for r in rows if _finite(r.get(key), r.get("accuracy"))]
        if scale == "symlog":
            ax.set_xscale("symlog", linthresh=1)
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=MARKER_SIZE, zorder=3,
                       c=[f"C{j % 10}" for j in range(len(pts))], edgecolors="white", linewidths=0.6)
        ax.margins(x=0.12, y=0.15)
        ax.set(xlabel=xlabel, ylabel="accuracy", xlim=ax.get_xlim(), ylim=ax.get_ylim())  # frozen from here
        ax.grid(alpha=0.3)
        place_labels(ax, pts, renderer, mpl)
    return fig


def write_compare_chart(path: Path, rows: list[dict], task: str) -> Path | None:
    """The comparison scatter as a PNG at path; without matplotlib, a hint and None."""
    if _matplotlib() is None:
        _hint("compare", "comparison.png needs matplotlib: pip install 'minicustom[plot]' (the table is in "
                         "comparison.md, comparison.json and comparison.csv)")
        return None
    path = Path(path)
    atomic_write(path, _png_writer(compare_figure(rows, task)))
    return path
