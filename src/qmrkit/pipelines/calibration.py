"""Calibration scans → dependencies (noise statistics)."""

from __future__ import annotations

import numpy as np

from ..errors import ShapeError
from ..recon.coils import noise_covariance


def noise_statistics(noise: np.ndarray) -> dict[str, np.ndarray]:
    """Noise covariance ``(C, C)`` and per-channel σ (per real component) from samples ``(C, N)``."""
    n = np.asarray(noise)
    if n.ndim != 2 or n.shape[1] < 2:
        raise ShapeError(
            f"noise samples must be (channels, samples) with >= 2 samples, got {n.shape}"
        )
    # the one covariance estimate, the same one recon.prewhiten computes from a scan's own noise
    # samples: prewhitening with a stored covariance then equals prewhitening with the samples
    cov = noise_covariance(np.ascontiguousarray(n.astype(np.complex64))).numpy()
    sigma = np.sqrt(np.real(np.diag(cov)) / 2.0)
    return {"covariance": cov.astype(np.complex64), "sigma": sigma.astype(np.float32)}
