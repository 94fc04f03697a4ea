"""A real PACS: Orthanc (Debian `orthanc`) started on free loopback ports; maps fitted from a
DICOM MOLLI series are sent by `qmrkit fit ... --send-to` (pynetdicom C-STORE) and read back
over Orthanc's REST API, values and units compared with the NIfTI maps."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from qmrkit.cli import main
from qmrkit.errors import ParameterError, ServiceError
from qmrkit.io import load_nifti, parse_pacs_url, send_dicom
from qmrkit.sim import MOLLI_TI, molli_series

from ..orthanc import free_port, http_get, running_orthanc, stored_instances
from .dicom_files import oblique_affine, pydicom, write_classic

pytest.importorskip("pynetdicom", reason="C-STORE needs the 'dicom' extra (pynetdicom)")
pytest.importorskip("highdicom", reason="Parametric Maps need the 'dicom' extra (highdicom)")

AET = "QMRKITTEST"


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    """A private Orthanc (:func:`tests.orthanc.running_orthanc`), stopped after the module."""
    with running_orthanc(tmp_path_factory.mktemp("orthanc"), AET) as o:
        yield o


def _molli_dicom(tmp_path: Path) -> tuple[Path, np.ndarray]:
    t1 = np.linspace(400.0, 1900.0, 6 * 8).reshape(6, 8)
    series, _ = molli_series(t1, 1000.0, MOLLI_TI, snr=300, seed=3)
    stored = np.round(series / series.max() * 3000)[:, :, None].astype(np.int16)
    write_classic(
        tmp_path / "molli",
        stored,
        oblique_affine(voxel=(1.4, 1.6, 8.0)),
        ti=list(MOLLI_TI),
        slope=0.25,
    )
    return tmp_path / "molli", t1


def test_fit_send_to_orthanc_and_read_back(orthanc, tmp_path, capsys):
    folder, _ = _molli_dicom(tmp_path)
    out = tmp_path / "out"
    rc = main(
        [
            "fit",
            "molli",
            "--data",
            str(folder),
            "--out",
            str(out),
            "--no-figure",
            "--send-to",
            orthanc["pacs"],
            "--calling-aet",
            "QMRKIT-CI",
        ]
    )
    text = capsys.readouterr().out
    assert rc == 0, text
    written = sorted((out / "dicom").rglob("*.dcm"))
    assert f"sent {len(written)} of {len(written)} DICOM files to {orthanc['pacs']}" in text
    stored = stored_instances(orthanc["url"])
    assert sum(len(v) for v in stored.values()) == len(written)  # 4 maps x (1 pmap + 1 mr)
    src = pydicom.dcmread(next(folder.iterdir()))
    for name, unit in (("T1map", "ms"), ("T1starmap", "ms"), ("Amap", "[arb'U]")):
        nifti, _ = load_nifti(out / f"{name}.nii.gz")
        truth = np.nan_to_num(nifti).T  # (rows = y, cols = x)
        (pm,) = stored[f"{name} [{unit}] qmrkit PMAP"]
        rwv = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
        assert rwv.MeasurementUnitsCodeSequence[0].CodeValue == unit
        assert pm.PatientID == src.PatientID and pm.StudyInstanceUID == src.StudyInstanceUID
        values = pm.pixel_array * float(rwv.RealWorldValueSlope) + float(
            rwv.RealWorldValueIntercept
        )
        np.testing.assert_array_equal(values.astype(np.float32), truth)  # float32 exact
        (mr,) = stored[f"{name} [{unit}] qmrkit MR"]
        slope = float(mr.RescaleSlope)
        err = np.abs(mr.pixel_array * slope + float(mr.RescaleIntercept) - truth).max()
        assert err <= slope / 2 * (1 + 1e-6)
    series = json.loads(http_get(orthanc["url"] + "/series"))
    assert len(series) == len(stored) == 8


def test_refusals_are_clear(orthanc, tmp_path, capsys):
    f = tmp_path / "m.dcm"
    shutil.copy(pydicom.data.get_testdata_file("MR_small.dcm"), f)
    wrong = orthanc["pacs"].replace(AET, "NOTTHISONE")
    # Orthanc answers a wrong called AE title with A-ASSOCIATE-RJ and closes the connection;
    # pynetdicom reports that as an abort when the close wins the race (seen once under the
    # full suite's load), so the message says "refused" either way
    with pytest.raises(ServiceError, match=r"refused the association \((A-ASSOCIATE-RJ|it closed)"):
        send_dicom([f], wrong)
    closed = f"pacs://{AET}@127.0.0.1:{free_port()}"
    with pytest.raises(ServiceError, match=f"PACS {closed}"):
        send_dicom([f], closed, timeout=5)
    report = send_dicom([f], orthanc["pacs"])
    assert report.sent == [f] and not report.failed
    folder, _ = _molli_dicom(tmp_path)
    rc = main(
        [
            "fit",
            "molli",
            "--data",
            str(folder),
            "--out",
            str(tmp_path / "o"),
            "--no-figure",
            "--send-to",
            wrong,
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "refused the association" in err


def test_parse_pacs_url():
    a = parse_pacs_url("pacs://ORTHANC@pacs.example.org:4242")
    assert (a.aet, a.host, a.port) == ("ORTHANC", "pacs.example.org", 4242)
    assert parse_pacs_url("pacs://X@[::1]").port == 104
    for bad in (
        "ORTHANC@host:4242",
        "pacs://host:4242",
        "pacs://A@h:99999",
        "pacs://THIS_TITLE_IS_TOO_LONG@h:1",
    ):
        with pytest.raises(ParameterError):
            parse_pacs_url(bad)
    assert main(["fit", "molli", "--data", ".", "--out", "o", "--send-to", "http://x"]) == 2
