"""``plan(...)``: validate a NUFFT problem, choose how to compute it and return the operator."""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .._device import as_tensor, resolve_device, synchronize
from .._optional import available, require
from .._progress import get_logger
from ..errors import DeviceError, DTypeError, ParameterError, ShapeError, UnknownNameError
from ..ops.base import LinearOperator
from . import planner as pl
from .backends import CufinufftEngine, FinufftEngine
from .kernels import MAX_EPS, MIN_EPS
from .native import NativeEngine
from .toeplitz import ToeplitzNormal

log = get_logger("nufft")

BACKENDS = ("auto", "torch", "finufft", "cufinufft")
METHODS = ("auto", "gather", "sparse", "binned")
NORMALS = ("auto", "toeplitz", "direct")
TUNES = ("heuristic", "measure")
#: floor of the default memory budget (bytes of precomputed interpolation data)
DEFAULT_MEMORY_BUDGET = 1 << 30
#: the default budget is this fraction of the memory available when planning (building the
#: sparse matrices peaks at about 2.1x the memory they finally hold) ...
MEMORY_FRACTION = 0.3
#: ... capped at this many bytes
MAX_DEFAULT_BUDGET = 64 << 30
MEASURE_TOP = 5  # candidates timed by tune="measure"
#: an external library asked for ε itself must achieve ≤ this fraction of ε when verified
VERIFY_FRACTION = 0.8


@dataclass
class NufftInfo:
    """What a plan chose and why.

    Attributes
    ----------
    backend : str
        ``"torch"``, ``"finufft"`` or ``"cufinufft"``.
    method : str
        ``"gather"`` (precomputation-free), ``"sparse"`` (precomputed CSR), ``"binned"`` (sorted
        samples, dense per-bin products) or the library's name.
    normal : str
        ``"toeplitz"`` or ``"direct"`` (adjoint of forward).
    oversampling : float
        Grid oversampling σ requested (``upsampfac`` for FINUFFT); the grid is rounded up from it.
    grid_size : tuple of int
        Oversampled grid size (cells per axis).
    kernel_width : int
        Kernel width W (grid cells); for FINUFFT the width its rule gives (FINUFFT decides).
    kernel_beta : float
        ES shape parameter β (NaN for external libraries).
    eps : float
        Requested relative accuracy.
    expected_error : float
        Estimated relative ℓ2 error of forward and adjoint.
    tune : str
        ``"heuristic"``, ``"measure"`` or ``"wisdom"`` (a remembered measurement).
    reason : str
        Why this choice (cost-model or measured seconds of the alternatives, fallbacks).
    memory_bytes : int
        Bytes of precomputed data held by the plan (interpolation data, Toeplitz kernel).
    timings : dict
        Seconds per forward+adjoint of the candidates timed by ``tune="measure"``.
    """

    backend: str
    method: str
    normal: str
    oversampling: float
    grid_size: tuple[int, ...]
    kernel_width: int
    kernel_beta: float
    eps: float
    expected_error: float
    tune: str
    reason: str
    memory_bytes: int = 0
    timings: dict = field(default_factory=dict)


