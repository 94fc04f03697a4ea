"""Parameter maps out as DICOM series: a Parametric Map (highdicom) with float pixels and a
real-world value mapping in UCUM units, and an MR image series with integer pixels and a rescale
slope for viewers without Parametric Map support; plus :func:`write_dicom_series`, an image
series exported as classic MR files (test data, demos, PACS round trips).

Every map becomes its own series (new SeriesInstanceUID and SOP Instance UIDs) in the study of
the input: patient, study and frame of reference are copied from the input DICOM (a
:class:`~qmrkit.io.dicom.DicomSeries` or pydicom datasets) or from an MRD header's subject and
study information; without either, a new study of an anonymous patient is made.

Geometry comes from the map's NIfTI affine (RAS, mm): NIfTI x runs along the DICOM rows
(ImageOrientationPatient's first vector), y down the columns, z across frames/files, and
positions change from RAS to LPS (x and y change sign) — the inverse of
:func:`qmrkit.io.read_dicom`, so writing then reading returns the same affine.

Voxels that were not fitted (NaN in the NIfTI map) are stored as 0 in both variants.
"""

from __future__ import annotations

import copy
import datetime
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._optional import require
from ..errors import DicomError, ParameterError, ShapeError
from .dicom import LPS_TO_RAS, DicomSeries

log = logging.getLogger("qmrkit.io.dicom")

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
PARAMETRIC_MAP_STORAGE = "1.2.840.10008.5.1.4.1.1.30"
KINDS = ("pmap", "mr")

#: qmrkit unit -> (UCUM code, code meaning) for the real-world value mapping
UCUM: dict[str, tuple[str, str]] = {
    "ms": ("ms", "millisecond"),
    "s": ("s", "second"),
    "1/s": ("s-1", "per second"),
    "s-1": ("s-1", "per second"),
    "µm²/ms": ("um2/ms", "square micrometer per millisecond"),
    "um2/ms": ("um2/ms", "square micrometer per millisecond"),
    "mm²/s": ("mm2/s", "square millimeter per second"),
    "ms/µm²": ("ms/um2", "millisecond per square micrometer"),
    "µm": ("um", "micrometer"),
    "mm": ("mm", "millimeter"),
    "degrees": ("deg", "degree"),
    "deg": ("deg", "degree"),
    "%": ("%", "percent"),
    "": ("1", "no units"),
    "1": ("1", "no units"),
    "fraction": ("1", "no units"),
    "a.u.": ("[arb'U]", "arbitrary unit"),
}

# copied from the input so that the maps file into the input's patient, study and frame of
# reference (Patient, General Study, Patient Study and Frame of Reference modules)
_COPIED = (
    "SpecificCharacterSet",
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyDescription",
    "FrameOfReferenceUID",
    "PositionReferenceIndicator",
    "PatientPosition",
    "BodyPartExamined",
    "Laterality",
    "MagneticFieldStrength",
)


def ucum(unit: str) -> tuple[str, str]:
    """UCUM code and meaning for a qmrkit unit (``"ms"`` → ``("ms", "millisecond")``).

    A unit outside :data:`UCUM` that UCUM cannot spell (``sqrt(µm²/ms)``, the unit of DTI's
    Cholesky parameters: UCUM has no fractional powers) becomes a UCUM *annotation*,
    ``{sqrt(um2/ms)}``: a valid code of dimension one whose text names the unit, rather than a
    wrong physical unit.

    Raises
    ------
    ParameterError
        For a unit that is not text, or has characters an annotation cannot hold (braces).
    """
    if unit in UCUM:
        return UCUM[unit]
    text = str(unit).replace("µ", "u").replace("²", "2").replace("³", "3")
    if not isinstance(unit, str) or not re.fullmatch(r"[\x21-\x7a\x7c\x7e ]+", text):
        raise ParameterError(
            f"no UCUM code for the unit {unit!r}: known units are {sorted(UCUM)}, others must be "
            "printable ASCII without braces (written as a UCUM annotation)"
        )
    # the code meaning is LO in the default character repertoire: ASCII only
    return "{" + text.replace(" ", "") + "}", f"{text} (no UCUM unit)"


