"""Parallel-imaging reconstruction: CG-SENSE, TV-regularised SENSE (PDHG) and gridding.

All functions take k-space ``(*batch, coils, *k)``: Cartesian ``*k = *spatial`` with a ``mask``,
non-Cartesian ``*k = (M,)`` with a trajectory ``traj`` ``(M, ndim)`` in cycles/pixel. Leading batch
dimensions (frames, echoes) are reconstructed together (independent systems for CG-SENSE, one
joint problem for TV, which may couple frames by temporal TV).
"""

from __future__ import annotations

import hashlib
import time
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .. import optim
from .._device import resolve_device
from .._progress import get_logger
from ..errors import ConvergenceWarning, ParameterError, QmrkitWarning, ShapeError
from ..ops import FiniteDifference, LinearOperator, Vstack
from ..optim import prox
from ._ops import Lift, cartesian_operator, hybrid_readout, nufft_operator, to_complex
from .result import ReconResult

log = get_logger("recon")


def _prepare(kdata, maps, mask, traj, eps, device, normal="auto", readout_first=False):
    """Build the encoding operator; returns (A, y, info dict).

    With ``readout_first`` a Cartesian problem with a fully sampled readout is solved with the
    readout axis first (``info["readout_first"]``): move the solution back with
    ``x.movedim(-ndim, -1)``.
    """
    dev = resolve_device(device, kdata if isinstance(kdata, torch.Tensor) else None)
    y = to_complex(kdata, "kdata", device=dev)
    s = to_complex(maps, "maps", device=dev, dtype=y.dtype)
    if (mask is None) == (traj is None) and traj is not None:
        raise ParameterError("give either mask (Cartesian) or traj (non-Cartesian), not both")
    info: dict[str, Any] = {}
    if traj is None:
        A, m = cartesian_operator(s, mask, y)
        # the content key of ‖AᴴA‖ (hashed only when λ > 0 asks for it)
        norm_key = lambda: ("cartesian", bool(readout_first), _digest(s), _digest(m))  # noqa: E731
        info.update(kind="cartesian", acceleration=float(m.numel() / max(int(m.sum()), 1)))
        # a 3D hybrid operator only pays with contiguous FFT axes (readout moved first)
        use = readout_first or s.ndim - 1 == 2
        hyb = hybrid_readout(s, m, y, readout_first=readout_first) if use else None
        if hyb is not None:  # fully sampled readout: FFTs over the phase-encoding axes only
            A, y, _ = hyb
        info["hybrid_readout"] = hyb is not None
        info["readout_first"] = hyb is not None and readout_first
    else:
        A, p = nufft_operator(s, traj, y, eps=eps, normal=normal, device=dev)
        t = traj if isinstance(traj, torch.Tensor) else torch.as_tensor(np.asarray(traj))
        norm_key = lambda: ("nufft", repr(p), _digest(s), _digest(t))  # noqa: E731
        info.update(
            kind="non-cartesian",
            nufft=repr(p),
            nufft_backend=p.info.backend,
            nufft_normal=p.info.normal,
        )
    if y.ndim < len(A.oshape) or tuple(y.shape[y.ndim - len(A.oshape) :]) != A.oshape:
        raise ShapeError(f"kdata must end in {A.oshape}, got {tuple(y.shape)}")
    info["_norm_key"] = norm_key
    return A, y, info


def _operator_norm2(A: LinearOperator, batch_shape, dtype, device, n_iter: int = 15) -> float:
    with torch.no_grad():
        return float(
            optim.power_iteration(A, ishape=A.ishape, n_iter=n_iter, dtype=dtype, device=device)
        )


#: ‖AᴴA‖ estimates by the content of what defines A (see _cached_norm2), most recent last
_NORM2_CACHE: OrderedDict[tuple, float] = OrderedDict()
_NORM2_CACHE_SIZE = 32


def _digest(t: torch.Tensor | None) -> tuple:
    """Content key of a tensor: shape, dtype and a BLAKE2 hash of its bytes (≈ 1 GB/s)."""
    if t is None:
        return (None,)
    c = t.detach()
    if c.is_complex():
        c = torch.view_as_real(c.resolve_conj())
    c = c.contiguous().cpu()
    if c.dtype == torch.bool:
        c = c.to(torch.uint8)
    h = hashlib.blake2b(c.numpy().tobytes(), digest_size=16).hexdigest()
    return (tuple(t.shape), str(t.dtype), h)


