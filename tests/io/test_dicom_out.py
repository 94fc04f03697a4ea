"""DICOM maps out: Parametric Map and rescaled MR series read back with plain pydicom (values,
units, geometry, patient/study), validated by dciodvfy (dicom3tools), MRD-header provenance."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from qmrkit.errors import DicomError, ParameterError
from qmrkit.io import read_dicom, write_dicom_maps, write_dicom_series
from qmrkit.io.dicom_out import ucum

from .dicom_files import FLIP, oblique_affine, pydicom, write_classic

pytest.importorskip("highdicom", reason="Parametric Maps need the 'dicom' extra (highdicom)")


def _maps(shape=(7, 5, 3), seed=0):
    rng = np.random.default_rng(seed)
    t1 = rng.uniform(250.0, 2100.0, shape).astype(np.float32)
    t1[0, 0, 0] = t1[3, 2, 1] = np.nan  # voxels not fitted
    r2s = rng.uniform(-5.0, 80.0, shape).astype(np.float32)  # signed values
    return {"T1map": t1, "R2starmap": r2s}


def _frames_of(ds) -> tuple[np.ndarray, np.ndarray]:
    """(values (n, rows, cols), LPS positions (n, 3)) of a file, by hand from its tags."""
    if "PerFrameFunctionalGroupsSequence" in ds:
        rwv = ds.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
        vals = ds.pixel_array.reshape(-1, ds.Rows, ds.Columns).astype(np.float64)
        vals = vals * float(rwv.RealWorldValueSlope) + float(rwv.RealWorldValueIntercept)
        pos = [
            f.PlanePositionSequence[0].ImagePositionPatient
            for f in ds.PerFrameFunctionalGroupsSequence
        ]
        return vals, np.array(pos, float)
    vals = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    return vals[None], np.array([ds.ImagePositionPatient], float)


def _world(aff, shape):
    idx = np.indices(shape).reshape(3, -1)
    return (aff @ np.vstack([idx, np.ones(idx.shape[1])]))[:3]


def test_round_trip_values_units_geometry_and_provenance(tmp_path):
    aff = oblique_affine()
    # the input series whose patient/study the maps join
    src = read_dicom(
        write_classic(tmp_path / "in", np.ones((7, 5, 3, 2), np.int16), aff, ti=[100, 200])[
            0
        ].parent
    )
    maps = _maps()
    series = write_dicom_maps(
        tmp_path / "dcm",
        maps,
        units={"T1map": "ms", "R2starmap": "1/s"},
        reference=src,
        derivation="qmrkit molli fit (lm)",
    )
    assert [(s.name, s.kind) for s in series] == [
        ("T1map", "pmap"),
        ("T1map", "mr"),
        ("R2starmap", "pmap"),
        ("R2starmap", "mr"),
    ]
    uids = {s.series_uid for s in series}
    assert len(uids) == 4 and src.series_uid not in uids
    assert [s.series_number for s in series] == [701, 702, 703, 704]
    for s in series:
        truth = np.nan_to_num(maps[s.name], nan=0.0)  # NaN is stored as 0
        frames = np.transpose(truth, (2, 1, 0))  # (z, rows = y, cols = x)
        got, pos = [], []
        for f in s.files:
            ds = pydicom.dcmread(f)
            assert ds.SeriesInstanceUID == s.series_uid and ds.SeriesDescription == s.description
            assert ds.PatientID == "QMRKIT-TEST-01" and ds.PatientName == "Test^Phantom"
            assert ds.StudyInstanceUID == src.reference.StudyInstanceUID
            assert ds.FrameOfReferenceUID == src.reference.FrameOfReferenceUID
            v, p = _frames_of(ds)
            got.append(v)
            pos.append(p)
        got, pos = np.concatenate(got), np.concatenate(pos)
        order = np.argsort(
            pos @ np.cross(*np.reshape(src.reference.ImageOrientationPatient, (2, 3)).astype(float))
        )
        got, pos = got[order], pos[order]
        np.testing.assert_allclose(pos, (FLIP * _world(aff, (1, 1, 3)).T), atol=1e-6)
        unit = {"T1map": "ms", "R2starmap": "s-1"}[s.name]
        assert s.unit == unit and f"[{unit}]" in s.description and s.name in s.description
        if s.kind == "pmap":
            ds = pydicom.dcmread(s.files[0])
            assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30"
            code = ds.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
            code = code.MeasurementUnitsCodeSequence[0]
            assert (code.CodeValue, code.CodingSchemeDesignator) == (unit, "UCUM")
            assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == src.series_uid
            np.testing.assert_array_equal(got.astype(np.float32), frames)  # float32 exact
        else:
            slope = s.rescale[0]
            assert float(pydicom.dcmread(s.files[0]).RescaleSlope) == slope
            assert (
                slope <= np.abs(truth).max() / 32767 * 1.0001
                if s.name == "R2starmap"
                else (slope <= np.abs(truth).max() / 65534)
            )
            err = np.abs(got - frames).max()
            assert err <= slope / 2 * (1 + 1e-6), (err, slope)
            assert err > 0  # really quantised, not a float copy
        # qmrkit's own reader gives the same values and the input's affine
        back = read_dicom(s.files[0].parent)
        np.testing.assert_allclose(back.affine, aff, atol=1e-6)
        ulp = np.spacing(np.float32(np.abs(truth).max()))  # read_dicom returns float32
        tol = 0 if s.kind == "pmap" else s.rescale[0] / 2 * (1 + 1e-6) + ulp
        np.testing.assert_allclose(back.data[..., 0], truth, atol=tol, rtol=0)
        if s.kind == "pmap":
            assert back.unit == unit


def test_left_handed_affine_lands_on_the_same_world_points(tmp_path):
    aff = np.diag([-1.5, 2.0, 4.0, 1.0])  # LAS-like: z opposite to x × y
    aff[:3, 3] = [30.0, -12.0, 7.5]
    m = _maps((5, 4, 3))["R2starmap"]
    s = write_dicom_maps(
        tmp_path, {"R2starmap": m}, units={"R2starmap": "1/s"}, affine=aff, kinds=("pmap",)
    )[0]
    back = read_dicom(s.files[0])
    world_in = _world(aff, m.shape).T
    world_back = _world(back.affine, m.shape).T
    # every written voxel is found at its world position with its value
    lookup = {
        tuple(np.round(p, 4)): v for p, v in zip(world_back, back.data[..., 0].ravel(), strict=True)
    }
    for p, v in zip(world_in, m.ravel(), strict=True):
        assert lookup[tuple(np.round(p, 4))] == v


def test_mrd_header_gives_patient_and_study(tmp_path):
    pytest.importorskip("ismrmrd")
    xml = """<?xml version="1.0"?>
<ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD">
 <subjectInformation><patientName>Doe^Jäne</patientName><patientWeight_kg>61.5</patientWeight_kg>
  <patientID>MRD-42</patientID><patientBirthdate>1980-05-17</patientBirthdate>
  <patientGender>F</patientGender></subjectInformation>
 <studyInformation><studyDate>2024-03-04</studyDate><studyTime>09:30:05</studyTime>
  <studyID>S9</studyID><accessionNumber>123</accessionNumber>
  <studyDescription>cardiac T1</studyDescription>
  <studyInstanceUID>1.2.826.0.1.3680043.2.1125.1</studyInstanceUID></studyInformation>
 <measurementInformation><patientPosition>HFS</patientPosition>
  <frameOfReferenceUID>1.2.826.0.1.3680043.2.1125.2</frameOfReferenceUID></measurementInformation>
 <experimentalConditions><H1resonanceFrequency_Hz>63500000</H1resonanceFrequency_Hz>
 </experimentalConditions>
 <encoding><encodedSpace><matrixSize><x>4</x><y>4</y><z>1</z></matrixSize>
  <fieldOfView_mm><x>8</x><y>8</y><z>5</z></fieldOfView_mm></encodedSpace>
  <reconSpace><matrixSize><x>4</x><y>4</y><z>1</z></matrixSize>
  <fieldOfView_mm><x>8</x><y>8</y><z>5</z></fieldOfView_mm></reconSpace>
  <encodingLimits/><trajectory>cartesian</trajectory></encoding>
