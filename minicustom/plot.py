"""Loss curves (and the comparison harness's labelled scatter plots) as PNG files, drawn by hand: numpy
for the pixels, zlib and struct for the file.

This replaces matplotlib for the one chart the trainer writes (out/loss.png): a white canvas, an axes
box with light grid lines, ticks with numeric labels (steps on x, loss on y), one 2-pixel polyline per
series (train blue, eval orange with a small square on every point, other labels from a short palette),
a legend and a title, in a built-in 5x7 bitmap font. Non-finite points are skipped; a series with one
point is drawn as a cross. With scatter=True every point is a cross named by a label beside it, with
no legend (minicustom compare). The file is written to a temporary name beside the target and renamed.

Deliberately left out: anti-aliasing, log scales (compare plots log10 values instead), rotated text
(the y axis is named by the title), fonts beyond the 5x7 glyphs below (other characters print as a
box), and every other kind of chart.
"""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path

import numpy as np

from .files import atomic_write

# Each glyph is 7 rows of 5 bits, top row first, most significant bit on the left, written in hex.
_GLYPHS = """
0 0e11131519110e 1 040c040404040e 2 0e11010204081f 3 1f02040201110e 4 02060a121f0202 5 1f101e0101110e
6 0608101e11110e 7 1f010204080808 8 0e11110e11110e 9 0e11110f01020c . 00000000000c0c - 0000001f000000
+ 0004041f040400 / 00010204081000 _ 0000000000001f : 000c0c000c0c00 ( 02040808080402 ) 08040202020408
% 18190204081303 A 0e1111111f1111 B 1e11111e11111e C 0e11101010110e D 1c12111111121c E 1f10101e10101f
F 1f10101e101010 G 0e11101711110f H 1111111f111111 I 0e04040404040e J 0702020202120c K 11121418141211
L 1010101010101f M 111b1515111111 N 11111915131111 O 0e11111111110e P 1e11111e101010 Q 0e11111115120d
R 1e11111e141211 S 0f10100e01011e T 1f040404040404 U 1111111111110e V 11111111110a04 W 1111111515150a
X 11110a040a1111 Y 1111110a040404 Z 1f01020408101f a 00000e010f110f b 1010161911111e c 00000e1010110e
d 01010d1311110f e 00000e111f100e f 0609081c080808 g 000f11110f010e h 10101619111111 i 04000c0404040e
j 0200060202120c k 10101214181412 l 0c04040404040e m 00001a15151111 n 00001619111111 o 00000e1111110e
p 00001e111e1010 q 00000d130f0101 r 00001619101010 s 00000e100e011e t 08081c08080906 u 0000111111130d
v 00001111110a04 w 0000111115150a x 0000110a040a11 y 000011110f010e z 00001f0204081f
"""
_T = _GLYPHS.split()
_FONT = {ch: bytes.fromhex(h) for ch, h in zip(_T[0::2], _T[1::2])} | {" ": bytes(7)}
_BOX = bytes.fromhex("1f11111111111f")

WHITE, BLACK, GRID = (255, 255, 255), (0, 0, 0), (225, 225, 225)
COLORS = {"train": (31, 119, 180), "eval": (255, 127, 14)}
PALETTE = [(44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75), (227, 119, 194), (127, 127, 127)]
MIN_WIDTH, MIN_HEIGHT = 200, 150


def _put(img, xs, ys, color):
    """Set the pixels (xs, ys) that fall on the canvas."""
    xs, ys = np.asarray(xs, dtype=np.int64), np.asarray(ys, dtype=np.int64)
    keep = (xs >= 0) & (xs < img.shape[1]) & (ys >= 0) & (ys < img.shape[0])
    img[ys[keep], xs[keep]] = color


def _text(img, x, y, s, color, scale=1):
    """Draw s with its top-left corner at (x, y); each character advances 6 * scale pixels."""
    for i, ch in enumerate(s):
        rows = _FONT.get(ch, _BOX)
        bits = np.array([[(r >> (4 - c)) & 1 for c in range(5)] for r in rows], dtype=bool)
        ys, xs = np.nonzero(bits.repeat(scale, 0).repeat(scale, 1))
        _put(img, xs + x + 6 * scale * i, ys + y, color)


def _text_width(s, scale=1):
    return max(len(s) * 6 - 1, 0) * scale