def _validate_traj(
    traj: Any,
    im_size: Any,
    device,
) -> tuple[torch.Tensor, tuple[int, ...]]:
    t = as_tensor(traj, device=device, name="traj")
    if t.is_complex() or not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
        raise DTypeError(f"traj must be a real array of k-space positions, got dtype {t.dtype}")
    t = t.to(torch.float64)
    if isinstance(im_size, int):
        im_size = (im_size,)
    try:
        if isinstance(im_size, str):
            raise TypeError(im_size)
        size = tuple(int(n) for n in im_size)
    except (TypeError, ValueError) as exc:
        raise ShapeError(f"im_size must be a sequence of 1 to 3 ints, got {im_size!r}") from exc
    if not 1 <= len(size) <= 3 or any(n < 1 for n in size):
        raise ShapeError(f"im_size must have 1 to 3 positive entries, got {size}")
    if t.ndim < 2 or t.shape[-1] != len(size):
        raise ShapeError(
            f"traj must have shape (..., M, ndim) with ndim = len(im_size) = {len(size)}, "
            f"got shape {tuple(t.shape)}"
        )
    if t.shape[-2] < 1:
        raise ShapeError("traj has no samples (M = 0)")
    # one pass for the range; NaN and ±Inf show in it (aminmax propagates NaN), and only then
    # is the non-finite count worth a second pass (validation was most of a warm plan's time)
    lo_t, hi_t = torch.aminmax(t)
    lo, hi = float(lo_t), float(hi_t)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        bad = int((~torch.isfinite(t)).any(-1).sum())
        raise ParameterError(f"traj contains {bad} non-finite sample position(s) (NaN or Inf)")
    if lo < -0.5 or hi > 0.5:
        raise ParameterError(
            f"traj must be in cycles/pixel within [-0.5, 0.5) (0.5 is accepted and wraps to -0.5); "
            f"found values in [{lo:.6g}, {hi:.6g}]. Convert radians ([-π, π)) with "
            f"qmrkit.nufft.from_radians(traj) and ISMRMRD units ([-N/2, N/2]) with "
            f"qmrkit.nufft.from_ismrmrd(traj, im_size)."
        )
    return t, size


class NufftPlan(LinearOperator):
    """A planned NUFFT: ``op(x)`` image -> samples, ``op.H(y)`` samples -> image, ``op.normal(x)``.

    Built by :func:`plan`; see there for conventions. Inputs are ``(*batch, *im_size)`` images and
    ``(*batch, M)`` samples of the plan's dtype and device; with per-batch trajectories
    ``(*T, M, ndim)`` the batch dimensions must end in ``T``.
    """

    autograd_safe = False  # backward of forward is the adjoint (leaner than tracing the gridding)

    def __init__(
        self,
        engines: list,
        im_size: tuple[int, ...],
        n_samples: int,
        traj_batch: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device,
        info: NufftInfo,
        toeplitz: ToeplitzNormal | None = None,
    ):
        super().__init__(im_size, (n_samples,))
        self.engines = engines
        self.im_size = im_size
        self.n_samples = n_samples
        self.traj_batch = traj_batch
        self.dtype = dtype
        self.device = device
        self.info = info
        self.toeplitz = toeplitz

    # -- checks ----------------------------------------------------------------------------------
    def _check_data(self, t: torch.Tensor, trailing: int, what: str) -> tuple[int, ...]:
        if t.dtype != self.dtype:
            raise DTypeError(
                f"NUFFT plan is {self.dtype} but {what} is {t.dtype}; convert with "
                f".to({self.dtype}) or plan with dtype={t.dtype}"
            )
        if t.device != self.device and not (
            t.device.type == self.device.type == "cuda" and t.device.index is None
        ):
            raise DeviceError(
                f"NUFFT plan lives on {self.device} but {what} is on {t.device}; move it with "
                f".to('{self.device}') or plan with device='{t.device}'"
            )
        lead = tuple(t.shape[: t.ndim - trailing])
        nt = len(self.traj_batch)
        if nt and lead[len(lead) - nt :] != self.traj_batch:
            raise ShapeError(
                f"the plan has per-batch trajectories of batch shape {self.traj_batch}; the "
                f"{what}'s batch dimensions {lead} must end in it"
            )
        return lead

    # -- LinearOperator --------------------------------------------------------------------------
    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        nd = len(self.im_size)
        lead = self._check_data(x, nd, "input")
        ntr = len(self.engines)
        xb = x.reshape(-1, ntr, *self.im_size)
        outs = [e.forward(xb[:, i]) for i, e in enumerate(self.engines)]
        y = outs[0].unsqueeze(1) if ntr == 1 else torch.stack(outs, 1)
        return y.reshape(*lead, self.n_samples)

    def _adjoint(self, y: torch.Tensor) -> torch.Tensor:
        lead = self._check_data(y, 1, "adjoint input")
        ntr = len(self.engines)
        yb = y.reshape(-1, ntr, self.n_samples)
        outs = [e.adjoint(yb[:, i]) for i, e in enumerate(self.engines)]
        x = outs[0].unsqueeze(1) if ntr == 1 else torch.stack(outs, 1)
        return x.reshape(*lead, *self.im_size)

    def _normal(self, x: torch.Tensor) -> torch.Tensor:
        if self.toeplitz is not None:
            self._check_data(x, len(self.im_size), "input")
            return self.toeplitz(x)
        return self._adjoint(self._forward(x))

    def normal(self, x: torch.Tensor) -> torch.Tensor:
        """``AᴴA x``; by Toeplitz embedding when the plan chose it (autograd-traceable then)."""
        if self.toeplitz is None:
            return super().normal(x)
        self._check(x, self.ishape, "input")
        return self._normal(x)

    def __repr__(self) -> str:
        i = self.info
        return (
            f"NufftPlan(im_size={self.im_size}, M={self.n_samples}, backend={i.backend!r}, "
            f"method={i.method!r}, normal={i.normal!r}, σ={i.oversampling:g}, "
            f"W={i.kernel_width}, grid={i.grid_size}, eps={i.eps:g})"
        )


