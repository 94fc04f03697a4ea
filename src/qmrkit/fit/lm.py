"""Batched Levenberg–Marquardt over all voxels at once.

Each voxel is an independent small least-squares problem. All of them iterate together: residuals
and Jacobians of every active voxel come from the model's closed-form derivatives when it has them,
else from one batched autodiff pass (see :func:`residual_and_jacobian`); the P×P damped normal
equations are solved in float64 for every voxel at once (an unrolled Cholesky over voxel vectors
for few parameters), and damping, acceptance and convergence are decided per voxel. A converged
voxel leaves the active set, so it stops costing compute.

Damping follows Nielsen's gain-ratio rule with Marquardt's diagonal scaling (scale-invariant in each
parameter); bounds are respected by projecting each trial step onto the box.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD

from .._progress import _NullBar, get_logger, progress_bar
from ..errors import ConvergenceWarning, ParameterError
from .problem import Problem, make_problem
from .result import FitResult
from .starts import initial_theta

log = get_logger("fit.lm")

#: convergence reasons stored per voxel in ``FitResult.settings["reasons"]`` counts
REASONS = {0: "running", 1: "ftol", 2: "xtol", 3: "exact", 4: "stalled", -1: "max_iter"}


_FORWARD_AD_READY = False
_FORWARD_AD_LOCK = threading.Lock()


def _load_forward_ad() -> None:
    """Torch loads its forward-mode decompositions on first use (≈1 s, once per process) and
    emits a DeprecationWarning about torch.jit.script while doing so; keep that out of users' logs.

    Under a lock: two threads loading them at once (a server fitting two sessions) run
    torch.jit.script's ``ast`` parsing concurrently, which CPython 3.11 does not survive
    ("SystemError: AST constructor recursion depth mismatch")."""
    global _FORWARD_AD_READY
    if _FORWARD_AD_READY:
        return
    with _FORWARD_AD_LOCK:
        if not _FORWARD_AD_READY:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                with fwAD.dual_level():
                    fwAD.make_dual(torch.zeros(1), torch.zeros(1))
            _FORWARD_AD_READY = True


JACOBIAN_MODES = ("auto", "model", "forward", "reverse")


def residual_and_jacobian(
    problem: Problem,
    theta: torch.Tensor,
    idx: torch.Tensor | slice | None = None,
    mode: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residuals ``(v, m)`` and Jacobian ``(v, m, P)`` of voxels ``idx`` at ``theta (v, P)``.

    ``mode``:

    * ``"model"``: the model's closed-form derivatives (:meth:`Model.jacobian`); no autodiff at all,
      hence no framework overhead (relaxometry models, NEXI);
    * ``"forward"``: forward-mode autodiff in one pass over a stacked batch: θ repeated P times
      with one-hot tangents (each voxel's residual depends only on its own parameters, so block j
      of the output tangent is Jacobian column j); one forward pass of the model instead of P;
    * ``"reverse"``: reverse mode, one backward pass per residual component (C++ autograd only);
      also the fallback when a model uses an operation without a forward-mode formula;
    * ``"auto"``: ``"model"`` when the model has derivatives, else ``"forward"`` when P is smaller
      than the number of residual components m, else ``"reverse"`` (fewer passes either way).
      Note torch loads its forward-mode machinery on the first forward-mode call of a process
      (≈1.5 s); models with closed-form derivatives never pay it.
    """
    if mode not in JACOBIAN_MODES:
        raise ParameterError(f"jacobian must be one of {JACOBIAN_MODES}, got {mode!r}")
    theta = theta.detach()
    if mode in ("auto", "model"):
        own = problem.model_jacobian(theta, idx)  # the model's closed-form derivatives, if any
        if own is not None:
            return own[0].detach(), own[1].detach()
        if mode == "model":
            raise ParameterError(
                f"jacobian='model' but the {problem.model.name} model has no closed-form "
                "derivatives (Model.jacobian returns None); use 'auto', 'forward' or 'reverse'"
            )
    P = theta.shape[1]
    if mode == "auto":
        m = problem.n_meas * (2 if problem.data.is_complex() else 1)
        mode = "forward" if P < m else "reverse"
    if mode == "forward":
        try:
            return _forward_jacobian(problem, theta, idx)
        except (RuntimeError, NotImplementedError) as exc:  # pragma: no cover - exotic models
            log.debug("forward-mode Jacobian failed (%s); using reverse mode", exc)
    return _reverse_jacobian(problem, theta, idx)


