"""FISTA: accelerated proximal gradient for ``min f(x) + g(x)`` with smooth ``f``."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch

from .._device import synchronize
from .._progress import get_logger, progress_bar
from ..errors import ParameterError
from ..ops.base import LinearOperator
from ._common import (
    SolverResult,
    call_back,
    check_ends_in,
    check_max_iter,
    check_positive,
    check_same_shape,
    check_tensor,
    check_tol,
    norm,
    rdot,
    warn_nonfinite,
)
from .power import power_iteration

log = get_logger("optim.fista")

#: Power iteration approaches ‖A‖² from below; steps use 1 / (SAFETY · estimate).
STEP_SAFETY = 1.05


def fista(
    problem: tuple[LinearOperator, torch.Tensor] | Callable[[torch.Tensor], torch.Tensor],
    prox_g: Callable[[torch.Tensor, float], torch.Tensor] | None = None,
    *,
    x0: torch.Tensor | None = None,
    step: float | None = None,
    max_iter: int = 100,
    tol: float = 1e-6,
    restart: bool = True,
    objective: Callable[[torch.Tensor], float] | None = None,
    callback: Callable[[int, torch.Tensor], bool | None] | None = None,
    power_iter: int = 30,
    seed: int = 0,
    progress: bool | None = False,
) -> SolverResult:
    """Minimise ``f(x) + g(x)`` by FISTA (Beck–Teboulle) with optional adaptive restart.

    Parameters
    ----------
    problem : (A, y) or callable
        Either a pair ``(A, y)`` of a :class:`~qmrkit.ops.LinearOperator` and data, for
        ``f(x) = ½‖A x − y‖²`` (gradient ``AᴴA x − Aᴴ y``, using ``A.N``), or a callable
        ``grad_f(x)`` returning the gradient of a smooth ``f`` (then ``x0`` and ``step`` are
        required).
    prox_g : callable, optional
        ``prox_g(v, t)`` (see :mod:`qmrkit.optim.prox`); None means ``g = 0`` (accelerated
        gradient descent).
    x0 : tensor, optional
        Start; default zeros of the shape of ``Aᴴy``.
    step : float, optional
        Step ``t <= 1/L`` with ``L`` the Lipschitz constant of ``∇f``. Default for ``(A, y)``:
        ``1 / (1.05 · λ_max(AᴴA))`` with ``λ_max`` from :func:`power_iteration`.
    max_iter, tol
        Stop when the relative change ``‖x_{k+1} − x_k‖ / ‖x_{k+1}‖ <= tol`` (0: run all).
    restart : bool
        Gradient-based adaptive restart (O'Donoghue & Candès 2015): reset the momentum when it
        points uphill, ``Re⟨z_k − x_{k+1}, x_{k+1} − x_k⟩ > 0``. Removes FISTA's ripples on
        strongly convex problems at no cost.
    objective : callable, optional
        ``objective(x) -> float`` recorded in ``objective_history`` each iteration.
    callback : callable, optional
        ``callback(iteration, x)``; returning True stops.
    power_iter, seed
        Iterations and seed of the power iteration for the default step.

    Returns
    -------
    SolverResult
        ``info``: ``step``, ``restarts`` (count).

    Notes
    -----
    Batch dimensions are solved together (one step size, one momentum sequence, one stopping
    test over the whole tensor); that is exact for problems separable over the batch but may
    run more iterations than solving each separately.
    """
    name = "fista"
    max_iter = check_max_iter(max_iter, name)
    tol = check_tol(tol, name)
    if step is not None:
        step = check_positive(step, "step", name)
    if prox_g is not None and not callable(prox_g):
        raise ParameterError(
            f"{name}: prox_g must be callable prox(v, t), got {type(prox_g).__name__}"
        )

    t_start = time.perf_counter()
    if isinstance(problem, tuple):
        if len(problem) != 2 or not isinstance(problem[0], LinearOperator):
            raise ParameterError(
                f"{name}: problem must be (LinearOperator, y) or a gradient callable"
            )
        A, y = problem
        check_tensor(y, "y", name)
        check_ends_in(y, A.oshape, "y", name)
        aty = A.H(y)

        def grad(x):
            return A.N(x) - aty

        if step is None:
            L = power_iteration(
                A, n_iter=power_iter, seed=seed, dtype=_cplx(aty.dtype), device=aty.device
            )
            if L <= 0:
                raise ParameterError(
                    f"{name}: the operator is zero (‖A‖² estimate {L}); nothing to solve"
                )
            step = 1.0 / (STEP_SAFETY * L)
        if x0 is None:
            x0 = torch.zeros_like(aty)
        else:
            check_tensor(x0, "x0", name)
            check_same_shape(x0, aty, "x0", "Aᴴy", name)
    elif callable(problem):
        grad = problem
        if x0 is None:
            raise ParameterError(f"{name}: x0 is required when problem is a gradient callable")
        if step is None:
            raise ParameterError(
                f"{name}: step is required when problem is a gradient callable "
                "(step <= 1/L, L the Lipschitz constant of the gradient)"
            )
        check_tensor(x0, "x0", name)
    else:
        raise ParameterError(
            f"{name}: problem must be (LinearOperator, y) or a gradient callable, "
            f"got {type(problem).__name__}"
        )

    prox = prox_g if prox_g is not None else (lambda v, t: v)
    x = x0.clone()
    z = x
    t = 1.0
    history: list[float] = []
    objectives: list[float] = []
    converged = False
    restarts = 0
    it = 0
    bar = progress_bar(max_iter, desc=name, progress=progress)
    with bar:
        while it < max_iter:
            it += 1
            x_new = prox(z - step * grad(z), step)
            dx = x_new - x
            rel = norm(dx) / max(norm(x_new), torch.finfo(_real(x_new.dtype)).tiny)
            history.append(rel)
            if objective is not None:
                objectives.append(float(objective(x_new)))
            bar.update()
            if not math.isfinite(rel):
                warn_nonfinite(name, it)
                x = x_new
                break
            if restart and float(rdot(z - x_new, dx)) > 0:
                t = 1.0
                restarts += 1
            t_new = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t * t))
            z = x_new + ((t - 1.0) / t_new) * dx
            x, t = x_new, t_new
            stop = call_back(callback, it, x)
            if rel <= tol:
                converged = True
                break
            if stop:
                break
    synchronize(x.device)
    elapsed = time.perf_counter() - t_start
    log.debug("fista: %d iterations, change %.3g, restarts %d", it, history[-1], restarts)
    return SolverResult(
        x=x,
        iterations=it,
        residual_history=history,
        converged=converged,
        elapsed_s=elapsed,
        objective_history=objectives,
        info={"step": step, "restarts": restarts},
    )


def _cplx(dtype: torch.dtype) -> torch.dtype:
    if dtype.is_complex:
        return dtype
    return torch.complex128 if dtype == torch.float64 else torch.complex64


def _real(dtype: torch.dtype) -> torch.dtype:
    return {torch.complex64: torch.float32, torch.complex128: torch.float64}.get(dtype, dtype)