#: Lanczos settings of the λ scale ‖AᴴA‖ (part of the cache key): at most this many normal
#: applications, stopping once a step raises the Ritz value by ≤ 1e-3 relative (or its error
#: bound is below that). On the 3D benchmark operator (64×128×128, 8 coils, R 3.3), whose top
#: eigenvalues cluster at 1, that is 7 applications and a relative error of 1.8e-3, where the
#: former 15-step power iteration left 1.1e-2; λ_abs errs by as much, far below what changes
#: an image.
_NORM2_LANCZOS_MAX = 20
_NORM2_LANCZOS_TOL = 1e-3


def _lanczos_norm2(A: LinearOperator, dtype, device) -> float:
    """‖AᴴA‖ by Lanczos on the normal operator (seeded; a Ritz value, never above the norm).

    Replaced a 15-step power iteration: half the normal applications or fewer, and several
    times more accurate (docs/recon.md, BENCHMARKS.md).
    """
    with torch.no_grad():
        return float(
            optim.lanczos_max_eig(
                A,
                ishape=A.ishape,
                n_iter=_NORM2_LANCZOS_MAX,
                tol=_NORM2_LANCZOS_TOL,
                dtype=dtype,
                device=device,
            )
        )


def _cached_norm2(A: LinearOperator, key: tuple, dtype, device) -> float:
    """``‖AᴴA‖`` (:func:`_lanczos_norm2`) remembered per content of (maps, mask or trajectory).

    λ > 0 scales with ‖AᴴA‖, which costs ~5–8 normal applications (a quarter of a 30-iteration
    CG solve). Solves that differ only in data or λ (frames, echoes, λ sweeps, repeated scans)
    share the operator; hashing the maps (~0.1 s for 64 MB, a few % of the estimate) instead of
    iterating gives the identical value (the start vector is seeded).
    """
    key = (*key, str(dtype), str(device), "lanczos", _NORM2_LANCZOS_MAX, _NORM2_LANCZOS_TOL)
    if key in _NORM2_CACHE:
        _NORM2_CACHE.move_to_end(key)
        return _NORM2_CACHE[key]
    value = _lanczos_norm2(A, dtype, device)
    _NORM2_CACHE[key] = value
    while len(_NORM2_CACHE) > _NORM2_CACHE_SIZE:
        _NORM2_CACHE.popitem(last=False)
    return value


def sense(
    kdata: Any,
    maps: Any,
    *,
    mask: Any = None,
    traj: Any = None,
    lam: float = 0.0,
    max_iter: int = 30,
    tol: float = 1e-6,
    x0: Any = None,
    eps: float = 1e-3,
    normal: str = "auto",
    device=None,
    progress: bool | None = False,
) -> ReconResult:
    """CG-SENSE: ``min_x ‖A x − y‖² + λ‖x‖²`` with ``A = Mask·FFT·Sense`` or ``NUFFT·Sense``.

    Solved by conjugate gradients on ``(AᴴA + λI) x = Aᴴy``; for non-Cartesian data ``AᴴA`` uses
    the NUFFT plan's normal operator (a Toeplitz embedding when the planner chooses it).

    Parameters
    ----------
    kdata : array ``(*batch, coils, *k)``
        k-space: Cartesian ``*k = *spatial`` (zeros where not sampled), or ``(M,)`` samples.
    maps : array ``(coils, *spatial)``
        Coil sensitivities (e.g. :func:`espirit`), 2D or 3D.
    mask : array, optional
        Cartesian sampling mask broadcasting to ``spatial`` (default: where kdata ≠ 0).
    traj : array ``(M, ndim)``, optional
        Non-Cartesian trajectory in cycles/pixel ``[-0.5, 0.5)``.
    lam : float
        Tikhonov weight λ ≥ 0, relative to ``‖AᴴA‖`` (so 1e-3 means the same for Cartesian and
        unnormalised NUFFT operators).
    max_iter, tol : int, float
        CG iterations and relative residual tolerance (``tol = 0`` runs ``max_iter``).
    x0 : array, optional
        Starting image ``(*batch, *spatial)``.
    eps : float
        NUFFT accuracy.
    normal : {"auto", "toeplitz", "direct"}
        NUFFT normal operator choice (passed to :func:`qmrkit.nufft.plan`).
    device : optional
        Compute device (default: kdata's).

    Returns
    -------
    ReconResult
        ``image`` ``(*batch, *spatial)``.
    """
    t0 = time.perf_counter()
    if lam < 0:
        raise ParameterError(f"lam must be ≥ 0, got {lam}")
    A, y, info = _prepare(kdata, maps, mask, traj, eps, device, normal, readout_first=True)
    b = A.H(y)
    lam_abs = 0.0
    norm_key = info.pop("_norm_key")
    if lam > 0:
        lam_abs = lam * _cached_norm2(A, norm_key(), y.dtype, y.device)
    n_sp = len(A.ishape)
    x0t = None if x0 is None else to_complex(x0, "x0", device=y.device, dtype=y.dtype)
    if x0t is not None and info.get("readout_first"):
        x0t = x0t.movedim(-1, -n_sp).contiguous()
    with torch.no_grad():
        res = optim.cg(A, b, x0=x0t, lam=lam_abs, max_iter=max_iter, tol=tol, progress=progress)
    if info.get("readout_first"):
        res.x = res.x.movedim(-n_sp, -1).contiguous()
    info.update(lam=lam, lam_absolute=lam_abs, max_iter=max_iter, tol=tol)
    log.info(
        "sense: %s, %d iterations, %.3f s", info["kind"], res.iterations, time.perf_counter() - t0
    )
    return ReconResult(
        res.x,
        "sense",
        res.iterations,
        list(res.residual_history),
        bool(res.converged) or tol == 0,
        time.perf_counter() - t0,
        info,
        n_spatial=len(A.ishape),
    )


