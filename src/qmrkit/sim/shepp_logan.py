"""Shepp–Logan phantoms (2D and 3D) with MR tissue properties.

The geometry is the "modified" Shepp–Logan head (Toft 1996; 3D ellipsoids as in the common
``phantom3d`` extension of Kak & Slaney). Each ellipse is assigned a tissue, so the phantom carries
proton density (PD, fraction), T1 and T2 (ms, 3 T-like values after Gach et al., IEEE TMI 2008),
besides the classic additive intensity image.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import ShapeError

# tissue label -> (name, PD fraction, T1 ms, T2 ms) at 3 T (approximate literature values)
SHEPP_LOGAN_TISSUES = {
    0: ("background", 0.0, 0.0, 0.0),
    1: ("scalp", 0.80, 380.0, 70.0),
    2: ("white_matter", 0.70, 830.0, 80.0),
    3: ("csf", 1.00, 4000.0, 2000.0),
    4: ("gray_matter", 0.80, 1330.0, 110.0),
    5: ("lesion", 0.90, 1100.0, 150.0),
}

# intensity A, semi-axes (a, b, c), centre (x0, y0, z0), angle phi (deg, about z), tissue label
_ELLIPSOIDS = (
    (1.0, 0.6900, 0.920, 0.810, 0.0, 0.0, 0.0, 0.0, 1),
    (-0.8, 0.6624, 0.874, 0.780, 0.0, -0.0184, 0.0, 0.0, 2),
    (-0.2, 0.1100, 0.310, 0.220, 0.22, 0.0, 0.0, -18.0, 3),
    (-0.2, 0.1600, 0.410, 0.280, -0.22, 0.0, 0.0, 18.0, 3),
    (0.1, 0.2100, 0.250, 0.410, 0.0, 0.35, -0.15, 0.0, 4),
    (0.1, 0.0460, 0.046, 0.050, 0.0, 0.1, 0.25, 0.0, 4),
    (0.1, 0.0460, 0.046, 0.050, 0.0, -0.1, 0.25, 0.0, 4),
    (0.1, 0.0460, 0.023, 0.050, -0.08, -0.605, 0.0, 0.0, 5),
    (0.1, 0.0230, 0.023, 0.020, 0.0, -0.606, 0.0, 0.0, 5),
    (0.1, 0.0230, 0.046, 0.020, 0.06, -0.605, 0.0, 0.0, 5),
)


def shepp_logan(shape: Sequence[int] = (128, 128)) -> dict:
    """Modified Shepp–Logan phantom with tissue properties, 2D ``(ny, nx)`` or 3D ``(nz, ny, nx)``.

    Parameters
    ----------
    shape : tuple of int
        Image size, 2 or 3 entries; the last axis is x (left–right), the one before y
        (posterior at the last row, anterior at row 0), then z. The head fills the unit ball
        ``[-1, 1]`` of every axis.

    Returns
    -------
    dict
        ``image`` (float64, the classic additive modified Shepp–Logan intensity, 0..1),
        ``PD`` (fraction), ``T1`` and ``T2`` (ms), ``labels`` (int array) and ``tissues``
        (label -> name).

    Examples
    --------
    >>> ph = shepp_logan((64, 64))
    >>> ph["T1"].max()
    4000.0
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (2, 3) or any(s < 2 for s in shape):
        raise ShapeError(f"shape must have 2 or 3 entries ≥ 2, got {shape}")
    nd = len(shape)
    axes = [(np.arange(n) - n // 2) / (n / 2) for n in shape]
    grids = np.meshgrid(*axes, indexing="ij")
    if nd == 2:
        y, x = -grids[0], grids[1]
        z = np.zeros_like(x)
    else:
        z, y, x = grids[0], -grids[1], grids[2]
    image = np.zeros(shape)
    labels = np.zeros(shape, dtype=np.int64)
    for amp, a, b, c, x0, y0, z0, phi, lab in _ELLIPSOIDS:
        p = np.deg2rad(phi)
        xr = (x - x0) * np.cos(p) + (y - y0) * np.sin(p)
        yr = -(x - x0) * np.sin(p) + (y - y0) * np.cos(p)
        r = (xr / a) ** 2 + (yr / b) ** 2
        if nd == 3:
            r = r + ((z - z0) / c) ** 2
        inside = r <= 1.0
        image[inside] += amp
        labels[inside] = lab
    out: dict = {
        "image": image,
        "labels": labels,
        "tissues": {k: v[0] for k, v in SHEPP_LOGAN_TISSUES.items()},
    }
    for j, key in enumerate(("PD", "T1", "T2"), start=1):
        lut = np.array([SHEPP_LOGAN_TISSUES[k][j] for k in sorted(SHEPP_LOGAN_TISSUES)])
        out[key] = lut[labels]
    return out
