"""Regularised linear least squares ``min ‖Ax − y‖² + λ‖x‖²`` by CGLS."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from .._device import synchronize
from .._progress import get_logger, progress_bar
from ..errors import ParameterError, ShapeError
from ..ops.base import LinearOperator
from ._common import (
    SolverResult,
    abs2,
    check_ends_in,
    check_max_iter,
    check_nonnegative,
    check_same_shape,
    check_tensor,
    check_tol,
    end_iteration,
    rdot,
)

log = get_logger("optim.lsqr")


def lsqr(
    A: LinearOperator,
    y: torch.Tensor,
    *,
    x0: torch.Tensor | None = None,
    lam: float = 0.0,
    max_iter: int = 100,
    tol: float = 1e-6,
    callback: Callable[[int, torch.Tensor], bool | None] | None = None,
    progress: bool | None = False,
) -> SolverResult:
    """Solve ``min_x ‖A x − y‖² + λ‖x‖²`` (LSQR-style least squares).

    The algorithm is **CGLS** (conjugate gradients on the normal equations
    ``(AᴴA + λI) x = Aᴴ y`` without forming ``AᴴA``): it applies ``A`` and ``Aᴴ`` once per
    iteration and updates the data residual ``y − Ax`` directly, which is numerically better than
    running :func:`cg` on ``A.N``. In exact arithmetic it equals Paige–Saunders LSQR; LSQR is more
    robust for very ill-conditioned problems in single precision. Use :func:`cg` instead when
    ``A`` has a fast normal operator (e.g. Toeplitz NUFFT).

    Parameters
    ----------
    A : LinearOperator
    y : tensor
        Data, shape ``(*batch, *A.oshape)``. Batch dimensions are independent problems, each with
        its own step sizes and stopping test.
    x0 : tensor, optional
        Start (default zeros), shape ``(*batch, *A.ishape)``.
    lam : float
        Tikhonov weight ``λ >= 0``.
    max_iter, tol
        Stop when the relative normal-equation residual
        ``‖Aᴴ(y − Ax) − λx‖ / ‖Aᴴ y‖`` is at most ``tol`` for every problem (0: run all
        iterations).
    callback : callable, optional
        ``callback(iteration, x)``; returning True stops.

    Returns
    -------
    SolverResult
        ``info["data_residual"]``: final ``‖y − Ax‖`` (largest over the batch).
    """
    name = "lsqr"
    max_iter = check_max_iter(max_iter, name)
    tol = check_tol(tol, name)
    lam = check_nonnegative(lam, "lam", name)
    if not isinstance(A, LinearOperator):
        raise ParameterError(
            f"{name}: A must be a LinearOperator, got {type(A).__name__}; "
            "for a callable normal operator use cg"
        )
    y = check_tensor(y, "y", name)
    nb = check_ends_in(y, A.oshape, "y", name)
    batch = tuple(y.shape[:nb])
    if x0 is not None:
        check_tensor(x0, "x0", name)
        check_ends_in(x0, A.ishape, "x0", name)
        if tuple(x0.shape[: x0.ndim - len(A.ishape)]) != batch:
            raise ShapeError(
                f"{name}: x0 has batch shape {tuple(x0.shape[: x0.ndim - len(A.ishape)])} but y "
                f"has batch shape {batch}; they must match"
            )

    t0 = time.perf_counter()
    aty = A.H(y)
    if x0 is None:
        x = torch.zeros_like(aty)
        r = y.clone()
        s = aty.clone()
    else:
        x = x0.to(aty.dtype).clone()
        check_same_shape(x, aty, "x0", "Aᴴy", name)
        r = y - A(x)
        s = A.H(r) - lam * x if lam else A.H(r)
    snorm0 = rdot(aty, aty, nb).sqrt()
    snorm0 = torch.where(snorm0 > 0, snorm0, torch.ones_like(snorm0))
    p = s.clone()
    gamma = rdot(s, s, nb)
    rel = gamma.sqrt() / snorm0
    history: list[float] = []
    converged = float(rel.max()) <= tol
    it = 0
    bar = progress_bar(max_iter, desc=name, progress=progress)
    with bar:
        while not converged and it < max_iter:
            it += 1
            active = rel > tol
            q = A(p)
            delta = rdot(q, q, nb).reshape(gamma.shape) + (lam * rdot(p, p, nb) if lam else 0)
            alpha = torch.where(active & (delta > 0), gamma / torch.where(delta > 0, delta, 1), 0)
            x = x + alpha * p
            r = r - _expand(alpha, q, nb) * q
            s = A.H(r)
            if lam:
                s = s - lam * x
            gamma_new = rdot(s, s, nb)
            rel = torch.where(active, gamma_new.sqrt() / snorm0, rel)
            worst = float(rel.max())
            stop, converged = end_iteration(name, it, x, worst, tol, history, bar, callback)
            if stop:
                break
            beta = torch.where(
                active & (gamma > 0), gamma_new / torch.where(gamma > 0, gamma, 1), 0
            )
            p = s + beta * p
            gamma = torch.where(active, gamma_new, gamma)
    synchronize(x.device)
    elapsed = time.perf_counter() - t0
    data_res = float(abs2(r.reshape(*batch, -1)).sum(-1).max().sqrt()) if r.numel() else 0.0
    log.debug(
        "lsqr (CGLS): %d iterations, residual %.3g, converged=%s",
        it,
        history[-1] if history else 0.0,
        converged,
    )
    return SolverResult(
        x=x,
        iterations=it,
        residual_history=history,
        converged=converged,
        elapsed_s=elapsed,
        info={"lam": lam, "data_residual": data_res, "algorithm": "CGLS"},
    )


def _expand(alpha: torch.Tensor, like: torch.Tensor, nb: int) -> torch.Tensor:
    """Reshape a per-problem scalar (kept dims of the input side) to broadcast over ``like``."""
    return alpha.reshape(*alpha.shape[:nb], *([1] * (like.ndim - nb)))
