"""``save_map_figure``: the PNG shows each map's values through its colormap, x right and y up,
NaN as background, with the colour bar spanning the display range."""

from __future__ import annotations

import numpy as np
import pytest

from qmrkit._figure import render_maps
from qmrkit.io.figures import save_map_figure

matplotlib = pytest.importorskip("matplotlib")
from matplotlib.colors import Normalize  # noqa: E402
from matplotlib.image import imread  # noqa: E402


def _maps():
    x, y = np.meshgrid(np.arange(40), np.arange(30), indexing="ij")  # (x, y) = (40, 30)
    t1 = 200.0 + 50.0 * x + 7.0 * y  # ms, inside T1's fixed range 0..2500
    t1[:5, :5] = np.nan  # a corner of background
    a = np.sin(x / 5.0) + np.cos(y / 3.0)  # no fixed range: the 1st..99th percentile
    return {"T1": t1, "A": a}


def _reference(value: float, lo: float, hi: float, cmap: str) -> np.ndarray:
    """matplotlib's own colour for the value (8-bit RGB)."""
    rgba = matplotlib.colormaps[cmap](Normalize(lo, hi)(value))
    return np.round(np.asarray(rgba[:3]) * 255).astype(int)


def test_pixels_show_the_colormap_of_the_map_values(tmp_path):
    maps = _maps()
    units = {"T1": "ms", "A": "a.u."}
    path = save_map_figure(tmp_path / "m.png", maps, units=units, title="test")
    png = np.round(imread(path)[..., :3] * 255).astype(int)  # row 0 at the top
    _, layout = render_maps(maps, units=units, title="test")
    assert [p["name"] for p in layout] == ["T1", "A"]
    a_finite = maps["A"][np.isfinite(maps["A"])]
    expected_ranges = {
        "T1": (0.0, 2500.0),
        "A": (np.percentile(a_finite, 1), np.percentile(a_finite, 99)),
    }
    for p, cmap in zip(layout, ("magma", "gray"), strict=True):
        lo, hi = expected_ranges[p["name"]]
        assert p["range"] == pytest.approx((lo, hi))
        left, top, w, h = p["box"]
        nx, ny = p["shape"]
        assert w / nx == pytest.approx(h / ny, rel=0.05)  # square voxels
        m = maps[p["name"]]
        # sample pixels at voxel centres across the panel: x grows to the right, y upwards
        for i, j in [(20, 15), (39, 0), (6, 29), (10, 3), (35, 22)]:
            col = left + int((i + 0.5) * w / nx)
            row = top + h - 1 - int((j + 0.5) * h / ny)
            np.testing.assert_array_equal(png[row, col], _reference(m[i, j], lo, hi, cmap))
        # the colour bar: the high end at the top, the low end at the bottom
        bx, by, bw, bh = p["bar"]
        np.testing.assert_array_equal(png[by, bx + bw // 2], _reference(hi, lo, hi, cmap))
        np.testing.assert_array_equal(png[by + bh - 1, bx + bw // 2], _reference(lo, lo, hi, cmap))
    # NaN voxels are background (white)
    left, top, w, h = layout[0]["box"]
    nx, ny = layout[0]["shape"]
    row, col = top + h - 1 - int(2.5 * h / ny), left + int(2.5 * w / nx)
    np.testing.assert_array_equal(png[row, col], [255, 255, 255])


def test_middle_slice_names_and_size(tmp_path):
    vol = np.stack([np.full((8, 6), float(k)) for k in range(5)], axis=-1)  # (8, 6, 5)
    path = save_map_figure(
        tmp_path / "v.png", {"M": vol, "X": vol}, names=["M"], ranges={"M": (0, 4)}
    )
    png = np.round(imread(path)[..., :3] * 255).astype(int)
    _, layout = render_maps({"M": vol}, ranges={"M": (0, 4)})
    assert len(layout) == 1 and layout[0]["shape"] == (8, 6)
    left, top, w, h = layout[0]["box"]
    # the middle slice (index 2) everywhere: gray at 2/4 of the range
    np.testing.assert_array_equal(png[top + h // 2, left + w // 2], _reference(2.0, 0, 4, "gray"))
    assert png.shape == (330, 360, 3)  # one 3.6 x 3.3 inch panel at 100 dpi, no title band