@dataclass
class DicomMapSeries:
    """One DICOM series written for one map.

    Attributes
    ----------
    name : str
        The map's file stem (``"T1map"``).
    kind : str
        ``"pmap"`` (Parametric Map) or ``"mr"`` (MR images with a rescale slope).
    series_uid : str
        Its new SeriesInstanceUID.
    series_number : int
    description : str
        SeriesDescription: map name, unit and variant.
    files : list of Path
    unit : str
        UCUM code of the values.
    rescale : tuple of float or None
        ``(slope, intercept)`` of the MR variant; quantisation error ≤ slope / 2.
    """

    name: str
    kind: str
    series_uid: str
    series_number: int
    description: str
    files: list[Path] = field(default_factory=list)
    unit: str = ""
    rescale: tuple[float, float] | None = None


def write_dicom_maps(
    directory: str | Path,
    maps: Mapping[str, Any],
    *,
    units: Mapping[str, str] | None = None,
    affine: Any = None,
    reference: Any = None,
    kinds: Sequence[str] = KINDS,
    descriptions: Mapping[str, str] | None = None,
    derivation: str = "",
    series_number: int | None = None,
) -> list[DicomMapSeries]:
    """Write each map as DICOM: ``<directory>/<name>-pmap/<name>.dcm`` (one multi-frame
    Parametric Map) and ``<directory>/<name>-mr/<name>-NNNN.dcm`` (one MR image per slice).

    Parameters
    ----------
    directory : str or Path
        Output folder (created).
    maps : mapping of str -> array or Tensor
        Name (file stem, e.g. ``"T1map"``) → map in NIfTI order ``(x, y)`` or ``(x, y, z)``.
    units : mapping of str -> str, optional
        Name → qmrkit unit (``"ms"``, ``"1/s"``, ``"µm²/ms"``, ``""``...; see :data:`UCUM`).
    affine : (4, 4) array, optional
        The maps' NIfTI affine (RAS, mm); default: the reference series' affine, else identity.
        Its first two columns must be orthogonal (DICOM rows and columns are).
    reference : DicomSeries, pydicom Dataset(s), MRD header, or None
        Where patient, study and frame of reference come from: the input DICOM series (its
        images also become the Parametric Map's source images) or an MRD XML header
        (``subjectInformation``, ``studyInformation``, ``measurementInformation``).
    kinds : sequence of str
        ``"pmap"``, ``"mr"`` or both.
    descriptions : mapping of str -> str, optional
        Name → a phrase for the series description (default: the name).
    derivation : str
        How the maps were made (DerivationDescription, e.g. ``"qmrkit molli fit (lm)"``).
    series_number : int, optional
        Number of the first new series (default: the reference's SeriesNumber × 100 + 1, else
        9001); each further series gets the next number.

    Returns
    -------
    list of DicomMapSeries
        One per map and kind, in the order written.
    """
    pydicom = require("pydicom")
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ParameterError(f"kinds must be among {KINDS}, got {list(kinds)}")
    units = dict(units or {})
    for name in maps:
        ucum(units.get(name, ""))  # unknown units fail before anything is written
    sources, ref = _reference(pydicom, reference)
    if affine is None:
        affine = reference.affine if isinstance(reference, DicomSeries) else np.eye(4)
    geometry = _Geometry.from_affine(np.asarray(affine, dtype=np.float64))
    number = series_number or (int(ref.get("SeriesNumber") or 0) * 100 + 1 if sources else 9001)
    out = Path(directory)
    written: list[DicomMapSeries] = []
    for name, value in maps.items():
        arr = _as_map(value, name)
        unit = units.get(name, "")
        what = (descriptions or {}).get(name, name)
        for kind in kinds:
            folder = out / f"{name}-{kind}"
            folder.mkdir(parents=True, exist_ok=True)
            code = ucum(unit)[0]
            desc = f"{what} [{code}] qmrkit" + (" PMAP" if kind == "pmap" else " MR")
            s = DicomMapSeries(
                name=name,
                kind=kind,
                series_uid=pydicom.uid.generate_uid(),
                series_number=number,
                description=desc[:64],
                unit=code,
            )
            if kind == "pmap":
                _write_pmap(pydicom, folder, s, arr, unit, geometry, sources, ref, derivation)
            else:
                _write_mr(pydicom, folder, s, arr, geometry, ref, derivation, derived=True)
            written.append(s)
            number += 1
            log.info("wrote %s series %s (%d file(s))", kind, s.description, len(s.files))
    return written


