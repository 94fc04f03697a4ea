"""Coil handling: noise prewhitening, coil compression (SVD, GCC), coil sensitivity estimation
(ESPIRiT, Walsh adaptive combination) and root-sum-of-squares combination.

Layout: k-space ``(*batch, coils, *k)``, coil images ``(coils, *spatial)``; the last k-space
axis of Cartesian data is the (fully sampled) readout.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from typing import Any

import torch

from .._progress import get_logger
from ..errors import ParameterError, QmrkitWarning, ShapeError
from ..sim.masks import calibration_region
from ._ops import to_complex

log = get_logger("recon.coils")


@contextmanager
def _one_thread():
    """Run small dense LAPACK work (eigh/SVD of a few hundred rows) on one thread.

    With several torch threads on a busy CPU, ``torch.linalg.eigh`` of a 288×288 complex matrix
    measured 6 s instead of 0.045 s single-threaded (threads spin-waiting on each other); the
    decompositions here are far too small to gain from threads.
    """
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _cfft(x: torch.Tensor, axes: Sequence[int], inverse: bool = False) -> torch.Tensor:
    axes = tuple(axes)
    x = torch.fft.ifftshift(x, dim=axes)
    x = (torch.fft.ifftn if inverse else torch.fft.fftn)(x, dim=axes, norm="ortho")
    return torch.fft.fftshift(x, dim=axes)


# --------------------------------------------------------------------------------------- combine
def rss(coil_images: Any, *, coil_axis: int = 0) -> torch.Tensor:
    """Root sum of squares over the coil axis: ``sqrt(Σ_c |x_c|²)`` (real).

    Parameters
    ----------
    coil_images : array ``(coils, *spatial)``
        Coil images (any leading layout with ``coil_axis`` indexing coils).
    coil_axis : int
        The coil axis (default 0).
    """
    x = to_complex(coil_images, "coil_images")
    return torch.sqrt((x.real**2 + x.imag**2).sum(coil_axis))


# ---------------------------------------------------------------------------------- prewhitening
def noise_covariance(noise: Any) -> torch.Tensor:
    """Coil noise covariance ``Ψ = n nᴴ / (N − 1)`` from noise samples ``(coils, *samples)``."""
    n = to_complex(noise, "noise")
    if n.ndim < 2:
        raise ShapeError(f"noise must be (coils, samples...), got shape {tuple(n.shape)}")
    n = n.reshape(n.shape[0], -1)
    if n.shape[1] < n.shape[0]:
        raise ShapeError(
            f"noise has {n.shape[1]} samples per coil, fewer than the {n.shape[0]} coils; "
            "the covariance would be singular"
        )
    n = n - n.mean(1, keepdim=True)
    return (n @ n.conj().T) / (n.shape[1] - 1)


def prewhiten(
    kdata: Any,
    noise: Any = None,
    *,
    covariance: Any = None,
    missing: str = "error",
    return_matrix: bool = False,
    coil_axis: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Decorrelate coil noise: ``y ← L⁻¹ y`` with ``Ψ = L Lᴴ`` (Cholesky), so that the whitened
    channels have unit-variance, uncorrelated noise.

    Parameters
    ----------
    kdata : array ``(*batch, coils, *k)``
        k-space (or coil images): the coil axis is found as the axis whose length equals the noise
        scan's coil count, searching from the front; give k-space with coils first or after batch.
    noise : array ``(coils, samples...)`` or None
        Noise-only samples (a noise scan: receiver on, no RF).
    covariance : array ``(coils, coils)``, optional
        The noise covariance ``Ψ`` itself (e.g. :func:`noise_covariance` of an earlier noise scan,
        kept in a calibration store), instead of ``noise``; give one of the two.
    missing : {"error", "identity"}
        What to do when neither ``noise`` nor ``covariance`` is given: raise (default), or warn
        and return ``kdata`` unchanged (no whitening).
    return_matrix : bool
        Also return the whitening matrix ``W = L⁻¹`` (coils × coils); apply it to coil maps or
        other data of the same scan with ``torch.einsum("ij,j...->i...", W, x)``.
    coil_axis : int, optional
        The coil axis of ``kdata``; default: the first axis whose length is the noise scan's
        coil count (give it when a batch axis has the same length).

    Returns
    -------
    Tensor (and the matrix when ``return_matrix``)
    """
    y = to_complex(kdata, "kdata")
    if noise is not None and covariance is not None:
        raise ParameterError("prewhiten takes noise samples or a noise covariance, not both")
    if noise is None and covariance is None:
        if missing == "identity":
            warnings.warn(
                "prewhiten: no noise scan given; returning the data unwhitened",
                QmrkitWarning,
                stacklevel=2,
            )
            eye = torch.eye(_coil_dim_guess(y), dtype=y.dtype, device=y.device)
            return (y, eye) if return_matrix else y
        raise ParameterError(
            "prewhiten needs a noise scan (noise samples of shape (coils, samples)) but got "
            "noise=None; pass missing='identity' to skip whitening explicitly"
        )
    if missing not in ("error", "identity"):
        raise ParameterError(f"missing must be 'error' or 'identity', got {missing!r}")
    if covariance is not None:
        psi = to_complex(covariance, "covariance", device=y.device).to(torch.complex128)
        if psi.ndim != 2 or psi.shape[0] != psi.shape[1]:
            raise ShapeError(
                f"covariance must be a square (coils, coils) matrix, got {tuple(psi.shape)}"
            )
    else:
        psi = noise_covariance(to_complex(noise, "noise", device=y.device)).to(torch.complex128)
    n_c = psi.shape[0]
    if coil_axis is not None:
        axis = coil_axis % y.ndim
        if y.shape[axis] != n_c:
            raise ShapeError(
                f"kdata axis {coil_axis} has {y.shape[axis]} entries but the noise scan has "
                f"{n_c} coils"
            )
    else:
        axis = next((i for i, s in enumerate(y.shape) if s == n_c), None)
    if axis is None:
        raise ShapeError(
            f"the noise scan has {n_c} coils but no axis of kdata {tuple(y.shape)} has that length"
        )
    try:
        chol = torch.linalg.cholesky(psi)
    except RuntimeError as exc:
        raise ParameterError(
            "the noise covariance is not positive definite (dead or duplicated channels?)"
        ) from exc
    w = torch.linalg.inv(chol).to(y.dtype)
    yw = torch.movedim(torch.tensordot(w, torch.movedim(y, axis, 0), dims=([1], [0])), 0, axis)
    return (yw, w) if return_matrix else yw


