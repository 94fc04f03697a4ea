"""Power iteration: the largest eigenvalue of AᴴA (the squared operator norm ‖A‖²)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .._device import resolve_device
from ..errors import ParameterError
from ..ops.base import LinearOperator
from ._common import check_max_iter, check_tol, norm, rdot

_REAL = {torch.complex64: torch.float32, torch.complex128: torch.float64}


def normal_and_start(
    op: LinearOperator | Callable[[torch.Tensor], torch.Tensor],
    ishape: Sequence[int] | None,
    seed: int | torch.Generator,
    dtype: torch.dtype,
    device,
    who: str,
) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]:
    """The normal operator ``AᴴA`` of ``op`` (or ``op`` itself when it is a callable) and a seeded
    random unit start vector of its input shape on ``device``: what every eigenvalue estimator
    (:func:`power_iteration`, :func:`~qmrkit.optim.lanczos_max_eig`) starts from. The vector is
    drawn on the CPU, so a seed gives the same start on every device."""
    if isinstance(op, LinearOperator):
        normal = op.normal
        shape = tuple(op.ishape) if ishape is None else tuple(ishape)
    elif callable(op):
        if ishape is None:
            raise ParameterError(f"{who}: ishape is required when op is a callable")
        normal = op
        shape = tuple(ishape)
    else:
        raise ParameterError(
            f"{who}: expected a LinearOperator or a callable, got {type(op).__name__}"
        )
    gen = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(int(seed))
    real = _REAL.get(dtype, dtype)
    x = torch.randn(shape, generator=gen, dtype=real)
    if dtype.is_complex:
        x = torch.complex(x, torch.randn(shape, generator=gen, dtype=real))
    return normal, (x / norm(x)).to(resolve_device(device))


def power_iteration(
    op: LinearOperator | Callable[[torch.Tensor], torch.Tensor],
    ishape: Sequence[int] | None = None,
    n_iter: int = 30,
    seed: int | torch.Generator = 0,
    *,
    tol: float = 1e-6,
    dtype: torch.dtype = torch.complex64,
    device=None,
) -> float:
    """Estimate the largest eigenvalue of ``AᴴA`` (= ``‖A‖₂²``) by power iteration.

    Parameters
    ----------
    op : LinearOperator or callable
        An operator (its normal operator ``op.N`` is iterated) or a Hermitian positive
        semidefinite callable ``M(x)``.
    ishape : tuple of int, optional
        Shape of the vectors; defaults to ``op.ishape``, required for a callable. Include batch
        dimensions here to get the largest eigenvalue over a batch.
    n_iter : int
        Maximum number of iterations (default 30).
    seed : int or torch.Generator
        Seed of the random start vector (results are reproducible for a seed and device).
    tol : float
        Stop early when the estimate changes by less than ``tol`` relative (default 1e-6).
    dtype, device
        Of the start vector (default complex64, on CPU). Real dtypes are allowed for real
        operators.

    Returns
    -------
    float
        The Rayleigh-quotient estimate of ``λ_max(AᴴA)``. It approaches the true value from below,
        so solvers that derive step sizes from it apply a small safety factor.
    """
    n_iter = check_max_iter(n_iter, "power_iteration")
    tol = check_tol(tol, "power_iteration")
    normal, x = normal_and_start(op, ishape, seed, dtype, device, "power_iteration")
    est = 0.0
    with torch.no_grad():
        for _ in range(n_iter):
            y = normal(x)
            new = float(rdot(x, y))
            ny = norm(y)
            if ny == 0.0:
                return 0.0
            x = y / ny
            if abs(new - est) <= tol * abs(new):
                est = new
                break
            est = new
    return est
