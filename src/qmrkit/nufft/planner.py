"""Choosing how to compute a NUFFT: a cost model ("heuristic"), timing ("measure") and wisdom.

A *candidate* is a (backend, method, oversampling σ) triple; with σ and ε fixed the kernel width
W, the grid size and the expected error follow (:mod:`qmrkit.nufft.kernels`). The heuristic cost
model estimates the seconds of one forward + adjoint pair as

    batch · (2·c_fft · G·log2 G  +  c_tapb · M·W^d  +  c_mem · G)  +  c_tap · M·W^d

with constants per backend and method calibrated on a 2-core AVX-512 CPU (see
``docs/nufft.md``); the normal operator by Toeplitz embedding costs two full FFTs of size 2N.
``tune="measure"`` times the best-ranked candidates on the real problem and remembers the winner
on disk ("wisdom", like FFTW's), keyed by the problem's signature and the device, in
``$QMRKIT_WISDOM_DIR/nufft-wisdom.json`` (default ``~/.cache/qmrkit``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

from .._device import synchronize
from .._progress import get_logger
from .backends import library_eps
from .binned import BIN
from .grid import grid_size
from .kernels import MAX_WIDTH, Kernel, beta_rule, estimate_error, rounding_error, width_rule
from .native import sparse_bytes

log = get_logger("nufft.planner")

SIGMAS = (1.25, 1.5, 1.75, 2.0)
#: smallest ε a complex64 (single-precision) FINUFFT plan is trusted with
FINUFFT_SINGLE_FLOOR = 3e-5
FINUFFT_SIGMAS = (1.25, 2.0)

# Seconds per unit, fitted to measurements on the development machine (2 cores, AVX-512, MKL
# FFT in torch, FINUFFT 2.5 with FFTW), forward + adjoint together:
#   c_fft  per grid element · log2(grid size) · batch (one FFT; two are counted),
#   c_tap  per kernel tap (M·W^d) independent of the batch (sparse-matrix row overhead),
#   c_tapb per kernel tap and batch element,
#   c_mem  per grid element and batch element (zero-fill, padding, transposes, deapodisation).
# E.g. torch CSR on 2D radial, 32 coils: 1e-8 s per tap for all coils; on 3D radial, 1 coil:
# 3.7e-9 s per tap (so a fixed part per tap); FINUFFT: 1.1e-9 s per tap and coil in both.
# torch gather (CSR-chunk forward, index_add_ adjoint), 3D radial 1M samples, W = 5, 1 coil:
# 8.0 s per pair for 1.3e8 taps in a run where FINUFFT took 3.4x its model time (load), so
# ≈ 1.8e-8 s per tap and coil (the former 5e-9 underestimated it ~4x).
# torch binned (dense per-bin products, see .binned): c_tapb per *padded* tap, (B + W − 1)^d per
# padded sample (≈ 1.2·M) and coil; c_mem per grid cell and per padded-subgrid cell
# (((B + W − 1)/B)^d · G: zeroing, folding, gathering). Fitted to 1-thread same-run timings on
# 3D radial 1M samples, ε = 1e-6, B = 8 (pairs 2.60 / 3.07 / 3.58 / 3.48 s at σ = 1.5 / 1.75 /
# 2 / 1.25; FINUFFT σ = 2 double 2.1 s in the same run), scaled to FINUFFT's model constant. The
# CUDA constants are guesses (not measured: no GPU in that session).
COST = {
    "torch/sparse": (4.0e-10, 3.5e-9, 2.0e-10, 4.0e-9),
    "torch/binned": (4.0e-10, 0.0, 2.3e-10, 8.7e-9),
    "torch-cuda/binned": (5.0e-12, 0.0, 2.0e-11, 1.0e-11),
    "torch/gather": (4.0e-10, 2.0e-9, 1.6e-8, 4.0e-9),
    "finufft/finufft": (4.0e-10, 0.0, 1.1e-9, 1.0e-9),
    "cufinufft/cufinufft": (2.0e-12, 0.0, 2.0e-12, 1.0e-12),
    "torch-cuda/sparse": (5.0e-12, 1.0e-11, 2.0e-11, 1.0e-11),
    "torch-cuda/gather": (5.0e-12, 1.0e-11, 6.0e-11, 1.0e-11),
}


def _model(key: str, p: Problem, grid: tuple[int, ...], taps: int) -> float:
    c_fft, c_tap, c_tapb, c_mem = COST[key]
    g = math.prod(grid)
    per_traj = (
        p.batch * (2 * c_fft * _fft_cost(grid) + c_tapb * p.n_samples * taps + c_mem * g)
        + c_tap * p.n_samples * taps
    )
    return p.n_traj * per_traj


def _binned_model(key: str, p: Problem, grid: tuple[int, ...], width: int) -> float:
    """Cost of the binned method: padded taps (B + W − 1)^d per padded sample (≈ 1.2·M), and
    per grid cell the ((B + W − 1)/B)^d cells of the padded subgrids (zeroing, folding)."""
    c_fft, c_tap, c_tapb, c_mem = COST[key]
    g = math.prod(grid)
    pads = [min(BIN, n) + width - 1 for n in grid]
    blow = math.prod(q / min(BIN, n) for q, n in zip(pads, grid, strict=True))
    dense = 1.2 * p.n_samples * math.prod(pads)
    per_traj = p.batch * (2 * c_fft * _fft_cost(grid) + c_tapb * dense + c_mem * g * (1 + blow))
    return p.n_traj * (per_traj + c_tap * dense)


@dataclass
class Candidate:
    """One way to compute the transform."""

    backend: str
    method: str
    sigma: float
    width: int
    beta: float
    grid: tuple[int, ...]
    expected_error: float
    cost: float = math.inf
    memory: int = 0
    measured: float | None = None
    #: run the external library in double precision for a complex64 plan (accuracy below the
    #: library's single-precision floor); data are converted on the way in and out
    double: bool = False
    #: tolerance asked of the external library as a multiple of ε (None: library_eps's safety
    #: factors); set only by tune="measure" after verifying the achieved error
    lib_factor: float | None = None
    #: achieved (forward, adjoint) relative errors measured at plan time, when verified
    verified_error: tuple[float, float] | None = None

    @property
    def kernel(self) -> Kernel:
        return Kernel(self.width, self.beta, self.sigma)

    def label(self) -> str:
        return (
            f"{self.backend}/{self.method}/σ={self.sigma:g}"
            + ("/double" if self.double else "")
            + (f"/tol={self.lib_factor:g}ε" if self.lib_factor is not None else "")
        )


@dataclass
class Problem:
    """What is transformed: sizes, accuracy, batch, dtype and device."""

    im_size: tuple[int, ...]
    n_samples: int
    n_traj: int
    eps: float
    dtype: torch.dtype
    batch: int
    device: torch.device
    extra: dict = field(default_factory=dict)

    @property
    def ndim(self) -> int:
        return len(self.im_size)

    def signature(self) -> dict:
        dev = self.device
        name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
        return {
            "im_size": list(self.im_size),
            "n_samples": self.n_samples,
            "n_traj": self.n_traj,
            "eps": self.eps,
            "dtype": str(self.dtype),
            "batch": self.batch,
            "device": f"{dev.type}:{name}",
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            **self.extra,
        }

    def key(self) -> str:
        return hashlib.sha1(json.dumps(self.signature(), sort_keys=True).encode()).hexdigest()


def _fft_cost(grid: tuple[int, ...]) -> float:
    g = math.prod(grid)
    return g * math.log2(max(g, 2))


def choose_for_sigma(
    eps: float, sigma: float, im_size: tuple[int, ...]
) -> tuple[Kernel, float, tuple[int, ...]]:
    """Narrowest kernel reaching ``eps`` at oversampling ``sigma``, its estimate and its grid.

    The grid depends on W (it is at least 2W cells), so each width is judged on its own grid.
    Memoised: every method and every plan of the same size and ε asks the same question.
    """
    return _choose_for_sigma(float(eps), float(sigma), tuple(int(n) for n in im_size))


@lru_cache(maxsize=1024)
def _choose_for_sigma(
    eps: float, sigma: float, im_size: tuple[int, ...]
) -> tuple[Kernel, float, tuple[int, ...]]:
    w = max(2, width_rule(eps, sigma) - 1)
    while True:
        grid = tuple(grid_size(n, sigma, w) for n in im_size)
        kernel = Kernel(w, beta_rule(w, sigma), sigma)
        est = estimate_error(kernel, im_size, grid)
        if est <= eps or w >= MAX_WIDTH:
            return kernel, est, grid
        w += 1


def native_candidate(p: Problem, method: str, sigma: float) -> Candidate | None:
    """A torch-native candidate with its kernel; None when ε is out of reach at this σ."""
    kernel, est, grid = choose_for_sigma(p.eps, sigma, p.im_size)
    if est > p.eps:
        return None
    if p.dtype == torch.complex64:
        # single-precision rounding, amplified by the deapodization where ψ̂ is small (wide
        # kernels at low σ): a wider kernel at this σ only makes it worse, so the candidate goes
        # (below ε = 1e-6 complex64 floors anyway and the plan warns; judge against the floor)
        rounding = rounding_error(kernel, p.im_size, grid)
        if math.hypot(est, rounding) > max(p.eps, 1e-6):
            return None
        est = math.hypot(est, rounding) + 1e-6  # + the float32 FFT floor (not in our control)
    key = ("torch-cuda/" if p.device.type == "cuda" else "torch/") + method
    taps = kernel.width**p.ndim
    if method == "binned":
        cost = _binned_model(key, p, grid, kernel.width)
    else:
        cost = _model(key, p, grid, taps)
    real_bytes = 4 if p.dtype == torch.complex64 else 8
    if method == "binned":
        pad = min(BIN, min(grid)) + kernel.width - 1
        mem = p.n_traj * int(1.2 * p.n_samples) * (p.ndim * pad * real_bytes + 8)
    elif method == "sparse":
        # complex64 plans with ε < 1e-5 spread in float64 (NativeEngine accumulate_double)
        acc_bytes = 8 if p.dtype == torch.complex64 and p.eps < 1e-5 else real_bytes
        mem = p.n_traj * sparse_bytes(p.n_samples, kernel.width, p.ndim, real_bytes, acc_bytes)
    else:
        mem = p.n_traj * p.n_samples * kernel.width * p.ndim * (real_bytes + 8)
    return Candidate("torch", method, sigma, kernel.width, kernel.beta, grid, est, cost, mem)


def external_candidate(p: Problem, backend: str, sigma: float) -> Candidate | None:
    """A FINUFFT / cuFINUFFT candidate (kernel chosen by the library; W estimated by the rule)."""
    if p.eps < 1e-9 and sigma < 2.0:
        return None  # FINUFFT needs σ = 2 for ε below ~1e-9
    double = p.dtype == torch.complex64 and (
        # single-precision FINUFFT floors above 1e-6: measured at ε = 1e-6 (σ = 2) 1.2e-5 on
        # 2D 256² radial and 6.8e-6 on 3D 128³ radial
        p.eps < FINUFFT_SINGLE_FLOOR
        # and caps the width at 8 for σ = 1.25 ("ns reducing ... to prevent catastrophic
        # cancellation"): measured 2.6e-5 error at ε = 1e-6
        or (sigma < 2.0 and library_eps(p.eps, sigma, p.im_size) < 1.5e-5)
    )
    w = width_rule(library_eps(p.eps, sigma, p.im_size), sigma)
    grid = tuple(grid_size(n, sigma, w) for n in p.im_size)
    # double precision costs about 1.6x (twice the memory traffic, half the SIMD width)
    cost = _model(f"{backend}/{backend}", p, grid, w**p.ndim) * (1.6 if double else 1.0)
    est = max(p.eps, 1e-6) if p.dtype == torch.complex64 and p.eps < 1e-6 else p.eps
    return Candidate(
        backend,
        backend,
        sigma,
        w,
        float("nan"),
        grid,
        est,
        cost,
        p.n_traj * p.n_samples * p.ndim * 8,
        double=double,
    )


#: measured ÷ modelled time of the Toeplitz normal relative to forward + adjoint. The model
#: below (the NUFFT's grid-FFT constants on the 2N grid) rated Toeplitz ≈ 2.5x too slow on every
#: multi-coil radial measurement: 2D 256², 402 spokes, 32 coils (quiet, 2026-11-21): measured
#: 3.2x faster than torch-native forward + adjoint where the model said 1.2x; 8-coil radial
#: CG-SENSE (issue 17, quiet): 1.4-1.6x faster where the model said 0.6x (it chose direct);
#: 2D 256², 100 spokes, 8 coils, 30 CG iterations (2026-12-07, load 10 on 2 cores): 2.7x faster
#: where the model said 0.6x. One batched 2N FFT pair runs near the FFT library's peak, the
#: NUFFT's FFT on an oversampled grid plus the gridding does not. Applied to batches > 1 only:
#: every measurement behind it was multi-coil, and for single-coil 3D at ε = 1e-3 the model's
#: choice (direct, FINUFFT) matched the quiet full benchmark.
TOEPLITZ_CALIBRATION = 0.4


def toeplitz_cost(p: Problem) -> float:
    """Seconds of one Toeplitz normal application (two full 2N FFTs and a product).

    The FFTs are modelled like the NUFFT's grid FFT (same constant), scaled by the measured
    ``TOEPLITZ_CALIBRATION`` for batches > 1; the implementation no longer prunes the zero lines (it was measured
    2x slower that way, see :mod:`.toeplitz`).
    """
    big = tuple(2 * n for n in p.im_size)
    c_fft = COST["torch-cuda/gather" if p.device.type == "cuda" else "torch/gather"][0]
    c_mem = COST["torch-cuda/gather" if p.device.type == "cuda" else "torch/gather"][3]
    scale = TOEPLITZ_CALIBRATION if p.batch > 1 else 1.0
    return scale * p.batch * (2 * c_fft * _fft_cost(big) + c_mem * math.prod(big))


def candidates(
    p: Problem, backends: list[str], methods: list[str], sigmas: tuple[float, ...] | None = None
) -> list[Candidate]:
    """All feasible candidates, cheapest (by the cost model) first."""
    out: list[Candidate] = []
    for b in backends:
        if b == "torch":
            for m in methods:
                for s in sigmas or SIGMAS:
                    c = native_candidate(p, m, s)
                    if c is not None:
                        out.append(c)
        else:
            for s in sigmas or FINUFFT_SIGMAS:
                c = external_candidate(p, b, s)
                if c is not None:
                    out.append(c)
    out.sort(key=lambda c: c.cost)
    return out


# -- measuring ------------------------------------------------------------------------------------
def time_call(
    fn: Callable[[], object],
    device: torch.device,
    reps: int = 3,
    budget_s: float = 2.0,
    warm: bool = True,
) -> float:
    """Best wall time of ``fn`` over a few repetitions (after one warm-up call when ``warm``).

    A warm-up call slower than half the budget is taken as the measurement (slow candidates are
    not worth more of the planner's time).
    """
    best = math.inf
    if warm:
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        first = time.perf_counter() - t0
        if first > budget_s / 2:
            return first
    start = time.perf_counter()
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s:
            break
    return best


# -- wisdom ---------------------------------------------------------------------------------------
def wisdom_path() -> Path:
    """Where wisdom is kept: ``$QMRKIT_WISDOM_DIR`` or ``~/.cache/qmrkit``."""
    root = os.environ.get("QMRKIT_WISDOM_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "qmrkit"
    return base / "nufft-wisdom.json"


def load_wisdom() -> dict:
    path = wisdom_path()
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def save_wisdom(key: str, entry: dict) -> None:
    """Add one entry to the wisdom file (atomic replace; failures are logged, not raised)."""
    path = wisdom_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = load_wisdom()
        data[key] = entry
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".nufft-wisdom-", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as exc:  # read-only home, full disk: tuning still worked
        log.warning("could not save NUFFT wisdom to %s: %s", path, exc)


def forget_wisdom() -> None:
    """Delete the wisdom file (e.g. after a hardware or library change)."""
    try:
        wisdom_path().unlink()
    except FileNotFoundError:
        pass


def candidate_to_dict(c: Candidate) -> dict:
    d = asdict(c)
    d["grid"] = list(c.grid)
    return d


def candidate_from_dict(d: dict) -> Candidate:
    d = dict(d)
    d["grid"] = tuple(d["grid"])
    if d.get("verified_error") is not None:
        d["verified_error"] = tuple(d["verified_error"])
    return Candidate(**d)