def write_dicom_series(
    directory: str | Path,
    series: Any,
    *,
    affine: Any = None,
    ti: Sequence[float] | None = None,
    te: Sequence[float] | None = None,
    flip_angles: Sequence[float] | None = None,
    tr: float | None = None,
    reference: Any = None,
    description: str = "qmrkit series",
    patient_name: str = "",
    patient_id: str = "",
) -> list[Path]:
    """Export an image series as classic MR DICOM: one file per slice and measurement, integer
    pixels with a rescale slope, each image carrying its InversionTime / EchoTime / FlipAngle.

    Parameters
    ----------
    directory : str or Path
        Output folder (created); files ``IM-<slice>-<measurement>.dcm``.
    series : array or Tensor
        ``(x, y[, z], n_meas)`` in NIfTI order (as :func:`qmrkit.io.load_nifti` returns it).
    affine : (4, 4) array, optional
        NIfTI affine (RAS, mm); identity if absent.
    ti, te, flip_angles : sequence of float, optional
        Per-measurement inversion times (ms), echo times (ms), flip angles (degrees).
    tr : float, optional
        Repetition time (ms), the same for every image.
    reference : optional
        Patient/study source, as in :func:`write_dicom_maps`.
    description : str
        SeriesDescription.
    patient_name, patient_id : str
        Used when no ``reference`` gives a patient.

    Returns
    -------
    list of Path
        The files written.
    """
    pydicom = require("pydicom")
    arr = series.detach().cpu().numpy() if isinstance(series, torch.Tensor) else np.asarray(series)
    if arr.ndim not in (3, 4):
        raise ShapeError(
            f"series must be (x, y, n_meas) or (x, y, z, n_meas), got shape {arr.shape}"
        )
    n = arr.shape[-1]
    per_image = {}
    for key, vals in (("InversionTime", ti), ("EchoTime", te), ("FlipAngle", flip_angles)):
        if vals is not None:
            v = [float(x) for x in np.ravel(vals)]
            if len(v) != n:
                raise ShapeError(f"{key}: {len(v)} values for {n} measurements (last axis)")
            per_image[key] = v
    _, ref = _reference(pydicom, reference)
    if reference is None:
        ref.PatientName, ref.PatientID = patient_name, patient_id
    geometry = _Geometry.from_affine(
        np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    )
    s = DicomMapSeries(
        name="series",
        kind="mr",
        series_uid=pydicom.uid.generate_uid(),
        series_number=int(ref.get("SeriesNumber") or 1),
        description=description[:64],
    )
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    # one slope for the whole series, so that every image has the same scaling
    finite = arr[np.isfinite(arr)]
    scaling = _Quantiser.for_values(finite)
    for m in range(n):
        extra = {k: v[m] for k, v in per_image.items()}
        if tr is not None:
            extra["RepetitionTime"] = float(tr)
        _write_mr(
            pydicom,
            out,
            s,
            arr[..., m],
            geometry,
            ref,
            "",
            derived=False,
            acquisition=extra,
            quantiser=scaling,
            stem=f"IM-m{m + 1:03d}",
            first_instance=m * (arr.shape[2] if arr.ndim == 4 else 1) + 1,
        )
    return s.files


