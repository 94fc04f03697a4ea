"""Shared pieces of the solvers: the result dataclass, argument checks, inner products."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ConvergenceWarning, ParameterError, ShapeError
from ..ops.base import LinearOperator


@dataclass
class SolverResult:
    """What every solver in :mod:`qmrkit.optim` returns.

    Attributes
    ----------
    x : torch.Tensor
        The solution (same shape, dtype and device as the solver's input).
    iterations : int
        Iterations run.
    residual_history : list of float
        The solver's stopping quantity after each iteration (its definition is in each solver's
        docstring: a relative residual or relative change); ``converged`` means its last value is
        at most ``tol``.
    converged : bool
        True when the stopping criterion was met before ``max_iter``.
    elapsed_s : float
        Wall-clock time of the solve in seconds (queued GPU work included).
    objective_history : list of float
        Objective values per iteration, when the solver was given an ``objective``.
    info : dict
        Solver-specific extras (step sizes, final data residual, dual variable, ...).
    """

    x: torch.Tensor
    iterations: int
    residual_history: list[float]
    converged: bool
    elapsed_s: float
    objective_history: list[float] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        last = f"{self.residual_history[-1]:.3g}" if self.residual_history else "n/a"
        return (
            f"{type(self).__name__}(x={tuple(self.x.shape)} {self.x.dtype}, "
            f"iterations={self.iterations}, converged={self.converged}, "
            f"residual={last}, elapsed_s={self.elapsed_s:.3g})"
        )


def check_max_iter(max_iter: int, name: str) -> int:
    if isinstance(max_iter, bool) or int(max_iter) != max_iter or max_iter < 1:
        raise ParameterError(f"{name}: max_iter must be a positive integer, got {max_iter!r}")
    return int(max_iter)


def check_tol(tol: float, name: str) -> float:
    """``tol >= 0`` and finite; ``tol = 0`` runs all ``max_iter`` iterations."""
    try:
        t = float(tol)
    except (TypeError, ValueError):
        raise ParameterError(f"{name}: tol must be a number, got {tol!r}") from None
    if not math.isfinite(t) or t < 0:
        raise ParameterError(
            f"{name}: tol must be a finite number >= 0 (0 runs all iterations), got {tol!r}"
        )
    return t


def check_positive(value: float, what: str, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ParameterError(f"{name}: {what} must be a positive number, got {value!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise ParameterError(f"{name}: {what} must be a positive finite number, got {value!r}")
    return v


def check_nonnegative(value: float, what: str, name: str) -> float:
    if isinstance(value, complex) or (isinstance(value, torch.Tensor) and value.is_complex()):
        raise ParameterError(f"{name}: {what} must be a real number >= 0, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ParameterError(f"{name}: {what} must be a number >= 0, got {value!r}") from None
    if not math.isfinite(v) or v < 0:
        raise ParameterError(f"{name}: {what} must be a finite number >= 0, got {value!r}")
    return v


def check_tensor(t: Any, what: str, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ShapeError(f"{name}: {what} must be a torch.Tensor, got {type(t).__name__}")
    return t


def check_same_shape(a: torch.Tensor, b: torch.Tensor, what_a: str, what_b: str, name: str) -> None:
    if a.shape != b.shape:
        raise ShapeError(
            f"{name}: {what_a} has shape {tuple(a.shape)} but {what_b} has shape "
            f"{tuple(b.shape)}; they must match"
        )


def check_ends_in(t: torch.Tensor, shape: Sequence[int], what: str, name: str) -> int:
    """Check ``t`` is ``(*batch, *shape)``; return the number of batch dimensions."""
    n = len(shape)
    if t.ndim < n or tuple(t.shape[t.ndim - n :]) != tuple(shape):
        raise ShapeError(
            f"{name}: {what} must have shape (*batch, {', '.join(map(str, shape))})"
            f" for this operator, got {tuple(t.shape)}"
        )
    return t.ndim - n


def _real_view(t: torch.Tensor) -> torch.Tensor:
    """Complex ``t`` as a real tensor with a trailing (re, im) axis (a view, no copy)."""
    return torch.view_as_real(t.resolve_conj())


def abs2(t: torch.Tensor) -> torch.Tensor:
    """``|t|²`` elementwise as a real tensor.

    For complex tensors this works on the (re, im) view: on CPU it is many times faster than
    ``t.abs()`` (which goes through ``hypot``) and than ``torch.linalg.vector_norm``.
    """
    if t.is_complex():
        return _real_view(t).pow(2).sum(-1)
    return t * t


def rdot(a: torch.Tensor, b: torch.Tensor, batch_ndim: int = 0) -> torch.Tensor:
    """Real part of ⟨a, b⟩ = Σ conj(a)·b over all but the first ``batch_ndim`` dims (kept).

    Returns a real tensor of shape ``(*batch, 1, ..., 1)`` (``a.ndim`` dimensions), so it
    broadcasts against ``a``.
    """
    if a.is_complex() or b.is_complex():
        dt = torch.promote_types(a.dtype, b.dtype)
        ar, br = _real_view(a.to(dt)), _real_view(b.to(dt))
        if batch_ndim == 0 and a.shape == b.shape:
            # one fused pass (BLAS dot) instead of a product tensor and its sum: half the time
            # of the per-iteration inner products of CG on large 3D images
            return torch.dot(ar.reshape(-1), br.reshape(-1)).reshape((1,) * a.ndim)
        prod = ar * br  # re·re and im·im: their sum is Re(conj(a)·b)
        dims = tuple(range(batch_ndim, a.ndim + 1))
        return prod.sum(dim=dims, keepdim=True).squeeze(-1)
    prod = a * b
    dims = tuple(range(batch_ndim, a.ndim))
    if not dims:
        return prod
    return prod.sum(dim=dims, keepdim=True)


def norm(a: torch.Tensor) -> float:
    """Euclidean norm of the whole tensor (fast for complex; see :func:`abs2`)."""
    return float(torch.linalg.vector_norm(_real_view(a) if a.is_complex() else a))


def as_normal(a: LinearOperator | Callable[[torch.Tensor], torch.Tensor], name: str):
    if isinstance(a, LinearOperator):
        return a.normal
    if callable(a):
        return a
    raise ParameterError(f"{name}: expected a LinearOperator or a callable, got {type(a).__name__}")


def call_back(callback, *args) -> bool:
    """Run a user callback; a True return value asks the solver to stop."""
    if callback is None:
        return False
    return bool(callback(*args))


def warn_nonfinite(name: str, k: int, stacklevel: int = 3) -> None:
    warnings.warn(
        f"{name}: non-finite values at iteration {k}; stopping (check step sizes and inputs)",
        ConvergenceWarning,
        stacklevel=stacklevel,
    )


def end_iteration(
    name: str,
    it: int,
    x: torch.Tensor,
    worst: float,
    tol: float,
    history: list,
    bar: Any,
    callback: Any,
) -> tuple[bool, bool]:
    """Shared end of a Krylov iteration: record the residual, stop on non-finite values, run the
    callback and test convergence. Returns ``(stop, converged)``."""
    history.append(worst)
    bar.update()
    if not math.isfinite(worst):
        warn_nonfinite(name, it, stacklevel=4)
        return True, False
    stop = call_back(callback, it, x)
    if worst <= tol:
        return True, True
    return stop, False
