"""Elementwise and small structural operators: Diagonal, Matrix, Reshape."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .._device import as_tensor
from .._shapes import broadcast_shapes
from ..errors import ShapeError
from ._util import TensorCache
from .base import LinearOperator


class Diagonal(LinearOperator):
    """Elementwise multiplication ``y = w · x``; the adjoint multiplies by ``conj(w)``.

    Parameters
    ----------
    weights : tensor or array (real or complex)
        The diagonal. It may be smaller than ``shape`` where it broadcasts.
    shape : tuple of int, optional
        Trailing shape of the data (default ``weights.shape``); leading batch dimensions broadcast.
    """

    def __init__(self, weights, shape: Sequence[int] | None = None):
        w = as_tensor(weights, name="weights")
        shape = tuple(w.shape) if shape is None else tuple(int(s) for s in shape)
        try:
            ok = broadcast_shapes(tuple(w.shape), shape) == shape
        except ValueError:
            ok = False
        if not ok:
            raise ShapeError(
                f"Diagonal: weights of shape {tuple(w.shape)} do not broadcast to "
                f"the data shape {shape}"
            )
        super().__init__(shape, shape)
        self.weights = w
        self._w = TensorCache(w)
        with torch.no_grad():
            self._w2 = TensorCache(w.real**2 + w.imag**2 if w.is_complex() else w * w)

    def _forward(self, x):
        return x * self._w.like(x)

    def _adjoint(self, y):
        w = self._w.like(y)
        return y * (w.conj() if w.is_complex() else w)

    def _normal(self, x):
        if self.weights.requires_grad:  # keep the graph through the weights
            return self._adjoint(self._forward(x))
        return x * self._w2.like(x)


class Matrix(LinearOperator):
    """A dense matrix acting on the last axis: ``(*batch, n) -> (*batch, m)``.

    Mostly for tests and small problems (e.g. wrapping an explicit system matrix to compare a
    solver against :func:`numpy.linalg.lstsq`).
    """

    def __init__(self, matrix):
        a = as_tensor(matrix, name="matrix")
        if a.ndim != 2:
            raise ShapeError(f"Matrix: expected a 2-D matrix, got shape {tuple(a.shape)}")
        super().__init__((a.shape[1],), (a.shape[0],))
        self.matrix = a
        self._a = TensorCache(a)

    def _operands(self, t):
        a = self._a.like(t)
        dt = torch.promote_types(t.dtype, a.dtype)
        return t.to(dt), a.to(dt)

    def _forward(self, x):
        x, a = self._operands(x)
        return x @ a.transpose(0, 1)

    def _adjoint(self, y):
        y, a = self._operands(y)
        return y @ a.conj()


class Reshape(LinearOperator):
    """Reshape the trailing dimensions: ``(*batch, *ishape) -> (*batch, *oshape)``."""

    def __init__(self, ishape: Sequence[int], oshape: Sequence[int]):
        super().__init__(ishape, oshape)
        if _prod(self.ishape) != _prod(self.oshape):
            raise ShapeError(
                f"Reshape: cannot reshape {self.ishape} ({_prod(self.ishape)} "
                f"elements) to {self.oshape} ({_prod(self.oshape)} elements)"
            )

    def _forward(self, x):
        return x.reshape(*x.shape[: x.ndim - len(self.ishape)], *self.oshape)

    def _adjoint(self, y):
        return y.reshape(*y.shape[: y.ndim - len(self.oshape)], *self.ishape)

    def _normal(self, x):
        return x


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
