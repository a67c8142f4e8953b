"""The hand-written PNG loss chart: read back with a small independent decoder (zlib only)."""

import math
import os
import struct
import zlib

import numpy as np
import pytest

from minicustom import plot
from minicustom.plot import COLORS, write_loss_png

TRAIN = [(s, 3.0 * math.exp(-s / 40) + 1.0) for s in range(0, 200, 2)]
EVAL = [(s, 3.0 * math.exp(-s / 40) + 1.2) for s in (0, 50, 100, 150, 199)]


def decode_png(data: bytes) -> np.ndarray:
    """Pixels of an 8-bit RGB, non-interlaced PNG whose scanlines all use filter 0; checks every CRC."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "bad signature"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        tag, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(tag + body), f"bad CRC in {tag!r}"
        chunks.append((tag, body))
        pos += 12 + length
    assert pos == len(data)
    assert chunks[0][0] == b"IHDR" and chunks[-1] == (b"IEND", b"")
    w, h, depth, colour, compression, filt, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, colour, compression, filt, interlace) == (8, 2, 0, 0, 0)
    raw = zlib.decompress(b"".join(body for tag, body in chunks if tag == b"IDAT"))
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(h, 1 + 3 * w)
    assert (rows[:, 0] == 0).all(), "only filter type 0 is expected"
    return rows[:, 1:].reshape(h, w, 3)


def read(path) -> np.ndarray:
    return decode_png(path.read_bytes())


def mask(img, colour):
    return (img == np.array(colour, dtype=np.uint8)).all(axis=-1)


def test_png_decodes_with_requested_size_and_series_colours(tmp_path):
    path = tmp_path / "loss.png"
    write_loss_png(path, {"train": TRAIN, "eval": EVAL}, title="loss (run 1)", width=500, height=320)
    img = read(path)
    assert img.shape == (320, 500, 3)
    assert (img[0, 0] == 255).all() and (img[-1, -1] == 255).all()  # white background
    assert mask(img, COLORS["train"]).sum() > 200 and mask(img, COLORS["eval"]).sum() > 100
    assert not mask(img, plot.PALETTE[0]).any()  # no third series, no third colour
    assert (mask(img, (0, 0, 0)).sum(axis=1) > 0).sum() > 100  # axes box and text are drawn in black
    assert [p.name for p in tmp_path.iterdir()] == ["loss.png"]  # no temporary file left behind


def test_curve_falls_left_to_right_and_eval_points_are_squares(tmp_path):
    path = tmp_path / "loss.png"
    write_loss_png(path, {"train": TRAIN, "eval": EVAL})
    img = read(path)
    ys, xs = np.nonzero(mask(img, COLORS["train"]))
    left, right = ys[xs < xs.min() + 20].mean(), ys[xs > xs.max() - 20].mean()
    assert left < right  # a falling loss is drawn from the top left down to the right (rows grow downward)
    e = mask(img, COLORS["eval"]).astype(int)
    blocks = sum(e[dy:dy + e.shape[0] - 4, dx:dx + e.shape[1] - 4] for dy in range(5) for dx in range(5))
    assert (blocks == 25).sum() >= len(EVAL)  # a filled 5x5 square per eval point (2-pixel lines have none)


def test_default_size_and_other_series_get_palette_colours(tmp_path):
    path = tmp_path / "loss.png"
    write_loss_png(path, {"train": TRAIN, "lr": [(s, 2.0) for s in range(0, 200, 10)]})
    img = read(path)
    assert img.shape == (400, 640, 3)
    assert mask(img, plot.PALETTE[0]).sum() > 100


@pytest.mark.parametrize("series", [
    {},
    {"train": [], "eval": []},
    {"train": [(5, 2.5)]},
    {"train": [(5, 2.5)], "eval": [(5, 2.7)]},
    {"train": [(0, 3.0), (1, float("nan")), (2, float("inf")), (3, 2.0), (float("nan"), 1.0)], "eval": []},
    {"train": [(0, float("nan")), (1, float("-inf"))]},
    {"train": [(1, 2.0), (2, 2.0), (3, 2.0)]},  # flat: a zero-height data range
    {"train": [(s, 1e-5 * (1 + s)) for s in range(5)], "eval": [(0, 1e7)]},
])
def test_degenerate_series_draw_without_error(tmp_path, series):
    path = tmp_path / "loss.png"
    write_loss_png(path, series, width=300, height=200)
    img = read(path)
    assert img.shape == (200, 300, 3)
    finite = [p for p in series.get("train", []) if all(map(math.isfinite, p))]
    assert mask(img, COLORS["train"]).any() == bool(finite)  # the legend lists only series with points


def test_one_point_is_drawn_as_a_cross(tmp_path):
    path = tmp_path / "loss.png"
    write_loss_png(path, {"train": [(10, 1.5)]})
    m = mask(read(path), COLORS["train"])
    m[:, 520:] = False  # leave out the legend's sample line in the top-right corner
    ys, xs = np.nonzero(m)
    assert 8 <= xs.max() - xs.min() <= 12 and 8 <= ys.max() - ys.min() <= 12


@pytest.mark.parametrize("kwargs, message", [
    (dict(width=50), "width must be an integer of at least 200 pixels, got 50"),
    (dict(height=10), "height must be an integer of at least 150 pixels, got 10"),
    (dict(width=640.0), "width must be an integer"),
])
def test_bad_size_raises_and_writes_nothing(tmp_path, kwargs, message):
    path = tmp_path / "loss.png"
    with pytest.raises(ValueError, match=message):
        write_loss_png(path, {"train": TRAIN}, **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_bad_point_raises_and_keeps_the_previous_file(tmp_path):
    path = tmp_path / "loss.png"
    write_loss_png(path, {"train": TRAIN})
    before = path.read_bytes()
    for bad in ([(1, 2.0), ("x", 1.0)], [(1, 2.0, 3.0)], [None]):
        with pytest.raises(ValueError, match="series 'eval': point"):
            write_loss_png(path, {"train": TRAIN, "eval": bad})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["loss.png"]


def test_failed_rename_removes_the_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "loss.png"

    def broken_replace(src, dst):
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", broken_replace)  # the atomic write renames with os.replace
    with pytest.raises(OSError, match="disk on fire"):
        write_loss_png(path, {"train": TRAIN})
    assert list(tmp_path.iterdir()) == []


def test_font_covers_the_needed_characters():
    needed = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ .-+e/_:()%"
    assert set(needed) <= set(plot._FONT)
    assert all(len(g) == 7 and max(g) < 32 for g in plot._FONT.values())
    glyphs = [g for ch, g in plot._FONT.items() if ch != " "]
    assert len(set(glyphs)) == len(glyphs) and bytes(7) not in glyphs  # all distinct, none blank


@pytest.mark.parametrize("lo, hi", [(0, 1200), (0.85, 3.7), (2.375, 2.625), (1.00001, 1.00005), (2e-5, 9e-5),
                                    (-1, 1), (0, 3e7), (5, 6)])
def test_tick_labels_are_round_and_distinct(lo, hi):
    ticks, step = plot._ticks(lo, hi, 6)
    labels = [plot._fmt(t, step) for t in ticks]
    assert len(ticks) >= 2 and all(lo - 1e-12 <= t <= hi + 1e-12 for t in ticks)
    assert len(set(labels)) == len(labels)
    assert all(abs(float(s) - t) <= 1e-9 * max(1.0, abs(t)) for s, t in zip(labels, ticks))
    assert all(len(s) <= 8 for s in labels)


def test_scatter_names_each_point_in_its_colour_and_has_no_legend():
    """scatter=True: one cross per point and the series' name beside it in the same colour (a longer name
    paints more pixels), no legend box, and margins on x so that the rightmost cross is inside the axes."""
    def colour_pixels(name):
        img = plot.render({name: [(8.0, 0.5)], "other": [(0.0, 0.9)]}, "acc", 400, 300, xlabel="x", scatter=True)
        return int(mask(img, plot.PALETTE[0]).sum()), img

    short, img = colour_pixels("a")
    long, _ = colour_pixels("aaaaaaaa")
    assert long > short > 0
    ys, xs = np.nonzero(mask(img, plot.PALETTE[0]))
    right_border = max(np.nonzero((img == 0).all(axis=2))[1])  # the black axes box
    assert xs.max() < right_border
    legend = plot.render({"a": [(0, 0), (1, 1)]}, "acc", 400, 300)
    assert not np.array_equal(legend, plot.render({"a": [(0, 0), (1, 1)]}, "acc", 400, 300, scatter=True))
