"""Restricted diffusion in a cylinder and a sphere: the Gaussian phase approximation (GPA).

A pulsed-gradient spin echo (two rectangular lobes of amplitude G, duration δ, separation Δ, in
ms) on spins diffusing with intrinsic diffusivity D0 (µm²/ms) inside an impermeable cylinder
(gradient perpendicular to its axis) or sphere of radius R (µm) attenuates, in the GPA, as

    −ln S = 2·γ²G² · Σ_m  B(α_m²·D0) / (α_m²·(α_m²R² − κ))

    B(y) = 2δ/y − [2 + e^{−y(Δ−δ)} − 2e^{−yδ} − 2e^{−yΔ} + e^{−y(Δ+δ)}] / y²

* **Cylinder** (Van Gelderen et al., J Magn Reson B 1994; 103:255): κ = 1 and α_m·R = x_m are
  the roots of J₁'(x) = 0 (1.8412, 5.3314, 8.5363, …; ``scipy.special.jnp_zeros(1, n)``).
* **Sphere** (Murday & Cotts, J Chem Phys 1968; 48:4938): κ = 2 and x_m are the roots of
  x·J'_{3/2}(x) − ½·J_{3/2}(x) = 0, i.e. of the spherical Bessel derivative j₁'(x) = 0,
  equivalently (2 − x²)·sin x = 2x·cos x (2.0816, 5.9404, 9.2058, …).

**b-based API.** The GPA log-attenuation is proportional to G², and a free spin's is
b·D0 with b = γ²G²δ²(Δ − δ/3). We therefore write ``−ln S = b·D_eff(R, D0, δ, Δ)`` with

    D_eff = 2/(δ²(Δ − δ/3)) · Σ_m R²·B(x_m²D0/R²) / (x_m²(x_m² − κ))   (µm²/ms),

i.e. G² = b/(γ²δ²(Δ − δ/3)); D_eff does not depend on b (or γ). Limits (all tested):
D_eff → D0 as R → ∞ (the deficit ∝ 1/R); for δ → 0 and Δ ≫ R²/D0, −ln S → q²R²/4 (cylinder)
or q²R²/5 (sphere) with q² = b/(Δ − δ/3), the small-q expansion of the narrow-pulse form factors
[2J₁(qR)/(qR)]² and [3j₁(qR)/(qR)]²; for small R (or long pulses) Neuman's R⁴ law
D_eff ≈ 4R⁴·S₁/(D0·δ·(Δ − δ/3)), S₁ = Σ 1/(x⁴(x² − κ)) = 7/192 (cylinder), 4/175 (sphere).

**Truncation.** For roots with y·δ ≫ 1 and y·(Δ − δ) ≫ 1 the exponentials vanish and
B(y) = 2δ/y − 2/y², so the series beyond the first ``n_roots`` terms is added in closed form
from the float64 sums T_j = Σ_{m>n} 1/(x_m^{2j+2}(x_m² − κ)), j = 1, 2:

    tail = 2δR⁴·T₁/D0 − 2R⁶·T₂/D0².

This is exact up to terms of order e^{−y_{n+1}·min(δ, Δ−δ)}, so few roots suffice (5 and 4 for
the AxCaliberSMT and SANDI protocols of the tests). With ``n_roots`` from :func:`roots_needed`,
D_eff agrees with the papers' sums evaluated directly in NumPy (2000 brentq roots, float64) to
4e-11 relative over R = 0.05–10 µm, D0 = 0.5–3 µm²/ms, δ = 1–40 ms, Δ − δ = 0.5–60 ms, and to
9e-11 at Δ = δ (tests); up to R = 15 µm: ≤ 3e-10, and ≤ 2e-8 at Δ = δ. In float32: ≤ 4.4e-7.

**Numerics.** B(y) is evaluated in the working dtype (float32 or float64) without cancellation:

    B = δ²·[2φ(z) − e^{−y(Δ−δ)}·ψ(z)²],  z = y·δ,  φ(z) = (z − 1 + e^{−z})/z²,
    ψ(z) = (1 − e^{−z})/z  (``expm1``; φ from its series where z < 1),

and where y·(Δ+δ) < 1 (very large R) from its Taylor series B(y) = Σ_{k≥3} (−1)^{k+1}·M_k·
y^{k−2}/k!, whose moments M_k = (Δ−δ)^k − 2δ^k − 2Δ^k + (Δ+δ)^k are formed once per (δ, Δ) in
float64 from positive binomial terms. (The published form loses up to 4 digits to cancellation
for narrow pulses at large R: 3e-4 relative in float32.) Every branch is finite and differentiable
everywhere (inputs clamped to their branch), so autograd and forward-mode AD through R and D0
are exact.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..._shapes import broadcast_shapes
from ...errors import ParameterError, ShapeError

#: κ in α_m²R² − κ: 1 for the cylinder (Van Gelderen), 2 for the sphere (Murday–Cotts)
KAPPA = {"cylinder": 1.0, "sphere": 2.0}

#: Σ_m 1/(x_m⁴(x_m² − κ)) (Neuman 1974's long-pulse constants 7/48 and 16/175, divided by 4)
#: and Σ_m 1/(x_m⁶(x_m² − κ)); the tests re-sum them from brentq roots to 1e-13
FULL_SUMS = {"cylinder": (7.0 / 192.0, 11.0 / 1024.0), "sphere": (4.0 / 175.0, 83.0 / 15750.0)}

#: roots summed explicitly when computing the tail constants T₁, T₂ (the remainder beyond them,
#: < Σ_{m>M} 1/(mπ)⁶ ≈ 1e-22 relative to T₁ at M = 4000, is dropped)
_TAIL_ROOTS = 4000

#: y_{n+1}·δ at least this large: the neglected e^{−y·δ} terms are < e^{−40} ≈ 4e-18 relative
ROOT_MARGIN = 40.0

#: terms of the small-y Taylor series of B (used where y·(Δ+δ) < 1): 1/22! ≈ 9e-22
N_TAYLOR = 20

#: terms of the series of φ(z) = (z − 1 + e^{−z})/z² used for z = y·δ < 1
N_PHI = 17

#: fewest explicit roots
MIN_ROOTS = 2

#: most roots asked for by a short gap Δ − δ (the tail's dropped e^{−y(Δ−δ)} is not small when
#: Δ ≈ δ); see :func:`roots_needed` for what this costs in accuracy
GAP_ROOTS_CAP = 30


# ------------------------------------------------------------------------------------------------
# roots and series constants (float64, cached)
# ------------------------------------------------------------------------------------------------
def _sphere_roots(n: int) -> np.ndarray:
    """The first ``n`` positive roots of j₁'(x) = 0 (float64).

    j₁(x) = sin x/x² − cos x/x, so j₁'(x)·x³ = (2 − x²)·sin x − 2x·cos x =: h(x). The m-th root
    lies in ((m − ½)π, mπ): there h changes sign (h((m−½)π) = (−1)^{m+1}(2 − x²),
    h(mπ) = (−1)^{m+1}·2mπ, opposite signs for x² > 2). Vectorised bisection to full precision.
    """
    m = np.arange(1, n + 1, dtype=np.float64)
    lo, hi = (m - 0.5) * np.pi, m * np.pi

    def h(x: np.ndarray) -> np.ndarray:
        return (2.0 - x * x) * np.sin(x) - 2.0 * x * np.cos(x)

    h_lo = h(lo)
    for _ in range(80):  # interval π/2 → 2^-80·π/2: below float64 resolution of x
        mid = 0.5 * (lo + hi)
        h_mid = h(mid)
        same = np.sign(h_mid) == np.sign(h_lo)
        lo = np.where(same, mid, lo)
        h_lo = np.where(same, h_mid, h_lo)
        hi = np.where(same, hi, mid)
    return 0.5 * (lo + hi)


@functools.lru_cache(maxsize=4)
def _all_roots(geometry: str) -> np.ndarray:
    if geometry == "cylinder":
        from scipy.special import jnp_zeros  # lazy: keeps `import qmrkit` light

        return np.asarray(jnp_zeros(1, _TAIL_ROOTS), dtype=np.float64)
    return _sphere_roots(_TAIL_ROOTS)


def gpa_roots(geometry: str, n: int) -> np.ndarray:
    """First ``n`` roots x_m (float64): of J₁'(x) = 0 (cylinder) or j₁'(x) = 0 (sphere)."""
    geometry = _check_geometry(geometry)
    n = int(n)
    if n <= _TAIL_ROOTS:
        return _all_roots(geometry)[:n].copy()
    if geometry == "cylinder":
        from scipy.special import jnp_zeros

        return np.asarray(jnp_zeros(1, n), dtype=np.float64)
    return _sphere_roots(n)


@dataclass(frozen=True)
class GPASeries:
    """Float64 constants of a truncated GPA series.

    Attributes
    ----------
    geometry : "cylinder" or "sphere"
    roots : (n,) x_m;  weights : (n,) 1/(x_m²(x_m² − κ))
    tail1, tail2 : T₁ = Σ_{m>n} 1/(x⁴(x² − κ)), T₂ = Σ_{m>n} 1/(x⁶(x² − κ))
    """

    geometry: str
    roots: np.ndarray
    weights: np.ndarray
    tail1: float
    tail2: float


@functools.lru_cache(maxsize=64)
def gpa_series(geometry: str, n_roots: int) -> GPASeries:
    """Roots, weights and tail sums of the ``n_roots``-term series (module docs)."""
    geometry = _check_geometry(geometry)
    n = int(n_roots)
    if n < 0:
        raise ParameterError(f"n_roots must be >= 0, got {n_roots}")
    kappa = KAPPA[geometry]
    x = gpa_roots(geometry, max(n, _TAIL_ROOTS))
    x2 = x * x
    t1 = 1.0 / (x2 * x2 * (x2 - kappa))
    t2 = t1 / x2
    # summed from the smallest terms up (the remainder beyond the last root is ~1e-22 of T₁)
    tail1 = float(np.sum(t1[n:][::-1]))
    tail2 = float(np.sum(t2[n:][::-1]))
    w = 1.0 / (x2[:n] * (x2[:n] - kappa))
    return GPASeries(geometry, x[:n].copy(), w, tail1, tail2)


def _roots_for(geometry: str, need: float) -> int:
    """Number n of roots below the first with x² ≥ ``need``."""
    guess = int(math.sqrt(need) / math.pi) + 2  # x_m > (m − ½)π, so root guess+1 is past it
    x = gpa_roots(geometry, guess + 1)
    return int(np.searchsorted(x * x, need))


def roots_needed(
    geometry: str,
    radius_max: float,
    diffusivity_min: float,
    small_delta_min: float,
    gap_min: float | None = None,
) -> int:
    """Explicit roots for which the closed-form tail is exact to about e^{−40}.

    The tail drops e^{−y·δ} and e^{−y·(Δ−δ)} for the roots beyond the n-th, so n is the smallest
    with y_{n+1}·τ ≥ :data:`ROOT_MARGIN`, y = x²·D0/R², τ = min(δ, Δ − δ), for the largest radius
    (µm), smallest diffusivity (µm²/ms), shortest δ and shortest gap Δ − δ (ms) in use
    (``gap_min=None``: δ only). When a short gap alone asks for more than
    :data:`GAP_ROOTS_CAP` roots, that cap is used (what is dropped then is < 3e-10 relative
    for Δ − δ ≥ 0.5 ms and < 2e-8 at Δ = δ over the ranges of the module docs). At least
    :data:`MIN_ROOTS`.
    """
    geometry = _check_geometry(geometry)
    r, d, sd = float(radius_max), float(diffusivity_min), float(small_delta_min)
    if not (r > 0 and d > 0 and sd > 0) or not all(map(math.isfinite, (r, d, sd))):
        raise ParameterError(
            "roots_needed needs a positive finite radius (µm), diffusivity (µm²/ms) and δ (ms); "
            f"got radius={radius_max}, diffusivity={diffusivity_min}, small_delta={small_delta_min}"
        )
    n = _roots_for(geometry, ROOT_MARGIN * r * r / (d * sd))
    if gap_min is not None:
        gap = float(gap_min)
        if gap < 0 or math.isnan(gap):
            raise ParameterError(f"gap_min (Δ − δ) must be >= 0 ms, got {gap_min}")
        need = ROOT_MARGIN * r * r / (d * gap) if gap > 0 else math.inf
        # x_m > (m − ½)π: beyond (cap·π)² the cap is reached anyway, and need may be infinite
        capped = need > (GAP_ROOTS_CAP * math.pi) ** 2
        n_gap = GAP_ROOTS_CAP if capped else _roots_for(geometry, need)
        n = max(n, min(n_gap, GAP_ROOTS_CAP))
    return max(MIN_ROOTS, n)


# ------------------------------------------------------------------------------------------------
# per-protocol constants of B(y)
# ------------------------------------------------------------------------------------------------
def _timing(small_delta: Any, big_delta: Any) -> tuple[np.ndarray, np.ndarray]:
    sd = np.asarray(small_delta, dtype=np.float64)
    bd = np.asarray(big_delta, dtype=np.float64)
    try:
        sd, bd = np.broadcast_arrays(sd, bd)
    except ValueError:
        raise ShapeError(
            f"small_delta (δ) and big_delta (Δ) must broadcast together, got shapes "
            f"{sd.shape} and {bd.shape}"
        ) from None
    if not (np.isfinite(sd).all() and np.isfinite(bd).all()) or (sd <= 0).any():
        raise ParameterError(f"small_delta (δ) must be positive finite ms, got {small_delta}")
    if (bd < sd).any():
        raise ParameterError(
            f"big_delta (Δ) must be >= small_delta (δ) for pulsed gradients; got Δ={big_delta}, "
            f"δ={small_delta} (ms)"
        )
    return sd.copy(), bd.copy()


def taylor_coefficients(small_delta: Any, big_delta: Any, n_terms: int = N_TAYLOR) -> np.ndarray:
    """Coefficients s_j (…, n_terms) with B(y) = t²·Σ_j s_j·(y·t)^j, t = Δ + δ (float64).

    s_j = (−1)^{j+3}·M_{j+2}/((j+2)!·t^{j+2}) with M_k = (Δ−δ)^k − 2δ^k − 2Δ^k + (Δ+δ)^k; the
    scaling by t keeps every coefficient ≤ 2/k! in size, so float32 cannot overflow.
    """
    sd, bd = _timing(small_delta, big_delta)
    t = bd + sd
    c, d = bd / t, sd / t  # Δ/t, δ/t in (0, 1)
    out = np.empty(sd.shape + (n_terms,), dtype=np.float64)
    for j in range(1, n_terms + 1):
        k = j + 2
        # M_k/t^k without cancellation: (Δ−δ)^k + (Δ+δ)^k − 2Δ^k = 2·Σ_{i even ≥ 2} C(k,i)Δ^{k−i}δ^i
        # (all terms positive); its i = k term cancels −2δ^k exactly for even k, and for odd k
        # the i = k−1 term 2kΔδ^{k−1} exceeds 2δ^k (Δ ≥ δ), so at most a factor k/(k−1) is lost
        mk = np.zeros_like(c)
        for i in range(2, k, 2):
            mk = mk + 2.0 * math.comb(k, i) * c ** (k - i) * d**i
        if k % 2 == 1:
            mk = mk - 2.0 * d**k
        out[..., j - 1] = (-1.0) ** (k + 1) * mk / math.factorial(k)
    return out


# ------------------------------------------------------------------------------------------------
# torch evaluation
# ------------------------------------------------------------------------------------------------
def _phi_series(z: torch.Tensor) -> torch.Tensor:
    """φ(z) = (z − 1 + e^{−z})/z² = Σ_k (−z)^k/(k+2)! for z ≤ 1 (Horner; 1/19! ≈ 8e-18)."""
    acc = torch.full_like(z, 1.0 / math.factorial(N_PHI + 1))
    for k in range(N_PHI - 1, -1, -1):
        acc = 1.0 / math.factorial(k + 2) - z * acc
    return acc


def _b_direct(
    y: torch.Tensor, sd: torch.Tensor, bd: torch.Tensor, n_phi: int | None
) -> torch.Tensor:
    """B(y) in a form without cancellation where y·(Δ+δ) ≳ 1 (z = y·δ):

    B = δ²·[2φ(z) − e^{−y(Δ−δ)}·ψ(z)²],  φ(z) = (z − 1 + e^{−z})/z²,  ψ(z) = (1 − e^{−z})/z,

    (from 2 − 2e^{−z} = −2·expm1(−z) and e^{−y(Δ−δ)} − 2e^{−yΔ} + e^{−y(Δ+δ)} =
    e^{−y(Δ−δ)}·expm1(−z)²). ψ is exact as written; φ's numerator cancels for small z, so
    there (z < 1, only possible for the first ``n_phi`` roots) it comes from its series.
    """
    z = y * sd
    e1 = torch.expm1(-z)
    psi = -e1 / z
    phi = (z + e1) / (z * z)
    n = y.shape[-1] if n_phi is None else max(0, min(int(n_phi), y.shape[-1]))
    if n:
        zs = z[..., :n]
        lo = torch.where(zs < 1.0, _phi_series(zs.clamp(max=1.0)), phi[..., :n])
        phi = torch.cat([lo, phi[..., n:]], dim=-1) if n < y.shape[-1] else lo
    return sd * sd * (2.0 * phi - torch.exp(-y * (bd - sd)) * psi * psi)


def _b_taylor(u: torch.Tensor, t: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """B = t²·Σ_j s_j u^j by Horner; u = y·t ≤ 1; coeffs (…, K) broadcast with u[..., None]."""
    k = coeffs.shape[-1]
    acc = coeffs[..., k - 1]
    for j in range(k - 2, -1, -1):
        acc = coeffs[..., j] + u * acc
    return t * t * u * acc


def gpa_deff_from_series(
    series: GPASeries | dict[str, torch.Tensor],
    radius: torch.Tensor,
    diffusivity: torch.Tensor | float,
    small_delta: torch.Tensor,
    big_delta: torch.Tensor,
    coeffs: torch.Tensor,
    *,
    n_taylor: int | None = None,
    n_phi: int | None = None,
) -> torch.Tensor:
    """D_eff (µm²/ms) with precomputed constants (the fast path used by the models).

    Parameters
    ----------
    series : GPASeries, or a dict with tensors ``roots``, ``weights`` (n,) and 0-d ``tail1``,
        ``tail2`` already on the device/dtype.
    radius : (…, S) µm; diffusivity : (…, S) or scalar, µm²/ms (D0 of the restricted spins).
    small_delta, big_delta : (S,) ms.  coeffs : (S, K) from :func:`taylor_coefficients`.
    n_taylor, n_phi : int, optional
        Only the first ``n_taylor`` roots can reach y·(Δ+δ) < 1 and only the first ``n_phi``
        y·δ < 1 (the branches that need series); the models pass the counts implied by their
        bounds (:func:`series_counts`), None evaluates the series for every root.

    Returns
    -------
    Tensor (…, S) in the dtype of ``radius``.
    """
    dtype, device = radius.dtype, radius.device
    if isinstance(series, GPASeries):
        series = series_tensors(series, dtype=dtype, device=device)
    x, w = series["roots"], series["weights"]
    sd, bd = small_delta[:, None], big_delta[:, None]  # (S, 1)
    total = torch.zeros_like(radius)
    if x.numel():
        r = radius.unsqueeze(-1)  # (…, S, 1)
        d0 = diffusivity.unsqueeze(-1) if isinstance(diffusivity, torch.Tensor) else diffusivity
        y = x * x * d0 / (r * r)  # (…, S, n)
        t = sd + bd
        n_t = x.numel() if n_taylor is None else max(0, min(int(n_taylor), x.numel()))
        if n_t:
            u = y[..., :n_t] * t
            # the direct branch sees y clamped into its own domain, so both stay finite
            yd = torch.cat([torch.maximum(y[..., :n_t], 1.0 / t), y[..., n_t:]], dim=-1)
            b_dir = _b_direct(yd, sd, bd, n_phi)
            b_tay = _b_taylor(u.clamp(max=1.0), t, coeffs[:, None, :])
            small = torch.where(u < 1.0, b_tay, b_dir[..., :n_t])
            b = torch.cat([small, b_dir[..., n_t:]], dim=-1) if n_t < x.numel() else small
        else:
            b = _b_direct(y, sd, bd, n_phi)
        total = (b * w).sum(-1) * radius * radius
    r4 = radius**4
    tail = 2.0 * small_delta * r4 * series[
        "tail1"
    ] / diffusivity - 2.0 * r4 * radius * radius * series["tail2"] / (diffusivity * diffusivity)
    return 2.0 * (total + tail) / (small_delta * small_delta * (big_delta - small_delta / 3.0))


def series_tensors(
    series: GPASeries, *, dtype: torch.dtype, device: torch.device | str | None = None
) -> dict[str, torch.Tensor]:
    """The constants of ``series`` as tensors (rounded once from float64)."""
    kw = {"dtype": dtype, "device": device}
    return {
        "roots": torch.as_tensor(series.roots, **kw),
        "weights": torch.as_tensor(series.weights, **kw),
        "tail1": torch.as_tensor(series.tail1, **kw),
        "tail2": torch.as_tensor(series.tail2, **kw),
    }


def series_counts(
    geometry: str,
    radius_max: float,
    diffusivity_min: float,
    small_delta_min: float,
    t_min: float,
    n_roots: int,
) -> tuple[int, int]:
    """(n_taylor, n_phi): how many of the first ``n_roots`` roots can reach y·t_min < 1
    (t = Δ + δ, shortest in use) and y·δ_min < 1, for radii ≤ ``radius_max`` (µm) and
    diffusivities ≥ ``diffusivity_min`` (µm²/ms)."""
    x2 = gpa_roots(geometry, n_roots) ** 2
    r2 = radius_max * radius_max
    return (
        int(np.sum(x2 * diffusivity_min * t_min < r2)),
        int(np.sum(x2 * diffusivity_min * small_delta_min < r2)),
    )


def _check_geometry(geometry: str) -> str:
    if geometry not in KAPPA:
        raise ParameterError(f"geometry must be 'cylinder' or 'sphere', got {geometry!r}")
    return geometry


def _as_tensor(x: Any, dtype: torch.dtype | None, device: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(dtype=dtype or x.dtype, device=device or x.device)
    arr = np.asarray(x, dtype=np.float64)
    return torch.as_tensor(arr, dtype=dtype or torch.float64, device=device)


def gpa_deff(
    geometry: str,
    radius: Any,
    diffusivity: Any,
    small_delta: Any,
    big_delta: Any,
    *,
    n_roots: int | None = None,
) -> torch.Tensor:
    """Effective diffusivity D_eff = −ln S / b (µm²/ms) of a restricted compartment (GPA).

    Parameters
    ----------
    geometry : "cylinder" (Van Gelderen 1994, gradient ⟂ axis) or "sphere" (Murday–Cotts 1968).
    radius : tensor or array, µm. Differentiable (autograd and forward-mode).
    diffusivity : tensor, array or float, intrinsic D0 in µm²/ms (differentiable).
    small_delta, big_delta : float or (S,) array, δ and Δ in ms (Δ ≥ δ > 0).
    n_roots : int, optional
        Explicit roots (the rest of the series in closed form, module docs). Default:
        :func:`roots_needed` for the largest radius, smallest D0 and shortest δ of the call
        (reads these values, i.e. one device synchronisation).

    Returns
    -------
    Tensor of shape broadcast(radius, diffusivity) with a last axis of size S appended when δ/Δ
    are arrays: ``radius (V, 1)`` and ``small_delta (S,)`` give ``(V, S)``; scalars give the
    shape of ``radius``. dtype: that of ``radius`` when it is a tensor, else float64.
    """
    geometry = _check_geometry(geometry)
    sd, bd = _timing(small_delta, big_delta)
    scalar_timing = sd.ndim == 0
    sd1, bd1 = np.atleast_1d(sd), np.atleast_1d(bd)
    if sd1.ndim != 1:
        raise ShapeError(f"small_delta/big_delta must be scalars or 1-D (S,), got shape {sd.shape}")
    r = _as_tensor(radius, None, None)
    if not r.is_floating_point():
        r = r.double()
    dtype, device = r.dtype, r.device
    d0 = _as_tensor(diffusivity, dtype, device)
    rd = r.detach()
    if not torch.isfinite(rd).all() or bool((rd <= 0).any()):
        raise ParameterError(f"radius must be positive finite µm, got min {float(rd.min()):g}")
    if not torch.isfinite(d0).all() or bool((d0.detach() <= 0).any()):
        raise ParameterError("diffusivity must be positive finite µm²/ms")
    r_max, d_min = float(rd.max()), float(d0.detach().min())
    if n_roots is None:
        n_roots = roots_needed(geometry, r_max, d_min, float(sd1.min()), float((bd1 - sd1).min()))
    series = gpa_series(geometry, int(n_roots))
    n_t, n_phi = series_counts(
        geometry, r_max, d_min, float(sd1.min()), float((sd1 + bd1).min()), int(n_roots)
    )
    try:
        shape = broadcast_shapes(r.shape, d0.shape)
        if scalar_timing:
            shape = (*shape, 1)
        else:  # the timings run along the last axis, numpy-style
            shape = broadcast_shapes(shape, sd1.shape)
    except ValueError:
        raise ShapeError(
            f"radius {tuple(r.shape)}, diffusivity {tuple(d0.shape)} and the {sd1.size} "
            "timings (last axis) do not broadcast; give radius as (V, 1) for (V, S) output"
        ) from None
    if scalar_timing:
        rr, dd = r[..., None].expand(shape), d0[..., None].expand(shape)
    else:
        rr, dd = r.expand(shape), d0.expand(shape)
    coeffs = torch.as_tensor(taylor_coefficients(sd1, bd1), dtype=dtype, device=device)
    out = gpa_deff_from_series(
        series,
        rr,
        dd,
        torch.as_tensor(sd1, dtype=dtype, device=device),
        torch.as_tensor(bd1, dtype=dtype, device=device),
        coeffs,
        n_taylor=n_t,
        n_phi=n_phi,
    )
    return out[..., 0] if scalar_timing else out


def cylinder_deff(
    radius: Any, diffusivity: Any, small_delta: Any, big_delta: Any, *, n_roots: int | None = None
) -> torch.Tensor:
    """D_eff (µm²/ms) across an impermeable cylinder of ``radius`` µm (Van Gelderen 1994, GPA).

    See :func:`gpa_deff`; the attenuation for a gradient perpendicular to the axis is
    ``exp(−b·D_eff)`` with b in ms/µm².
    """
    return gpa_deff("cylinder", radius, diffusivity, small_delta, big_delta, n_roots=n_roots)


def sphere_deff(
    radius: Any, diffusivity: Any, small_delta: Any, big_delta: Any, *, n_roots: int | None = None
) -> torch.Tensor:
    """D_eff (µm²/ms) in an impermeable sphere of ``radius`` µm (Murday & Cotts 1968, GPA).

    See :func:`gpa_deff`; the (isotropic) attenuation is ``exp(−b·D_eff)``.
    """
    return gpa_deff("sphere", radius, diffusivity, small_delta, big_delta, n_roots=n_roots)


def cylinder_attenuation(
    b: Any,
    radius: Any,
    diffusivity: Any,
    small_delta: Any,
    big_delta: Any,
    *,
    n_roots: int | None = None,
) -> torch.Tensor:
    """S/S0 = exp(−b·D_eff) for a gradient ⟂ the cylinder axis; b in ms/µm², shapes as
    :func:`gpa_deff` (b broadcasts with the result, e.g. b (S,) with radius (V, 1))."""
    deff = cylinder_deff(radius, diffusivity, small_delta, big_delta, n_roots=n_roots)
    return torch.exp(-_as_tensor(b, deff.dtype, deff.device) * deff)


def sphere_attenuation(
    b: Any,
    radius: Any,
    diffusivity: Any,
    small_delta: Any,
    big_delta: Any,
    *,
    n_roots: int | None = None,
) -> torch.Tensor:
    """S/S0 = exp(−b·D_eff) inside a sphere (GPA, Murday–Cotts); shapes as :func:`gpa_deff`."""
    deff = sphere_deff(radius, diffusivity, small_delta, big_delta, n_roots=n_roots)
    return torch.exp(-_as_tensor(b, deff.dtype, deff.device) * deff)


__all__ = [
    "GPASeries",
    "gpa_roots",
    "gpa_series",
    "roots_needed",
    "taylor_coefficients",
    "series_counts",
    "gpa_deff",
    "gpa_deff_from_series",
    "cylinder_deff",
    "sphere_deff",
    "cylinder_attenuation",
    "sphere_attenuation",
]
