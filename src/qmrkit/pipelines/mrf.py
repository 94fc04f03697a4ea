"""MR fingerprinting: raw spiral k-space → T1, T2, PD (and B1) maps."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._device import resolve_device
from .._progress import get_logger
from ..errors import ParameterError, ShapeError
from .masking import resolve_mask

log = get_logger("pipelines.mrf")


@dataclass
class MrfMaps:
    """Maps from an MRF scan and the time spent per stage (s).

    Every map is in NIfTI order ``(x, y[, z])`` — the reverse of the scan's array order, what
    :func:`qmrkit.io.load_nifti` returns and :func:`qmrkit.io.save_nifti` writes — with
    ``affine`` (4×4 RAS, from the scan's header and acquisitions) placing it in the scanner.
    """

    t1: torch.Tensor
    t2: torch.Tensor
    pd: torch.Tensor
    b1: torch.Tensor
    score: torch.Tensor
    stages: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    affine: np.ndarray | None = None

    def maps(self) -> dict[str, torch.Tensor]:
        return {"T1": self.t1, "T2": self.t2, "PD": self.pd, "B1": self.b1, "score": self.score}

    def save(self, directory: str | Path, *, affine: Any = None) -> list[Path]:
        """NIfTI ``T1map``, ``T2map``, ``M0map`` (PD), ``B1map``, ``matchscore`` and a PNG panel,
        every map with ``affine`` (default: the scan's, :attr:`affine`)."""
        from ..io.figures import save_map_figure
        from ..io.nifti import save_nifti

        aff = self.affine if affine is None else affine
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        names = {"T1": "T1map", "T2": "T2map", "PD": "M0map", "B1": "B1map", "score": "matchscore"}
        out = [
            save_nifti(d / f"{names[k]}.nii.gz", v.cpu(), affine=aff)
            for k, v in self.maps().items()
        ]
        out.append(
            save_map_figure(
                d / "maps.png",
                self.maps(),
                units={"T1": "ms", "T2": "ms", "PD": "a.u.", "B1": "fraction"},
                title="MR fingerprinting",
                ranges={"T2": (0, 300), "B1": (0.6, 1.4)},
            )
        )
        return out


def b1_grid(b1_map: Any, step: float = 0.05) -> np.ndarray:
    """Dictionary B1 values covering a measured B1 map (0.5–99.5 percentile) in steps of ``step``."""
    b = np.asarray(b1_map, dtype=np.float64)
    lo = np.floor(np.nanpercentile(b, 0.5) / step) * step
    hi = np.ceil(np.nanpercentile(b, 99.5) / step) * step
    return np.round(np.arange(lo, hi + step / 2, step), 4)


def default_dictionary(
    schedule: Any, *, b1: Any = None, step: float = 0.05, device: Any = None
) -> Any:
    """A dictionary over T1 10–4000 ms and T2 1–500 ms with relative ``step`` (and ``b1`` values)."""
    from ..mrf import Dictionary, log_grid

    return Dictionary.build(
        schedule,
        t1=log_grid(10, 4000, step),
        t2=log_grid(1, 500, step),
        b1=(1.0,) if b1 is None else b1,
        device=device,
        keep_atoms=False,
    )


def mrf_image_size(scan: Any) -> tuple[int, ...]:
    """The image size (array order) :func:`mrf_maps` reconstructs from ``scan``, after checking
    that the scan is a single non-Cartesian MRF scan whose trajectory has that many dimensions.

    Raises
    ------
    ParameterError
        A Cartesian scan (no trajectory).
    ShapeError
        Batch dimensions, or a trajectory whose dimensions disagree with the image size.
    """
    if scan.traj is None:
        raise ParameterError("mrf_maps needs a non-Cartesian scan (one readout per TR)")
    if scan.batch_dims:
        raise ShapeError(
            f"mrf_maps reconstructs one MRF scan; this one has batch dimensions {scan.batch_dims}"
        )
    im_size = tuple(int(n) for n in (scan.recon_size or scan.matrix_size))
    nd = int(scan.traj.shape[-1])
    if nd != len(im_size):
        raise ShapeError(
            f"the trajectory has {nd} dimensions but the image to reconstruct is {im_size} "
            f"({len(im_size)}D); a {nd}D scan needs a {nd}D header"
        )
    return im_size


def _schedule_of(scan: Any, schedule: Any, dictionary: Any) -> Any:
    from ..mrf import schedule_from_header

    sched = (
        schedule
        or scan.meta.get("schedule")
        or (dictionary.schedule if dictionary is not None else None)
    )
    if sched is None and scan.header:
        try:
            sched = schedule_from_header(scan.header)
        except (ParameterError, ImportError):
            sched = None
    if sched is None:
        raise ParameterError(
            "mrf_maps needs the sequence schedule (schedule=..., a dictionary, or a header with "
            "sequenceParameters)"
        )
    return sched


def mrf_maps(
    scan: Any,
    *,
    dictionary: Any = None,
    b1_map: Any = None,
    schedule: Any = None,
    n_iter: int = 0,
    eps: float = 1e-3,
    pd_threshold: float = 0.1,
    mask: Any = "auto",
    device: Any = None,
) -> MrfMaps:
    """Reconstruct and match an MRF scan (one spiral interleaf per TR), 2D or 3D.

    Parameters
    ----------
    scan : RawScan
        ``kdata (coils, frames·samples)`` with ``traj (frames·samples, ndim)`` (``ndim`` = 2 or
        3, as many as the image axes) and ``meta["frames"]`` (or the frame count of the
        schedule); e.g. from :func:`qmrkit.io.read_mrd` or :func:`qmrkit.sim.mrf_scan_3d`.
    dictionary : Dictionary, optional
        SVD-compressed dictionary for the scan's schedule (default: built from ``schedule`` over the
        default grid, with the B1 values of ``b1_map`` when one is given).
    b1_map : array, optional
        Measured B1 (fraction of nominal) in NIfTI order ``(x, y[, z])`` — as
        :func:`qmrkit.io.load_nifti` returns it: each voxel then matches only atoms at its B1.
    schedule : Schedule, optional
        The acquisition (default ``scan.meta["schedule"]``, the dictionary's, or the header's).
    n_iter : int
        Low-rank conjugate-gradient refinement iterations after the gridding reconstruction.
    eps : float
        NUFFT accuracy.
    pd_threshold : float
        Voxels whose fitted PD is below this fraction of the 99th percentile of PD are set to NaN
        in the T1, T2, B1 and score maps (background and aliasing around the object); 0 keeps all.
    mask : "auto", "none", None or array bool
        Voxels matched (the others are NaN), in the image's array order: ``"auto"`` (default) is
        :func:`qmrkit.pipelines.masking.object_mask` of the subspace coefficient images (the same
        rule as ``qmrkit fit --mask auto``; recorded in ``info["mask"]``), None/``"none"`` every
        voxel.

    Returns
    -------
    MrfMaps
        Maps in NIfTI order ``(x, y[, z])`` with the scan's affine.

    Raises
    ------
    ShapeError
        Before any dictionary build or reconstruction: a trajectory that disagrees with the image
        size, a sample count that is not frames × samples, or a B1 map of the wrong shape (the
        array-order shape is called out as such).
    """
    from ..io.geometry import map_from_nifti, to_nifti_order
    from ..mrf import match, subspace_recon
    from ..recon import walsh

    dev = resolve_device(device)
    stages: dict[str, float] = {}
    t0 = time.perf_counter()
    # every check before the expensive part
    im_size = mrf_image_size(scan)
    sched = _schedule_of(scan, schedule, dictionary)
    T = sched.n_tr
    C, M = scan.kdata.shape[-2:]
    frames = scan.meta.get("frames")
    if M % T or (frames is not None and int(frames) != T):
        raise ShapeError(
            f"k-space has {M} samples per coil"
            + (f" in {frames} frames" if frames is not None else "")
            + f", which does not match the {T} frames of the schedule"
        )
    b1 = None if b1_map is None else map_from_nifti(b1_map, im_size, "b1_map")
    if dictionary is None:
        b1_values = None
        if b1 is not None:
            b1_values = np.round(
                np.arange(np.floor(np.nanmin(b1) * 10) / 10, np.nanmax(b1) + 0.1, 0.05), 3
            )
        dictionary = default_dictionary(sched, b1=b1_values, device=dev)
        stages["dictionary"] = time.perf_counter() - t0
    if dictionary.basis is None:
        raise ParameterError("the dictionary must be SVD-compressed (Dictionary.compress)")
    S = M // T
    kdata = scan.kdata.reshape(C, T, S).to(dev)
    traj = scan.traj.reshape(T, S, -1).to(dev)
    basis = dictionary.basis.to(dev)
    t = time.perf_counter()
    coil_coeffs = subspace_recon(kdata, traj, basis, im_size, eps=eps, device=dev)  # (C, K, *im)
    stages["subspace_recon"] = time.perf_counter() - t
    t = time.perf_counter()
    # sensitivities from the first (highest-energy) coefficient image
    maps = walsh(coil_coeffs[:, 0])
    coeffs = (maps.conj()[:, None] * coil_coeffs).sum(0)  # (K, *im)
    stages["coil_combination"] = time.perf_counter() - t
    if n_iter > 0:
        t = time.perf_counter()
        coeffs = subspace_recon(
            kdata, traj, basis, im_size, maps=maps, n_iter=n_iter, eps=eps, device=dev
        )
        stages["subspace_cg"] = time.perf_counter() - t
    t = time.perf_counter()
    x = coeffs.movedim(0, -1)  # (*im, K)
    sel, auto = resolve_mask(mask, x)
    mask = (
        torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device)
        if sel is None
        else torch.as_tensor(sel, device=x.device).bool()
    )
    res = match(x, dictionary, b1_map=b1, mask=mask)
    if pd_threshold > 0:
        pd = res.pd
        ref = (
            torch.quantile(pd[mask].float()[:: max(1, int(mask.sum()) // 100000)], 0.99)
            if mask.any()
            else 0.0
        )
        low = pd < pd_threshold * ref
        for m in (res.t1, res.t2, res.b1, res.score):
            m[low] = float("nan")
    stages["matching"] = time.perf_counter() - t
    stages["total"] = time.perf_counter() - t0
    log.info("mrf_maps: %s", {k: round(v, 3) for k, v in stages.items()})

    def out(m: torch.Tensor) -> torch.Tensor:  # array order -> NIfTI order
        return to_nifti_order(m, len(im_size)).contiguous()

    return MrfMaps(
        t1=out(res.t1),
        t2=out(res.t2),
        pd=out(res.pd),
        b1=out(res.b1),
        score=out(res.score),
        stages=stages,
        info={
            "rank": dictionary.rank,
            "atoms": dictionary.n_atoms,
            "b1_clipped": res.n_b1_clipped,
            "mask": auto.sidecar()
            if auto is not None
            else {"Method": "none" if sel is None else "array"},
        },
        affine=scan.affine,
    )
