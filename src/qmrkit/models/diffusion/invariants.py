"""Rotational invariants of multi-shell DWI: spherical mean and l = 2, 4, … invariants per shell.

For each shell (b, δ, Δ) the b0-normalised signal over directions n is fitted by linear least
squares with the even-order real spherical harmonics up to ``l_max``,
``S(n)/S̄(b=0) ≈ Σ_lm c_lm·Y_lm(n)``, and the invariants are (Novikov et al. 2018)

    S_l = sqrt(Σ_m c_lm²) / sqrt(4π·(2l + 1)),

so that S_0 = c_00/sqrt(4π) is the spherical mean, and an axially symmetric signal
``K(n·u)`` gives ``S_l = |K_l|`` with ``K_l = ½∫₋₁¹ K(ξ) P_l(ξ) dξ`` (the Legendre projection of
the kernel on which NEXI's and other models' l > 0 predictions are built). Because the SH of one
order l rotate among themselves by an orthogonal matrix, ``S_l`` does not depend on the fibre
orientation, nor on which orthonormal real SH basis is used.

Real SH convention (orthonormal on the sphere, Condon–Shortley phase in the complex Y_l^m):
``Y_l0 = Y_l^0``, ``Y_lm = √2·(−1)^m·Re Y_l^m`` (m > 0), ``Y_lm = √2·(−1)^m·Im Y_l^|m|`` (m < 0).
Relative to DIPY's ``real_sh_descoteaux_from_index(m, l, θ, φ, legacy=False)``:
``Y_lm = DIPY(−m, l)`` for m ≥ 0 and ``Y_lm = (−1)^m·DIPY(−m, l)`` for m < 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...errors import ParameterError, ShapeError
from ...io.dwi import B0_THRESHOLD, check_gradients

#: b-values closer than this (ms/µm²) belong to one shell (DIPY's unique_bvals_tolerance: 20 s/mm²)
B_TOL = 0.02
#: δ, Δ closer than this (ms) belong to one shell
T_TOL = 1e-3


def sh_indices(l_max: int) -> tuple[np.ndarray, np.ndarray]:
    """Orders ``l`` and degrees ``m`` of the even real SH up to ``l_max``: l = 0, 2, …; m = −l…l."""
    if l_max < 0 or l_max % 2:
        raise ParameterError(f"l_max must be an even integer >= 0, got {l_max}")
    ls = [(l, m) for l in range(0, l_max + 1, 2) for m in range(-l, l + 1)]
    return np.array([l for l, _ in ls]), np.array([m for _, m in ls])


def _complex_sh(l: np.ndarray, m: np.ndarray, theta: np.ndarray, phi: np.ndarray) -> np.ndarray:
    from scipy import special

    if hasattr(special, "sph_harm_y"):  # scipy >= 1.15
        return special.sph_harm_y(l, m, theta, phi)
    return special.sph_harm(m, l, phi, theta)  # pragma: no cover - older scipy


def real_sh(l_max: int, directions: Any) -> np.ndarray:
    """Real SH basis ``(n, n_coef)`` (module docs) at unit ``directions (n, 3)``, float64."""
    g = np.asarray(directions, dtype=np.float64)
    if g.ndim != 2 or g.shape[1] != 3:
        raise ShapeError(f"directions must have shape (n, 3), got {g.shape}")
    theta = np.arccos(np.clip(g[:, 2] / np.linalg.norm(g, axis=1), -1.0, 1.0))[:, None]
    phi = np.arctan2(g[:, 1], g[:, 0])[:, None]
    l, m = sh_indices(l_max)
    y = _complex_sh(l[None], np.abs(m)[None], theta, phi)
    sign = np.where(m % 2 == 0, 1.0, -1.0)[None]
    return np.where(
        m[None] > 0,
        math.sqrt(2) * sign * y.real,
        np.where(m[None] < 0, math.sqrt(2) * sign * y.imag, y.real),
    )


@dataclass(frozen=True)
class Shell:
    """One shell: its b (ms/µm², the mean over its volumes), δ and Δ (ms, NaN if unknown) and the
    indices of its volumes in the series."""

    b: float
    small_delta: float
    big_delta: float
    index: np.ndarray


def find_shells(
    bvals: Any,
    small_delta: Any = None,
    big_delta: Any = None,
    *,
    b0_threshold: float = B0_THRESHOLD,
    b_tol: float = B_TOL,
) -> list[Shell]:
    """Group the diffusion-weighted volumes into shells of equal (b, δ, Δ), sorted by (Δ, δ, b).

    b-values are chained into one shell while consecutive sorted values differ by ≤ ``b_tol``.
    """
    b = np.asarray(bvals, dtype=np.float64).reshape(-1)
    n = b.size
    sd = np.full(n, np.nan) if small_delta is None else np.asarray(small_delta, float).reshape(-1)
    bd = np.full(n, np.nan) if big_delta is None else np.asarray(big_delta, float).reshape(-1)
    if sd.size != n or bd.size != n:
        raise ShapeError(f"{n} b-values but {sd.size} δ and {bd.size} Δ values")
    shells: list[Shell] = []
    dw = np.flatnonzero(b > b0_threshold)
    # timing groups first (exact up to T_TOL), then b clusters inside each
    keys = np.stack(
        [
            np.round(np.nan_to_num(bd[dw], nan=-1) / T_TOL),
            np.round(np.nan_to_num(sd[dw], nan=-1) / T_TOL),
        ],
        1,
    )
    for key in np.unique(keys, axis=0):
        grp = dw[(keys == key).all(1)]
        grp = grp[np.argsort(b[grp], kind="stable")]
        cut = np.flatnonzero(np.diff(b[grp]) > b_tol) + 1
        for idx in np.split(grp, cut):
            shells.append(
                Shell(float(b[idx].mean()), float(sd[idx[0]]), float(bd[idx[0]]), np.sort(idx))
            )
    return sorted(
        shells, key=lambda s: (np.nan_to_num(s.big_delta), np.nan_to_num(s.small_delta), s.b)
    )


def _default_fit_order(n_dirs: int, l_max: int) -> int:
    """Highest even order ≤ 8 with at most 2/3·n_dirs coefficients, and at least ``l_max``."""
    best = l_max
    for order in range(l_max, 9, 2):
        if (order + 1) * (order + 2) / 2 <= 2 * n_dirs / 3:
            best = order
    return best


@dataclass
class Invariants:
    """Rotational invariants per shell.

    Attributes
    ----------
    values : ndarray (*spatial, n_shells, n_l)
        ``S_l / S̄(b=0)`` for l in :attr:`orders` (column 0: the spherical mean).
    orders : tuple of int
        0, 2, …, l_max.
    b, small_delta, big_delta : ndarray (n_shells,)
        Shell b (ms/µm²), δ and Δ (ms; NaN where unknown).
    mean_b0 : ndarray (*spatial,)
        The b = 0 mean used for the normalisation (data units).
    """

    values: np.ndarray
    orders: tuple[int, ...]
    b: np.ndarray
    small_delta: np.ndarray
    big_delta: np.ndarray
    mean_b0: np.ndarray

    def order(self, l: int) -> np.ndarray:
        """``(*spatial, n_shells)`` invariants of order ``l``."""
        if l not in self.orders:
            raise ParameterError(f"order {l} not computed; orders are {self.orders}")
        return self.values[..., self.orders.index(l)]


def rotational_invariants(
    data: Any,
    bvals: Any,
    bvecs: Any,
    *,
    small_delta: Any = None,
    big_delta: Any = None,
    l_max: int = 2,
    fit_l_max: int | None = None,
    b0_threshold: float = B0_THRESHOLD,
    b_tol: float = B_TOL,
) -> Invariants:
    """Spherical mean and l = 2, …, ``l_max`` invariants of every shell (module docs).

    Parameters
    ----------
    data : array (*spatial, n)
        DWI series, volumes last (NIfTI order, e.g. ``DWI.data``).
    bvals : (n,) ms/µm²; bvecs : (n, 3) unit directions (any frame: invariants do not depend on it).
    small_delta, big_delta : (n,) ms, optional
        Shells are split by them too (multi-diffusion-time data).
    l_max : int
        Highest even order reported.
    fit_l_max : int, optional
        Highest even order of the least-squares SH fit (≥ ``l_max``; every shell needs at least
        (fit_l_max + 1)(fit_l_max + 2)/2 directions). Default, per shell: the highest even order
        ≤ 8 whose coefficient count is at most 2/3 of the shell's directions (and ≥ ``l_max``).
        Why higher than ``l_max``: a realistic signal is not band-limited, and the orders above
        the fit alias into the low ones by an amount that depends on the fibre orientation. For
        a stick at b·D = 2 sampled on 64 random directions the orientation-to-orientation spread
        of (S_0, S_2) is (7 %, 14 %) with a fit to l = 2, (0.3 %, 0.8 %) with a fit to l = 6.

    Returns
    -------
    Invariants
        Normalised by the mean of all b = 0 volumes, voxel by voxel (a voxel whose b = 0 mean
        is not positive gives NaN).
    """
    arr = np.asarray(data, dtype=np.float64)
    b, g = check_gradients(bvals, bvecs, b0_threshold=b0_threshold, source="rotational_invariants")
    if arr.ndim < 1 or arr.shape[-1] != b.size:
        raise ShapeError(
            f"data has shape {arr.shape}; its last axis must hold the {b.size} volumes"
        )
    shells = find_shells(b, small_delta, big_delta, b0_threshold=b0_threshold, b_tol=b_tol)
    if not shells:
        raise ParameterError("no diffusion-weighted volume (every b <= b0_threshold)")
    orders = tuple(range(0, l_max + 1, 2))
    sh_indices(l_max)  # validates l_max
    if fit_l_max is not None and (fit_l_max < l_max or fit_l_max % 2):
        raise ParameterError(f"fit_l_max must be even and >= l_max = {l_max}, got {fit_l_max}")
    b0 = arr[..., b <= b0_threshold].mean(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        norm = np.where(b0[..., None] > 0, arr / b0[..., None], np.nan)
    out = np.empty((*arr.shape[:-1], len(shells), len(orders)))
    for k, sh in enumerate(shells):
        fl = _default_fit_order(sh.index.size, l_max) if fit_l_max is None else fit_l_max
        l_idx, _ = sh_indices(fl)
        n_coef = l_idx.size
        if sh.index.size < n_coef:
            raise ShapeError(
                f"shell b = {sh.b:.3g} ms/µm² (δ = {sh.small_delta:g}, Δ = {sh.big_delta:g} ms) has "
                f"{sh.index.size} directions; an SH fit to l = {fl} needs at least {n_coef}"
            )
        basis = real_sh(fl, g[sh.index])
        if np.linalg.matrix_rank(basis) < n_coef:
            raise ShapeError(
                f"shell b = {sh.b:.3g} ms/µm²: its directions do not determine the SH up to "
                f"l = {fl} (rank-deficient basis)"
            )
        coef = norm[..., sh.index] @ np.linalg.pinv(basis).T  # (*spatial, n_coef)
        for j, l in enumerate(orders):
            c = coef[..., l_idx == l]
            out[..., k, j] = np.sqrt((c * c).sum(-1) / (4 * math.pi * (2 * l + 1)))
        out[..., k, 0] = coef[..., 0] / math.sqrt(4 * math.pi)  # signed spherical mean
    return Invariants(
        values=out,
        orders=orders,
        b=np.array([s.b for s in shells]),
        small_delta=np.array([s.small_delta for s in shells]),
        big_delta=np.array([s.big_delta for s in shells]),
        mean_b0=b0,
    )
