"""Synthetic raw scans: a phantom seen by N coils through a Cartesian or radial trajectory, with
correlated receiver noise and a noise scan, as a :class:`~qmrkit.io.RawScan` or an ISMRMRD file."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import ParameterError
from ..io.geometry import ScanGeometry
from ..io.mrd import RawScan, attach_header, write_mrd
from .brain import brain_phantom
from .coils import coil_maps
from .masks import calibration_region, cartesian_mask
from .shepp_logan import shepp_logan

TRAJECTORIES = ("cartesian", "radial")


def _cfft(x: torch.Tensor, nd: int) -> torch.Tensor:
    axes = tuple(range(-nd, 0))
    return torch.fft.fftshift(
        torch.fft.fftn(torch.fft.ifftshift(x, dim=axes), dim=axes, norm="ortho"), dim=axes
    )


def raw_scan(
    shape: Sequence[int] = (128, 128),
    *,
    n_coils: int = 8,
    trajectory: str = "cartesian",
    acceleration: float | Sequence[int] = 2,
    calib: int | Sequence[int] = 24,
    mask_kind: str = "uniform",
    separate_calibration: bool = False,
    n_spokes: int | None = None,
    noise_level: float = 0.002,
    noise_correlation: float = 0.2,
    n_noise_samples: int = 4096,
    fov_mm: float = 220.0,
    slice_thickness_mm: float = 5.0,
    phase: bool = True,
    seed: int = 0,
    phantom: str = "shepp_logan",
    path: str | Path | None = None,
) -> RawScan:
    """Simulate a raw multi-coil scan of a Shepp–Logan phantom.

    Parameters
    ----------
    shape : tuple of int
        Image matrix ``(ny, nx)`` or ``(nz, ny, nx)``.
    n_coils : int
        Receive coils (:func:`qmrkit.sim.coil_maps`).
    trajectory : {"cartesian", "radial"}
        Cartesian (mask from :func:`qmrkit.sim.cartesian_mask`, readout last) or 2D golden-angle
        radial (``n_spokes`` spokes of ``2·nx`` samples).
    acceleration, calib, mask_kind
        Cartesian undersampling (see :func:`qmrkit.sim.cartesian_mask`).
    separate_calibration : bool
        Cartesian: acquire the calibration region as separate calibration-only lines
        (ACQ_IS_PARALLEL_CALIBRATION), not as part of the undersampled imaging data.
    n_spokes : int, optional
        Radial spokes (default ``π/2·nx / acceleration``).
    noise_level : float
        Noise standard deviation relative to the largest k-space magnitude.
    noise_correlation : float
        Strength of the coil noise correlation (0: independent channels).
    n_noise_samples : int
        Samples per coil in the noise scan (0: no noise scan).
    fov_mm : float
        Isotropic field of view (mm) written to the header.
    slice_thickness_mm : float
        2D: slice thickness (mm), the header's z field of view.
    phase : bool
        Give the object a smooth background phase (as real scans have).
    seed : int
        Seed of the noise.
    phantom : {"shepp_logan", "brain"}
        :func:`qmrkit.sim.shepp_logan` or :func:`qmrkit.sim.brain_phantom` (its ``image``).
    path : str or Path, optional
        Also write the scan as an ISMRMRD HDF5 file there (``scan.meta["path"]``).

    Returns
    -------
    RawScan
        With ``meta["truth"]`` (complex image), ``meta["maps"]`` (true sensitivities) and
        ``meta["noise_covariance"]``.
    """
    if trajectory not in TRAJECTORIES:
        raise ParameterError(f"trajectory must be one of {TRAJECTORIES}, got {trajectory!r}")
    shape = tuple(int(s) for s in shape)
    nd = len(shape)
    phantoms = {"shepp_logan": shepp_logan, "brain": brain_phantom}
    if phantom not in phantoms:
        raise ParameterError(f"phantom must be one of {tuple(phantoms)}, got {phantom!r}")
    ph = phantoms[phantom](shape)
    x = torch.tensor(ph["image"], dtype=torch.complex64)
    if phase:
        ax = [(torch.arange(n, dtype=torch.float64) - n / 2) / n for n in shape]
        g = torch.meshgrid(*ax, indexing="ij")
        x = x * torch.polar(
            torch.ones(shape, dtype=torch.float64), math.pi * (0.6 * g[-1] + 0.4 * g[-2])
        ).to(torch.complex64)
    maps = coil_maps(n_coils, shape)
    rng = torch.Generator().manual_seed(seed)
    mix = torch.eye(n_coils, dtype=torch.complex128)
    if noise_correlation > 0:
        a = torch.complex(
            torch.randn(n_coils, n_coils, generator=rng, dtype=torch.float64),
            torch.randn(n_coils, n_coils, generator=rng, dtype=torch.float64),
        )
        mix = mix + noise_correlation * a / math.sqrt(2 * n_coils)

    def noise(n_samples_shape, sigma):
        w = torch.complex(
            torch.randn(n_coils, math.prod(n_samples_shape), generator=rng, dtype=torch.float64),
            torch.randn(n_coils, math.prod(n_samples_shape), generator=rng, dtype=torch.float64),
        ) / math.sqrt(2)
        return (sigma * (mix @ w)).reshape(n_coils, *n_samples_shape).to(torch.complex64)

    limits: dict[str, tuple[int, int, int]] = {}
    meta: dict = {"truth": x, "maps": maps, "noise_covariance": (mix @ mix.conj().T)}
    if trajectory == "cartesian":
        full = _cfft(maps * x, nd)
        sigma = noise_level * float(full.abs().max())
        mask = cartesian_mask(shape, acceleration, calib=calib, kind=mask_kind, seed=seed)
        data = full + noise(shape, sigma)
        cal_data = cmask = None
        cal_region = torch.zeros(shape, dtype=torch.bool)
        if calib:
            cal_region[calibration_region(shape, calib)] = True
        if separate_calibration and calib:
            img_mask = cartesian_mask(shape, acceleration, calib=0, kind=mask_kind, seed=seed)
            cal_data = data * cal_region
            cmask = cal_region
            mask = img_mask
        elif calib:
            cmask = cal_region
        kdata = data * mask
        traj = None
        limits["kspace_encoding_step_1"] = (0, shape[-2] // 2, shape[-2] - 1)
        if nd == 3:
            limits["kspace_encoding_step_2"] = (0, shape[0] // 2, shape[0] - 1)
    else:
        if nd != 2:
            raise ParameterError("trajectory='radial' simulates 2D scans; use a 2D shape")
        from .. import nufft

        n_read = 2 * shape[-1]
        ns = int(
            n_spokes
            or max(
                1,
                round(
                    math.pi
                    / 2
                    * shape[-1]
                    / float(acceleration if np.isscalar(acceleration) else np.prod(acceleration))
                ),
            )
        )
        traj = nufft.golden_angle_radial(ns, n_read).to(torch.float32)
        # σ = 2: at eps=1e-6 the planner's σ = 1.25 makes FINUFFT cap its kernel width (error
        # ≈ 3e-5, see docs/recon.md)
        op = nufft.plan(traj, shape, eps=1e-6, oversampling=2.0)
        clean = op(maps * x)
        # scale like an orthonormal FFT so noise_level means the same as for Cartesian data
        clean = clean / math.sqrt(math.prod(shape))
        sigma = noise_level * float(clean.abs().max())
        kdata = clean + noise((traj.shape[0],), sigma)
        mask = cal_data = cmask = None
        limits["kspace_encoding_step_1"] = (0, 0, ns - 1)
        meta["samples_per_readout"] = n_read
    meta["sigma"] = sigma
    noise_scan = noise((n_noise_samples,), sigma) if n_noise_samples > 0 else None
    scan = RawScan(
        header="",
        kdata=kdata,
        traj=traj,
        mask=mask,
        noise=noise_scan,
        calib=cal_data,
        calib_mask=cmask,
        matrix_size=shape,
        recon_size=shape,
        fov_mm=(fov_mm,) * nd,
        slice_thickness_mm=slice_thickness_mm if nd == 2 else None,
        geometry=ScanGeometry(),
        trajectory=trajectory,
        encoding_limits=limits,
        meta=meta,
    )
    # the XML header needs the optional ismrmrd package; in memory it is unused
    attach_header(scan, strict=path is not None)
    if path is not None:
        scan.meta["path"] = str(write_mrd(path, scan))
    return scan