# -- geometry -----------------------------------------------------------------------------------
@dataclass
class _Geometry:
    """DICOM plane geometry of NIfTI-order maps (LPS)."""

    iop: list[float]  # row (x) then column (y) direction cosines
    spacing: list[float]  # PixelSpacing: between rows (y), between columns (x), mm
    z: np.ndarray  # LPS step between slices (mm)
    origin: np.ndarray  # LPS position of voxel (0, 0, 0)

    @classmethod
    def from_affine(cls, affine: np.ndarray) -> _Geometry:
        if affine.shape != (4, 4):
            raise ShapeError(f"affine must be 4x4, got shape {affine.shape}")
        lps = LPS_TO_RAS @ affine  # the flip is its own inverse
        cx, cy = lps[:3, 0], lps[:3, 1]
        dx, dy = float(np.linalg.norm(cx)), float(np.linalg.norm(cy))
        if dx == 0 or dy == 0 or abs(cx @ cy) > 1e-4 * dx * dy:
            raise DicomError(
                "the maps' affine has non-orthogonal or zero in-plane axes "
                f"({np.round(affine[:3, :2].T, 4).tolist()}); DICOM rows and columns are "
                "orthogonal, so such maps cannot be written as DICOM images"
            )
        return cls(
            iop=[*(cx / dx).tolist(), *(cy / dy).tolist()],
            spacing=[dy, dx],
            z=lps[:3, 2].copy(),
            origin=lps[:3, 3].copy(),
        )

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.iop[:3], self.iop[3:])

    @property
    def thickness(self) -> float:
        return float(np.linalg.norm(self.z)) or 1.0

    def position(self, k: int) -> list[float]:
        return (self.origin + k * self.z).tolist()


def _as_map(value: Any, name: str) -> np.ndarray:
    arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise ShapeError(f"map {name!r} must be (x, y) or (x, y, z), got shape {arr.shape}")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    return arr.astype(np.float32)


def _frames(arr: np.ndarray) -> np.ndarray:
    """(x, y, z) NIfTI order → (z, rows = y, cols = x) DICOM frames, NaN → 0."""
    frames = np.ascontiguousarray(np.transpose(arr, (2, 1, 0)))
    return np.where(np.isfinite(frames), frames, 0).astype(np.float32)


def _voi_function(width: float) -> str:
    """LINEAR_EXACT for windows narrower than 1 (maps of fractions, diffusivities in µm²/ms):
    plain LINEAR is defined for widths of at least 1 only."""
    return "LINEAR" if width >= 1 else "LINEAR_EXACT"


def _window(frames: np.ndarray) -> tuple[float, float]:
    vals = frames[frames != 0]
    if vals.size == 0:
        return 0.5, 1.0
    lo, hi = np.percentile(vals, [1, 99])
    return float((lo + hi) / 2), float(max(hi - lo, 1e-6 * max(abs(hi), 1.0), 1e-12))


# -- patient, study, frame of reference ---------------------------------------------------------
def _reference(pydicom: Any, reference: Any) -> tuple[list[Any], Any]:
    """(source image datasets, one dataset holding the patient/study attributes to copy)."""
    if isinstance(reference, DicomSeries):
        return list(reference.datasets), reference.reference
    if isinstance(reference, pydicom.Dataset):
        return [reference], reference
    if isinstance(reference, Sequence) and reference and isinstance(reference[0], pydicom.Dataset):
        return list(reference), reference[0]
    ds = pydicom.Dataset()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "", "", "", ""
    ds.StudyInstanceUID = pydicom.uid.generate_uid()
    ds.FrameOfReferenceUID = pydicom.uid.generate_uid()
    ds.StudyDate, ds.StudyTime = _now()
    ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "", "", ""
    if reference is not None:
        _from_mrd_header(ds, reference)
    return [], ds