def _voxel_index(problem: Problem, idx: torch.Tensor | slice | None) -> torch.Tensor:
    """Voxel indices as a tensor (the stacked batch repeats them)."""
    if isinstance(idx, torch.Tensor):
        return idx
    every = torch.arange(problem.n_voxels, device=problem.device)
    return every if idx is None else every[idx]


def _forward_jacobian(
    problem: Problem, theta: torch.Tensor, idx: torch.Tensor | slice | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """All P Jacobian columns from one forward-mode pass over a P-fold stacked batch."""
    v, P = theta.shape
    _load_forward_ad()
    rows = _voxel_index(problem, idx).repeat(P)
    stacked = theta.repeat(P, 1)  # block j holds every voxel, with tangent e_j
    tangent = torch.eye(P, dtype=theta.dtype, device=theta.device).repeat_interleave(v, dim=0)
    with fwAD.dual_level():
        out = fwAD.unpack_dual(problem.residual(fwAD.make_dual(stacked, tangent), rows))
    r = out.primal[:v]
    if out.tangent is None:  # the residual does not depend on the parameters at all
        return r.detach(), torch.zeros(*r.shape, P, dtype=r.dtype, device=r.device)
    J = out.tangent.reshape(P, v, -1).permute(1, 2, 0)
    return r.detach(), J.detach()


def _reverse_jacobian(
    problem: Problem, theta: torch.Tensor, idx: torch.Tensor | slice | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One reverse-mode pass per residual component (the rows of every voxel's Jacobian)."""
    with torch.enable_grad():
        th = theta.clone().requires_grad_(True)
        r = problem.residual(th, idx)
        m = r.shape[1]
        rows = [
            torch.autograd.grad(r[:, k].sum(), th, retain_graph=k < m - 1, allow_unused=True)[0]
            for k in range(m)
        ]
        rows = [torch.zeros_like(th) if g is None else g for g in rows]
    return r.detach(), torch.stack(rows, dim=1).detach()


#: up to this many parameters the damped P×P systems are solved by an unrolled Cholesky written
#: with (V,)-vector operations: LAPACK's batched routines loop over the voxels one small matrix at a
#: time (≈5 ms for 16k 3×3 systems on one core), the unrolled form costs ≈P³/3 vector operations
_UNROLLED_MAX_P = 6


def _cholesky_solve_small(A: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve ``A x = b`` for SPD ``A (V, P, P)`` and ``b (V, P)``; also returns a ``(V,)`` flag that
    is False where the factorisation fails (a pivot ≤ 0 or NaN, LAPACK's ``potrf`` rule)."""
    P = A.shape[-1]
    entries = [[A[:, i, j] for j in range(P)] for i in range(P)]
    x, ok = _cholesky_solve_entries(entries, b.unbind(-1))
    return torch.stack(x, dim=-1), ok


def _cholesky_solve_entries(
    A: Sequence[Sequence[torch.Tensor]], b: Sequence[torch.Tensor]
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """:func:`_cholesky_solve_small` on the entries ``A[i][j]`` and ``b[i]`` (each ``(V,)``), as
    (V,)-vector operations; returns the columns of ``x`` and the success flag."""
    P = len(b)
    L: list[list[torch.Tensor]] = [[] for _ in range(P)]  # L[i][k], k <= i
    ok = None
    for j in range(P):
        s = A[j][j]
        for k in range(j):
            s = s - L[j][k] * L[j][k]
        ok = (s > 0) if ok is None else ok & (s > 0)
        d = torch.sqrt(s)
        for i in range(j + 1, P):
            t = A[i][j]
            for k in range(j):
                t = t - L[i][k] * L[j][k]
            L[i].append(t / d)
        L[j].append(d)
    y: list[torch.Tensor] = []
    for i in range(P):  # L y = b
        t = b[i]
        for k in range(i):
            t = t - L[i][k] * y[k]
        y.append(t / L[i][i])
    x: list[torch.Tensor] = [y[0]] * P
    for i in reversed(range(P)):  # Lᵀ x = y
        t = y[i]
        for k in range(i + 1, P):
            t = t - L[k][i] * x[k]
        x[i] = t / L[i][i]
    assert ok is not None
    return x, ok


def _damped_step(
    H: torch.Tensor,
    g: torch.Tensor,
    lam: torch.Tensor,
    theta: torch.Tensor,
    lower: torch.Tensor,
    upper: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve (H + λ·diag(H)) δ = −g per voxel over the free parameters; returns δ and a flag.

    Box constraints by an active set: a parameter on a bound whose gradient points out of the box
    is held fixed (its row and column removed), so the step for the others is the correct reduced
    Levenberg–Marquardt step rather than a projection of an infeasible one (which can stall).
    ``lower``/``upper`` are float64.
    """
    th = theta.double()
    tiny = 1e-12 * (th.abs() + 1.0)
    active = ((th <= lower + tiny) & (g > 0)) | ((th >= upper - tiny) & (g < 0))
    if bool(active.any()):
        free = (~active).double()
        H = H * free[:, :, None] * free[:, None, :] + torch.diag_embed(active.double())
        g = g * free
    P = H.shape[-1]
    if P <= _UNROLLED_MAX_P:
        # entry by entry: (V,)-vector operations on views of H, no (V, P, P) temporaries, and
        # no reductions over the short last axis (each costs as much as several vector ops)
        entries = [[H[:, i, j] for j in range(P)] for i in range(P)]
        diag = [entries[j][j] for j in range(P)]
        top = diag[0]
        for dj in diag[1:]:
            top = torch.maximum(top, dj)
        floor = top * 1e-12 + 1e-300
        for j in range(P):
            entries[j][j] = diag[j] + lam * torch.maximum(diag[j], floor)
        cols, ok = _cholesky_solve_entries(entries, (-g).unbind(-1))
        total = cols[0]
        for c in cols[1:]:
            total = total + c
        ok = ok & torch.isfinite(total)  # a NaN or Inf in any column reaches the sum
        delta = torch.stack(cols, dim=-1)
    else:
        d = torch.diagonal(H, dim1=-2, dim2=-1)
        floor = d.amax(dim=-1, keepdim=True) * 1e-12 + 1e-300
        A = H + torch.diag_embed(lam[:, None] * torch.maximum(d, floor))
        L, info = torch.linalg.cholesky_ex(A)
        delta = torch.cholesky_solve(-g[..., None], L)[..., 0]
        ok = (info == 0) & torch.isfinite(delta).all(dim=-1)
    delta = torch.where(ok[:, None], delta, torch.zeros_like(delta))
    return delta, ok


def _normal_equations(r: torch.Tensor, J: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``JᵀJ (v, P, P)`` and ``Jᵀr (v, P)``, returned in float64.

    For few parameters each entry is one product of two Jacobian columns (contiguous in the
    layout :meth:`Problem.model_jacobian` returns) summed over the measurements by a matrix-vector
    product with ones (a reduction over a short last axis is several times slower; batched matmul
    of tiny matrices loops over the voxels). The entries are formed in the Jacobian's precision:
    each is a sum of m products, accurate to its rounding (≈1e-7 relative in float32), and the
    damped systems built from them are solved in float64."""
    P = J.shape[-1]
    Jt = J.transpose(1, 2)  # (v, P, m)
    if P > _UNROLLED_MAX_P:
        Jd, rd = Jt.double(), r.double()
        return Jd @ Jd.transpose(1, 2), (Jd @ rd[..., None])[..., 0]
    ones = torch.ones(r.shape[-1], dtype=J.dtype, device=J.device)
    cols = Jt.unbind(1)
    entries: list[torch.Tensor | None] = [None] * (P * P)
    for i in range(P):
        for j in range(i + 1):
            entries[i * P + j] = entries[j * P + i] = (cols[i] * cols[j]) @ ones
    H = torch.stack(entries, dim=-1).reshape(-1, P, P)  # type: ignore[arg-type]
    g = torch.stack([(c * r) @ ones for c in cols], dim=-1)
    return H.double(), g.double()


def _lm_chunk(
    problem: Problem,
    theta0: torch.Tensor,
    *,
    max_iter: int,
    ftol: float,
    xtol: float,
    lambda0: float,
    bar: Any,
    jacobian: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[float]]:
    V, P = theta0.shape
    dev = problem.device
    lower, upper = problem.lower.double(), problem.upper.double()
    # results of finished voxels, written once when they finish
    theta = problem.clamp(theta0.detach().clone())
    status = torch.zeros(V, dtype=torch.int8, device=dev)
    iters = torch.zeros(V, dtype=torch.int32, device=dev)
    track = not isinstance(bar, _NullBar)  # counting finished voxels syncs a GPU: only for a bar

    # closed-form derivatives cost about one more forward pass, so with them every trial point
    # gets its Jacobian at once (one model call per iteration instead of two); with autodiff the
    # Jacobian is only worth computing where a step was accepted
    fused = (
        jacobian in ("auto", "model") and problem.model_jacobian(theta[:1], slice(0, 1)) is not None
    )
    r, J = residual_and_jacobian(problem, theta, None, jacobian)
    cost = 0.5 * r.double().pow(2).sum(dim=1)
    H, g = _normal_equations(r, J)
    lam = torch.full((V,), lambda0, dtype=torch.float64, device=dev)
    nu = torch.full((V,), 2.0, dtype=torch.float64, device=dev)
    # the cost's rounding floor: residuals r = f − d carry ≈ eps·|d| of rounding each, so a cost
    # change below ≈ 2·eps·Σ|r|·|d| may not show (in float32 often 1e-5 of the cost, above ftol):
    # a rejected step whose predicted gain is below it ends the voxel as converged at the
    # working precision (instead of raising the damping ~10 times until "stalled")
    data_abs = problem.data.abs()
    if problem.weights is not None:  # the residual is weighted: sqrt(w)·(f − d)
        data_abs = data_abs * problem.weights.sqrt()
    if data_abs.shape != r.shape:  # complex residuals are stored as (re, im) pairs
        data_abs = data_abs.repeat_interleave(r.shape[1] // data_abs.shape[1], dim=1)
    eps = torch.finfo(r.dtype).eps
    floor = 2 * eps * (r.abs().double() * data_abs.double()).sum(dim=1)
    history = [cost.sum()]  # 0-d tensors, read once at the end (no host sync per iteration)
    ones_p = torch.ones(P, dtype=torch.float64, device=dev)

    # The iteration works on compacted copies of the still-running voxels (``sub``: their data;
    # ``th``, ``H``, ... their state; ``act``: their rows in the chunk): no gather or scatter of
    # every voxel per iteration, only of those that finish.
    sub, th, act = problem, theta.clone(), torch.arange(V, device=dev)
    it_a = torch.zeros(V, dtype=torch.int32, device=dev)
    done_cost = cost.new_zeros(())  # Σ final cost of finished voxels (the history's other part)

    def retire(pos: torch.Tensor, code: torch.Tensor | int) -> None:
        """Write the finished rows ``pos`` of the working state into the chunk's results."""
        nonlocal done_cost
        rows = act[pos]
        theta[rows] = th[pos]
        iters[rows] = it_a[pos]
        status[rows] = code if isinstance(code, int) else code[pos]
        done_cost = done_cost + cost[pos].sum()

    exact = cost <= 1e-30
    if bool(exact.any()):
        retire(torch.nonzero(exact).reshape(-1), 3)
        keep = torch.nonzero(~exact).reshape(-1)
        act, th, H, g, cost, lam, nu, floor, it_a = (
            x[keep] for x in (act, th, H, g, cost, lam, nu, floor, it_a)
        )
        sub = sub.subset(keep)
    # the bar counts finished voxels (not iterations up to max_iter): its ETA follows convergence
    if track:
        bar.update(V - act.numel())

    for it in range(1, max_iter + 1):
        if act.numel() == 0:
            break
        it_a += 1
        delta, ok = _damped_step(H, g, lam, th, lower, upper)
        raw = th + delta.to(th.dtype)
        trial = sub.clamp(raw)
        # a step cut by the box: its predicted gain (of the projected step) may be <= 0 although
        # the voxel is far from converged, so it must not count as "nothing left to gain"
        clipped = (trial != raw).any(dim=-1)
        step = (trial - th).double()
        if fused:
            r_t, J_t = residual_and_jacobian(sub, trial, None, jacobian)
        else:
            with torch.no_grad():
                r_t = sub.residual(trial)
        cost_t = 0.5 * r_t.double().pow(2).sum(dim=1)
        # predicted gain −(s·g + ½ sᵀHs); einsum and a matrix-vector sum instead of reductions
        # over the short last axis (5× faster at P = 3)
        Hs = torch.einsum("vij,vj->vi", H, step)
        predicted = -((step * (g + 0.5 * Hs)) @ ones_p)
        actual = cost - cost_t
        accept = ok & torch.isfinite(cost_t) & (actual > 0)
        rho = actual / predicted.clamp_min(1e-300)
        conv_f = (accept & (actual <= ftol * cost)) | (
            ok
            & ~clipped
            & (lam <= 1.0)
            & ((predicted <= ftol * cost) | (~accept & (predicted <= floor)))
        )
        conv_x = accept & (step.abs() <= xtol * (th.double().abs() + xtol)).all(dim=-1)
        # Nielsen's damping update
        lam = torch.where(
            accept, lam * torch.clamp(1 - (2 * rho - 1) ** 3, min=1.0 / 3.0), lam * nu
        )
        nu = torch.where(accept, 2.0, nu * 2)

        # converged: an accepted step gained little, or (mildly damped) the quadratic model
        # predicts no gain worth having, which also ends float32 voxels at their noise floor
        conv_e = accept & (cost_t <= 1e-30)
        stalled = ~accept & (lam > 1e16)
        th = torch.where(accept[:, None], trial, th)
        cost = torch.where(accept, cost_t, cost)

        done = conv_f | conv_x | conv_e | stalled
        keep = ~done
        refresh = accept & keep  # moved and still iterating: new Jacobian needed
        if fused:
            H_t, g_t = _normal_equations(r_t, J_t)
            H = torch.where(refresh[:, None, None], H_t, H)
            g = torch.where(refresh[:, None], g_t, g)
        elif bool(refresh.any()):
            rpos = torch.nonzero(refresh).reshape(-1)
            r_new, J_new = residual_and_jacobian(sub, th[rpos], rpos, jacobian)
            H_new, g_new = _normal_equations(r_new, J_new)
            H = H.index_copy(0, rpos, H_new)
            g = g.index_copy(0, rpos, g_new)
        n_done = int(done.sum())  # a host sync per iteration, as the loop's exit test needs one
        if n_done:
            # the code of a finished voxel, by precedence exact > ftol > xtol > stalled
            code = torch.zeros_like(status[:1]).expand(act.numel()).clone()
            code.masked_fill_(stalled, 4).masked_fill_(conv_x, 2).masked_fill_(conv_f, 1)
            code.masked_fill_(conv_e, 3)
            retire(torch.nonzero(done).reshape(-1), code)
            kpos = torch.nonzero(keep).reshape(-1)
            act, th, H, g, cost, lam, nu, floor, it_a = (
                x[kpos] for x in (act, th, H, g, cost, lam, nu, floor, it_a)
            )
            sub = sub.subset(kpos)
        history.append(done_cost + cost.sum())
        if track:
            bar.update(n_done)
            bar.set_postfix(iteration=it, active=act.numel())
    if track:
        bar.update(act.numel())  # voxels stopped by max_iter are finished too
    if act.numel():
        retire(torch.arange(act.numel(), device=dev), -1)
    return theta, status, iters, torch.stack(history).tolist()


def _add_histories(a: list[float], b: list[float]) -> list[float]:
    """Sum two chunks' cost histories, holding each one's last value once it has stopped."""
    if not a:
        return list(b)
    n = max(len(a), len(b))
    a = a + [a[-1]] * (n - len(a))
    b = b + [b[-1]] * (n - len(b))
    return [x + y for x, y in zip(a, b, strict=True)]


def lm(
    model: Any,
    data: Any,
    *,
    mask: Any = None,
    weights: Any = None,
    init: Any = None,
    start: str = "auto",
    max_iter: int = 100,
    ftol: float | None = None,
    xtol: float | None = None,
    lambda0: float = 1e-3,
    batch_size: int | None = None,
    memory_budget: int = 2 << 30,
    n_atoms: int = 5000,
    seed: int | None = 0,
    device: Any = None,
    dtype: torch.dtype = torch.float32,
    progress: bool | None = None,
    jacobian: str = "auto",
) -> FitResult:
    """Fit a model to every voxel by batched Levenberg–Marquardt (least squares).

    Parameters
    ----------
    model : Model
        Signal model (``qmrkit.models.*`` or :func:`model_from_function`).
    data : array (*spatial, n_meas)
        Image series, measurement axis last (NIfTI order). Real or complex.
    mask : array (*spatial), optional
        Voxels to fit (default: all). Voxels with NaN/Inf are excluded with a warning.
    weights : array (*spatial) or (*spatial, n_meas), optional
        Non-negative weights of the squared residuals (e.g. 1/σ²).
    init : FitResult or dict, optional
        Starting values (maps in image shape or scalars, physical units).
    start : {"auto", "closed_form", "dictionary", "typical"}
        Where to start when ``init`` is not given (``"auto"``: closed form if the model has one,
        else a dictionary search of ``n_atoms`` random parameter sets).
    max_iter : int
        Maximum iterations per voxel (LM usually needs tens).
    ftol, xtol : float, optional
        Stop a voxel when an accepted step lowers its cost by less than ``ftol``·cost, or changes
        every parameter by less than ``xtol``·(|θ| + xtol). Defaults: 1e-8 in float64, 1e-6 in
        float32 (the float32 noise floor).
    lambda0 : float
        Initial damping (relative to the Jacobian's diagonal).
    batch_size : int, optional
        Voxels per chunk; default from ``memory_budget`` (bytes).
    seed : int
        Seed of the dictionary start (results are reproducible).
    device, dtype
        Where and in which precision to compute (float32 or float64; the damped normal equations
        are always solved in float64).
    progress : bool, optional
        Show a progress bar of finished voxels (default None: on a terminal or in a notebook,
        see :func:`qmrkit._progress.progress_enabled`).
    jacobian : {"auto", "model", "forward", "reverse"}
        How derivatives are computed (see :func:`residual_and_jacobian`): the model's closed form
        when it has one (``"auto"``, ``"model"``), else forward-mode autodiff in one stacked pass,
        or reverse mode (one backward pass per measurement; avoids torch's ≈1.5 s one-off load of
        its forward-mode machinery, worth it for few measurements).

    Returns
    -------
    FitResult
        Maps, per-voxel iterations and convergence, RMS residual map, cost history.
    """
    if max_iter < 1:
        raise ParameterError(f"max_iter must be >= 1, got {max_iter}")
    if lambda0 <= 0:
        raise ParameterError(f"lambda0 must be > 0, got {lambda0}")
    ftol = (1e-8 if dtype == torch.float64 else 1e-6) if ftol is None else float(ftol)
    xtol = (1e-8 if dtype == torch.float64 else 1e-6) if xtol is None else float(xtol)
    if ftol < 0 or xtol < 0:
        raise ParameterError(f"ftol and xtol must be >= 0, got ftol={ftol}, xtol={xtol}")
    if jacobian not in JACOBIAN_MODES:
        raise ParameterError(f"jacobian must be one of {JACOBIAN_MODES}, got {jacobian!r}")
    t0 = time.perf_counter()
    problem = make_problem(
        model, data, mask=mask, weights=weights, device=device, dtype=dtype, solver="lm"
    )
    theta0, origin = initial_theta(problem, init, start=start, n_atoms=n_atoms, seed=seed)
    V, P, M = problem.n_voxels, problem.model.n_params, problem.n_meas
    if batch_size is None:
        per_voxel = 8 * (4 * M * (P + 2) + 6 * P * P + 16 * P + 16)
        batch_size = max(1024, int(memory_budget // per_voxel))
    if batch_size < 1:
        raise ParameterError(f"batch_size must be >= 1, got {batch_size}")
    theta = torch.empty_like(theta0)
    status = torch.empty(V, dtype=torch.int8, device=problem.device)
    iters = torch.empty(V, dtype=torch.int32, device=problem.device)
    history: list[float] = []
    bar = progress_bar(total=V, desc="lm", progress=progress, unit="voxel")
    with bar:
        for c0 in range(0, V, batch_size):
            idx = torch.arange(c0, min(V, c0 + batch_size), device=problem.device)
            sub = problem.subset(idx) if batch_size < V else problem
            th, st, it, hist = _lm_chunk(
                sub,
                theta0[idx],
                max_iter=max_iter,
                ftol=ftol,
                xtol=xtol,
                lambda0=lambda0,
                bar=bar,
                jacobian=jacobian,
            )
            theta[idx], status[idx], iters[idx] = th, st, it
            history = _add_histories(history, hist)
    n_unconv = int((status == -1).sum())
    if n_unconv:
        warnings.warn(
            f"lm: {n_unconv} of {V} voxels did not converge in max_iter={max_iter} iterations",
            ConvergenceWarning,
            stacklevel=2,
        )
    counts = torch.bincount(status.long() + 1, minlength=len(REASONS)).tolist()  # codes -1..4
    reasons = {REASONS[k]: counts[k + 1] for k in REASONS if counts[k + 1]}
    log.info("lm: %d voxels, %s, start=%s, %.3f s", V, reasons, origin, time.perf_counter() - t0)
    return FitResult.from_theta(
        problem,
        theta,
        solver="lm",
        converged=status > 0,
        iterations=iters,
        loss_history=[h * problem.scale**2 / V for h in history],
        elapsed_s=time.perf_counter() - t0,
        settings={
            "max_iter": max_iter,
            "ftol": ftol,
            "xtol": xtol,
            "lambda0": lambda0,
            "start": origin,
            "dtype": str(dtype),
            "device": str(problem.device),
            "batch_size": batch_size,
            "reasons": reasons,
            "jacobian": jacobian,
        },
    )