def _scale_problem(A: LinearOperator, y: torch.Tensor) -> tuple[float, float]:
    """(‖A‖², image scale): the data are divided so that the least-squares-like image
    ``Aᴴy/‖A‖²`` has a 99th-percentile magnitude of 1."""
    l2 = _operator_norm2(A, (), y.dtype, y.device, n_iter=20)
    x = A.H(y) / l2
    mag = x.abs().reshape(-1)
    k = max(1, int(0.99 * mag.numel()))
    sc = float(mag.kthvalue(k).values) if mag.numel() > 1 else float(mag.max())
    return l2, (sc if sc > 0 else 1.0)


def tv(
    kdata: Any,
    maps: Any,
    *,
    mask: Any = None,
    traj: Any = None,
    lam: float = 1e-3,
    dims: Sequence[int] | None = None,
    max_iter: int = 100,
    tol: float = 1e-4,
    eps: float = 1e-3,
    voxel_size: Sequence[float] | None = None,
    warm_start: int = 20,
    x0: Any = None,
    device=None,
    progress: bool | None = False,
) -> ReconResult:
    """TV-regularised SENSE by PDHG: ``min_x ½‖A x − y‖² + λ·s·‖A‖²·TV(x)``.

    ``TV`` is isotropic (ℓ2 over the differenced axes, Neumann boundaries). The weight is
    scale-free: ``s`` is the 99th-percentile magnitude of ``Aᴴy/‖A‖²`` and ``‖A‖²`` the operator's
    squared norm (power iteration), so λ ≈ 1e-3…1e-2 suits most data whatever their units.

    Parameters
    ----------
    kdata, maps, mask, traj, eps, device
        As in :func:`sense`.
    lam : float
        Regularisation weight (see above), ≥ 0.
    dims : sequence of int, optional
        Axes of the image ``(*batch, *spatial)`` with TV, as indices into that shape (negative
        counts from the end): default the spatial axes; add ``0`` for temporal TV over frames.
    max_iter, tol : int, float
        PDHG iterations and tolerance on its relative primal–dual residual.
    voxel_size : sequence of float, optional
        Spacing per TV axis (e.g. mm, and frames for time).
    warm_start : int
        CG-SENSE iterations that give PDHG its starting image (0: start from ``Aᴴy``). A few CG
        iterations (early-stopped, so little noise amplification) cut the PDHG iterations needed
        severalfold, most of all for non-Cartesian data.
    x0 : array, optional
        Starting image ``(*batch, *spatial)`` (overrides ``warm_start``).

    Returns
    -------
    ReconResult
    """
    t0 = time.perf_counter()
    if lam < 0:
        raise ParameterError(f"lam must be ≥ 0, got {lam}")
    A, y, info = _prepare(kdata, maps, mask, traj, eps, device)
    info.pop("_norm_key")
    lead = tuple(y.shape[: y.ndim - len(A.oshape)])
    n_sp = len(A.ishape)
    img_shape = (*lead, *A.ishape)
    if lead:
        A = Lift(A, lead)
    if dims is None:
        dims = tuple(range(len(lead), len(img_shape)))
    dims = tuple(sorted({d % len(img_shape) for d in dims}))
    if not dims:
        raise ParameterError("dims is empty: give the image axes to apply TV to")
    l2, sc = _scale_problem(A, y)
    norm = l2**0.5
    An = (1.0 / norm) * A
    yn = y / (norm * sc)
    D = FiniteDifference(img_shape, axes=dims, voxel_size=voxel_size, boundary="neumann")
    K = Vstack([An, D])
    fstar = prox.Stack(
        K,
        [
            prox.conjugate(prox.L2Squared(yn)),
            prox.conjugate(prox.GroupL1(lam, axis=-len(img_shape) - 1)),
        ],
    )
    with torch.no_grad():
        if x0 is not None:
            start = to_complex(x0, "x0", device=y.device, dtype=y.dtype) / sc
        elif warm_start > 0:
            start = optim.cg(An, An.H(yn), max_iter=int(warm_start), tol=0).x
        else:
            start = An.H(yn)
        res = optim.pdhg(
            K,
            fstar,
            None,
            x0=start,
            max_iter=max_iter,
            tol=tol,
            dtype=y.dtype,
            device=y.device,
            progress=progress,
        )
    info.update(
        lam=lam,
        dims=list(dims),
        max_iter=max_iter,
        tol=tol,
        operator_norm2=l2,
        warm_start=warm_start if x0 is None else "x0",
        image_scale=sc,
        n_spatial=n_sp,
    )
    img = res.x * sc  # An x ≈ yn  ⇔  A (sc·x) ≈ y
    return ReconResult(
        img,
        "tv",
        res.iterations,
        list(res.residual_history),
        bool(res.converged) or tol == 0,
        time.perf_counter() - t0,
        info,
        list(getattr(res, "objective_history", []) or []),
        n_spatial=n_sp,
    )


