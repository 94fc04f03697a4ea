"""The linear-operator abstraction every reconstruction and NUFFT builds on.

A :class:`LinearOperator` maps tensors of shape ``(*batch, *ishape)`` to ``(*batch, *oshape)``:
leading batch dimensions (coils, frames, echoes) broadcast. Subclasses implement ``_forward`` and
``_adjoint``; the base class supplies

* ``A(x)`` / ``A.forward(x)``, ``A.H(y)`` / ``A.adjoint(y)``, ``A.N(x)`` (normal operator AᴴA,
  overridable, e.g. by a Toeplitz embedding),
* the adjoint operator ``A.H`` (an operator too, so ``A.H(y)`` reads like the maths),
* composition ``A @ B``, sums ``A + B`` and scalar products ``c * A``,
* autograd: when ``autograd_safe`` is False (e.g. an external C library does the work) the call is
  wrapped in a ``torch.autograd.Function`` whose backward is the adjoint.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import ShapeError

Shape = tuple[int, ...]


class _Apply(torch.autograd.Function):
    """y = A x with backward x̄ = Aᴴ ȳ (and the reverse for the adjoint)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, op: LinearOperator, adjoint: bool) -> torch.Tensor:  # type: ignore[override]
        ctx.op, ctx.adjoint = op, adjoint
        return op._adjoint(x) if adjoint else op._forward(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        op, adjoint = ctx.op, ctx.adjoint
        g = op._forward(grad) if adjoint else op._adjoint(grad)
        return g, None, None


class LinearOperator:
    """Base class of linear operators.

    Parameters
    ----------
    ishape : tuple of int
        Trailing shape of inputs (e.g. the image size ``(ny, nx)``).
    oshape : tuple of int
        Trailing shape of outputs (e.g. ``(n_samples,)``).
    """

    #: True when ``_forward``/``_adjoint`` are made of differentiable torch operations, so
    #: autograd can trace them; False wraps the calls in an autograd Function.
    autograd_safe: bool = True

    def __init__(self, ishape: Sequence[int], oshape: Sequence[int]):
        self.ishape: Shape = tuple(int(s) for s in ishape)
        self.oshape: Shape = tuple(int(s) for s in oshape)

    # -- to implement ---------------------------------------------------------------------------
    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _adjoint(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _normal(self, x: torch.Tensor) -> torch.Tensor:
        return self._adjoint(self._forward(x))

    # -- public API -----------------------------------------------------------------------------
    def _check(self, t: torch.Tensor, shape: Shape, what: str) -> None:
        n = len(shape)
        if not isinstance(t, torch.Tensor):
            raise ShapeError(f"{type(self).__name__}: {what} must be a torch.Tensor, got {type(t)}")
        if n and tuple(t.shape[t.ndim - n :]) != shape or t.ndim < n:
            raise ShapeError(
                f"{type(self).__name__}: {what} must end in shape {shape}, got {tuple(t.shape)}"
            )

    def _run(self, t: torch.Tensor, adjoint: bool) -> torch.Tensor:
        if self.autograd_safe or not (torch.is_grad_enabled() and t.requires_grad):
            return self._adjoint(t) if adjoint else self._forward(t)
        return _Apply.apply(t, self, adjoint)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the operator: ``(*batch, *ishape) -> (*batch, *oshape)``."""
        self._check(x, self.ishape, "input")
        return self._run(x, adjoint=False)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """Apply the adjoint: ``(*batch, *oshape) -> (*batch, *ishape)``."""
        self._check(y, self.oshape, "adjoint input")
        return self._run(y, adjoint=True)

    def normal(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the normal operator AᴴA (subclasses may use a faster route, e.g. Toeplitz)."""
        self._check(x, self.ishape, "input")
        if self.autograd_safe or not (torch.is_grad_enabled() and x.requires_grad):
            return self._normal(x)
        return self.adjoint(self.forward(x))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)

    def N(self, x: torch.Tensor) -> torch.Tensor:  # noqa: N802 - the maths' name
        """Alias of :meth:`normal`."""
        return self.normal(x)

    @property
    def H(self) -> LinearOperator:  # noqa: N802 - the maths' name
        """The adjoint operator Aᴴ."""
        return Adjoint(self)

    def __matmul__(self, other: LinearOperator) -> LinearOperator:
        if not isinstance(other, LinearOperator):
            return NotImplemented
        return Compose(self, other)

    def __add__(self, other: LinearOperator) -> LinearOperator:
        if not isinstance(other, LinearOperator):
            return NotImplemented
        return Sum(self, other)

    def __mul__(self, c: complex) -> LinearOperator:
        if isinstance(c, LinearOperator):
            return NotImplemented
        return Scale(self, c)

    __rmul__ = __mul__

    def __repr__(self) -> str:
        return f"{type(self).__name__}(ishape={self.ishape}, oshape={self.oshape})"


class Adjoint(LinearOperator):
    """The adjoint of an operator (``A.H``)."""

    def __init__(self, op: LinearOperator):
        super().__init__(op.oshape, op.ishape)
        self.op = op
        self.autograd_safe = op.autograd_safe

    def _forward(self, x):
        return self.op._adjoint(x)

    def _adjoint(self, y):
        return self.op._forward(y)

    @property
    def H(self) -> LinearOperator:  # noqa: N802
        return self.op


class Compose(LinearOperator):
    """``(A @ B)(x) = A(B(x))``."""

    def __init__(self, a: LinearOperator, b: LinearOperator):
        if a.ishape != b.oshape:
            raise ShapeError(
                f"cannot compose: {type(a).__name__} takes {a.ishape} but "
                f"{type(b).__name__} gives {b.oshape}"
            )
        super().__init__(b.ishape, a.oshape)
        self.a, self.b = a, b

    def forward(self, x):
        return self.a.forward(self.b.forward(x))

    def adjoint(self, y):
        return self.b.adjoint(self.a.adjoint(y))

    def normal(self, x):
        return self.b.adjoint(self.a.normal(self.b.forward(x)))

    def _forward(self, x):
        return self.a._forward(self.b._forward(x))

    def _adjoint(self, y):
        return self.b._adjoint(self.a._adjoint(y))


class Sum(LinearOperator):
    """``(A + B)(x) = A(x) + B(x)``."""

    def __init__(self, a: LinearOperator, b: LinearOperator):
        if a.ishape != b.ishape or a.oshape != b.oshape:
            raise ShapeError(
                f"cannot add operators of shapes {a.ishape}->{a.oshape} and {b.ishape}->{b.oshape}"
            )
        super().__init__(a.ishape, a.oshape)
        self.a, self.b = a, b

    def forward(self, x):
        return self.a.forward(x) + self.b.forward(x)

    def adjoint(self, y):
        return self.a.adjoint(y) + self.b.adjoint(y)

    def _forward(self, x):
        return self.a._forward(x) + self.b._forward(x)

    def _adjoint(self, y):
        return self.a._adjoint(y) + self.b._adjoint(y)


class Scale(LinearOperator):
    """``(c A)(x) = c · A(x)``; the adjoint uses the conjugate of ``c``."""

    def __init__(self, op: LinearOperator, c: complex):
        super().__init__(op.ishape, op.oshape)
        self.op, self.c = op, c

    @property
    def _c_conj(self):
        if isinstance(self.c, torch.Tensor):
            return self.c.conj()
        return self.c.conjugate() if isinstance(self.c, complex) else self.c

    def forward(self, x):
        return self.c * self.op.forward(x)

    def adjoint(self, y):
        return self._c_conj * self.op.adjoint(y)

    def _forward(self, x):
        return self.c * self.op._forward(x)

    def _adjoint(self, y):
        return self._c_conj * self.op._adjoint(y)


class Identity(LinearOperator):
    """The identity on tensors ending in ``shape``."""

    def __init__(self, shape: Sequence[int]):
        super().__init__(shape, shape)

    def _forward(self, x):
        return x

    def _adjoint(self, y):
        return y


def check_adjoint(
    op: LinearOperator,
    *,
    batch: Sequence[int] = (),
    dtype: torch.dtype = torch.complex64,
    device: str | torch.device | None = None,
    seed: int = 0,
) -> float:
    """The dot test: relative error of ⟨Ax, y⟩ = ⟨x, Aᴴy⟩ for random x, y.

    Returns ``|⟨Ax, y⟩ − ⟨x, Aᴴy⟩| / (‖Ax‖·‖y‖)``; a correct adjoint gives about the dtype's
    precision (≈1e-7 in complex64).
    """
    g = torch.Generator().manual_seed(seed)
    real = torch.float32 if dtype == torch.complex64 else torch.float64
    shape_x = (*batch, *op.ishape)
    shape_y = (*batch, *op.oshape)
    if dtype.is_complex:
        x = torch.complex(
            torch.randn(shape_x, generator=g, dtype=real),
            torch.randn(shape_x, generator=g, dtype=real),
        )
        y = torch.complex(
            torch.randn(shape_y, generator=g, dtype=real),
            torch.randn(shape_y, generator=g, dtype=real),
        )
    else:
        x = torch.randn(shape_x, generator=g, dtype=dtype)
        y = torch.randn(shape_y, generator=g, dtype=dtype)
    if device is not None:
        x, y = x.to(device), y.to(device)
    ax = op.forward(x)
    ahy = op.adjoint(y)
    lhs = torch.vdot(ax.reshape(-1), y.reshape(-1))
    rhs = torch.vdot(x.reshape(-1), ahy.reshape(-1))
    denom = torch.linalg.vector_norm(ax) * torch.linalg.vector_norm(y)
    return float(torch.abs(lhs - rhs) / denom)