def _line(img, pts, color):
    """A 2-pixel polyline through the (x, y) pixel points, sampled one pixel per step along its longer axis."""
    p = np.asarray(pts, dtype=np.float64).reshape(-1, 2)
    if len(p) < 2:
        return
    a, d = p[:-1], np.diff(p, axis=0)
    n = np.abs(d).max(axis=1).astype(np.int64) + 1  # samples per segment, all segments at once
    seg = np.repeat(np.arange(len(d)), n)
    t = (np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)) / np.maximum(n - 1, 1)[seg]
    xs, ys = np.rint(a[seg, 0] + t * d[seg, 0]), np.rint(a[seg, 1] + t * d[seg, 1])
    for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):
        _put(img, xs + dx, ys + dy, color)


def _square(img, x, y, color, r=2):
    xs, ys = np.meshgrid(np.arange(-r, r + 1), np.arange(-r, r + 1))
    _put(img, xs.ravel() + round(x), ys.ravel() + round(y), color)


def _cross(img, x, y, color, r=4):
    d = np.arange(-r, r + 1)
    x, y = round(x), round(y)
    for o in (0, 1):
        _put(img, x + d, np.full_like(d, y + o), color)
        _put(img, np.full_like(d, x + o), y + d, color)


def _ticks(lo, hi, n=5, min_step=0.0):
    """About n round tick values (1, 2 or 5 times a power of ten apart, at least two) in [lo, hi], and
    their spacing."""
    mag = 10.0 ** math.floor(math.log10((hi - lo) / n))
    ticks = {st: range(math.ceil(lo / st - 1e-9), math.floor(hi / st + 1e-9) + 1)
             for st in (mag, 2 * mag, 5 * mag, 10 * mag, 1.0, 2.0) if st >= min_step}
    step = min(ticks, key=lambda st: (len(ticks[st]) < 2, abs(len(ticks[st]) - n), -st))
    return [k * step for k in ticks[step]], step


def _fmt(v, step):
    """A tick label with just enough digits to tell neighbouring ticks apart (at least 3 significant)."""
    if abs(v) < step * 1e-6:
        return "0"
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    if abs(v) < 1e6 and decimals <= 4:
        return f"{v:.{decimals}f}"
    digits = math.floor(math.log10(abs(v)) + 1e-9) - math.floor(math.log10(step) + 1e-9) + 1
    return f"{v:.{max(3, digits)}g}"


def _span(values, pad):
    """The (lo, hi) data range padded by pad of its width; a single value gets a range around it."""
    if not values:
        return 0.0, 1.0
    lo, hi = min(values), max(values)
    if hi - lo <= 1e-12 * max(1.0, abs(lo)):
        d = max(abs(lo) * 0.1, 1.0) if pad == 0 else max(abs(lo) * 0.05, 1e-3)
        return lo - d, hi + d
    return lo - (hi - lo) * pad, hi + (hi - lo) * pad


def _clean(label, points):
    """The finite (step, value) pairs of one series, sorted by step."""
    out = []
    for i, p in enumerate(points):
        try:
            s, v = (float(a) for a in p)
        except (TypeError, ValueError):
            raise ValueError(f"series {label!r}: point {i} is not a (step, value) pair of numbers: {p!r}") from None
        if math.isfinite(s) and math.isfinite(v):
            out.append((s, v))
    return sorted(out, key=lambda sv: sv[0])


