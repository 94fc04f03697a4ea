"""DICOM image series in: a folder or a list of files → an image series in NIfTI order with its
RAS affine and the acquisition variable of every measurement (pydicom).

Reads classic single-frame MR (one file per image) and enhanced (multi-frame) MR, and the
Parametric Maps qmrkit writes. The images of one series are grouped by slice position along the
slice normal and, within a slice, sorted by the acquisition variable the model needs (inversion
time, echo time, flip angle or b-value); the result is ``(x, y[, z], n_meas)`` with x along the
DICOM rows (increasing column index) and y down the columns (increasing row index), i.e. the
pixel array transposed, exactly as :func:`qmrkit.io.load_nifti` returns a NIfTI series.

Geometry. DICOM patient coordinates are LPS; NIfTI world coordinates are RAS, so x and y change
sign (``diag(-1, -1, 1)``), as dcm2niix does. With ``r``/``c`` the row/column direction cosines of
ImageOrientationPatient (0020,0037), ``PixelSpacing = (Δrow, Δcol)`` and ``p_k`` the
ImagePositionPatient (0020,0032) of slice ``k``, voxel ``(i, j, k)`` lies at
``p_0 + i·Δcol·r + j·Δrow·c + k·(p_last − p_0)/(n_z − 1)`` (LPS), slices ordered along
``n = r × c``. dcm2niix additionally stores the rows bottom-up (it flips y and compensates in the
affine); the world position of every voxel is the same.

Units: times in ms, flip angles in degrees, b-values in ms/µm² (DICOM's s/mm² / 1000), gradient
directions as unit vectors in the DICOM patient frame (LPS).
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._optional import require
from ..errors import DicomError, ParameterError

log = logging.getLogger("qmrkit.io.dicom")

#: LPS (DICOM) → RAS (NIfTI)
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

#: Acquisition variables read per image, their unit, and where they are looked for (in order).
VARIABLES: dict[str, tuple[str, str]] = {
    "ti": (
        "ms",
        "InversionTime (0018,0082); InversionTimes (0018,9079) in the MR Modifier Sequence; "
        "'TI <number>' in ImageComments (0020,4000)",
    ),
    "te": ("ms", "EchoTime (0018,0081); EffectiveEchoTime (0018,9082) in the MR Echo Sequence"),
    "flip_angles": (
        "degrees",
        "FlipAngle (0018,1314), also in the MR Timing and Related Parameters Sequence",
    ),
    "tr": (
        "ms",
        "RepetitionTime (0018,0080), also in the MR Timing and Related Parameters Sequence",
    ),
    "b": (
        "ms/µm²",
        "DiffusionBValue (0018,9087), also in the MR Diffusion Sequence; Siemens (0019,xx0C) "
        "and CSA header B_value; GE (0043,xx39); Philips (2001,xx03)",
    ),
}

#: Variables a series can be sorted by (the others describe every image alike).
SORTABLE = ("ti", "te", "flip_angles", "b")

_PARAMETRIC_MAP = "1.2.840.10008.5.1.4.1.1.30"
_DICOMDIR = "1.2.840.10008.1.3.10"
_POSITION_TOL_MM = 0.01  # positions closer than this are the same slice / the same in-plane origin
_DIRECTION_TOL = 1e-4  # direction cosines equal to this (DS strings carry ~6-16 digits)
_TI_COMMENT = re.compile(r"\bTI\s*[:=]?\s*([0-9]+(?:\.[0-9]+)?)", re.IGNORECASE)


@dataclass
class DicomSeries:
    """One DICOM image series as qmrkit fits it.

    Attributes
    ----------
    data : ndarray, float32
        ``(x, y, n_meas)`` for one slice, ``(x, y, z, n_meas)`` for several; rescale
        slope/intercept (or a Parametric Map's real-world value mapping) applied.
    affine : (4, 4) ndarray
        Voxel-to-world matrix, NIfTI RAS, mm.
    values : dict of str -> ndarray
        Per-measurement acquisition variables found in every image and equal across slices:
        ``ti``, ``te``, ``tr`` (ms), ``flip_angles`` (degrees), ``b`` (ms/µm²), ``bvec``
        (``(n_meas, 3)`` unit vectors, LPS), in the order of the last axis of ``data``.
    sources : dict of str -> str
        For each entry of ``values``: the tag it was read from (e.g.
        ``"InversionTime (0018,0082)"``).
    sorted_by : str
        What ordered the measurements: a variable name (``"ti"``...) or ``"acquisition"``
        (InstanceNumber, then frame number).
    series_uid, series_description : str
        SeriesInstanceUID and SeriesDescription.
    files : list of Path
        The files read, in reading order.
    datasets : list of pydicom.Dataset
        Their headers (pixel data removed): the source of patient, study and frame of reference
        for maps written back as DICOM.
    unit : str or None
        The unit of the pixel values when the files state one (a Parametric Map's UCUM code).
    skipped : list of Path
        Files in the folder that were not DICOM images (a DICOMDIR, reports, other files).
    varying : dict of str -> str
        Variables present in every image but not usable as one value per measurement (they
        differ between slices), with the reason.
    """

    data: np.ndarray
    affine: np.ndarray
    values: dict[str, np.ndarray]
    sources: dict[str, str]
    sorted_by: str
    series_uid: str
    series_description: str
    files: list[Path]
    datasets: list[Any] = field(repr=False)
    unit: str | None = None
    skipped: list[Path] = field(default_factory=list, repr=False)
    varying: dict[str, str] = field(default_factory=dict)

    @property
    def reference(self) -> Any:
        """The first image's header: patient, study and frame of reference of the series."""
        return self.datasets[0]

    @property
    def n_measurements(self) -> int:
        return int(self.data.shape[-1])

    def settings(self, names: Iterable[str]) -> dict[str, Any]:
        """Acquisition settings for a model, read from the series.

        Parameters
        ----------
        names : iterable of str
            Setting names as the model registry uses them: ``ti``, ``te``, ``flip_angles``
            (lists, one value per measurement) and ``tr`` (one number, ms).

        Returns
        -------
        dict
            ``{"ti": [...], "tr": 15.0, ...}``.

        Raises
        ------
        DicomError
            A setting is not in the files (the message names the tags looked at), differs
            between slices, or (``tr``) differs between images.
        """
        out: dict[str, Any] = {}
        for name in names:
            if name not in VARIABLES:
                raise ParameterError(
                    f"unknown acquisition setting {name!r}; DICOM gives {sorted(VARIABLES)}"
                )
            if name in self.varying:
                raise DicomError(f"{_label(name)}: {self.varying[name]}")
            if name not in self.values:
                raise DicomError(
                    f"the DICOM series {self.series_uid} has no {_label(name)} in every image "
                    f"(looked for {VARIABLES[name][1]})"
                )
            v = self.values[name]
            if name == "tr":
                if not np.allclose(v, v[0], rtol=1e-4, atol=1e-3):
                    raise DicomError(
                        f"RepetitionTime differs between the images of series {self.series_uid} "
                        f"({_fmt(np.unique(v))} ms); give one --tr"
                    )
                out[name] = float(v[0])
            else:
                out[name] = [float(x) for x in v]
        return out

    def describe(self) -> str:
        """One line: series, size, slices, measurements and what sorted them."""
        shape = "x".join(str(n) for n in self.data.shape[:-1])
        n_z = self.data.shape[2] if self.data.ndim == 4 else 1
        text = (
            f"DICOM series {self.series_uid}"
            + (f" ({self.series_description!r})" if self.series_description else "")
            + f": {shape} voxels, {n_z} slice(s), {self.n_measurements} measurement(s)"
        )
        if self.sorted_by in self.values:
            v = self.values[self.sorted_by]
            unit = VARIABLES[self.sorted_by][0]
            text += f" sorted by {self.sources[self.sorted_by]}: {_fmt(v)} {unit}"
        else:
            text += " in acquisition order"
        return text


# -- public functions ---------------------------------------------------------------------------
def is_dicom(path: str | Path) -> bool:
    """True for a folder (read as a DICOM folder) or a file starting with the DICOM preamble
    (``DICM`` at byte 128) or named ``*.dcm``/``*.ima``."""
    p = Path(path)
    if p.is_dir():
        return True
    if p.suffix.lower() in (".dcm", ".ima", ".dicom"):
        return True
    try:
        with p.open("rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def read_dicom(
    source: str | Path | Sequence[str | Path],
    *,
    sort_by: str = "auto",
    fallback: str | None = None,
    series_uid: str | None = None,
) -> DicomSeries:
    """Read one DICOM image series into ``(x, y[, z], n_meas)`` with its RAS affine.

    Parameters
    ----------
    source : path or sequence of paths
        A folder (searched recursively; hidden files, DICOMDIR and non-image files skipped) or
        DICOM files.
    sort_by : str
        ``"ti"``, ``"te"``, ``"flip_angles"`` or ``"b"``: order the measurements of each slice
        by that variable (then by acquisition order); ``"acquisition"``: by InstanceNumber and
        frame number; ``"auto"`` (default): by the one variable of ``ti, te, flip_angles, b``
        that varies between images (the first that does, in that order), else acquisition order.
    fallback : str, optional
        When the images lack ``sort_by``, sort by this instead (e.g. ``"acquisition"`` when the
        values come from elsewhere) rather than raise.
    series_uid : str, optional
        The SeriesInstanceUID to read when the files hold several series.

    Returns
    -------
    DicomSeries

    Raises
    ------
    DicomError
        No DICOM images; several series (named, unless ``series_uid`` picks one); images
        without the sort variable (the tags looked at are named); different sizes, pixel
        spacings or orientations; slices with different numbers of images; uneven slice
        spacing; slices not stacked along their normal (gantry tilt); Siemens mosaics.
    DataFileError
        A file is missing or unreadable.
    """
    pydicom = require("pydicom")
    choices = ("auto", "acquisition", *SORTABLE)
    for name, value in (("sort_by", sort_by), ("fallback", fallback)):
        if value is not None and value not in choices:
            raise ParameterError(f"{name} must be one of {choices}, got {value!r}")
    paths, skipped, explicit = _list_files(source)
    headers = _read_headers(pydicom, paths, skipped, explicit)
    if not headers:
        where = source if isinstance(source, str | Path) else f"{len(paths)} file(s)"
        raise DicomError(
            f"no DICOM images in {where}: {len(skipped)} file(s) were not DICOM images"
            + (f" (e.g. {skipped[0]})" if skipped else "")
        )
    chosen = _choose_series(headers, series_uid)
    frames, datasets, unit = [], [], None
    for path in chosen:
        ds = _read_full(pydicom, path)
        new, u = _frames_of(ds, path)
        frames += new
        unit = unit or u
        for kw in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
            if kw in ds:
                delattr(ds, kw)  # keep headers only: the series' pixels are in the frames
        datasets.append(ds)
    series = _assemble(frames, sort_by, fallback)
    ref = datasets[0]
    return DicomSeries(
        data=series["data"],
        affine=series["affine"],
        values=series["values"],
        sources=series["sources"],
        sorted_by=series["sorted_by"],
        series_uid=str(ref.get("SeriesInstanceUID", "")),
        series_description=str(ref.get("SeriesDescription", "")),
        files=list(chosen),
        datasets=datasets,
        unit=unit,
        skipped=skipped,
        varying=series["varying"],
    )


def acquisition_values(ds: Any, frame: int | None = None) -> dict[str, tuple[Any, str]]:
    """The acquisition variables of one image: ``name -> (value, tag it came from)``.

    Parameters
    ----------
    ds : pydicom.Dataset
        A classic image, or an enhanced multi-frame image with ``frame`` (0-based).
    frame : int, optional
        Frame of an enhanced image (its per-frame functional groups, then the shared ones).

    Returns
    -------
    dict
        Keys among ``ti``, ``te``, ``tr`` (ms), ``flip_angles`` (degrees), ``b`` (ms/µm²) and
        ``bvec`` (unit 3-vector, LPS; zeros for b = 0 when no direction is stored). Variables
        not found are absent.
    """
    groups = _groups(ds, frame)
    out: dict[str, tuple[Any, str]] = {}

    def first(*candidates: tuple[Any, str]) -> tuple[Any, str] | None:
        for value, where in candidates:
            if value is not None:
                return value, where
        return None

    ti = first(
        (
            _num(_in_groups(groups, "MRModifierSequence", "InversionTimes", direct=False)),
            "InversionTimes (0018,9079) in the MR Modifier Sequence",
        ),
        (_num(ds.get("InversionTime")), "InversionTime (0018,0082)"),
        (_ti_from_comment(ds.get("ImageComments")), "ImageComments (0020,4000)"),
    )
    te = first(
        (
            _num(_in_groups(groups, "MREchoSequence", "EffectiveEchoTime", direct=False)),
            "EffectiveEchoTime (0018,9082) in the MR Echo Sequence",
        ),
        (_num(ds.get("EchoTime")), "EchoTime (0018,0081)"),
    )
    timing = "MRTimingAndRelatedParametersSequence"
    fa = first(
        (
            _num(_in_groups(groups, timing, "FlipAngle", direct=False)),
            "FlipAngle (0018,1314) in the MR Timing and Related Parameters Sequence",
        ),
        (_num(ds.get("FlipAngle")), "FlipAngle (0018,1314)"),
    )
    tr = first(
        (
            _num(_in_groups(groups, timing, "RepetitionTime", direct=False)),
            "RepetitionTime (0018,0080) in the MR Timing and Related Parameters Sequence",
        ),
        (_num(ds.get("RepetitionTime")), "RepetitionTime (0018,0080)"),
    )
    for name, found in (("ti", ti), ("te", te), ("flip_angles", fa), ("tr", tr)):
        if found is not None:
            out[name] = found
    b, g = _diffusion(ds, groups)
    if b is not None:
        out["b"] = (b[0] / 1000.0, b[1])  # s/mm² → ms/µm²
        if g is None and b[0] == 0:
            g = (np.zeros(3), "none (b = 0)")
        if g is not None:
            out["bvec"] = g
    return out


# -- reading files ------------------------------------------------------------------------------
def _list_files(source: Any) -> tuple[list[Path], list[Path], bool]:
    """(files to try, files skipped already, whether the files were named explicitly)."""
    from ..errors import DataFileError

    if isinstance(source, str | Path):
        p = Path(source)
        if not p.exists():
            raise DataFileError(f"DICOM folder or file not found: {p}")
        if p.is_dir():
            files = sorted(
                f
                for f in p.rglob("*")
                if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)
            )
            return files, [], False
        return [p], [], True
    files = [Path(s) for s in source]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise DataFileError(f"DICOM file(s) not found: {', '.join(missing[:5])}")
    if not files:
        raise DicomError("no DICOM files given (an empty list)")
    return files, [], True


def _read_headers(pydicom: Any, paths: list[Path], skipped: list[Path], explicit: bool) -> dict:
    """path -> header (no pixel data) for every DICOM image among ``paths``."""
    from ..errors import DataFileError

    headers = {}
    for p in paths:
        if p.name.upper() == "DICOMDIR":
            skipped.append(p)
            continue
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
        except pydicom.errors.InvalidDicomError:
            if explicit:
                raise DicomError(f"{p} is not a DICOM file (no DICM preamble)") from None
            skipped.append(p)
            continue
        except Exception as exc:  # truncated or corrupt files raise many types
            raise DataFileError(f"cannot read DICOM file {p}: {type(exc).__name__}: {exc}") from exc
        if str(ds.get("SOPClassUID", "")) == _DICOMDIR or "Rows" not in ds:
            if explicit:
                raise DicomError(f"{p} is not a DICOM image (no Rows/Columns: a report, DICOMDIR?)")
            skipped.append(p)
            continue
        headers[p] = ds
    return headers


def _choose_series(headers: dict, series_uid: str | None) -> list[Path]:
    by_uid: dict[str, list[Path]] = {}
    for p, ds in headers.items():
        by_uid.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append(p)

    def name(uid: str) -> str:
        ds = headers[by_uid[uid][0]]
        number = ds.get("SeriesNumber", "")
        text = str(ds.get("SeriesDescription", ""))
        return f"{uid} (series {number}, {text!r}, {len(by_uid[uid])} file(s))"

    if series_uid is not None:
        if series_uid not in by_uid:
            raise DicomError(
                f"no series {series_uid} among the DICOM files; found: "
                + "; ".join(name(u) for u in by_uid)
            )
        return by_uid[series_uid]
    if len(by_uid) > 1:
        raise DicomError(
            f"the DICOM files hold {len(by_uid)} series; give the files of one series or choose "
            "one by its SeriesInstanceUID (--series / series_uid=): "
            + "; ".join(name(u) for u in by_uid)
        )
    return next(iter(by_uid.values()))


def _read_full(pydicom: Any, path: Path) -> Any:
    from ..errors import DataFileError

    try:
        return pydicom.dcmread(path)
    except Exception as exc:
        raise DataFileError(f"cannot read DICOM file {path}: {type(exc).__name__}: {exc}") from exc


@dataclass
class _Frame:
    path: Path
    index: int  # frame number in its file
    order: tuple  # acquisition order
    iop: np.ndarray  # (6,) row then column direction cosines, LPS
    ipp: np.ndarray  # (3,) position of the first pixel, LPS mm
    spacing: tuple[float, float]  # PixelSpacing: between rows, between columns (mm)
    thickness: float | None  # SliceThickness, else SpacingBetweenSlices (mm)
    pixels: np.ndarray  # (rows, cols) float64, rescaled
    acq: dict[str, tuple[Any, str]]


def _frames_of(ds: Any, path: Path) -> tuple[list[_Frame], str | None]:
    """The 2D frames of one file, rescaled, with geometry and acquisition variables."""
    image_type = [str(v).upper() for v in _as_list(ds.get("ImageType"))]
    if "MOSAIC" in image_type:
        raise DicomError(
            f"{path} is a Siemens mosaic (ImageType MOSAIC); qmrkit does not unpack mosaics: "
            "convert the series with dcm2niix and fit the NIfTI"
        )
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise DicomError(
            f"{path} has {ds.SamplesPerPixel} samples per pixel "
            f"({ds.get('PhotometricInterpretation')}); qmrkit fits greyscale images"
        )
    try:
        pixels = np.asarray(ds.pixel_array)
    except Exception as exc:  # a compressed transfer syntax without its decoder, broken data
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "?")
        raise DicomError(
            f"cannot decode the pixel data of {path} (transfer syntax {ts}): "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    enhanced = "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds
    if n_frames > 1 and not enhanced:
        raise DicomError(
            f"{path} has {n_frames} frames but no functional groups (a classic multi-frame "
            "image): its per-frame geometry is unknown"
        )
    pixels = pixels.reshape(n_frames, int(ds.Rows), int(ds.Columns))
    pm = str(ds.get("SOPClassUID", "")) == _PARAMETRIC_MAP
    instance = _num(ds.get("InstanceNumber"))
    frames, unit = [], None
    for k in range(n_frames):
        groups = _groups(ds, k if enhanced else None)
        iop = _in_groups(groups, "PlaneOrientationSequence", "ImageOrientationPatient")
        ipp = _in_groups(groups, "PlanePositionSequence", "ImagePositionPatient")
        spacing = _in_groups(groups, "PixelMeasuresSequence", "PixelSpacing")
        where = f"{path}" + (f" frame {k + 1}" if n_frames > 1 else "")
        missing = [
            n
            for n, v in (
                ("ImageOrientationPatient (0020,0037)", iop),
                ("ImagePositionPatient (0020,0032)", ipp),
                ("PixelSpacing (0028,0030)", spacing),
            )
            if v is None or len(v) == 0
        ]
        if missing:
            raise DicomError(f"{where} has no {', '.join(missing)}: its geometry is unknown")
        between = _num(_in_groups(groups, "PixelMeasuresSequence", "SpacingBetweenSlices"))
        thick = _num(_in_groups(groups, "PixelMeasuresSequence", "SliceThickness"))
        slope, intercept = 1.0, 0.0
        if pm:
            rwv, unit_k = _real_world_mapping(groups, where)
            slope, intercept = rwv
            unit = unit or unit_k
        else:
            s = _num(_in_groups(groups, "PixelValueTransformationSequence", "RescaleSlope"))
            i = _num(_in_groups(groups, "PixelValueTransformationSequence", "RescaleIntercept"))
            slope = 1.0 if s is None else s
            intercept = 0.0 if i is None else i
        frames.append(
            _Frame(
                path=path,
                index=k,
                order=(instance if instance is not None else np.inf, k, str(path)),
                iop=np.asarray([float(v) for v in iop], dtype=np.float64),
                ipp=np.asarray([float(v) for v in ipp], dtype=np.float64),
                spacing=(float(spacing[0]), float(spacing[1])),
                # one slice: its thickness is the voxel's z size (several: their positions)
                thickness=thick if thick else between,
                pixels=pixels[k].astype(np.float64) * slope + intercept,
                acq=acquisition_values(ds, k if enhanced else None),
            )
        )
    return frames, unit


def _real_world_mapping(groups: list[Any], where: str) -> tuple[tuple[float, float], str | None]:
    """(slope, intercept) and UCUM unit of a Parametric Map frame's first real-world mapping."""
    for g in groups:
        seq = g.get("RealWorldValueMappingSequence")
        if not seq:
            continue
        m = seq[0]
        if "RealWorldValueSlope" not in m:
            raise DicomError(f"{where}: the real-world value mapping is a LUT; qmrkit reads slopes")
        unit = None
        if m.get("MeasurementUnitsCodeSequence"):
            unit = str(m.MeasurementUnitsCodeSequence[0].CodeValue)
        return (float(m.RealWorldValueSlope), float(m.get("RealWorldValueIntercept", 0.0))), unit
    return (1.0, 0.0), None


def _groups(ds: Any, frame: int | None) -> list[Any]:
    """Where frame attributes live, most specific first: the frame's functional groups, the
    shared ones, then the top-level dataset (classic images)."""
    out = []
    if frame is not None:
        per = ds.get("PerFrameFunctionalGroupsSequence")
        if per is not None and frame < len(per):
            out.append(per[frame])
        shared = ds.get("SharedFunctionalGroupsSequence")
        if shared:
            out.append(shared[0])
    out.append(ds)
    return out


def _items(g: Any, seq: str) -> list[Any]:
    s = g.get(seq) if g is not None else None
    return list(s) if s else []


def _in_groups(groups: list[Any], seq: str, keyword: str, *, direct: bool = True) -> Any:
    """``keyword`` from the first group's ``seq[0]`` that has it, else (``direct``) from a group
    itself (classic images keep e.g. PixelSpacing at the top level)."""
    for g in groups:
        for item in _items(g, seq):
            v = item.get(keyword)
            if v is not None and v != "":
                return v
    if not direct:
        return None
    for g in groups:
        v = g.get(keyword)
        if v is not None and v != "":
            return v
    return None


def _diffusion(ds: Any, groups: list[Any]) -> tuple[tuple[float, str] | None, Any]:
    """(b in s/mm², tag), (unit direction LPS, tag) from the standard and vendor tags."""
    b = g = None
    v = _num(_in_groups(groups, "MRDiffusionSequence", "DiffusionBValue"))
    if v is not None:
        b = (v, "DiffusionBValue (0018,9087)")
    for grp in groups:
        for item in _items(grp, "MRDiffusionSequence"):
            for d in _items(item, "DiffusionGradientDirectionSequence"):
                vec = _vec3(d.get("DiffusionGradientOrientation"))
                if vec is not None and g is None:
                    g = (vec, "DiffusionGradientOrientation (0018,9089)")
    vec = _vec3(ds.get("DiffusionGradientOrientation"))
    if g is None and vec is not None:
        g = (vec, "DiffusionGradientOrientation (0018,9089)")
    if b is None:
        v = _num(_private(ds, 0x0019, "SIEMENS MR HEADER", 0x0C))
        if v is not None:
            b = (v, "Siemens private (0019,xx0C) B_value")
            vec = _vec3(_private(ds, 0x0019, "SIEMENS MR HEADER", 0x0E))
            if g is None and vec is not None:
                g = (vec, "Siemens private (0019,xx0E) DiffusionGradientDirection")
    if b is None or g is None:
        csa = _siemens_csa(ds)
        if csa is not None:
            from nibabel.nicom import csareader

            v = _num(csareader.get_scalar(csa, "B_value"))
            if b is None and v is not None:
                b = (v, "Siemens CSA header B_value")
            vec = _vec3(csareader.get_vector(csa, "DiffusionGradientDirection", 3))
            if g is None and vec is not None and b is not None:
                g = (vec, "Siemens CSA header DiffusionGradientDirection")
    if b is None:
        raw = _private(ds, 0x0043, "GEMS_PARM_01", 0x39)
        v = _num(raw)
        if v is not None:
            # GE adds 10^9 to the b-value of multi-b scans (a flag, not part of the value)
            b = (v % 1e9, "GE private (0043,xx39) slop_int_6")
    if b is None:
        v = _num(_private(ds, 0x2001, "Philips Imaging DD 001", 0x03))
        if v is not None:
            b = (v, "Philips private (2001,xx03) diffusion B-factor")
    if g is not None:
        norm = np.linalg.norm(g[0])
        g = (g[0] / norm if norm > 0 else g[0], g[1])
    return b, g


def _siemens_csa(ds: Any) -> Any:
    if "SIEMENS" not in str(ds.get("Manufacturer", "")).upper():
        return None
    try:
        with warnings.catch_warnings():  # nibabel.nicom warns that its *readers* are experimental
            warnings.simplefilter("ignore")
            from nibabel.nicom import csareader

            return csareader.get_csa_header(ds, "image")
    except Exception as exc:  # a malformed CSA header is no reason to fail the read
        log.debug("unreadable Siemens CSA header: %s", exc)
        return None


def _private(ds: Any, group: int, creator: str, offset: int) -> Any:
    try:
        return ds.private_block(group, creator)[offset].value
    except (KeyError, ValueError):
        return None


def _ti_from_comment(text: Any) -> float | None:
    if not text:
        return None
    m = _TI_COMMENT.search(str(text))
    return float(m.group(1)) if m else None


def _as_list(v: Any) -> list[Any]:
    if v is None:
        return []
    if isinstance(v, str | bytes):
        return [v]
    try:
        return list(v)
    except TypeError:
        return [v]


def _num(v: Any) -> float | None:
    """A DICOM number (DS, IS, FD, FL, multi-valued: the first; bytes of a private tag) or None."""
    if v is None:
        return None
    if isinstance(v, bytes):
        v = v.decode("ascii", "ignore").strip("\0 ").split("\\")[0]
    vals = _as_list(v)
    if not vals:
        return None
    try:
        out = float(vals[0])
    except (TypeError, ValueError):
        return None
    return out if np.isfinite(out) else None


def _vec3(v: Any) -> np.ndarray | None:
    if v is None:
        return None
    if isinstance(v, bytes):
        if len(v) == 24:  # three FD values of an unknown private tag
            return np.frombuffer(v, dtype="<f8").astype(np.float64)
        return None
    vals = _as_list(v)
    if len(vals) != 3:
        return None
    try:
        return np.asarray([float(x) for x in vals], dtype=np.float64)
    except (TypeError, ValueError):
        return None


# -- assembling the series ----------------------------------------------------------------------
def _assemble(frames: list[_Frame], sort_by: str, fallback: str | None) -> dict[str, Any]:
    _check_same_grid(frames)
    f0 = frames[0]
    row, col = f0.iop[:3], f0.iop[3:]
    normal = np.cross(row, col)
    # slices: positions along the normal, clustered
    d = np.array([f.ipp @ normal for f in frames])
    order = np.argsort(d, kind="stable")
    slices: list[list[_Frame]] = []
    last = None
    for i in order:
        if last is None or d[i] - last > _POSITION_TOL_MM:
            slices.append([])
        slices[-1].append(frames[i])
        last = d[i]
    counts = [len(s) for s in slices]
    if len(set(counts)) > 1:
        detail = ", ".join(
            f"{c} at {s[0].ipp @ normal:.2f} mm" for c, s in zip(counts, slices, strict=True)
        )
        raise DicomError(
            f"the slices have different numbers of images ({detail} along the slice normal); "
            "a file is missing or two acquisitions are mixed in one series"
        )
    for s in slices:
        spread = max(np.linalg.norm(f.ipp - s[0].ipp) for f in s)
        if spread > _POSITION_TOL_MM:
            raise DicomError(
                f"images of one slice ({s[0].path.name}, ...) have ImagePositionPatient up to "
                f"{spread:.3f} mm apart in-plane: the field of view moved within the series"
            )
    key = _sort_key(slices[0], sort_by, fallback)
    for s in slices:
        if key != "acquisition":
            missing = [f for f in s if key not in f.acq]
            if missing:
                f = missing[0]
                raise DicomError(
                    f"{f.path}"
                    + (f" frame {f.index + 1}" if f.index else "")
                    + f" has no {_label(key)}; looked for {VARIABLES[key][1]}"
                )
        s.sort(key=lambda f: ((float(f.acq[key][0]),) if key != "acquisition" else ()) + f.order)
    n_meas = counts[0]
    values, sources, varying = _values(slices, n_meas, key)
    affine = _affine(slices, row, col, normal)
    rows, cols = f0.pixels.shape
    data = np.empty((cols, rows, len(slices), n_meas), dtype=np.float32)
    for k, s in enumerate(slices):
        for m, f in enumerate(s):
            data[:, :, k, m] = f.pixels.T  # (rows, cols) → NIfTI (x = column, y = row index)
    if len(slices) == 1:
        data = data[:, :, 0, :]
    return {
        "data": data,
        "affine": affine,
        "values": values,
        "sources": sources,
        "sorted_by": key,
        "varying": varying,
    }


def _sort_key(frames: list[_Frame], sort_by: str, fallback: str | None) -> str:
    if sort_by == "acquisition":
        return "acquisition"
    if sort_by != "auto":
        if all(sort_by in f.acq for f in frames) or fallback is None:
            return sort_by
        log.info("images lack %s; ordering them by %s", sort_by, fallback)
        return _sort_key(frames, fallback, None)
    for name in SORTABLE:
        if all(name in f.acq for f in frames):
            vals = {round(float(f.acq[name][0]), 6) for f in frames}
            if len(vals) > 1:
                return name
    return "acquisition"


def _values(
    slices: list[list[_Frame]], n_meas: int, key: str
) -> tuple[dict[str, np.ndarray], dict[str, str], dict[str, str]]:
    values, sources, varying = {}, {}, {}
    for name in (*VARIABLES, "bvec"):
        if not all(name in f.acq for s in slices for f in s):
            continue
        per_slice = np.array([[np.asarray(f.acq[name][0], float) for f in s] for s in slices])
        ref = per_slice[0]
        if not np.allclose(per_slice, ref[None], rtol=1e-4, atol=1e-3):
            k = int(np.argmax(np.abs(per_slice - ref[None]).reshape(len(slices), -1).max(1)))
            reason = (
                f"the values differ between slices (slice 1: {_fmt(ref)}, slice {k + 1}: "
                f"{_fmt(per_slice[k])}); slice-dependent values need one fit per slice"
            )
            if name == key:
                raise DicomError(f"{_label(name)}: {reason}")
            varying[name] = reason
            continue
        values[name] = ref.astype(np.float64)
        sources[name] = slices[0][0].acq[name][1]
    return values, sources, varying


def _check_same_grid(frames: list[_Frame]) -> None:
    f0 = frames[0]
    for f in frames[1:]:
        if f.pixels.shape != f0.pixels.shape:
            raise DicomError(
                f"image sizes differ: {f0.path.name} is {f0.pixels.shape[0]}x{f0.pixels.shape[1]} "
                f"(rows x columns), {f.path.name} is {f.pixels.shape[0]}x{f.pixels.shape[1]}"
            )
        if not np.allclose(f.spacing, f0.spacing, rtol=1e-4, atol=1e-4):
            raise DicomError(
                f"PixelSpacing differs: {f0.path.name} has {list(f0.spacing)} mm, "
                f"{f.path.name} has {list(f.spacing)} mm"
            )
        if not np.allclose(f.iop, f0.iop, atol=_DIRECTION_TOL):
            raise DicomError(
                f"ImageOrientationPatient differs between images: {f0.path.name} has "
                f"{_fmt(f0.iop)}, {f.path.name} has {_fmt(f.iop)}; the series is not one volume"
            )
    row, col = f0.iop[:3], f0.iop[3:]
    if (
        abs(np.linalg.norm(row) - 1) > 1e-3
        or abs(np.linalg.norm(col) - 1) > 1e-3
        or abs(row @ col) > 1e-3
    ):
        raise DicomError(
            f"ImageOrientationPatient {_fmt(f0.iop)} of {f0.path.name} is not two orthogonal unit "
            "vectors"
        )


def _affine(
    slices: list[list[_Frame]], row: np.ndarray, col: np.ndarray, normal: np.ndarray
) -> np.ndarray:
    f0 = slices[0][0]
    d_row, d_col = f0.spacing  # mm between rows (along col), between columns (along row)
    origins = np.array([s[0].ipp for s in slices])
    if len(slices) > 1:
        steps = np.diff(origins, axis=0)
        gaps = steps @ normal
        mean = float(gaps.mean())
        tol = max(1e-3, 1e-2 * abs(mean))
        if np.abs(gaps - mean).max() > tol:
            raise DicomError(
                f"uneven slice spacing: gaps {_fmt(gaps)} mm along the slice normal (tolerance "
                f"{tol:.3g} mm); a slice is missing or the series mixes stacks"
            )
        off = np.linalg.norm(steps - np.outer(gaps, normal), axis=1).max()
        if off > max(_POSITION_TOL_MM, 1e-3 * abs(mean)):
            raise DicomError(
                f"the slices are not stacked along their normal (offset {off:.3f} mm per slice: "
                "gantry tilt or a sheared stack); qmrkit does not resample such series"
            )
        z = (origins[-1] - origins[0]) / (len(slices) - 1)
    else:
        z = normal * (f0.thickness if f0.thickness else 1.0)
    lps = np.eye(4)
    lps[:3, 0] = row * d_col
    lps[:3, 1] = col * d_row
    lps[:3, 2] = z
    lps[:3, 3] = origins[0]
    return LPS_TO_RAS @ lps


def _label(name: str) -> str:
    return {
        "ti": "inversion times",
        "te": "echo times",
        "flip_angles": "flip angles",
        "tr": "repetition time",
        "b": "b-values",
        "bvec": "diffusion directions",
    }.get(name, name)


def _fmt(v: Any) -> str:
    a = np.asarray(v, dtype=float).ravel()
    text = ", ".join(f"{x:.6g}" for x in a[:12])
    return "[" + text + (", ..." if a.size > 12 else "") + "]"


__all__ = ["DicomSeries", "read_dicom", "acquisition_values", "is_dicom", "VARIABLES"]