</ismrmrdHeader>"""
    out = write_dicom_maps(
        tmp_path, {"T1map": np.full((4, 4), 900.0)}, units={"T1map": "ms"}, reference=xml
    )
    for s in out:
        ds = pydicom.dcmread(s.files[0])
        assert (ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex) == (
            "Doe^Jäne",
            "MRD-42",
            "19800517",
            "F",
        )
        assert ds.SpecificCharacterSet == "ISO_IR 192"  # UTF-8, declared
        assert (ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber) == (
            "20240304",
            "093005",
            "S9",
            "123",
        )
        assert ds.StudyInstanceUID == "1.2.826.0.1.3680043.2.1125.1"
        assert ds.FrameOfReferenceUID == "1.2.826.0.1.3680043.2.1125.2"
        assert ds.PatientPosition == "HFS" and ds.StudyDescription == "cardiac T1"
        assert "ReferencedSeriesSequence" not in ds  # no source images to point to
    assert {s.series_number for s in out} == {9001, 9002}


def test_units():
    assert ucum("ms") == ("ms", "millisecond") and ucum("1/s")[0] == "s-1"
    assert ucum("µm²/ms")[0] == "um2/ms" and ucum("")[0] == "1" and ucum("a.u.")[0] == "[arb'U]"
    # no UCUM spelling (fractional power): an annotation, never a wrong physical unit
    assert ucum("sqrt(µm²/ms)") == ("{sqrt(um2/ms)}", "sqrt(um2/ms) (no UCUM unit)")


def test_bad_requests(tmp_path):
    with pytest.raises(ParameterError, match=r"no UCUM code for the unit 'a\{b\}'"):
        write_dicom_maps(tmp_path, {"X": np.ones((2, 2))}, units={"X": "a{b}"})
    sheared = np.eye(4)
    sheared[0, 1] = 0.5
    with pytest.raises(DicomError, match="non-orthogonal"):
        write_dicom_maps(tmp_path, {"X": np.ones((2, 2))}, affine=sheared)
    with pytest.raises(ParameterError, match="kinds must be among"):
        write_dicom_maps(tmp_path, {"X": np.ones((2, 2))}, kinds=("png",))
    with pytest.raises(ParameterError, match="MRD"):
        write_dicom_maps(tmp_path, {"X": np.ones((2, 2))}, reference=42)
    assert not any(tmp_path.rglob("*.dcm"))  # nothing written by a refused request


def test_exported_series_reads_back(tmp_path):
    aff = oblique_affine()
    series = np.random.default_rng(1).uniform(0, 500, (6, 4, 2, 3)).astype(np.float32)
    files = write_dicom_series(
        tmp_path, series, affine=aff, ti=[300, 100, 200], tr=2.4, patient_id="P1"
    )
    assert len(files) == 6
    s = read_dicom(tmp_path)
    slope = float(pydicom.dcmread(files[0]).RescaleSlope)
    ulp = np.spacing(np.float32(500.0))
    np.testing.assert_allclose(s.data, series[..., [1, 2, 0]], atol=slope / 2 * (1 + 1e-6) + ulp)
    np.testing.assert_allclose(s.affine, aff, atol=1e-6)
    assert s.settings(["ti", "tr"]) == {"ti": [100.0, 200.0, 300.0], "tr": 2.4}
    assert s.reference.PatientID == "P1"


@pytest.mark.skipif(
    shutil.which("dciodvfy") is None,
    reason="dciodvfy (Debian dicom3tools) is not installed; .ci/run installs it",
)
def test_dciodvfy_finds_no_errors(tmp_path, capsys):
    aff = oblique_affine()
    src = read_dicom(
        write_classic(tmp_path / "in", np.ones((7, 5, 3, 2), np.int16), aff, ti=[100, 200])[
            0
        ].parent
    )
    series = write_dicom_maps(
        tmp_path / "dcm", _maps(), units={"T1map": "ms", "R2starmap": "1/s"}, reference=src
    )
    series += write_dicom_maps(
        tmp_path / "anon",
        {"MDmap": np.full((4, 3), 0.8), "Lxx": np.full((4, 3), 0.9)},
        units={"MDmap": "µm²/ms", "Lxx": "sqrt(µm²/ms)"},
    )
    exported = write_dicom_series(
        tmp_path / "exp", np.ones((4, 3, 2)), ti=[100, 200], patient_id="P1"
    )
    files = [s.files[0] for s in series] + exported[:1]
    warnings_seen = set()
    for f in files:
        done = subprocess.run(
            ["dciodvfy", str(f)], capture_output=True, text=True, timeout=60, errors="replace"
        )
        lines = (done.stdout + done.stderr).splitlines()
        errors = [line for line in lines if line.startswith("Error")]
        assert not errors, f"{f}:\n" + "\n".join(lines)
        warnings_seen |= {line for line in lines if line.startswith("Warning")}
    with capsys.disabled():  # the warnings allowed, listed (see docs/dicom.md)
        print("\ndciodvfy warnings:\n  " + "\n  ".join(sorted(warnings_seen)))
    # the known, accepted warnings only: the rescale slope in MR images, defined terms that
    # dciodvfy does not know, empty Laterality, no patient ID in the anonymous study
    allowed = (
        "Modality LUT",
        "not present in standard DICOM IOD",
        "Unrecognized defined term",
        "<Laterality>",
        "needed to build DICOMDIR",
    )
    assert all(any(a in w for a in allowed) for w in warnings_seen), warnings_seen


@pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent")  # the file's name
def test_enhanced_reference_with_per_frame_pixel_measures(tmp_path):
    """A vendor's enhanced MR source (Philips: pixel measures per frame, not shared) still gives
    patient, study and references; the map keeps its own geometry."""
    import gzip
    from pathlib import Path

    import nibabel

    gz = Path(nibabel.__file__).parent / "nicom" / "tests" / "data" / "philips_mprage.dcm.gz"
    if not gz.exists():
        pytest.skip(f"nibabel's test data are not installed ({gz})")
    (tmp_path / "src.dcm").write_bytes(gzip.open(gz).read())
    src = read_dicom(tmp_path / "src.dcm")
    shared = src.reference.SharedFunctionalGroupsSequence[0]
    assert "PixelMeasuresSequence" not in shared  # the case highdicom cannot read by itself
    m = np.random.default_rng(2).uniform(100, 200, (16, 12, 2)).astype(np.float32)
    (s,) = write_dicom_maps(
        tmp_path / "o", {"T2map": m}, units={"T2map": "ms"}, reference=src, kinds=("pmap",)
    )
    ds = pydicom.dcmread(s.files[0])
    assert ds.PatientName == src.reference.PatientName
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == src.series_uid
    assert "PixelMeasuresSequence" not in src.reference.SharedFunctionalGroupsSequence[0]  # intact
    back = read_dicom(s.files[0])
    np.testing.assert_array_equal(back.data[..., 0], m)
    np.testing.assert_allclose(back.affine, src.affine, atol=1e-6)
