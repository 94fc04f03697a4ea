"""Calibration scans → dependencies (noise statistics)."""

from __future__ import annotations

import numpy as np

from ..errors import ShapeError


def noise_statistics(noise: np.ndarray) -> dict[str, np.ndarray]:
    """Noise covariance ``(C, C)`` and per-channel σ (per real component) from samples ``(C, N)``."""
    n = np.asarray(noise)
    if n.ndim != 2 or n.shape[1] < 2:
        raise ShapeError(
            f"noise samples must be (channels, samples) with >= 2 samples, got {n.shape}"
        )
    n = n - n.mean(axis=1, keepdims=True)
    cov = (n @ n.conj().T) / (n.shape[1] - 1)
    sigma = np.sqrt(np.real(np.diag(cov)) / 2.0)
    return {"covariance": cov.astype(np.complex64), "sigma": sigma.astype(np.float32)}
