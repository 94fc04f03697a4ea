"""Reconstruct a :class:`~qmrkit.io.RawScan` end to end: prewhitening, optional coil
compression, coil maps, then CG-SENSE, TV or gridding. Used by ``qmrkit recon``."""

from __future__ import annotations

import time
import warnings
from typing import Any

import torch

from .._progress import get_logger
from ..errors import ParameterError, QmrkitWarning
from ..io.mrd import RawScan
from .coils import coil_compress, espirit, low_resolution_images, prewhiten, walsh
from .result import ReconResult
from .sense import gridding, sense, tv

log = get_logger("recon.scan")

METHODS = ("sense", "tv", "gridding")


def _calib_width(scan: RawScan) -> tuple[int, ...]:
    """Width of the centred, fully sampled calibration block per phase-encoding axis."""
    cm = scan.calib_mask if scan.calib_mask is not None else scan.mask
    pe = cm[(..., 0)] if cm is not None else None
    if pe is None:
        raise ParameterError("the scan has no sampling mask to find calibration lines in")
    widths = []
    for ax in range(pe.ndim):
        n = pe.shape[ax]
        sl = [pe.shape[o] // 2 for o in range(pe.ndim)]
        sl[ax] = slice(None)
        line = pe[tuple(sl)]
        c = n // 2
        lo = c
        while lo - 1 >= 0 and bool(line[lo - 1]):
            lo -= 1
        hi = c
        while hi + 1 < n and bool(line[hi + 1]):
            hi += 1
        widths.append(2 * min(c - lo, hi - c) + (1 if bool(line[c]) else 0))
    return tuple(widths)


def _crop_readout(img: torch.Tensor, scan: RawScan) -> torch.Tensor:
    """Crop the image to the reconstruction matrix (removes readout oversampling)."""
    out = img
    for ax, (n, r) in enumerate(zip(scan.matrix_size, scan.recon_size, strict=True)):
        if r < n:
            dim = img.ndim - scan.ndim + ax
            out = out.narrow(dim, (n - r) // 2, r)
    return out


def reconstruct(
    scan: RawScan,
    method: str = "sense",
    *,
    lam: float | None = None,
    max_iter: int | None = None,
    tol: float | None = None,
    maps: Any = "auto",
    whiten: bool = True,
    n_virtual: int | None = None,
    device=None,
    progress: bool | None = False,
) -> tuple[ReconResult, torch.Tensor]:
    """Reconstruct a raw scan.

    Parameters
    ----------
    scan : RawScan
        From :func:`qmrkit.io.read_mrd` or :func:`qmrkit.sim.raw_scan`.
    method : {"sense", "tv", "gridding"}
        CG-SENSE, TV by PDHG, or density-compensated gridding (non-Cartesian only).
    lam : float, optional
        Regularisation (SENSE: Tikhonov, default 0; TV: default 1e-3), scale-free as in
        :func:`sense` / :func:`tv`.
    max_iter, tol : optional
        Solver settings (defaults: SENSE 30 / 1e-6, TV 100 / 1e-4).
    maps : "auto", "espirit", "walsh" or array
        Coil maps: ESPIRiT for Cartesian data, Walsh on a low-resolution gridded image for
        non-Cartesian data ("auto"), or given sensitivities ``(coils, *spatial)``.
    whiten : bool
        Prewhiten with the scan's noise scan (``scan.noise``), else with ``scan.noise_covariance``
        (a stored calibration); a warning is issued when there is neither.
    n_virtual : int, optional
        Compress to this many virtual coils first (SVD).

    Returns
    -------
    (ReconResult, maps)
        The image is cropped to the reconstruction matrix. With prewhitening the data, hence the
        image, are in units of the noise standard deviation (SNR units). ``maps`` are those used
        (after whitening/compression).
    """
    if method not in METHODS:
        raise ParameterError(f"method must be one of {METHODS}, got {method!r}")
    if method == "gridding" and scan.is_cartesian:
        raise ParameterError("gridding is for non-Cartesian scans; use method='sense' or 'tv'")
    t0 = time.perf_counter()
    dev = torch.device(device) if device is not None else torch.device("cpu")
    y = scan.kdata.to(dev)
    calib = scan.calib.to(dev) if scan.calib is not None else None
    n_sp = scan.ndim
    k_nd = n_sp if scan.is_cartesian else 1
    coil_axis = y.ndim - k_nd - 1
    steps = []
    mix = None  # coil transform applied to the data (whitening, compression): maps follow it
    if whiten:
        if scan.noise is None and scan.noise_covariance is None:
            warnings.warn(
                "the scan has no noise scan: reconstructing without prewhitening",
                QmrkitWarning,
                stacklevel=2,
            )
        else:
            # the scan's own noise samples win over a stored covariance
            own = scan.noise is not None
            yw = torch.movedim(y, coil_axis, 0)
            yw, w = prewhiten(
                yw,
                scan.noise.to(dev) if own else None,
                covariance=None if own else scan.noise_covariance.to(dev),
                return_matrix=True,
                coil_axis=0,
            )
            y = torch.movedim(yw, 0, coil_axis)
            if calib is not None:
                calib = torch.movedim(
                    torch.tensordot(w, torch.movedim(calib, coil_axis, 0), dims=([1], [0])),
                    0,
                    coil_axis,
                )
            mix = w
            steps.append("prewhiten")
    if n_virtual is not None:
        yc = torch.movedim(y, coil_axis, 0)
        yc, a = coil_compress(yc.reshape(yc.shape[0], -1), n_virtual, return_matrix=True)
        y = torch.movedim(
            yc.reshape(n_virtual, *torch.movedim(y, coil_axis, 0).shape[1:]), 0, coil_axis
        )
        if calib is not None:
            calib = torch.movedim(
                torch.tensordot(a, torch.movedim(calib, coil_axis, 0), dims=([1], [0])),
                0,
                coil_axis,
            )
        mix = a if mix is None else a @ mix
        steps.append(f"coil_compress({n_virtual})")
    first = y.reshape(-1, *y.shape[coil_axis:])[0]
    if isinstance(maps, str):
        kind = maps
        if kind == "auto":
            kind = "espirit" if scan.is_cartesian else "walsh"
        if kind not in ("espirit", "walsh"):
            raise ParameterError(
                f"maps must be 'auto', 'espirit', 'walsh' or an array, got {maps!r}"
            )
        if scan.is_cartesian:
            kc = first
            if calib is not None:
                c0 = calib.reshape(-1, *calib.shape[coil_axis:])[0]
                kc = torch.where(c0 != 0, c0, kc)
            cw = _calib_width(scan)
            if kind == "espirit":
                s = espirit(kc, calib=cw, kernel=min(6, max(3, min(cw) - 2)))
            else:
                s = walsh(low_resolution_images(kc, calib=cw))
        else:
            if kind == "espirit":
                raise ParameterError(
                    "ESPIRiT needs Cartesian calibration data; use maps='walsh'"
                    " for non-Cartesian scans"
                )
            # low-resolution coil images from the central k-space (|k| < 0.1 cycles/pixel)
            from ..nufft import density_compensation

            tr = scan.traj.to(dev)
            dcf = density_compensation(tr, scan.matrix_size, device=dev)
            taper = torch.clamp(1 - (tr.norm(dim=-1) / 0.1), min=0) ** 2
            from ..nufft import plan as nplan

            p = nplan(tr, scan.matrix_size, dtype=first.dtype, device=dev)
            coil_imgs = p.H(first * (dcf * taper).to(first.real.dtype))
            s = walsh(coil_imgs)
        steps.append(f"maps={kind}")
    else:
        s = torch.as_tensor(maps, device=dev).to(y.dtype)
        if mix is not None:
            # given maps describe the physical coils: transform them like the data
            s = torch.tensordot(mix.to(s.dtype), s, dims=([1], [0]))
        steps.append("maps=given")
    mask = scan.mask.to(dev) if scan.is_cartesian else None
    traj = None if scan.is_cartesian else scan.traj.to(dev)
    if method == "sense":
        kw = {
            "lam": 0.0 if lam is None else lam,
            "max_iter": max_iter or 30,
            "tol": 1e-6 if tol is None else tol,
        }
        res = sense(y, s, mask=mask, traj=traj, device=dev, progress=progress, **kw)
    elif method == "tv":
        kw = {
            "lam": 1e-3 if lam is None else lam,
            "max_iter": max_iter or 100,
            "tol": 1e-4 if tol is None else tol,
        }
        res = tv(y, s, mask=mask, traj=traj, device=dev, progress=progress, **kw)
    else:
        from ..nufft import density_compensation

        res = gridding(
            y, traj, density_compensation(traj, scan.matrix_size, device=dev), s, device=dev
        )
        kw = {}
    res.image = _crop_readout(res.image, scan)
    res.settings.update(pipeline=steps, method=method, **{k: v for k, v in kw.items()})
    res.elapsed_s = time.perf_counter() - t0
    log.info("reconstruct: %s, %s, %.2f s", method, ", ".join(steps), res.elapsed_s)
    return res, s


__all__ = ["reconstruct", "METHODS"]