def _from_mrd_header(ds: Any, header: Any) -> None:
    """Copy an MRD header's subject, study and frame of reference into ``ds``."""
    if isinstance(header, str | bytes):
        xsd = require("ismrmrd").xsd
        try:
            text = header.decode() if isinstance(header, bytes) else header
            header = xsd.CreateFromDocument(text)
        except Exception as exc:
            raise ParameterError(f"reference is not an MRD XML header: {exc}") from exc
    if not hasattr(header, "encoding"):
        raise ParameterError(
            "reference must be a DicomSeries, pydicom Dataset(s) or an MRD header, got "
            f"{type(header).__name__}"
        )
    subj = getattr(header, "subjectInformation", None)
    if subj is not None:
        _set(ds, "PatientName", getattr(subj, "patientName", None))
        _set(ds, "PatientID", getattr(subj, "patientID", None))
        _set(ds, "PatientBirthDate", _da(getattr(subj, "patientBirthdate", None)))
        sex = getattr(subj, "patientGender", None)
        _set(ds, "PatientSex", None if sex is None else str(getattr(sex, "value", sex)))
        w = getattr(subj, "patientWeight_kg", None)
        _set(ds, "PatientWeight", None if w is None else f"{float(w):.6g}")
    study = getattr(header, "studyInformation", None)
    if study is not None:
        _set_uid(ds, "StudyInstanceUID", getattr(study, "studyInstanceUID", None))
        _set(ds, "StudyDate", _da(getattr(study, "studyDate", None)))
        _set(ds, "StudyTime", _tm(getattr(study, "studyTime", None)))
        _set(ds, "StudyID", getattr(study, "studyID", None))
        _set(ds, "AccessionNumber", getattr(study, "accessionNumber", None))
        _set(ds, "ReferringPhysicianName", getattr(study, "referringPhysicianName", None))
        _set(ds, "StudyDescription", getattr(study, "studyDescription", None))
    meas = getattr(header, "measurementInformation", None)
    if meas is not None:
        _set_uid(ds, "FrameOfReferenceUID", getattr(meas, "frameOfReferenceUID", None))
        pos = getattr(meas, "patientPosition", None)
        _set(ds, "PatientPosition", None if pos is None else str(getattr(pos, "value", pos)))
    system = getattr(header, "acquisitionSystemInformation", None)
    field_t = getattr(system, "systemFieldStrength_T", None) if system is not None else None
    _set(ds, "MagneticFieldStrength", None if field_t is None else f"{float(field_t):.6g}")
    if any(v.VR in ("PN", "LO", "SH", "ST", "LT", "UT") and not str(v.value).isascii() for v in ds):
        ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8 names from the MRD header


_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")


def _set_uid(ds: Any, keyword: str, value: Any) -> None:
    """Copy a UID from an MRD header; a value that is not a DICOM UID (MRD headers often hold
    a text such as ``"FOR-1"``) becomes a UID derived from it, so every map of that study or
    frame of reference still shares one valid UID, and a PACS gets no invalid UI value."""
    if value is None or str(value).strip() == "":
        return
    text = str(value).strip()
    if len(text) <= 64 and _UID.fullmatch(text):
        setattr(ds, keyword, text)
        return
    pydicom = require("pydicom")
    uid = pydicom.uid.generate_uid(entropy_srcs=[keyword, text])
    log.info("%s %r in the MRD header is not a DICOM UID; using %s", keyword, text[:64], uid)
    setattr(ds, keyword, uid)


def _set(ds: Any, keyword: str, value: Any) -> None:
    if value is not None and str(value) != "":
        setattr(ds, keyword, str(value))


def _da(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, datetime.date):
        return value.strftime("%Y%m%d")
    text = re.sub(r"[^0-9]", "", str(value))[:8]
    return text or None


def _tm(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, datetime.time):
        return value.strftime("%H%M%S")
    text = re.sub(r"[^0-9.]", "", str(value).split("+")[0])
    return text or None


def _now() -> tuple[str, str]:
    now = datetime.datetime.now()
    return now.strftime("%Y%m%d"), now.strftime("%H%M%S")


