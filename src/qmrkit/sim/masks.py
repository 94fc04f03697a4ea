"""Cartesian undersampling masks: uniform, variable density and CAIPIRINHA, with a fully
sampled calibration (autocalibration, ACS) region at the k-space centre.

Convention: the last image axis is the readout (always fully sampled); the one (2D) or two (3D)
axes before it are phase-encoding axes. Masks are returned with the full image shape (boolean),
so they apply directly to k-space ``(coils, *shape)`` by broadcasting.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from .._device import resolve_device
from ..errors import ParameterError, ShapeError

KINDS = ("uniform", "variable_density", "caipi")


def _factor(r: int) -> tuple[int, int]:
    """Split an integer acceleration into (R_y, R_z) as square as possible, R_y ≥ R_z."""
    best = (r, 1)
    for rz in range(1, int(math.isqrt(r)) + 1):
        if r % rz == 0:
            best = (r // rz, rz)
    return best


def calibration_region(shape: Sequence[int], calib: int | Sequence[int]) -> tuple[slice, ...]:
    """Slices of the centred calibration region over the phase-encoding axes (readout full)."""
    shape = tuple(shape)
    n_pe = len(shape) - 1
    cal = (calib,) * n_pe if isinstance(calib, (int, np.integer)) else tuple(calib)
    if len(cal) != n_pe:
        raise ShapeError(f"calib must have {n_pe} entries for shape {shape}, got {cal}")
    sl = []
    for n, c in zip(shape[:-1], cal, strict=True):
        c = min(int(c), n)
        start = n // 2 - c // 2
        sl.append(slice(start, start + c))
    return (*sl, slice(None))


def cartesian_mask(
    shape: Sequence[int],
    acceleration: float | Sequence[int],
    *,
    calib: int | Sequence[int] = 24,
    kind: str = "uniform",
    caipi_shift: int | None = None,
    power: float = 2.0,
    seed: int = 0,
    device=None,
) -> torch.Tensor:
    """A Cartesian sampling mask with a fully sampled calibration region.

    Parameters
    ----------
    shape : tuple of int
        Image/k-space shape ``(ny, nx)`` or ``(nz, ny, nx)``; the last axis is the readout.
    acceleration : float or (R_y, R_z)
        Undersampling of the phase-encoding plane outside the calibration region. ``uniform`` and
        ``caipi`` need integers (3D: one int is split into ``R_y × R_z``); ``variable_density``
        accepts any value > 1 (the total number of phase encodes, calibration included, is
        ``N_pe / R``).
    calib : int or tuple of int
        Width of the centred calibration region per phase-encoding axis (lines); 0 for none.
    kind : {"uniform", "variable_density", "caipi"}
        Regular lattice; random with density ∝ ``(1 − r)^power`` (r = normalised radius); or, in
        3D, a CAIPIRINHA lattice shifting the ``k_y`` pattern by ``caipi_shift`` on each sampled
        ``k_z`` line (default ``R_y // 2`` or 1).
    seed : int
        Seed of the random (variable-density) pattern.
    device : optional
        Output device (default CPU).

    Returns
    -------
    Tensor
        Boolean mask of ``shape``.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (2, 3):
        raise ShapeError(f"shape must be (ny, nx) or (nz, ny, nx), got {shape}")
    if kind not in KINDS:
        raise ParameterError(f"kind must be one of {KINDS}, got {kind!r}")
    pe = shape[:-1]
    n_pe = len(pe)
    if kind == "caipi" and n_pe != 2:
        raise ParameterError("kind='caipi' needs a 3D shape (two phase-encoding axes)")
    dev = resolve_device(device)
    if kind == "variable_density":
        r = float(acceleration if np.isscalar(acceleration) else np.prod(acceleration))
        if not r >= 1:
            raise ParameterError(f"acceleration must be ≥ 1, got {acceleration}")
        pe_mask = np.zeros(pe, dtype=bool)
        pe_mask[calibration_region((*pe, 1), calib)[:-1]] = True
        target = int(round(np.prod(pe) / r))
        need = target - int(pe_mask.sum())
        if need > 0:
            ax = [(np.arange(n) - n // 2) / (n / 2) for n in pe]
            rr = np.sqrt(sum(a**2 for a in np.meshgrid(*ax, indexing="ij"))) / math.sqrt(n_pe)
            dens = np.clip(1 - rr, 0, 1) ** power + 1e-3
            dens[pe_mask] = 0
            rng = np.random.default_rng(seed)
            idx = rng.choice(
                dens.size,
                size=min(need, int((dens > 0).sum())),
                replace=False,
                p=(dens / dens.sum()).ravel(),
            )
            pe_mask.ravel()[idx] = True
    else:
        if np.isscalar(acceleration):
            a = int(acceleration)
            if a != acceleration or a < 1:
                raise ParameterError(
                    f"{kind} masks need an integer acceleration ≥ 1, got {acceleration}"
                )
            rs = (a,) if n_pe == 1 else _factor(a)
        else:
            rs = tuple(int(v) for v in acceleration)
            if len(rs) != n_pe or min(rs) < 1:
                raise ParameterError(
                    f"acceleration must be one int or {n_pe} ints ≥ 1, got {acceleration}"
                )
        grids = np.meshgrid(*[np.arange(n) - n // 2 for n in pe], indexing="ij")
        if n_pe == 1:
            pe_mask = grids[0] % rs[0] == 0
        else:
            ry, rz = rs  # R_y along axis -2, R_z along axis -3
            kz, ky = grids[0], grids[1]
            shift = 0
            if kind == "caipi":
                shift = (ry // 2 or 1) if caipi_shift is None else int(caipi_shift)
            zline = kz // rz
            pe_mask = (kz % rz == 0) & ((ky - shift * zline) % ry == 0)
        pe_mask[calibration_region((*pe, 1), calib)[:-1]] = True
    if not pe_mask.any():
        raise ParameterError("the mask samples nothing")
    m = np.broadcast_to(pe_mask[..., None], shape)
    return torch.as_tensor(np.ascontiguousarray(m), device=dev)