def _coil_dim_guess(y: torch.Tensor) -> int:
    return int(y.shape[0])


# ----------------------------------------------------------------------------- coil compression
def coil_compress(
    kdata: Any,
    n_virtual: int,
    *,
    method: str = "svd",
    calib: Any = None,
    window: int = 5,
    return_matrix: bool = False,
):
    """Compress ``C`` physical coils to ``n_virtual`` virtual coils.

    Parameters
    ----------
    kdata : array ``(coils, *k)``
        Cartesian k-space (readout last) or non-Cartesian samples ``(coils, M)`` (``"svd"`` only).
    n_virtual : int
        Virtual coils to keep (1 ≤ n_virtual ≤ coils).
    method : {"svd", "gcc"}
        ``"svd"``: one compression matrix from the principal components of all (or the calibration)
        data (Huang et al. 2008). ``"gcc"``: geometric coil compression (Zhang et al., MRM 2013):
        one matrix per readout position in the hybrid (x, k_y[, k_z]) space, aligned between
        neighbouring positions; better at high compression for Cartesian data.
    calib : array, optional
        Data to learn the compression from (default: ``kdata``), e.g. the calibration region
        ``(coils, *cal, nx)``; for ``"gcc"`` its readout length must equal kdata's.
    window : int
        ``"gcc"``: readout positions averaged (sliding window) when learning each matrix.
    return_matrix : bool
        Also return the compression matrix ``(n_virtual, coils)`` (SVD) or ``(nx, n_virtual,
        coils)`` (GCC, per hybrid readout position).

    Returns
    -------
    Tensor ``(n_virtual, *k)`` (and the matrix)
    """
    y = to_complex(kdata, "kdata")
    n_c = int(y.shape[0])
    n_virtual = int(n_virtual)
    if not 1 <= n_virtual <= n_c:
        raise ParameterError(f"n_virtual must be in [1, {n_c}] (the coil count), got {n_virtual}")
    cal = y if calib is None else to_complex(calib, "calib", device=y.device)
    if int(cal.shape[0]) != n_c:
        raise ShapeError(f"calib has {cal.shape[0]} coils but kdata has {n_c}")
    if method == "svd":
        c2 = cal.reshape(n_c, -1)
        with _one_thread():  # left singular vectors from the small C×C Gram matrix
            _, u = torch.linalg.eigh(c2 @ c2.conj().T)
        u = u.flip(1)
        a = u[:, :n_virtual].conj().T  # (V, C)
        out = torch.tensordot(a, y, dims=([1], [0]))
        return (out, a) if return_matrix else out
    if method != "gcc":
        raise ParameterError(f"method must be 'svd' or 'gcc', got {method!r}")
    if y.ndim < 3:
        raise ShapeError("gcc needs Cartesian k-space (coils, *phase, readout) with ≥ 2 k axes")
    if cal.shape[-1] != y.shape[-1]:
        raise ShapeError(f"calib readout length {cal.shape[-1]} differs from kdata's {y.shape[-1]}")
    nx = int(y.shape[-1])
    hc = _cfft(cal, (-1,), inverse=True).reshape(n_c, -1, nx)  # (C, rest, x)
    mats = []
    half = max(int(window), 1) // 2
    for x in range(nx):
        lo, hi = max(0, x - half), min(nx, x + half + 1)
        blk = hc[:, :, lo:hi].reshape(n_c, -1)
        with _one_thread():
            _, u = torch.linalg.eigh(blk @ blk.conj().T)
        u = u.flip(1)
        mats.append(u[:, :n_virtual].conj().T)  # (V, C)
    a = torch.stack(mats)  # (x, V, C)
    # align neighbours: A_x ← P A_x with P the unitary closest to A_{x-1} A_xᴴ (from the centre)
    c0 = nx // 2
    for order in (range(c0 + 1, nx), range(c0 - 1, -1, -1)):
        for x in order:
            prev = a[x - 1] if x > c0 else a[x + 1]
            m = prev @ a[x].conj().T
            with _one_thread():
                uu, _, vh = torch.linalg.svd(m)
            a[x] = (uu @ vh) @ a[x]
    hy = _cfft(y, (-1,), inverse=True)
    out = torch.einsum("xvc,c...x->v...x", a, hy)
    out = _cfft(out, (-1,))
    return (out, a) if return_matrix else out


