"""Extended phase graphs with two-pool exchange (EPG-X) for RF-spoiled gradient echo.

Two water pools exchange magnetisation (the Bloch–McConnell "BM" case of EPG-X, Malik et al.,
MRM 2017): pool ``a`` (free, e.g. intra-/extra-cellular water, IEW) and pool ``b`` (bound, e.g.
myelin water, MW) with relative sizes ``1 − f`` and ``f``. Each pool has its own T1 and T2 and its
own phase graph (transverse F⁺ₖ, F⁻ₖ and longitudinal Zₖ for orders k = 0..K−1); the pools
exchange in both the transverse and longitudinal planes with rates

    k_ab = k            (a → b, 1/s)
    k_ba = k (1 − f)/f  (b → a, 1/s; detailed balance keeps M0 the equilibrium)

so within a relaxation period of length τ each order evolves as ``X(τ) = exp(Λ τ) X(0)`` with the
2×2 Bloch–McConnell generator ``Λ = −diag(R) + K`` (R = R2 for F, R1 for Z), and the longitudinal
order 0 also recovers: ``Z₀(τ) = exp(Λ₁ τ)(Z₀(0) − M0) + M0``.

Assumptions (stated because Malik 2017 and Chan & Marques 2020 are not reproduced here):

* both pools resonate at the same frequency during the sequence (no chemical-shift offset of the
  bound pool; MCR-MWI puts the frequency shifts in the analytic echo-time decay instead) and both
  see the same RF (no saturation-transfer lineshape: the bound pool is water, not macromolecule);
* instantaneous RF pulses; the signal is F⁺₀ right after the last pulse (TE = 0) — echo-time
  decay is left to the caller (e.g. analytic T2* terms);
* quadratic RF spoiling: pulse n (n = 0, 1, ...) has phase φₙ = Φ₀·n(n+1)/2 with Φ₀ the spoiling
  increment (e.g. 50° or 117°); the receiver follows the pulse phase, and the returned signal is
  ``i·e^{−iφ}·F⁺₀`` so that a pulse on equilibrium magnetisation gives the real, positive
  ``sin(α)·M0`` (the sign convention of the ideal-spoiling steady state);
* one unit of gradient dephasing per TR, no diffusion.

The state orders are truncated as in :mod:`qmrkit.mrf.epg`: a state at order k must spend k TRs in
the transverse plane to return to k = 0, so orders above ``ln(1/tol)·max(T2)/TR`` contribute less
than ``tol``. The number of TRs simulated (default: enough for the slowest longitudinal mode,
``ln(1/tol)·max(T1)/TR``) approximates the steady state.

Everything is torch and differentiable (reverse and forward mode) in all tissue parameters and the
flip-angle scale, batched over voxels and flip angles.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from .._device import resolve_device
from ..errors import ParameterError, ShapeError

__all__ = ["epgx_spgr", "spgr_two_pool_steady_state", "exchange_matrix_exp"]


def _col(name: str, x: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Any scalar/array/tensor as a flat tensor (keeps autograd history of tensors)."""
    if isinstance(x, torch.Tensor):
        t = x.to(device=device, dtype=dtype)
    else:
        t = torch.as_tensor(np.asarray(x, dtype=np.float64), dtype=dtype, device=device)
    t = t.reshape(-1)
    if not torch.isfinite(t.detach()).all():
        raise ParameterError(f"{name} contains NaN or Inf")
    return t


def exchange_matrix_exp(
    r_a: torch.Tensor, r_b: torch.Tensor, k_ab: torch.Tensor, k_ba: torch.Tensor, tau: float
) -> torch.Tensor:
    """``exp(τ Λ)`` for ``Λ = [[−r_a − k_ab, k_ba], [k_ab, −r_b − k_ba]]``, batched, closed form.

    Parameters
    ----------
    r_a, r_b : Tensor (B,)
        Relaxation rates of the pools (1/ms).
    k_ab, k_ba : Tensor (B,)
        Exchange rates a → b and b → a (1/ms), non-negative.
    tau : float
        Duration (ms).

    Returns
    -------
    Tensor (B, 2, 2)

    Notes
    -----
    For a 2×2 matrix with eigenvalues s ± q, ``exp(A) = e^s [cosh q · I + sinh q / q · (A − sI)]``.
    Here q² = ((a − d)/2)² + k_ab·k_ba ≥ 0 (real eigenvalues), so no complex arithmetic is needed;
    q is floored at a tiny value so the derivative of the square root stays finite when the pools
    are identical and do not exchange (there sinh q / q → 1, the correct limit).
    """
    a = -(r_a + k_ab) * tau
    d = -(r_b + k_ba) * tau
    b = k_ba * tau
    c = k_ab * tau
    s = 0.5 * (a + d)
    h = 0.5 * (a - d)
    q2 = h * h + b * c
    tiny = torch.finfo(q2.dtype).tiny ** 0.5
    q = torch.sqrt(q2.clamp_min(tiny))
    es = torch.exp(s)
    # cosh/sinh via exponentials of (s ± q): e^s cosh q can overflow only for absurd τ·rates
    ch = es * torch.cosh(q)
    sh = es * torch.sinh(q) / q
    row0 = torch.stack([ch + sh * h, sh * b], dim=-1)
    row1 = torch.stack([sh * c, ch - sh * h], dim=-1)
    return torch.stack([row0, row1], dim=-2)