# -- Parametric Map ------------------------------------------------------------------------------
def _write_pmap(
    pydicom: Any,
    folder: Path,
    s: DicomMapSeries,
    arr: np.ndarray,
    unit: str,
    g: _Geometry,
    sources: list[Any],
    ref: Any,
    derivation: str,
) -> None:
    hd = require("highdicom")
    from pydicom.sr.coding import Code

    from .. import __version__

    frames = _frames(arr)
    n_z = frames.shape[0]
    code, meaning = ucum(unit)
    mapping = hd.pm.RealWorldValueMapping(
        lut_label=re.sub(r"[^A-Za-z0-9_]", "_", s.name)[:16],
        lut_explanation=f"{s.name} in {code}"[:64],
        unit=Code(code, "UCUM", meaning),
        value_range=(float(frames.min()), float(frames.max())),
        slope=1.0,  # the stored floats are the values: an identity mapping that carries the unit
        intercept=0.0,
    )
    centre, width = _window(frames)
    synthetic = not sources
    if synthetic:
        sources = [_pseudo_source(pydicom, ref, frames.shape[1:], g)]
    else:
        sources = [_with_thickness(ds, g) for ds in sources]
    date, time = _now()
    pm = hd.pm.ParametricMap(
        source_images=sources,
        pixel_array=frames,
        series_instance_uid=s.series_uid,
        series_number=s.series_number,
        sop_instance_uid=pydicom.uid.generate_uid(),
        instance_number=1,
        manufacturer="qmrkit",
        manufacturer_model_name="qmrkit",
        software_versions=__version__,
        device_serial_number="0",
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[
            hd.VOILUTTransformation(
                window_center=centre, window_width=width, voi_lut_function=_voi_function(width)
            )
        ],
        content_description=(derivation or f"{s.name} computed by qmrkit")[:64],
        content_label=_cs(s.name),
        pixel_measures=hd.PixelMeasuresSequence(
            pixel_spacing=g.spacing,
            slice_thickness=g.thickness,
            # given for one slice too: highdicom would otherwise write 1 mm
            spacing_between_slices=g.thickness,
        ),
        plane_orientation=hd.PlaneOrientationSequence("PATIENT", g.iop),
        plane_positions=[hd.PlanePositionSequence("PATIENT", g.position(k)) for k in range(n_z)],
        series_description=s.description,
        series_date=date,
        series_time=time,
        content_date=date,
        content_time=time,
    )
    if synthetic:
        # the stand-in source image does not exist: reference nothing rather than a phantom
        for kw in ("ReferencedSeriesSequence", "SourceImageSequence"):
            if kw in pm:
                delattr(pm, kw)
        for item in pm.PerFrameFunctionalGroupsSequence:
            if "DerivationImageSequence" in item:
                item.DerivationImageSequence = []
    for kw in ("PatientPosition", "BodyPartExamined", "Laterality"):
        if kw not in pm:  # Type 2C/3 in General Series: copied, or empty (unknown)
            setattr(pm, kw, ref.get(kw, ""))
    path = folder / f"{s.name}.dcm"
    pm.save_as(path, enforce_file_format=True)
    s.files.append(path)


def _with_thickness(ds: Any, g: _Geometry) -> Any:
    """A source image as highdicom reads it: it takes SliceThickness of single-frame sources
    (Type 2, may be absent or empty in real files) and the pixel measures and orientation of
    multi-frame sources from their *shared* functional groups (vendors often put them per
    frame). Where that is missing, a copy gets them (the maps' thickness; frame 1's groups)."""
    per = ds.get("PerFrameFunctionalGroupsSequence")
    if per is None:
        if ds.get("SliceThickness") not in (None, ""):
            return ds
        ds = copy.deepcopy(ds)  # a shallow pydicom copy shares its elements with the caller's
        ds.SliceThickness = _ds(g.thickness)
        return ds
    shared = (ds.get("SharedFunctionalGroupsSequence") or [None])[0]
    wanted = ("PixelMeasuresSequence", "PlaneOrientationSequence")
    if shared is not None and all(kw in shared for kw in wanted):
        return ds
    pydicom = require("pydicom")
    ds = copy.deepcopy(ds)
    item = pydicom.Dataset() if shared is None else ds.SharedFunctionalGroupsSequence[0]
    per = ds.PerFrameFunctionalGroupsSequence
    for kw in wanted:
        if kw not in item and len(per) and kw in per[0]:
            item[kw] = per[0][kw]
    ds.SharedFunctionalGroupsSequence = [item]
    return ds