# ----------------------------------------------------------------------------------------- Walsh
def _box_smooth(x: torch.Tensor, width: int, n_sp: int) -> torch.Tensor:
    """Moving average over the last ``n_sp`` axes (odd ``width``), on real and imaginary parts."""
    pool = {
        1: torch.nn.functional.avg_pool1d,
        2: torch.nn.functional.avg_pool2d,
        3: torch.nn.functional.avg_pool3d,
    }[n_sp]
    lead = x.shape[:-n_sp]
    xr = torch.view_as_real(x).movedim(-1, 0).reshape(-1, 1, *x.shape[-n_sp:])
    pad = width // 2
    xr = torch.nn.functional.pad(xr, (pad, pad) * n_sp, mode="replicate")
    sm = pool(xr, width, stride=1)
    sm = sm.reshape(2, *lead, *x.shape[-n_sp:]).movedim(0, -1).contiguous()
    return torch.view_as_complex(sm)


def _dominant_eigvec(r: torch.Tensor, ref_phase: str = "sum") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel dominant eigenvector of Hermitian matrices ``r`` ``(P, C, C)``; phase fixed so
    that the coil sum is real-positive. Returns (vectors (P, C), eigenvalues (P,))."""
    evals, evecs = torch.linalg.eigh(r, UPLO="L")
    v = evecs[..., -1]
    s = v.sum(-1, keepdim=True)
    v = v * torch.where(s.abs() > 0, s.conj() / s.abs().clamp_min(1e-300), torch.ones_like(s))
    return v, evals[..., -1]


def walsh(coil_images: Any, *, kernel: int = 7, chunk: int = 1 << 16) -> torch.Tensor:
    """Coil sensitivities by adaptive combination (Walsh et al., MRM 2000).

    In each pixel the dominant eigenvector of the locally averaged coil covariance
    ``R = ⟨x xᴴ⟩`` (a ``kernel``-wide box) is the relative sensitivity. The maps have unit norm over
    coils in every pixel; their common phase is fixed so that the coil sum is real. Works from any
    coil images, e.g. a low-resolution gridded image of non-Cartesian data or the zero-padded
    calibration region of Cartesian data (see :func:`low_resolution_images`).

    Parameters
    ----------
    coil_images : array ``(coils, *spatial)``
        Coil images (2D or 3D).
    kernel : int
        Width (pixels, odd) of the averaging box.
    chunk : int
        Pixels per eigen-decomposition batch (memory bound).

    Returns
    -------
    Tensor ``(coils, *spatial)`` complex
    """
    x = to_complex(coil_images, "coil_images")
    if x.ndim not in (3, 4):
        raise ShapeError(
            f"coil_images must be (coils, ny, nx) or (coils, nz, ny, nx), got {tuple(x.shape)}"
        )
    n_c, sp = int(x.shape[0]), tuple(x.shape[1:])
    kernel = int(kernel) | 1
    r = x[:, None] * x[None].conj()  # (C, C, *sp)
    r = _box_smooth(r, kernel, len(sp))
    r = r.reshape(n_c, n_c, -1).permute(2, 0, 1)
    out = torch.empty(r.shape[0], n_c, dtype=x.dtype, device=x.device)
    for s in range(0, r.shape[0], chunk):
        v, _ = _dominant_eigvec(r[s : s + chunk])
        out[s : s + chunk] = v.to(x.dtype)
    return out.T.reshape(n_c, *sp)


def low_resolution_images(
    kdata: Any, calib: int | Sequence[int] = 24, *, window: bool = True
) -> torch.Tensor:
    """Coil images from the centred calibration region of Cartesian k-space ``(coils, *k)``
    (zero-padded, Hann-windowed), for :func:`walsh` or initial guesses."""
    y = to_complex(kdata, "kdata")
    n_sp = y.ndim - 1
    sl = calibration_region(y.shape[1:], calib)
    # the full readout is kept; window it too so the low-resolution image is isotropic-ish
    low = torch.zeros_like(y)
    low[(slice(None), *sl[:-1])] = y[(slice(None), *sl[:-1])]
    if window:
        for ax in range(n_sp):
            n = y.shape[1 + ax]
            s = (
                sl[ax]
                if ax < n_sp - 1
                else slice(
                    n // 2 - min(calib if isinstance(calib, int) else max(calib), n) // 2, None
                )
            )
            start = s.start or 0
            w_len = (
                (s.stop or n) - start
                if ax < n_sp - 1
                else min((calib if isinstance(calib, int) else max(calib)), n)
            )
            w = torch.zeros(n, dtype=torch.float64, device=y.device)
            w[start : start + w_len] = torch.hann_window(
                w_len + 2, periodic=False, dtype=torch.float64, device=y.device
            )[1:-1]
            shape = [1] * y.ndim
            shape[1 + ax] = n
            low = low * w.reshape(shape).to(low.dtype)
    return _cfft(low, tuple(range(1, y.ndim)), inverse=True)


# --------------------------------------------------------------------------------------- ESPIRiT
def _hankel(cal: torch.Tensor, k: int) -> torch.Tensor:
    """Calibration matrix: rows = kernel positions, columns = coils × k^d window."""
    n_c = cal.shape[0]
    nd = cal.ndim - 1
    win = cal
    for ax in range(1, nd + 1):
        win = win.unfold(ax, k, 1)  # appends a window axis
    # win: (C, p1, ..., pd, k1, ..., kd)
    n_pos = math.prod(win.shape[1 : 1 + nd])
    win = win.reshape(n_c, n_pos, *([k] * nd)).permute(1, 0, *range(2, 2 + nd))
    return win.reshape(n_pos, -1)


def _espirit_nd(
    cal: torch.Tensor, im_size: tuple[int, ...], k: int, thresh: float, crop: float, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    n_c = cal.shape[0]
    nd = len(im_size)
    a = _hankel(cal.to(torch.complex128), k)
    # right singular vectors from the (small) Gram matrix: much faster than an SVD of the tall
    # calibration matrix with LAPACK's gesdd on CPU, and accurate enough in float64
    with _one_thread():
        ev, vecs = torch.linalg.eigh(a.conj().T @ a)
    s = ev.flip(0).clamp_min(0).sqrt()
    vh = vecs.flip(1).conj().T
    n_keep = int((s > thresh * s[0]).sum()) if float(s[0]) > 0 else 0
    kernels = vh[:n_keep].reshape(n_keep, n_c, *([k] * nd))  # rows of Vᴴ, as SigPy
    # image-domain Gram matrix per pixel, G_cc'(r) = Σ_j g_jc(r) conj(g_jc'(r)), computed from the
    # kernels' cross-correlations (support 2k−1): one image-size FFT per coil pair, not per kernel
    big = tuple(2 * k for _ in range(nd))
    kf = torch.fft.fftn(kernels, s=big, dim=tuple(range(2, 2 + nd)))
    n_img = math.prod(im_size)
    scale = n_img / k**nd
    # only the lower triangle (c' ≤ c) is computed: eigh reads the lower triangle (UPLO="L");
    # the image-size FFTs run in complex64 (the maps need no more)
    g = torch.zeros(n_img, n_c, n_c, dtype=torch.complex64, device=cal.device)
    dims = tuple(range(1, 1 + nd))
    src, dst = [], []
    for n in im_size:
        lo = max(0, k - n // 2)
        src.append(slice(lo, 2 * k))
        dst.append(slice(n // 2 - k + lo, n // 2 + k))
    for c in range(n_c):
        # corr_{c,c'}(m) = Σ_j Σ_l h_jc(l+m) conj(h_jc'(l)) -> FFT: Σ_j Hc(f) conj(Hc'(f))
        prod = (kf[:, c : c + 1] * kf[:, : c + 1].conj()).sum(0)  # (c+1, *big)
        corr = torch.fft.fftshift(torch.fft.ifftn(prod, dim=dims), dim=dims)  # m = 0 at index k
        pad = torch.zeros(c + 1, *im_size, dtype=torch.complex64, device=corr.device)
        pad[(slice(None), *dst)] = corr[(slice(None), *src)].to(torch.complex64)
        # the image of the correlation is g_c conj(g_c') with g = ifft(kernel) (orthonormal)
        img = _cfft(pad, dims, inverse=True) * (scale / math.sqrt(n_img))
        g[:, c, : c + 1] = img.reshape(c + 1, -1).T
    maps = torch.empty(n_img, n_c, dtype=torch.complex64, device=cal.device)
    ev = torch.empty(n_img, dtype=torch.float32, device=cal.device)
    for s0 in range(0, n_img, chunk):
        v, e = _dominant_eigvec(g[s0 : s0 + chunk])
        maps[s0 : s0 + chunk], ev[s0 : s0 + chunk] = v, e
    maps = maps * (ev > crop)[:, None]
    return maps.T.reshape(n_c, *im_size), ev.reshape(im_size)


def espirit(
    kdata: Any,
    calib: int | Sequence[int] = 24,
    *,
    kernel: int = 6,
    thresh: float = 0.02,
    crop: float = 0.95,
    decouple_readout: bool | None = None,
    return_eigenvalues: bool = False,
    chunk: int = 1 << 16,
):
    """Coil sensitivities by ESPIRiT (Uecker et al., MRM 2014), one set of maps.

    The calibration region is turned into a block-Hankel matrix; its singular vectors above
    ``thresh·σ_max`` span the signal subspace. In every pixel the maps are the eigenvector of the
    image-domain ESPIRiT operator with eigenvalue 1; pixels whose largest eigenvalue is below
    ``crop`` (outside the object) get zero maps.

    Parameters
    ----------
    kdata : array ``(coils, *k)``
        Cartesian k-space, 2D ``(C, ny, nx)`` or 3D ``(C, nz, ny, nx)``, with a fully sampled
        centred calibration region (the rest may be undersampled or zero).
    calib : int or tuple of int
        Calibration width per phase-encoding axis (lines); the same width of the readout is used.
    kernel : int
        Kernel width (k-space points per axis).
    thresh : float
        Relative singular-value threshold of the calibration matrix.
    crop : float
        Eigenvalue threshold (0..1) for the support mask.
    decouple_readout : bool, optional
        3D only: inverse-FFT the (fully sampled) readout and run 2D ESPIRiT on every readout
        position (the usual practice, e.g. BART on hybrid data); default True for 3D. Each slice's
        maps get the same phase convention (coil sum real), so slices join smoothly.
    return_eigenvalues : bool
        Also return the per-pixel largest eigenvalue map.

    Returns
    -------
    Tensor ``(coils, *spatial)`` (dtype of kdata), and the eigenvalue map when asked.
    """
    y = to_complex(kdata, "kdata")
    if y.ndim not in (3, 4):
        raise ShapeError(
            f"kdata must be (coils, ny, nx) or (coils, nz, ny, nx), got {tuple(y.shape)}"
        )
    if not 0 < thresh < 1 or not 0 <= crop < 1:
        raise ParameterError(f"need 0 < thresh < 1 and 0 ≤ crop < 1, got {thresh}, {crop}")
    im_size = tuple(int(s) for s in y.shape[1:])
    nd = len(im_size)
    cal_w = (calib,) * (nd - 1) if isinstance(calib, int) else tuple(calib)
    if any(c < kernel + 1 for c in cal_w):
        raise ParameterError(
            f"the calibration region {cal_w} must be wider than the kernel "
            f"({kernel}) in every phase-encoding direction"
        )
    sl = calibration_region(im_size, cal_w)
    nx = im_size[-1]
    cw_x = min(max(cal_w), nx)
    sl = (*sl[:-1], slice(nx // 2 - cw_x // 2, nx // 2 - cw_x // 2 + cw_x))
    if nd == 3 and (decouple_readout is None or decouple_readout):
        cal = y[(slice(None), *sl[:-1])]  # full readout
        hyb = _cfft(cal, (-1,), inverse=True)  # (C, cz, cy, x)
        maps = torch.empty((y.shape[0], *im_size), dtype=torch.complex128, device=y.device)
        ev = torch.empty(im_size, dtype=torch.float64, device=y.device)
        for x in range(nx):
            m, e = _espirit_nd(
                hyb[..., x] * math.sqrt(nx), im_size[:2], kernel, thresh, crop, chunk
            )
            maps[..., x], ev[..., x] = m, e
    else:
        cal = y[(slice(None), *sl)]
        if not bool((cal != 0).all()):
            log.warning(
                "espirit: the calibration region has zero samples; is it fully sampled and centred?"
            )
        maps, ev = _espirit_nd(cal, im_size, kernel, thresh, crop, chunk)
    maps = maps.to(y.dtype)
    return (maps, ev) if return_eigenvalues else maps
