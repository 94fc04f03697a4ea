"""`qmrkit fit ... --data DICOM`: the maps equal those of the same series as NIfTI, settings come
from the files (flags override with a warning), mixed series fail with one line; --dicom-out
writes Parametric Map and MR series whose values equal the NIfTI maps; `qmrkit mrf --dicom-out`
takes patient and study from the MRD header."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from qmrkit.cli import main
from qmrkit.io import load_nifti, read_dicom, save_nifti
from qmrkit.sim import MOLLI_TI, molli_series

from ..io.dicom_files import oblique_affine, pydicom, write_classic

pytest.importorskip("highdicom", reason="Parametric Maps need the 'dicom' extra (highdicom)")
TI_ARG = ",".join(str(t) for t in MOLLI_TI)


@pytest.fixture
def molli(tmp_path):
    """The same non-square oblique MOLLI slice as DICOM (shuffled files, int16 with a rescale
    slope) and as NIfTI (the dequantised values DICOM holds, the same affine)."""
    t1 = np.linspace(400.0, 2000.0, 6 * 8).reshape(6, 8)
    series, _ = molli_series(t1, 1000.0, MOLLI_TI, snr=200, seed=0)
    stored = np.round(series / np.abs(series).max() * 3000)[:, :, None].astype(np.int16)
    aff = oblique_affine(voxel=(1.4, 1.6, 8.0))
    write_classic(tmp_path / "dicom", stored, aff, ti=list(MOLLI_TI), slope=0.125, intercept=2.0)
    values = (stored[:, :, 0] * 0.125 + 2.0).astype(np.float32)
    save_nifti(tmp_path / "series.nii.gz", values, affine=aff)
    return tmp_path, t1, aff


def test_fit_from_dicom_equals_fit_from_nifti(molli, capsys):
    tmp, t1, aff = molli
    assert (
        main(
            [
                "fit",
                "molli",
                "--data",
                str(tmp / "dicom"),
                "--out",
                str(tmp / "d"),
                "--no-figure",
                "--dicom-out",
                "both",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "sorted by InversionTime (0018,0082)" in out and "DICOM: 8 series" in out
    assert (
        main(
            [
                "fit",
                "molli",
                "--data",
                str(tmp / "series.nii.gz"),
                "--ti",
                TI_ARG,
                "--out",
                str(tmp / "n"),
                "--no-figure",
            ]
        )
        == 0
    )
    for name in ("T1map", "T1starmap", "Amap", "Bmap"):
        d, d_aff = load_nifti(tmp / "d" / f"{name}.nii.gz")
        n, n_aff = load_nifti(tmp / "n" / f"{name}.nii.gz")
        np.testing.assert_array_equal(d, n)  # the same input values: the same maps, bit for bit
        np.testing.assert_allclose(d_aff, n_aff, atol=1e-6)
        np.testing.assert_allclose(d_aff, aff, atol=1e-6)
    est, _ = load_nifti(tmp / "d" / "T1map.nii.gz")
    assert np.median(np.abs(est - t1) / t1) < 0.02
    side = json.loads((tmp / "d" / "fit.json").read_text())
    assert side["Acquisition"]["ti"] == list(MOLLI_TI)
    assert side["DicomSeries"]["SortedBy"] == "ti"
    # the DICOM maps: Parametric Map float32-exact, MR within half a rescale step, same grid
    pm = read_dicom(tmp / "d" / "dicom" / "T1map-pmap")
    mr = read_dicom(tmp / "d" / "dicom" / "T1map-mr")
    truth = np.nan_to_num(est)
    np.testing.assert_array_equal(pm.data[..., 0], truth)
    slope = float(pydicom.dcmread(mr.files[0]).RescaleSlope)
    ulp = np.spacing(np.abs(truth).max())  # read_dicom returns float32
    assert np.abs(mr.data[..., 0] - truth).max() <= slope / 2 * (1 + 1e-6) + ulp
    for s in (pm, mr):
        np.testing.assert_allclose(s.affine, aff, atol=1e-6)
        assert s.reference.PatientID == "QMRKIT-TEST-01"
    assert pm.unit == "ms" and pm.series_description == "T1map [ms] qmrkit PMAP"


def test_flags_override_dicom_with_a_warning(molli, capsys):
    tmp, _, _ = molli
    other = ",".join(str(t + 5) for t in MOLLI_TI)
    assert (
        main(
            [
                "fit",
                "molli",
                "--data",
                str(tmp / "dicom"),
                "--ti",
                other,
                "--out",
                str(tmp / "o"),
                "--no-figure",
                "--max-iter",
                "5",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert re.search(
        r"warning: --ti 105,.* disagrees with the DICOM files' 100,.*"
        r"InversionTime \(0018,0082\).*using --ti",
        err,
    ), err
    side = json.loads((tmp / "o" / "fit.json").read_text())
    assert side["Acquisition"]["ti"] == [t + 5 for t in MOLLI_TI]
    # the same values: no warning
    assert (
        main(
            [
                "fit",
                "molli",
                "--data",
                str(tmp / "dicom"),
                "--ti",
                TI_ARG,
                "--out",
                str(tmp / "o2"),
                "--no-figure",
                "--max-iter",
                "5",
            ]
        )
        == 0
    )
    assert "disagrees" not in capsys.readouterr().err


def test_mixed_series_and_missing_tags_are_one_line(molli, capsys):
    tmp, _, aff = molli
    stored = np.arange(6 * 8 * 3, dtype=np.int16).reshape(6, 8, 1, 3)
    write_classic(tmp / "dicom", stored, aff, ti=[300, 100, 200], series_uid="1.2.3.99")
    assert main(["fit", "molli", "--data", str(tmp / "dicom"), "--out", str(tmp / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "hold 2 series" in err and "1.2.3.99" in err
    assert (
        main(
            [
                "fit",
                "molli",
                "--data",
                str(tmp / "dicom"),
                "--series",
                "1.2.3.99",
                "--out",
                str(tmp / "o"),
                "--no-figure",
                "--max-iter",
                "2",
            ]
        )
        == 0
    )
    side = json.loads((tmp / "o" / "fit.json").read_text())
    assert side["DicomSeries"]["SeriesInstanceUID"] == "1.2.3.99"
    assert side["Acquisition"]["ti"] == [100.0, 200.0, 300.0]
    capsys.readouterr()
    write_classic(tmp / "noti", stored, aff)
    assert main(["fit", "molli", "--data", str(tmp / "noti"), "--out", str(tmp / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no inversion times; looked for InversionTime" in err
    assert (
        main(
            [
                "fit",
                "molli",
                "--data",
                str(tmp / "series.nii.gz"),
                "--series",
                "1.2",
                "--ti",
                TI_ARG,
                "--out",
                str(tmp / "o"),
            ]
        )
        == 2
    )
    assert "--series picks a series of a DICOM" in capsys.readouterr().err


def test_vfa_reads_flip_angles_and_tr(tmp_path, capsys):
    fa, tr = [3.0, 8.0, 15.0, 25.0], 15.0
    t1 = np.linspace(500.0, 1500.0, 12).reshape(4, 3)
    e1 = np.exp(-tr / t1)[..., None]
    a = np.deg2rad(fa)
    sig = 1000 * np.sin(a) * (1 - e1) / (1 - np.cos(a) * e1)
    order = [2, 0, 3, 1]
    write_classic(
        tmp_path / "v",
        np.round(sig[..., order] * 10)[:, :, None].astype(np.int16),
        oblique_affine(),
        fa=[fa[m] for m in order],
        tr=tr,
        slope=0.1,
    )
    assert (
        main(
            [
                "fit",
                "vfa",
                "--data",
                str(tmp_path / "v"),
                "--out",
                str(tmp_path / "o"),
                "--no-figure",
            ]
        )
        == 0
    )
    side = json.loads((tmp_path / "o" / "fit.json").read_text())
    assert side["Acquisition"] == {"flip_angles": fa, "tr": tr}
    est, _ = load_nifti(tmp_path / "o" / "T1map.nii.gz")
    np.testing.assert_allclose(est, t1, rtol=0.01)  # quantisation to 0.1: ~0.1 % signal error


def test_dicom_out_from_nifti_input_is_an_anonymous_study(molli, capsys):
    tmp, _, aff = molli
    assert (
        main(
            [
                "fit",
                "molli",
                "--data",
                str(tmp / "series.nii.gz"),
                "--ti",
                TI_ARG,
                "--out",
                str(tmp / "o"),
                "--no-figure",
                "--max-iter",
                "3",
                "--dicom-out",
                "pmap",
            ]
        )
        == 0
    )
    assert "the DICOM maps get a new study of an anonymous patient" in capsys.readouterr().out
    s = read_dicom(tmp / "o" / "dicom" / "T1map-pmap")
    np.testing.assert_allclose(s.affine, aff, atol=1e-6)
    assert s.reference.PatientID == "" and not (tmp / "o" / "dicom" / "T1map-mr").exists()


@pytest.mark.slow  # ≈ 30 s on 2 shared CPU cores (simulated scan, dictionary, reconstruction)
def test_mrf_dicom_out_takes_patient_and_study_from_the_mrd_header(tmp_path):
    pytest.importorskip("ismrmrd")
    from qmrkit import mrf, sim
    from qmrkit.io import header_for_scan, write_mrd

    scan = sim.mrf_scan((16, 20), n_coils=2, seed=0, schedule=mrf.fisp_schedule(200, seed=0))
    subject = (
        "<subjectInformation><patientName>Doe^Jane</patientName><patientID>MRD-7"
        "</patientID></subjectInformation><studyInformation><studyInstanceUID>"
        "1.2.826.0.1.3680043.2.1125.9</studyInstanceUID></studyInformation>"
    )
    scan.header = re.sub(
        r"(<ismrmrdHeader[^>]*>)", r"\1" + subject, scan.header or header_for_scan(scan), count=1
    )
    path = write_mrd(tmp_path / "scan.h5", scan)
    d = mrf.Dictionary.build(
        scan.meta["schedule"],
        t1=mrf.log_grid(100, 3000, 0.4),
        t2=mrf.log_grid(10, 400, 0.4),
        keep_atoms=False,
    )
    d_path = d.save(tmp_path / "d.npz")
    assert (
        main(
            [
                "mrf",
                str(path),
                "--dictionary",
                str(d_path),
                "--out",
                str(tmp_path / "o"),
                "--dicom-out",
                "pmap",
                "-q",
            ]
        )
        == 0
    )
    for name, unit in (("T1map", "ms"), ("T2map", "ms"), ("M0map", "[arb'U]"), ("B1map", "1")):
        s = read_dicom(tmp_path / "o" / "dicom" / f"{name}-pmap")
        ds = s.reference
        assert (ds.PatientName, ds.PatientID) == ("Doe^Jane", "MRD-7")
        assert ds.StudyInstanceUID == "1.2.826.0.1.3680043.2.1125.9" and s.unit == unit
        nifti, aff = load_nifti(tmp_path / "o" / f"{name}.nii.gz")
        np.testing.assert_array_equal(s.data[..., 0], np.nan_to_num(nifti))
        np.testing.assert_allclose(s.affine, aff, atol=1e-5)


def test_missing_highdicom_fails_before_fitting(molli, capsys, monkeypatch):
    tmp, _, _ = molli
    monkeypatch.setitem(__import__("sys").modules, "highdicom", None)
    monkeypatch.setattr("qmrkit.fit.lm", lambda *a, **k: 1 / 0)  # never reached
    assert (
        main(
            [
                "fit",
                "molli",
                "--data",
                str(tmp / "dicom"),
                "--out",
                str(tmp / "o"),
                "--dicom-out",
                "pmap",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "highdicom is needed" in err and "qmrkit[dicom]" in err
    assert not (tmp / "o").exists()


@pytest.mark.slow  # ≈ 15 s: a DTI fit
def test_dti_dicom_out_every_map_with_its_unit(tmp_path, capsys):
    from qmrkit import sim

    prot = sim.dwi_protocol([(20.0, [1.0])], n_dirs=12)
    sim.dwi_phantom((6, 5), protocol=prot, snr=50).save(tmp_path / "dti")
    d = tmp_path / "dti"
    assert (
        main(
            [
                "fit",
                "dti",
                "--dwi",
                str(d / "dwi.nii.gz"),
                "--bval",
                str(d / "dwi.bval"),
                "--bvec",
                str(d / "dwi.bvec"),
                "--out",
                str(tmp_path / "o"),
                "--no-figure",
                "--dicom-out",
                "pmap",
                "-q",
            ]
        )
        == 0
    )
    folders = {p.name for p in (tmp_path / "o" / "dicom").iterdir()}
    # S0, 6 Cholesky parameters, FA MD AD RD L1 L2 L3, V1x V1y V1z: one series each
    assert len(folders) == 17 and {"S0map-pmap", "L11-pmap", "V1z-pmap"} <= folders
    for name, unit in (("MD", "um2/ms"), ("FA", "1"), ("L11", "{sqrt(um2/ms)}")):
        s = read_dicom(tmp_path / "o" / "dicom" / f"{name}-pmap")
        n, aff = load_nifti(tmp_path / "o" / f"{name}.nii.gz")
        assert s.unit == unit
        np.testing.assert_array_equal(s.data, np.nan_to_num(n))  # (x, y, 1): one slice
        np.testing.assert_allclose(s.affine, aff, atol=1e-6)