# -- building -------------------------------------------------------------------------------------
def available_memory(device: torch.device) -> int | None:
    """Bytes of memory available for new allocations on ``device``, or None when unknown.

    CPU: ``MemAvailable`` of ``/proc/meminfo`` (Linux), else ``os.sysconf`` free pages.
    CUDA: free bytes reported by :func:`torch.cuda.mem_get_info`.

    Parameters
    ----------
    device : torch.device
        Device the plan's data will live on.

    Returns
    -------
    int or None
        Available bytes, or None when they cannot be read.
    """
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):
            return None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


def default_memory_budget(device: torch.device) -> int:
    """Default ``memory_budget``: 30 % of the memory available on ``device`` when planning.

    At least 1 GiB (or half the available memory when less than 2 GiB is available) and at most
    64 GiB; 1 GiB when the available memory cannot be read. The fraction leaves room for the
    temporary memory of building the sparse matrices (peak about 2.1x the final size) and for data.

    Parameters
    ----------
    device : torch.device
        Device the plan's data will live on.

    Returns
    -------
    int
        Bytes of precomputed interpolation data a plan may hold (``plan(memory_budget=None)``).
    """
    avail = available_memory(device)
    if avail is None:
        return DEFAULT_MEMORY_BUDGET
    floor = min(DEFAULT_MEMORY_BUDGET, avail // 2)
    return int(min(MAX_DEFAULT_BUDGET, max(floor, MEMORY_FRACTION * avail)))


def _engine(
    c: pl.Candidate,
    traj: torch.Tensor,
    im_size: tuple[int, ...],
    eps: float,
    dtype: torch.dtype,
    fftw: str = "estimate",
    defer: bool = False,
):
    if c.backend == "torch":
        return NativeEngine(
            traj,
            im_size,
            c.grid,
            c.kernel,
            dtype,
            c.method,
            accumulate_double=dtype == torch.complex64 and eps < 1e-5,
            defer=defer,
            expected_bytes=c.memory,
        )
    if c.backend == "finufft":
        return FinufftEngine(
            traj,
            im_size,
            eps,
            dtype,
            upsampfac=c.sigma,
            fftw=fftw,
            double=c.double,
            lib_factor=c.lib_factor,
        )
    return CufinufftEngine(
        traj, im_size, eps, dtype, upsampfac=c.sigma, double=c.double, lib_factor=c.lib_factor
    )


def _verify_external(
    c: pl.Candidate,
    traj: torch.Tensor,
    im_size: tuple[int, ...],
    eps: float,
    dtype: torch.dtype,
    x: torch.Tensor,
    y: torch.Tensor,
) -> tuple[float, float]:
    """Achieved relative ℓ2 errors (forward, adjoint) of an external-library candidate.

    Measured on the real trajectory with the random data ``x`` (image) and ``y`` (samples),
    against the same library in double precision at σ = 2 and a 1000x tighter tolerance.
    """
    eng = _engine(c, traj, im_size, eps, dtype)
    ref_eps = max(eps * 1e-3, 1e-13)
    ref = (FinufftEngine if c.backend == "finufft" else CufinufftEngine)(
        traj, im_size, ref_eps, torch.complex128, upsampfac=2.0
    )
    x128 = x.to(torch.complex128)
    y128 = y.to(torch.complex128)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(
            torch.linalg.vector_norm(a.to(torch.complex128) - b) / torch.linalg.vector_norm(b)
        )

    return rel(eng.forward(x), ref.forward(x128)), rel(eng.adjoint(y), ref.adjoint(y128))


def _random(shape, dtype, device, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    real = torch.float32 if dtype == torch.complex64 else torch.float64
    z = torch.complex(
        torch.randn(shape, generator=g, dtype=real), torch.randn(shape, generator=g, dtype=real)
    )
    return z.to(device)


def _psf(
    backend: str, trajs: torch.Tensor, im_size: tuple[int, ...], eps: float, dtype: torch.dtype
) -> torch.Tensor:
    """Adjoint NUFFT of unit samples on the doubled image, one per trajectory: ``(T, *2N)``.

    Computed once per plan with the fastest available engine for a single transform (FINUFFT on
    the CPU when installed, cuFINUFFT on CUDA when chosen, else torch-native gather at σ = 1.25,
    which keeps the 2N grid small).
    """
    big = tuple(2 * n for n in im_size)
    p = pl.Problem(big, trajs.shape[1], 1, eps, dtype, 1, trajs.device)
    c = None
    if trajs.device.type == "cpu" and available("finufft"):
        c = pl.external_candidate(p, "finufft", 2.0 if eps < 1e-9 else 1.25)
    elif backend == "cufinufft":
        c = pl.external_candidate(p, "cufinufft", 2.0)
    if c is None:
        c = pl.native_candidate(p, "gather", 1.25) or pl.native_candidate(p, "gather", 2.0)
    out = []
    for t in trajs:
        eng = _engine(c, t, big, eps, dtype)
        ones = torch.ones((1, t.shape[0]), dtype=dtype, device=trajs.device)
        out.append(eng.adjoint(ones)[0])
        del eng
    return torch.stack(out)


def plan(
    traj: Any,
    im_size: int | Sequence[int],
    *,
    eps: float = 1e-3,
    batch: int | None = None,
    device: Any = None,
    dtype: torch.dtype = torch.complex64,
    backend: str = "auto",
    method: str = "auto",
    normal: str = "auto",
    tune: str = "heuristic",
    memory_budget: int | None = None,
    oversampling: float | None = None,
) -> NufftPlan:
    """Plan a non-uniform FFT for a trajectory, choosing backend, method, σ and W for accuracy ε.

    Convention: ``y_m = Σ_r x_r · exp(−2πi k_m·r)`` ("type 2", unnormalised), with ``k_m`` in
    cycles/pixel and the centred image index ``r = n − N//2``; the adjoint ("type 1") is its exact
    conjugate transpose.

    Parameters
    ----------
    traj : array_like
        k-space positions, shape ``(M, ndim)`` or ``(*T, M, ndim)`` for one trajectory per batch
        entry (frames), in cycles/pixel within ``[-0.5, 0.5)``. Use :func:`from_radians` or
        :func:`from_ismrmrd` to convert other units.
    im_size : int or tuple of int
        Image size ``N`` (pixels per axis, 1 to 3 axes, odd or even).
    eps : float
        Requested relative ℓ2 accuracy of forward and adjoint, in ``[1e-14, 1e-1]``. complex64 data
        reach about 1e-6 at best.
    batch : int, optional
        Typical number of images transformed together (coils × frames), used for tuning.
    device : str or torch.device, optional
        Device of the plan (default: the trajectory's, else CPU). Data must live there.
    dtype : torch.dtype
        ``torch.complex64`` (default) or ``torch.complex128``.
    backend : {"auto", "torch", "finufft", "cufinufft"}
        ``"auto"`` considers the torch-native engine and every installed library for the device.
    method : {"auto", "gather", "sparse", "binned"}
        Torch-native gridding: on-the-fly weights (memory O(M·W·d)), a precomputed sparse
        matrix (O(M·W^d), only within ``memory_budget``; otherwise falls back to ``"binned"``
        on the CPU, ``"gather"`` elsewhere, and logs why), or samples sorted into bins with
        dense per-bin products (memory O(M·(B + W)·d), see :mod:`qmrkit.nufft.binned`).
        ``"auto"`` weighs sparse, binned and gather on the CPU and sparse and gather on CUDA.
    normal : {"auto", "toeplitz", "direct"}
        How ``op.normal`` computes AᴴA: Toeplitz embedding (two 2N FFTs) or adjoint of forward.
    tune : {"heuristic", "measure"}
        Cost model, or timing of the best candidates on this problem with the result remembered
        on disk (``$QMRKIT_WISDOM_DIR``, default ``~/.cache/qmrkit``).
    memory_budget : int, optional
        Bytes of precomputed interpolation data allowed. Default: 30 % of the memory available
        on the device when planning (``MemAvailable`` on Linux CPUs, free memory on CUDA), at
        least 1 GiB and at most 64 GiB (see :func:`default_memory_budget`).
    oversampling : float, optional
        Force the grid oversampling σ (else chosen among 1.25, 1.5, 1.75, 2.0).

    Returns
    -------
    NufftPlan
        A :class:`qmrkit.ops.LinearOperator`; ``op.info`` says what was chosen and why.
    """
    # -- arguments -------------------------------------------------------------------------------
    if backend not in BACKENDS:
        raise UnknownNameError(f"unknown NUFFT backend {backend!r}; known: {BACKENDS}")
    if method not in METHODS:
        raise UnknownNameError(f"unknown NUFFT method {method!r}; known: {METHODS}")
    if normal not in NORMALS:
        raise UnknownNameError(f"unknown normal-operator method {normal!r}; known: {NORMALS}")
    if tune not in TUNES:
        raise UnknownNameError(f"unknown tune mode {tune!r}; known: {TUNES}")
    try:
        eps = float(eps)
    except (TypeError, ValueError) as exc:
        raise ParameterError(f"eps must be a number, got {eps!r}") from exc
    if not (MIN_EPS <= eps <= MAX_EPS):
        raise ParameterError(f"eps must lie in [{MIN_EPS:g}, {MAX_EPS:g}], got {eps:g}")
    if dtype not in (torch.complex64, torch.complex128):
        raise DTypeError(f"dtype must be torch.complex64 or torch.complex128, got {dtype}")
    if memory_budget is not None and memory_budget < 0:
        raise ParameterError(f"memory_budget must be ≥ 0 bytes, got {memory_budget}")
    if oversampling is not None and not (1.0 < float(oversampling) <= 4.0):
        raise ParameterError(f"oversampling must lie in (1, 4], got {oversampling}")
    dev = resolve_device(device, traj)
    t, size = _validate_traj(traj, im_size, dev)
    nd = len(size)
    traj_batch = tuple(t.shape[:-2])
    m = int(t.shape[-2])
    trajs = t.reshape(-1, m, nd)
    if batch is not None and int(batch) < 1:
        raise ParameterError(f"batch must be ≥ 1, got {batch}")
    b = int(batch or 1)
    budget = default_memory_budget(dev) if memory_budget is None else int(memory_budget)
    if dtype == torch.complex64 and eps < 1e-6:
        log.warning(
            "eps=%g requested in complex64: single precision floors near 1e-6 "
            "(expected_error includes it); "
            "use dtype=torch.complex128 for higher accuracy",
            eps,
        )

    # -- backends and methods ---------------------------------------------------------------------
    if backend == "auto":
        backends = ["torch"]
        if dev.type == "cpu" and available("finufft"):
            backends.append("finufft")
        if dev.type == "cuda" and available("cufinufft"):
            backends.append("cufinufft")
    else:
        if backend == "finufft":
            require("finufft")
            if dev.type != "cpu":
                raise DeviceError(
                    f"the finufft backend runs on the CPU, but device={dev}; use "
                    "backend='cufinufft' or 'torch' on CUDA"
                )
        if backend == "cufinufft":
            require("cufinufft")
            if dev.type != "cuda":
                raise DeviceError(f"the cufinufft backend needs a CUDA device, got {dev}")
        backends = [backend]
    # binned: measured faster than gather on the CPU (3D, ε = 1e-6); not run on CUDA yet
    auto = ["sparse", "binned", "gather"] if dev.type == "cpu" else ["sparse", "gather"]
    methods = auto if method == "auto" else [method]
    problem = pl.Problem(size, m, trajs.shape[0], eps, dtype, b, dev)
    sigmas = (float(oversampling),) if oversampling is not None else None
    cands = pl.candidates(problem, backends, methods, sigmas)
    notes: list[str] = []
    over = [c for c in cands if c.method == "sparse" and c.memory > budget]
    if over:
        need = min(c.memory for c in over)
        dropped = ", ".join(f"{x:g}" for x in sorted({c.sigma for c in over}))
        msg = (
            f"sparse interpolation matrix at σ = {dropped} needs {need / 2**20:.0f} MiB or more "
            f"> memory_budget "
            f"{budget / 2**20:.0f} MiB"
            + (" (default: 30 % of the available memory)" if memory_budget is None else "")
        )
        cands = [c for c in cands if not (c.method == "sparse" and c.memory > budget)]
        kept = sorted({c.sigma for c in cands if c.method == "sparse"})
        if method == "sparse" and not kept:
            light = "binned" if dev.type == "cpu" else "gather"
            msg += f"; falling back to the {light} method (no precomputed matrix)"
            log.warning("NUFFT plan: %s", msg)
            cands = pl.candidates(problem, backends, [light], sigmas)
        else:
            msg += "; those sparse candidates dropped" + (
                f" (kept σ = {', '.join(f'{x:g}' for x in kept)})" if kept else ""
            )
            log.info("NUFFT plan: %s", msg)
        notes.append(msg)
    if not cands:
        raise ParameterError(
            f"no NUFFT configuration reaches eps={eps:g} with backend={backend!r}, "
            f"oversampling={oversampling}; use a larger eps or oversampling=2"
            + (
                f" (single-precision {backend} is trusted only down to eps="
                f"{pl.FINUFFT_SINGLE_FLOOR:g}: use dtype=torch.complex128 or backend='torch')"
                if backend in ("finufft", "cufinufft") and dtype == torch.complex64
                else ""
            )
        )

    # -- choose -----------------------------------------------------------------------------------
    timings: dict[str, float] = {}
    tune_used = tune
    normal_choice: str | None = None if normal == "auto" else normal
    chosen: pl.Candidate | None = None
    # the default budget follows the available memory, so it is not part of the key; a remembered
    # sparse plan that does not fit the budget of today is ignored (and re-measured)
    key = problem.key() + f"/{backend}/{method}/{normal}/{oversampling}/{memory_budget}"
    if tune == "measure":
        entry = pl.load_wisdom().get(key)
        if entry is not None and pl.candidate_from_dict(entry["candidate"]).memory > budget:
            entry = None
        if entry is not None:
            chosen = pl.candidate_from_dict(entry["candidate"])
            if normal_choice is None:
                normal_choice = entry.get("normal", "direct")
            timings = entry.get("timings", {})
            tune_used = "wisdom"
            notes.append(f"from wisdom ({pl.wisdom_path()})")
        else:
            chosen, normal_choice, timings = _measure(
                problem, cands, trajs, size, eps, dtype, normal_choice, budget
            )
            pl.save_wisdom(
                key,
                {
                    "candidate": pl.candidate_to_dict(chosen),
                    "normal": normal_choice,
                    "timings": timings,
                    "signature": problem.signature(),
                },
            )
            notes.append(
                "measured: "
                + ", ".join(
                    f"{k} {v * 1e3:.1f} ms"
                    for k, v in sorted(timings.items(), key=lambda kv: kv[1])
                )
            )
        if chosen.verified_error is not None:
            notes.append(
                f"{chosen.backend} asked for tolerance {chosen.lib_factor:g}·ε; achieved error "
                f"verified at plan time: forward {chosen.verified_error[0]:.2g}, adjoint "
                f"{chosen.verified_error[1]:.2g} (≤ {VERIFY_FRACTION:g}·ε required)"
            )
    else:
        chosen = cands[0]
        alts = ", ".join(f"{c.label()} {c.cost * 1e3:.1f} ms" for c in cands[:4])
        notes.append(f"cost model (fwd+adj, batch {b}): {alts}")
        if normal_choice is None:
            tc = pl.toeplitz_cost(problem)
            normal_choice = "toeplitz" if tc < chosen.cost else "direct"
            notes.append(
                f"normal: toeplitz {tc * 1e3:.1f} ms vs fwd+adj {chosen.cost * 1e3:.1f} ms"
            )
    assert chosen is not None and normal_choice is not None

    # the plan's costly parts wait for their first use (a heuristic plan is built in
    # milliseconds): the interpolation data (weights, sparse matrices, bins) for the first
    # transform (see NativeEngine), the Toeplitz kernel (an adjoint NUFFT on the 2N grid and an
    # FFT) for the first normal application
    engines = [_engine(chosen, tr, size, eps, dtype, defer=True) for tr in trajs]
    toep = None
    if normal_choice == "toeplitz":

        def psf_fn(backend=chosen.backend, trajs=trajs):
            psf = _psf(backend, trajs, size, eps, torch.complex128)
            return psf.reshape(*traj_batch, *psf.shape[1:]) if traj_batch else psf[0]

        toep = ToeplitzNormal(psf_fn, size, dtype, batch_shape=traj_batch)
    mem = sum(e.memory_bytes() for e in engines) + (toep.memory_bytes() if toep else 0)
    info = NufftInfo(
        backend=chosen.backend,
        method=chosen.method,
        normal=normal_choice,
        oversampling=chosen.sigma,
        grid_size=chosen.grid,
        kernel_width=chosen.width,
        kernel_beta=chosen.beta,
        eps=eps,
        expected_error=chosen.expected_error,
        tune=tune_used,
        reason="; ".join(notes),
        memory_bytes=mem,
        timings=timings,
    )
    log.info("NUFFT plan: %s", info)
    return NufftPlan(engines, size, m, traj_batch, dtype, dev, info, toep)


def _measure(
    p: pl.Problem,
    cands: list[pl.Candidate],
    trajs: torch.Tensor,
    size: tuple[int, ...],
    eps: float,
    dtype: torch.dtype,
    normal_choice: str | None,
    budget: int | None = None,
):
    """Time forward+adjoint of the best-ranked candidates (and Toeplitz) on the real problem.

    Engines are built one at a time; the finalists re-timed together hold at most ``budget``
    bytes of precomputed data at once (the fastest first).
    """
    # keep the cost model's top candidates, but always time each backend's best and both
    # extreme oversamplings so a poor model cannot hide the winner
    pick: list[pl.Candidate] = []
    for c in cands:
        ratio = c.cost / max(cands[0].cost, 1e-12)
        new_kind = not any(q.backend == c.backend and q.method == c.method for q in pick)
        if (len(pick) < MEASURE_TOP and ratio <= 4.0) or (new_kind and ratio <= 10.0):
            pick.append(c)
    x = _random((p.batch, *size), dtype, p.device)
    y = _random((p.batch, p.n_samples), dtype, p.device, seed=1)
    # an external library asked for ε itself (instead of a safety fraction of it) is admitted
    # only when its achieved error on this problem is ≤ VERIFY_FRACTION·ε, forward and adjoint
    relaxed: list[pl.Candidate] = []
    for c in pick:
        if c.backend not in ("finufft", "cufinufft") or c.lib_factor is not None:
            continue
        r = dataclasses.replace(c, lib_factor=1.0)
        try:
            errs = _verify_external(r, trajs[0], size, eps, dtype, x[:1], y[:1])
        except (RuntimeError, MemoryError) as exc:
            log.info("NUFFT measure: could not verify %s: %s", r.label(), exc)
            continue
        if max(errs) <= VERIFY_FRACTION * eps:
            r.verified_error = errs
            relaxed.append(r)
        else:
            log.info(
                "NUFFT measure: %s reached %.2g / %.2g > %g·ε; keeping the safety factor",
                r.label(),
                *errs,
                VERIFY_FRACTION,
            )
    pick = pick + relaxed
    timings: dict[str, float] = {}
    best_so_far = [math.inf]

    def pair(eng, reps):
        # a candidate whose first forward alone is slower than the best pair so far is not
        # timed further (its pair is at least twice that first call)
        t0 = time.perf_counter()
        eng.forward(x)
        synchronize(p.device)
        first = time.perf_counter() - t0
        if first > best_so_far[0]:
            return 2 * first * p.n_traj
        tf = pl.time_call(lambda: eng.forward(x), p.device, reps=reps, warm=False)
        ta = pl.time_call(lambda: eng.adjoint(y), p.device, reps=reps)
        t = (tf + ta) * p.n_traj
        best_so_far[0] = min(best_so_far[0], t)
        return t

    # pass 1: every picked candidate, best of 2
    for c in pick:
        try:
            eng = _engine(c, trajs[0], size, eps, dtype)
        except (RuntimeError, MemoryError) as exc:  # e.g. out of memory for a sparse matrix
            log.info("NUFFT measure: %s failed to build: %s", c.label(), exc)
            continue
        c.measured = pair(eng, 2)
        del eng
    timed = sorted((c for c in pick if c.measured is not None), key=lambda c: c.measured)
    if not timed:
        raise ParameterError("NUFFT measure: no candidate could be built (out of memory?)")
    # pass 2: the three fastest again, interleaved, so a burst of load on a shared machine does
    # not decide alone (the minimum over both passes counts)
    finalists = []
    held = 0
    for c in timed[:3]:
        if c.measured > 1.5 * timed[0].measured:
            continue
        if finalists and budget is not None and held + c.memory > budget:
            continue  # would hold several large sparse matrices at once
        finalists.append((c, _engine(c, trajs[0], size, eps, dtype)))
        held += c.memory
    for _ in range(2):
        for c, eng in finalists:
            c.measured = min(c.measured, pair(eng, 1))
    for c in timed:
        timings[c.label()] = c.measured
    best = min(timed, key=lambda c: c.measured)
    best_t = best.measured
    if normal_choice is None:
        psf = _psf(best.backend, trajs[:1], size, eps, torch.complex128)
        toep = ToeplitzNormal(psf[0], size, dtype)
        eng = next(e for c, e in finalists if c is best)
        tt = math.inf
        for _ in range(3):
            tt = min(tt, pl.time_call(lambda: toep(x), p.device, reps=1) * p.n_traj)
            best_t = min(best_t, pair(eng, 1))
        timings["toeplitz normal"] = tt
        timings[best.label()] = best_t
        normal_choice = "toeplitz" if tt < best_t else "direct"
    return best, normal_choice, timings