def _rates(t1a, t1b, f, k):
    """Per-ms rates and pool sizes; validated."""
    if (f.detach() <= 0).any() or (f.detach() >= 1).any():
        raise ParameterError(
            "f (bound-pool fraction) must lie strictly inside (0, 1); for one pool use f small "
            "and k = 0"
        )
    if (k.detach() < 0).any():
        raise ParameterError("k (exchange rate) must be >= 0 1/s")
    k_ab = k / 1000.0  # 1/s -> 1/ms
    k_ba = k_ab * (1 - f) / f
    return k_ab, k_ba


def spgr_two_pool_steady_state(
    flip_angles: Any,
    tr: float,
    t1a: Any,
    t1b: Any,
    f: Any,
    k: Any,
    *,
    b1: Any = 1.0,
    dtype: torch.dtype = torch.float64,
    device: Any = None,
) -> torch.Tensor:
    """Ideal-spoiling steady state of a two-pool exchanging system (Bloch–McConnell, closed form).

    Under ideal spoiling no transverse magnetisation survives to the next pulse, so just before
    each pulse ``Mz⁻ = (I − cos α·E)⁻¹ (I − E) M0`` with ``E = exp(TR·Λ₁)`` (the longitudinal
    Bloch–McConnell propagator) and the signal of each pool right after the pulse is
    ``sin α · Mz⁻``. With k = 0 each pool follows the Ernst formula.

    Parameters
    ----------
    flip_angles : array (n_fa,)
        Nominal flip angles in degrees.
    tr : float
        Repetition time in ms.
    t1a, t1b : array (V,) or scalar
        T1 of the free (a) and bound (b) pools in ms.
    f : array (V,) or scalar
        Bound-pool fraction, in (0, 1).
    k : array (V,) or scalar
        Exchange rate a → b in 1/s.
    b1 : array (V,) or scalar
        Transmit field as a fraction of nominal (scales the flip angles).

    Returns
    -------
    Tensor (V, n_fa, 2), real
        Signals of pool a and pool b (total M0 = 1: pool sizes 1 − f and f).
    """
    dev = resolve_device(device, t1a, t1b, f, k, b1)
    fa = _col("flip_angles", flip_angles, dtype, dev)
    T1a, T1b, F, K, B1 = (
        _col(n, x, dtype, dev)
        for n, x in (("t1a", t1a), ("t1b", t1b), ("f", f), ("k", k), ("b1", b1))
    )
    try:
        T1a, T1b, F, K, B1 = torch.broadcast_tensors(T1a, T1b, F, K, B1)
    except RuntimeError as exc:
        raise ShapeError("t1a, t1b, f, k and b1 must broadcast to one length (V,)") from exc
    if (T1a.detach() <= 0).any() or (T1b.detach() <= 0).any() or not tr > 0:
        raise ParameterError("t1a, t1b and tr must be > 0 ms")
    k_ab, k_ba = _rates(T1a, T1b, F, K)
    E = exchange_matrix_exp(1 / T1a, 1 / T1b, k_ab, k_ba, float(tr))  # (V, 2, 2)
    m0 = torch.stack([1 - F, F], dim=-1)  # (V, 2)
    alpha = torch.deg2rad(fa)[None, :] * B1[:, None]  # (V, n_fa)
    ca, sa = torch.cos(alpha), torch.sin(alpha)
    eye = torch.eye(2, dtype=dtype, device=dev)
    A = eye - ca[..., None, None] * E[:, None]  # (V, n_fa, 2, 2)
    rhs = ((eye - E) @ m0[..., None])[:, None].expand(-1, fa.numel(), -1, -1)
    mz = torch.linalg.solve(A, rhs)[..., 0]  # (V, n_fa, 2)
    return sa[..., None] * mz


