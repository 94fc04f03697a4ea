"""Finite differences (discrete gradient) for total variation."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import ParameterError, ShapeError
from ._util import normalise_axes
from .base import LinearOperator

_BOUNDARIES = ("periodic", "neumann")


class FiniteDifference(LinearOperator):
    """Forward differences along chosen axes, stacked on a new axis: ``(*b, *s) -> (*b, k, *s)``.

    ``y[j] = (x[i + e_j] − x[i]) / h_j`` for each of the ``k = len(axes)`` axes. The adjoint is the
    negative divergence (backward differences), exact for both boundary conditions, so
    ``‖A x‖_{2,1}`` over the new axis is isotropic total variation.

    Parameters
    ----------
    shape : tuple of int
        Trailing shape of the input, e.g. ``(ny, nx)`` or ``(nt, nz, ny, nx)``.
    axes : sequence of int, optional
        Axes of ``shape`` to difference (default: all). Spatial TV of a time series
        ``(nt, ny, nx)`` uses ``axes=(-2, -1)``; temporal TV ``axes=(0,)``.
    voxel_size : float or sequence of float, optional
        Grid spacing ``h_j`` per differenced axis (any length unit, e.g. mm; frames for time).
        Default 1 for every axis.
    boundary : {"periodic", "neumann"}
        ``"periodic"`` wraps around (``x[n] = x[0]``); ``"neumann"`` sets the difference across the
        last boundary to zero (``x[n] = x[n-1]``), the usual choice for images.
    """

    def __init__(
        self,
        shape: Sequence[int],
        axes: Sequence[int] | int | None = None,
        voxel_size: float | Sequence[float] | None = None,
        boundary: str = "periodic",
    ):
        shape = tuple(int(s) for s in shape)
        if not shape:
            raise ShapeError("FiniteDifference: shape must have at least one dimension")
        self.axes = normalise_axes(axes, len(shape), "FiniteDifference")
        if not self.axes:
            raise ParameterError("FiniteDifference: axes is empty")
        if boundary not in _BOUNDARIES:
            raise ParameterError(
                f"FiniteDifference: boundary must be one of {_BOUNDARIES}, got {boundary!r}"
            )
        if voxel_size is None:
            h = [1.0] * len(self.axes)
        elif isinstance(voxel_size, (int, float)):
            h = [float(voxel_size)] * len(self.axes)
        else:
            h = [float(v) for v in voxel_size]
            if len(h) != len(self.axes):
                raise ShapeError(
                    f"FiniteDifference: voxel_size has {len(h)} entries but "
                    f"{len(self.axes)} axes are differenced"
                )
        if any(not (v > 0) or v == float("inf") for v in h):
            raise ParameterError(
                f"FiniteDifference: voxel_size must be positive and finite, got {tuple(h)}"
            )
        super().__init__(shape, (len(self.axes), *shape))
        self.boundary = boundary
        self.voxel_size = tuple(h)

    def _diff(self, x: torch.Tensor, axis: int) -> torch.Tensor:
        if self.boundary == "periodic":
            return torch.roll(x, -1, dims=axis) - x
        d = torch.diff(x, dim=axis)
        return torch.cat([d, torch.zeros_like(x.narrow(axis, 0, 1))], dim=axis)

    def _diff_adjoint(self, y: torch.Tensor, axis: int) -> torch.Tensor:
        if self.boundary == "periodic":
            return torch.roll(y, 1, dims=axis) - y
        n = y.shape[axis]
        if n == 1:
            return torch.zeros_like(y)
        # forward rows 0..n-2 are x[i+1]-x[i]; row n-1 is zero, so it does not enter
        inner = y.narrow(axis, 0, n - 1)
        zero = torch.zeros_like(y.narrow(axis, 0, 1))
        return torch.cat([zero, inner], dim=axis) - torch.cat([inner, zero], dim=axis)

    def _forward(self, x):
        k = len(self.ishape)
        # axes are negative relative to the input; the stacked output gets the new axis at -k-1
        parts = [
            self._diff(x, a) / h if h != 1.0 else self._diff(x, a)
            for a, h in zip(self.axes, self.voxel_size, strict=True)
        ]
        return torch.stack(parts, dim=-k - 1)

    def _adjoint(self, y):
        k = len(self.ishape)
        out = None
        for j, (a, h) in enumerate(zip(self.axes, self.voxel_size, strict=True)):
            yj = y.select(-k - 1, j)
            t = self._diff_adjoint(yj, a)
            if h != 1.0:
                t = t / h
            out = t if out is None else out + t
        return out

    def __repr__(self) -> str:
        return (
            f"FiniteDifference(shape={self.ishape}, axes={self.axes}, boundary={self.boundary!r})"
        )
