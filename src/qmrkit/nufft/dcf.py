"""Density compensation by the Pipe–Menon fixed-point iteration.

Weights ``w`` solve ``(C ∗ w)(k_m) = 1`` at every sample, where ``C`` is the (positive, compact)
gridding-kernel autocorrelation: spreading ``w`` onto an oversampled grid and interpolating back
(no FFT). The iteration ``w ← w / (C ∗ w)`` (Pipe & Menon, MRM 1999) converges in a few tens of
steps. The result is scaled (least squares on a smooth Gaussian test image of 2 pixels' width)
so that ``A.H(w · A(x)) ≈ x`` for well-sampled smooth images; full Cartesian sampling gives
``w ≈ 1/N_total``, i.e. k-space area per sample in cycles/pixel units.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .grid import grid_size
from .kernels import Kernel, beta_rule
from .native import NativeEngine
from .plan import _validate_traj


def density_compensation(
    traj, im_size: int | Sequence[int], *, n_iter: int = 20, width: int = 4, device=None
) -> torch.Tensor:
    """Pipe–Menon density-compensation weights for a trajectory.

    Parameters
    ----------
    traj : array_like
        ``(..., M, ndim)`` in cycles/pixel, ``[-0.5, 0.5)``.
    im_size : int or tuple of int
        Image size N (sets the grid, hence the kernel's extent in k-space: W/(2N) cycles/pixel).
    n_iter : int
        Fixed-point iterations.
    width : int
        Kernel width W in cells of the 2× oversampled grid.
    device : str or torch.device, optional

    Returns
    -------
    Tensor
        ``(..., M)`` float64 weights, k-space area per sample (cycles²/pixel² in 2D).
    """
    t, size = _validate_traj(traj, im_size, device)
    nd = len(size)
    lead = t.shape[:-2]
    m = t.shape[-2]
    sigma = 2.0
    kernel = Kernel(width, beta_rule(width, sigma), sigma)
    grid = tuple(grid_size(n, sigma, width) for n in size)
    out = []
    for tr in t.reshape(-1, m, nd):
        eng = NativeEngine(tr, size, grid, kernel, torch.complex128, "gather")
        w = torch.ones((m, 1), dtype=torch.float64, device=t.device)
        for _ in range(n_iter):
            cw = eng.interp(eng.spread(w))
            w = w / cw.clamp_min(1e-30)
        out.append(w[:, 0] * _scale(tr, size, w[:, 0]))
    return torch.stack(out).reshape(*lead, m)


def _scale(traj: torch.Tensor, size: tuple[int, ...], w: torch.Tensor) -> float:
    """Least-squares scale s making ``A.H(s·w·A(g)) ≈ g`` for a smooth Gaussian ``g``."""
    from .plan import plan

    axes = [torch.arange(n, dtype=torch.float64, device=traj.device) - n // 2 for n in size]
    grids = torch.meshgrid(*axes, indexing="ij")
    g = torch.exp(-sum(a**2 for a in grids) / (2 * 2.0**2)).to(torch.complex128)
    op = plan(traj, size, eps=1e-6, dtype=torch.complex128, backend="torch", normal="direct")
    rec = op.H(w.to(torch.complex128) * op(g))
    return float(torch.vdot(rec.reshape(-1), g.reshape(-1)).real / rec.abs().pow(2).sum())
