"""Simulated receive-coil sensitivities (birdcage-like arrays) for N coils, 2D and 3D."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .._device import resolve_device
from ..errors import ParameterError, ShapeError


def coil_maps(
    n_coils: int,
    shape: Sequence[int],
    *,
    radius: float = 1.5,
    n_rings: int | None = None,
    normalize: bool = True,
    dtype: torch.dtype = torch.complex64,
    device=None,
) -> torch.Tensor:
    """Smooth complex coil sensitivities of coils spread around the object.

    Coils sit on a circle of ``radius`` (in units of half the field of view) around the image
    centre; in 3D they are split into ``n_rings`` rings stacked along z (coordinates
    ``z = ±0.5``...). Each sensitivity falls off as ``1/distance`` and carries a phase that winds
    around its coil (the model of SigPy's ``birdcage_maps``, extended to 3D).

    Parameters
    ----------
    n_coils : int
        Number of coils, ≥ 1.
    shape : tuple of int
        Image shape, ``(ny, nx)`` or ``(nz, ny, nx)``.
    radius : float
        Coil circle radius relative to half the field of view (> 1 keeps coils outside).
    n_rings : int, optional
        Rings of coils along z in 3D (default 2 when ``n_coils ≥ 8`` and divisible by 2, else 1).
    normalize : bool
        Scale so that ``Σ_c |S_c|² = 1`` in every pixel (the normalisation ESPIRiT and adaptive
        combination produce), default True.
    dtype, device
        Output complex dtype and device (default CPU).

    Returns
    -------
    Tensor
        ``(n_coils, *shape)`` complex sensitivities (dimensionless).
    """
    n_coils = int(n_coils)
    if n_coils < 1:
        raise ParameterError(f"n_coils must be ≥ 1, got {n_coils}")
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (2, 3):
        raise ShapeError(f"shape must be (ny, nx) or (nz, ny, nx), got {shape}")
    dev = resolve_device(device)
    nd = len(shape)
    if n_rings is None:
        n_rings = 2 if (nd == 3 and n_coils >= 8 and n_coils % 2 == 0) else 1
    if nd == 2:
        n_rings = 1
    if n_coils % n_rings:
        raise ParameterError(f"n_coils={n_coils} is not divisible by n_rings={n_rings}")
    per_ring = n_coils // n_rings
    ax = [(torch.arange(n, dtype=torch.float64, device=dev) - n / 2) / (n / 2) for n in shape]
    g = torch.meshgrid(*ax, indexing="ij")
    y, x = g[-2], g[-1]
    z = g[0] if nd == 3 else torch.zeros_like(x)
    maps = []
    for ring in range(n_rings):
        zc = 0.0 if n_rings == 1 else -0.5 + ring / (n_rings - 1)
        for c in range(per_ring):
            ang = 2 * math.pi * c / per_ring + (math.pi / per_ring) * ring
            cx, cy = radius * math.cos(ang), radius * math.sin(ang)
            dx, dy, dz = x - cx, y - cy, z - zc
            r = torch.sqrt(dx**2 + dy**2 + dz**2)
            phase = torch.atan2(dx, -dy) - ang
            maps.append(torch.polar(1.0 / r, phase))
    s = torch.stack(maps)
    if normalize:
        s = s / torch.sqrt((s.abs() ** 2).sum(0, keepdim=True))
    return s.to(dtype)