def _n_states(t2max: float, tr: float, tol: float, n_tr: int) -> int:
    return int(min(n_tr, max(2, math.ceil(math.log(1 / tol) * t2max / tr) + 1)))


def epgx_spgr(
    flip_angles: Any,
    tr: float,
    t1a: Any,
    t2a: Any,
    t1b: Any,
    t2b: Any,
    f: Any,
    k: Any,
    *,
    b1: Any = 1.0,
    spoil_increment: float = 50.0,
    spoiling: str = "rf",
    n_tr: int | None = None,
    n_states: int | None = None,
    tol: float = 1e-5,
    dtype: torch.dtype = torch.float64,
    device: Any = None,
) -> torch.Tensor:
    """Two-pool EPG-X simulation of an RF-spoiled gradient echo towards its steady state.

    Parameters
    ----------
    flip_angles : array (n_fa,)
        Nominal flip angles in degrees; each is a separate steady-state experiment.
    tr : float
        Repetition time in ms.
    t1a, t2a : array (V,) or scalar
        T1 and T2 of the free pool a (e.g. IEW), ms.
    t1b, t2b : array (V,) or scalar
        T1 and T2 of the bound pool b (e.g. myelin water), ms.
    f : array (V,) or scalar
        Bound-pool fraction in (0, 1) (total M0 = 1).
    k : array (V,) or scalar
        Exchange rate a → b in 1/s (b → a follows from detailed balance, see module docs).
    b1 : array (V,) or scalar
        Transmit field as a fraction of nominal.
    spoil_increment : float
        Quadratic RF-spoiling increment Φ₀ in degrees (φₙ = Φ₀·n(n+1)/2).
    spoiling : {"rf", "ideal"}
        ``"rf"``: RF + gradient spoiling simulated by the phase graph. ``"ideal"``: transverse
        states are destroyed before every pulse (the textbook assumption; equals
        :func:`spgr_two_pool_steady_state` once converged).
    n_tr : int, optional
        Number of pulses simulated; the signal of the last one is returned. Default
        ``ceil(ln(1/tol)·max(T1)/TR)`` (≥ 10), enough for the transient to decay below ``tol``.
    n_states : int, optional
        Phase-graph orders kept (default from ``tol`` and max T2, see module docs).
    tol : float
        Tolerance for the default ``n_tr`` and ``n_states``.
    dtype : torch.float32 or torch.float64
        Real precision (states are complex of the matching precision).
    device : optional
        Default: the inputs' device, else CPU.

    Returns
    -------
    Tensor (V, n_fa, 2), complex
        Signals of pool a and pool b right after the last pulse, receiver-demodulated and rotated
        so a pulse on equilibrium magnetisation is real positive (module docs).
    """
    if dtype not in (torch.float32, torch.float64):
        raise ParameterError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    if spoiling not in ("rf", "ideal"):
        raise ParameterError(f"spoiling must be 'rf' or 'ideal', got {spoiling!r}")
    if not 0 < tol < 1:
        raise ParameterError(f"tol must be in (0, 1), got {tol}")
    if not (isinstance(tr, (int, float)) and tr > 0):
        raise ParameterError(f"tr must be a positive number of ms, got {tr!r}")
    tr = float(tr)
    dev = resolve_device(device, t1a, t2a, t1b, t2b, f, k, b1)
    fa = _col("flip_angles", flip_angles, dtype, dev)
    if fa.numel() == 0:
        raise ShapeError("flip_angles must hold at least one angle (degrees)")
    cols = [
        _col(n, x, dtype, dev)
        for n, x in (
            ("t1a", t1a),
            ("t2a", t2a),
            ("t1b", t1b),
            ("t2b", t2b),
            ("f", f),
            ("k", k),
            ("b1", b1),
        )
    ]
    try:
        T1a, T2a, T1b, T2b, F, Kx, B1 = torch.broadcast_tensors(*cols)
    except RuntimeError as exc:
        raise ShapeError(
            "t1a, t2a, t1b, t2b, f, k and b1 must broadcast to one length (V,); got lengths "
            f"{[c.numel() for c in cols]}"
        ) from exc
    for name, t in (("t1a", T1a), ("t2a", T2a), ("t1b", T1b), ("t2b", T2b)):
        if (t.detach() <= 0).any():
            raise ParameterError(f"{name} must be > 0 ms")
    k_ab, k_ba = _rates(T1a, T1b, F, Kx)
    V, n_fa = T1a.numel(), fa.numel()
    if n_tr is None:
        t1max = float(torch.maximum(T1a, T1b).detach().max())
        n_tr = max(10, math.ceil(math.log(1 / tol) * t1max / tr))
    n_tr = int(n_tr)
    if n_tr < 1:
        raise ParameterError(f"n_tr must be >= 1, got {n_tr}")
    if spoiling == "ideal":
        K = 1
    elif n_states is None:
        t2max = float(torch.maximum(T2a, T2b).detach().max())
        K = _n_states(t2max, tr, tol, n_tr)
    else:
        K = int(n_states)
    cd = torch.complex64 if dtype == torch.float32 else torch.complex128

    # every (voxel, flip angle) pair is one independent experiment: batch B = V·n_fa
    E2 = exchange_matrix_exp(1 / T2a, 1 / T2b, k_ab, k_ba, tr).to(cd)  # (V, 2, 2)
    E1 = exchange_matrix_exp(1 / T1a, 1 / T1b, k_ab, k_ba, tr)
    E2 = E2[:, None].expand(V, n_fa, 2, 2).reshape(-1, 2, 2)
    E1c = E1[:, None].expand(V, n_fa, 2, 2).reshape(-1, 2, 2).to(cd)
    m0 = torch.stack([1 - F, F], dim=-1)  # (V, 2)
    m0b = m0[:, None].expand(V, n_fa, 2).reshape(-1, 2)
    rec = ((torch.eye(2, dtype=dtype, device=dev) - E1) @ m0[..., None])[..., 0]
    rec = rec[:, None].expand(V, n_fa, 2).reshape(-1, 2).to(cd)  # (B, 2) recovery of Z0
    alpha = (torch.deg2rad(fa)[None, :] * B1[:, None]).reshape(-1)  # (B,)
    ca = torch.cos(alpha)[:, None, None].to(cd)
    sa = torch.sin(alpha)[:, None, None].to(cd)
    c2 = 0.5 * (1 + ca)
    s2 = 0.5 * (1 - ca)

    B = V * n_fa
    Fp = torch.zeros((B, 2, K), dtype=cd, device=dev)
    Fm = torch.zeros((B, 2, K), dtype=cd, device=dev)
    Z = torch.cat([m0b.to(cd)[..., None], torch.zeros((B, 2, K - 1), dtype=cd, device=dev)], dim=-1)
    zero_col = torch.zeros((B, 2, 1), dtype=cd, device=dev)
    phi0 = math.radians(spoil_increment)
    sig = None
    for n in range(n_tr):
        phi = phi0 * n * (n + 1) / 2.0 if spoiling == "rf" else 0.0
        e = complex(math.cos(phi), math.sin(phi))
        # RF rotation (Weigel 2015, same convention as qmrkit.mrf.epg); pools see the same pulse
        nP = c2 * Fp + (e * e) * s2 * Fm - 1j * e * sa * Z
        nM = (e * e).conjugate() * s2 * Fp + c2 * Fm + 1j * e.conjugate() * sa * Z
        nZ = -0.5j * e.conjugate() * sa * Fp + 0.5j * e * sa * Fm + ca * Z
        if n == n_tr - 1:
            sig = 1j * e.conjugate() * nP[:, :, 0]  # (B, 2)
            break
        # relaxation + exchange over TR: a 2×2 pool-mixing per order (torch.bmm on (B,2,K))
        nP = torch.bmm(E2, nP)
        nM = torch.bmm(E2, nM)
        nZ = torch.bmm(E1c, nZ)
        nZ = torch.cat([nZ[:, :, :1] + rec[..., None], nZ[:, :, 1:]], dim=-1)
        if spoiling == "ideal":
            Fp = torch.zeros_like(nP)
            Fm = torch.zeros_like(nM)
            Z = nZ
            continue
        # one order of dephasing: F⁺ moves up, F⁻ moves down, F⁺₀ = conj(F⁻₀)
        Fm = torch.cat([nM[:, :, 1:], zero_col], dim=-1)
        Fp = torch.cat([Fm[:, :, :1].conj(), nP[:, :, : K - 1]], dim=-1)
        Z = nZ
    assert sig is not None
    return sig.reshape(V, n_fa, 2)
