"""Simulated MR fingerprinting scans: multi-coil, one spiral interleaf per TR, noise, B1 field."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..errors import ParameterError
from ..io.geometry import ScanGeometry
from ..io.mrd import attach_header
from .coils import coil_maps
from .phantoms import nist_phantom

#: field of view (mm) of the simulated scans' larger in-plane axis (96 voxels → 2.6 mm), 2D
#: slice thickness and 3D partition thickness (mm)
FOV_MM, SLICE_MM, PARTITION_MM = 250.0, 5.0, 10.0


def b1_field(shape: Sequence[int], amplitude: float = 0.3, *, seed: int = 0) -> np.ndarray:
    """A smooth transmit field (fraction of nominal): 1 ± ``amplitude`` across the field of view."""
    rng = np.random.default_rng(seed)
    axes = [np.linspace(-1, 1, n) for n in shape]
    grids = np.meshgrid(*axes, indexing="ij")
    direction = rng.normal(size=len(shape))
    direction /= np.linalg.norm(direction)
    ramp = sum(d * g for d, g in zip(direction, grids, strict=True)) / math.sqrt(len(shape))
    bowl = sum(g**2 for g in grids) / len(shape)
    f = 0.7 * ramp + 0.3 * (bowl - bowl.mean()) / max(np.abs(bowl - bowl.mean()).max(), 1e-12)
    f = f / max(np.abs(f).max(), 1e-12)
    return 1.0 + amplitude * f


def spiral_frames(
    n_frames: int,
    n_interleaves: int,
    samples: int,
    im_size: int,
    *,
    density: float = 1.0,
    oversampling: float = 1.0,
) -> torch.Tensor:
    """Trajectory ``(n_frames, samples, 2)``: frame t uses interleaf t mod n_interleaves."""
    from .. import nufft

    arms = nufft.spiral(n_interleaves, samples, im_size, density=density, oversampling=oversampling)
    arms = arms.reshape(n_interleaves, samples, 2)
    return arms[torch.arange(n_frames) % n_interleaves].float()


def _simulate_kspace(
    shp: tuple[int, ...],
    ph: dict,
    sched: Any,
    traj: torch.Tensor,
    period: int,
    *,
    n_coils: int,
    b1_amplitude: float,
    noise_level: float,
    seed: int,
    eps: float,
) -> dict:
    """Shared core of the scan simulators: EPG signal per object voxel (its T1, T2, B1), PD and
    coil weighting, one NUFFT per frame (frames ``period`` apart share a trajectory and a plan),
    complex Gaussian noise and a noise scan."""
    from .. import nufft
    from ..mrf import epg_fisp

    T = sched.n_tr
    t1, t2, pd = (np.asarray(ph[k], dtype=np.float64) for k in ("T1", "T2", "PD"))
    b1 = b1_field(shp, b1_amplitude, seed=seed) if b1_amplitude else np.ones(shp)
    inside = pd > 0
    sig = epg_fisp(sched, t1[inside], t2[inside], b1[inside], dtype=torch.float32)  # (V, T)
    x = torch.zeros((T, *shp), dtype=torch.complex64)
    weighted = sig * torch.as_tensor(pd[inside], dtype=torch.float32)[:, None]
    x.reshape(T, -1)[:, torch.as_tensor(inside.reshape(-1))] = weighted.T
    maps = coil_maps(n_coils, shp)
    kdata = torch.zeros((n_coils, T, traj.shape[1]), dtype=torch.complex64)
    for g in range(min(period, T)):
        frames = torch.arange(g, T, period)
        op = nufft.plan(traj[g], shp, eps=eps, batch=n_coils * len(frames))
        kdata[:, frames] = op.forward(maps[:, None] * x[frames][None])
    rng = torch.Generator().manual_seed(seed)
    sigma = noise_level * float(kdata.abs().max())

    def noise(*shape: int) -> torch.Tensor:
        return (
            torch.complex(torch.randn(shape, generator=rng), torch.randn(shape, generator=rng))
            * sigma
        )

    kdata = kdata + noise(*kdata.shape)
    truth = {
        "T1": t1,
        "T2": t2,
        "PD": pd,
        "B1": b1,
        "labels": ph["labels"],
        "tissues": ph["tissues"],
        "maps": maps,
    }
    return {"kdata": kdata, "noise": noise(n_coils, 2048), "sigma": sigma, "truth": truth}


def mrf_scan(
    shape: Sequence[int] = (96, 96),
    *,
    schedule: Any = None,
    plate: str = "T2",
    n_coils: int = 8,
    n_interleaves: int = 48,
    samples: int | None = None,
    b1_amplitude: float = 0.3,
    noise_level: float = 0.002,
    seed: int = 0,
    eps: float = 1e-4,
) -> Any:
    """Simulate a 2D FISP MRF scan of the ISMRM/NIST phantom.

    Per voxel the MRF signal is simulated by EPG with the voxel's T1, T2 and B1 (a smooth field of
    ±``b1_amplitude``), weighted by PD and by ``n_coils`` coil sensitivities, and sampled with one
    rotated spiral interleaf per TR (the NUFFT of each frame, exact to ``eps``). Complex Gaussian
    noise of standard deviation ``noise_level`` × max |k| is added, and a noise scan is included.
    ``shape`` is ``(ny, nx)`` (array order) and may be non-square: pixels are square, the larger
    axis spans 250 mm, and the spiral is designed for it. The header (:func:`qmrkit.io.attach_header`)
    agrees with the scan and carries the schedule.

    Returns
    -------
    RawScan
        ``kdata (coils, frames·samples)``, ``traj (frames·samples, 2)`` in cycles/pixel, ``noise``;
        ``meta`` holds ``frames``, ``samples``, the ``schedule`` and the truth in array order
        ``(ny, nx)`` (``T1``, ``T2``, ``PD``, ``B1``, ``labels``, ``tissues``, ``maps``).
    """
    from ..io.mrd import RawScan
    from ..mrf import fisp_schedule

    shp = tuple(int(s) for s in shape)
    if len(shp) != 2:
        raise ParameterError(f"mrf_scan simulates 2D scans; got shape {shp}")
    sched = schedule if schedule is not None else fisp_schedule(1000, seed=seed)
    T = sched.n_tr
    n = max(shp)  # the spiral is designed for the larger axis (square pixels, Nyquist on both)
    S = samples or int(2 * n * math.ceil(n / (2 * n_interleaves)) * 2)
    traj = spiral_frames(T, n_interleaves, S, n)
    sim = _simulate_kspace(
        shp,
        nist_phantom(shp, plate=plate),
        sched,
        traj,
        n_interleaves,
        n_coils=n_coils,
        b1_amplitude=b1_amplitude,
        noise_level=noise_level,
        seed=seed,
        eps=eps,
    )
    scan = RawScan(
        header="",
        kdata=sim["kdata"].reshape(n_coils, T * S),
        traj=traj.reshape(T * S, 2),
        noise=sim["noise"],
        matrix_size=shp,
        recon_size=shp,
        fov_mm=tuple(FOV_MM * s / n for s in shp),
        slice_thickness_mm=SLICE_MM,
        geometry=ScanGeometry(),
        trajectory="spiral",
        meta={
            "frames": T,
            "samples": S,
            "samples_per_readout": S,
            "schedule": sched,
            "noise_sigma": sim["sigma"],
            "truth": sim["truth"],
        },
    )
    return attach_header(scan, strict=False)


def stack_of_spirals_frames(
    n_frames: int,
    n_interleaves: int,
    samples: int,
    shape: Sequence[int],
    *,
    partition_undersampling: int = 2,
    density: float = 1.0,
) -> torch.Tensor:
    """3D trajectory ``(n_frames, n_partitions/R · samples, 3)`` in cycles/pixel, ``(kz, ky, kx)``.

    Frame t uses spiral interleaf t mod ``n_interleaves`` on every R-th partition, starting at
    partition t mod R (interleaved partition undersampling, R = ``partition_undersampling``).
    """
    nz, ny, _ = (int(s) for s in shape)
    R = int(partition_undersampling)
    if R < 1 or nz % R:
        raise ParameterError(f"{nz} partitions cannot be undersampled by {R}")
    arms = spiral_frames(n_interleaves, n_interleaves, samples, ny, density=density)  # (n_il, S, 2)
    kz_all = (torch.arange(nz) - nz // 2).float() / nz
    frames = []
    for t in range(n_frames):
        kz = kz_all[(t % R) :: R]  # (nz/R,)
        arm = arms[t % n_interleaves]
        frames.append(
            torch.cat(
                [kz[:, None, None].expand(-1, samples, 1), arm[None].expand(len(kz), -1, -1)], -1
            ).reshape(-1, 3)
        )
    return torch.stack(frames)


def mrf_scan_3d(
    shape: Sequence[int] = (8, 48, 48),
    *,
    schedule: Any = None,
    plate: str = "T2",
    n_coils: int = 4,
    n_interleaves: int = 48,
    samples: int | None = None,
    partition_undersampling: int = 2,
    b1_amplitude: float = 0.3,
    noise_level: float = 0.002,
    seed: int = 0,
    eps: float = 1e-4,
) -> Any:
    """Simulate a 3D stack-of-spirals FISP MRF scan (``(nz, ny, nx)``) of the NIST phantom with
    interleaved partition undersampling; otherwise as :func:`mrf_scan` (partitions 10 mm thick,
    ``meta["samples"]`` = partitions per frame × ``meta["samples_per_readout"]``; a file stores
    one acquisition per frame and partition with its partition index)."""
    from ..io.mrd import RawScan
    from ..mrf import fisp_schedule

    shp = tuple(int(s) for s in shape)
    if len(shp) != 3:
        raise ParameterError(f"mrf_scan_3d needs (nz, ny, nx), got {shp}")
    sched = schedule if schedule is not None else fisp_schedule(1000, seed=seed)
    T = sched.n_tr
    S = samples or int(2 * shp[1] * math.ceil(shp[1] / (2 * n_interleaves)) * 2)
    ph = nist_phantom((shp[1], shp[2], shp[0]), plate=plate)  # (ny, nx, nz) → ours (nz, ny, nx)
    ph = {k: (np.moveaxis(v, 2, 0) if isinstance(v, np.ndarray) else v) for k, v in ph.items()}
    traj = stack_of_spirals_frames(
        T, n_interleaves, S, shp, partition_undersampling=partition_undersampling
    )
    P = traj.shape[1]
    sim = _simulate_kspace(
        shp,
        ph,
        sched,
        traj,
        math.lcm(n_interleaves, partition_undersampling),
        n_coils=n_coils,
        b1_amplitude=b1_amplitude,
        noise_level=noise_level,
        seed=seed,
        eps=eps,
    )
    scan = RawScan(
        header="",
        kdata=sim["kdata"].reshape(n_coils, T * P),
        traj=traj.reshape(T * P, 3),
        noise=sim["noise"],
        matrix_size=shp,
        recon_size=shp,
        fov_mm=(PARTITION_MM * shp[0], FOV_MM, FOV_MM),
        geometry=ScanGeometry(),
        trajectory="spiral",
        meta={
            "frames": T,
            "samples": P,
            "samples_per_readout": S,
            "schedule": sched,
            "noise_sigma": sim["sigma"],
            "partition_undersampling": partition_undersampling,
            "truth": sim["truth"],
        },
    )
    return attach_header(scan, strict=False)
