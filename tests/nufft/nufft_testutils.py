"""Helpers of the NUFFT tests: exact NDFT, relative error, random complex data."""

from __future__ import annotations

import numpy as np
import torch


def ndft_matrix(traj, im_size) -> np.ndarray:
    """Exact forward matrix ``E[m, r] = exp(−2πi k_m·r)``, float64/complex128, centred r."""
    k = np.asarray(traj, dtype=np.float64)
    axes = [np.arange(n) - n // 2 for n in im_size]
    grids = np.meshgrid(*axes, indexing="ij")
    r = np.stack([g.ravel() for g in grids], -1).astype(np.float64)
    return np.exp(-2j * np.pi * (k @ r.T))


def rel(a, b) -> float:
    a = np.asarray(a).ravel()
    b = np.asarray(b).ravel()
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def crandn(shape, dtype=torch.complex64, seed=0, device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    real = torch.float32 if dtype == torch.complex64 else torch.float64
    return torch.complex(
        torch.randn(shape, generator=g, dtype=real), torch.randn(shape, generator=g, dtype=real)
    ).to(device)
