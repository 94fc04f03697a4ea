"""Operator helpers for learned reconstruction (thin adapters over :mod:`qmrkit.ops`)."""

from __future__ import annotations

import torch

from .. import ops
from ..errors import ShapeError


class CoilBatched(ops.LinearOperator):
    """Apply a single-image operator to each of ``n_coils`` coil images.

    Maps ``(n_coils, *op.ishape) -> (n_coils, *op.oshape)`` (operators already broadcast over
    leading batch dimensions; this only gives the composition the exact shapes it checks), so a
    NUFFT plan composes with coil sensitivities: ``CoilBatched(nufft.plan(...), C) @ Sense(maps)``.
    The normal operator uses ``op.N`` (e.g. a Toeplitz embedding).
    """

    def __init__(self, op: ops.LinearOperator, n_coils: int):
        super().__init__((n_coils, *op.ishape), (n_coils, *op.oshape))
        self.op = op
        self.autograd_safe = getattr(op, "autograd_safe", True)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op.forward(x)

    def _adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return self.op.adjoint(y)

    def _normal(self, x: torch.Tensor) -> torch.Tensor:
        return self.op.normal(x)


def noncartesian_sense(
    traj, maps: torch.Tensor, eps: float = 1e-6, normalize: bool = True, **plan_kw
) -> ops.LinearOperator:
    """Non-Cartesian SENSE operator ``NUFFT·Sense``: image ``im`` -> k-space ``(coils, M)``.

    ``traj`` in cycles per pixel ``(M, ndim)``; ``maps`` ``(coils, *im)``; ``eps`` is the NUFFT
    accuracy passed to :func:`qmrkit.nufft.plan` (with ``plan_kw``, e.g. ``dtype``).

    ``normalize=True`` scales the operator by ``1/‖A‖`` (power iteration), so that ``‖AᴴA‖ = 1``
    like a Cartesian SENSE operator with ``Σ|S|² = 1``. Without it a radial ``AᴴA`` has a largest
    eigenvalue of the order of the samples per pixel at the k-space centre, which makes ``λ``
    scale-dependent and the closed-form inversion of reversible training amplify errors by
    ``‖AᴴA‖/λ`` per unroll. Scale ``y`` the same way (``y / ‖A‖``) when data come from the
    unnormalised operator; the scale is stored as ``.scale``.
    """
    from ..nufft import plan

    if maps.ndim < 3:
        raise ShapeError(f"noncartesian_sense: maps must be (coils, *im), got {tuple(maps.shape)}")
    im = tuple(maps.shape[1:])
    nu = plan(traj, im, eps=eps, **plan_kw)
    A = CoilBatched(nu, maps.shape[0]) @ ops.Sense(maps)
    scale = 1.0
    if normalize:
        from ..optim import power_iteration

        lmax = power_iteration(A, n_iter=100, dtype=maps.dtype, device=maps.device)
        scale = 1.0 / lmax**0.5
        A = scale * A
    A.scale = scale
    return A


__all__ = ["CoilBatched", "noncartesian_sense"]
