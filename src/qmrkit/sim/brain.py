"""A brain-like phantom (2D/3D) with scalp, skull, CSF, folded grey-matter ribbon, white matter and
ventricles, each with MR tissue properties — smoother geometry than real anatomy but with the
features reconstruction cares about: thin bright/dark layers, a convoluted cortex, fine detail."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import ShapeError

# label -> (name, PD fraction, T1 ms, T2 ms), approximate 3 T values
BRAIN_TISSUES = {
    0: ("background", 0.0, 0.0, 0.0),
    1: ("scalp", 0.80, 380.0, 70.0),
    2: ("skull", 0.10, 250.0, 1.0),
    3: ("csf", 1.00, 4000.0, 2000.0),
    4: ("gray_matter", 0.80, 1330.0, 110.0),
    5: ("white_matter", 0.70, 830.0, 80.0),
}


def brain_phantom(
    shape: Sequence[int] = (128, 128),
    *,
    n_gyri: int = 14,
    tr_ms: float = 600.0,
    te_ms: float = 12.0,
) -> dict:
    """Brain-like phantom, 2D ``(ny, nx)`` or 3D ``(nz, ny, nx)``.

    Concentric ellipsoidal layers (scalp, skull, CSF, grey matter, white matter) whose grey-matter
    boundaries are folded by ``n_gyri`` sinusoidal gyri, plus two CSF ventricles.

    Parameters
    ----------
    shape : tuple of int
        Image size (2 or 3 entries); the head fills ``[-1, 1]`` per axis as in
        :func:`shepp_logan`.
    n_gyri : int
        Folds of the cortex around the head.
    tr_ms, te_ms : float
        Repetition and echo times (ms) of the spin-echo contrast of ``image``:
        ``PD·(1 − exp(−TR/T1))·exp(−TE/T2)``.

    Returns
    -------
    dict
        ``image`` (float64 weighted image, max ≈ 1), ``PD``, ``T1`` (ms), ``T2`` (ms),
        ``labels`` and ``tissues`` (label -> name).
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (2, 3) or any(s < 2 for s in shape):
        raise ShapeError(f"shape must have 2 or 3 entries ≥ 2, got {shape}")
    axes = [(np.arange(n) - n // 2) / (n / 2) for n in shape]
    g = np.meshgrid(*axes, indexing="ij")
    y, x = -g[-2], g[-1]
    z = g[0] if len(shape) == 3 else np.zeros_like(x)
    a, b, c = 0.72, 0.92, 0.80
    rho = np.sqrt((x / a) ** 2 + (y / b) ** 2 + (z / c) ** 2)
    theta = np.arctan2(y, x)
    phi = np.arctan2(z, np.sqrt(x**2 + y**2))
    fold = np.sin(n_gyri * theta) * np.cos(3 * phi)
    labels = np.zeros(shape, dtype=np.int64)
    labels[rho <= 1.0] = 1
    labels[rho <= 0.94] = 2
    labels[rho <= 0.89] = 3
    labels[rho <= 0.85 + 0.02 * fold] = 4
    labels[rho <= 0.70 + 0.06 * fold] = 5
    for sx in (-1, 1):  # lateral ventricles
        v = ((x - sx * 0.13) / 0.09) ** 2 + ((y - 0.05) / 0.28) ** 2 + (z / 0.18) ** 2
        labels[v <= 1.0] = 3
    out: dict = {"labels": labels, "tissues": {k: v[0] for k, v in BRAIN_TISSUES.items()}}
    for j, key in enumerate(("PD", "T1", "T2"), start=1):
        lut = np.array([BRAIN_TISSUES[k][j] for k in sorted(BRAIN_TISSUES)])
        out[key] = lut[labels]
    with np.errstate(divide="ignore", invalid="ignore"):
        img = out["PD"] * (1 - np.exp(-tr_ms / out["T1"])) * np.exp(-te_ms / out["T2"])
    img = np.nan_to_num(img)
    out["image"] = img / img.max() if img.max() > 0 else img
    return out
