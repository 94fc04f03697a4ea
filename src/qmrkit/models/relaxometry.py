"""Relaxometry models: MOLLI T1, inversion recovery, variable flip angle T1, mono-exponential decay.

Times are in ms, rates in 1/s, flip angles in degrees, B1 as a fraction of nominal.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..errors import ParameterError, ShapeError, UnitsWarning
from ..fit.model import Model, Parameter, scratch


def _vector(name: str, values: Any, *, positive: bool = True, unit: str = "") -> np.ndarray:
    arr = np.atleast_1d(np.asarray(values, dtype=np.float64))
    if arr.ndim != 1 or arr.size == 0:
        raise ShapeError(f"{name} must be a non-empty 1-D list of values, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ParameterError(f"{name} contains NaN or Inf: {arr}")
    if positive and (arr < 0).any():
        raise ParameterError(f"{name} must be >= 0 {unit}, got {arr}")
    return arr


def _warn_units(message: str, stacklevel: int = 3) -> None:
    # default: past _warn_units and the model's __init__, to the code that built the model
    warnings.warn(message, UnitsWarning, stacklevel=stacklevel)


def _check_times_ms(name: str, values: np.ndarray, *, seconds_below: float) -> None:
    """Warn when times look like seconds: every value below ``seconds_below`` ms, a range no
    protocol of this kind uses in ms but typical of the same protocol written in seconds."""
    if values.size and float(values.max()) < seconds_below:
        _warn_units(
            f"{name} = {_short(values)} look like seconds; qmrkit expects milliseconds "
            f"(e.g. {_short(values * 1000)}); fitting as given",
            stacklevel=4,
        )


def _short(values: np.ndarray) -> str:
    # three significant digits without exponents (2800, not 2.8e+03)
    shown = ", ".join(f"{float(f'{v:.3g}'):g}" for v in values[:6])
    return f"[{shown}{', ...' if values.size > 6 else ''}]"


def _scalar(name: str, value: Any, unit: str) -> float:
    v = float(value)
    if not math.isfinite(v) or v <= 0:
        raise ParameterError(f"{name} must be a positive number in {unit}, got {value}")
    return v


# -------------------------------------------------------------------------------------------------
# shared closed-form start for |A − B·exp(−t/τ)| signals (MOLLI, inversion recovery)
# -------------------------------------------------------------------------------------------------
#: voxels per pass of :func:`recovery_start`'s grid search: its (v, 5, n_tau) float32 projections
#: (≈2 MB) stay in the last-level cache (measured, 128² MOLLI, 2 threads: 13–14 ms per start at
#: 2,048, 14.5–15 ms at 1,024, 16–17 ms at 512)
_START_CHUNK = 2048


#: a shape basis h(s) and, when asked, its first two derivatives in s (each ``(M, V)``)
ShapeFn = Callable[[torch.Tensor, bool], tuple[torch.Tensor, Any, Any]]


@torch.no_grad()
def polish_on_shape(
    y: torch.Tensor,
    shape: ShapeFn,
    s: torch.Tensor,
    *,
    constant: bool,
    max_step: float,
    s_lo: float,
    s_hi: float,
    feasible: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    steps: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Safeguarded Newton steps on the nonlinear parameter of y ≈ c + β·h(s) (variable
    projection), for the starts of signals with one nonlinear parameter and linear amplitudes.

    Parameters
    ----------
    y : (M, V) float64
        Data, measurements along rows (contiguous voxel rows: reductions over M are row sums).
    shape : callable
        ``shape(s, derivatives)`` → h, h', h'' ``(M, V)`` (h' and h'' ``None`` without
        derivatives), derivatives in s.
    s : (V,) float64
        The nonlinear parameter (e.g. log τ) from a grid or a linearised fit.
    constant : bool
        Whether the model has a free constant c (it is then projected out by centring); without
        it c = 0.
    max_step, s_lo, s_hi : float
        The largest step in s (e.g. the grid spacing) and the range of s.
    feasible : callable
        ``feasible(c, beta)`` → ``(V,)`` bool: where the amplitudes are acceptable.
    steps : int
        Newton steps (one from a fine grid; two from a linearised fit, which can be further off).

    Returns
    -------
    s, c, beta : (V,) each
        The polished parameter and the least-squares amplitudes there.

    With the amplitudes eliminated the cost is ‖y − c̄‖² − F(s), F = u²/w, u = h̃·y, w = h̃·h̃
    (h̃ = h minus its mean when there is a constant, else h). F' = (2uu'w − u²w')/w² and
    F'' = 2(u'² + uu'')/w − 4uu'w'/w² − u²w''/w² + 2u²w'²/w³. The step −F'/F'', bounded by
    ``max_step``, is kept only where F'' < 0 (a maximum), F grew and the amplitudes stay
    feasible; elsewhere ``s`` stays. From a grid point near the optimum one step reaches it to
    float32 precision, so Levenberg–Marquardt's first iteration only confirms it.
    """
    M = y.shape[0]
    sy = y.sum(0)
    k = 1.0 / M if constant else 0.0  # weight of the mean terms (centring)

    def projection(h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        sh, shy, shh = h.sum(0), (h * y).sum(0), (h * h).sum(0)
        return sh, shy - k * sh * sy, shh - k * sh * sh  # Σh, u, w

    def amplitudes(sh, u, w):
        beta = u / w
        return k * (sy - beta * sh), beta

    for _ in range(steps - 1):
        s = polish_on_shape(
            y,
            shape,
            s,
            constant=constant,
            max_step=max_step,
            s_lo=s_lo,
            s_hi=s_hi,
            feasible=feasible,
        )[0]
    h, h1, h2 = shape(s, True)
    sh, u, w = projection(h)
    s1, s2 = h1.sum(0), h2.sum(0)
    u1 = (h1 * y).sum(0) - k * s1 * sy
    u2 = (h2 * y).sum(0) - k * s2 * sy
    w1 = 2.0 * ((h1 * h).sum(0) - k * s1 * sh)
    w2 = 2.0 * ((h2 * h).sum(0) - k * s2 * sh + (h1 * h1).sum(0) - k * s1 * s1)
    ww = w * w
    f1 = (2 * u * u1 * w - u * u * w1) / ww
    f2 = 2 * (u1 * u1 + u * u2) / w - (4 * u * u1 * w1 + u * u * w2) / ww
    f2 = f2 + 2 * u * u * w1 * w1 / (ww * w)
    trial = (s - (f1 / f2).clamp(-max_step, max_step)).clamp(s_lo, s_hi)
    sh_t, u_t, w_t = projection(shape(trial, False)[0])
    c0, b0 = amplitudes(sh, u, w)
    c1, b1 = amplitudes(sh_t, u_t, w_t)
    better = (f2 < 0) & (u_t * u_t / w_t > u * u / w) & feasible(c1, b1)
    return (
        torch.where(better, trial, s),
        torch.where(better, c1, c0),
        torch.where(better, b1, b0),
    )


def _recovery_shape(ts: torch.Tensor) -> ShapeFn:
    """h = exp(−t/τ) in s = log τ: h' = h·a, h'' = h'·(a − 1) with a = t/τ (``ts (M,)``)."""

    def shape(s: torch.Tensor, derivatives: bool):
        a = ts[:, None] * torch.exp(-s)[None, :]
        h = torch.exp(-a)
        if not derivatives:
            return h, None, None
        h1 = h * a
        return h, h1, h1 * (a - 1.0)

    return shape


@torch.no_grad()
def recovery_start(
    t: torch.Tensor, data: torch.Tensor, tau_lo: float, tau_hi: float, n_tau: int = 48
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Start values (A, B, τ) for magnitude data ``|A − B·exp(−t/τ)|`` (each ``(V,)``).

    Polarity restoration: the signal crosses zero at most once, near its smallest magnitude sample
    (index kmin in time order). Candidates negate the first k samples for k ∈ {0, kmin−1, kmin,
    kmin+1, kmin+2}: with noise, the smallest sample may sit one step past the crossing when two
    TIs straddle it. For every candidate and every τ on a log grid, (A, B) follow by linear least
    squares in closed form; the combination with the smallest residual (refined between grid
    points by a parabola in log τ) wins. This resolves the magnitude sign ambiguity without
    iterating. One Newton step on the winner's projected cost (:func:`polish_on_shape`) then
    takes τ to its least-squares optimum, so LM's first iteration usually only confirms it.

    How the grid search stays cheap: with q_τ the unit vector along the centred decay
    e_τ − mean(e_τ), the least-squares residual of y ≈ A − B·e_τ is
    ‖y‖² − M·ȳ² − c², c = q_τ·y, with B = −c/‖e_τ − ē_τ‖ and A = ȳ + B·ē_τ. So the whole
    (voxel × candidate × τ) search is one float32 matrix product ``Y @ Qᵀ`` plus a feasibility
    test (A, B > 0) and an argmax of c² — the cost's float64 cancellation (‖y‖² − …) is only
    evaluated at each candidate's three best grid points.
    """
    order = torch.argsort(t)
    ts = t[order].to(torch.float64)
    # samples in time order, in the (M, V) layout used throughout: reductions over the M samples
    # and over the 5 candidates run across contiguous voxel rows (a reduction over a short last
    # axis, or a per-voxel mask broadcast along it, costs several vector passes)
    dT = data.T.index_select(0, order).abs().to(torch.float64)  # (M, V)
    M, V = dT.shape
    # the first smallest sample (argmin's rule), row by row
    smallest, kmin = dT[0], torch.zeros(V, dtype=torch.long, device=dT.device)
    for m in range(1, M):
        kmin = kmin.masked_fill(dT[m] < smallest, m)
        smallest = torch.minimum(smallest, dT[m])
    k = torch.stack([torch.zeros_like(kmin), kmin - 1, kmin, kmin + 1, kmin + 2]).clamp(0, M)
    K = k.shape[0]
    # candidate k's mean: (Σ d − 2·Σ_{m<k} d_m)/M, from one cumulative sum
    head = torch.nn.functional.pad(dT.cumsum(0), (0, 0, 1, 0))  # (M+1, V): Σ_{m<k} d_m
    ybar = (head[-1] - 2 * head.gather(0, k)) / M  # (K, V)
    # ‖y − ȳ‖² per candidate: the residual of the constant-only fit
    spread = (dT * dT).sum(0) - M * ybar * ybar  # (K, V)
    log_lo, log_hi = math.log(tau_lo), math.log(tau_hi)
    logs = torch.linspace(log_lo, log_hi, n_tau, dtype=torch.float64, device=dT.device)
    E = torch.exp(-ts[None, :] / torch.exp(logs)[:, None])  # (G, M)
    ebar = E.mean(-1)  # (G,)
    Ec = E - ebar[:, None]
    norm = Ec.norm(dim=-1)  # (G,) ‖e − ē‖ > 0 for every finite τ
    Q = Ec / norm[:, None]  # (G, M) orthonormal to the constant
    # A > 0  <=>  c < ȳ·‖e − ē‖/ē ; B > 0  <=>  c < 0: both at once as c < min(ȳ, 0)·ratio
    ratio = norm / ebar  # (G,)
    # one product gives −c for every τ, in the (τ, candidate·voxel) layout: every step below is a
    # pass over contiguous rows, and the reduction over τ runs across rows (vectorised)
    nQ = Q.neg().to(torch.float32)  # (G, M)
    ratio32 = ratio.to(torch.float32)[:, None]  # (G, 1)
    n = K * V
    # the candidates' signed data, built in the layout of the product: (M, K·V), float32
    # sign(m + ½ − k) is −1 for the first k samples, +1 after (a multiply: a boolean select is
    # several times slower on this many elements)
    half = torch.arange(M, dtype=torch.float32, device=dT.device) + 0.5
    sgn = torch.sign(half[:, None, None] - k[None].to(torch.float32))  # (M, K, V)
    Yt = sgn.mul_(dT.to(torch.float32)[:, None, :]).reshape(M, n)
    # feasible  <=>  −c > max(−ȳ, 0)·ratio
    limit = (-ybar).clamp(min=0.0).reshape(1, n).to(torch.float32)
    # the argmax over τ by one integer max: for non-negative floats the int32 bit patterns sort
    # like the values, so the low 6 bits can carry the grid index (ties within 2⁻¹⁷ relative go
    # to either neighbour; the parabola through the three points below sees both)
    if n_tau > 64:
        raise ParameterError(f"recovery_start: n_tau must be <= 64, got {n_tau}")
    index_bits = torch.arange(n_tau, dtype=torch.int32, device=dT.device)[:, None]
    three = torch.arange(-1, 2, device=dT.device)[:, None]
    g = torch.empty(n, dtype=torch.long, device=dT.device)
    best3 = torch.empty((3, n), dtype=torch.float32, device=dT.device)
    chunk = max(1, min(n, _START_CHUNK * K))
    work, thr = (torch.empty((n_tau, chunk), dtype=torch.float32, device=dT.device) for _ in "ab")
    for i in range(0, n, chunk):
        j = min(n, i + chunk)
        nc = torch.matmul(nQ, Yt[:, i:j], out=work[:, : j - i])
        # feasible (A, B > 0) points keep −c > 0, the others become 0 (no better than a
        # constant); the best grid point has the largest −c
        bound = torch.mul(ratio32, limit[:, i:j], out=thr[:, : j - i])
        score = nc.mul_(bound.lt_(nc))
        key = score.view(torch.int32).bitwise_and(-64)  # a new tensor: score stays intact
        gc = key.bitwise_or_(index_bits).amax(dim=0).bitwise_and_(63).long()
        gi = gc.clamp(1, n_tau - 2)[None, :] + three  # (3, v) the best point and neighbours
        g[i:j] = gi[1]
        best3[:, i:j] = score.gather(0, gi)
    # each candidate's least-squares cost ‖y − ȳ‖² − c² at those points (float64: the
    # difference is small against both terms); 0 marks an infeasible point
    v3 = best3.to(torch.float64).reshape(3, K, V)
    cost3 = torch.addcmul(spread, v3, v3, value=-1.0).masked_fill_(v3 <= 0, float("inf"))
    c_m, c_0, c_p = cost3.unbind(0)  # (K, V) each
    step = float(logs[1] - logs[0])
    curv = c_m - 2 * c_0 + c_p
    usable = torch.isfinite(c_m) & torch.isfinite(c_p) & (curv > 0)
    offset = torch.where(usable, 0.5 * (c_m - c_p) / torch.where(usable, curv, 1.0), 0.0).clamp(
        -1, 1
    )
    c_min = torch.where(usable, c_0 - 0.25 * (c_m - c_p) * offset, c_0)
    # the best candidate per voxel (the first of equal ones, as argmin), row by row
    best_c, best_k = c_min[0], torch.zeros(V, dtype=torch.long, device=dT.device)
    for j in range(1, K):
        better = c_min[j] < best_c
        best_c = torch.where(better, c_min[j], best_c)
        best_k = best_k.masked_fill(better, j)
    pick = best_k[None]  # (1, V)
    log_tau = logs[g.reshape(K, V).gather(0, pick)[0]] + offset.gather(0, pick)[0] * step
    log_tau = log_tau.clamp(log_lo, log_hi)
    half64 = torch.arange(M, dtype=torch.float64, device=dT.device) + 0.5
    y = torch.sign(half64[:, None] - k.gather(0, pick).to(torch.float64)).mul_(dT)  # (M, V)
    # (A, B) in closed form for the chosen candidate (y ≈ A − B·e), at τ polished by one Newton
    # step on the projected cost
    log_tau, a, b = polish_on_shape(
        y,
        _recovery_shape(ts),
        log_tau,
        constant=True,
        max_step=step,
        s_lo=log_lo,
        s_hi=log_hi,
        feasible=lambda c, beta: (c > 0) & (beta < 0),
    )
    b = -b
    fail = ~torch.isfinite(best_c) | (a <= 0) | (b <= 0)
    tau = log_tau.exp()
    a, b, tau = (torch.where(fail, torch.full_like(a, float("nan")), x) for x in (a, b, tau))
    return a.to(data.dtype), b.to(data.dtype), tau.to(data.dtype)


class MolliT1(Model):
    """MOLLI T1: S(TI) = |A − B·exp(−TI/T1*)|, T1 = T1*·(B/A − 1) (Look–Locker correction).

    Parameters
    ----------
    ti : sequence of float
        Inversion times in ms, one per image of the series (any order, e.g. the 8 TIs of a
        5(3)3 MOLLI).
    """

    name = "molli"
    measurement_axis = "inversion times (ti)"
    parameters = (
        Parameter("A", 0.0, 10.0, "a.u.", amplitude=True, description="apparent steady state"),
        Parameter("B", 0.0, 30.0, "a.u.", amplitude=True, description="inversion amplitude"),
        Parameter(
            "T1star",
            1.0,
            6000.0,
            "ms",
            start=1000.0,
            log_scale=True,
            description="apparent (Look-Locker) T1",
        ),
    )
    map_names = {"T1": "T1map", "T1star": "T1starmap", "A": "Amap", "B": "Bmap"}
    derived_units = {"T1": "ms"}

    def __init__(self, ti: Sequence[float]):
        ti_ms = _vector("ti", ti, unit="ms")
        # MOLLI TIs span ~100-5000 ms; all below 10 is the same schedule written in seconds
        _check_times_ms("ti", ti_ms, seconds_below=10.0)
        super().__init__(ti=ti_ms)

    def forward(self, p: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.abs(p["A"] - p["B"] * torch.exp(-self.ti / p["T1star"]))

    def jacobian(self, p):
        """Signal and closed-form derivatives (each ``(V, n_ti)``, per a.u. or per ms).

        With u = A − B·e, e = exp(−TI/T1*): ∂|u| = sign(u)·∂u (sign 0 at u = 0, as autograd),
        ∂u/∂A = 1, ∂u/∂B = −e, ∂u/∂T1* = −B·e·TI/T1*².
        """
        t = p["T1star"]
        e = torch.exp(-self.ti / t)
        be = p["B"] * e
        u = p["A"] - be
        sgn = torch.sign(u)
        return u.abs(), {
            "A": sgn.expand_as(u),
            "B": -sgn * e,
            "T1star": -sgn * be * self.ti / (t * t),
        }

    def vjp_by_measurement(self, p, work=None):
        """Signal ``(n_ti, V)`` and its vector–Jacobian product (see
        :meth:`~qmrkit.fit.Model.vjp_by_measurement`) from ``(1, V)`` rows.

        With g = q·sign(u): Σ w·q·∂|u|/∂A = w·g, ∂/∂B = −w·(g·e), ∂/∂T1* = −(B/T1*²)·(w·TI)·(g·e):
        the product g·e serves B and T1*, so the contraction costs two ``(n_ti, V)`` products.
        """
        t, b = p["T1star"], p["B"]
        ti = self.ti[:, None]  # (n_ti, 1)
        shape = (ti.shape[0], t.shape[1])
        e = torch.mul(ti, -1.0 / t, out=scratch(work, "molli.e", shape, t)).exp_()
        u = torch.mul(b, e, out=scratch(work, "molli.u", shape, t))
        torch.sub(p["A"], u, out=u)  # u = A − B·e
        sgn = torch.sign(u, out=scratch(work, "molli.sgn", shape, t))

        def vjp(q, w, out):
            g = torch.mul(q, sgn, out=scratch(work, "molli.g", shape, t))
            torch.mv(g.T, w, out=out["A"])
            g.mul_(e)
            torch.mv(g.T, -w, out=out["B"])
            torch.mv(g.T, w * self.ti, out=out["T1star"]).mul_((b / (t * t)).reshape(-1).neg_())
            return out

        return u.abs_(), vjp

    def initial_guess(self, data, inputs):
        lo, hi = self.parameter("T1star").lower, self.parameter("T1star").upper
        a, b, tau = recovery_start(self.ti, data, max(lo, 5.0), min(hi, 5000.0))
        return {"A": a, "B": b, "T1star": tau}

    def derived(self, p):
        ratio = p["B"] / p["A"]
        return {"T1": (p["T1star"] * (ratio - 1.0)).reshape(-1)}


class InversionRecovery(Model):
    """Inversion recovery (long TR): S(TI) = |M0·(1 − (1 + η)·exp(−TI/T1))|.

    η is the inversion efficiency (1: perfect 180° inversion, 0: saturation recovery).

    Parameters
    ----------
    ti : sequence of float
        Inversion times in ms.
    """

    name = "ir"
    measurement_axis = "inversion times (ti)"
    parameters = (
        Parameter("M0", 0.0, 10.0, "a.u.", amplitude=True, description="equilibrium signal"),
        Parameter(
            "T1",
            1.0,
            10000.0,
            "ms",
            start=1000.0,
            log_scale=True,
            description="longitudinal relaxation time",
        ),
        Parameter("eta", 0.0, 1.5, "", start=1.0, description="inversion efficiency"),
    )
    map_names = {"T1": "T1map", "M0": "M0map", "eta": "InversionEfficiencymap"}

    def __init__(self, ti: Sequence[float]):
        ti_ms = _vector("ti", ti, unit="ms")
        _check_times_ms("ti", ti_ms, seconds_below=10.0)
        super().__init__(ti=ti_ms)

    def forward(self, p):
        return torch.abs(p["M0"] * (1.0 - (1.0 + p["eta"]) * torch.exp(-self.ti / p["T1"])))

    def jacobian(self, p):
        """Signal and closed-form derivatives (each ``(V, n_ti)``).

        With u = M0·(1 − k·e), k = 1 + η, e = exp(−TI/T1): ∂|u| = sign(u)·∂u,
        ∂u/∂M0 = 1 − k·e, ∂u/∂T1 = −M0·k·e·TI/T1², ∂u/∂η = −M0·e.
        """
        t1, m0 = p["T1"], p["M0"]
        e = torch.exp(-self.ti / t1)
        ke = (1.0 + p["eta"]) * e
        shape = 1.0 - ke
        u = m0 * shape
        sgn = torch.sign(u)
        return u.abs(), {
            "M0": sgn * shape,
            "T1": -sgn * m0 * ke * self.ti / (t1 * t1),
            "eta": -sgn * m0 * e,
        }

    def vjp_by_measurement(self, p, work=None):
        """Signal ``(n_ti, V)`` and its vector–Jacobian product (see
        :meth:`~qmrkit.fit.Model.vjp_by_measurement`) from ``(1, V)`` rows.

        With g = q·sign(u) and k = 1 + η: Σ w·q·∂|u|/∂M0 = w·g − k·(w·(g·e)),
        ∂/∂η = −M0·(w·(g·e)), ∂/∂T1 = −(M0·k/T1²)·((w·TI)·(g·e)): the product g·e serves all
        three parameters, so the contraction costs two ``(n_ti, V)`` products.
        """
        t1, m0 = p["T1"], p["M0"]
        k = 1.0 + p["eta"]  # (1, V)
        ti = self.ti[:, None]  # (n_ti, 1)
        shape = (ti.shape[0], t1.shape[1])
        e = torch.mul(ti, -1.0 / t1, out=scratch(work, "ir.e", shape, t1)).exp_()
        # u = M0·(1 − k·e), the negation (exact) on the (1, V) row
        u = torch.mul(e, k.neg(), out=scratch(work, "ir.u", shape, t1))
        u.add_(1.0).mul_(m0)
        sgn = torch.sign(u, out=scratch(work, "ir.sgn", shape, t1))

        def vjp(q, w, out):
            g = torch.mul(q, sgn, out=scratch(work, "ir.g", shape, t1))
            m0_row, k_row = m0.reshape(-1), k.reshape(-1)
            torch.mv(g.T, w, out=out["M0"])
            g.mul_(e)
            ge = torch.mv(g.T, w, out=out["eta"])
            # ∂/∂M0 = Σ w·g·(1 − k·e): the shared Σ w·g·e enters with factor −k
            out["M0"].addcmul_(k_row, ge, value=-1.0)
            torch.mv(g.T, w * self.ti, out=out["T1"]).mul_((m0_row * k_row / (t1 * t1)[0]).neg_())
            ge.mul_(m0_row).neg_()
            return out

        return u.abs_(), vjp

    def initial_guess(self, data, inputs):
        a, b, tau = recovery_start(self.ti, data, 5.0, 8000.0)
        return {"M0": a, "T1": tau, "eta": (b / a - 1.0).clamp(0.0, 1.5)}


class VfaT1(Model):
    """Variable flip angle T1 (spoiled gradient echo, DESPOT1), optionally B1-corrected.

    S(α) = M0·sin(α·B1)·(1 − E1) / (1 − cos(α·B1)·E1), E1 = exp(−TR/T1).

    Parameters
    ----------
    flip_angles : sequence of float
        Nominal flip angles in degrees, one per image.
    tr : float
        Repetition time in ms.
    b1 : array or float, optional
        B1 map (fraction of nominal) in the image shape, or a scalar; default 1.
    """

    name = "vfa"
    measurement_axis = "flip angles (flip_angles)"
    covariates = ("b1",)
    parameters = (
        Parameter("M0", 0.0, 1000.0, "a.u.", amplitude=True, description="equilibrium signal"),
        Parameter(
            "T1",
            1.0,
            10000.0,
            "ms",
            start=1000.0,
            log_scale=True,
            description="longitudinal relaxation time",
        ),
    )
    map_names = {"T1": "T1map", "M0": "M0map"}

    def __init__(self, flip_angles: Sequence[float], tr: float, b1: Any = None):
        fa = _vector("flip_angles", flip_angles, unit="degrees")
        if (fa <= 0).any() or (fa >= 180).any():
            raise ParameterError(f"flip_angles must be in (0, 180) degrees, got {fa}")
        if fa.size < 2:
            raise ShapeError("VFA T1 needs at least two flip angles")
        if float(fa.max()) <= math.pi / 2:
            # VFA protocols use a few to ~20 degrees; all at most π/2 is radians
            _warn_units(
                f"flip_angles = {_short(fa)} look like radians; qmrkit expects degrees "
                f"(e.g. {_short(np.rad2deg(fa).round(1))}); fitting as given"
            )
        tr_ms = _scalar("tr", tr, "ms")
        if tr_ms < 1.0:  # spoiled-GRE TRs are ~3-50 ms; 0.015 is 15 ms written in seconds
            _warn_units(
                f"tr = {tr_ms:g} looks like seconds; qmrkit expects milliseconds "
                f"(e.g. {tr_ms * 1000:g}); fitting as given"
            )
        super().__init__(covariate_maps={"b1": b1}, flip_angles=fa, tr=tr_ms)

    def forward(self, p):
        a = torch.deg2rad(self.flip_angles) * p.get("b1", 1.0)
        e1 = torch.exp(-self.tr / p["T1"])
        return p["M0"] * torch.sin(a) * (1.0 - e1) / (1.0 - torch.cos(a) * e1)

    def jacobian(self, p):
        """Signal and closed-form derivatives (each ``(V, n_flip)``).

        With E = exp(−TR/T1), c = cos α, q = 1 − c·E: ∂S/∂M0 = sin α·(1 − E)/q and
        ∂S/∂T1 = M0·sin α·(c − 1)/q² · ∂E/∂T1, ∂E/∂T1 = E·TR/T1². B1 is an input, not fitted.
        """
        a = torch.deg2rad(self.flip_angles) * p.get("b1", 1.0)
        t1, m0 = p["T1"], p["M0"]
        e1 = torch.exp(-self.tr / t1)
        sin_a, cos_a = torch.sin(a), torch.cos(a)
        inv_q = 1.0 / (1.0 - cos_a * e1)
        shape = sin_a * (1.0 - e1) * inv_q
        d_e1 = m0 * sin_a * (cos_a - 1.0) * inv_q * inv_q
        return m0 * shape, {"M0": shape, "T1": d_e1 * (e1 * self.tr / (t1 * t1))}

    def _angles_by_measurement(self, b1, work):
        """sin α, cos α and cos α − 1 for α = flip angle·B1: ``(n_flip, 1)`` without a B1 row,
        else ``(n_flip, V)``, kept in ``work`` and reused while B1 is unchanged (B1 is an input,
        constant during a fit; recomputing them made an evaluation with its vjp 1.6× (float32)
        to 2.1× (float64) slower, 4,096 voxels × 5 angles, one thread)."""
        a = torch.deg2rad(self.flip_angles)[:, None]  # (n_flip, 1)
        if not isinstance(b1, torch.Tensor) or b1.numel() == 1:
            a = a * (1.0 if b1 is None else b1)
            cos_a = torch.cos(a)
            return torch.sin(a), cos_a, cos_a - 1.0
        shape = (a.shape[0], b1.shape[-1])
        bufs = tuple(scratch(work, f"vfa.{k}", shape, b1) for k in ("sin", "cos", "cm1"))
        cached = None if work is None else work.get("vfa.b1")
        if (
            cached is not None
            and cached.shape == b1.shape
            and cached.dtype == b1.dtype
            and cached.device == b1.device
            and torch.equal(cached, b1)
        ):
            return bufs
        sin_a, cos_a, cm1 = bufs
        torch.mul(a, b1, out=cm1)
        torch.sin(cm1, out=sin_a)
        torch.cos(cm1, out=cos_a)
        torch.sub(cos_a, 1.0, out=cm1)
        if work is not None:
            work["vfa.b1"] = b1.clone()
        return bufs

    def vjp_by_measurement(self, p, work=None):
        """Signal ``(n_flip, V)`` and its vector–Jacobian product (see
        :meth:`~qmrkit.fit.Model.vjp_by_measurement`) from ``(1, V)`` rows (B1 included).

        With E = exp(−TR/T1), D = 1 − cos α·E and h = sin α·(1 − E)/D: S = M0·h,
        Σ w·q·∂S/∂M0 = w·(q·h) and Σ w·q·∂S/∂T1 = (M0·E·TR/(T1²·(1 − E)))·(w·(q·h·(cos α − 1)/D)):
        q·h serves both parameters. The signal is rounded as :meth:`forward` and
        :meth:`jacobian` round it: ``fit.adam``'s freeze rule is an exact comparison of losses,
        and the more accurate D = (1 − E) − (cos α − 1)·E froze 12–28 fewer of 300 voxels
        than the ``(V, P)`` engine in an L2 fit (the same maps to 2e-8).
        """
        t1, m0 = p["T1"], p["M0"]
        sin_a, cos_a, cm1 = self._angles_by_measurement(p.get("b1"), work)
        shape = (self.flip_angles.shape[0], t1.shape[1])
        e1 = torch.exp(-self.tr / t1)  # (1, V)
        one_m_e1 = 1.0 - e1  # > 0: T1 is bounded
        # 1 − cos α·E as −(cos α·E) + 1: the negation (exact) on the (1, V) row saves a pass
        inv_d = torch.mul(cos_a, e1.neg(), out=scratch(work, "vfa.invd", shape, t1))
        inv_d.add_(1.0).reciprocal_()
        h = torch.mul(sin_a, one_m_e1, out=scratch(work, "vfa.h", shape, t1)).mul_(inv_d)
        sig = torch.mul(h, m0, out=scratch(work, "vfa.sig", shape, t1))

        def vjp(q, w, out):
            g = torch.mul(q, h, out=scratch(work, "vfa.g", shape, t1))
            torch.mv(g.T, w, out=out["M0"])
            g.mul_(inv_d).mul_(cm1)
            factor = (m0 * e1 * (self.tr / (t1 * t1)) / one_m_e1).reshape(-1)
            torch.mv(g.T, w, out=out["T1"]).mul_(factor)
            return out

        return sig, vjp

    def initial_guess(self, data, inputs):
        b1 = inputs.get("b1")
        a = torch.deg2rad(self.flip_angles)[None, :] * (b1 if b1 is not None else 1.0)
        y = data / torch.sin(a)
        x = data / torch.tan(a)
        xm, ym = x.mean(1, keepdim=True), y.mean(1, keepdim=True)
        slope = ((x - xm) * (y - ym)).sum(1) / ((x - xm) ** 2).sum(1).clamp_min(1e-30)
        e1 = slope.clamp(1e-6, 1 - 1e-6)
        intercept = ym[:, 0] - slope * xm[:, 0]
        t1 = (-self.tr / torch.log(e1)).clamp(1.0, 10000.0)
        m0 = intercept / (1 - e1)
        bad = ~torch.isfinite(m0) | (m0 <= 0)
        # the linearised (DESPOT1) fit weights the samples unevenly; two Newton steps on the
        # least-squares cost in log T1 move it to the optimum LM would reach
        log_t1, _, m0_ls = polish_on_shape(
            data.T.to(torch.float64),
            self._log_t1_shape(a.T.to(torch.float64)),
            torch.log(t1).to(torch.float64),
            constant=False,
            max_step=0.5,
            s_lo=0.0,
            s_hi=math.log(10000.0),
            feasible=lambda c, beta: beta > 0,
            steps=2,
        )
        m0 = torch.where(bad, float("nan"), m0_ls.to(data.dtype))
        return {"M0": m0, "T1": log_t1.exp().to(data.dtype)}

    def _log_t1_shape(self, angles: torch.Tensor) -> Callable:
        """h = sin α·(1 − E1)/(1 − cos α·E1) and its derivatives in s = log T1, for
        :func:`polish_on_shape`; ``angles (M, V)`` or ``(M, 1)`` in radians (B1 applied).

        With E1 = exp(−b), b = TR/T1: dE1/ds = E1·b, d²E1/ds² = E1·b·(b − 1); dh/dE1 =
        sin α·(cos α − 1)/D², d²h/dE1² = 2·cos α·(dh/dE1)/D, D = 1 − cos α·E1."""
        sin_a, cos_a, tr = torch.sin(angles), torch.cos(angles), self.tr

        def shape(s: torch.Tensor, derivatives: bool):
            b = tr * torch.exp(-s)  # (V,)
            e1 = torch.exp(-b)
            den = 1.0 - cos_a * e1
            h = sin_a * (1.0 - e1) / den
            if not derivatives:
                return h, None, None
            dh = sin_a * (cos_a - 1.0) / (den * den)
            d2h = 2.0 * cos_a * dh / den
            e1s = e1 * b
            return h, dh * e1s, d2h * e1s * e1s + dh * (e1s * (b - 1.0))

        return shape


_DECAY_KINDS = {
    # kind: (parameter, unit, bounds, is_rate, BIDS stem, description)
    "T2": ("T2", "ms", (0.1, 5000.0), False, "T2map", "transverse relaxation time"),
    "T2star": (
        "T2star",
        "ms",
        (0.1, 2000.0),
        False,
        "T2starmap",
        "effective transverse relaxation time",
    ),
    "R2": ("R2", "1/s", (0.2, 10000.0), True, "R2map", "transverse relaxation rate"),
    "R2star": (
        "R2star",
        "1/s",
        (0.5, 10000.0),
        True,
        "R2starmap",
        "effective transverse relaxation rate",
    ),
}


class MonoExp(Model):
    """Mono-exponential decay: S(TE) = S0·exp(−TE/T2) (or T2*, R2 = 1000/T2, R2*), optional offset.

    Parameters
    ----------
    te : sequence of float
        Echo times in ms.
    kind : {"T2", "T2star", "R2", "R2star"}
        Which quantity to fit (rates in 1/s, times in ms).
    offset : bool
        Add a constant baseline C (e.g. a noise floor): S = S0·exp(−TE/T2) + C.
    """

    name = "monoexp"
    measurement_axis = "echo times (te)"

    def __init__(self, te: Sequence[float], kind: str = "T2", offset: bool = False):
        if kind not in _DECAY_KINDS:
            raise ParameterError(f"kind must be one of {sorted(_DECAY_KINDS)}, got {kind!r}")
        te_arr = _vector("te", te, unit="ms")
        if te_arr.size < 2:
            raise ShapeError("a decay fit needs at least two echo times")
        # echo trains reach at least a few ms (even liver R2* at 1-10 ms); all below 1 ms is
        # seconds (0.005, 0.01, ...)
        _check_times_ms("te", te_arr, seconds_below=1.0)
        name, unit, (lo, hi), is_rate, stem, desc = _DECAY_KINDS[kind]
        self.kind, self.offset, self._is_rate, self._pname = kind, bool(offset), is_rate, name
        params = [
            Parameter("S0", 0.0, 100.0, "a.u.", amplitude=True, description="signal at TE = 0"),
            Parameter(
                name,
                lo,
                hi,
                unit,
                start=50.0 if not is_rate else 20.0,
                log_scale=True,
                description=desc,
            ),
        ]
        if offset:
            params.append(Parameter("C", 0.0, 1.0, "a.u.", amplitude=True, description="baseline"))
        self.parameters = tuple(params)
        self.map_names = {name: stem, "S0": "S0map", "C": "Cmap"}
        super().__init__(te=te_arr)

    def _decay(self, p):
        x = p[self._pname]
        return torch.exp(-self.te * x / 1000.0) if self._is_rate else torch.exp(-self.te / x)

    def forward(self, p):
        s = p["S0"] * self._decay(p)
        return s + p["C"] if self.offset else s

    def jacobian(self, p):
        """Signal and closed-form derivatives (each ``(V, n_te)``).

        ∂S/∂S0 = d with d the decay; ∂S/∂T2 = S0·d·TE/T2² for times, ∂S/∂R2 = −S0·d·TE/1000
        for rates (1/s with TE in ms); ∂S/∂C = 1.
        """
        x = p[self._pname]
        d = self._decay(p)
        s = p["S0"] * d
        ds = -s * self.te / 1000.0 if self._is_rate else s * self.te / (x * x)
        grads = {"S0": d, self._pname: ds}
        if self.offset:
            grads["C"] = torch.ones_like(s)
            s = s + p["C"]
        return s, grads

    def vjp_by_measurement(self, p, work=None):
        """Signal ``(n_te, V)`` and its vector–Jacobian product (see
        :meth:`~qmrkit.fit.Model.vjp_by_measurement`) from ``(1, V)`` rows.

        With d the decay and g = q·d: Σ w·q·∂S/∂S0 = w·g, ∂/∂T2 = (S0/T2²)·((w·TE)·g) for times,
        ∂/∂R2 = −(S0/1000)·((w·TE)·g) for rates, ∂/∂C = w·q: one ``(n_te, V)`` product.
        """
        x, s0 = p[self._pname], p["S0"]
        te = self.te[:, None]  # (n_te, 1)
        shape = (te.shape[0], x.shape[1])
        # −TE·x/1000 and −TE/x by forward's operations (a division, not a product with 1/x), so
        # that both engines of fit.adam see the same signal up to exp's own rounding
        d = scratch(work, "monoexp.d", shape, x)
        if self._is_rate:
            torch.mul(te, x, out=d).div_(-1000.0).exp_()
        else:
            torch.div(te, x, out=d).neg_().exp_()
        sig = torch.mul(d, s0, out=scratch(work, "monoexp.sig", shape, x))
        if self.offset:
            sig.add_(p["C"])

        def vjp(q, w, out):
            g = torch.mul(q, d, out=scratch(work, "monoexp.g", shape, x))
            torch.mv(g.T, w, out=out["S0"])
            factor = s0 * (-1.0 / 1000.0) if self._is_rate else s0 / (x * x)
            torch.mv(g.T, w * self.te, out=out[self._pname]).mul_(factor.reshape(-1))
            if self.offset:
                torch.mv(q.T, w, out=out["C"])
            return out

        return sig, vjp

    def initial_guess(self, data, inputs):
        # weighted log-linear fit (weights S², which undoes the log's noise amplification)
        s = data.abs().clamp_min(1e-12 * float(data.abs().max()) + 1e-30)
        y = torch.log(s)
        w = s * s
        te = self.te[None, :]
        sw = w.sum(1)
        tm = (w * te).sum(1) / sw
        ym = (w * y).sum(1) / sw
        slope = (w * (te - tm[:, None]) * (y - ym[:, None])).sum(1) / (
            (w * (te - tm[:, None]) ** 2).sum(1).clamp_min(1e-30)
        )
        rate = (-slope).clamp_min(1e-6)  # 1/ms
        s0 = torch.exp(ym + rate * tm)
        lo, hi = self.parameter(self._pname).lower, self.parameter(self._pname).upper
        if not self.offset:
            # the log-linear fit is not the least-squares one: two Newton steps on the
            # least-squares cost in log T2 move it to the optimum LM would reach
            lo_ms, hi_ms = (1000.0 / hi, 1000.0 / lo) if self._is_rate else (lo, hi)
            log_t2, _, s0_ls = polish_on_shape(
                (data.abs() if data.is_complex() else data).T.to(torch.float64),
                _recovery_shape(self.te.to(torch.float64)),
                (-torch.log(rate)).to(torch.float64).clamp(math.log(lo_ms), math.log(hi_ms)),
                constant=False,
                max_step=0.5,
                s_lo=math.log(lo_ms),
                s_hi=math.log(hi_ms),
                feasible=lambda c, beta: beta > 0,
                steps=2,
            )
            rate = torch.exp(-log_t2).to(data.dtype)
            s0 = torch.where(torch.isfinite(s0), s0_ls.to(data.dtype), s0)
        val = (rate * 1000.0) if self._is_rate else 1.0 / rate
        out = {"S0": s0, self._pname: val.clamp(lo, hi)}
        if self.offset:
            out["C"] = torch.zeros_like(s0)
        return out
