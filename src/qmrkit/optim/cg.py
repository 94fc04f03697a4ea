"""Conjugate gradients for Hermitian positive (semi)definite systems ``(AᴴA + λI) x = b``."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from .._device import synchronize
from .._progress import get_logger, progress_bar
from ..errors import ParameterError
from ..ops.base import LinearOperator
from ._common import (
    SolverResult,
    as_normal,
    check_ends_in,
    check_max_iter,
    check_nonnegative,
    check_same_shape,
    check_tensor,
    check_tol,
    end_iteration,
    rdot,
)

log = get_logger("optim.cg")


def cg(
    A: LinearOperator | Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    *,
    x0: torch.Tensor | None = None,
    lam: float = 0.0,
    max_iter: int = 100,
    tol: float = 1e-6,
    batch_ndim: int | None = None,
    callback: Callable[[int, torch.Tensor], bool | None] | None = None,
    progress: bool | None = False,
) -> SolverResult:
    """Solve ``(AᴴA + λI) x = b`` by conjugate gradients.

    Parameters
    ----------
    A : LinearOperator or callable
        An operator, whose normal operator ``A.N`` (possibly a fast route such as a Toeplitz
        embedding) is used, or a callable ``M(x)`` that is Hermitian positive semidefinite; the
        system is then ``(M + λI) x = b``.
    b : tensor
        Right-hand side, e.g. ``A.H(y)`` for least squares. For an operator: shape
        ``(*batch, *A.ishape)``.
    x0 : tensor, optional
        Starting point (default zeros), same shape as ``b``.
    lam : float
        Tikhonov weight ``λ >= 0``.
    max_iter : int
        Maximum number of iterations.
    tol : float
        Stop when the relative residual ``‖b − (AᴴA + λI)x‖ / ‖b‖`` (the recursively updated
        residual) is at most ``tol`` for every system; ``0`` runs ``max_iter`` iterations.
    batch_ndim : int, optional
        Number of leading dimensions of ``b`` that index independent systems, each solved with its
        own step sizes and stopping test. Default: for an operator, the dimensions before
        ``A.ishape`` (operators act independently on batch dimensions); for a callable, 0 (the
        whole of ``b`` is one system).
    callback : callable, optional
        ``callback(iteration, x)`` after each iteration (1-based); returning True stops the solve.
    progress : bool or None
        Show a progress bar (None: when stderr is a terminal).

    Returns
    -------
    SolverResult
        ``residual_history`` holds the largest relative residual over the systems after each
        iteration. Autograd is not disabled, so CG can be unrolled inside a differentiable model.

    Raises
    ------
    ShapeError
        ``b`` (or ``x0``) does not fit the operator.
    ParameterError
        ``lam < 0``, ``tol < 0``, ``max_iter < 1``, or ``batch_ndim`` out of range.
    """
    name = "cg"
    max_iter = check_max_iter(max_iter, name)
    tol = check_tol(tol, name)
    lam = check_nonnegative(lam, "lam", name)
    b = check_tensor(b, "b", name)
    normal = as_normal(A, name)
    if isinstance(A, LinearOperator):
        nb = check_ends_in(b, A.ishape, "b", name)
    else:
        nb = 0
    if batch_ndim is not None:
        if not 0 <= int(batch_ndim) < max(b.ndim, 1):
            raise ParameterError(
                f"{name}: batch_ndim must be in [0, {b.ndim - 1}] for b of shape "
                f"{tuple(b.shape)}, got {batch_ndim}"
            )
        nb = int(batch_ndim)
    if x0 is not None:
        check_tensor(x0, "x0", name)
        check_same_shape(x0, b, "x0", "b", name)

    def M(v):
        out = normal(v)
        # one fused pass (out + λ·v) instead of a product and a sum
        return torch.add(out, v, alpha=lam) if lam else out

    t0 = time.perf_counter()
    if x0 is None:
        x = torch.zeros_like(b)
        r = b.clone()
    else:
        x = x0.clone()
        r = b - M(x)
    bnorm = rdot(b, b, nb).sqrt()
    bnorm = torch.where(bnorm > 0, bnorm, torch.ones_like(bnorm))
    p = r.clone()
    rs = rdot(r, r, nb)
    history: list[float] = []
    converged = False
    rel = rs.sqrt() / bnorm
    it = 0
    if float(rel.max()) <= tol:  # already solved (e.g. b = 0 or an exact x0)
        converged = True
    bar = progress_bar(max_iter, desc=name, progress=progress)
    with bar:
        while not converged and it < max_iter:
            it += 1
            active = rel > tol
            Ap = M(p)
            pAp = rdot(p, Ap, nb)
            alpha = torch.where(active & (pAp > 0), rs / torch.where(pAp > 0, pAp, 1), 0)
            # fused multiply-adds: one pass over each vector, no temporary (out of place, so CG
            # stays differentiable when unrolled)
            x = torch.addcmul(x, alpha, p)
            r = torch.addcmul(r, alpha, Ap, value=-1)
            rs_new = rdot(r, r, nb)
            rel = torch.where(active, rs_new.sqrt() / bnorm, rel)
            worst = float(rel.max())
            stop, converged = end_iteration(name, it, x, worst, tol, history, bar, callback)
            if stop:
                break
            beta = torch.where(active & (rs > 0), rs_new / torch.where(rs > 0, rs, 1), 0)
            p = torch.addcmul(r, beta, p)
            rs = torch.where(active, rs_new, rs)
    synchronize(x.device)
    elapsed = time.perf_counter() - t0
    log.debug(
        "cg: %d iterations, residual %.3g, converged=%s, %.3f s",
        it,
        history[-1] if history else 0.0,
        converged,
        elapsed,
    )
    return SolverResult(
        x=x,
        iterations=it,
        residual_history=history,
        converged=converged,
        elapsed_s=elapsed,
        info={"lam": lam, "batch_ndim": nb},
    )
