"""Proximal operators.

Convention: a proximal operator is a callable ``prox(v, t)`` returning

    argmin_x  t·g(x) + ½‖x − v‖²

for a step ``t > 0``. Projections (indicator functions) ignore ``t``. Every prox here works on
real and complex tensors of any shape and on any device; complex values are treated as pairs of
reals (so the L1 norm of a complex vector is Σ|xᵢ| and soft-thresholding shrinks magnitudes and
keeps phases).

:func:`conjugate` gives the prox of the convex conjugate ``g*`` by the Moreau identity (exact
closed forms for the norms here), as primal–dual solvers need; :class:`Stack` applies one prox
per block of a :class:`~qmrkit.ops.Vstack` output.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import DTypeError, ParameterError
from ..ops.stack import Vstack
from ._common import abs2, check_nonnegative, check_positive, norm


def _group_norm(v: torch.Tensor, axis: int) -> torch.Tensor:
    """Euclidean norm over ``axis`` (kept, size 1), fast for complex tensors."""
    return abs2(v).sum(dim=axis, keepdim=True).sqrt()


def soft_threshold(v: torch.Tensor, thresh: float | torch.Tensor) -> torch.Tensor:
    """``sign(v)·max(|v| − thresh, 0)``, with ``sign(v) = v/|v|`` for complex ``v``."""
    if not v.is_complex():
        return torch.sign(v) * torch.clamp(v.abs() - thresh, min=0)
    mag = abs2(v).sqrt()
    scale = torch.clamp(1 - thresh / torch.where(mag > 0, mag, torch.ones_like(mag)), min=0)
    return v * scale


def group_soft_threshold(v: torch.Tensor, thresh: float | torch.Tensor, axis: int) -> torch.Tensor:
    """Shrink the Euclidean norm of each group along ``axis`` by ``thresh`` (block soft threshold).

    With the stacked gradient of :class:`~qmrkit.ops.FiniteDifference` and its stacking axis,
    this is the prox of isotropic total variation.
    """
    mag = _group_norm(v, axis)
    scale = torch.clamp(1 - thresh / torch.where(mag > 0, mag, torch.ones_like(mag)), min=0)
    return v * scale


class Prox:
    """Base class: ``prox(v, t)``; subclasses may define ``value(x)`` (the function g itself)."""

    def __call__(self, v: torch.Tensor, t: float) -> torch.Tensor:
        raise NotImplementedError

    def value(self, x: torch.Tensor) -> float:
        raise NotImplementedError(f"{type(self).__name__} does not define its value")

    def _conjugate(self) -> Prox | None:
        return None

    def __repr__(self) -> str:
        params = ", ".join(
            f"{k}={v!r}"
            for k, v in vars(self).items()
            if not k.startswith("_") and not isinstance(v, torch.Tensor)
        )
        return f"{type(self).__name__}({params})"


class Zero(Prox):
    """g = 0: the prox is the identity."""

    def __call__(self, v, t):
        return v

    def value(self, x):
        return 0.0


class L1(Prox):
    """g(x) = λ‖x‖₁ (complex-safe soft threshold by ``tλ``)."""

    def __init__(self, lam: float = 1.0):
        self.lam = check_nonnegative(lam, "lam", "L1")

    def __call__(self, v, t):
        return soft_threshold(v, t * self.lam)

    def value(self, x):
        return self.lam * float(abs2(x).sqrt().sum())

    def _conjugate(self):
        return LinfBall(self.lam)


class GroupL1(Prox):
    """g(x) = λ Σ_groups ‖x_group‖₂, groups along ``axis`` (isotropic TV on stacked gradients).

    For ``D = FiniteDifference(shape)``, ``λ·TV(x) = GroupL1(λ, axis=-len(shape)-1).value(D(x))``.
    """

    def __init__(self, lam: float = 1.0, *, axis: int):
        self.lam = check_nonnegative(lam, "lam", "GroupL1")
        self.axis = int(axis)

    def __call__(self, v, t):
        return group_soft_threshold(v, t * self.lam, self.axis)

    def value(self, x):
        return self.lam * float(_group_norm(x, self.axis).sum())

    def _conjugate(self):
        return GroupLinfBall(self.lam, axis=self.axis)


class LinfBall(Prox):
    """Indicator of ``{|xᵢ| <= r}`` (projection clips magnitudes, keeps phases); conj of r‖·‖₁."""

    def __init__(self, radius: float):
        self.radius = check_nonnegative(radius, "radius", "LinfBall")

    def __call__(self, v, t=None):
        if not v.is_complex():
            return torch.clamp(v, -self.radius, self.radius)
        mag = abs2(v).sqrt()
        return v * torch.clamp(self.radius / torch.where(mag > 0, mag, torch.ones_like(mag)), max=1)

    def value(self, x):
        return 0.0 if float(abs2(x).max().sqrt()) <= self.radius * (1 + 1e-6) else float("inf")


class GroupLinfBall(Prox):
    """Indicator of ``{‖x_group‖₂ <= r}`` for groups along ``axis``; the conjugate of GroupL1."""

    def __init__(self, radius: float, *, axis: int):
        self.radius = check_nonnegative(radius, "radius", "GroupLinfBall")
        self.axis = int(axis)

    def __call__(self, v, t=None):
        mag = _group_norm(v, self.axis)
        return v * torch.clamp(self.radius / torch.where(mag > 0, mag, torch.ones_like(mag)), max=1)

    def value(self, x):
        m = float(_group_norm(x, self.axis).max())
        return 0.0 if m <= self.radius * (1 + 1e-6) else float("inf")


class L2Ball(Prox):
    """Indicator of ``{‖x − c‖₂ <= r}``: projection onto a Euclidean ball.

    ``dim`` (optional) gives the axes of each ball, so batches project independently; by default
    the whole tensor is one vector.
    """

    def __init__(
        self,
        radius: float,
        center: torch.Tensor | None = None,
        dim: int | Sequence[int] | None = None,
    ):
        self.radius = check_nonnegative(radius, "radius", "L2Ball")
        self.center = center
        self.dim = dim

    def __call__(self, v, t=None):
        c = self.center
        d = v - c if c is not None else v
        n = torch.linalg.vector_norm(d, dim=self.dim, keepdim=self.dim is not None)
        scale = torch.clamp(self.radius / torch.where(n > 0, n, torch.ones_like(n)), max=1)
        d = d * scale
        return d + c if c is not None else d

    def value(self, x):
        c = self.center
        n = torch.linalg.vector_norm(x - c if c is not None else x, dim=self.dim)
        return 0.0 if float(n.max()) <= self.radius * (1 + 1e-6) else float("inf")


class Box(Prox):
    """Indicator of ``{lower <= x <= upper}`` for real tensors (either bound may be None)."""

    def __init__(
        self, lower: float | torch.Tensor | None = None, upper: float | torch.Tensor | None = None
    ):
        if lower is None and upper is None:
            raise ParameterError("Box: give at least one of lower and upper")
        if (
            lower is not None
            and upper is not None
            and not isinstance(lower, torch.Tensor)
            and not isinstance(upper, torch.Tensor)
            and lower > upper
        ):
            raise ParameterError(f"Box: lower ({lower}) must not exceed upper ({upper})")
        self.lower, self.upper = lower, upper

    def __call__(self, v, t=None):
        if v.is_complex():
            raise DTypeError("Box: a box projection needs real values, got a complex tensor")
        return torch.clamp(v, min=self.lower, max=self.upper)

    def value(self, x):
        ok = True
        if self.lower is not None:
            ok &= bool((x >= self.lower).all())
        if self.upper is not None:
            ok &= bool((x <= self.upper).all())
        return 0.0 if ok else float("inf")


class L2Squared(Prox):
    """g(x) = (λ/2)‖x − y‖²: prox ``(v + tλy) / (1 + tλ)`` (a data-fidelity term)."""

    def __init__(self, y: torch.Tensor | None = None, lam: float = 1.0):
        self.y = y
        self.lam = check_nonnegative(lam, "lam", "L2Squared")

    def __call__(self, v, t):
        tl = t * self.lam
        return (v + tl * self.y) / (1 + tl) if self.y is not None else v / (1 + tl)

    def value(self, x):
        d = x - self.y if self.y is not None else x
        return 0.5 * self.lam * norm(d) ** 2

    def _conjugate(self):
        return _L2SquaredConjugate(self.y, self.lam)


class _L2SquaredConjugate(Prox):
    """g*(z) = ‖z‖²/(2λ) + Re⟨z, y⟩, the conjugate of (λ/2)‖x − y‖²: prox (v − ty)/(1 + t/λ)."""

    def __init__(self, y, lam):
        self.y, self.lam = y, lam

    def __call__(self, v, t):
        if self.lam == 0:  # g = 0, g* is the indicator of {0}
            return torch.zeros_like(v)
        num = v - t * self.y if self.y is not None else v
        return num / (1 + t / self.lam)

    def value(self, z):
        if self.lam == 0:
            return 0.0 if float(z.abs().max()) == 0 else float("inf")
        val = norm(z) ** 2 / (2 * self.lam)
        if self.y is not None:
            val += float((z.conj() * self.y).real.sum() if z.is_complex() else (z * self.y).sum())
        return val


class _Moreau(Prox):
    """prox of g* by the Moreau identity: ``prox_{σg*}(v) = v − σ prox_{g/σ}(v/σ)``."""

    def __init__(self, prox: Prox):
        self.prox = prox

    def __call__(self, v, t):
        t = check_positive(t, "step", "conjugate prox")
        return v - t * self.prox(v / t, 1.0 / t)


def conjugate(prox) -> Prox:
    """The prox of the convex conjugate ``g*`` of ``g`` (closed form where known, else Moreau)."""
    if isinstance(prox, Prox):
        c = prox._conjugate()
        if c is not None:
            return c
    if not callable(prox):
        raise ParameterError(f"conjugate: expected a prox callable, got {type(prox).__name__}")
    return _Moreau(prox)


class Stack(Prox):
    """One prox per block of a :class:`~qmrkit.ops.Vstack` output (a separable sum of terms).

    ``Stack(K, [conjugate(L2Squared(y)), conjugate(GroupL1(lam, axis=-3))])`` is the dual prox of
    ``f(Ax, Dx) = ½‖Ax − y‖² + λ TV(x)`` for ``K = Vstack([A, D])``; each block prox sees its
    block in the block operator's own output shape.
    """

    def __init__(self, op: Vstack, proxes: Sequence):
        if not isinstance(op, Vstack):
            raise ParameterError(f"Stack: op must be a qmrkit.ops.Vstack, got {type(op).__name__}")
        proxes = list(proxes)
        if len(proxes) != len(op.ops):
            raise ParameterError(f"Stack: {len(op.ops)} blocks but {len(proxes)} proxes")
        self.op, self.proxes = op, proxes

    def __call__(self, v, t):
        batch = v.shape[:-1]
        parts = [
            p(b, t).reshape(*batch, -1) for p, b in zip(self.proxes, self.op.split(v), strict=True)
        ]
        return torch.cat(parts, dim=-1)

    def value(self, x):
        return float(sum(p.value(b) for p, b in zip(self.proxes, self.op.split(x), strict=True)))
