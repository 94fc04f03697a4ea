"""Spreading kernel: exponential of semicircle (ES), its width rule and its Fourier transform.

The kernel, in grid cells ``x`` with half-width ``W/2``, is

    φ(x) = exp(β · (sqrt(1 − z²) − 1)),   z = 2x / W,   |z| ≤ 1 (zero outside).

Its width ``W`` (grid cells) follows from the requested accuracy ε and the grid oversampling σ
(REFERENCE.md): at σ = 2, ``W = ceil(log10(1/ε)) + 1``; otherwise
``W = ceil(ln(1/ε) / (π·sqrt(1 − 1/σ)))``. The shape parameter is ``β = γ·π·(1 − 1/(2σ))·W``
with γ ≈ 0.97 (β/W ≈ 2.30 at σ = 2), the choice published with the ES kernel (Barnett, Magland
& af Klinteberg, SIAM J. Sci. Comput. 2019).

Deapodisation divides the image by the kernel's Fourier transform, evaluated here by
Gauss–Legendre quadrature in float64 and precomputed once per plan. The same transform gives an
aliasing estimate of the achieved error, reported as ``expected_error`` in the plan's info.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

MAX_WIDTH = 16
MIN_EPS, MAX_EPS = 1e-14, 1e-1


@dataclass(frozen=True)
class Kernel:
    """An ES kernel: ``width`` W in grid cells, shape ``beta`` β, for grid oversampling ``sigma``."""

    width: int
    beta: float
    sigma: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Kernel values at offsets ``x`` (grid cells, any float dtype); zero for |x| > W/2."""
        z = x * (2.0 / self.width)
        inside = z.abs() < 1.0
        s = torch.sqrt(torch.clamp(1.0 - z * z, min=0.0))
        return torch.where(inside, torch.exp(self.beta * (s - 1.0)), torch.zeros_like(z))


def width_rule(eps: float, sigma: float) -> int:
    """Kernel width W (grid cells) for accuracy ``eps`` at oversampling ``sigma`` (REFERENCE.md)."""
    if abs(sigma - 2.0) < 1e-9:
        w = math.ceil(math.log10(1.0 / eps)) + 1
    else:
        w = math.ceil(math.log(1.0 / eps) / (math.pi * math.sqrt(1.0 - 1.0 / sigma)))
    return int(min(max(w, 2), MAX_WIDTH))


def beta_rule(width: int, sigma: float) -> float:
    """Shape parameter β for an ES kernel of ``width`` cells at oversampling ``sigma``."""
    if abs(sigma - 2.0) < 1e-9:
        return 2.30 * width
    return 0.97 * math.pi * (1.0 - 0.5 / sigma) * width


@lru_cache(maxsize=64)
def _nodes(q: int) -> tuple[np.ndarray, np.ndarray]:
    return np.polynomial.legendre.leggauss(q)


def kernel_ft(kernel: Kernel, freq: np.ndarray, grid: int) -> np.ndarray:
    """Fourier transform ψ̂(f) = ∫ φ(x) exp(2πi x f / G) dx of the kernel (real, even), float64.

    Parameters
    ----------
    kernel : Kernel
    freq : ndarray
        Frequencies in image-index units (cycles over the grid of ``grid`` cells).
    grid : int
        Grid size G (cells).
    """
    half = kernel.width / 2.0
    fmax = float(np.max(np.abs(freq))) if np.size(freq) else 0.0
    # enough nodes for the oscillation (fmax·W/G cycles over the support) and the kernel's shape
    q = int(min(2000, max(60, 4 * kernel.width + 8 * fmax * kernel.width / grid)))
    t, wq = _nodes(q)
    x = half * (t + 1.0) / 2.0  # [0, W/2]
    wx = wq * half / 2.0
    z = 2.0 * x / kernel.width
    phi = np.exp(kernel.beta * (np.sqrt(np.clip(1.0 - z * z, 0.0, None)) - 1.0))
    f = np.asarray(freq, dtype=np.float64)
    return 2.0 * (np.cos(2.0 * np.pi * np.multiply.outer(f, x) / grid) * (phi * wx)).sum(-1)


def deapodization(n: int, grid: int, kernel: Kernel) -> np.ndarray:
    """Kernel transform at the centred image indices ``r = i − n//2`` (length ``n``), float64."""
    r = np.arange(n, dtype=np.float64) - n // 2
    return kernel_ft(kernel, r, grid)


def aliasing_error(kernel: Kernel, n: int, grid: int, n_alias: int = 3) -> float:
    """Worst-case relative aliasing error of one dimension: max_r Σ_{l≠0}|ψ̂(r+lG)| / ψ̂(r)."""
    r = np.arange(n, dtype=np.float64) - n // 2
    main = kernel_ft(kernel, r, grid)
    alias = np.zeros_like(main)
    for sign in (-1, 1):
        for ell in range(1, n_alias + 1):
            alias += np.abs(kernel_ft(kernel, r + sign * ell * grid, grid))
    return float(np.max(alias / np.abs(main)))


def choose_kernel(eps: float, sigma: float, n_sizes: tuple[int, ...], grid: tuple[int, ...]
                  ) -> tuple[Kernel, float]:
    """The narrowest ES kernel whose estimated relative error over all dims stays ≤ ``eps``.

    Starts from the width rule and widens while the aliasing estimate (summed over dimensions,
    with an RMS-to-worst-case allowance) exceeds ``eps``. Returns the kernel and the estimate.
    """
    w = width_rule(eps, sigma)
    while True:
        k = Kernel(w, beta_rule(w, sigma), sigma)
        # the worst-case bound is pessimistic for ℓ2 errors: over 1D/2D/3D random trajectories and
        # ε in 1e-2..1e-12 it measured 4-7x the achieved relative ℓ2 error, so a quarter of it
        # is the (still conservative) estimate
        est = 0.25 * sum(aliasing_error(k, n, g) for n, g in zip(n_sizes, grid, strict=True))
        if est <= eps or w >= MAX_WIDTH:
            return k, est
        w += 1
