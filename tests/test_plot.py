"""plot.py: the loss chart and its CSV, the comparison chart (names placed without overlap) and its CSV,
and what is written when matplotlib is missing."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from minicustom import plot

matplotlib = pytest.importorskip("matplotlib")
from matplotlib.image import imread  # noqa: E402
from matplotlib.transforms import offset_copy  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
HISTORY = [
    {"step": 0, "eval_loss": 3.0},
    {"step": 1, "loss": 2.5, "lr": 1e-3},
    {"step": 2, "loss": float("nan")},
    {"step": 3, "loss": 2.0, "eval_loss": 2.25},
    {"step": 4, "lr": 1e-3},  # neither loss: no CSV row
    {"step": 5, "loss": float("inf")},
]
# Python's csv writes str(value): nan and inf stay in the table; only the chart skips them.
LOSS_CSV = "step,loss,eval_loss\r\n0,,3.0\r\n1,2.5,\r\n2,nan,\r\n3,2.0,2.25\r\n5,inf,\r\n"

# 14 methods as minicustom compare reports them: lora, qlora and dpo share one point in the left panel, and
# five methods sit within 3 seconds of each other at accuracy 1.0 in the right one.
ROWS = [dict(method=m, accuracy=a, trainable_params=p, train_seconds=s) for m, a, p, s in [
    ("zero-shot", 0.30, 0, 0.0), ("few-shot", 0.55, 0, 0.0), ("cot", 0.50, 0, 0.0),
    ("prompt", 0.62, 11520, 21.3), ("ptuning", 0.66, 1_194_816, 24.0), ("prefix", 0.70, 1_105_920, 23.1),
    ("ia3", 0.85, 57_600, 20.4), ("adapter", 0.95, 4_423_680, 28.9), ("llama-adapter", 0.80, 55_300, 22.0),
    ("lora", 1.0, 460_800, 30.1), ("dora", 1.0, 483_840, 33.4), ("qlora", 1.0, 460_800, 31.2),
    ("full", 0.98, 134_515_008, 61.0), ("dpo", 1.0, 460_800, 32.0)]]


@pytest.fixture
def no_matplotlib(monkeypatch):
    """matplotlib as if not installed (every matplotlib module unimportable), with the hints not yet shown."""
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr(plot, "_HINTED", set())
    assert plot._matplotlib() is None


def test_loss_chart_writes_png_and_csv(tmp_path):
    assert plot.write_loss_chart(tmp_path, HISTORY) == tmp_path / "loss.png"
    data = (tmp_path / "loss.png").read_bytes()
    assert data[:8] == PNG_SIGNATURE
    img = imread(tmp_path / "loss.png")
    assert img.shape[:2] == (450, 800) and img.shape[2] in (3, 4)
    assert img[..., :3].std() > 0.05  # something was drawn on the white
    assert (tmp_path / "loss.csv").read_bytes().decode() == LOSS_CSV
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.csv", "loss.png"]  # no temp file left


def test_loss_chart_replaces_both_files_or_neither(tmp_path, monkeypatch):
    plot.write_loss_chart(tmp_path, HISTORY[:2])
    first = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    plot.write_loss_chart(tmp_path, HISTORY)
    second = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert first.keys() == second.keys() == {"loss.csv", "loss.png"}
    assert first["loss.png"] != second["loss.png"] and first["loss.csv"] != second["loss.csv"]

    from matplotlib.figure import Figure

    def broken(self, *args, **kwargs):
        raise OSError("disk on fire")

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(OSError, match="loss.png"):  # files.io_error names the target, not its temp file
        plot.write_loss_chart(tmp_path, HISTORY[:2])
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == second


@pytest.mark.parametrize("history", [[], [{"step": 1, "loss": float("nan")}], [{"step": 7, "loss": 1.5}]])
def test_loss_chart_with_no_or_one_finite_point(tmp_path, history):
    assert plot.write_loss_chart(tmp_path, history).read_bytes()[:8] == PNG_SIGNATURE
    assert len((tmp_path / "loss.csv").read_text().splitlines()) == 1 + len(history)


def test_without_matplotlib_loss_csv_only_and_hint_once(tmp_path, no_matplotlib, capsys):
    assert plot.write_loss_chart(tmp_path, HISTORY) is None
    assert plot.write_loss_chart(tmp_path, HISTORY) is None
    assert [p.name for p in tmp_path.iterdir()] == ["loss.csv"]
    assert (tmp_path / "loss.csv").read_bytes().decode() == LOSS_CSV
    err = capsys.readouterr().err
    assert err == (f"loss.png needs matplotlib: pip install 'minicustom[plot]' (the curves are in "
                   f"{tmp_path / 'loss.csv'} and metrics.jsonl)\n")


def test_without_matplotlib_compare_chart_hints_once(tmp_path, no_matplotlib, capsys):
    assert plot.write_compare_chart(tmp_path / "comparison.png", ROWS, "arith") is None
    assert plot.write_compare_chart(tmp_path / "comparison.png", ROWS, "arith") is None
    assert list(tmp_path.iterdir()) == []
    assert capsys.readouterr().err.splitlines() == [
        "comparison.png needs matplotlib: pip install 'minicustom[plot]' (the table is in comparison.md, "
        "comparison.json and comparison.csv)"]


def _overlapping_pairs(boxes):
    return [(i, j) for i in range(len(boxes)) for j in range(i + 1, len(boxes)) if boxes[i].overlaps(boxes[j])]


SAME = [dict(method=f"method-number-{i}", accuracy=1.0, trainable_params=460_800, train_seconds=30.0)
        for i in range(14)]  # the worst case: every name wants the same spot


@pytest.mark.parametrize("rows", [ROWS, SAME], ids=["methods", "identical"])
def test_compare_names_do_not_overlap_and_stay_inside_the_axes(rows):
    fig = plot.compare_figure(rows, "arith")
    renderer = fig.canvas.get_renderer()
    axes = fig.axes
    assert len(axes) == 2 and axes[0].get_xscale() == "symlog" and "symlog" in axes[0].get_xlabel()
    for ax in axes:
        texts = ax.texts
        assert sorted(t.get_text() for t in texts) == sorted(r["method"] for r in rows)
        boxes = [t.get_window_extent(renderer) for t in texts]
        assert _overlapping_pairs(boxes) == []
        frame = ax.get_window_extent(renderer)
        assert all(frame.x0 <= b.x0 and b.x1 <= frame.x1 and frame.y0 <= b.y0 and b.y1 <= frame.y1 for b in boxes)
        # and no name covers another method's marker
        key = "trainable_params" if ax is axes[0] else "train_seconds"
        for r in rows:
            cx, cy = ax.transData.transform((r[key], r["accuracy"]))
            assert not [t.get_text() for t, b in zip(texts, boxes) if b.contains(cx, cy)]

        # The same names all placed to the right of their points, as a naive chart would: they collide.
        naive = []
        for r in rows:
            t = ax.text(r[key], r["accuracy"], r["method"], fontsize=plot.LABEL_SIZE, ha="left", va="center",
                        transform=offset_copy(ax.transData, fig=fig, x=plot._RINGS[0], y=0, units="points"))
            naive.append(t.get_window_extent(renderer))
            t.remove()
        assert len(_overlapping_pairs(naive)) >= 2


def test_compare_chart_png(tmp_path):
    path = tmp_path / "comparison.png"
    assert plot.write_compare_chart(path, ROWS + [dict(method="broken", accuracy=float("nan"),
                                                        trainable_params=1, train_seconds=1.0)], "arith") == path
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert imread(path).shape[:2] == (450, 1100)
    assert [p.name for p in tmp_path.iterdir()] == ["comparison.png"]


def test_compare_figure_is_deterministic():
    a, b = plot.compare_figure(ROWS, "t"), plot.compare_figure(ROWS, "t")
    where = [[(t.get_text(), t.get_horizontalalignment(), t.get_verticalalignment(),
               tuple(t.get_window_extent(f.canvas.get_renderer()).bounds)) for ax in f.axes for t in ax.texts]
             for f in (a, b)]
    assert where[0] == where[1]


def test_compare_csv(tmp_path):
    rows = [{"method": "lora", "accuracy": 0.5, "trainable_params": 10},
            {"method": "few-shot", "accuracy": 0.25, "trainable_params": 0, "note": "a, b"}]
    plot.write_compare_csv(tmp_path / "comparison.csv", rows)
    assert (tmp_path / "comparison.csv").read_bytes().decode() == (
        "method,accuracy,trainable_params,note\r\nlora,0.5,10,\r\nfew-shot,0.25,0,\"a, b\"\r\n")
    with open(tmp_path / "comparison.csv", newline="") as f:
        assert list(csv.DictReader(f))[1]["note"] == "a, b"
    assert [p.name for p in tmp_path.iterdir()] == ["comparison.csv"]


@pytest.mark.slow  # ~3 s: a fresh interpreter imports torch
def test_importing_minicustom_loads_no_matplotlib_and_drawing_no_pyplot(tmp_path):
    """pyplot picks a GUI backend and keeps global figures: the package must never bring it in."""
    code = (
        "import sys, minicustom, minicustom.plot as plot\n"
        "assert not [m for m in sys.modules if m.startswith('matplotlib')]\n"
        f"plot.write_loss_chart({str(tmp_path)!r}, [{{'step': 1, 'loss': 1.0}}])\n"
        f"plot.write_compare_chart({str(tmp_path)!r} + '/c.png', [dict(method='a', accuracy=1.0, "
        "trainable_params=0, train_seconds=0.0)], 't')\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n")
    env = {**os.environ, "MPLBACKEND": "TkAgg"}  # would be used if pyplot were imported
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                            cwd=Path(__file__).parent.parent)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "c.png").read_bytes()[:8] == PNG_SIGNATURE
