"""Non-Cartesian k-space trajectories and unit converters.

Every trajectory is returned in cycles/pixel within ``[-0.5, 0.5)``, shape ``(M, ndim)``, float64;
column ``i`` is the k-space coordinate along image axis ``i`` (for 3D: ``(kz, ky, kx)`` when the
image is ``(nz, ny, nx)``). Readouts sample ``k = (i − n//2)/n``, ``i = 0..n−1``, so the centre is
sampled exactly and the edge ``−0.5`` is included while ``+0.5`` is not.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .._device import as_tensor, resolve_device
from ..errors import ParameterError, ShapeError

GOLDEN_RATIO = (1.0 + math.sqrt(5.0)) / 2.0
#: golden angle of radial MRI, π/φ radians (≈ 111.246°)
GOLDEN_ANGLE = math.pi / GOLDEN_RATIO


def _readout(n: int, device) -> torch.Tensor:
    if n < 1:
        raise ParameterError(f"readout length must be ≥ 1, got {n}")
    return (torch.arange(n, dtype=torch.float64, device=device) - n // 2) / n


def _spokes(angles: torch.Tensor, n_readout: int) -> torch.Tensor:
    k = _readout(n_readout, angles.device)
    kx = torch.cos(angles)[:, None] * k
    ky = torch.sin(angles)[:, None] * k
    return torch.stack([ky, kx], -1).reshape(-1, 2).clamp_(-0.5, 0.5 - 1e-12)


def radial(n_spokes: int, n_readout: int, *, device=None) -> torch.Tensor:
    """2D radial trajectory with spokes uniformly spaced over π.

    Parameters
    ----------
    n_spokes : int
        Number of spokes (full diameters through the centre).
    n_readout : int
        Samples per spoke (k from −0.5 to 0.5 − 1/n, cycles/pixel).

    Returns
    -------
    Tensor
        ``(n_spokes·n_readout, 2)`` in cycles/pixel, columns ``(ky, kx)``, spoke-major.
    """
    dev = resolve_device(device)
    angles = torch.arange(n_spokes, dtype=torch.float64, device=dev) * (math.pi / n_spokes)
    return _spokes(angles, n_readout)


def golden_angle_radial(
    n_spokes: int, n_readout: int, *, tiny: int = 1, device=None
) -> torch.Tensor:
    """2D radial trajectory with golden-angle increments (π/(φ + tiny − 1), ≈ 111.25° for 1).

    Parameters
    ----------
    n_spokes, n_readout : int
        Spokes and samples per spoke.
    tiny : int
        ``1`` the golden angle; ``N > 1`` the N-th tiny golden angle (less eddy-current
        disturbance, same uniformity for long acquisitions).
    """
    if tiny < 1:
        raise ParameterError(f"tiny must be ≥ 1, got {tiny}")
    dev = resolve_device(device)
    inc = math.pi / (GOLDEN_RATIO + tiny - 1)
    angles = torch.remainder(
        torch.arange(n_spokes, dtype=torch.float64, device=dev) * inc, 2 * math.pi
    )
    return _spokes(angles, n_readout)


def spiral(
    n_interleaves: int,
    n_samples: int,
    im_size: int,
    *,
    density: float = 1.0,
    oversampling: float = 1.0,
    device=None,
) -> torch.Tensor:
    """2D (variable-density) Archimedean spiral with rotated interleaves.

    Each interleave follows ``k(t) = ρ(t)·exp(i(2π·n_turns·2ρ(t) + φ_j))`` with radius
    ``ρ(t) = 0.5·t^density``, ``t = 0, 1/n, …, (n−1)/n``, and rotation ``φ_j = 2πj/n_interleaves``.
    The radial distance between turns is constant (Archimedean), set for Nyquist sampling of an
    ``im_size`` image by all interleaves together:
    ``n_turns = oversampling·im_size / (2·n_interleaves)``. ``density > 1`` spends more of the
    readout near the centre (variable density).

    Parameters
    ----------
    n_interleaves : int
        Interleaves (arms), rotated by 2π/n_interleaves.
    n_samples : int
        Samples per interleave.
    im_size : int
        Image matrix size the spiral is designed for (pixels).
    density : float
        Radial exponent (1 = uniform-density Archimedean spiral).
    oversampling : float
        Factor on the number of turns (> 1 oversamples the periphery).

    Returns
    -------
    Tensor
        ``(n_interleaves·n_samples, 2)`` in cycles/pixel, columns ``(ky, kx)``.
    """
    if density <= 0 or oversampling <= 0:
        raise ParameterError("density and oversampling must be positive")
    dev = resolve_device(device)
    t = torch.arange(n_samples, dtype=torch.float64, device=dev) / n_samples
    r = 0.5 * t**density
    turns = oversampling * im_size / (2.0 * n_interleaves)
    theta = 2 * math.pi * turns * (r / 0.5)
    rot = torch.arange(n_interleaves, dtype=torch.float64, device=dev) * (
        2 * math.pi / n_interleaves
    )
    ang = theta[None, :] + rot[:, None]
    k = torch.stack([r * torch.sin(ang), r * torch.cos(ang)], -1).reshape(-1, 2)
    return k.clamp_(-0.5, 0.5 - 1e-12)


def stack_of_stars(
    n_spokes: int, n_readout: int, n_partitions: int, *, golden: bool = True, device=None
) -> torch.Tensor:
    """3D stack of stars: radial (golden-angle by default) in-plane, Cartesian along kz.

    Returns
    -------
    Tensor
        ``(n_partitions·n_spokes·n_readout, 3)`` in cycles/pixel, columns ``(kz, ky, kx)``.
    """
    dev = resolve_device(device)
    plane = (golden_angle_radial if golden else radial)(n_spokes, n_readout, device=dev)
    kz = _readout(n_partitions, dev)
    kz = kz[:, None].expand(n_partitions, plane.shape[0])
    p = plane[None].expand(n_partitions, *plane.shape)
    return torch.cat([kz[..., None], p], -1).reshape(-1, 3).contiguous()


def radial_3d(n_spokes: int, n_readout: int, *, device=None) -> torch.Tensor:
    """3D radial ("koosh ball") with 2D golden-means spoke directions over a hemisphere.

    Returns
    -------
    Tensor
        ``(n_spokes·n_readout, 3)`` in cycles/pixel, columns ``(kz, ky, kx)``.
    """
    dev = resolve_device(device)
    i = torch.arange(n_spokes, dtype=torch.float64, device=dev)
    # 2D golden means (0.4656, 0.6823): quasi-uniform directions
    phi1, phi2 = 0.465571231876768, 0.682327803828019
    cos_polar = torch.remainder(i * phi1, 1.0)
    az = 2 * math.pi * torch.remainder(i * phi2, 1.0)
    sin_polar = torch.sqrt(1 - cos_polar**2)
    d = torch.stack([cos_polar, sin_polar * torch.sin(az), sin_polar * torch.cos(az)], -1)
    k = _readout(n_readout, dev)
    return (d[:, None, :] * k[None, :, None]).reshape(-1, 3).clamp_(-0.5, 0.5 - 1e-12)


def from_radians(traj) -> torch.Tensor:
    """Radians (``[-π, π)``, FINUFFT/SigPy-style) -> cycles/pixel (``[-0.5, 0.5)``)."""
    t = as_tensor(traj, name="traj")
    return t.to(torch.float64) / (2 * math.pi)


def to_radians(traj) -> torch.Tensor:
    """Cycles/pixel -> radians."""
    t = as_tensor(traj, name="traj")
    return t.to(torch.float64) * (2 * math.pi)


def from_ismrmrd(traj, im_size: int | Sequence[int]) -> torch.Tensor:
    """ISMRMRD / BART units (``[-N/2, N/2]``, i.e. cycles per FOV) -> cycles/pixel.

    Parameters
    ----------
    traj : array_like
        ``(..., M, ndim)`` positions in units of 1/FOV.
    im_size : int or tuple of int
        Matrix size N per axis (one int for all axes).
    """
    t = as_tensor(traj, name="traj").to(torch.float64)
    nd = t.shape[-1]
    size = (im_size,) * nd if isinstance(im_size, int) else tuple(im_size)
    if len(size) != nd:
        raise ShapeError(f"im_size {size} does not match trajectory dimension {nd}")
    return t / torch.tensor(size, dtype=torch.float64, device=t.device)
