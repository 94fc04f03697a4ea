"""PNG figures of parameter maps (matplotlib, headless)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

# display ranges that make relaxometry maps readable at a glance (units as in the maps)
_DEFAULT_RANGES = {
    "T1": (0, 2500),
    "T1star": (0, 2000),
    "T2": (0, 150),
    "T2star": (0, 100),
    "R2star": (0, 100),
    "R2": (0, 100),
}


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _slice2d(a: np.ndarray) -> np.ndarray:
    while a.ndim > 2:  # the middle slice of each extra axis
        a = a[..., a.shape[-1] // 2]
    return a


def save_map_figure(
    path: str | Path,
    maps: Mapping[str, Any],
    *,
    units: Mapping[str, str] | None = None,
    names: Sequence[str] | None = None,
    title: str = "",
    ranges: Mapping[str, tuple[float, float]] | None = None,
) -> Path:
    """Save a panel of maps (middle slice for 3D), each with a colour bar labelled with its unit."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    keys = list(names) if names is not None else list(maps)
    n = len(keys)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.3 * rows), squeeze=False)
    units = units or {}
    for ax in axes.flat:
        ax.axis("off")
    for ax, k in zip(axes.flat, keys, strict=False):
        a = _slice2d(_to_numpy(maps[k]))
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
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p