def _pseudo_source(pydicom: Any, ref: Any, shape: tuple[int, int], g: _Geometry) -> Any:
    """A header-only MR 'source image' carrying patient, study and frame of reference, for
    highdicom when the maps did not come from DICOM (its reference is removed after)."""
    ds = pydicom.Dataset()
    for kw in _COPIED:
        if kw in ref:
            setattr(ds, kw, ref.get(kw))
    for kw in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyID"):
        if kw not in ds:
            setattr(ds, kw, "")
    for kw in ("AccessionNumber", "StudyDate", "StudyTime", "ReferringPhysicianName"):
        if kw not in ds:
            setattr(ds, kw, "")
    ds.SOPClassUID = MR_IMAGE_STORAGE
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    ds.Modality = "MR"
    ds.Rows, ds.Columns = int(shape[0]), int(shape[1])
    ds.ImageOrientationPatient = [_ds(v) for v in g.iop]  # highdicom wants a patient geometry
    ds.ImagePositionPatient = [_ds(v) for v in g.position(0)]
    ds.PixelSpacing = [_ds(v) for v in g.spacing]
    ds.SliceThickness = _ds(g.thickness)
    return ds


# -- MR images with a rescale slope -------------------------------------------------------------
@dataclass
class _Quantiser:
    """Integer pixels with ``value = stored · slope`` (intercept 0, so 0 stays exactly 0)."""

    slope: float
    signed: bool

    @classmethod
    def for_values(cls, finite: np.ndarray) -> _Quantiser:
        signed = bool(finite.size and finite.min() < 0)
        top = 32767 if signed else 65535
        peak = float(np.abs(finite).max()) if finite.size else 0.0
        if peak == 0:
            return cls(1.0, signed)
        # DS holds 16 characters: round the slope to 10 significant digits, a hair above
        # peak / top so that the peak still fits after rounding
        slope = float(f"{peak / (top - 0.5):.10g}")
        return cls(slope, signed)

    def stored(self, values: np.ndarray) -> np.ndarray:
        top = 32767 if self.signed else 65535
        q = np.rint(values.astype(np.float64) / self.slope)  # float32 division would round
        q = np.clip(q, -32768 if self.signed else 0, top)
        return q.astype(np.int16 if self.signed else np.uint16)


