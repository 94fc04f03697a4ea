"""Lanczos estimate of the largest eigenvalue of AᴴA (the squared operator norm ‖A‖²).

For a Hermitian positive semidefinite ``M = AᴴA`` the largest Ritz value of the k-step Krylov
space ``span{v, Mv, …, M^{k-1}v}`` is the best estimate of ``λ_max(M)`` that k applications of
``M`` can give from that start vector; power iteration's Rayleigh quotient lives in the same
space but uses only its last vector. Its error falls like ``T_{k}(1 + 2γ)^{-2}`` (Chebyshev
polynomial, ``γ`` the relative gap) instead of power iteration's ``(λ₂/λ₁)^{2k}``
(Kaniel–Paige–Saad), so a handful of steps replaces tens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from ..errors import ParameterError
from ..ops.base import LinearOperator
from ._common import check_max_iter, check_tol, norm
from .power import normal_and_start


def _vdot(a: torch.Tensor, b: torch.Tensor) -> complex:
    """``⟨a, b⟩ = Σ conj(a)·b`` over all entries, as a Python number."""
    return torch.vdot(a.reshape(-1), b.reshape(-1)).item()


def lanczos_max_eig(
    op: LinearOperator | Callable[[torch.Tensor], torch.Tensor],
    ishape: Sequence[int] | None = None,
    n_iter: int = 20,
    seed: int | torch.Generator = 0,
    *,
    tol: float = 1e-5,
    min_iter: int = 4,
    dtype: torch.dtype = torch.complex64,
    device=None,
    return_info: bool = False,
) -> float | tuple[float, dict]:
    """Estimate the largest eigenvalue of ``AᴴA`` (= ``‖A‖₂²``) by the Lanczos method.

    Runs Lanczos with full reorthogonalisation (``k`` stored vectors of ``ishape``) on the
    normal operator from a seeded random start, and returns the largest eigenvalue ``θ`` of the
    ``k×k`` tridiagonal matrix (float64). ``θ`` is a Rayleigh quotient of the Krylov space, so it
    never exceeds ``λ_max`` (up to rounding of the applications).

    Parameters
    ----------
    op : LinearOperator or callable
        An operator (its normal operator ``op.normal`` is used) or a Hermitian positive
        semidefinite callable ``M(x)``.
    ishape : tuple of int, optional
        Shape of the vectors; defaults to ``op.ishape``, required for a callable. Batch
        dimensions included here give the largest eigenvalue over the batch.
    n_iter : int
        Maximum number of Lanczos steps = applications of ``M`` (default 20).
    seed : int or torch.Generator
        Seed of the random start vector (the same seed, operator and device give the same value).
    tol : float
        Relative stopping tolerance (default 1e-5): stop once a step raises the Ritz value ``θ``
        by at most ``tol·θ`` (Ritz values of a PSD operator rise monotonically towards
        ``λ_max``), or once its error bound is at most ``tol·θ`` — with the residual
        ``r = β_k·|s_k|`` of the top Ritz pair and the gap ``δ`` to the next Ritz value,
        ``λ_max − θ ≲ min(r, r²/δ)`` (``r`` rigorous, ``r²/δ`` the gap-based estimate). Where
        the top eigenvalues crowd, convergence is slow and the error left can be a few times
        ``tol``. ``tol = 0`` runs ``n_iter`` steps.
    min_iter : int
        Steps always run before the bound is trusted (default 4: with fewer, the second Ritz
        value is a poor stand-in for the spectral gap).
    dtype, device
        Of the start vector (default complex64, on CPU). Real dtypes are allowed for real
        operators.
    return_info : bool
        Also return ``{"iterations", "bound", "ritz_history"}``.

    Returns
    -------
    float
        The estimate of ``λ_max(AᴴA)`` (and the info dict with ``return_info``).
    """
    n_iter = check_max_iter(n_iter, "lanczos_max_eig")
    tol = check_tol(tol, "lanczos_max_eig")
    if isinstance(min_iter, bool) or int(min_iter) != min_iter or min_iter < 1:
        raise ParameterError(
            f"lanczos_max_eig: min_iter must be a positive integer, got {min_iter!r}"
        )
    normal, v = normal_and_start(op, ishape, seed, dtype, device, "lanczos_max_eig")
    shape, dev, v = v.shape, v.device, v.reshape(-1)
    # the Krylov basis, one row per step; room for 8 rows first (most estimates stop by then),
    # doubled when needed, so that n_iter = 20 does not reserve 20 images (on a GPU it would)
    basis = torch.empty((min(n_iter, 8), v.numel()), dtype=v.dtype, device=dev)
    alpha: list[float] = []
    beta: list[float] = []
    history: list[float] = []
    theta, bound, k = 0.0, float("inf"), 0
    with torch.no_grad():
        for k in range(1, n_iter + 1):
            if k > basis.shape[0]:
                grown = torch.empty(
                    (min(2 * basis.shape[0], n_iter), v.numel()), dtype=v.dtype, device=dev
                )
                grown[: basis.shape[0]] = basis
                basis = grown
            basis[k - 1] = v
            w = normal(v.reshape(shape)).reshape(-1)
            a = float(torch.vdot(v, w).real)  # real for Hermitian M (rounding aside)
            alpha.append(a)
            w = w - a * v
            if beta:
                w = w - beta[-1] * basis[k - 2]
            # full reorthogonalisation against the whole basis, as two matrix–vector products
            # (a few passes over k stored vectors; keeps θ free of the ghost copies that
            # single-precision Lanczos grows once a Ritz value converges)
            q = basis[:k]
            w = w - q.T @ (q @ w.conj()).conj()  # Qᵀ·(Q̄ w): no conjugated copy of Q
            b = norm(w)
            t = np.diag(alpha) + np.diag(beta, 1) + np.diag(beta, -1)
            ev, vec = np.linalg.eigh(t)
            prev, theta = theta, float(ev[-1])
            history.append(theta)
            # residual of the top Ritz pair: ‖M y − θ y‖ = β_k·|last entry of its eigenvector|;
            # λ_max − θ ≤ r always, and ≲ r²/δ with δ the gap to the rest of the spectrum
            r = b * abs(float(vec[-1, -1]))
            gap = float(ev[-1] - ev[-2]) if k > 1 else 0.0
            bound = min(r, r * r / gap) if gap > 0 else r
            if b <= 1e-12 * max(abs(theta), 1e-300):
                bound = 0.0  # invariant subspace found: θ is an exact eigenvalue
                break
            # Ritz values of a PSD operator rise monotonically towards λ_max (interlacing): stop
            # when the last step moved θ by at most tol, or when the error bound is below it
            if tol > 0 and k >= min_iter and min(theta - prev, bound) <= tol * abs(theta):
                break
            beta.append(b)
            v = w / b
    theta = max(theta, 0.0)  # M is PSD; a tiny negative value is rounding of M = 0
    if return_info:
        return theta, {"iterations": k, "bound": bound, "ritz_history": history}
    return theta
