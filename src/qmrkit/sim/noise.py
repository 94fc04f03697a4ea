"""Noise for simulated data, reproducible by seed."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import ParameterError


def add_noise(
    signal: Any, sigma: float, *, kind: str = "rician", seed: int | None = 0
) -> np.ndarray:
    """Add noise of standard deviation ``sigma`` (per real channel).

    Parameters
    ----------
    signal : array
        Noiseless signal (real or complex).
    sigma : float
        Standard deviation of the Gaussian noise in each of the real and imaginary channels.
    kind : {"rician", "gaussian", "complex"}
        ``"rician"``: magnitude of the signal plus complex Gaussian noise (magnitude images);
        ``"gaussian"``: real Gaussian noise; ``"complex"``: complex Gaussian noise, complex output.
    seed : int
        Seed of NumPy's default generator.
    """
    if not sigma >= 0:
        raise ParameterError(f"sigma must be >= 0, got {sigma}")
    rng = np.random.default_rng(seed)
    s = np.asarray(signal)
    if kind == "gaussian":
        return s + rng.normal(0.0, sigma, s.shape)
    noise = rng.normal(0.0, sigma, s.shape) + 1j * rng.normal(0.0, sigma, s.shape)
    if kind == "complex":
        return s + noise
    if kind == "rician":
        return np.abs(s + noise)
    raise ParameterError(f"kind must be 'rician', 'gaussian' or 'complex', got {kind!r}")
