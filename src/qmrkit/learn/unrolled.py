"""Unrolled reconstruction networks with memory-efficient training (MEL).

An unrolled network alternates a learned denoiser and a data-consistency block ``n_unrolls``
times: ``z_k = D_k(x_k)``, ``x_{k+1} = DC_k(z_k)``. Four ways to backpropagate through it:

``standard``
    Plain autograd; memory grows linearly with the number of unrolls.
``checkpoint``
    ``torch.utils.checkpoint`` (non-reentrant) around every unroll: only the state between unrolls
    is stored and each unroll is recomputed during the backward pass (its CG solve warm-started
    at the remembered output, so the re-run costs one normal-operator call, not a full solve).
``reversible``
    MEL proper (Kellman et al.): the forward pass runs without a graph and keeps only its output
    (the input is held by the caller anyway). The backward pass walks the unrolls in reverse,
    recovering each unroll's input by inverting it — the CG data consistency in closed form,
    ``z = ((AᴴA + λI) x − Aᴴy)/λ``, the residual denoiser by the fixed-point iteration
    ``x ← z − f(x)`` — re-running that unroll with autograd and backpropagating one unroll at a
    time. Every re-run is compared with the state it must reproduce; when an inversion does not
    converge or the re-run disagrees by more than ``drift_tol``, an :class:`InversionWarning` is
    issued and the remaining states are recomputed from the input instead.
``hybrid``
    Reversible within segments of ``checkpoint_every`` unrolls, storing the state at each segment
    start. Each segment is first inverted down to its start and compared with the stored state
    (online drift check); when the relative error exceeds ``drift_tol`` the segment's states are
    recomputed forward from the stored one (logged as a warning). Gradients are then exact up to
    the inner solvers' tolerances whatever the denoiser.

All four give the same gradients for converged inner solves (tests: ``tests/learn``).
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as _checkpoint

from .._progress import get_logger
from ..errors import InversionWarning, ParameterError, ShapeError
from ..ops import LinearOperator
from .dc import CGDataConsistency, GradientDataConsistency
from .denoisers import ResidualCNN, _fixed_point, fixed_point_inverse, spectral_norm_modules

log = get_logger("learn.unrolled")

MEMORY_MODES = ("standard", "checkpoint", "reversible", "hybrid")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    da = torch.view_as_real(a) if a.is_complex() else a
    db = torch.view_as_real(b) if b.is_complex() else b
    nb = float(torch.linalg.vector_norm(db))
    na = float(torch.linalg.vector_norm(da))
    return na / nb if nb > 0 else na


class UnrolledNet(nn.Module):
    """MoDL-style unrolled network for any ``qmrkit.ops`` forward operator.

    Parameters
    ----------
    n_unrolls : int
        Number of unrolled iterations (denoiser + data consistency).
    denoiser : nn.Module
        Maps complex images ``(*batch, *A.ishape)`` to the same shape, e.g.
        :class:`~qmrkit.learn.ResidualCNN`. Must have ``ndim`` equal to ``len(A.ishape)`` when it
        declares one. ``reversible``/``hybrid`` need a residual denoiser (a ``residual(x)`` method
        with ``D(x) = x + residual(x)``, or an ``inverse`` method).
    data_consistency : {"cg", "gradient"}
        MoDL CG block ``(AᴴA + λI)⁻¹(Aᴴy + λz)`` with learnable ``λ``, or a gradient step with a
        learnable step size.
    shared_weights : bool
        One denoiser and one ``λ`` for all unrolls (MoDL), or separate copies per unroll.
    memory : {"standard", "checkpoint", "reversible", "hybrid"}
        Backpropagation strategy (see the module docstring).
    lam : float
        Initial ``λ`` of the CG block. ``step`` : initial step of the gradient block.
    cg_tol, cg_max_iter : float, int
        Inner CG tolerance and iteration cap (data consistency and its implicit gradient).
    checkpoint_every : int, optional
        Segment length ``K`` of ``hybrid`` (default ``min(5, n_unrolls)``).
    inversion_tol, inversion_max_iter : float, int
        Tolerance (relative residual) and iteration cap of the fixed-point denoiser inversion.
        Default tolerance: 1e-12 in float64, 1e-6 in float32.
    drift_tol : float, optional
        Largest accepted relative error of a recovered state (default
        ``max(100·cg_tol, 1e-9)`` in float64, ``max(100·cg_tol, 1e-4)`` in float32).
    on_inversion_failure : {"fallback", "raise"}
        What ``reversible`` does when an inversion fails: warn and recompute, or raise.
    inversion_anderson : int
        Memory of Anderson acceleration of the denoiser inversion (0, the default: the plain
        fixed-point iteration). Anderson needs fewer denoiser evaluations but, being a
        quasi-Newton method, it also solves ``x + f(x) = z`` where ``f`` is not a contraction and
        may then return a different preimage of a non-injective denoiser, which the per-unroll
        check of ``reversible`` cannot see (``hybrid``'s checkpoint comparison does). The plain
        iteration's failure to converge is what flags a non-invertible denoiser.

    Call ``net(y, A, x0=None)`` with k-space ``y`` of shape ``(*batch, *A.oshape)``; returns the
    image ``(*batch, *A.ishape)``. ``x0`` defaults to ``Aᴴy``. Operator data (coil maps, masks)
    are constants: gradients flow to the network parameters, ``λ``, ``y`` and ``x0``.
    """

    def __init__(
        self,
        n_unrolls: int,
        denoiser: nn.Module,
        data_consistency: str = "cg",
        shared_weights: bool = True,
        memory: str = "standard",
        *,
        lam: float = 0.05,
        step: float = 0.5,
        cg_tol: float = 1e-6,
        cg_max_iter: int = 50,
        checkpoint_every: int | None = None,
        inversion_tol: float | None = None,
        inversion_max_iter: int = 200,
        drift_tol: float | None = None,
        on_inversion_failure: str = "fallback",
        inversion_anderson: int = 0,
    ):
        super().__init__()
        if int(n_unrolls) != n_unrolls or n_unrolls < 1:
            raise ParameterError(
                f"UnrolledNet: n_unrolls must be a positive integer, got {n_unrolls}"
            )
        if memory not in MEMORY_MODES:
            raise ParameterError(
                f"UnrolledNet: memory must be one of {MEMORY_MODES}, got {memory!r}"
            )
        if data_consistency not in ("cg", "gradient"):
            raise ParameterError(
                f"UnrolledNet: data_consistency must be 'cg' or 'gradient', got {data_consistency!r}"
            )
        if on_inversion_failure not in ("fallback", "raise"):
            raise ParameterError(
                "UnrolledNet: on_inversion_failure must be 'fallback' or 'raise', got "
                f"{on_inversion_failure!r}"
            )
        if not isinstance(denoiser, nn.Module):
            raise ParameterError(
                f"UnrolledNet: denoiser must be a torch.nn.Module, got {type(denoiser).__name__}"
            )
        self.n_unrolls = int(n_unrolls)
        self.memory = memory
        self.shared_weights = bool(shared_weights)
        self.data_consistency = data_consistency
        n_blocks = 1 if shared_weights else self.n_unrolls
        dens = [denoiser] + [copy.deepcopy(denoiser) for _ in range(n_blocks - 1)]
        self.denoisers = nn.ModuleList(dens)
        if data_consistency == "cg":
            dcs = [CGDataConsistency(lam, cg_tol, cg_max_iter) for _ in range(n_blocks)]
        else:
            dcs = [GradientDataConsistency(step, cg_tol, cg_max_iter) for _ in range(n_blocks)]
        self.dcs = nn.ModuleList(dcs)
        self.cg_tol = float(cg_tol)
        if checkpoint_every is None:
            checkpoint_every = min(5, self.n_unrolls)
        if int(checkpoint_every) < 1:
            raise ParameterError(
                f"UnrolledNet: checkpoint_every must be >= 1, got {checkpoint_every}"
            )
        self.checkpoint_every = int(checkpoint_every)
        self.inversion_tol = inversion_tol
        self.inversion_max_iter = int(inversion_max_iter)
        self.drift_tol = drift_tol
        self.on_inversion_failure = on_inversion_failure
        if int(inversion_anderson) < 0:
            raise ParameterError(
                f"UnrolledNet: inversion_anderson must be >= 0, got {inversion_anderson}"
            )
        self.inversion_anderson = int(inversion_anderson)
        self.ndim = getattr(denoiser, "ndim", None)
        self.last_backward: dict = {}
        #: fallbacks (recomputations after failed inversions) since construction; the first one
        #: is logged as a warning and warned with InversionWarning, later ones at info level
        #: unless ``warn_every_fallback`` is set
        self.inversion_fallbacks = 0
        self.warn_every_fallback = False
        if memory in ("reversible", "hybrid"):
            if not (hasattr(denoiser, "residual") or hasattr(denoiser, "inverse")):
                raise ParameterError(
                    f"UnrolledNet(memory={memory!r}) needs an invertible residual denoiser with a "
                    "residual(x) method (D(x) = x + residual(x)), e.g. ResidualCNN("
                    f"spectral_norm=True); got {type(denoiser).__name__}. Use memory='checkpoint' "
                    "for other denoisers."
                )
            if not getattr(denoiser, "invertible", False):
                msg = (
                    f"UnrolledNet(memory={memory!r}): the denoiser is not built to be invertible "
                    "(no spectral normalisation / residual_scale >= 1); inversions may fail, in "
                    "which case the backward pass warns and recomputes states instead"
                )
                log.warning(msg)
                warnings.warn(msg, InversionWarning, stacklevel=2)

    # ----------------------------------------------------------------------------- pieces
    def _den(self, k: int) -> nn.Module:
        return self.denoisers[0 if self.shared_weights else k]

    def _dc(self, k: int) -> nn.Module:
        return self.dcs[0 if self.shared_weights else k]

    @property
    def lam(self) -> torch.Tensor:
        """``λ`` of the CG blocks (one value, or one per unroll)."""
        if self.data_consistency != "cg":
            raise ParameterError("UnrolledNet.lam: data_consistency is not 'cg'")
        return torch.stack([dc.lam for dc in self.dcs])

    @contextlib.contextmanager
    def _frozen_sn(self):
        """Spectral-norm power iterations off, so that re-runs reproduce the forward exactly."""
        mods = spectral_norm_modules(self)
        states = [m.training for m in mods]
        for m in mods:
            m.training = False
        try:
            yield
        finally:
            for m, s in zip(mods, states, strict=False):
                m.training = s

    @torch.no_grad()
    def update_spectral_norm(self) -> None:
        """One power-iteration update of every spectral-norm estimate (done by ``forward`` in
        training mode, once per call, before the unrolls)."""
        for m in self.modules():
            if hasattr(m, "parametrizations") and "weight" in m.parametrizations:
                _ = m.weight

    def _unroll(
        self, k: int, x: torch.Tensor, rhs: torch.Tensor, A, nb: int, x_init=None
    ) -> torch.Tensor:
        """One unroll ``DC_k(D_k(x))``; ``x_init`` warm-starts the CG solve (backward re-runs
        pass the known output, so the re-run costs one normal-operator call, not a full solve)."""
        with self._frozen_sn():
            z = self._den(k)(x)
            return self._dc(k)(z, rhs, A, nb, x_init)

    def _unroll_remembered(
        self, k: int, x: torch.Tensor, rhs: torch.Tensor, A, nb: int, outputs: dict
    ) -> torch.Tensor:
        """A checkpointed unroll: the forward run remembers its (detached) output, and the
        backward re-run warm-starts CG there, so the re-run costs one normal-operator call
        instead of a full solve. Memory: one image per unroll."""
        out = self._unroll(k, x, rhs, A, nb, outputs.get(k))
        outputs.setdefault(k, out.detach())
        return out

    def _tols(self, dtype: torch.dtype) -> tuple[float, float]:
        f64 = dtype in (torch.float64, torch.complex128)
        inv = self.inversion_tol if self.inversion_tol is not None else (1e-12 if f64 else 1e-6)
        drift = self.drift_tol
        if drift is None:
            drift = max(100 * self.cg_tol, 1e-9 if f64 else 1e-4)
        return inv, drift

    def _invert(self, k: int, x_next, rhs, A, nb, tol, f_guess=None):
        """Recover the input of unroll ``k`` from its output; returns ``(x, ok, residual)``.

        ``f_guess`` (the denoiser residual at the next state, known from a re-run) starts the
        denoiser inversion at ``z − f_guess`` when the denoiser is one we invert ourselves."""
        with torch.no_grad(), self._frozen_sn():
            z, ok, r1 = self._dc(k).inverse(x_next, rhs, A, nb, tol=tol)
            if not ok:
                return z, False, r1
            den = self._den(k)
            x0 = None if f_guess is None or not self._fusable(k) else z - f_guess
            if hasattr(den, "inverse"):
                kw = {"anderson": self.inversion_anderson} if self.inversion_anderson else {}
                if x0 is not None:
                    kw["x0"] = x0
                x, ok, r2 = den.inverse(z, tol=tol, max_iter=self.inversion_max_iter, **kw)
            else:
                x, ok, r2 = fixed_point_inverse(
                    den.residual,
                    z,
                    tol=tol,
                    max_iter=self.inversion_max_iter,
                    anderson=self.inversion_anderson,
                    x0=x0,
                )
            return x, ok, max(r1, r2)

    def _fusable(self, k: int) -> bool:
        """True when ``D_k(x) = x + D_k.residual(x)`` is inverted by our fixed-point iteration."""
        den = self._den(k)
        return isinstance(den, ResidualCNN) or (
            hasattr(den, "residual") and not hasattr(den, "inverse")
        )

    def _exact(self, k: int) -> bool:
        """True when ``D_k`` is inverted exactly and backpropagated in one pass
        (``inverse_vjp``, e.g. :class:`~qmrkit.learn.CouplingCNN`)."""
        den = self._den(k)
        return bool(getattr(den, "exact_inverse", False)) and hasattr(den, "inverse_vjp")

    def _invert_rerun(self, k: int, x_next, rhs, rhs_in, A, nb, tol, f_guess=None):
        """Invert unroll ``k`` and re-run it with autograd, sharing the last denoiser evaluation.

        The denoiser inversion evaluates ``f(x)`` with autograd at every iterate; the one at the
        solution is the graph that the backward pass needs, so the re-run costs only the data
        consistency (warm-started at ``x_next``). ``f_guess`` (``f`` at the next state, from the
        previous re-run) gives the starting point ``z − f_guess``. Returns
        ``(x_leaf, out, ok, residual, f_at_x)``.
        """
        with self._frozen_sn():
            with torch.no_grad():
                z, ok, r1 = self._dc(k).inverse(x_next, rhs, A, nb, tol=tol)
            if not ok:
                return z, None, False, r1, None
            x0 = None if f_guess is None else z - f_guess
            xl, ok, r2, fx = _fixed_point(
                self._den(k).residual,
                z,
                tol,
                self.inversion_max_iter,
                self.inversion_anderson,
                x0,
                graph=True,
            )
            with torch.enable_grad():
                out = self._dc(k)(xl + fx, rhs_in, A, nb, x_next.detach())
            return xl, out, ok, max(r1, r2), fx.detach()

    def _check_inputs(self, y, A, x0):
        if not isinstance(A, LinearOperator):
            raise ParameterError(
                f"UnrolledNet: A must be a qmrkit.ops.LinearOperator, got {type(A).__name__}"
            )
        if self.ndim is not None and len(A.ishape) != self.ndim:
            raise ShapeError(
                f"UnrolledNet: the denoiser acts on {self.ndim}-D images but the operator's image "
                f"shape {A.ishape} has {len(A.ishape)} dimensions; build the denoiser with "
                f"ndim={len(A.ishape)} (2D+time and 3D data use ndim=3)"
            )
        if not isinstance(y, torch.Tensor) or not y.is_complex():
            raise ShapeError("UnrolledNet: y must be a complex torch tensor (k-space data)")
        if tuple(y.shape[y.ndim - len(A.oshape) :]) != tuple(A.oshape) or y.ndim < len(A.oshape):
            raise ShapeError(
                f"UnrolledNet: k-space y must have shape (*batch, *{A.oshape}), got {tuple(y.shape)}"
            )
        nb = y.ndim - len(A.oshape)
        if x0 is not None and tuple(x0.shape) != tuple(y.shape[:nb]) + tuple(A.ishape):
            raise ShapeError(
                f"UnrolledNet: x0 must have shape {tuple(y.shape[:nb]) + tuple(A.ishape)}, got "
                f"{tuple(x0.shape)}"
            )
        return nb

    # ----------------------------------------------------------------------------- forward
    def forward(self, y: torch.Tensor, A: LinearOperator, x0: torch.Tensor | None = None):
        nb = self._check_inputs(y, A, x0)
        rhs = A.H(y)
        x = rhs if x0 is None else x0
        if self.training:
            self.update_spectral_norm()
        params = tuple(p for p in self.parameters() if p.requires_grad)
        needs_graph = torch.is_grad_enabled() and (
            bool(params) or x.requires_grad or rhs.requires_grad
        )
        if not needs_graph or self.memory == "standard":
            for k in range(self.n_unrolls):
                x = self._unroll(k, x, rhs, A, nb)
            return x
        if self.memory == "checkpoint":
            outputs: dict[int, torch.Tensor] = {}
            for k in range(self.n_unrolls):
                x = _checkpoint(
                    self._unroll_remembered, k, x, rhs, A, nb, outputs, use_reentrant=False
                )
            return x
        return _MEL.apply(self, A, nb, x, rhs, *params)


class _MEL(torch.autograd.Function):
    """Reversible / hybrid backpropagation through an :class:`UnrolledNet`."""

    @staticmethod
    def forward(ctx, net: UnrolledNet, A, nb: int, x0, rhs, *params):  # type: ignore[override]
        hybrid = net.memory == "hybrid"
        K = net.checkpoint_every
        ck_idx = [0]
        cks = []
        x = x0
        with torch.no_grad():
            for k in range(net.n_unrolls):
                if hybrid and k > 0 and k % K == 0:
                    ck_idx.append(k)
                    cks.append(x)
                x = net._unroll(k, x, rhs, A, nb)
        ctx.save_for_backward(x0, rhs, x, *cks)
        ctx.net, ctx.A, ctx.nb, ctx.ck_idx, ctx.params = net, A, nb, ck_idx, params
        return x

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        net: UnrolledNet = ctx.net
        A, nb, params = ctx.A, ctx.nb, ctx.params
        x0, rhs, xN, *cks = ctx.saved_tensors
        ckpts = dict(zip(ctx.ck_idx, [x0, *cks], strict=False))
        need_x0, need_rhs = ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        inv_tol, drift_tol = net._tols(xN.dtype)
        hybrid = net.memory == "hybrid"
        stats = dict(
            mode=net.memory,
            inversions=0,
            fallbacks=0,
            recomputed_unrolls=0,
            max_drift=0.0,
            max_inverse_residual=0.0,
        )
        pgrads: list = [None] * len(params)
        g_rhs = None
        rhs_in = rhs.detach().requires_grad_(need_rhs)

        def recompute(s: int, upto: int) -> dict:
            """States s..upto recomputed forward from the stored state s (no graph)."""
            out = {s: ckpts[s]}
            with torch.no_grad():
                for j in range(s, upto):
                    out[j + 1] = net._unroll(j, out[j], rhs, A, nb)
            stats["recomputed_unrolls"] += upto - s
            return out

        def fail(msg: str) -> None:
            stats["fallbacks"] += 1
            if net.on_inversion_failure == "raise" and not hybrid:
                raise ParameterError(f"UnrolledNet(memory='reversible'): {msg}")
            net.inversion_fallbacks += 1
            if net.inversion_fallbacks == 1 or net.warn_every_fallback:
                log.warning(msg)
                warnings.warn(msg, InversionWarning, stacklevel=3)
            else:  # later ones only at info level; the count is in net.inversion_fallbacks
                log.info(msg)

        def accumulate(out, xin):
            """Backpropagate ``g`` through one re-run unroll and add its contributions."""
            nonlocal g, g_rhs
            inputs = [xin] + ([rhs_in] if need_rhs else []) + list(params)
            grads = torch.autograd.grad(out, inputs, g, allow_unused=True)
            g = grads[0]
            off = 1
            # sums are accumulated in place (they are our own tensors): no third copy of the
            # parameter gradients while the next unroll's backward runs
            if need_rhs:
                if grads[1] is not None:
                    g_rhs = grads[1] if g_rhs is None else g_rhs.add_(grads[1])
                off = 2
            add_param_grads(grads[off:])

        def add_param_grads(grads) -> None:
            for i, gp in enumerate(grads):
                if gp is not None:
                    pgrads[i] = gp if pgrads[i] is None else pgrads[i].add_(gp)

        def drift_warning(drift: float, first: int, last: int) -> None:
            fail(
                f"reversible backward: recovered states drifted by {drift:.2e} "
                f"(> {drift_tol:.1e}) over unrolls {first}..{last}; their gradients may be "
                "inaccurate. Use memory='hybrid' (checkpoints with drift checks) or a larger λ"
            )

        def exact_step(k: int, x_next):
            """Invert unroll ``k`` whose denoiser has an exact inverse and backpropagate ``g``
            through it with the same evaluations: the CG block in closed form, re-run
            warm-started at ``x_next`` with autograd; the denoiser by ``inverse_vjp``. Returns
            ``(x_k, ok, residual)``; nothing is accumulated when the inverse fails."""
            nonlocal g
            dc, den = net._dc(k), net._den(k)
            with net._frozen_sn():
                with torch.no_grad():
                    z, ok, res = dc.inverse(x_next, rhs, A, nb, tol=inv_tol)
                stats["inversions"] += 1
                stats["max_inverse_residual"] = max(stats["max_inverse_residual"], res)
                if not ok:
                    return z, False, res
                with torch.enable_grad():
                    zl = z.detach().requires_grad_(True)
                    out = dc(zl, rhs_in, A, nb, x_next.detach())
                stats["max_drift"] = max(stats["max_drift"], _rel(out.detach() - x_next, x_next))
                accumulate(out, zl)  # g is now the gradient at z
                del out, zl
                x, g, grads = den.inverse_vjp(z, g, params)
            add_param_grads(grads)
            return x, True, res

        def hybrid_segment_fused(s: int, e: int, x_end) -> bool:
            """Backpropagate segment ``s..e-1`` of ``hybrid`` with fused inversion + re-run.

            Unrolls ``e-1..s+1`` are inverted and re-run in one pass (as in ``reversible``), their
            contributions accumulated tentatively; unroll ``s`` is inverted too and the recovered
            state is compared with the stored checkpoint (the drift check); unroll ``s`` itself
            is re-run from the checkpoint. Returns False (contributions discarded) when an
            inversion fails or the drift exceeds ``drift_tol``; the caller then recomputes.
            """
            nonlocal g, g_rhs

            def copy(t):
                return None if t is None else t.clone()

            snap = (g, [copy(p) for p in pgrads], copy(g_rhs))
            x_next, f_next = x_end, None
            ok, drift = True, math.inf
            for k in range(e - 1, s, -1):
                if net._exact(k):
                    x_next, ok, _ = exact_step(k, x_next)
                    f_next = None
                    if not ok:
                        break
                    continue
                xin, out, ok, res, f_new = net._invert_rerun(
                    k, x_next, rhs, rhs_in, A, nb, inv_tol, f_next
                )
                stats["inversions"] += 1
                stats["max_inverse_residual"] = max(stats["max_inverse_residual"], res)
                if not ok:
                    break
                accumulate(out, xin)
                x_next, f_next = xin.detach(), f_new
                del out, xin
            exact_s = ok and net._exact(s)
            if exact_s:  # invert and backpropagate unroll s in one pass; check it at the end
                xs, ok, res = exact_step(s, x_next)
                if ok:
                    drift = _rel(xs - ckpts[s], ckpts[s])
                    stats["max_drift"] = max(stats["max_drift"], drift)
            elif ok:
                xs, ok, res = net._invert(s, x_next, rhs, A, nb, inv_tol, f_guess=f_next)
                stats["inversions"] += 1
                stats["max_inverse_residual"] = max(stats["max_inverse_residual"], res)
                if ok:
                    drift = _rel(xs - ckpts[s], ckpts[s])
                    stats["max_drift"] = max(stats["max_drift"], drift)
            if not (ok and drift <= drift_tol):
                g, pl, g_rhs = snap
                pgrads[:] = pl
                fail(
                    f"hybrid backward: unrolls {s}..{e - 1} did not invert accurately "
                    f"(relative drift {drift:.2e} > {drift_tol:.1e}); recomputing them from "
                    f"the checkpoint at unroll {s}"
                )
                return False
            if exact_s:  # its gradient was taken at the recovered x_s, within drift_tol
                return True
            with torch.enable_grad():
                xin = ckpts[s].detach().requires_grad_(True)
                out = net._unroll(s, xin, rhs_in, A, nb, x_init=x_next.detach())
            stats["max_drift"] = max(stats["max_drift"], _rel(out.detach() - x_next, x_next))
            accumulate(out, xin)
            return True

        e, x_end = net.n_unrolls, xN
        for s in reversed(ctx.ck_idx):
            states: dict = {}
            if (
                hybrid
                and e - s > 1
                and all(net._fusable(k) or net._exact(k) for k in range(s, e))
                and hybrid_segment_fused(s, e, x_end)
            ):
                e, x_end = s, ckpts[s]
                continue
            if (
                hybrid
                and e - s > 1
                and not all(net._fusable(k) or net._exact(k) for k in range(s, e))
            ):
                # online drift check: invert the whole segment down to its stored start
                cur, ok, k = x_end, True, e - 1
                rec = {}
                while k >= s:
                    cur, ok, res = net._invert(k, cur, rhs, A, nb, inv_tol)
                    stats["inversions"] += 1
                    stats["max_inverse_residual"] = max(stats["max_inverse_residual"], res)
                    if not ok:
                        break
                    rec[k] = cur
                    k -= 1
                drift = _rel(cur - ckpts[s], ckpts[s]) if ok else math.inf
                if ok:
                    stats["max_drift"] = max(stats["max_drift"], drift)
                if ok and drift <= drift_tol:
                    states = rec
                    states[s] = ckpts[s]
                else:
                    fail(
                        f"hybrid backward: unrolls {s}..{e - 1} did not invert accurately "
                        f"(relative drift {drift:.2e} > {drift_tol:.1e}); recomputing them from "
                        f"the checkpoint at unroll {s}"
                    )
                    states = recompute(s, e - 1)
            elif hybrid and e - s > 1:  # the fused pass failed (and warned): recompute
                states = recompute(s, e - 1)
            x_next = x_end
            f_next = None  # f at x_next, from the previous re-run (starting-point hint)
            for k in range(e - 1, s - 1, -1):
                if k not in states and net._exact(k):
                    # also at k == s: one coupling's graph at a time, never a whole unroll's
                    # (the peak memory), and the recovered input is checked against the stored one
                    xk, ok, res = exact_step(k, x_next)
                    if ok:
                        if k == s:
                            drift = _rel(xk - ckpts[s], ckpts[s])
                            stats["max_drift"] = max(stats["max_drift"], drift)
                            if not drift <= drift_tol:
                                drift_warning(drift, s, e - 1)
                        x_next, f_next = xk, None
                        continue
                    fail(
                        f"reversible backward: unroll {k}'s data consistency could not be "
                        f"inverted (residual {res:.2e}); recomputing states {s}..{k} from the "
                        "input"
                    )
                    states = recompute(s, k)
                fused = False
                if k in states:
                    xk, ok, res = states[k], True, 0.0
                elif k == s:
                    xk, ok, res = ckpts[s], True, 0.0
                elif net._fusable(k):
                    xin, out, ok, res, f_next_new = net._invert_rerun(
                        k, x_next, rhs, rhs_in, A, nb, inv_tol, f_next
                    )
                    stats["inversions"] += 1
                    stats["max_inverse_residual"] = max(stats["max_inverse_residual"], res)
                    fused = out is not None
                    xk = xin.detach()
                else:
                    xk, ok, res = net._invert(k, x_next, rhs, A, nb, inv_tol)
                    stats["inversions"] += 1
                    stats["max_inverse_residual"] = max(stats["max_inverse_residual"], res)
                for attempt in range(2):
                    if not (fused and attempt == 0):
                        with torch.enable_grad():
                            xin = xk.detach().requires_grad_(True)
                            out = net._unroll(k, xin, rhs_in, A, nb, x_init=x_next.detach())
                        f_next_new = None
                    cons = _rel(out.detach() - x_next, x_next)
                    stats["max_drift"] = max(stats["max_drift"], cons)
                    bad = not ok or not cons <= drift_tol
                    if bad and k == s and k not in states:
                        # exact stored input, but the recovered later state had drifted
                        drift_warning(cons, s + 1, e - 1)
                    elif attempt == 0 and bad and k not in states:
                        fail(
                            f"reversible backward: unroll {k} could not be inverted accurately "
                            f"(inversion residual {res:.2e}, re-run mismatch {cons:.2e} > "
                            f"{drift_tol:.1e}); recomputing states 0..{k} from the input. Use a "
                            "spectrally normalised denoiser or memory='hybrid'"
                        )
                        states = recompute(s, k)
                        xk, ok = states[k], True
                        continue
                    break
                accumulate(out, xin)
                x_next, f_next = xk, f_next_new
                del out, xin
            e, x_end = s, ckpts[s]
        net.last_backward = stats
        if stats["fallbacks"]:
            log.info("MEL backward: %s", stats)
        return (None, None, None, g if need_x0 else None, g_rhs, *pgrads)


__all__ = ["UnrolledNet", "InversionWarning", "MEMORY_MODES"]
