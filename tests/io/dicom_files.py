"""DICOM files built directly with pydicom from known arrays and a known geometry (independent
of qmrkit's writer), for the DICOM reader and CLI tests.

The geometry is given as a NIfTI-style RAS affine ``A`` whose columns are the x (along the DICOM
rows), y (down the columns) and z (slice) steps: the files get ImageOrientationPatient =
LPS(A[:, 0] / |A[:, 0]|), LPS(A[:, 1] / |A[:, 1]|), PixelSpacing = (|A[:, 1]|, |A[:, 0]|) and
ImagePositionPatient of slice k = LPS(A @ (0, 0, k, 1)), LPS = diag(-1, -1, 1) · RAS.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom", reason="DICOM tests need the 'dicom' extra (pydicom)")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402

MR = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"
FLIP = np.array([-1.0, -1.0, 1.0])


def ds_str(v: float) -> str:
    """A decimal string of at most 16 characters."""
    return f"{float(v):.10g}"


def oblique_affine(voxel=(1.25, 2.0, 5.0), origin=(-40.5, 22.25, 13.0), left=False) -> np.ndarray:
    """A RAS affine rotated 25° about z, 15° about x, 10° about y; z = +x × y unless ``left``."""
    a, b, c = np.deg2rad([25.0, 15.0, 10.0])
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    ry = np.array([[np.cos(c), 0, np.sin(c)], [0, 1, 0], [-np.sin(c), 0, np.cos(c)]])
    r = rz @ rx @ ry
    if left:
        r[:, 2] = -r[:, 2]
    aff = np.eye(4)
    aff[:3, :3] = r @ np.diag(voxel)
    aff[:3, 3] = origin
    return aff


def plane(affine: np.ndarray, k: int) -> dict:
    """IOP, IPP (slice k) and PixelSpacing of a RAS affine, as DICOM strings (LPS)."""
    cx, cy = affine[:3, 0], affine[:3, 1]
    dx, dy = np.linalg.norm(cx), np.linalg.norm(cy)
    iop = np.concatenate([FLIP * cx / dx, FLIP * cy / dy])
    ipp = FLIP * (affine @ np.array([0.0, 0.0, k, 1.0]))[:3]
    return {
        "ImageOrientationPatient": [ds_str(v) for v in iop],
        "ImagePositionPatient": [ds_str(v) for v in ipp],
        "PixelSpacing": [ds_str(dy), ds_str(dx)],
        "SliceThickness": ds_str(np.linalg.norm(affine[:3, 2])),
    }


def _base(sop_class: str, series_uid: str, study_uid: str, for_uid: str) -> Dataset:
    sop = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop
    ds.PatientName, ds.PatientID = "Test^Phantom", "QMRKIT-TEST-01"
    ds.PatientBirthDate, ds.PatientSex = "19700101", "O"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.FrameOfReferenceUID = for_uid
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240102", "101500", "7", "A1"
    ds.ReferringPhysicianName = ""
    ds.Modality, ds.SeriesNumber, ds.SeriesDescription = "MR", 7, "T1 MOLLI test"
    ds.Manufacturer = "TEST"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    return ds


def write_classic(
    folder: Path,
    stored: np.ndarray,
    affine: np.ndarray,
    *,
    ti=None,
    te=None,
    fa=None,
    tr=None,
    slope: float = 1.0,
    intercept: float = 0.0,
    series_uid: str | None = None,
    study_uid: str | None = None,
    seed: int = 0,
    extra=None,
) -> list[Path]:
    """One classic MR file per slice and measurement from ``stored`` (x, y, z, n) int16 values,
    with shuffled file names and InstanceNumbers that follow neither slice nor TI order."""
    folder.mkdir(parents=True, exist_ok=True)
    nx, ny, nz, n = stored.shape
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    for_uid = generate_uid()
    rng = np.random.default_rng(seed)
    numbers = rng.permutation(nz * n) + 1
    paths = []
    for k in range(nz):
        for m in range(n):
            ds = _base(MR, series_uid, study_uid, for_uid)
            for key, v in plane(affine, k).items():
                setattr(ds, key, v)
            ds.ImageType = ["ORIGINAL", "PRIMARY", "M"]
            ds.InstanceNumber = int(numbers[k * n + m])
            ds.Rows, ds.Columns = ny, nx
            for kw, vals in (("InversionTime", ti), ("EchoTime", te), ("FlipAngle", fa)):
                if vals is not None:
                    setattr(ds, kw, ds_str(vals[m]))
            if tr is not None:
                ds.RepetitionTime = ds_str(tr[m] if np.ndim(tr) else tr)
            if slope != 1.0 or intercept != 0.0:
                ds.RescaleSlope, ds.RescaleIntercept = ds_str(slope), ds_str(intercept)
            for kw, v in (extra(k, m) if extra else {}).items():
                if isinstance(kw, tuple):  # (group, creator, offset, VR, value): a private tag
                    group, creator, offset, vr = kw
                    ds.private_block(group, creator, create=True).add_new(offset, vr, v)
                else:
                    setattr(ds, kw, v)
            # rows = y, columns = x: the pixel array is the transposed NIfTI slice
            ds.PixelData = np.ascontiguousarray(stored[:, :, k, m].T.astype(np.int16)).tobytes()
            p = folder / f"f{rng.integers(1e9):09d}_{k}_{m}"
            ds.save_as(p, enforce_file_format=True)
            paths.append(p)
    return paths


def write_enhanced(
    path: Path,
    stored: np.ndarray,
    affine: np.ndarray,
    *,
    ti,
    te: float = 1.1,
    tr: float = 2.5,
    fa: float = 35.0,
    slope: float = 1.0,
    intercept: float = 0.0,
) -> Path:
    """One enhanced MR multi-frame file (x, y, z, n): frames ordered measurement-major with
    per-frame positions and inversion times, shared orientation, spacing and rescale."""
    nx, ny, nz, n = stored.shape
    ds = _base(ENHANCED_MR, generate_uid(), generate_uid(), generate_uid())
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.InstanceNumber = 1
    ds.Rows, ds.Columns, ds.NumberOfFrames = ny, nx, nz * n
    geo = plane(affine, 0)
    shared = Dataset()
    orient = Dataset()
    orient.ImageOrientationPatient = geo["ImageOrientationPatient"]
    shared.PlaneOrientationSequence = [orient]
    measures = Dataset()
    measures.PixelSpacing = geo["PixelSpacing"]
    measures.SliceThickness = geo["SliceThickness"]
    shared.PixelMeasuresSequence = [measures]
    pvt = Dataset()
    pvt.RescaleSlope, pvt.RescaleIntercept, pvt.RescaleType = ds_str(slope), ds_str(intercept), "US"
    shared.PixelValueTransformationSequence = [pvt]
    timing = Dataset()
    timing.RepetitionTime, timing.FlipAngle = ds_str(tr), ds_str(fa)
    shared.MRTimingAndRelatedParametersSequence = [timing]
    echo = Dataset()
    echo.EffectiveEchoTime = float(te)
    shared.MREchoSequence = [echo]
    ds.SharedFunctionalGroupsSequence = [shared]
    per, frames = [], []
    for m in range(n):
        for k in range(nz):
            item = Dataset()
            pos = Dataset()
            pos.ImagePositionPatient = plane(affine, k)["ImagePositionPatient"]
            item.PlanePositionSequence = [pos]
            content = Dataset()
            content.InStackPositionNumber, content.TemporalPositionIndex = k + 1, m + 1
            item.FrameContentSequence = [content]
            mod = Dataset()
            mod.InversionTimes = [float(ti[m])]
            item.MRModifierSequence = [mod]
            per.append(item)
            frames.append(stored[:, :, k, m].T)
    ds.PerFrameFunctionalGroupsSequence = per
    ds.PixelData = np.ascontiguousarray(np.stack(frames).astype(np.int16)).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path
