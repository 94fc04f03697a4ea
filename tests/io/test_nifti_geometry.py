"""NIfTI geometry at the file boundary: affines, qform/sform codes, units, sidecars, and the CLI
keeping an input's geometry on every map it writes."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from qmrkit import fit, models
from qmrkit.cli import main
from qmrkit.io import load_nifti, save_nifti
from qmrkit.io.nifti import jsonable, save_map, sidecar_path
from qmrkit.sim import MOLLI_TI, molli_series


def _oblique_affine() -> np.ndarray:
    """2.6 × 2.6 × 8 mm voxels rotated 20° about z and 10° about x, off-centre."""
    a, b = np.deg2rad(20), np.deg2rad(10)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    aff = np.eye(4)
    aff[:3, :3] = rz @ rx @ np.diag([2.6, 2.6, 8.0])
    aff[:3, 3] = [-120.5, 31.0, 12.25]
    return aff


def test_save_nifti_writes_qform_sform_codes_units_and_description(tmp_path):
    aff = _oblique_affine()
    p = save_nifti(tmp_path / "m.nii.gz", np.ones((3, 4), np.float32), affine=aff, description="x")
    img = nib.load(p)
    assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
    np.testing.assert_allclose(img.get_sform(), aff, atol=1e-6)
    np.testing.assert_allclose(img.get_qform(), aff, atol=1e-4)  # quaternion storage: float32
    assert img.header.get_xyzt_units()[0] == "mm"
    assert img.header["descrip"].tobytes().rstrip(b"\0") == b"x"
    # no affine: identity marked unknown, never a pretend scanner position
    q = nib.load(save_nifti(tmp_path / "n.nii.gz", np.ones((3, 4), np.float32)))
    assert int(q.header["qform_code"]) == 0 and int(q.header["sform_code"]) == 0


def test_like_keeps_the_input_codes(tmp_path):
    aff = _oblique_affine()
    src = nib.Nifti1Image(np.zeros((4, 5, 2), np.float32), aff)
    src.set_qform(aff, code=1)
    src.set_sform(aff, code=2)  # 'aligned', e.g. after registration
    nib.save(src, tmp_path / "in.nii.gz")
    _, aff_in, hdr = load_nifti(tmp_path / "in.nii.gz", with_header=True)
    out = nib.load(save_nifti(tmp_path / "out.nii.gz", np.ones((4, 5, 2)), like=hdr))
    assert (int(out.header["qform_code"]), int(out.header["sform_code"])) == (1, 2)
    np.testing.assert_allclose(out.affine, aff_in, atol=1e-6)
    assert out.get_data_dtype() == np.float32


def test_save_map_sidecar_has_units_and_provenance(tmp_path):
    nii, js = save_map(
        tmp_path,
        "T1map",
        torch.full((3, 4), 1000.0),
        unit="ms",
        description="T1",
        affine=np.diag([2.0, 2.0, 5.0, 1.0]),
        provenance={"Sources": ["in.nii.gz"], "Settings": {"ti": np.array([100.0, 200.0])}},
    )
    assert js == sidecar_path(nii) == tmp_path / "T1map.json"
    side = json.loads(js.read_text())
    assert side["Units"] == "ms" and side["Sources"] == ["in.nii.gz"]
    assert side["Settings"]["ti"] == [100.0, 200.0]
    assert side["GeneratedBy"][0]["Name"] == "qmrkit"
    np.testing.assert_array_equal(load_nifti(nii)[0], np.full((3, 4), 1000.0, np.float32))


def test_jsonable_converts_arrays_tensors_and_scalars():
    got = jsonable(
        {"a": np.float32(1.5), "b": torch.tensor([1, 2]), "c": (np.int64(3),), "d": 1 + 2j}
    )
    assert got == {"a": 1.5, "b": [1, 2], "c": [3], "d": "(1+2j)"}
    assert jsonable(np.zeros((100, 100))) == "array(100, 100)"


def test_cli_fit_maps_keep_geometry_and_equal_in_process_fit(tmp_path):
    """Non-square, oblique, 'aligned' input: every map keeps affine and codes, has a sidecar, and
    its values equal ``fit.lm`` on the array ``load_nifti`` returns (the file crossing changes
    nothing)."""
    t1 = np.linspace(400, 2000, 35).reshape(5, 7)
    series, _ = molli_series(t1, 1000.0, MOLLI_TI, snr=200, seed=3)
    aff = _oblique_affine()
    src = nib.Nifti1Image(series[:, :, None, :].astype(np.float32), aff)  # (x, y, z=1, TI)
    src.set_qform(aff, code=1)
    src.set_sform(aff, code=2)
    nib.save(src, tmp_path / "series.nii.gz")
    ti = ",".join(f"{t:g}" for t in MOLLI_TI)
    argv = ["fit", "molli", "--data", str(tmp_path / "series.nii.gz"), "--ti", ti]
    assert main([*argv, "--out", str(tmp_path / "maps"), "--no-progress", "--no-figure"]) == 0
    data, _ = load_nifti(tmp_path / "series.nii.gz")
    ref = fit.lm(models.MolliT1(ti=list(MOLLI_TI)), data, progress=False)
    for stem, name in (("T1map", "T1"), ("T1starmap", "T1star")):
        img = nib.load(tmp_path / "maps" / f"{stem}.nii.gz")
        assert img.shape == (5, 7, 1)
        assert (int(img.header["qform_code"]), int(img.header["sform_code"])) == (1, 2)
        np.testing.assert_allclose(img.affine, aff, atol=1e-6)
        assert img.header.get_xyzt_units()[0] == "mm"
        np.testing.assert_allclose(
            np.asarray(img.dataobj), ref[name].numpy(), rtol=1e-6, equal_nan=True
        )
        side = json.loads((tmp_path / "maps" / f"{stem}.json").read_text())
        assert side["Units"] == "ms" and side["Sources"] == [str(tmp_path / "series.nii.gz")]
        assert side["Model"] == "molli" and side["Solver"] == "lm"
    assert np.median(np.abs(ref["T1"].numpy()[..., 0] - t1) / t1) < 0.01


@pytest.mark.parametrize("stem", ["residual", "converged"])
def test_cli_fit_auxiliary_maps_have_sidecars(tmp_path, stem):
    t1 = np.full((3, 4), 900.0)
    series, _ = molli_series(t1, 1000.0, MOLLI_TI, snr=500, seed=1)
    save_nifti(tmp_path / "s.nii.gz", series.astype(np.float32), affine=np.diag([2, 2, 4, 1.0]))
    ti = ",".join(f"{t:g}" for t in MOLLI_TI)
    argv = ["fit", "molli", "--data", str(tmp_path / "s.nii.gz"), "--ti", ti, "--no-figure"]
    assert main([*argv, "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    side = json.loads((tmp_path / "o" / f"{stem}.json").read_text())
    assert side["Sources"] == [str(tmp_path / "s.nii.gz")]
    img = nib.load(tmp_path / "o" / f"{stem}.nii.gz")
    np.testing.assert_allclose(img.affine, np.diag([2, 2, 4, 1.0]))
