"""Cartesian sampling masks."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .._device import as_tensor
from .._shapes import broadcast_shapes
from ..errors import DTypeError, ParameterError, ShapeError
from ._util import TensorCache
from .base import LinearOperator


class Mask(LinearOperator):
    """Cartesian sampling: multiply k-space by a 0/1 mask (self-adjoint, ``A.N = A``).

    The output keeps the full grid shape, with zeros where nothing was sampled, so the operator
    composes directly with :class:`FFT` (``Mask(m) @ FFT(shape)``).

    Parameters
    ----------
    mask : tensor or array of bool or 0/1 values
        Sampling pattern. It may be smaller than ``shape`` where it broadcasts, e.g. a line mask
        of shape ``(ny, 1)`` for a ``(ny, nx)`` grid.
    shape : tuple of int, optional
        Trailing shape of the data (default: ``mask.shape``). Leading batch dimensions of the data
        (coils, frames) broadcast.

    Raises
    ------
    ParameterError
        If the mask samples nothing or has values other than 0 and 1.
    ShapeError
        If the mask does not broadcast to ``shape``.
    """

    def __init__(self, mask, shape: Sequence[int] | None = None):
        m = as_tensor(mask, name="mask")
        if m.is_complex():
            raise DTypeError(
                "Mask: the mask must be real (bool or 0/1), got a complex array; "
                "use Diagonal for complex weights"
            )
        if m.dtype != torch.bool:
            if not bool(((m == 0) | (m == 1)).all()):
                raise ParameterError(
                    "Mask: mask values must be 0 or 1 (or bool); for general weights use "
                    "qmrkit.ops.Diagonal"
                )
            m = m != 0
        if shape is None:
            shape = tuple(m.shape)
        shape = tuple(int(s) for s in shape)
        if m.ndim > len(shape):
            raise ShapeError(
                f"Mask: mask of shape {tuple(m.shape)} has more dimensions than the "
                f"data shape {shape}"
            )
        try:
            broadcast_shapes(tuple(m.shape), shape)
        except ValueError as exc:
            raise ShapeError(
                f"Mask: mask of shape {tuple(m.shape)} does not broadcast to the data shape {shape}"
            ) from exc
        if broadcast_shapes(tuple(m.shape), shape) != tuple(shape):
            raise ShapeError(
                f"Mask: mask of shape {tuple(m.shape)} does not broadcast to the data shape {shape}"
            )
        n = int(m.sum())
        if n == 0:
            raise ParameterError(
                "Mask: the mask samples nothing (all values are 0/False); "
                "expected at least one sampled point"
            )
        super().__init__(shape, shape)
        self.mask = m
        self._m = TensorCache(m)
        #: number of sampled points of the (broadcast) grid
        self.n_sampled = n * (_prod(shape) // max(m.numel(), 1))

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self._m.like(x)

    _adjoint = _forward
    _normal = _forward

    @property
    def H(self) -> LinearOperator:  # noqa: N802 - self-adjoint
        return self

    @property
    def acceleration(self) -> float:
        """Undersampling factor: grid points / sampled points."""
        return _prod(self.ishape) / self.n_sampled

    def __repr__(self) -> str:
        return f"Mask(shape={self.ishape}, sampled={self.n_sampled}, R={self.acceleration:.2f})"


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
