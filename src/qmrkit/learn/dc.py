"""Data-consistency blocks of unrolled networks, with their inverses.

* :class:`CGDataConsistency` — MoDL: ``x = (AᴴA + λI)⁻¹ (Aᴴy + λ z)`` solved by conjugate
  gradients, with a learnable ``λ = softplus(ρ) > 0``. Its gradient is computed implicitly (the
  gradient of the solution of an SPD system is another solve with the same matrix), not by
  backpropagating through the CG iterations, so memory does not grow with the CG iterations and
  every memory mode agrees with "converged inner solves". Inverse in closed form:
  ``z = ((AᴴA + λI) x − Aᴴy) / λ``.
* :class:`GradientDataConsistency` — one gradient step ``x = z − η (AᴴA z − Aᴴy)`` with a
  learnable ``η = softplus(ρ) > 0``; inverse by CG on ``(I − ηAᴴA) z = x − η Aᴴy``, which is SPD
  while ``η ‖AᴴA‖ < 1``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..optim import cg as _cg


def _softplus_inv(v: float) -> float:
    return v + math.log(-math.expm1(-v))


def _relnorm(a: torch.Tensor, b: torch.Tensor) -> float:
    an = torch.linalg.vector_norm(torch.view_as_real(a) if a.is_complex() else a)
    bn = torch.linalg.vector_norm(torch.view_as_real(b) if b.is_complex() else b)
    return float(an / bn) if float(bn) > 0 else float(an)


def _solve(normal, lam: torch.Tensor, b: torch.Tensor, x0, nb: int, tol: float, max_iter: int):
    """Solve ``(N + λI) x = b`` for each of the ``nb`` leading batch entries (no autograd)."""
    lam_v = float(lam)

    def M(v):
        return normal(v) + lam_v * v

    with torch.no_grad():
        res = _cg(M, b, x0=x0, max_iter=max_iter, tol=tol, batch_ndim=nb)
    return res.x, res


class _CGSolve(torch.autograd.Function):
    """``x = (N + λI)⁻¹ (rhs + λ z)`` with an implicit backward."""

    @staticmethod
    def forward(ctx, z, rhs, lam, normal, nb, tol, max_iter, x_init=None):  # type: ignore[override]
        b = rhs + lam.to(rhs.real.dtype) * z
        x0 = z if x_init is None else x_init.detach()  # a starting point, not an input
        x, _ = _solve(normal, lam, b, x0, nb, tol, max_iter)
        ctx.save_for_backward(x, z, lam)
        ctx.normal, ctx.nb, ctx.tol, ctx.max_iter = normal, nb, tol, max_iter
        return x

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        x, z, lam = ctx.saved_tensors
        # M x = rhs + λ z  =>  dx = M⁻¹ (dλ (z − x) + λ dz + drhs);  w = M⁻¹ g (M Hermitian)
        w, _ = _solve(ctx.normal, lam, g, None, ctx.nb, ctx.tol, ctx.max_iter)
        gz = lam.to(w.real.dtype) * w if ctx.needs_input_grad[0] else None
        grhs = w if ctx.needs_input_grad[1] else None
        glam = None
        if ctx.needs_input_grad[2]:
            d = z - x
            glam = (
                (torch.view_as_real(w) * torch.view_as_real(d))
                .sum()
                .to(lam.dtype)
                .reshape(lam.shape)
            )
        return gz, grhs, glam, None, None, None, None, None


class CGDataConsistency(nn.Module):
    """MoDL data consistency ``x = (AᴴA + λI)⁻¹ (Aᴴy + λ z)`` with learnable ``λ > 0``.

    Parameters
    ----------
    lam : float
        Initial ``λ`` (dimensionless, relative to the scale of ``AᴴA``).
    cg_tol, cg_max_iter : float, int
        Relative residual tolerance and iteration cap of the inner CG solves (forward and the
        implicit backward). For exact agreement between memory modes use a tight tolerance.
    """

    kind = "cg"

    def __init__(self, lam: float = 0.05, cg_tol: float = 1e-6, cg_max_iter: int = 50):
        super().__init__()
        self.rho = nn.Parameter(torch.tensor(_softplus_inv(float(lam))))
        self.cg_tol = float(cg_tol)
        self.cg_max_iter = int(cg_max_iter)

    @property
    def lam(self) -> torch.Tensor:
        return F.softplus(self.rho)

    def forward(self, z, rhs, A, nb, x_init=None):
        """Solve from ``x_init`` (default ``z``); a re-run that knows the previous solution passes
        it, so CG stops after one residual evaluation when it still solves the system."""
        return _CGSolve.apply(z, rhs, self.lam, A.N, nb, self.cg_tol, self.cg_max_iter, x_init)

    @torch.no_grad()
    def inverse(self, x, rhs, A, nb, tol=None):
        """``z = ((AᴴA + λI) x − Aᴴy) / λ`` (exact when the forward solve converged)."""
        lam = self.lam.to(x.real.dtype)
        return x + (A.N(x) - rhs) / lam, True, 0.0


class GradientDataConsistency(nn.Module):
    """Gradient-step data consistency ``x = z − η (AᴴA z − Aᴴy)`` with learnable ``η > 0``."""

    kind = "gradient"

    def __init__(self, step: float = 0.5, cg_tol: float = 1e-6, cg_max_iter: int = 50):
        super().__init__()
        self.rho = nn.Parameter(torch.tensor(_softplus_inv(float(step))))
        self.cg_tol = float(cg_tol)
        self.cg_max_iter = int(cg_max_iter)

    @property
    def step(self) -> torch.Tensor:
        return F.softplus(self.rho)

    def forward(self, z, rhs, A, nb, x_init=None):
        eta = self.step.to(z.real.dtype)
        return z - eta * (A.N(z) - rhs)

    @torch.no_grad()
    def inverse(self, x, rhs, A, nb, tol=None):
        """Solve ``(I − ηAᴴA) z = x − η Aᴴy`` by CG; reports failure when it does not converge."""
        eta = float(self.step)
        tol = self.cg_tol if tol is None else tol
        b = x - eta * rhs

        def M(v):
            return v - eta * A.N(v)

        res = _cg(M, b, x0=x, max_iter=max(self.cg_max_iter, 200), tol=tol, batch_ndim=nb)
        z = res.x
        r = _relnorm(M(z) - b, b)
        ok = bool(math.isfinite(r) and r <= max(10 * tol, 1e-14))
        return z, ok, r


__all__ = ["CGDataConsistency", "GradientDataConsistency"]