def render(series: dict[str, list[tuple[float, float]]], title: str = "loss", width: int = 640,
           height: int = 400, xlabel: str = "step", scatter: bool = False) -> np.ndarray:
    """The chart as a (height, width, 3) uint8 array. scatter=True: every series is a point or points
    named by a label beside it instead of a legend, and the x axis gets margins like the y axis."""
    for name, v, least in (("width", width, MIN_WIDTH), ("height", height, MIN_HEIGHT)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < least:
            raise ValueError(f"{name} must be an integer of at least {least} pixels, got {v!r}")
    width, height = int(width), int(height)
    data = {str(label): _clean(label, pts) for label, pts in series.items()}
    xs = [s for pts in data.values() for s, _ in pts]
    ys = [v for pts in data.values() for _, v in pts]
    (xlo, xhi), (ylo, yhi) = _span(xs, 0.05 if scatter else 0.0), _span(ys, 0.05)
    whole = all(s == round(s) for s in xs)  # integer steps get integer ticks
    xt, xstep = _ticks(xlo, xhi, max(2, min(7, (width - 80) // 80)), 1.0 if whole else 0.0)  # one per 80 px
    yt, ystep = _ticks(ylo, yhi, max(2, min(6, (height - 70) // 45)))
    ylabels = [_fmt(v, ystep) for v in yt]

    img = np.full((height, width, 3), 255, dtype=np.uint8)
    left, right = max(map(_text_width, ylabels)) + 14, width - 14 - _text_width(_fmt(xt[-1], xstep)) // 2
    top, bottom = 34, height - 36
    px = lambda s: left + (s - xlo) / (xhi - xlo) * (right - left)  # noqa: E731
    py = lambda v: bottom - (v - ylo) / (yhi - ylo) * (bottom - top)  # noqa: E731

    for t, label in zip(yt, ylabels):
        y = round(py(t))
        _put(img, np.arange(left + 1, right), np.full(right - left - 1, y), GRID)
        _put(img, np.arange(left - 4, left), np.full(4, y), BLACK)
        _text(img, left - 7 - _text_width(label), y - 3, label, BLACK)
    for t in xt:
        x, label = round(px(t)), _fmt(t, xstep)
        _put(img, np.full(bottom - top - 1, x), np.arange(top + 1, bottom), GRID)
        _put(img, np.full(4, x), np.arange(bottom + 1, bottom + 5), BLACK)
        _text(img, x - _text_width(label) // 2, bottom + 8, label, BLACK)
    _text(img, (left + right - _text_width(xlabel)) // 2, bottom + 22, xlabel, BLACK)
    _text(img, (width - _text_width(title, 2)) // 2, 10, title, BLACK, scale=2)
    _line(img, [(left, top), (right, top), (right, bottom), (left, bottom), (left, top)], BLACK)

    others = iter(PALETTE * (len(data) // len(PALETTE) + 1))
    colors = {label: COLORS.get(label) or next(others) for label in data}
    for label, pts in data.items():
        pix = [(px(s), py(v)) for s, v in pts]
        _line(img, pix, colors[label])
        if len(pix) == 1 or scatter:
            for x, y in pix:
                _cross(img, x, y, colors[label])
        if scatter and pix:  # the name beside the last point, on the side with room
            x, y = pix[-1]
            tx = x + 7 if x + 7 + _text_width(label) < right - 2 else x - 7 - _text_width(label)
            _text(img, round(tx), round(y) - 3, label, colors[label])
        if label == "eval":
            for x, y in pix:
                _square(img, x + 0.5, y + 0.5, colors[label])

    shown = [label for label, pts in data.items() if pts]
    if shown and not scatter:  # legend in the top-right corner of the plot, on white so that curves do not cross the text
        w, h = max(_text_width(label) for label in shown) + 34, 12 * len(shown) + 6
        x0, y0 = max(right - w - 8, left + 4), top + 8
        img[y0:y0 + h, x0:x0 + w] = WHITE
        _line(img, [(x0, y0), (x0 + w, y0), (x0 + w, y0 + h), (x0, y0 + h), (x0, y0)], GRID)
        for i, label in enumerate(shown):
            y = y0 + 6 + 12 * i
            _line(img, [(x0 + 6, y + 3), (x0 + 22, y + 3)], colors[label])
            if label == "eval":
                _square(img, x0 + 14.5, y + 3.5, colors[label])
            _text(img, x0 + 28, y, label, BLACK)
    return img


def encode_png(img: np.ndarray) -> bytes:
    """An 8-bit RGB PNG: signature, IHDR, one IDAT of zlib-compressed filter-0 scanlines, IEND."""
    h, w, _ = img.shape
    raw = np.zeros((h, 1 + 3 * w), dtype=np.uint8)  # each scanline starts with its filter byte, 0 = none
    raw[:, 1:] = img.reshape(h, 3 * w)

    def chunk(tag, body):
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8 bits, truecolour, deflate, no filter, no interlace
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw.tobytes(), 9))
            + chunk(b"IEND", b""))


def write_loss_png(path, series: dict[str, list[tuple[float, float]]], title: str = "loss", width: int = 640,
                   height: int = 400) -> None:
    """Draw the series (label -> [(step, value), ...]) and write them to path as a PNG, atomically."""
    write_png(path, render(series, title, width, height))  # any bad input fails in render, before a file exists


def write_png(path, img: np.ndarray) -> None:
    """Write an image (H, W, 3) uint8 to path as a PNG, atomically."""
    png = encode_png(img)
    atomic_write(Path(path), lambda tmp: tmp.write_bytes(png))  # the user's umask, stale temps removed
