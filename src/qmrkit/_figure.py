"""PNG panels of parameter maps (matplotlib's Agg canvas, no pyplot), and a figure worker process.

The rendering imports numpy and matplotlib only (not torch, not pyplot), so that ``python -m
qmrkit._figure`` — the :class:`FigureWorker` the CLI starts — is ready in a fraction of a second
and renders on the second core while the main process imports torch, fits and writes the maps.
``qmrkit.io.figures.save_map_figure`` is the public name of :func:`save_map_figure`.

Why these choices (``qmrkit fit molli`` at 128² spent ≈ 2 s of its 8 s in the figure): pyplot
pulls in its backend machinery and a global figure manager the CLI does not need; ``tight_layout``
renders the text twice to measure it; a fixed layout computed from the panel grid is the same for
every map and costs nothing; 100 dpi is enough for a quick-look PNG.
"""

from __future__ import annotations

import math
import os
import pickle
import subprocess
import sys
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
        Maps in NIfTI order ``(x, y[, z])``; shown with x to the right and y up.
    units : mapping of str -> str, optional
        Colour-bar label of each map.
    names : sequence of str, optional
        Panels to show, in order (default: every map).
    title : str
        Figure title.
    ranges : mapping of str -> (low, high), optional
        Display range per map (default: fixed ranges for T1/T2/T2*/R2* in ms or 1/s, else the 1st
        to 99th percentile of the finite values).

    Returns
    -------
    Path
        The file written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    imgs = panels(maps, names)
    keys = list(imgs)
    n = max(len(keys), 1)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(_PANEL_W * cols, _PANEL_H * rows))
    FigureCanvasAgg(fig)
    # a fixed layout (no tight_layout: it draws the figure once more to measure the text)
    top = 1 - (0.45 if title else 0.2) / (_PANEL_H * rows)
    fig.subplots_adjust(left=0.02, right=0.93, bottom=0.03, top=top, wspace=0.35, hspace=0.25)
    axes = fig.subplots(rows, cols, squeeze=False)
    units = units or {}
    for ax in axes.flat:
        ax.axis("off")
    for ax, k in zip(axes.flat, keys, strict=False):
        a = imgs[k]
        finite = a[np.isfinite(a)]
        lo, hi = (
            (ranges or {}).get(k)
            or _DEFAULT_RANGES.get(k)
            or (
                (float(np.percentile(finite, 1)), float(np.percentile(finite, 99)))
                if finite.size
                else (0, 1)
            )
        )
        im = ax.imshow(
            a.T,
            origin="lower",
            cmap="magma" if k.startswith("T") else "gray",
            vmin=lo,
            vmax=hi,
            interpolation="nearest",
        )
        ax.set_title(k, fontsize=10)
        cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        cb.set_label(units.get(k, ""), fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=_DPI)
    return p


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

    def submit(self, path: str | Path, maps: Mapping[str, Any], **options: Any) -> None:
        """Send the maps (only the slices shown travel) and the :func:`save_map_figure` options."""
        names = options.pop("names", None)
        self._path = Path(path)
        job = {"path": str(path), "maps": panels(maps, names), **options}
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write(pickle.dumps(job, protocol=pickle.HIGHEST_PROTOCOL))
            self._proc.stdin.close()
        except BrokenPipeError:  # the worker died early; wait() reports its error
            pass

    def wait(self, timeout: float | None = 300) -> Path:
        """Wait for the PNG; raises RuntimeError with the worker's error if it failed."""
        if self._path is None:
            raise RuntimeError("FigureWorker.wait() before submit()")
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
        """End the worker without a figure (safe to call more than once, or after wait)."""
        if self._proc.poll() is None:
            try:
                if self._proc.stdin is not None and not self._proc.stdin.closed:
                    self._proc.stdin.close()  # EOF before a job: the worker exits quietly
                self._proc.wait(timeout=5)
            except (subprocess.TimeoutExpired, OSError):
                self._proc.kill()
                self._proc.wait()
        if self._proc.stderr is not None:
            self._proc.stderr.close()

    def __enter__(self) -> FigureWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()


def _serve_one() -> int:
    """Worker main: import matplotlib, read one pickled job from stdin, render it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401 - import now
    from matplotlib.figure import Figure  # noqa: F401 - import now, render later

    data = sys.stdin.buffer.read()
    if not data:  # cancelled
        return 0
    job = pickle.loads(data)  # from our parent process only (a pipe it opened)
    path, maps = job.pop("path"), job.pop("maps")
    save_map_figure(path, maps, **job)
    return 0


if __name__ == "__main__":
    raise SystemExit(_serve_one())
