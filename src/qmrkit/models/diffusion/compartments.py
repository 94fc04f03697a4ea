"""Spherical means of Gaussian compartments (the building blocks of SMT models).

An axially symmetric compartment with diffusivities D∥ along its axis and D⊥ across it gives,
for a gradient at angle θ to the axis (ξ = cos θ), ``S(ξ) = exp(−b·D⊥ − b·(D∥ − D⊥)·ξ²)``. Its
average over all directions (b in ms/µm², D in µm²/ms) is

    Ŝ(b) = ∫₀¹ S(ξ) dξ = exp(−b·D⊥) · √π·erf(√x) / (2√x),   x = b·(D∥ − D⊥)

(a stick is D⊥ = 0; an isotropic ball is D∥ = D⊥). The same formula serves a restricted
cylinder in the Gaussian phase approximation: its perpendicular attenuation is
exp(−b·sin²θ·D_eff) (:mod:`.restricted`), so it is this compartment with D⊥ = D_eff.

Evaluation, finite with finite derivatives for every x:

* x ≥ :data:`X_SERIES`: the erf form above;
* |x| < :data:`X_SERIES`: the series ∫₀¹ e^{−xξ²} dξ = Σ_k (−x)^k/(k!·(2k + 1)) (the erf form's
  √x has an infinite derivative at x = 0, the series none);
* x ≤ −:data:`X_SERIES` (oblate, D⊥ > D∥: only reachable when a model's settings allow it):
  Gauss–Legendre quadrature of ∫₀¹ exp(−b·(D⊥(1 − ξ²) + D∥ξ²)) dξ with :data:`N_GL` nodes
  (1e-12 relative or better at x = −52, tests; written with the exp(−b·D⊥) inside, so it cannot
  overflow).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import torch

#: |x| below which the power series is used (9 terms: 0.05¹⁰/10!/21 ≈ 1e-20)
X_SERIES = 0.05
_N_SERIES = 10

#: Gauss–Legendre nodes for the oblate branch
N_GL = 64


@functools.lru_cache(maxsize=2)
def _gl01(n: int) -> tuple[np.ndarray, np.ndarray]:
    x, w = np.polynomial.legendre.leggauss(n)
    return 0.5 * (x + 1.0), 0.5 * w


def _series(x: torch.Tensor) -> torch.Tensor:
    """Σ_{k<_N_SERIES} (−x)^k/(k!(2k+1)) by Horner (for |x| ≤ X_SERIES)."""
    k = _N_SERIES - 1
    acc = torch.full_like(x, 1.0 / (math.factorial(k) * (2 * k + 1)))
    for k in range(_N_SERIES - 2, -1, -1):
        acc = 1.0 / (math.factorial(k) * (2 * k + 1)) - x * acc
    return acc


def axisymmetric_spherical_mean(
    b: torch.Tensor | float,
    d_par: torch.Tensor | float,
    d_perp: torch.Tensor | float,
    *,
    oblate: bool | None = None,
) -> torch.Tensor:
    """Direction-averaged signal of an axially symmetric Gaussian compartment (module docs).

    Parameters
    ----------
    b : tensor or float, ms/µm² (e.g. ``(S,)`` shells).
    d_par, d_perp : tensor or float, µm²/ms; broadcast with ``b`` (e.g. ``(V, 1)`` or ``(V, S)``).
    oblate : bool, optional
        Whether b·(D∥ − D⊥) ≤ −X_SERIES can occur. None (default) checks the values (one device
        synchronisation); models that exclude it by their bounds pass False and skip the
        quadrature branch; values below −X_SERIES are then treated as −X_SERIES.

    Returns
    -------
    Tensor, the broadcast shape of the inputs, S/S0 in [0, 1] (for D∥, D⊥ ≥ 0).
    """
    ref = next((t for t in (d_perp, d_par, b) if isinstance(t, torch.Tensor)), None)
    if ref is None:
        ref = torch.as_tensor(float(d_perp), dtype=torch.float64)
    kw = {"dtype": ref.dtype, "device": ref.device}
    b, d_par, d_perp = (
        v if isinstance(v, torch.Tensor) else torch.as_tensor(v, **kw) for v in (b, d_par, d_perp)
    )
    x = b * (d_par - d_perp)
    if oblate is None:
        oblate = bool((x.detach() <= -X_SERIES).any())
    # each branch sees x clamped into its own domain, so the unused ones stay finite
    xe = x.clamp(min=X_SERIES)
    sx = torch.sqrt(xe)
    f_erf = (0.5 * math.sqrt(math.pi)) * torch.erf(sx) / sx
    f = torch.where(x >= X_SERIES, f_erf, _series(x.clamp(-X_SERIES, X_SERIES)))
    out = torch.exp(-b * d_perp) * f
    if oblate:
        xi, w = _gl01(N_GL)
        xi2 = torch.as_tensor(xi * xi, **kw)
        wt = torch.as_tensor(w, **kw)
        e = torch.exp(-b[..., None] * (d_perp[..., None] * (1.0 - xi2) + d_par[..., None] * xi2))
        out = torch.where(x <= -X_SERIES, e @ wt, out)
    return out


def stick_spherical_mean(b: Any, d: Any) -> torch.Tensor:
    """Spherical mean of a stick (D⊥ = 0) with axial diffusivity ``d`` (µm²/ms)."""
    zero = torch.zeros_like(d) if isinstance(d, torch.Tensor) else 0.0
    return axisymmetric_spherical_mean(b, d, zero, oblate=False)


# ------------------------------------------------------------------------------------------------
# starts: grid over the nonlinear parameters, exact fractions on the simplex
# ------------------------------------------------------------------------------------------------
def _simplex_ls(
    ee: torch.Tensor,
    p: torch.Tensor,
    q: torch.Tensor,
    a: torch.Tensor,
    bb: torch.Tensor,
    c: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Minimise Q = ee − 2αp − 2βq + α²a + 2αβ·bb + β²c over α, β ≥ 0, α + β ≤ 1.

    A convex quadratic on a triangle: its minimum is the unconstrained one when that is feasible,
    else on an edge (a clipped 1-D minimum; the vertices are the clipped ends). All candidates
    are evaluated and the smallest Q kept. Returns (Q, α, β), each of the broadcast shape.
    """
    tiny = torch.finfo(ee.dtype).tiny

    def cost(al: torch.Tensor, be: torch.Tensor) -> torch.Tensor:
        return ee - 2 * al * p - 2 * be * q + al * al * a + 2 * al * be * bb + be * be * c

    det = a * c - bb * bb
    ok = det > 1e-12 * (a * c).clamp_min(tiny)
    dsafe = torch.where(ok, det, torch.ones_like(det))
    al0, be0 = (p * c - q * bb) / dsafe, (q * a - p * bb) / dsafe
    inside = ok & (al0 >= 0) & (be0 >= 0) & (al0 + be0 <= 1)
    best = torch.where(inside, cost(al0, be0), torch.full_like(det, math.inf))
    al, be = torch.where(inside, al0, 0.0), torch.where(inside, be0, 0.0)
    zero = torch.zeros_like(det)
    cands = [
        ((p / a.clamp_min(tiny)).clamp(0, 1), zero),  # β = 0
        (zero, (q / c.clamp_min(tiny)).clamp(0, 1)),  # α = 0
    ]
    den = a - 2 * bb + c  # α + β = 1, α = t
    t = ((p - q - bb + c) / den.clamp_min(tiny)).clamp(0, 1)
    cands.append((t, 1 - t))
    for ca, cb in cands:
        qc = cost(ca, cb)
        better = qc < best
        best = torch.where(better, qc, best)
        al, be = torch.where(better, ca, al), torch.where(better, cb, be)
    return best, al, be


