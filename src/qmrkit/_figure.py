"""PNG panels of parameter maps (numpy, matplotlib's colormaps, Pillow), and a figure worker.

The rendering imports numpy, ``matplotlib`` (for its colormap tables and its DejaVu Sans font file;
neither pyplot nor the Figure/Agg machinery) and Pillow, not torch, so that ``python -m
qmrkit._figure`` — the :class:`FigureWorker` the CLI starts — is ready in a fraction of a second
and renders on the second core while the main process imports torch, fits and writes the maps.
``qmrkit.io.figures.save_map_figure`` is the public name of :func:`save_map_figure`.

Why these choices (issue 17): a matplotlib Figure with one axes and one colour bar per map took
0.46-0.49 s per render (transform trees, tick layout: ``transforms.set_children`` and axis
creation in the profile) and ``matplotlib.figure`` plus the Agg backend ≈ 0.3 s more to import.
Here each map is coloured with numpy through the colormap's lookup table (the same bins as
``Colormap(Normalize(lo, hi)(value))``), resampled nearest-neighbour into a fixed pixel layout,
the colour bar is a gradient of the same table, and Pillow draws the few labels and writes the
PNG (zlib level 1): ≈ 0.05 s for four 128² maps.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import pickle
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# display ranges that make relaxometry maps readable at a glance (units as in the maps)
_DEFAULT_RANGES = {
    "T1": (0, 2500),
    "T1star": (0, 2000),
    "T2": (0, 150),
    "T2star": (0, 100),
    "R2star": (0, 100),
    "R2": (0, 100),
}

_PANEL_W, _PANEL_H, _DPI = 3.6, 3.3, 100  # inches per panel, dots per inch


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor (torch is not imported here)
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _slice2d(a: np.ndarray) -> np.ndarray:
    while a.ndim > 2:  # the middle slice of each extra axis
        a = a[..., a.shape[-1] // 2]
    return a


def panels(maps: Mapping[str, Any], names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """The 2D images a figure shows (middle slice of 3D maps), float32, in panel order."""
    keys = list(names) if names is not None else list(maps)
    return {k: _slice2d(_to_numpy(maps[k])).astype(np.float32) for k in keys}


def _display_range(
    key: str, a: np.ndarray, ranges: Mapping[str, tuple[float, float]] | None
) -> tuple[float, float]:
    """The colour-bar range of one panel: given, else the fixed relaxometry range, else the 1st
    to 99th percentile of the finite values (0 to 1 when there are none)."""
    given = (ranges or {}).get(key) or _DEFAULT_RANGES.get(key)
    if given:
        return float(given[0]), float(given[1])
    finite = a[np.isfinite(a)]
    if not finite.size:
        return 0.0, 1.0
    return float(np.percentile(finite, 1)), float(np.percentile(finite, 99))


@functools.lru_cache(maxsize=8)
def _lut(name: str) -> tuple[np.ndarray, int]:
    """The colormap as a (N, 4) uint8 lookup table (matplotlib's colour of each of its N bins)."""
    import matplotlib

    cmap = matplotlib.colormaps[name]
    return (cmap(np.arange(cmap.N)) * 255 + 0.5).astype(np.uint8), cmap.N


def _colour(a: np.ndarray, lo: float, hi: float, lut: np.ndarray, n: int) -> np.ndarray:
    """RGBA uint8 of ``a`` under the linear normalisation lo..hi, binned as matplotlib's
    ``Colormap(Normalize(lo, hi)(a))`` (values outside the range take the end colours); NaN is
    transparent so the figure's background shows through."""
    with np.errstate(invalid="ignore", divide="ignore"):
        x = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
        idx = np.clip(np.floor(np.nan_to_num(x, nan=0.0) * n), 0, n - 1).astype(np.intp)
    rgba = lut[idx]
    rgba[~np.isfinite(a)] = 0  # transparent: the background
    return rgba


def _resample_index(n_in: int, n_out: int) -> np.ndarray:
    """Nearest-neighbour source index of each of ``n_out`` output pixels spanning ``n_in``."""
    return np.minimum(((np.arange(n_out) + 0.5) * n_in / n_out).astype(np.intp), n_in - 1)


def _box_size(nx: int, ny: int, w: int, h: int) -> tuple[int, int]:
    """The largest (width, height) in pixels with square voxels that fits a w x h box."""
    scale = min(w / nx, h / ny)
    return max(int(nx * scale), 1), max(int(ny * scale), 1)


# pixel layout of one panel (100 dpi: 360 x 330 px): name above the image, colour bar to its right
_NAME_H, _PAD, _BAR_GAP, _BAR_W, _LABEL_W, _TITLE_H = 22, 8, 8, 12, 70, 30
# zlib level of the PNG: 1 writes a 1440 x 330 panel 3x faster than PIL's default 6 (0.03 vs
# 0.09 s for four noisy 128² maps) for a file 6% larger
_PNG_LEVEL = 1


def render_maps(
    maps: Mapping[str, Any],
    *,
    units: Mapping[str, str] | None = None,
    names: Sequence[str] | None = None,
    title: str = "",
    ranges: Mapping[str, tuple[float, float]] | None = None,
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """The figure as one RGBA image and the text to draw on it (no matplotlib figure yet).

    Returns
    -------
    image : ndarray, shape (height, width, 4), uint8
        Row 0 at the top; a map's x runs to the right and y up; NaN and the margins are
        transparent (white in the PNG).
    layout : list of dict
        One entry per panel: ``name``, ``unit``, ``range`` (low, high), ``box`` (left, top, width,
        height of the map in image pixels), ``bar`` (the same for its colour bar), ``shape``
        (nx, ny of the 2D map shown).
    """
    imgs = panels(maps, names)
    keys = list(imgs)
    units = units or {}
    n = max(len(keys), 1)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    cell_w, cell_h = round(_PANEL_W * _DPI), round(_PANEL_H * _DPI)
    top0 = _TITLE_H if title else 0
    width, height = cell_w * cols, cell_h * rows + top0
    image = np.zeros((height, width, 4), np.uint8)
    layout = []
    luts: dict[str, tuple[np.ndarray, int]] = {}
    for i, k in enumerate(keys):
        a = imgs[k]
        lo, hi = _display_range(k, a, ranges)
        cmap = "magma" if k.startswith("T") else "gray"
        if cmap not in luts:
            luts[cmap] = _lut(cmap)
        lut, n_bins = luts[cmap]
        r, c = divmod(i, cols)
        x0, y0 = c * cell_w, top0 + r * cell_h
        avail_w = cell_w - 2 * _PAD - _BAR_GAP - _BAR_W - _LABEL_W
        avail_h = cell_h - _NAME_H - 2 * _PAD
        nx, ny = a.shape
        w, h = _box_size(nx, ny, avail_w, avail_h)
        left = x0 + _PAD + (avail_w - w) // 2
        top = y0 + _NAME_H + _PAD + (avail_h - h) // 2
        # image row 0 is the top: y up means the last y first; x to the right
        shown = a[_resample_index(nx, w)][:, _resample_index(ny, h)[::-1]].T
        image[top : top + h, left : left + w] = _colour(shown, lo, hi, lut, n_bins)
        bar_left = left + w + _BAR_GAP
        # the colour bar: the centre value of each pixel row, high at the top
        levels = hi - (np.arange(h) + 0.5) / h * (hi - lo)
        image[top : top + h, bar_left : bar_left + _BAR_W] = _colour(
            levels[:, None], lo, hi, lut, n_bins
        )
        layout.append(
            {
                "name": k,
                "unit": units.get(k, ""),
                "range": (lo, hi),
                "box": (left, top, w, h),
                "bar": (bar_left, top, _BAR_W, h),
                "shape": (nx, ny),
            }
        )
    return image, layout


def save_map_figure(
    path: str | Path,
    maps: Mapping[str, Any],
    *,
    units: Mapping[str, str] | None = None,
    names: Sequence[str] | None = None,
    title: str = "",
    ranges: Mapping[str, tuple[float, float]] | None = None,
) -> Path:
    """Save a panel of maps (middle slice for 3D), each with a colour bar labelled with its unit.

    Parameters
    ----------
    path : str or Path
        PNG file to write (parent folders are created).
    maps : mapping of str -> array or Tensor
        Maps in NIfTI order ``(x, y[, z])``; shown with x to the right and y up, square voxels,
        nearest-neighbour, NaN as the white background.
    units : mapping of str -> str, optional
        Colour-bar label of each map.
    names : sequence of str, optional
        Panels to show, in order (default: every map).
    title : str
        Figure title.
    ranges : mapping of str -> (low, high), optional
        Display range per map (default: fixed ranges for T1/T2/T2*/R2* in ms or 1/s, else the 1st
        to 99th percentile of the finite values). The colour bar is labelled with the range.

    Returns
    -------
    Path
        The file written.

    Notes
    -----
    The maps and colour bars are coloured with numpy through matplotlib's colormap tables and
    drawn as one image; matplotlib only adds the text and writes the PNG. Axes, ticks and
    colour-bar objects cost ≈ 0.45 s per figure (transform trees, tick layout), ten times the rest.
    """
    from PIL import Image, ImageDraw

    image, layout = render_maps(maps, units=units, names=names, title=title, ranges=ranges)
    height, width = image.shape[:2]
    rgb = np.full((height, width, 3), 255, np.uint8)  # white background
    for p in layout:  # the maps and colour bars (NaN stays white)
        for left, top, w, h in (p["box"], p["bar"]):
            src = image[top : top + h, left : left + w]
            np.copyto(rgb[top : top + h, left : left + w], src[..., :3], where=src[..., 3:] > 0)
    canvas = Image.fromarray(rgb)
    draw = ImageDraw.Draw(canvas)
    # the text, never over a map or a colour bar; font sizes in points as at 100 dpi
    if title:
        draw.text((width / 2, _TITLE_H * 0.55), title, fill="black", font=_font(11), anchor="mm")
    for p in layout:
        left, top, w, h = p["box"]
        draw.text((left + w / 2, top - 4), p["name"], fill="black", font=_font(10), anchor="md")
        bx, by, bw, bh = p["bar"]
        lo, hi = p["range"]
        lab = bx + bw + 4
        draw.text((lab, by), f"{hi:.4g}", fill="black", font=_font(8), anchor="lt")
        draw.text((lab, by + bh), f"{lo:.4g}", fill="black", font=_font(8), anchor="ls")
        if p["unit"]:  # the unit along the bar, read bottom to top
            font = _font(8)
            x0, y0, x1, y1 = font.getbbox(p["unit"])
            label = Image.new("L", (x1, y1 + 2), 0)
            ImageDraw.Draw(label).text((0, 0), p["unit"], fill=255, font=font)
            label = label.transpose(Image.Transpose.ROTATE_90)
            canvas.paste("black", (lab + 40, by + (bh - label.height) // 2), label)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out, format="png", compress_level=_PNG_LEVEL)
    return out


@functools.lru_cache(maxsize=8)
def _font(points: int) -> Any:
    """DejaVu Sans (matplotlib's default font, shipped with it) at ``points`` for 100 dpi."""
    import matplotlib
    from PIL import ImageFont

    pixels = round(points * _DPI / 72)
    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    try:
        return ImageFont.truetype(str(path), pixels)
    except OSError:  # a matplotlib without its fonts: Pillow's own (sized from Pillow 10.1)
        try:
            return ImageFont.load_default(pixels)
        except TypeError:
            return ImageFont.load_default()


class FigureWorker:
    """A process that imports matplotlib now and renders one :func:`save_map_figure` later.

    Start it before the expensive work (importing torch, fitting); :meth:`submit` the maps when
    they exist and write the NIfTI files meanwhile; :meth:`wait` returns the PNG path. On a
    machine with two or more cores the figure then costs almost no wall time. :meth:`cancel`
    (or leaving a ``with`` block without a submit) ends the process without a figure.

    The worker is ``python -m qmrkit._figure`` with this interpreter, the qmrkit it was started
    from first on ``PYTHONPATH``; it imports neither torch nor pyplot.
    """

    def __init__(self) -> None:
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[1])  # the folder holding qmrkit/
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        env["MPLBACKEND"] = "Agg"
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "qmrkit._figure"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
        )
        self._path: Path | None = None
        self._writer: threading.Thread | None = None

    def submit(self, path: str | Path, maps: Mapping[str, Any], **options: Any) -> None:
        """Send the maps (only the slices shown travel) and the :func:`save_map_figure` options.

        Returns at once: the pickle (≈ 260 kB for four 128² maps) is written by a thread, because
        a pipe holds 64 kB and the worker reads it only once matplotlib is imported."""
        names = options.pop("names", None)
        self._path = Path(path)
        job = {"path": str(path), "maps": panels(maps, names), **options}
        data = pickle.dumps(job, protocol=pickle.HIGHEST_PROTOCOL)
        self._writer = threading.Thread(target=self._send, args=(data,), daemon=True)
        self._writer.start()

    def _send(self, data: bytes) -> None:
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write(data)
            self._proc.stdin.close()
        except (BrokenPipeError, ValueError, OSError):  # the worker died early, or cancel()
            pass  # wait() reports the worker's error

    def wait(self, timeout: float | None = 300) -> Path:
        """Wait for the PNG; raises RuntimeError with the worker's error if it failed."""
        if self._path is None or self._writer is None:
            raise RuntimeError("FigureWorker.wait() before submit()")
        self._writer.join()
        # stdin is closed already (submit), so communicate() cannot be used; stdout is discarded
        err = self._proc.stderr.read() if self._proc.stderr is not None else b""
        self._proc.wait(timeout=timeout)
        if self._proc.returncode != 0:
            text = err.decode(errors="replace").strip().splitlines()
            raise RuntimeError(
                f"the figure worker failed (status {self._proc.returncode}): "
                + (text[-1] if text else "no message")
            )
        return self._path

    def cancel(self) -> None:
        """End the worker without a figure (safe to call more than once, or after wait).

        Without a job the worker is killed at once (it has written nothing; waiting for it to
        finish importing matplotlib would delay an error message by a second). After a
        :meth:`submit` the job already sent is finished (up to 5 s)."""
        if self._proc.poll() is None:
            try:
                if self._writer is None:
                    self._proc.kill()
                else:
                    self._writer.join(timeout=5)
                self._proc.wait(timeout=5)
            except (subprocess.TimeoutExpired, OSError):
                self._proc.kill()
                self._proc.wait()
        if self._proc.stdin is not None and not self._proc.stdin.closed and self._writer is None:
            with contextlib.suppress(OSError):
                self._proc.stdin.close()
        if self._writer is not None:
            self._writer.join()  # ends once the worker has read the job or died
        if self._proc.stderr is not None:
            self._proc.stderr.close()

    def __enter__(self) -> FigureWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()


def _warm_up() -> None:
    """Load what the first figure would load on the way (the font files, the colormap tables),
    while the parent process is still importing torch and fitting."""
    for points in (8, 10, 11):
        _font(points).getbbox("T1 ms 0.1")
    for name in ("magma", "gray"):
        _lut(name)


def _serve_one() -> int:
    """Worker main: import matplotlib's colormaps and Pillow, read one pickled job from stdin,
    render it."""
    from PIL import Image, ImageDraw  # noqa: F401 - import now, render later

    _warm_up()
    data = sys.stdin.buffer.read()
    if not data:  # cancelled
        return 0
    job = pickle.loads(data)  # from our parent process only (a pipe it opened)
    path, maps = job.pop("path"), job.pop("maps")
    save_map_figure(path, maps, **job)
    return 0


if __name__ == "__main__":
    _status = _serve_one()  # an exception takes the normal way out: traceback, status 1
    sys.stderr.flush()
    # the parent waits for this process to end: skip the interpreter's teardown of matplotlib
    os._exit(_status)
