"""Vertical stacking of operators that share an input: ``K = [A; B; ...]``."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import ShapeError
from .base import LinearOperator


class Vstack(LinearOperator):
    """``K x = [A₁x; A₂x; ...]``, each output flattened and concatenated on one last axis.

    ``(*batch, *ishape) -> (*batch, Σ size(oshapeᵢ))``; the adjoint is ``Σ Aᵢᴴ yᵢ`` and the normal
    operator ``Σ Aᵢᴴ Aᵢ`` (each block's own, possibly fast, normal). Primal–dual solvers use it for
    several terms at once, e.g. ``K = Vstack([A, FiniteDifference(...)])`` in TV reconstruction;
    :meth:`split` returns the blocks of an output in their own shapes.
    """

    def __init__(self, ops: Sequence[LinearOperator]):
        ops = list(ops)
        if not ops:
            raise ShapeError("Vstack: needs at least one operator")
        for op in ops:
            if not isinstance(op, LinearOperator):
                raise ShapeError(f"Vstack: expected LinearOperators, got {type(op).__name__}")
            if op.ishape != ops[0].ishape:
                raise ShapeError(
                    "Vstack: every operator must take the same input shape; got "
                    + ", ".join(f"{type(o).__name__}{o.ishape}" for o in ops)
                )
        self.ops = ops
        self.sizes = [_prod(op.oshape) for op in ops]
        super().__init__(ops[0].ishape, (sum(self.sizes),))
        self.autograd_safe = all(op.autograd_safe for op in ops)

    def split(self, y: torch.Tensor) -> list[torch.Tensor]:
        """The blocks of ``y`` (``(*batch, total)``) as views ``(*batch, *oshapeᵢ)``."""
        batch = y.shape[:-1]
        return [
            b.reshape(*batch, *op.oshape)
            for b, op in zip(torch.split(y, self.sizes, dim=-1), self.ops, strict=True)
        ]

    def _forward(self, x):
        batch = x.shape[: x.ndim - len(self.ishape)]
        outs = [op._forward(x).reshape(*batch, -1) for op in self.ops]
        dt = outs[0].dtype
        for o in outs[1:]:
            dt = torch.promote_types(dt, o.dtype)
        return torch.cat([o.to(dt) for o in outs], dim=-1)

    def _adjoint(self, y):
        out = None
        for b, op in zip(self.split(y), self.ops, strict=True):
            t = op._adjoint(b)
            out = t if out is None else out + t
        return out

    def _normal(self, x):
        out = None
        for op in self.ops:
            t = op.normal(x)  # public: composites (Compose) take their fast normal route
            out = t if out is None else out + t
        return out

    def __repr__(self) -> str:
        return "Vstack([" + ", ".join(repr(o) for o in self.ops) + "])"


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
