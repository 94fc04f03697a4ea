"""MRF through files and the CLI: a non-square scan with a B1 map from NIfTI (the 191 vs 271 ms
T2 case) and a 3D stack of spirals (write_mrd → qmrkit mrf → 3D maps); values compared with the
in-process pipeline and with the phantom's truth."""

import numpy as np
import pytest

from qmrkit import mrf, pipelines, sim
from qmrkit.cli import main
from qmrkit.io import load_nifti, read_mrd, save_nifti, to_nifti_order, write_mrd

pytest.importorskip("ismrmrd", reason="MRF file tests need the 'mrd' extra")
pytestmark = pytest.mark.slow
T2_MAX_IN_DICTIONARY = 500.0


def _sphere_medians(t1, t2, truth):
    """Per-sphere (truth T1, T2, median T1, T2), maps and truth in NIfTI order."""
    labels = to_nifti_order(truth["labels"], truth["labels"].ndim)
    rows = []
    for s in range(1, 15):
        sel = labels == s
        ref = truth["labels"] == s
        if not sel.any() or truth["T2"][ref][0] > T2_MAX_IN_DICTIONARY:
            continue
        rows.append(
            (truth["T1"][ref][0], truth["T2"][ref][0], np.median(t1[sel]), np.median(t2[sel]), s)
        )
    return np.array(rows)


def test_non_square_scan_with_nifti_b1_through_the_cli(tmp_path, capsys):
    scan = sim.mrf_scan((40, 48), n_coils=4, b1_amplitude=0.3, seed=0)  # (ny, nx)
    truth = scan.meta["truth"]
    path = write_mrd(tmp_path / "scan.h5", scan)
    b1 = to_nifti_order(truth["B1"], 2).astype(np.float32)  # (x, y) = (48, 40)
    b1_path = save_nifti(tmp_path / "b1.nii.gz", b1, affine=scan.affine)
    args = ["mrf", str(path), "--b1", str(b1_path), "--dictionary-step", "0.1", "--b1-step", "0.1"]
    assert main([*args, "--out", str(tmp_path / "maps")]) == 0
    t1, aff = load_nifti(tmp_path / "maps" / "T1map.nii.gz")
    t2, _ = load_nifti(tmp_path / "maps" / "T2map.nii.gz")
    assert t1.shape == (48, 40)
    np.testing.assert_allclose(aff, scan.affine, atol=1e-5)
    assert aff[0, 0] == pytest.approx(-250.0 / 48, rel=1e-6)  # 5.2 mm voxels, not 1 mm
    rows = _sphere_medians(t1, t2, truth)
    e1, e2 = np.abs(rows[:, 2] / rows[:, 0] - 1), np.abs(rows[:, 3] / rows[:, 1] - 1)
    assert len(rows) >= 10
    assert np.median(e1) <= 0.03 and np.median(e2) <= 0.05, (e1, e2)
    sphere4 = rows[rows[:, 4] == 4][0]
    assert abs(sphere4[3] / sphere4[1] - 1) <= 0.1, sphere4  # 191 ms, not 271
    capsys.readouterr()
    # the same B1 in array order (y, x): refused at once with one line, exit 2
    save_nifti(tmp_path / "b1T.nii.gz", b1.T, affine=scan.affine)
    bad = ["mrf", str(path), "--b1", str(tmp_path / "b1T.nii.gz"), "--out", str(tmp_path / "x")]
    assert main(bad) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "NIfTI order (x, y[, z])" in err and "(48, 40)" in err
    # right shape, other voxel grid (1 mm identity affine): refused
    save_nifti(tmp_path / "b1eye.nii.gz", b1)
    bad[3] = str(tmp_path / "b1eye.nii.gz")
    assert main(bad) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "another voxel grid" in err
    assert not (tmp_path / "x").exists()


def test_3d_stack_of_spirals_through_file_and_cli(tmp_path):
    """8 partitions, ×2 partition undersampling: the file gives 3D maps equal to the in-process
    pipeline on the same scan, with per-sphere errors like the in-memory pipeline's."""
    scan = sim.mrf_scan_3d((8, 24, 24), n_coils=4, partition_undersampling=2, seed=0)
    truth = scan.meta["truth"]
    path = write_mrd(tmp_path / "scan3d.h5", scan)
    read = read_mrd(path)
    assert read.matrix_size == (8, 24, 24) and read.traj.shape == scan.traj.shape
    b1 = to_nifti_order(truth["B1"], 3).astype(np.float32)  # (x, y, z)
    b1_path = save_nifti(tmp_path / "b1.nii.gz", b1, affine=read.affine)
    d = mrf.Dictionary.build(
        scan.meta["schedule"],
        t1=mrf.log_grid(10, 4000, 0.1),
        t2=mrf.log_grid(1, 500, 0.1),
        b1=pipelines.b1_grid(b1, 0.1),
        keep_atoms=False,
    )
    d_path = d.save(tmp_path / "dictionary.npz")
    out = tmp_path / "maps"
    assert (
        main(
            ["mrf", str(path), "--b1", str(b1_path), "--dictionary", str(d_path), "--out", str(out)]
        )
        == 0
    )
    t1, aff = load_nifti(out / "T1map.nii.gz")
    t2, _ = load_nifti(out / "T2map.nii.gz")
    assert t1.shape == (24, 24, 8)
    np.testing.assert_allclose(aff, scan.affine, atol=1e-5)
    direct = pipelines.mrf_maps(read, dictionary=mrf.Dictionary.load(d_path), b1_map=b1)
    np.testing.assert_allclose(t1, direct.t1.numpy(), rtol=1e-6, equal_nan=True)
    np.testing.assert_allclose(t2, direct.t2.numpy(), rtol=1e-6, equal_nan=True)
    memory = pipelines.mrf_maps(scan, dictionary=d, b1_map=b1)  # the scan before the file
    for t1m, t2m in ((t1, t2), (memory.t1.numpy(), memory.t2.numpy())):
        rows = _sphere_medians(t1m, t2m, truth)
        e1, e2 = np.abs(rows[:, 2] / rows[:, 0] - 1), np.abs(rows[:, 3] / rows[:, 1] - 1)
        assert len(rows) >= 10
        assert np.median(e1) <= 0.03 and np.median(e2) <= 0.05, (e1, e2)
