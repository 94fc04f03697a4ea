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
#: factor on the RMS aliasing estimate (calibrated against direct NDFTs, see tests)
SAFETY = 1.5
MIN_EPS, MAX_EPS = 1e-14, 1e-1
#: float32 unit roundoff, and the factor on ``u · amplification`` found by comparing complex64 and
#: complex128 plans (3D 40³, 60k random samples, ε = 1e-6: σ = 1.25/1.5 gave 0.20/0.30)
F32_EPS = 5.96e-8
ROUNDING_FACTOR = 0.3


@dataclass(frozen=True)
class Kernel:
    """An ES kernel: ``width`` W (grid cells), shape ``beta`` β, for grid oversampling ``sigma``."""

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


_GL16 = np.polynomial.legendre.leggauss(16)


@lru_cache(maxsize=256)
def _composite_nodes(half: float, panels: int) -> tuple[np.ndarray, np.ndarray]:
    """Composite 16-point Gauss–Legendre nodes and weights on ``[0, half]``."""
    t, w = _GL16
    h = half / panels
    left = np.arange(panels)[:, None] * h
    x = (left + (t[None, :] + 1.0) * h / 2.0).ravel()
    wx = np.tile(w * h / 2.0, panels)
    return x, wx


def _nodes(kernel: Kernel, fmax: float, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """Quadrature angles ``θ_j = 2π x_j / G`` and weights ``w_j φ(x_j)`` on the half support."""
    half = kernel.width / 2.0
    # enough nodes for the oscillation (fmax·W/G cycles over the support) and the kernel's shape
    q = int(min(4000, max(64, 4 * kernel.width + 8 * fmax * kernel.width / grid)))
    x, wx = _composite_nodes(half, -(-q // 16))
    z = 2.0 * x / kernel.width
    phi = np.exp(kernel.beta * (np.sqrt(np.clip(1.0 - z * z, 0.0, None)) - 1.0))
    return (2.0 * np.pi / grid) * x, phi * wx


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
    f = np.asarray(freq, dtype=np.float64)
    fmax = float(np.max(np.abs(f))) if f.size else 0.0
    if f.size > _INTEGER_MIN and np.array_equal(np.rint(f), f):
        k = np.abs(f).astype(np.int64)
        return _kernel_ft_table(kernel, int(k.max()), grid)[k]
    theta, a = _nodes(kernel, fmax, grid)
    return 2.0 * (np.cos(np.multiply.outer(f, theta)) * a).sum(-1)


#: below this many frequencies the direct cosine sum is as fast as the factorised table
_INTEGER_MIN = 32


def _kernel_ft_table(kernel: Kernel, kmax: int, grid: int) -> np.ndarray:
    """ψ̂(k) for every integer ``0 ≤ k ≤ kmax`` (the quadrature of :func:`kernel_ft`).

    ``ψ̂(k) = 2 Σ_j a_j cos(θ_j k)``. Writing ``k = h·B + l`` (``B ≈ sqrt(kmax)``),
    ``cos(θ(hB + l)) = cos θhB·cos θl − sin θhB·sin θl``, so the table is
    ``C_h·diag(a)·C_lᵀ − S_h·diag(a)·S_lᵀ``: ``(H + B)·q`` cosines and sines and two small
    matrix products instead of ``kmax·q`` cosines (the per-axis aliasing quadratures were most of
    the first NUFFT plan of a process). Checked against an extended-precision direct sum: both
    agree with it to ~1e-15 of ψ̂(0).
    """
    theta, a = _nodes(kernel, float(kmax), grid)
    b = max(1, int(np.ceil(np.sqrt(kmax + 1))))
    h = kmax // b + 1
    lo = np.multiply.outer(np.arange(b, dtype=np.float64), theta)
    hi = np.multiply.outer(np.arange(h, dtype=np.float64) * b, theta)
    table = (np.cos(hi) * a) @ np.cos(lo).T - (np.sin(hi) * a) @ np.sin(lo).T
    return 2.0 * table.reshape(-1)[: kmax + 1]


def deapodization(n: int, grid: int, kernel: Kernel) -> np.ndarray:
    """Kernel transform at the centred image indices ``r = i − n//2`` (length ``n``), float64.

    Memoised (read-only result): every plan of a size needs it, at ~1/3 of a warm plan's time.
    """
    return _deapodization(int(n), int(grid), kernel)


@lru_cache(maxsize=1024)
def _deapodization(n: int, grid: int, kernel: Kernel) -> np.ndarray:
    r = np.arange(n, dtype=np.float64) - n // 2
    out = kernel_ft(kernel, r, grid)
    out.flags.writeable = False
    return out


@lru_cache(maxsize=4096)
def aliasing_error(kernel: Kernel, n: int, grid: int, n_alias: int = 3) -> float:
    """RMS relative aliasing error of one axis.

    For a sample at a uniformly random sub-cell position the interpolated transform at image
    index ``r`` has the relative error ``Σ_{l≠0} ψ̂(r+lG)·e^{iθ_l} / ψ̂(r)`` with independent phases,
    whose mean square is ``Σ_{l≠0} ψ̂(r+lG)² / ψ̂(r)²``; the mean over ``r`` gives the expected
    relative ℓ2 error for white data.

    Memoised (a pure function of hashable arguments): the planner asks for the same axes for
    every method, σ and plan, and this quadrature was most of a heuristic plan's time.
    """
    r = np.arange(n, dtype=np.float64) - n // 2
    shifts = [sign * ell * grid for sign in (-1, 1) for ell in range(1, n_alias + 1)]
    # one quadrature for the main lobe and all 2·n_alias aliases (nodes set by the largest |f|):
    # ψ̂ is even and the frequencies are integers, so one table over 0…max|f| serves them all
    f = np.abs(np.concatenate([r] + [r + s for s in shifts])).astype(np.int64)
    ft = _kernel_ft_table(kernel, int(f.max()), grid)[f].reshape(-1, n)
    main, alias = ft[0], (ft[1:] ** 2).sum(0)
    return float(np.sqrt(np.mean(alias / main**2)))


def estimate_error(kernel: Kernel, n_sizes: tuple[int, ...], grid: tuple[int, ...]) -> float:
    """Expected relative ℓ2 error of forward/adjoint with ``kernel`` on ``grid``.

    The axes' RMS errors are independent and add in quadrature; ``SAFETY`` covers small images,
    trajectories whose sub-cell positions are not uniformly spread (radial centres) and rounding.
    Against direct NDFTs (1D–3D, random/radial, ε 1e-2…1e-12, σ 1.25…2) the achieved error was
    0.3–0.8 of this estimate.
    """
    return SAFETY * math.sqrt(
        sum(aliasing_error(kernel, n, g) ** 2 for n, g in zip(n_sizes, grid, strict=True))
    )


def deapodization_amplification(
    kernel: Kernel, n_sizes: tuple[int, ...], grid: tuple[int, ...]
) -> float:
    """RMS factor by which dividing by the kernel transform amplifies grid-level rounding.

    Memoised per (kernel, sizes, grid), see :func:`_deapodization_amplification`.
    """
    return _deapodization_amplification(kernel, tuple(n_sizes), tuple(grid))


@lru_cache(maxsize=1024)
def _deapodization_amplification(
    kernel: Kernel, n_sizes: tuple[int, ...], grid: tuple[int, ...]
) -> float:
    """The amplification of :func:`deapodization_amplification` (hashable arguments).

    The image is divided by ψ̂(r) before the forward FFT (and after the adjoint's), so relative
    rounding errors of the FFT and of the spread values reach the result scaled by
    ψ̂(0)/ψ̂(r), averaged (RMS) over the image and multiplied over the (separable) axes. Wide
    kernels at low oversampling have tiny ψ̂ at the image edges: 3D, σ = 1.25, W = 12 gives
    ≈ 1.6e5, and complex64 plans there measured 2e-3 relative error whatever ε.
    """
    amp = 1.0
    for n, g in zip(n_sizes, grid, strict=True):
        d = np.abs(deapodization(n, g, kernel))
        amp *= float(np.sqrt(np.mean((d.max() / np.maximum(d, 1e-300)) ** 2)))
    return amp


def rounding_error(kernel: Kernel, n_sizes: tuple[int, ...], grid: tuple[int, ...]) -> float:
    """Expected relative error from single-precision rounding amplified by deapodization."""
    return ROUNDING_FACTOR * F32_EPS * deapodization_amplification(kernel, n_sizes, grid)
