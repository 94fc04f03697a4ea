"""Simulated relaxometry series with known truth (MOLLI, inversion recovery, VFA, multi-echo)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import ParameterError
from .noise import add_noise

#: a 5(3)3 MOLLI at about 60 bpm (ms)
MOLLI_TI = (100.0, 180.0, 260.0, 1000.0, 1080.0, 1900.0, 2000.0, 2800.0)


def molli_series(
    t1: Any,
    m0: Any,
    ti: Any = MOLLI_TI,
    *,
    apparent_ratio: float = 0.85,
    snr: float | None = 50.0,
    seed: int | None = 0,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A MOLLI magnitude series from T1 and M0 maps.

    The three-parameter model S = |A − B·exp(−TI/T1*)| with T1* = ``apparent_ratio``·T1 (the
    Look–Locker shortening), A = M0·T1*/T1 and B = A·(1 + T1/T1*), so that the Look–Locker
    correction T1 = T1*·(B/A − 1) recovers T1 exactly.

    Parameters
    ----------
    t1, m0 : array
        T1 (ms, > 0 where m0 > 0) and M0 maps of the same shape.
    ti : sequence of float
        Inversion times (ms).
    apparent_ratio : float
        T1*/T1 in (0, 1].
    snr : float or None
        M0 of the brightest voxel over the noise σ; Rician noise. None: noiseless.
    seed : int
        Noise seed.

    Returns
    -------
    series : ndarray (*shape, n_ti)
    truth : dict
        ``A``, ``B``, ``T1star``, ``T1``, ``M0`` maps and the noise ``sigma``.
    """
    if not 0 < apparent_ratio <= 1:
        raise ParameterError(f"apparent_ratio must be in (0, 1], got {apparent_ratio}")
    t1 = np.asarray(t1, dtype=np.float64)
    m0 = np.broadcast_to(np.asarray(m0, dtype=np.float64), t1.shape)
    tis = np.asarray(ti, dtype=np.float64)
    t1safe = np.where(t1 > 0, t1, 1.0)
    t1s = apparent_ratio * t1safe
    a = m0 * apparent_ratio
    b = a * (1 + 1 / apparent_ratio)
    signal = a[..., None] - b[..., None] * np.exp(-tis / t1s[..., None])
    sigma = 0.0 if snr is None else float(np.max(m0)) / float(snr)
    series = np.abs(signal) if snr is None else add_noise(signal, sigma, kind="rician", seed=seed)
    truth = {"A": a, "B": b, "T1star": t1s, "T1": t1, "M0": m0, "sigma": np.asarray(sigma)}
    return series, truth