@torch.no_grad()
def simplex_grid_search(
    data: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor, s3: torch.Tensor, *, chunk: int = 512
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best grid point and fractions of a three-compartment mixture, per voxel.

    For every grid point g (a setting of the nonlinear parameters) the compartments' signals
    ``s1, s2, s3 (G, M)`` are mixed as w₁s₁ + w₂s₂ + w₃s₃ with w ≥ 0, Σw = 1; the w minimising
    the squared error to ``data (V, M)`` is exact (:func:`_simplex_ls`), the best g is kept.

    Returns
    -------
    index : (V,) long, the grid point;  w : (V, 3) the fractions there.
    """
    u, v = s1 - s3, s2 - s3  # w₁, w₂ free; w₃ = 1 − w₁ − w₂
    uu, uv, vv = (u * u).sum(-1), (u * v).sum(-1), (v * v).sum(-1)
    cu, cv, cc = (s3 * u).sum(-1), (s3 * v).sum(-1), (s3 * s3).sum(-1)
    idx_out = torch.empty(data.shape[0], dtype=torch.long, device=data.device)
    w_out = torch.empty(data.shape[0], 3, dtype=data.dtype, device=data.device)
    for v0 in range(0, data.shape[0], chunk):
        d = data[v0 : v0 + chunk]
        dd = (d * d).sum(-1, keepdim=True)
        # e = d − s3: e·e, e·u, e·v for every (voxel, grid point)
        ee = dd - 2 * d @ s3.T + cc
        p = d @ u.T - cu
        q = d @ v.T - cv
        cost, al, be = _simplex_ls(ee, p, q, uu, uv, vv)
        best = cost.argmin(dim=-1)
        a1 = al.gather(1, best[:, None])[:, 0]
        b1 = be.gather(1, best[:, None])[:, 0]
        idx_out[v0 : v0 + chunk] = best
        w_out[v0 : v0 + chunk] = torch.stack([a1, b1, 1 - a1 - b1], dim=-1)
    return idx_out, w_out


def grid(lo: float, hi: float, n: int, *, log: bool = False) -> np.ndarray:
    """n points spanning [lo, hi] (geometric when ``log``), float64."""
    return np.geomspace(lo, hi, n) if log else np.linspace(lo, hi, n)
