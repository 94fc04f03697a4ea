"""PDHG (Chambolle–Pock): primal–dual splitting for ``min_x f(Kx) + g(x)``."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .._device import synchronize
from .._progress import get_logger, progress_bar
from ..errors import ParameterError
from ..ops.base import LinearOperator
from ._common import (
    SolverResult,
    call_back,
    check_ends_in,
    check_max_iter,
    check_nonnegative,
    check_positive,
    check_same_shape,
    check_tensor,
    check_tol,
    norm,
    warn_nonfinite,
)
from .power import power_iteration

log = get_logger("optim.pdhg")

#: Power iteration approaches ‖K‖² from below; default steps use στ‖K‖² = 1/SAFETY.
STEP_SAFETY = 1.05


@dataclass(repr=False)
class PdhgResult(SolverResult):
    """:class:`SolverResult` plus the dual variable and the two residuals' histories."""

    z: torch.Tensor | None = None
    primal_residual_history: list[float] = field(default_factory=list)
    dual_residual_history: list[float] = field(default_factory=list)


def pdhg(
    K: LinearOperator,
    prox_fstar: Callable[[torch.Tensor, float], torch.Tensor],
    prox_g: Callable[[torch.Tensor, float], torch.Tensor] | None = None,
    *,
    x0: torch.Tensor | None = None,
    z0: torch.Tensor | None = None,
    sigma: float | None = None,
    tau: float | None = None,
    theta: float = 1.0,
    strong_convexity: float = 0.0,
    adaptive: bool = True,
    max_iter: int = 100,
    tol: float = 1e-6,
    callback: Callable[[int, torch.Tensor, torch.Tensor], bool | None] | None = None,
    dtype: torch.dtype = torch.complex64,
    device=None,
    power_iter: int = 30,
    seed: int = 0,
    progress: bool | None = False,
) -> PdhgResult:
    """Minimise ``f(K x) + g(x)`` by the primal–dual hybrid gradient method (Chambolle–Pock).

    Iteration (dual step first)::

        z ← prox_{σf*}(z + σ K x̄)
        x⁺ ← prox_{τg}(x − τ Kᴴ z)
        x̄ ← x⁺ + θ (x⁺ − x)

    One application of ``K`` and one of ``Kᴴ`` per iteration (``K x̄`` follows from linearity).

    Parameters
    ----------
    K : LinearOperator
        E.g. ``Vstack([A, FiniteDifference(...)])`` for TV-regularised reconstruction.
    prox_fstar : callable
        ``prox(v, σ)`` of the convex conjugate ``f*`` — build it with
        :func:`qmrkit.optim.prox.conjugate` (and :class:`~qmrkit.optim.prox.Stack` for
        several terms).
    prox_g : callable, optional
        ``prox(v, τ)`` of ``g``; None means ``g = 0``.
    x0, z0 : tensor, optional
        Primal start ``(*batch, *K.ishape)`` (default zeros in ``dtype`` on ``device``) and dual
        start ``(*batch, *K.oshape)`` (default zeros).
    sigma, tau : float, optional
        Dual and primal steps, convergent when ``στ‖K‖² <= 1``. Neither given:
        ``σ = τ = 1/(1.05‖K‖)`` with ``‖K‖²`` from :func:`power_iteration`; one given: the other
        is ``1/(1.05‖K‖² · given)``; both given: used as they are.
    theta : float
        Extrapolation in ``[0, 1]`` (1: the standard method).
    strong_convexity : float
        ``γ > 0`` when ``g`` is ``γ``-strongly convex (e.g. ``γ = 1`` for ``½‖x − b‖²``): use
        Chambolle–Pock's accelerated variant (θ, τ, σ adapted each iteration, O(1/k²)).
    adaptive : bool
        Balance the primal and dual steps during the run (Goldstein, Li & Yuan 2015): when the
        primal residual exceeds the dual one by more than a factor 1.5, ``τ`` grows and ``σ``
        shrinks (``στ`` fixed), and the other way round; the adaptation fades geometrically
        (factor 0.95 per change), so convergence is kept. It removes most of the sensitivity to
        the ratio ``σ/τ`` (i.e. to the relative scale of image and dual variables). Default
        True; ``info["tau"]``/``info["sigma"]`` report the final steps. Ignored when
        ``strong_convexity > 0``.
    max_iter, tol
        Stop when the relative primal–dual residual (below) is at most ``tol`` (0: run all).
    callback : callable, optional
        ``callback(iteration, x, z)``; returning True stops.

    Returns
    -------
    PdhgResult
        ``residual_history`` holds ``sqrt(‖p‖² + ‖d‖²) / sqrt(‖Kᴴz‖² + ‖Kx‖²)`` with the primal
        residual ``p = (x_k − x_{k+1})/τ ∈ ∂g(x_{k+1}) + Kᴴz_{k+1}`` and the dual residual
        ``d = (z_k − z_{k+1})/σ + K(x̄_k − x_{k+1}) ∈ ∂f*(z_{k+1}) − K x_{k+1}``; both vanish
        exactly at a saddle point. Their absolute norms are in ``primal_residual_history`` and
        ``dual_residual_history``; ``z`` is the final dual variable.
    """
    name = "pdhg"
    if not isinstance(K, LinearOperator):
        raise ParameterError(f"{name}: K must be a LinearOperator, got {type(K).__name__}")
    if not callable(prox_fstar):
        raise ParameterError(f"{name}: prox_fstar must be callable prox(v, sigma)")
    if prox_g is not None and not callable(prox_g):
        raise ParameterError(f"{name}: prox_g must be callable prox(v, tau) or None")
    max_iter = check_max_iter(max_iter, name)
    tol = check_tol(tol, name)
    theta = check_nonnegative(theta, "theta", name)
    if theta > 1:
        raise ParameterError(f"{name}: theta must be in [0, 1], got {theta}")
    gamma = check_nonnegative(strong_convexity, "strong_convexity", name)
    if sigma is not None:
        sigma = check_positive(sigma, "sigma", name)
    if tau is not None:
        tau = check_positive(tau, "tau", name)

    t_start = time.perf_counter()
    if x0 is None:
        if z0 is not None:
            check_tensor(z0, "z0", name)
            nb = check_ends_in(z0, K.oshape, "z0", name)
            x0 = torch.zeros((*z0.shape[:nb], *K.ishape), dtype=z0.dtype, device=z0.device)
        else:
            x0 = torch.zeros(K.ishape, dtype=dtype, device=device)
    else:
        check_tensor(x0, "x0", name)
    nb = check_ends_in(x0, K.ishape, "x0", name)
    Kx = K(x0)
    if z0 is None:
        z = torch.zeros_like(Kx)
    else:
        check_tensor(z0, "z0", name)
        check_same_shape(z0, Kx, "z0", "K(x0)", name)
        z = z0.clone()

    norm2 = None
    if sigma is None or tau is None:
        norm2 = power_iteration(
            K,
            n_iter=power_iter,
            seed=seed,
            dtype=x0.dtype if x0.is_complex() else _cplx(x0.dtype),
            device=x0.device,
        )
        if norm2 <= 0:
            raise ParameterError(f"{name}: K is zero (‖K‖² estimate {norm2}); nothing to solve")
        if sigma is None and tau is None:
            sigma = tau = 1.0 / math.sqrt(STEP_SAFETY * norm2)
        elif sigma is None:
            sigma = 1.0 / (STEP_SAFETY * norm2 * tau)
        else:
            tau = 1.0 / (STEP_SAFETY * norm2 * sigma)
    prox = prox_g if prox_g is not None else (lambda v, t: v)

    x = x0.clone()
    alpha, eta, delta = 0.5, 0.95, 1.5  # adaptive balancing (Goldstein et al. 2015)
    n_adapt = 0
    Kxbar = Kx
    history: list[float] = []
    p_hist: list[float] = []
    d_hist: list[float] = []
    converged = False
    it = 0
    bar = progress_bar(max_iter, desc=name, progress=progress)
    with bar:
        while it < max_iter:
            it += 1
            z_new = prox_fstar(torch.add(z, Kxbar, alpha=sigma), sigma)
            KHz_new = K.H(z_new)
            x_new = prox(torch.add(x, KHz_new, alpha=-tau), tau)
            Kx_new = K(x_new)
            # residuals of the optimality conditions at (x_new, z_new); in-place on temporaries
            with torch.no_grad():
                p_res = _n(x - x_new) / tau
                d_res = _n((z - z_new).div_(sigma).add_(Kxbar).sub_(Kx_new))
                scale = math.hypot(_n(KHz_new), _n(Kx_new))
            rel = math.hypot(p_res, d_res) / max(scale, 1e-30)
            history.append(rel)
            p_hist.append(p_res)
            d_hist.append(d_res)
            bar.update()
            if gamma > 0:  # Chambolle–Pock algorithm 2 (accelerated for strongly convex g)
                th = 1.0 / math.sqrt(1.0 + 2.0 * gamma * tau)
                tau, sigma = th * tau, sigma / th
            else:
                th = theta
                if adaptive and p_res > delta * d_res:
                    tau, sigma, alpha, n_adapt = (
                        tau / (1 - alpha),
                        sigma * (1 - alpha),
                        alpha * eta,
                        n_adapt + 1,
                    )
                elif adaptive and d_res > delta * p_res:
                    tau, sigma, alpha, n_adapt = (
                        tau * (1 - alpha),
                        sigma / (1 - alpha),
                        alpha * eta,
                        n_adapt + 1,
                    )
            Kxbar = torch.add(Kx_new, Kx_new - Kx, alpha=th)
            x, z, Kx = x_new, z_new, Kx_new
            if not math.isfinite(rel):
                warn_nonfinite(name, it)
                break
            stop = call_back(callback, it, x, z)
            if rel <= tol:
                converged = True
                break
            if stop:
                break
    synchronize(x.device)
    elapsed = time.perf_counter() - t_start
    log.debug("pdhg: %d iterations, residual %.3g", it, history[-1])
    return PdhgResult(
        x=x,
        iterations=it,
        residual_history=history,
        converged=converged,
        elapsed_s=elapsed,
        info={
            "sigma": sigma,
            "tau": tau,
            "norm2": norm2,
            "batch_ndim": nb,
            "step_adaptations": n_adapt,
        },
        z=z,
        primal_residual_history=p_hist,
        dual_residual_history=d_hist,
    )


def _n(t: torch.Tensor) -> float:
    return norm(t)


def _cplx(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype == torch.float64 else torch.complex64