def _write_mr(
    pydicom: Any,
    folder: Path,
    s: DicomMapSeries,
    arr: np.ndarray,
    g: _Geometry,
    ref: Any,
    derivation: str,
    *,
    derived: bool,
    acquisition: Mapping[str, float] | None = None,
    quantiser: _Quantiser | None = None,
    stem: str | None = None,
    first_instance: int = 1,
) -> None:
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

    from .. import __version__

    frames = _frames(arr if arr.ndim == 3 else arr[:, :, None])
    q = quantiser or _Quantiser.for_values(frames[np.isfinite(frames)])
    s.rescale = (q.slope, 0.0)
    centre, width = _window(frames)
    date, time = _now()
    normal = g.normal
    for k in range(frames.shape[0]):
        sop_uid = pydicom.uid.generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = pydicom.Dataset()
        ds.file_meta = meta
        for kw in _COPIED:
            if kw in ref:
                setattr(ds, kw, ref.get(kw))
        for kw in (
            "PatientName",
            "PatientID",
            "PatientBirthDate",
            "PatientSex",
            "StudyID",
            "AccessionNumber",
            "ReferringPhysicianName",
            "PositionReferenceIndicator",
            "PatientPosition",
            "Laterality",
        ):
            if kw not in ds:
                setattr(ds, kw, "")
        if "StudyDate" not in ds:
            ds.StudyDate, ds.StudyTime = date, time
        # SOP Common, General Series, General Equipment, General Image
        ds.SOPClassUID = MR_IMAGE_STORAGE
        ds.SOPInstanceUID = sop_uid
        ds.Modality = "MR"
        ds.SeriesInstanceUID = s.series_uid
        ds.SeriesNumber = s.series_number
        ds.SeriesDescription = s.description
        ds.SeriesDate, ds.SeriesTime = date, time
        ds.ContentDate, ds.ContentTime = date, time
        ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
        ds.Manufacturer = "qmrkit"
        ds.ManufacturerModelName = "qmrkit"
        ds.SoftwareVersions = __version__
        ds.InstanceNumber = first_instance + k
        # an exported series stands in for scanner images but was not acquired: DERIVED
        # value 3 is required for MR images: the map's name for a map, OTHER for a series
        ds.ImageType = (
            ["DERIVED", "SECONDARY", _cs(s.name)]
            if derived
            else [
                "DERIVED",
                "PRIMARY",
                "OTHER",
            ]
        )
        if derived:
            ds.DerivationDescription = (derivation or f"{s.name} computed by qmrkit")[:1024]
        # Image Plane: x along the rows, y down the columns, LPS
        ds.ImageOrientationPatient = [_ds(v) for v in g.iop]
        ds.ImagePositionPatient = [_ds(v) for v in g.position(k)]
        ds.PixelSpacing = [_ds(v) for v in g.spacing]
        ds.SliceThickness = _ds(g.thickness)
        ds.SliceLocation = _ds(float(np.dot(g.position(k), normal)))
        if frames.shape[0] > 1:
            ds.SpacingBetweenSlices = _ds(g.thickness)
        # MR Image module: a computed map has no pulse sequence (RM = research mode); an
        # exported series with inversion times is an inversion recovery (InversionTime is 2C on IR)
        ds.ScanningSequence = "IR" if "InversionTime" in (acquisition or {}) else "RM"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "" if derived else "2D"  # Type 2: a map was not acquired
        ds.RepetitionTime = ""
        ds.EchoTime = ""
        ds.EchoTrainLength = ""
        for kw, v in (acquisition or {}).items():
            setattr(ds, kw, _ds(v))
        # Image Pixel: unsigned (or signed) 16-bit integers; value = stored · RescaleSlope
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = int(frames.shape[1]), int(frames.shape[2])
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 1 if q.signed else 0
        ds.RescaleSlope = _ds(q.slope)
        ds.RescaleIntercept = "0"
        ds.RescaleType = s.unit or "US"
        ds.WindowCenter, ds.WindowWidth = _ds(centre), _ds(width)
        ds.VOILUTFunction = _voi_function(width)
        pixels = q.stored(frames[k])
        ds.PixelData = pixels.tobytes()
        ds["PixelData"].VR = "OW"
        name = f"{stem or s.name}-{k + 1:04d}.dcm"
        path = folder / name
        ds.save_as(path, enforce_file_format=True)
        s.files.append(path)


def _cs(text: str) -> str:
    """A code string: upper case letters, digits, space and underscore, at most 16 characters."""
    return re.sub(r"[^A-Z0-9_ ]", "_", text.upper())[:16] or "MAP"


def _ds(v: float) -> str:
    """A number as a DICOM decimal string (at most 16 characters)."""
    text = f"{float(v):.10g}"
    if len(text) > 16:
        text = f"{float(v):.8e}"
    return text


__all__ = [
    "DicomMapSeries",
    "write_dicom_maps",
    "write_dicom_series",
    "ucum",
    "UCUM",
    "KINDS",
]
