"""Numerical phantoms with tissue properties (T1, T2 in ms; PD as a fraction).

Every phantom returns a dict of maps (NumPy float arrays in the requested shape) plus ``labels``
(integer map) and ``tissues`` (label -> name), so tests, demos and benchmarks share known truth.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import ParameterError, ShapeError

# --- ISMRM/NIST system phantom, 3 T, 20 °C (ms); Stupic et al. MRM 2021 -------------------------
NIST_T1_PLATE_T1 = {
    1: (
        1989.0,
        1454.0,
        984.1,
        706.0,
        496.7,
        351.5,
        247.13,
        175.3,
        125.9,
        89.0,
        62.7,
        44.53,
        30.84,
        21.719,
    ),
    2: (
        1883.97,
        1330.16,
        987.27,
        690.08,
        484.97,
        341.58,
        240.86,
        174.95,
        121.08,
        85.75,
        60.21,
        42.89,
        30.40,
        21.44,
    ),
}
NIST_T1_PLATE_T2 = (
    1465.0,
    1076.0,
    717.9,
    510.1,
    359.6,
    255.5,
    180.8,
    127.3,
    90.3,
    64.3,
    45.7,
    31.86,
    22.38,
    15.83,
)
NIST_T2_PLATE_T1 = (
    2480.0,
    2173.0,
    1907.0,
    1604.0,
    1332.0,
    1044.0,
    801.7,
    608.6,
    458.4,
    336.5,
    244.2,
    176.6,
    126.9,
    90.9,
)
NIST_T2_PLATE_T2 = (
    581.3,
    403.5,
    278.1,
    190.94,
    133.27,
    96.89,
    64.07,
    46.42,
    31.97,
    22.56,
    15.813,
    11.237,
    7.911,
    5.592,
)

# --- cardiac tissues at 3 T (typical native MOLLI-range values, ms) -------------------------------
CARDIAC_TISSUES = {
    # name: (T1, T2, PD)
    "blood": (1950.0, 250.0, 0.95),
    "myocardium": (1200.0, 45.0, 0.80),
    "infarct": (1450.0, 60.0, 0.85),
    "liver": (810.0, 35.0, 0.75),
    "spleen": (1330.0, 60.0, 0.80),
    "fat": (380.0, 80.0, 0.90),
    "muscle": (1400.0, 32.0, 0.70),
}


def _grid(shape: Sequence[int]) -> list[np.ndarray]:
    """Normalised coordinates in [-1, 1] along each axis (pixel centres)."""
    axes = [((np.arange(n) + 0.5) / n) * 2 - 1 for n in shape]
    return list(np.meshgrid(*axes, indexing="ij"))


def _check_shape(shape: Sequence[int], ndims: tuple[int, ...] = (2, 3)) -> tuple[int, ...]:
    shp = tuple(int(s) for s in shape)
    if len(shp) not in ndims or any(s < 8 for s in shp[:2]) or any(s < 1 for s in shp[2:]):
        raise ShapeError(
            f"phantom shape must have {ndims} axes, the first two of at least 8 voxels, got {shape}"
        )
    return shp


def _maps_from_labels(
    labels: np.ndarray, props: dict[int, tuple[float, float, float]]
) -> dict[str, np.ndarray]:
    t1 = np.zeros(labels.shape)
    t2 = np.zeros(labels.shape)
    pd = np.zeros(labels.shape)
    for lab, (a, b, c) in props.items():
        sel = labels == lab
        t1[sel], t2[sel], pd[sel] = a, b, c
    return {"T1": t1, "T2": t2, "PD": pd}


def cardiac_phantom(shape: Sequence[int] = (128, 128)) -> dict[str, np.ndarray | dict]:
    """A short-axis-like cardiac phantom: body (muscle, fat rim), liver, spleen, a myocardial ring
    around a blood pool with an infarct segment. 3D shapes extrude the slice along the last axis.

    Returns
    -------
    dict
        ``labels`` (int map), ``T1``, ``T2`` (ms), ``PD`` (0–1) maps, and ``tissues``
        (label -> name).
    """
    shp = _check_shape(shape)
    y, x = _grid(shp[:2])
    names = ["background", *CARDIAC_TISSUES]
    lab = {n: i for i, n in enumerate(names)}
    labels = np.zeros(shp[:2], dtype=np.int16)
    body = (x / 0.92) ** 2 + (y / 0.78) ** 2 <= 1
    labels[body] = lab["fat"]
    labels[(x / 0.86) ** 2 + (y / 0.72) ** 2 <= 1] = lab["muscle"]
    labels[((x + 0.35) / 0.42) ** 2 + ((y - 0.35) / 0.3) ** 2 <= 1] = lab["liver"]
    labels[((x - 0.5) / 0.22) ** 2 + ((y - 0.38) / 0.16) ** 2 <= 1] = lab["spleen"]
    r = np.hypot(x - 0.1, y + 0.15)
    ring = (r <= 0.36) & (r > 0.24)
    labels[r <= 0.36] = lab["myocardium"]
    labels[r <= 0.24] = lab["blood"]
    ang = np.arctan2(y + 0.15, x - 0.1)
    labels[ring & (ang > 0.4) & (ang < 1.3)] = lab["infarct"]
    if len(shp) == 3:
        labels = np.repeat(labels[..., None], shp[2], axis=2)
    props = {lab[n]: v for n, v in CARDIAC_TISSUES.items()}
    out: dict[str, np.ndarray | dict] = dict(_maps_from_labels(labels, props))
    out["labels"] = labels
    out["tissues"] = {i: n for i, n in enumerate(names)}
    return out


def nist_phantom(
    shape: Sequence[int] = (128, 128), *, plate: str = "T1", version: int = 1
) -> dict[str, np.ndarray | dict]:
    """The ISMRM/NIST system phantom's T1 or T2 plate at 3 T, 20 °C (Stupic et al. 2021).

    14 spheres (10 on an outer ring, 4 inside) of radius ≈ 8/200 of the field of view, with the
    reference T1/T2 of each sphere; background is empty (PD 0). 3D shapes give spheres.

    Parameters
    ----------
    shape : tuple
        2D ``(ny, nx)`` or 3D ``(ny, nx, nz)`` matrix size (NIfTI order; isotropic voxels, the
        spheres centred in the slab).
    plate : {"T1", "T2"}
        Which plate (its spheres span T1 21–1989 ms or T2 5.6–581 ms).
    version : {1, 2}
        T1-plate reference version (v2 values from the phantom's later batch).
    """
    shp = _check_shape(shape)
    if plate not in ("T1", "T2"):
        raise ParameterError(f"plate must be 'T1' or 'T2', got {plate!r}")
    if version not in (1, 2):
        raise ParameterError(f"version must be 1 or 2, got {version}")
    if plate == "T1":
        t1s, t2s = NIST_T1_PLATE_T1[version], NIST_T1_PLATE_T2
    else:
        t1s, t2s = NIST_T2_PLATE_T1, NIST_T2_PLATE_T2
    coords = _grid(shp)
    labels = np.zeros(shp, dtype=np.int16)
    radius = 0.1  # sphere radius in normalised units (phantom ≈ 200 mm, spheres ≈ 10 mm)
    centres = []
    for i in range(10):  # outer ring, clockwise from the top
        a = np.pi / 2 - 2 * np.pi * i / 10
        centres.append((0.62 * np.sin(a), 0.62 * np.cos(a)))
    for i in range(4):
        a = np.pi / 4 - 2 * np.pi * i / 4
        centres.append((0.28 * np.sin(a), 0.28 * np.cos(a)))
    for k, (cy, cx) in enumerate(centres, start=1):
        d2 = (coords[0] - cy) ** 2 + (coords[1] - cx) ** 2
        if len(shp) == 3:
            # isotropic voxels: z in the same units as the in-plane axes, centred in the slab
            z = (np.arange(shp[2]) + 0.5 - shp[2] / 2) / (max(shp[0], shp[1]) / 2)
            d2 = d2 + z[None, None, :] ** 2
        labels[d2 <= radius**2] = k
    props = {k: (t1s[k - 1], t2s[k - 1], 1.0) for k in range(1, 15)}
    out: dict[str, np.ndarray | dict] = dict(_maps_from_labels(labels, props))
    out["labels"] = labels
    out["tissues"] = {0: "background", **{k: f"sphere {k}" for k in range(1, 15)}}
    return out
