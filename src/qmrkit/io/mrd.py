"""ISMRMRD / MRD HDF5 raw data in, images out (the ``ismrmrd`` package; optional extra ``mrd``).

:func:`read_mrd` assembles the acquisitions of one dataset into a :class:`RawScan`: the XML
header, k-space ``(*batch, coils, *k)`` (Cartesian data on the encoded grid, readout last;
non-Cartesian samples concatenated with their trajectory in cycles/pixel), noise scans,
parallel-imaging calibration lines and the encoding limits. :func:`write_mrd` writes a RawScan
(used by :func:`qmrkit.sim.raw_scan`), :func:`write_mrd_images` / :func:`read_mrd_images` store
reconstructed images in the same format.

Spatial order inside qmrkit is ``(z, y, x)`` / ``(y, x)`` (ISMRMRD's ``kspace_encode_step_2``,
``kspace_encode_step_1``, readout).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._optional import require
from .._progress import get_logger
from ..errors import DataFileError, ParameterError, ShapeError

log = get_logger("io.mrd")

#: acquisition counters that become batch dimensions (in this order) when they take > 1 value
BATCH_COUNTERS = ("slice", "contrast", "repetition")


@dataclass
class RawScan:
    """Raw data of one scan, ready for reconstruction.

    Attributes
    ----------
    header : str
        ISMRMRD XML header.
    kdata : Tensor
        complex64 k-space. Cartesian: ``(*batch, coils, *k)`` on the encoded matrix (2D
        ``(ny, nx)`` or 3D ``(nz, ny, nx)``, readout last, zeros where nothing was acquired).
        Non-Cartesian: ``(*batch, coils, M)``.
    traj : Tensor or None
        ``(M, ndim)`` trajectory in cycles/pixel (x last: ``(..., ky, kx)`` order as the image
        axes), None for Cartesian data.
    mask : Tensor or None
        Boolean sampling mask over the encoded matrix (Cartesian), shared by the batch.
    noise : Tensor or None
        ``(coils, samples)`` noise-scan samples (ACQ_IS_NOISE_MEASUREMENT).
    noise_covariance : Tensor or None
        ``(coils, coils)`` noise covariance of an earlier noise scan (e.g. from the service's
        calibration store), used for prewhitening when ``noise`` is None.
    calib : Tensor or None
        Calibration-only lines (ACQ_IS_PARALLEL_CALIBRATION) on the same grid as ``kdata``.
    calib_mask : Tensor or None
        Where calibration data exist (dedicated lines and ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING).
    matrix_size : tuple of int
        Encoded matrix, image-axis order (``(ny, nx)`` or ``(nz, ny, nx)``).
    recon_size : tuple of int
        Reconstruction matrix (may be smaller, e.g. readout oversampling removed).
    fov_mm : tuple of float
        Encoded field of view (mm), image-axis order.
    trajectory : str
        ISMRMRD trajectory type (``"cartesian"``, ``"radial"``, ``"spiral"``, ...).
    encoding_limits : dict
        Counter name -> ``(minimum, center, maximum)``.
    batch_dims : tuple of str
        Names of the leading batch axes of ``kdata`` (from :data:`BATCH_COUNTERS`).
    meta : dict
        Extra information (simulation truth, file path, ...).
    """

    header: str
    kdata: torch.Tensor
    traj: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    noise: torch.Tensor | None = None
    noise_covariance: torch.Tensor | None = None
    calib: torch.Tensor | None = None
    calib_mask: torch.Tensor | None = None
    matrix_size: tuple[int, ...] = ()
    recon_size: tuple[int, ...] = ()
    fov_mm: tuple[float, ...] = ()
    trajectory: str = "cartesian"
    encoding_limits: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    batch_dims: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def is_cartesian(self) -> bool:
        return self.traj is None

    @property
    def n_coils(self) -> int:
        nk = len(self.matrix_size) if self.is_cartesian else 1
        return int(self.kdata.shape[-nk - 1])

    @property
    def ndim(self) -> int:
        """Spatial dimensions (2 or 3)."""
        return len(self.matrix_size)

    def calibration_data(self) -> torch.Tensor:
        """Cartesian k-space of the first batch entry with calibration lines merged in."""
        if not self.is_cartesian:
            raise ParameterError("calibration_data is for Cartesian scans")
        k = self.kdata.reshape(-1, *self.kdata.shape[len(self.batch_dims) :])[0]
        if self.calib is not None:
            c = self.calib.reshape(-1, *self.calib.shape[len(self.batch_dims) :])[0]
            k = torch.where(c != 0, c, k)
        return k


# --------------------------------------------------------------------------------------- header
def _limit(enc, name):
    lim = getattr(enc.encodingLimits, name, None) if enc.encodingLimits is not None else None
    if lim is None:
        return None
    return (int(lim.minimum), int(lim.center), int(lim.maximum))


def _make_header(matrix_size, recon_size, fov_mm, n_coils, trajectory, limits) -> str:
    """ISMRMRD XML header for one encoding (sizes and FOV in image-axis order)."""
    x = require("ismrmrd").xsd

    def space(size, fov):
        size3 = list(reversed(size)) + [1] * (3 - len(size))  # x, y, z
        fov3 = list(reversed(fov)) + [float(fov[-1])] * (3 - len(fov))
        return x.encodingSpaceType(
            matrixSize=x.matrixSizeType(x=int(size3[0]), y=int(size3[1]), z=int(size3[2])),
            fieldOfView_mm=x.fieldOfViewMm(x=float(fov3[0]), y=float(fov3[1]), z=float(fov3[2])),
        )

    el = x.encodingLimitsType(
        **{
            name: x.limitType(minimum=int(lo), center=int(c), maximum=int(hi))
            for name, (lo, c, hi) in limits.items()
        }
    )
    enc = x.encodingType(
        encodedSpace=space(matrix_size, fov_mm),
        reconSpace=space(recon_size, fov_mm),
        encodingLimits=el,
        trajectory=x.trajectoryType(trajectory),
    )
    h = x.ismrmrdHeader(
        experimentalConditions=x.experimentalConditionsType(H1resonanceFrequency_Hz=127_740_000),
        acquisitionSystemInformation=x.acquisitionSystemInformationType(
            receiverChannels=int(n_coils)
        ),
        encoding=[enc],
    )
    xml = x.ToXML(h) if hasattr(x, "ToXML") else h.toXML("utf-8")
    return xml.decode() if isinstance(xml, bytes) else xml


# ----------------------------------------------------------------------------------------- read
def _open(path: str | Path, dataset: str, create: bool):
    ismrmrd = require("ismrmrd")
    h5py = require("h5py")
    p = Path(path)
    if not create:
        if not p.exists():
            raise DataFileError(f"no such file: {p}")
        try:
            with h5py.File(p, "r") as f:
                keys = list(f.keys())
        except OSError as exc:
            raise DataFileError(
                f"{p} is not an HDF5 file (corrupt or another format): {exc}"
            ) from exc
        if dataset not in keys:
            raise DataFileError(
                f"{p} is HDF5 but has no ISMRMRD dataset {dataset!r} "
                f"(top-level groups: {keys}); is it an ISMRMRD/MRD file?"
            )
    try:
        return ismrmrd.Dataset(str(p), dataset, create_if_needed=create)
    except Exception as exc:  # h5py/ismrmrd raise various errors for damaged files
        raise DataFileError(f"cannot open {p} as ISMRMRD: {exc}") from exc


def read_mrd(path: str | Path, *, dataset: str = "dataset", encoding: int = 0) -> RawScan:
    """Read an ISMRMRD/MRD HDF5 file into a :class:`RawScan`.

    Parameters
    ----------
    path : str or Path
        The ``.h5``/``.mrd`` file.
    dataset : str
        Group of the dataset (ISMRMRD default ``"dataset"``).
    encoding : int
        Encoding space to read (``encoding_space_ref``); others are skipped.

    Raises
    ------
    DataFileError
        Missing, corrupt, non-HDF5 or non-ISMRMRD files, or a dataset without acquisitions.
    """
    require("ismrmrd")
    ds = _open(path, dataset, create=False)
    try:
        try:
            xml = ds.read_xml_header()
        except Exception as exc:
            raise DataFileError(
                f"{path}: the ISMRMRD XML header is missing or invalid: {exc}"
            ) from exc
        try:
            n_acq = ds.number_of_acquisitions()
        except Exception as exc:
            raise DataFileError(f"{path}: no acquisitions in dataset {dataset!r}") from exc
        acquisitions = [ds.read_acquisition(i) for i in range(n_acq)]
    finally:
        ds.close()
    return scan_from_acquisitions(xml, acquisitions, encoding=encoding, source=str(path))


def scan_from_acquisitions(
    header_xml: str | bytes,
    acquisitions: Sequence[Any],
    *,
    encoding: int = 0,
    source: str = "stream",
) -> RawScan:
    """Assemble a :class:`RawScan` from an MRD XML header and ``ismrmrd.Acquisition`` objects.

    This is what :func:`read_mrd` does after reading a file, and what the reconstruction
    server does with a streamed session, so stored and streamed scans are parsed identically.

    Parameters
    ----------
    header_xml : str or bytes
        The ISMRMRD XML header.
    acquisitions : sequence of ismrmrd.Acquisition
        In acquisition order; noise measurements are collected as ``scan.noise``, navigator,
        phase-correction and dummy scans are skipped, as are other encoding spaces.
    encoding : int
        Encoding space to assemble.
    source : str
        Where the data came from (a path, ``"stream"``), used in error messages and ``meta``.

    Raises
    ------
    DataFileError
        An invalid header, no imaging acquisitions, or acquisitions inconsistent with the header.
    """
    ismrmrd = require("ismrmrd")
    path = source
    try:
        xml = header_xml.decode() if isinstance(header_xml, bytes) else header_xml
        hdr = ismrmrd.xsd.CreateFromDocument(xml)
    except Exception as exc:
        raise DataFileError(f"{path}: the ISMRMRD XML header is missing or invalid: {exc}") from exc
    if len(acquisitions) == 0:
        raise DataFileError(f"{path}: the dataset has no acquisitions")
    if not 0 <= encoding < len(hdr.encoding):
        raise DataFileError(
            f"{path}: encoding {encoding} requested, the header has {len(hdr.encoding)}"
        )
    enc = hdr.encoding[encoding]
    em, rm = enc.encodedSpace.matrixSize, enc.reconSpace.matrixSize
    ef = enc.encodedSpace.fieldOfView_mm
    traj_type = str(getattr(enc.trajectory, "value", enc.trajectory))
    three_d = int(em.z) > 1
    matrix = (int(em.z), int(em.y), int(em.x)) if three_d else (int(em.y), int(em.x))
    recon_size = (int(rm.z), int(rm.y), int(rm.x)) if three_d else (int(rm.y), int(rm.x))
    fov = (float(ef.z), float(ef.y), float(ef.x)) if three_d else (float(ef.y), float(ef.x))
    limits = {}
    for name in (
        "kspace_encoding_step_1",
        "kspace_encoding_step_2",
        "slice",
        "contrast",
        "repetition",
        "average",
        "phase",
        "set",
        "segment",
    ):
        lim = _limit(enc, name)
        if lim is not None:
            limits[name] = lim
    noise, acqs = [], []
    for a in acquisitions:
        if a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):
            noise.append(np.asarray(a.data))
            continue
        if a.encoding_space_ref != encoding:
            continue
        if any(
            a.is_flag_set(f)
            for f in (
                ismrmrd.ACQ_IS_NAVIGATION_DATA,
                ismrmrd.ACQ_IS_PHASECORR_DATA,
                ismrmrd.ACQ_IS_DUMMYSCAN_DATA,
            )
        ):
            continue
        acqs.append(a)
    if not acqs:
        raise DataFileError(f"{path}: no imaging acquisitions in encoding {encoding}")
    n_c = int(acqs[0].active_channels)
    counts = {}
    for name in BATCH_COUNTERS:
        vals = {int(getattr(a.idx, name)) for a in acqs}
        if len(vals) > 1:
            counts[name] = max(vals) + 1
    batch_dims = tuple(counts)
    batch_shape = tuple(counts.values())

    def bidx(a):
        return tuple(int(getattr(a.idx, n)) for n in batch_dims)

    noise_t = None
    if noise:
        noise_t = torch.from_numpy(np.concatenate(noise, axis=1).astype(np.complex64))
    scan = RawScan(
        header=xml,
        kdata=torch.empty(0),
        matrix_size=matrix,
        recon_size=recon_size,
        fov_mm=fov,
        trajectory=traj_type,
        encoding_limits=limits,
        batch_dims=batch_dims,
        noise=noise_t,
        meta={"path" if source != "stream" else "source": source},
    )
    if traj_type == "cartesian":
        nx = matrix[-1]
        k = np.zeros((*batch_shape, n_c, *matrix), dtype=np.complex64)
        cal = np.zeros_like(k)
        mask = np.zeros(matrix, dtype=bool)
        cmask = np.zeros(matrix, dtype=bool)
        any_cal = False
        for a in acqs:
            d = np.asarray(a.data)
            if d.shape != (n_c, nx):
                if d.shape[0] != n_c:
                    raise DataFileError(f"{path}: acquisitions have different channel counts")
                # asymmetric echo / different readout length: centre it on center_sample
                full = np.zeros((n_c, nx), dtype=np.complex64)
                off = nx // 2 - int(a.center_sample)
                full[:, max(off, 0) : max(off, 0) + d.shape[1]] = d[:, : nx - max(off, 0)]
                d = full
            pe = (
                (int(a.idx.kspace_encode_step_2), int(a.idx.kspace_encode_step_1))
                if three_d
                else (int(a.idx.kspace_encode_step_1),)
            )
            if any(p >= m for p, m in zip(pe, matrix[:-1], strict=True)):
                raise DataFileError(f"{path}: encoding step {pe} outside the matrix {matrix}")
            is_cal = a.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION)
            both = a.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING)
            if is_cal and not both:
                cal[(*bidx(a), slice(None), *pe)] = d
                cmask[pe] = True
                any_cal = True
            else:
                k[(*bidx(a), slice(None), *pe)] = d
                mask[pe] = True
                if both:
                    cmask[pe] = True
        scan.kdata = torch.from_numpy(k)
        scan.mask = torch.from_numpy(mask)
        scan.calib = torch.from_numpy(cal) if any_cal else None
        scan.calib_mask = torch.from_numpy(cmask) if cmask.any() else None
    else:
        groups: dict[tuple, list] = {}
        for a in acqs:
            if a.trajectory_dimensions < len(matrix):
                raise DataFileError(
                    f"{path}: {traj_type} acquisitions need a trajectory with "
                    f"{len(matrix)} dimensions, got {a.trajectory_dimensions}"
                )
            groups.setdefault(bidx(a), []).append(a)
        first = next(iter(groups.values()))
        tr = np.concatenate([np.asarray(a.traj)[:, : len(matrix)] for a in first], axis=0)
        # ISMRMRD: (kx, ky[, kz]) in cycles/FOV -> ours: (.., ky, kx) in cycles/pixel
        tr = tr[:, ::-1] / np.array(matrix, dtype=np.float64)
        tr = np.where(tr >= 0.5, tr - 1.0, tr)
        m = tr.shape[0]
        k = np.zeros((*batch_shape, n_c, m), dtype=np.complex64)
        for key, grp in groups.items():
            d = np.concatenate([np.asarray(a.data) for a in grp], axis=1)
            if d.shape[1] != m:
                raise DataFileError(f"{path}: batch entries have different sample counts")
            k[(*key, slice(None), slice(None))] = d
        scan.kdata = torch.from_numpy(k)
        scan.traj = torch.from_numpy(np.ascontiguousarray(tr)).to(torch.float32)
    log.info(
        "read %s: %s %s, %d coils, kdata %s", path, traj_type, matrix, n_c, tuple(scan.kdata.shape)
    )
    return scan


# ---------------------------------------------------------------------------------------- write
def write_mrd(path: str | Path, scan: RawScan, *, dataset: str = "dataset") -> Path:
    """Write a :class:`RawScan` as an ISMRMRD HDF5 file (one acquisition per readout/interleaf;
    noise scan first, flagged ACQ_IS_NOISE_MEASUREMENT; calibration-only lines flagged
    ACQ_IS_PARALLEL_CALIBRATION, imaging lines inside the calibration region
    ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING). Overwrites ``path``."""
    ismrmrd = require("ismrmrd")
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.exists():
        p.unlink()
    if scan.batch_dims:
        raise ParameterError("write_mrd writes single-frame scans (no batch dimensions)")
    ds = _open(p, dataset, create=True)
    try:
        ds.write_xml_header(scan.header)
        n_c = scan.n_coils
        counter = 0
        if scan.noise is not None:
            nz = scan.noise.numpy().astype(np.complex64)
            a = ismrmrd.Acquisition.from_array(np.ascontiguousarray(nz))
            a.set_flag(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)
            a.scan_counter = counter
            counter += 1
            ds.append_acquisition(a)
        k = scan.kdata.numpy()
        if scan.is_cartesian:
            three_d = scan.ndim == 3
            pe_shape = scan.matrix_size[:-1]
            mask = scan.mask.numpy() if scan.mask is not None else np.abs(k).sum(0) > 0
            cmask = scan.calib_mask.numpy() if scan.calib_mask is not None else None
            cal = scan.calib.numpy() if scan.calib is not None else None
            lines = list(np.ndindex(*pe_shape))
            n_lines = len(lines)
            for j, pe in enumerate(lines):
                sel = (slice(None), *pe, slice(None))
                for is_cal_only in (True, False):
                    if is_cal_only:
                        if cal is None or not np.abs(cal[sel]).any():
                            continue
                        data = cal[sel]
                    else:
                        if not mask[(*pe, 0)]:
                            continue
                        data = k[sel]
                    a = ismrmrd.Acquisition.from_array(np.ascontiguousarray(data))
                    a.center_sample = scan.matrix_size[-1] // 2
                    a.read_dir[0], a.phase_dir[1], a.slice_dir[2] = 1.0, 1.0, 1.0
                    a.idx.kspace_encode_step_1 = int(pe[-1])
                    if three_d:
                        a.idx.kspace_encode_step_2 = int(pe[0])
                    if is_cal_only:
                        a.set_flag(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION)
                    elif cmask is not None and cmask[(*pe, 0)]:
                        a.set_flag(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING)
                    if j == n_lines - 1 and not is_cal_only:
                        a.set_flag(ismrmrd.ACQ_LAST_IN_SLICE)
                    a.scan_counter = counter
                    counter += 1
                    ds.append_acquisition(a)
        else:
            tr = scan.traj.numpy().astype(np.float64)
            n_read = int(scan.meta.get("samples_per_readout", tr.shape[0]))
            if tr.shape[0] % n_read:
                raise ShapeError(f"{tr.shape[0]} samples do not split into readouts of {n_read}")
            # ours (.., ky, kx) cycles/pixel -> ISMRMRD (kx, ky[, kz]) cycles/FOV
            tr_i = (tr * np.array(scan.matrix_size))[:, ::-1].astype(np.float32)
            for r in range(tr.shape[0] // n_read):
                s = slice(r * n_read, (r + 1) * n_read)
                a = ismrmrd.Acquisition.from_array(
                    np.ascontiguousarray(k[:, s]), np.ascontiguousarray(tr_i[s])
                )
                a.center_sample = n_read // 2
                a.idx.kspace_encode_step_1 = r
                a.scan_counter = counter
                counter += 1
                ds.append_acquisition(a)
        assert n_c == k.shape[0]
    finally:
        ds.close()
    return p


def write_mrd_images(
    path: str | Path,
    image: Any,
    *,
    name: str = "image_0",
    fov_mm: tuple[float, ...] | None = None,
    dataset: str = "dataset",
    series_index: int = 0,
) -> Path:
    """Append reconstructed images to an ISMRMRD HDF5 file (created when missing).

    Parameters
    ----------
    image : array ``(*batch, *spatial)``
        2D ``(ny, nx)`` or 3D ``(nz, ny, nx)`` images; complex images are stored as complex
        float, real ones as float. Each batch entry becomes one ISMRMRD image.
    name : str
        Image group inside the dataset.
    fov_mm : tuple of float, optional
        Field of view per spatial axis (image-axis order), mm.
    """
    ismrmrd = require("ismrmrd")
    arr = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    arr = arr.astype(np.complex64 if np.iscomplexobj(arr) else np.float32)
    n_sp = 3 if arr.ndim >= 3 and fov_mm is not None and len(fov_mm) == 3 else min(arr.ndim, 2)
    if arr.ndim < 2:
        raise ShapeError(f"image must be at least 2D, got shape {arr.shape}")
    if fov_mm is not None and len(fov_mm) == 3:
        n_sp = 3
    spatial = arr.shape[arr.ndim - n_sp :]
    frames = arr.reshape(-1, *spatial)
    ds = _open(path, dataset, create=True)
    try:
        for i, fr in enumerate(frames):
            img = ismrmrd.Image.from_array(np.ascontiguousarray(fr if n_sp == 3 else fr[None]))
            img.image_type = (
                ismrmrd.IMTYPE_COMPLEX if np.iscomplexobj(fr) else ismrmrd.IMTYPE_MAGNITUDE
            )
            img.image_index = i
            img.image_series_index = series_index
            if fov_mm is not None:
                fv = list(reversed([float(v) for v in fov_mm])) + [1.0] * (3 - len(fov_mm))
                img.field_of_view[:] = fv[:3]
            ds.append_image(name, img)
    finally:
        ds.close()
    return Path(path)


def read_mrd_images(
    path: str | Path, *, name: str = "image_0", dataset: str = "dataset"
) -> np.ndarray:
    """Read the images of group ``name`` back as an array ``(n_images, *spatial)`` (2D images
    come back as ``(n, ny, nx)``)."""
    ds = _open(path, dataset, create=False)
    try:
        n = ds.number_of_images(name)
        out = []
        for i in range(n):
            img = ds.read_image(name, i)
            d = np.asarray(img.data)  # (channels, z, y, x)
            d = d[0]
            out.append(d[0] if d.shape[0] == 1 else d)
    except DataFileError:
        raise
    except Exception as exc:
        raise DataFileError(f"{path}: cannot read images {name!r}: {exc}") from exc
    finally:
        ds.close()
    return np.stack(out)


__all__ = [
    "RawScan",
    "read_mrd",
    "write_mrd",
    "write_mrd_images",
    "read_mrd_images",
    "BATCH_COUNTERS",
]
