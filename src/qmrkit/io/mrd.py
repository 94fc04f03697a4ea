"""ISMRMRD / MRD HDF5 raw data in, images out (the ``ismrmrd`` package; optional extra ``mrd``).

:func:`scan_from_acquisitions` assembles the acquisitions of one dataset — read from a file by
:func:`read_mrd`, or streamed to the server — into a :class:`RawScan`: the XML header, k-space
``(*batch, coils, *k)`` (Cartesian data on the encoded grid, readout last; non-Cartesian samples
concatenated with their trajectory in cycles/pixel; 2D and 3D, stacks of spirals, MRF frames),
noise scans, parallel-imaging calibration lines, the encoding limits and the geometry.
:func:`write_mrd` writes a RawScan with a header built from it (:func:`header_for_scan`), so
write → read gives the same scan; :func:`write_mrd_images` / :func:`read_mrd_images` store
reconstructed images in the same format.

Spatial order inside qmrkit is ``(z, y, x)`` / ``(y, x)`` (ISMRMRD's ``kspace_encode_step_2``,
``kspace_encode_step_1``, readout); see :mod:`qmrkit.io.geometry` for NIfTI order and affines.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._optional import require
from .._progress import get_logger
from ..errors import DataFileError, OptionalDependencyError, ParameterError, ShapeError
from .geometry import ScanGeometry, nifti_affine

log = get_logger("io.mrd")

#: acquisition counters that become batch dimensions (in this order) when they take > 1 value
BATCH_COUNTERS = ("slice", "contrast", "repetition")


@dataclass
class RawScan:
    """Raw data of one scan, ready for reconstruction.

    Attributes
    ----------
    header : str
        ISMRMRD XML header (:func:`header_for_scan` builds one that agrees with the other fields).
    kdata : Tensor
        complex64 k-space. Cartesian: ``(*batch, coils, *k)`` on the encoded matrix (2D
        ``(ny, nx)`` or 3D ``(nz, ny, nx)``, readout last, zeros where nothing was acquired).
        Non-Cartesian: ``(*batch, coils, M)``.
    traj : Tensor or None
        ``(M, ndim)`` trajectory in cycles/pixel (x last: ``(..., ky, kx)`` order as the image
        axes; ``ndim`` equals the number of image axes), None for Cartesian data.
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
        Extra information (simulation truth, file path, ...). MR fingerprinting scans (one
        trajectory per frame) have ``frames`` and ``samples`` (per frame; ``kdata`` is
        ``(coils, frames·samples)``, frame-major), optionally ``samples_per_readout`` and the
        ``schedule``.
    recon_fov_mm : tuple of float
        Reconstruction field of view (mm), image-axis order; empty means ``fov_mm``.
    slice_thickness_mm : float or None
        2D scans: the slice thickness (the header's z field of view).
    geometry : ScanGeometry or None
        Position and orientation (LPS) from the acquisitions; None when they record none.
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
    recon_fov_mm: tuple[float, ...] = ()
    slice_thickness_mm: float | None = None
    geometry: ScanGeometry | None = None

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

    @property
    def image_size(self) -> tuple[int, ...]:
        """Size of the reconstructed image, array order (``recon_size`` or ``matrix_size``)."""
        return tuple(self.recon_size or self.matrix_size)

    @property
    def affine(self) -> np.ndarray:
        """4×4 NIfTI (RAS) affine of the reconstructed image in NIfTI order (x, y[, z]): voxel
        size = reconstruction FOV / matrix, directions and centre from :attr:`geometry` (see
        :mod:`qmrkit.io.geometry`)."""
        size = self.image_size
        fov = tuple(self.recon_fov_mm or self.fov_mm) or tuple(float(n) for n in size)
        voxel = [f / n for f, n in zip(fov, size, strict=True)]
        if len(size) == 2:
            size = (1, *size)
            voxel = [self.slice_thickness_mm or float(np.mean(voxel)), *voxel]
        return nifti_affine(size[::-1], voxel[::-1], self.geometry)

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
LIMIT_NAMES = (
    "kspace_encoding_step_1",
    "kspace_encoding_step_2",
    "slice",
    "contrast",
    "repetition",
    "average",
    "phase",
    "set",
    "segment",
)
#: userParameterString holding RF phases (degrees) of an MRF schedule: ISMRMRD's
#: sequenceParameters have TR, TE, TI and flip angles but no RF phase
RF_PHASE_PARAMETER = "qmrkit_rf_phase_deg"


#: largest matrix size per dimension, and voxels in all, that a header may declare: beyond this
#: it is a corrupt or hostile header, refused before anything is allocated for it
MAX_MATRIX_DIM = 4096
MAX_MATRIX_VOXELS = 1 << 28
#: largest k-space array (complex64 bytes) a scan may assemble to
MAX_KSPACE_BYTES = 16 << 30


def _check_matrix(path: str, what: str, size: Any) -> None:
    dims = [int(size.x), int(size.y), int(size.z)]
    if any(d < 1 or d > MAX_MATRIX_DIM for d in dims) or math.prod(dims) > MAX_MATRIX_VOXELS:
        raise DataFileError(
            f"{path}: the header's {what} matrix {tuple(dims)} (x, y, z) is not a scan's: each "
            f"size must be 1..{MAX_MATRIX_DIM} and {MAX_MATRIX_VOXELS} voxels at most"
        )


def _check_kspace_values(scan: RawScan, path: str) -> None:
    """Refuse k-space with NaN/Inf samples, or with no signal at all, with what was found (an
    FFT of NaNs fails deep in a library or returns NaN images without saying why)."""
    k = scan.kdata
    finite = torch.isfinite(torch.view_as_real(k)).all(dim=-1)
    n_bad = int((~finite).sum())
    if n_bad:
        raise DataFileError(
            f"{path}: k-space has {n_bad} non-finite (NaN or Inf) samples of {finite.numel()}"
        )
    if not bool((k != 0).any()):
        raise DataFileError(
            f"{path}: k-space is zero everywhere: there is no signal to reconstruct"
        )


def _limit(enc, name):
    lim = getattr(enc.encodingLimits, name, None) if enc.encodingLimits is not None else None
    if lim is None:
        return None
    return (int(lim.minimum), int(lim.center), int(lim.maximum))


def _parse_header(header_xml: str | bytes, source: str) -> tuple[str, Any]:
    ismrmrd = require("ismrmrd")
    try:
        xml = header_xml.decode() if isinstance(header_xml, bytes) else header_xml
        return xml, ismrmrd.xsd.CreateFromDocument(xml)
    except Exception as exc:
        raise DataFileError(
            f"{source}: the ISMRMRD XML header is missing or invalid: {exc}"
        ) from exc


def schedule_length(hdr: Any) -> int:
    """Number of MRF frames the header's sequenceParameters describe (one flipAngle_deg per TR;
    0 when it lists fewer than two flip angles, i.e. carries no MRF schedule)."""
    sp = getattr(hdr, "sequenceParameters", None)
    n = len(getattr(sp, "flipAngle_deg", None) or []) if sp is not None else 0
    return n if n >= 2 else 0


def _make_header(
    matrix_size: Sequence[int],
    recon_size: Sequence[int],
    fov_mm: Sequence[float],
    n_coils: int,
    trajectory: str,
    limits: dict[str, tuple[int, int, int]],
    *,
    recon_fov_mm: Sequence[float] | None = None,
    slice_thickness_mm: float | None = None,
    sequence: dict[str, list[float]] | None = None,
    base: str | None = None,
) -> str:
    """ISMRMRD XML header for one encoding (sizes and FOV in image-axis order).

    ``sequence`` (``TR``, ``TE``, ``TI``, ``flipAngle_deg`` lists, optionally ``rf_phase_deg``)
    becomes sequenceParameters; ``base`` (an existing header) keeps what is not described here
    (subject, study, measurement information, user parameters, other sequence settings).
    """
    x = require("ismrmrd").xsd
    nd = len(matrix_size)
    rfov = tuple(recon_fov_mm or fov_mm)
    if slice_thickness_mm is None and nd == 2:
        # no thickness known: isotropic voxels
        slice_thickness_mm = float(np.mean([f / n for f, n in zip(rfov, recon_size, strict=True)]))

    def space(size, fov):
        size3 = list(reversed(size)) + [1] * (3 - len(size))  # x, y, z
        fov3 = list(reversed(fov)) + [float(slice_thickness_mm or 0.0)] * (3 - len(fov))
        return x.encodingSpaceType(
            matrixSize=x.matrixSizeType(x=int(size3[0]), y=int(size3[1]), z=int(size3[2])),
            fieldOfView_mm=x.fieldOfViewMm(x=float(fov3[0]), y=float(fov3[1]), z=float(fov3[2])),
        )

    h = None
    if base:
        try:
            h = x.CreateFromDocument(base)
        except Exception:  # an empty or foreign header: build a fresh one
            h = None
    if h is None:
        h = x.ismrmrdHeader(
            experimentalConditions=x.experimentalConditionsType(
                H1resonanceFrequency_Hz=127_740_000
            ),
            encoding=[],
        )
    enc = (
        h.encoding[0]
        if h.encoding
        else x.encodingType(
            encodedSpace=None, reconSpace=None, encodingLimits=None, trajectory=None
        )
    )
    enc.encodedSpace = space(matrix_size, fov_mm)
    enc.reconSpace = space(recon_size, rfov)
    enc.encodingLimits = x.encodingLimitsType(
        **{
            name: x.limitType(minimum=int(lo), center=int(c), maximum=int(hi))
            for name, (lo, c, hi) in limits.items()
        }
    )
    enc.trajectory = x.trajectoryType(trajectory)
    h.encoding = [enc]
    if h.acquisitionSystemInformation is None:
        h.acquisitionSystemInformation = x.acquisitionSystemInformationType()
    h.acquisitionSystemInformation.receiverChannels = int(n_coils)
    if sequence is not None:
        _set_sequence(h, x, sequence)
    xml = x.ToXML(h) if hasattr(x, "ToXML") else h.toXML("utf-8")
    return xml.decode() if isinstance(xml, bytes) else xml


def _set_sequence(h: Any, x: Any, sequence: dict[str, list[float]]) -> None:
    sp = h.sequenceParameters or x.sequenceParametersType()
    for name in ("TR", "TE", "TI", "flipAngle_deg"):
        if name in sequence:
            setattr(sp, name, [float(v) for v in sequence[name]])
    h.sequenceParameters = sp
    phases = sequence.get("rf_phase_deg")
    up = h.userParameters
    if up is not None:
        up.userParameterString = [p for p in up.userParameterString if p.name != RF_PHASE_PARAMETER]
    if phases is not None:
        up = up or x.userParametersType()
        up.userParameterString.append(
            x.userParameterStringType(
                name=RF_PHASE_PARAMETER, value=",".join(repr(float(v)) for v in phases)
            )
        )
        h.userParameters = up


def _sequence_of(scan: RawScan) -> dict[str, list[float]] | None:
    """The MRF schedule of ``scan.meta`` as header sequence parameters (duck-typed: anything with
    ``header_parameters()``, e.g. :class:`qmrkit.mrf.Schedule`)."""
    sched = scan.meta.get("schedule")
    if sched is None or not hasattr(sched, "header_parameters"):
        return None
    return sched.header_parameters()


def header_for_scan(scan: RawScan) -> str:
    """The ISMRMRD header that describes ``scan`` as :func:`write_mrd` writes it: matrix, FOV,
    reconstruction space, slice thickness, trajectory type, encoding limits (see
    :func:`encoding_limits`), receiver channels and the MRF schedule of ``scan.meta``; the rest
    of ``scan.header`` (subject, measurement, ...) is kept."""
    return _make_header(
        scan.matrix_size,
        scan.image_size,
        scan.fov_mm,
        scan.n_coils,
        scan.trajectory,
        encoding_limits(scan),
        recon_fov_mm=scan.recon_fov_mm or None,
        slice_thickness_mm=scan.slice_thickness_mm,
        sequence=_sequence_of(scan),
        base=scan.header or None,
    )


def attach_header(scan: RawScan, *, strict: bool = True) -> RawScan:
    """Set ``scan.encoding_limits`` and ``scan.header`` to what :func:`write_mrd` will write, so an
    in-memory scan (e.g. from :mod:`qmrkit.sim`) and its file agree. Returns ``scan``.

    The XML needs the optional ``ismrmrd`` package; with ``strict=False`` a missing package
    leaves ``header`` empty (in-memory scans do not use it)."""
    scan.encoding_limits = encoding_limits(scan)
    try:
        scan.header = header_for_scan(scan)
    except OptionalDependencyError:
        if strict:
            raise
        scan.header = ""
    return scan


# ------------------------------------------------------------------------------ layout of a scan
@dataclass
class _Readouts:
    """How :func:`write_mrd` cuts a non-Cartesian scan into acquisitions (one per readout)."""

    n_read: int  # samples per readout
    step1: np.ndarray  # (n_readouts,) kspace_encode_step_1: readout index (within its frame)
    repetition: np.ndarray | None  # (n_readouts,) MRF frame, None when frames are not encoded
    partition: np.ndarray | None  # (n_readouts,) kspace_encode_step_2 of a stack (3D), or None
    partition_center: int


def _readouts(scan: RawScan) -> _Readouts:
    """Readout layout of a non-Cartesian scan.

    ``meta["samples_per_readout"]`` sets the readout length (default: the samples of a frame, or
    all). MRF frames (``meta["frames"]``) go into ``idx.repetition`` when the header describes as
    many TRs (the schedule in ``meta`` or ``sequenceParameters``), which is how
    :func:`scan_from_acquisitions` recognises them. 3D readouts at one kz on the partition grid
    (stack of spirals/stars) also get their partition index in ``kspace_encode_step_2``.
    """
    tr = scan.traj.detach().cpu().numpy().astype(np.float64)
    m = tr.shape[0]
    frames, per_frame = scan.meta.get("frames"), scan.meta.get("samples")
    if not (frames and per_frame and int(frames) * int(per_frame) == m):
        frames, per_frame = None, m
    n_read = int(scan.meta.get("samples_per_readout", per_frame))
    if n_read <= 0 or per_frame % n_read:
        raise ShapeError(f"{per_frame} samples per frame do not split into readouts of {n_read}")
    n_rd = m // n_read
    per = per_frame // n_read
    sched = scan.meta.get("schedule")
    n_sched = int(sched.n_tr) if hasattr(sched, "n_tr") else 0
    if not n_sched and scan.header:
        try:
            n_sched = schedule_length(_parse_header(scan.header, "header")[1])
        except (DataFileError, OptionalDependencyError):
            n_sched = 0
    encode_frames = frames is not None and int(frames) > 1 and n_sched == int(frames)
    step1 = np.arange(n_rd) % per if encode_frames else np.arange(n_rd)
    rep = np.arange(n_rd) // per if encode_frames else None
    partition, center = None, 0
    if scan.ndim == 3:
        nz = scan.matrix_size[0]
        center = int(scan.encoding_limits.get("kspace_encoding_step_2", (0, nz // 2, 0))[1])
        kz = tr[:, 0].reshape(n_rd, n_read) * nz  # cycles/FOV
        p = np.round(kz[:, 0])
        on_grid = np.abs(kz - p[:, None]).max() < 1e-3
        p = p.astype(int) + center
        if on_grid and p.min() >= 0 and p.max() < nz:
            partition = p
    return _Readouts(n_read, step1, rep, partition, center)


def encoding_limits(scan: RawScan) -> dict[str, tuple[int, int, int]]:
    """The encoding limits of ``scan`` as :func:`write_mrd` writes it: ``kspace_encoding_step_1``
    (phase-encoding lines, or readouts per frame), ``kspace_encoding_step_2`` (partitions of 3D
    Cartesian and stack-of-X scans), ``repetition`` (MRF frames); centres are kept from
    ``scan.encoding_limits`` where present, other counters are kept as they are."""
    out = dict(scan.encoding_limits)

    def put(name: str, hi: int, center: int) -> None:
        c = out.get(name, (0, center, 0))[1]
        out[name] = (0, int(c), int(hi))

    if scan.is_cartesian:
        put("kspace_encoding_step_1", scan.matrix_size[-2] - 1, scan.matrix_size[-2] // 2)
        if scan.ndim == 3:
            put("kspace_encoding_step_2", scan.matrix_size[0] - 1, scan.matrix_size[0] // 2)
        return out
    r = _readouts(scan)
    put("kspace_encoding_step_1", int(r.step1.max()), 0)
    out.pop("kspace_encoding_step_2", None)
    if r.partition is not None:
        out["kspace_encoding_step_2"] = (0, r.partition_center, scan.matrix_size[0] - 1)
    if r.repetition is not None:
        out["repetition"] = (0, 0, int(r.repetition.max()))
    elif "repetition" in out and out["repetition"][2] > 0:
        out.pop("repetition")  # frames not encoded: no repetitions in the file
    return out


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

    Layouts (matrix, FOV and trajectory type from the header's encoding):

    - Cartesian 2D/3D: lines placed by ``kspace_encode_step_1`` (and ``_step_2``).
    - Non-Cartesian 2D (radial, spiral): samples concatenated in acquisition order with their
      2-column trajectory.
    - Non-Cartesian 3D (matrix z > 1): either 3-column trajectories ``(kx, ky, kz)`` — kz is taken
      from the trajectory, and where the header has ``kspace_encoding_step_2`` limits each
      acquisition's partition index must agree with it — or, for a stack of spirals/stars with
      2-column in-plane trajectories, kz from the partition index:
      ``kz = (kspace_encode_step_2 − center) / nz`` cycles/pixel (the header must then give the
      ``kspace_encoding_step_2`` limits).
    - MR fingerprinting: when ``idx.repetition`` takes as many values as the header's
      sequenceParameters have flip angles, each repetition is one frame (one trajectory per TR);
      frames are concatenated in repetition order (acquisition order within a frame) and
      ``meta["frames"]``, ``meta["samples"]`` (per frame) are set. Without repetitions the frames
      are implied by the schedule (``samples = M / n_tr``).

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
        An invalid header, no imaging acquisitions, or acquisitions inconsistent with the header
        (trajectory dimensions vs matrix z, partition or line indices outside the encoding
        limits, unequal sample counts of frames or batch entries).
    """
    asm = ScanAssembler(header_xml, encoding=encoding, source=source)
    if len(acquisitions) == 0:
        raise DataFileError(f"{source}: the dataset has no acquisitions")
    for a in acquisitions:
        asm.add(a)
    return asm.finish()


class ScanAssembler:
    """Builds a :class:`RawScan` one acquisition at a time (what :func:`scan_from_acquisitions`
    does for a whole list): the server feeds it acquisitions as they arrive, so a session holds
    k-space, not a list of acquisitions plus k-space.

    Cartesian lines go straight into k-space: one ``(coils, *matrix)`` buffer per batch entry
    (slice/contrast/repetition), calibration-only lines into a second buffer created only when
    the first such line arrives. The acquisition objects are not kept, so a session's memory is
    its k-space (the full grid, zeros where lines are missing) instead of the lines, plus the
    grid, plus a same-size calibration grid at the end. Non-Cartesian acquisitions are kept until
    :meth:`finish` (their sample count is known only then) and assembled as before.

    Every check of :func:`scan_from_acquisitions` runs, in the same order and with the same
    messages, in :meth:`finish`; :meth:`add` refuses at once only what cannot be stored (a
    channel count different from the first acquisition's, k-space beyond
    :data:`MAX_KSPACE_BYTES`).

    Attributes
    ----------
    representatives : dict
        After :meth:`finish`: per batch-entry index tuple (``scan.batch_dims`` order), the header
        (``ismrmrd.AcquisitionHeader``) of the imaging readout nearest the k-space centre, whose
        position and directions an image of that entry takes.
    """

    def __init__(self, header_xml: str | bytes, *, encoding: int = 0, source: str = "stream"):
        self.xml, hdr = _parse_header(header_xml, source)
        self.source = source
        if not 0 <= encoding < len(hdr.encoding):
            raise DataFileError(
                f"{source}: encoding {encoding} requested, the header has {len(hdr.encoding)}"
            )
        self.hdr, self.encoding = hdr, encoding
        enc = hdr.encoding[encoding]
        self._em, self._rm = enc.encodedSpace.matrixSize, enc.reconSpace.matrixSize
        _check_matrix(source, "encoded", self._em)
        _check_matrix(source, "recon", self._rm)
        self.trajectory = str(getattr(enc.trajectory, "value", enc.trajectory))
        self.three_d = int(self._em.z) > 1
        em = self._em
        self.matrix = (int(em.z), int(em.y), int(em.x)) if self.three_d else (int(em.y), int(em.x))
        self.limits = {n: lim for n in LIMIT_NAMES if (lim := _limit(enc, n)) is not None}
        self._centre = tuple(
            self.limits.get(name, (0, 0, 0))[1]
            for name in ("kspace_encoding_step_1", "kspace_encoding_step_2")
        )
        ismrmrd = require("ismrmrd")
        self._noise_flag = ismrmrd.ACQ_IS_NOISE_MEASUREMENT
        self._cal_flag = ismrmrd.ACQ_IS_PARALLEL_CALIBRATION
        self._both_flag = ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING
        self._skip = (
            ismrmrd.ACQ_IS_NAVIGATION_DATA,
            ismrmrd.ACQ_IS_PHASECORR_DATA,
            ismrmrd.ACQ_IS_DUMMYSCAN_DATA,
        )
        self.n_acquisitions = 0  # everything added, noise and skipped ones included
        self.representatives: dict[tuple, Any] = {}
        self._noise: list[np.ndarray] = []
        self._first: Any = None  # the first imaging acquisition (geometry, channel count)
        self._n_c = 0
        self._counters: dict[str, set[int]] = {n: set() for n in BATCH_COUNTERS}
        self._steps: dict[str, list[int]] = {}  # counter -> [min, max] over imaging readouts
        self._nearest: dict[tuple, tuple[int, Any]] = {}  # full counter key -> (distance, head)
        # Cartesian: full counter key -> [kspace, calibration or None]; shared sampling masks
        self._entries: dict[tuple, list] = {}
        self._mask = self._cmask = None
        self._outside = False  # a line outside the matrix: reported by finish() after the checks
        self._kept: list[Any] = []  # non-Cartesian acquisitions, assembled in finish()

    def add(self, a: Any) -> None:
        """Take one ``ismrmrd.Acquisition`` (in acquisition order)."""
        self.n_acquisitions += 1
        if a.is_flag_set(self._noise_flag):
            self._noise.append(np.array(a.data, dtype=np.complex64))
            return
        if a.encoding_space_ref != self.encoding or any(a.is_flag_set(f) for f in self._skip):
            return
        n_c = int(a.active_channels)
        if self._first is None:
            self._first, self._n_c = a, n_c
        elif n_c != self._n_c:
            raise DataFileError(f"{self.source}: acquisitions have different channel counts")
        idx = a.idx
        key = tuple(int(getattr(idx, n)) for n in BATCH_COUNTERS)
        for n, v in zip(BATCH_COUNTERS, key, strict=True):
            self._counters[n].add(v)
        s1, s2 = int(idx.kspace_encode_step_1), int(idx.kspace_encode_step_2)
        for name, v in (("kspace_encode_step_1", s1), ("kspace_encode_step_2", s2)):
            lo_hi = self._steps.setdefault(name, [v, v])
            lo_hi[0], lo_hi[1] = min(lo_hi[0], v), max(lo_hi[1], v)
        d = abs(s1 - self._centre[0]) + abs(s2 - self._centre[1])
        if key not in self._nearest or d < self._nearest[key][0]:
            self._nearest[key] = (d, a.getHead())
        if self.trajectory == "cartesian":
            self._place(a, key, (s2, s1) if self.three_d else (s1,))
        else:
            self._kept.append(a)

    def _place(self, a: Any, key: tuple, pe: tuple[int, ...]) -> None:
        matrix, n_c = self.matrix, self._n_c
        if any(p >= m for p, m in zip(pe, matrix[:-1], strict=True)):
            self._outside = True  # finish() names the problem (limits, partitions, matrix)
            return
        entry = self._entries.get(key)
        if entry is None:
            nbytes = 8 * n_c * math.prod(matrix) * (len(self._entries) + 1)
            if nbytes > MAX_KSPACE_BYTES:
                raise DataFileError(
                    f"{self.source}: the acquisitions' counters and matrix {matrix} would "
                    f"assemble {nbytes / 2**30:.1f} GiB of k-space (limit "
                    f"{MAX_KSPACE_BYTES >> 30} GiB)"
                )
            entry = self._entries[key] = [np.zeros((n_c, *matrix), dtype=np.complex64), None]
            if self._mask is None:
                self._mask = np.zeros(matrix, dtype=bool)
                self._cmask = np.zeros(matrix, dtype=bool)
        nx = matrix[-1]
        d = np.asarray(a.data)
        if d.shape != (n_c, nx):
            # asymmetric echo / different readout length: centre it on center_sample
            full = np.zeros((n_c, nx), dtype=np.complex64)
            off = nx // 2 - int(a.center_sample)
            full[:, max(off, 0) : max(off, 0) + d.shape[1]] = d[:, : nx - max(off, 0)]
            d = full
        is_cal = a.is_flag_set(self._cal_flag)
        both = a.is_flag_set(self._both_flag)
        if is_cal and not both:
            if entry[1] is None:
                entry[1] = np.zeros((n_c, *matrix), dtype=np.complex64)
            entry[1][(slice(None), *pe)] = d
            self._cmask[pe] = True
        else:
            entry[0][(slice(None), *pe)] = d
            self._mask[pe] = True
            if both:
                self._cmask[pe] = True

    def finish(self) -> RawScan:
        """The assembled scan (the checks of :func:`scan_from_acquisitions` run here).

        Raises
        ------
        DataFileError
            No acquisitions or no imaging acquisitions, or acquisitions inconsistent with the
            header (see :func:`scan_from_acquisitions`).
        """
        path, em, rm = self.source, self._em, self._rm
        if self.n_acquisitions == 0:
            raise DataFileError(f"{path}: the dataset has no acquisitions")
        if self._first is None:
            raise DataFileError(f"{path}: no imaging acquisitions in encoding {self.encoding}")
        enc = self.hdr.encoding[self.encoding]
        ef, rf = enc.encodedSpace.fieldOfView_mm, enc.reconSpace.fieldOfView_mm

        def zyx(v, cast):
            return (cast(v.z), cast(v.y), cast(v.x)) if self.three_d else (cast(v.y), cast(v.x))

        scan = RawScan(
            header=self.xml,
            kdata=torch.empty(0),
            matrix_size=zyx(em, int),
            recon_size=zyx(rm, int),
            fov_mm=zyx(ef, float),
            recon_fov_mm=zyx(rf, float),
            slice_thickness_mm=None if self.three_d else float(rf.z),
            trajectory=self.trajectory,
            encoding_limits=self.limits,
            noise=(
                torch.from_numpy(np.concatenate(self._noise, axis=1).astype(np.complex64))
                if self._noise
                else None
            ),
            geometry=ScanGeometry.from_acquisition(self._first),
            meta={"path" if path != "stream" else "source": path},
        )
        self._noise = []
        self._check_steps(scan)
        acqs = self._kept  # emptied by _assemble_noncartesian as it copies
        frames = self.trajectory != "cartesian" and _mrf_frames(self.hdr, acqs, path)
        counters = tuple(n for n in BATCH_COUNTERS if not (frames and n == "repetition"))
        counts = {}
        for name in counters:
            vals = self._counters[name]
            if len(vals) > 1:
                counts[name] = max(vals) + 1
                if len(vals) != counts[name]:  # a gap: images of nothing, or a corrupt counter
                    raise DataFileError(
                        f"{path}: the {name} counter takes {len(vals)} values from 0 to "
                        f"{max(vals)}; {counts[name] - len(vals)} {name} indices in between have "
                        "no acquisitions"
                    )
        scan.batch_dims = tuple(counts)
        n_c = self._n_c
        # what assembly will allocate, from counters a client sets freely: refused before allocating
        per_entry = (
            math.prod(scan.matrix_size)
            if self.trajectory == "cartesian"
            else sum(int(a.number_of_samples) for a in acqs)
        )
        nbytes = 8 * n_c * per_entry * math.prod(counts.values())
        if nbytes > MAX_KSPACE_BYTES:
            raise DataFileError(
                f"{path}: the acquisitions' counters {counts} and matrix {scan.matrix_size} would "
                f"assemble {nbytes / 2**30:.1f} GiB of k-space (limit {MAX_KSPACE_BYTES >> 30} GiB)"
            )
        positions = [BATCH_COUNTERS.index(n) for n in scan.batch_dims]

        def reduce(full_key: tuple) -> tuple:
            return tuple(full_key[i] for i in positions)

        if self.trajectory == "cartesian":
            if self._outside:
                raise DataFileError(
                    f"{path}: encoding steps outside the matrix {scan.matrix_size} "
                    "(kspace_encode_step_1/_2)"
                )
            self._stack_cartesian(scan, tuple(counts.values()), reduce)
        else:

            def bidx(a):
                return tuple(int(getattr(a.idx, n)) for n in scan.batch_dims)

            _assemble_noncartesian(scan, acqs, tuple(counts.values()), bidx, n_c, path, frames)
        self._kept = []
        best: dict[tuple, tuple[int, Any]] = {}
        for full_key, (dist, head) in self._nearest.items():
            k = reduce(full_key)
            if k not in best or dist < best[k][0]:
                best[k] = (dist, head)
        self.representatives = {k: v[1] for k, v in best.items()}
        _check_kspace_values(scan, path)
        log.info(
            "read %s: %s %s, %d coils, kdata %s",
            path,
            self.trajectory,
            scan.matrix_size,
            n_c,
            tuple(scan.kdata.shape),
        )
        return scan

    def _check_steps(self, scan: RawScan) -> None:
        """Partition and line indices inside the matrix and the header's encoding limits."""
        path = self.source
        nz = scan.matrix_size[0] if scan.ndim == 3 else 1
        p_max = self._steps["kspace_encode_step_2"][1]
        if p_max >= nz:
            raise DataFileError(
                f"{path}: acquisitions have partition indices (kspace_encode_step_2) up to "
                f"{p_max} but the header's encoded matrix has z = {nz}"
                + (" (a 2D header for 3D data?)" if nz == 1 else "")
            )
        for name, counter in (
            ("kspace_encoding_step_1", "kspace_encode_step_1"),
            ("kspace_encoding_step_2", "kspace_encode_step_2"),
        ):
            lim = scan.encoding_limits.get(name)
            if lim is None:
                continue
            lo, hi = self._steps[counter]
            if lo < lim[0] or hi > lim[2]:
                raise DataFileError(
                    f"{path}: {counter} runs {lo}..{hi}, outside the header's encoding "
                    f"limits {lim[0]}..{lim[2]}"
                )

    def _stack_cartesian(self, scan: RawScan, batch_shape: tuple, reduce: Any) -> None:
        """Move the per-entry buffers into one ``(*batch, coils, *matrix)`` array, releasing each
        buffer as it is copied (peak: the result plus one entry)."""
        n_c, matrix = self._n_c, self.matrix
        any_cal = any(e[1] is not None for e in self._entries.values())
        if not batch_shape and len(self._entries) == 1:  # one entry: its buffers are the result
            k, cal = self._entries.popitem()[1]
            scan.kdata = torch.from_numpy(k)
            scan.mask = torch.from_numpy(self._mask)
            scan.calib = torch.from_numpy(cal) if cal is not None else None
            scan.calib_mask = torch.from_numpy(self._cmask) if self._cmask.any() else None
            return
        # np.zeros pages are committed as entries are copied in and each entry is released
        # right after, so the resident peak stays near one k-space plus one entry
        k = np.zeros((*batch_shape, n_c, *matrix), dtype=np.complex64)
        cal = np.zeros_like(k) if any_cal else None
        for full_key in list(self._entries):
            data, calib = self._entries.pop(full_key)
            b = reduce(full_key)
            k[b] = data
            if calib is not None:
                cal[b] = calib
            del data, calib
        scan.kdata = torch.from_numpy(k)
        scan.mask = torch.from_numpy(self._mask)
        scan.calib = torch.from_numpy(cal) if any_cal else None
        scan.calib_mask = torch.from_numpy(self._cmask) if self._cmask.any() else None


def _mrf_frames(hdr: Any, acqs: list, path: str) -> bool:
    """Whether the repetitions are MRF frames (as many as the header's schedule has TRs)."""
    n_sched = schedule_length(hdr)
    reps = {int(a.idx.repetition) for a in acqs}
    if not n_sched or len(reps) < 2:
        return False
    if len(reps) != n_sched or max(reps) != n_sched - 1:
        raise DataFileError(
            f"{path}: the header's MRF schedule has {n_sched} TRs but the acquisitions have "
            f"{len(reps)} repetitions (0..{max(reps)}); one frame per TR is expected"
        )
    return True


def _trajectory(scan: RawScan, a: Any, path: str) -> np.ndarray:
    """One acquisition's trajectory in ISMRMRD order and units, ``(samples, ndim)``:
    ``(kx, ky[, kz])`` in cycles/FOV, kz from the partition index for 2-column 3D data."""
    nd, d = scan.ndim, int(a.trajectory_dimensions)
    tr = np.asarray(a.traj, dtype=np.float64).reshape(-1, d) if d else np.zeros((0, 0))
    if nd == 2:
        if d != 2:
            raise DataFileError(
                f"{path}: the header's encoded matrix has z = 1 (2D) but the {scan.trajectory} "
                f"acquisitions carry {d}-dimensional trajectories"
                + (" (a 3D scan written with a 2D header?)" if d == 3 else "")
            )
        return tr
    lim = scan.encoding_limits.get("kspace_encoding_step_2")
    p = int(a.idx.kspace_encode_step_2)
    if d == 3:
        if lim is not None and np.abs(tr[:, 2] - (p - lim[1])).max() > 1e-3:
            raise DataFileError(
                f"{path}: partition index {p} (kspace_encode_step_2, centre {lim[1]}) disagrees "
                f"with the trajectory's kz = {tr[0, 2]:.3f} cycles/FOV"
            )
        return tr
    if d == 2 and lim is not None:
        return np.concatenate([tr, np.full((tr.shape[0], 1), float(p - lim[1]))], axis=1)
    raise DataFileError(
        f"{path}: the header's encoded matrix has z = {scan.matrix_size[0]} (3D) but the "
        f"{scan.trajectory} acquisitions carry {d}-dimensional trajectories"
        + (" and the header no kspace_encoding_step_2 limits to place partitions" if d == 2 else "")
    )


def _assemble_noncartesian(scan, acqs, batch_shape, bidx, n_c, path, frames) -> None:
    matrix = np.array(scan.matrix_size, dtype=np.float64)
    groups: dict[tuple, list] = {}
    for a in acqs:
        groups.setdefault(bidx(a), []).append(a)
    if frames:  # one trajectory per frame: concatenate in repetition order
        rep = {id(a): int(a.idx.repetition) for a in acqs}
        groups = {k: sorted(g, key=lambda a: rep[id(a)]) for k, g in groups.items()}
        per = {}
        for a in next(iter(groups.values())):
            per[rep[id(a)]] = per.get(rep[id(a)], 0) + int(a.number_of_samples)
        if len(set(per.values())) != 1:
            raise DataFileError(
                f"{path}: MRF frames have different sample counts ({sorted(set(per.values()))}); "
                "every frame needs the same readouts"
            )
        scan.meta["frames"], scan.meta["samples"] = len(per), next(iter(per.values()))
    first = next(iter(groups.values()))
    n_samples = {int(a.number_of_samples) for a in first}
    if len(n_samples) == 1:
        scan.meta["samples_per_readout"] = n_samples.pop()
    tr = np.concatenate([_trajectory(scan, a, path) for a in first], axis=0)
    # ISMRMRD: (kx, ky[, kz]) in cycles/FOV -> ours: (.., ky, kx) in cycles/pixel
    tr = tr[:, ::-1] / matrix
    tr = np.where(tr >= 0.5, tr - 1.0, tr)
    m = tr.shape[0]
    k = np.zeros((*batch_shape, n_c, m), dtype=np.complex64)
    # the groups hold the acquisitions from here on, and each acquisition is released once it is
    # copied, so the traced peak stays near one copy of the samples (not the list plus k-space)
    del first
    acqs.clear()
    for key in list(groups):
        grp = groups.pop(key)
        total = sum(int(a.number_of_samples) for a in grp)
        if total != m:
            raise DataFileError(
                f"{path}: batch entries have different sample counts ({total} vs {m})"
            )
        dst = k[(*key, slice(None), slice(None))]
        off = 0
        grp.reverse()
        while grp:  # each acquisition is dropped as soon as its samples are in k-space
            a = grp.pop()
            n = int(a.number_of_samples)
            dst[:, off : off + n] = a.data
            off += n
        del a
    scan.kdata = torch.from_numpy(k)
    scan.traj = torch.from_numpy(np.ascontiguousarray(tr)).to(torch.float32)


# ---------------------------------------------------------------------------------------- write
def write_mrd(path: str | Path, scan: RawScan, *, dataset: str = "dataset") -> Path:
    """Write a :class:`RawScan` as an ISMRMRD HDF5 file that :func:`read_mrd` reads back equal.

    The header is built from the scan (:func:`header_for_scan`: matrix, FOV, reconstruction
    space, trajectory, encoding limits, channels, the MRF schedule of ``scan.meta``), keeping the
    rest of ``scan.header``. Acquisitions: the noise scan first (ACQ_IS_NOISE_MEASUREMENT); then
    Cartesian lines (calibration-only lines flagged ACQ_IS_PARALLEL_CALIBRATION, imaging lines
    inside the calibration region ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING) or one acquisition per
    non-Cartesian readout (``meta["samples_per_readout"]``) with its trajectory (3 columns for 3D;
    partition index in ``kspace_encode_step_2`` for stacks, MRF frame in ``idx.repetition``).
    Every imaging acquisition carries ``scan.geometry`` (identity directions when None).
    Overwrites ``path``.
    """
    ismrmrd = require("ismrmrd")
    p = Path(path)
    if scan.batch_dims:
        raise ParameterError("write_mrd writes single-frame scans (no batch dimensions)")
    header = header_for_scan(scan)
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.exists():
        p.unlink()
    geometry = scan.geometry or ScanGeometry()
    counter = 0

    def append(ds, a) -> None:
        nonlocal counter
        a.scan_counter = counter
        counter += 1
        ds.append_acquisition(a)

    ds = _open(p, dataset, create=True)
    try:
        ds.write_xml_header(header)
        if scan.noise is not None:
            nz = scan.noise.numpy().astype(np.complex64)
            a = ismrmrd.Acquisition.from_array(np.ascontiguousarray(nz))
            a.set_flag(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)
            append(ds, a)
        writer = _cartesian_acquisitions if scan.is_cartesian else _noncartesian_acquisitions
        for a in writer(scan):
            geometry.write_to(a)
            append(ds, a)
    finally:
        ds.close()
    return p


def _cartesian_acquisitions(scan: RawScan):
    ismrmrd = require("ismrmrd")
    k = scan.kdata.numpy()
    three_d = scan.ndim == 3
    mask = scan.mask.numpy() if scan.mask is not None else np.abs(k).sum(0) > 0
    cmask = scan.calib_mask.numpy() if scan.calib_mask is not None else None
    cal = scan.calib.numpy() if scan.calib is not None else None
    lines = list(np.ndindex(*scan.matrix_size[:-1]))
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
            a.idx.kspace_encode_step_1 = int(pe[-1])
            if three_d:
                a.idx.kspace_encode_step_2 = int(pe[0])
            if is_cal_only:
                a.set_flag(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION)
            elif cmask is not None and cmask[(*pe, 0)]:
                a.set_flag(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING)
            if j == len(lines) - 1 and not is_cal_only:
                a.set_flag(ismrmrd.ACQ_LAST_IN_SLICE)
            yield a


def _noncartesian_acquisitions(scan: RawScan):
    ismrmrd = require("ismrmrd")
    k = scan.kdata.numpy()
    tr = scan.traj.detach().cpu().numpy().astype(np.float64)
    if tr.ndim != 2 or tr.shape[1] != scan.ndim:
        raise ShapeError(
            f"the trajectory has shape {tuple(tr.shape)}; a {scan.ndim}D scan (matrix "
            f"{scan.matrix_size}) needs (samples, {scan.ndim})"
        )
    r = _readouts(scan)
    # ours (.., ky, kx) cycles/pixel -> ISMRMRD (kx, ky[, kz]) cycles/FOV
    tr_i = (tr * np.array(scan.matrix_size))[:, ::-1].astype(np.float32)
    n = r.n_read
    for j in range(len(r.step1)):
        s = slice(j * n, (j + 1) * n)
        a = ismrmrd.Acquisition.from_array(
            np.ascontiguousarray(k[:, s]), np.ascontiguousarray(tr_i[s])
        )
        a.center_sample = 0 if scan.trajectory == "spiral" else n // 2
        a.idx.kspace_encode_step_1 = int(r.step1[j])
        if r.partition is not None:
            a.idx.kspace_encode_step_2 = int(r.partition[j])
        if r.repetition is not None:
            a.idx.repetition = int(r.repetition[j])
        yield a


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
    "scan_from_acquisitions",
    "header_for_scan",
    "attach_header",
    "encoding_limits",
    "schedule_length",
    "read_mrd",
    "write_mrd",
    "write_mrd_images",
    "read_mrd_images",
    "BATCH_COUNTERS",
    "ScanAssembler",
]