def gridding(
    kdata: Any,
    traj: Any,
    dcf: Any = None,
    maps: Any = None,
    *,
    im_size: Sequence[int] | None = None,
    eps: float = 1e-3,
    device=None,
) -> ReconResult:
    """Density-compensated adjoint NUFFT, coil-combined.

    ``x_c = Aᴴ(w · y_c)``; combined with the maps as ``Σ conj(S_c) x_c / Σ|S_c|²`` (complex), or
    by root sum of squares without maps (real).

    Parameters
    ----------
    kdata : array ``(*batch, coils, M)``
    traj : array ``(M, ndim)``
        Cycles/pixel.
    dcf : array ``(M,)``, optional
        Density-compensation weights (k-space area per sample); when missing a warning is issued
        and Pipe–Menon weights are computed (:func:`qmrkit.nufft.density_compensation`).
    maps : array ``(coils, *spatial)``, optional
    im_size : tuple of int, optional
        Image size; default the maps' spatial shape (required without maps).

    Returns
    -------
    ReconResult
    """
    from .. import nufft

    t0 = time.perf_counter()
    dev = resolve_device(device, kdata if isinstance(kdata, torch.Tensor) else None)
    y = to_complex(kdata, "kdata", device=dev)
    s = None if maps is None else to_complex(maps, "maps", device=dev, dtype=y.dtype)
    if im_size is None:
        if s is None:
            raise ParameterError("gridding needs im_size when no maps are given")
        im_size = tuple(s.shape[1:])
    im_size = tuple(int(n) for n in im_size)
    if s is not None and tuple(s.shape[1:]) != im_size:
        raise ShapeError(f"maps spatial shape {tuple(s.shape[1:])} differs from im_size {im_size}")
    if s is not None and (y.ndim < 2 or y.shape[-2] != s.shape[0]):
        raise ShapeError(
            f"maps have {s.shape[0]} coils but kdata {tuple(y.shape)} has "
            f"{y.shape[-2] if y.ndim >= 2 else '?'} (axis -2)"
        )
    if dcf is None:
        warnings.warn(
            "gridding: no density compensation given; computing Pipe–Menon weights "
            "(pass dcf= to avoid this)",
            QmrkitWarning,
            stacklevel=2,
        )
        w = nufft.density_compensation(traj, im_size, device=dev)
    else:
        w = torch.as_tensor(dcf, device=dev)
    w = w.to(y.real.dtype)
    if w.shape[-1] != y.shape[-1]:
        raise ShapeError(f"dcf has {w.shape[-1]} weights but kdata has {y.shape[-1]} samples")
    p = nufft.plan(
        traj,
        im_size,
        eps=eps,
        batch=int(y.shape[-2]) if y.ndim > 1 else 1,
        device=dev,
        dtype=y.dtype,
        normal="direct",
    )
    with torch.no_grad():
        xc = p.H(y * w)
        if s is not None:
            img = (s.conj() * xc).sum(-len(im_size) - 1) / (s.abs() ** 2).sum(0).clamp_min(1e-12)
            img = img * ((s.abs() ** 2).sum(0) > 1e-12)
        else:
            img = torch.sqrt((xc.real**2 + xc.imag**2).sum(-len(im_size) - 1))
    return ReconResult(
        img,
        "gridding",
        0,
        [],
        True,
        time.perf_counter() - t0,
        {
            "kind": "non-cartesian",
            "dcf": "given" if dcf is not None else "pipe-menon",
            "nufft": repr(p),
        },
        n_spatial=len(im_size),
    )


__all__ = ["sense", "tv", "gridding", "ConvergenceWarning"]
