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
from concurrent.futures import ThreadPoolExecutor
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


def _pair(i: int, j: int) -> int:
    """Row of entry (i, j) of a symmetric P×P matrix stored as its lower triangle, row by row."""
    i, j = max(i, j), min(i, j)
    return i * (i + 1) // 2 + j


def _damped_step(
    H: torch.Tensor,
    g: torch.Tensor,
    lam: torch.Tensor,
    theta: torch.Tensor,
    lower: torch.Tensor,
    upper: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve (H + λ·diag(H)) δ = −g per voxel over the free parameters; returns δ ``(P, v)`` and a
    ``(v,)`` flag.

    Parameter-major layout: ``H (P(P+1)/2, v)`` holds the lower triangle of every voxel's JᵀJ
    (row :func:`_pair`), ``g (P, v)``, ``theta (P, v)``, ``lam (v,)``, bounds ``(P, 1)``; every
    operation is over contiguous voxel rows. Box constraints by an active set: a parameter on a
    bound whose gradient points out of the box is held fixed (its row and column removed), so the
    step for the others is the correct reduced Levenberg–Marquardt step rather than a projection
    of an infeasible one (which can stall). ``H``, ``g``, bounds are float64.
    """
    P = g.shape[0]
    th = theta.double()
    tiny = 1e-12 * (th.abs() + 1.0)
    active = ((th <= lower + tiny) & (g > 0)) | ((th >= upper - tiny) & (g < 0))
    entries = [[H[_pair(i, j)] for j in range(P)] for i in range(P)]
    rhs = list((-g).unbind(0))
    if bool(active.any()):
        free = (~active).double()
        for i in range(P):
            for j in range(P):
                entries[i][j] = entries[i][j] * free[i] * free[j]
            entries[i][i] = entries[i][i] + active[i].double()
            rhs[i] = rhs[i] * free[i]
    diag = [entries[j][j] for j in range(P)]
    top = diag[0]
    for dj in diag[1:]:
        top = torch.maximum(top, dj)
    floor = top * 1e-12 + 1e-300
    for j in range(P):
        entries[j][j] = diag[j] + lam * torch.maximum(diag[j], floor)
    if P <= _UNROLLED_MAX_P:
        # entry by entry: (v,)-vector operations, no (v, P, P) temporaries
        cols, ok = _cholesky_solve_entries(entries, rhs)
        total = cols[0]
        for c in cols[1:]:
            total = total + c
        ok = ok & torch.isfinite(total)  # a NaN or Inf in any column reaches the sum
        delta = torch.stack(cols, dim=0)
    else:
        A = torch.stack([torch.stack(row, dim=-1) for row in entries], dim=-2)  # (v, P, P)
        L, info = torch.linalg.cholesky_ex(A)
        delta = torch.cholesky_solve(torch.stack(rhs, dim=-1)[..., None], L)[..., 0].T
        ok = (info == 0) & torch.isfinite(delta).all(dim=0)
    delta = torch.where(ok, delta, torch.zeros_like(delta))
    return delta, ok


def _normal_equations(
    r: torch.Tensor, cols: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower triangle of ``JᵀJ`` as ``(P(P+1)/2, v)`` (rows :func:`_pair`) and ``Jᵀr (P, v)``,
    float64, from the residual ``(v, m)`` and the Jacobian's columns (each ``(v, m)``).

    Each entry is one product of two columns summed over the measurements by a matrix-vector
    product with ones (a reduction over a short last axis is several times slower). The entries
    are formed in the Jacobian's precision: each is a sum of m products, accurate to its rounding
    (≈1e-7 relative in float32), and the damped systems built from them are solved in float64."""
    P = len(cols)
    ones = torch.ones(r.shape[-1], dtype=r.dtype, device=r.device)
    H = torch.stack([(cols[i] * cols[j]) @ ones for i in range(P) for j in range(i + 1)])
    g = torch.stack([(c * r) @ ones for c in cols])
    return H.double(), g.double()


def _residual_and_columns(
    problem: Problem, theta: torch.Tensor, jacobian: str
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Residual ``(v, m)`` and Jacobian columns (P tensors ``(v, m)``) at ``theta (P, v)``."""
    if jacobian in ("auto", "model"):
        own = problem.model_jacobian_columns(theta.T)
        if own is not None:
            return own
    r, J = residual_and_jacobian(problem, theta.T, None, jacobian)
    return r, [c.contiguous() for c in J.unbind(-1)]


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
    """Levenberg–Marquardt on one chunk of voxels, from ``theta0 (V, P)``.

    The state is parameter-major: ``th (P, v)``, the normal equations' lower triangle
    ``H (P(P+1)/2, v)`` and ``g (P, v)``, per-voxel scalars ``(v,)``; every operation runs over
    contiguous voxel rows (a (v, P)-layout operation with a per-voxel mask, or a reduction over
    its short last axis, costs several times more). Returns θ ``(V, P)``, status, iterations and
    the cost history."""
    V, P = theta0.shape
    dev = problem.device
    lower = problem.lower.double()[:, None]
    upper = problem.upper.double()[:, None]
    lo_w, hi_w = problem.lower[:, None], problem.upper[:, None]  # working precision

    def clamp(t: torch.Tensor) -> torch.Tensor:
        return torch.maximum(torch.minimum(t, hi_w), lo_w)

    # results (parameter-major), written once per voxel when it finishes
    theta = clamp(theta0.detach().T.contiguous())
    status = torch.zeros(V, dtype=torch.int8, device=dev)
    iters = torch.zeros(V, dtype=torch.int32, device=dev)
    track = not isinstance(bar, _NullBar)  # counting finished voxels syncs a GPU: only for a bar

    # closed-form derivatives cost about one more forward pass, so with them every trial point
    # gets its Jacobian at once (one model call per iteration instead of two); with autodiff the
    # Jacobian is only worth computing where a step was accepted
    fused = (
        jacobian in ("auto", "model")
        and problem.model_jacobian_columns(theta[:, :1].T, slice(0, 1)) is not None
    )
    r, cols = _residual_and_columns(problem, theta, jacobian)
    ones_m = torch.ones(r.shape[1], dtype=torch.float64, device=dev)
    r64 = r.double()
    cost = 0.5 * ((r64 * r64) @ ones_m)
    H, g = _normal_equations(r, cols)
    lam = torch.full((V,), lambda0, dtype=torch.float64, device=dev)
    nu = torch.full((V,), 2.0, dtype=torch.float64, device=dev)
    # the cost's rounding floor: residuals r = f − d carry ≈ eps·|d| of rounding each, so a cost
    # change below ≈ 2·eps·Σ|r|·|d| may not show (in float32 often 1e-5 of the cost, above ftol):
    # a step whose predicted gain is below it ends the voxel as converged at the working
    # precision (instead of accepting steps that gain by rounding, or of raising the damping ~10
    # times until "stalled"). It shrinks with the residual, so it follows every accepted step.
    data_abs = problem.data.abs()
    if problem.weights is not None:  # the residual is weighted: sqrt(w)·(f − d)
        data_abs = data_abs * problem.weights.sqrt()
    if data_abs.shape != r.shape:  # complex residuals are stored as (re, im) pairs
        data_abs = data_abs.repeat_interleave(r.shape[1] // data_abs.shape[1], dim=1)
    eps = torch.finfo(r.dtype).eps
    data_abs = data_abs.to(r.dtype)
    ones_w = torch.ones(r.shape[1], dtype=r.dtype, device=dev)

    def rounding_floor(res: torch.Tensor) -> torch.Tensor:
        """2·eps·Σ|r|·|d| per voxel (float64) for residuals ``res (v, m)`` of the running voxels."""
        return ((res.abs() * data_abs) @ ones_w).double().mul_(2 * eps)

    floor = rounding_floor(r)
    history = [cost.sum()]  # 0-d tensors, read once at the end (no host sync per iteration)
    # the predicted gain's quadratic term sᵀHs over the stored lower triangle: off-diagonal
    # entries count twice
    rows_i = torch.tensor([i for i in range(P) for j in range(i + 1)], device=dev)
    rows_j = torch.tensor([j for i in range(P) for j in range(i + 1)], device=dev)
    twice = torch.tensor(
        [1.0 if i == j else 2.0 for i in range(P) for j in range(i + 1)],
        dtype=torch.float64,
        device=dev,
    )[:, None]

    # The iteration works on compacted copies of the still-running voxels (``sub``: their data;
    # ``th``, ``H``, ... their state; ``act``: their columns in the chunk): no gather or scatter of
    # every voxel per iteration, only of those that finish.
    sub, th, act = problem, theta.clone(), torch.arange(V, device=dev)
    it_a = torch.zeros(V, dtype=torch.int32, device=dev)
    done_cost = cost.new_zeros(())  # Σ final cost of finished voxels (the history's other part)

    def retire(pos: torch.Tensor, code: torch.Tensor | int) -> None:
        """Write the finished voxels ``pos`` of the working state into the chunk's results."""
        nonlocal done_cost
        rows = act.index_select(0, pos)
        theta.index_copy_(1, rows, th.index_select(1, pos))
        iters.index_copy_(0, rows, it_a.index_select(0, pos))
        if isinstance(code, int):
            status.index_fill_(0, rows, code)
        else:
            status.index_copy_(0, rows, code.index_select(0, pos))
        done_cost = done_cost + cost.index_select(0, pos).sum()

    def compact(kpos: torch.Tensor) -> None:
        """Keep only the working state's voxels ``kpos``."""
        nonlocal sub, act, th, H, g, cost, lam, nu, floor, it_a, data_abs
        act, th, H, g, cost, lam, nu, floor, it_a = (
            x.index_select(-1, kpos) for x in (act, th, H, g, cost, lam, nu, floor, it_a)
        )
        data_abs = data_abs.index_select(0, kpos)
        sub = sub.subset(kpos)

    exact = cost <= 1e-30
    if bool(exact.any()):
        retire(torch.nonzero(exact).reshape(-1), 3)
        compact(torch.nonzero(~exact).reshape(-1))
    # the bar counts finished voxels (not iterations up to max_iter): its ETA follows convergence
    if track:
        bar.update(V - act.numel())

    for it in range(1, max_iter + 1):
        if act.numel() == 0:
            break
        it_a += 1
        delta, ok = _damped_step(H, g, lam, th, lower, upper)
        raw = th + delta.to(th.dtype)
        trial = clamp(raw)
        # a step cut by the box: its predicted gain (of the projected step) may be <= 0 although
        # the voxel is far from converged, so it must not count as "nothing left to gain"
        clipped = (trial != raw).any(dim=0)
        step = (trial - th).double()
        # predicted gain −(s·g + ½ sᵀHs), as sums over the parameter rows
        quad = (H * twice * (step.index_select(0, rows_i) * step.index_select(0, rows_j))).sum(0)
        predicted = -((step * g).sum(0) + 0.5 * quad)
        # converged before the trial point is evaluated: (mildly damped, not cut by the box) the
        # quadratic model predicts a gain below ftol·cost. Such a voxel ends at the trial point
        # without evaluating it — the last Gauss–Newton step near a minimum, whose gain is below
        # the tolerance either way — so from a polished start almost every voxel costs no
        # second model evaluation.
        mild = ok & ~clipped & (lam <= 1.0)
        settled = mild & (predicted <= ftol * cost)
        n_settled = int(settled.sum())
        if n_settled:
            th = torch.where(settled, trial, th)
            retire(torch.nonzero(settled).reshape(-1), 1)
            going = torch.nonzero(~settled).reshape(-1)
            compact(going)
            trial, step, predicted, ok, clipped, mild = (
                x.index_select(-1, going) for x in (trial, step, predicted, ok, clipped, mild)
            )
            if track:
                bar.update(n_settled)
            if act.numel() == 0:
                history.append(done_cost + cost.sum())
                break
        if fused:
            r_t, cols_t = _residual_and_columns(sub, trial, jacobian)
        else:
            with torch.no_grad():
                r_t = sub.residual(trial.T)
        r64 = r_t.double()
        cost_t = 0.5 * ((r64 * r64) @ ones_m)
        actual = cost - cost_t
        accept = ok & torch.isfinite(cost_t) & (actual > 0)
        rho = actual / predicted.clamp_min(1e-300)
        conv_f = (accept & (actual <= ftol * cost)) | (mild & (predicted <= floor))
        conv_x = accept & (step.abs() <= xtol * (th.double().abs() + xtol)).all(dim=0)
        # Nielsen's damping update
        lam = torch.where(
            accept, lam * torch.clamp(1 - (2 * rho - 1) ** 3, min=1.0 / 3.0), lam * nu
        )
        nu = torch.where(accept, 2.0, nu * 2)

        # converged: an accepted step gained little, or (mildly damped) the step predicted no gain
        # above the cost's rounding floor, which ends float32 voxels at their noise floor.
        # Stalled: rejected, and even the (heavily) damped step predicts no gain above the floor:
        # larger damping only shortens the step, so nothing measurable is left (without this the
        # voxel would be rejected ~10 more times until λ > 1e16)
        conv_e = accept & (cost_t <= 1e-30)
        stalled = ~accept & ((lam > 1e16) | (ok & ~clipped & (predicted <= floor)))
        th = torch.where(accept, trial, th)
        cost = torch.where(accept, cost_t, cost)
        floor = torch.where(accept, rounding_floor(r_t), floor)

        done = conv_f | conv_x | conv_e | stalled
        keep = ~done
        refresh = accept & keep  # moved and still iterating: new Jacobian needed
        # the iteration's second host sync (the first counted the settled voxels); the loop's
        # exit test needs one anyway
        n_done, n_refresh = torch.stack([done.sum(), refresh.sum()]).tolist()
        if fused and 2 * n_refresh > refresh.numel():
            H_t, g_t = _normal_equations(r_t, cols_t)
            H = torch.where(refresh, H_t, H)
            g = torch.where(refresh, g_t, g)
        elif n_refresh:
            # few voxels move on (typically after the first iteration from a polished start):
            # their normal equations only
            rpos = torch.nonzero(refresh).reshape(-1)
            if fused:
                r_new = r_t.index_select(0, rpos)
                cols_new = [c.index_select(0, rpos) for c in cols_t]
            else:
                r_new, J_new = residual_and_jacobian(
                    sub, th.index_select(1, rpos).T, rpos, jacobian
                )
                cols_new = [c.contiguous() for c in J_new.unbind(-1)]
            H_new, g_new = _normal_equations(r_new, cols_new)
            H = H.index_copy(1, rpos, H_new)
            g = g.index_copy(1, rpos, g_new)
        if n_done:
            # the code of a finished voxel, by precedence exact > ftol > xtol > stalled
            code = torch.zeros_like(status[:1]).expand(act.numel()).clone()
            code.masked_fill_(stalled, 4).masked_fill_(conv_x, 2).masked_fill_(conv_f, 1)
            code.masked_fill_(conv_e, 3)
            retire(torch.nonzero(done).reshape(-1), code)
            compact(torch.nonzero(keep).reshape(-1))
        history.append(done_cost + cost.sum())
        if track:
            bar.update(n_done)
            bar.set_postfix(iteration=it, active=act.numel())
    if track:
        bar.update(act.numel())  # voxels stopped by max_iter are finished too
    if act.numel():
        retire(torch.arange(act.numel(), device=dev), -1)
    return theta.T, status, iters, torch.stack(history).tolist()


def _add_histories(a: list[float], b: list[float]) -> list[float]:
    """Sum two chunks' cost histories, holding each one's last value once it has stopped."""
    if not a:
        return list(b)
    n = max(len(a), len(b))
    a = a + [a[-1]] * (n - len(a))
    b = b + [b[-1]] * (n - len(b))
    return [x + y for x, y in zip(a, b, strict=True)]


#: the fewest voxels worth a part of their own in :func:`lm`'s split across CPU threads: below
#: it, per-operation overhead outweighs the second thread
_MIN_PART_VOXELS = 4096


def _parts(problem: Problem, workers: int) -> list[torch.Tensor | None]:
    """Contiguous voxel ranges fitted side by side (``[None]``: the whole problem at once)."""
    if problem.device.type != "cpu":
        return [None]
    n = min(int(workers), problem.n_voxels // _MIN_PART_VOXELS)
    if n <= 1:
        return [None]
    edges = [round(i * problem.n_voxels / n) for i in range(n + 1)]
    return [
        torch.arange(a, b, device=problem.device)
        for a, b in zip(edges[:-1], edges[1:], strict=True)
    ]


class _LockedBar:
    """A progress bar shared by the parts' threads: one update at a time."""

    def __init__(self, bar: Any):
        self._bar, self._lock = bar, threading.Lock()

    def update(self, n: float = 1) -> None:
        with self._lock:
            self._bar.update(n)

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        with self._lock:
            self._bar.set_postfix(*args, **kwargs)


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
    workers: int = 1,
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
        float32 (the float32 noise floor). A voxel also stops when a step's predicted gain is
        below the cost's rounding floor 2·eps·Σ|r|·|d| (reason "ftol" when mildly damped, else
        "stalled"): no step can then change its cost measurably in the working precision. A
        step whose predicted gain is below ``ftol``·cost (mildly damped, inside the bounds) is
        taken without evaluating its cost, and ends the voxel.
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
    workers : int
        On CPU, how many parts of the volume are started and fitted side by side, each in its own
        Python thread (at most one part per 4,096 voxels; every voxel's result is the same
        whatever the split; ignored on GPUs). Default 1. Worth raising only on a machine loaded by
        other work: on 2 cores at load ≈ 5, two parts fitted 128² MOLLI voxels 3–5× faster than
        one part with 2 torch threads (whose OpenMP workers wait for descheduled peers); on a
        quiet machine the two threads contend for the GIL and for torch's OpenMP pool and one
        part was faster (56–62 ms against 88–96 ms; docs/performance.md).

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
    if int(workers) < 1:
        raise ParameterError(f"workers must be >= 1, got {workers}")
    t0 = time.perf_counter()
    problem = make_problem(
        model, data, mask=mask, weights=weights, device=device, dtype=dtype, solver="lm"
    )
    V, P, M = problem.n_voxels, problem.model.n_params, problem.n_meas
    parts = _parts(problem, workers)
    if batch_size is None:
        per_voxel = 8 * (4 * M * (P + 2) + 6 * P * P + 16 * P + 16)
        batch_size = max(1024, int(memory_budget // (per_voxel * len(parts))))
    if batch_size < 1:
        raise ParameterError(f"batch_size must be >= 1, got {batch_size}")
    theta = torch.empty((V, P), dtype=problem.dtype, device=problem.device)
    status = torch.empty(V, dtype=torch.int8, device=problem.device)
    iters = torch.empty(V, dtype=torch.int32, device=problem.device)
    history: list[float] = []
    bar = progress_bar(total=V, desc="lm", progress=progress, unit="voxel")

    def fit_part(idx: torch.Tensor | None) -> tuple[list[float], str]:
        """Start and fit the voxels ``idx`` (None: all), chunk by chunk; returns the part's cost
        history and where it started."""
        part = problem if idx is None else problem.subset(idx)
        theta0, origin = initial_theta(part, init, start=start, n_atoms=n_atoms, seed=seed)
        # the part's voxels among the problem's (the results' rows)
        rows = torch.arange(part.n_voxels, device=problem.device) if idx is None else idx
        hist: list[float] = []
        for c0 in range(0, part.n_voxels, batch_size):
            sel = slice(c0, min(part.n_voxels, c0 + batch_size))
            chunk = part
            if batch_size < part.n_voxels:
                chunk = part.subset(torch.arange(sel.start, sel.stop, device=problem.device))
            th, st, it, h = _lm_chunk(
                chunk,
                theta0[sel],
                max_iter=max_iter,
                ftol=ftol,
                xtol=xtol,
                lambda0=lambda0,
                bar=locked_bar,
                jacobian=jacobian,
            )
            out = rows[sel]
            theta[out], status[out], iters[out] = th, st, it
            hist = _add_histories(hist, h)
        return hist, origin

    with bar:
        shared = len(parts) > 1 and not isinstance(bar, _NullBar)
        locked_bar = _LockedBar(bar) if shared else bar
        if len(parts) == 1:
            outcomes = [fit_part(None)]
        else:
            with ThreadPoolExecutor(len(parts), thread_name_prefix="qmrkit-lm") as pool:
                outcomes = list(pool.map(fit_part, parts))
    for hist, _ in outcomes:
        history = _add_histories(history, hist)
    origin = outcomes[0][1]
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
            "workers": len(parts),
        },
    )
