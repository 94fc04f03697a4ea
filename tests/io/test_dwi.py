"""DWI input: NIfTI + FSL bval/bvec (+ protocol, sidecar), checked against DIPY on the same files."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from qmrkit.errors import DataFileError, ParameterError, ShapeError
from qmrkit.io.dwi import (
    check_gradients,
    fsl_bvecs_to_voxel,
    fsl_bvecs_to_world,
    load_dwi,
    read_dwi_protocol,
)

dipy_gradients = pytest.importorskip("dipy.core.gradients")
dipy_io = pytest.importorskip("dipy.io.gradients")


def _rotation(ax: float, az: float) -> np.ndarray:
    a, b = np.deg2rad(az), np.deg2rad(ax)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx


def _oblique_affine(flip_i: bool) -> np.ndarray:
    """2 × 2.5 × 3 mm voxels rotated 25° about z and 15° about x; flip_i stores i as R→L."""
    aff = np.eye(4)
    zooms = np.diag([-2.0 if flip_i else 2.0, 2.5, 3.0])
    aff[:3, :3] = _rotation(15, 25) @ zooms
    aff[:3, 3] = [-40.0, 12.0, 7.5]
    return aff


def _gradients(n_dw: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """bvals (s/mm²) and bvecs (n, 3): two b = 0 (one zero vector, one unit), two shells."""
    rng = np.random.default_rng(seed)
    g = rng.normal(size=(n_dw, 3))
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    bvals = np.r_[0.0, 5.0, np.where(np.arange(n_dw) % 2 == 0, 1000.0, 2500.0)]
    bvecs = np.vstack([[0, 0, 0], [1, 0, 0], g])
    return bvals, bvecs


def _write(tmp_path, data, affine, bvals, bvecs, name="dwi"):
    nib.save(nib.Nifti1Image(data.astype(np.float32), affine), tmp_path / f"{name}.nii.gz")
    np.savetxt(tmp_path / f"{name}.bval", bvals[None], fmt="%.6f")
    np.savetxt(tmp_path / f"{name}.bvec", bvecs.T, fmt="%.10f")  # FSL: 3 rows
    return (tmp_path / f"{name}.nii.gz", tmp_path / f"{name}.bval", tmp_path / f"{name}.bvec")


@pytest.mark.parametrize("flip_i", [False, True])
def test_gradient_table_equals_dipy_on_same_files(tmp_path, flip_i):
    bvals, bvecs = _gradients()
    data = np.random.default_rng(1).uniform(1, 2, size=(3, 4, 2, bvals.size))
    files = _write(tmp_path, data, _oblique_affine(flip_i), bvals, bvecs)
    dwi = load_dwi(*files)
    b, v = dipy_io.read_bvals_bvecs(str(files[1]), str(files[2]))
    gtab = dipy_gradients.gradient_table(b, bvecs=v)
    np.testing.assert_allclose(dwi.bvals, gtab.bvals / 1000.0, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(dwi.b0_mask, gtab.b0s_mask)
    dw = ~gtab.b0s_mask
    # DIPY takes FSL's numbers unchanged; so does qmrkit (to the 1e-10 the text file keeps)
    np.testing.assert_allclose(dwi.bvecs[dw], gtab.bvecs[dw], atol=1e-9)
    np.testing.assert_allclose(np.linalg.norm(dwi.bvecs[dw], axis=1), 1.0, atol=1e-15)
    np.testing.assert_allclose(dwi.data, data.astype(np.float32))
    np.testing.assert_allclose(dwi.affine, _oblique_affine(flip_i), atol=1e-6)


@pytest.mark.parametrize("flip_i", [False, True])
def test_world_frame_equals_dipy_reorientation(tmp_path, flip_i):
    """qmrkit's world vectors = DIPY's reorient_bvecs applied to the voxel-frame table with the
    inverse of the affine's rotation (reorient_bvecs applies the inverse of what it is given)."""
    bvals, bvecs = _gradients()
    aff = _oblique_affine(flip_i)
    files = _write(tmp_path, np.ones((2, 2, 2, bvals.size)), aff, bvals, bvecs)
    dwi = load_dwi(*files)
    vox = dwi.bvecs_voxel()
    # det(affine) > 0 iff the i axis is stored L→R: then FSL's x component is negated
    assert (np.linalg.det(aff[:3, :3]) > 0) == (not flip_i)
    np.testing.assert_array_equal(vox[:, 0], dwi.bvecs[:, 0] * (-1.0 if not flip_i else 1.0))
    m = dwi.affine[:3, :3]  # as stored (float32 in the file)
    rot = m / np.linalg.norm(m, axis=0)  # no shear: columns / voxel sizes
    gtab = dipy_gradients.gradient_table(dwi.bvals * 1000.0, bvecs=vox)
    n_dw = int((~gtab.b0s_mask).sum())
    moved = dipy_gradients.reorient_bvecs(gtab, np.repeat(rot.T[..., None], n_dw, axis=-1))
    dw = ~dwi.b0_mask
    np.testing.assert_allclose(dwi.bvecs_world()[dw], moved.bvecs[dw], atol=1e-12)
    # the file keeps the affine in float32, so its columns are orthogonal to ~1e-8 only: the polar
    # factor and the normalised columns then agree to that level
    np.testing.assert_allclose(dwi.bvecs_world()[dw], vox[dw] @ rot.T, atol=1e-7)


def test_fsl_bvecs_do_not_depend_on_storage_order():
    """FSL's point: one physical direction has one bvec whether i is stored L→R or R→L; the same
    bvec file thus gives the same world direction for both storages of one acquisition."""
    g = np.array([[0.6, 0.0, 0.8], [0.0, 1.0, 0.0], [-0.36, 0.48, 0.8]])
    w_ras = fsl_bvecs_to_world(g, _oblique_affine(flip_i=False))
    w_las = fsl_bvecs_to_world(g, _oblique_affine(flip_i=True))
    np.testing.assert_allclose(w_ras, w_las, atol=1e-14)
    # and for a plain RAS image the world frame is FSL's with x negated
    np.testing.assert_allclose(fsl_bvecs_to_world(g, np.diag([2.0, 2, 2, 1])), g * [-1, 1, 1])
    np.testing.assert_allclose(fsl_bvecs_to_voxel(g, np.diag([-2.0, 2, 2, 1])), g)


@pytest.mark.parametrize("name", ["small_64D", "small_101D", "small_25"])
def test_dipy_bundled_files(name):
    """The DWI files shipped inside the dipy wheel (no download) read like DIPY reads them."""
    from dipy.data import get_fnames

    fimg, fbval, fbvec = get_fnames(name=name)
    dwi = load_dwi(fimg, fbval, fbvec)
    b, v = dipy_io.read_bvals_bvecs(str(fbval), str(fbvec))
    gtab = dipy_gradients.gradient_table(b, bvecs=v)
    ref = nib.load(str(fimg))
    assert dwi.data.shape == ref.shape and dwi.data.dtype == np.float32
    np.testing.assert_allclose(dwi.data, ref.get_fdata(), rtol=1e-6)
    np.testing.assert_allclose(dwi.bvals * 1000.0, gtab.bvals, rtol=1e-12)
    np.testing.assert_array_equal(dwi.b0_mask, gtab.b0s_mask)
    dw = ~gtab.b0s_mask
    # DIPY does not normalise; its vectors are unit within its atol, ours exactly
    np.testing.assert_allclose(dwi.bvecs[dw], gtab.bvecs[dw], atol=1e-2)
    unit = gtab.bvecs[dw] / np.linalg.norm(gtab.bvecs[dw], axis=1, keepdims=True)
    np.testing.assert_allclose(dwi.bvecs[dw], unit, atol=1e-12)


def test_protocol_yaml_and_tsv(tmp_path):
    bvals, bvecs = _gradients(n_dw=4)
    files = _write(tmp_path, np.ones((2, 2, 1, 6)), np.eye(4), bvals, bvecs)
    (tmp_path / "p.yaml").write_text(
        "b: [0, 0.005, 1.0, 2.5, 1.0, 2.5]\nsmall_delta: 7.0\nbig_delta: [13, 13, 13, 30, 30, 30]\n"
    )
    dwi = load_dwi(*files, protocol=tmp_path / "p.yaml")
    np.testing.assert_array_equal(dwi.small_delta, np.full(6, 7.0))
    np.testing.assert_array_equal(dwi.big_delta, [13, 13, 13, 30, 30, 30])
    (tmp_path / "p.tsv").write_text(
        "# b in ms/um^2, delta in ms\nb\tsmall_delta\tbig_delta\n"
        + "".join(
            f"{b / 1000}\t8\t{d}\n" for b, d in zip(bvals, [13, 13, 20, 20, 30, 30], strict=True)
        )
    )
    t = read_dwi_protocol(tmp_path / "p.tsv", 6)
    np.testing.assert_allclose(t["b"], bvals / 1000)
    np.testing.assert_array_equal(t["big_delta"], [13, 13, 20, 20, 30, 30])
    # b from the protocol alone (no bval file)
    dwi2 = load_dwi(files[0], None, files[2], protocol=tmp_path / "p.tsv")
    np.testing.assert_allclose(dwi2.bvals, bvals / 1000)
    # a protocol whose b disagrees with the bval file
    (tmp_path / "bad.yaml").write_text("b: [0, 0, 1.0, 2.0, 1.0, 2.5]\n")
    with pytest.raises(ParameterError, match="disagree"):
        load_dwi(*files, protocol=tmp_path / "bad.yaml")
    (tmp_path / "short.yaml").write_text("big_delta: [13, 30]\n")
    with pytest.raises(ShapeError, match="2 values but the series has 6"):
        load_dwi(*files, protocol=tmp_path / "short.yaml")
    (tmp_path / "typo.yaml").write_text("Delta: 13\n")
    with pytest.raises(ParameterError, match="unknown keys"):
        load_dwi(*files, protocol=tmp_path / "typo.yaml")


def test_sidecar_seconds_to_ms(tmp_path):
    bvals, bvecs = _gradients(n_dw=4)
    files = _write(tmp_path, np.ones((2, 2, 1, 6)), np.eye(4), bvals, bvecs)
    (tmp_path / "dwi.json").write_text(json.dumps({"SmallDelta": 0.0071, "BigDelta": 0.0215}))
    dwi = load_dwi(*files, json=tmp_path / "dwi.json")
    np.testing.assert_allclose(dwi.small_delta, np.full(6, 7.1))
    np.testing.assert_allclose(dwi.big_delta, np.full(6, 21.5))
    (tmp_path / "alt.json").write_text(
        json.dumps({"DiffusionGradientDuration": 0.008, "DiffusionGradientSeparation": [0.02] * 6})
    )
    dwi = load_dwi(*files, json=tmp_path / "alt.json")
    np.testing.assert_allclose(dwi.small_delta, np.full(6, 8.0))
    np.testing.assert_allclose(dwi.big_delta, np.full(6, 20.0))
    (tmp_path / "ms.json").write_text(json.dumps({"SmallDelta": 7.1}))
    with pytest.raises(ParameterError, match="looks like milliseconds"):
        load_dwi(*files, json=tmp_path / "ms.json")
    (tmp_path / "p.yaml").write_text("small_delta: 9\n")
    with pytest.raises(ParameterError, match="differs between protocol"):
        load_dwi(*files, protocol=tmp_path / "p.yaml", json=tmp_path / "dwi.json")


def test_bad_inputs(tmp_path):
    bvals, bvecs = _gradients(n_dw=4)
    files = _write(tmp_path, np.ones((2, 2, 1, 6)), np.eye(4), bvals, bvecs)
    with pytest.raises(ShapeError, match="6 volumes but there are 5 b-values"):
        np.savetxt(tmp_path / "short.bval", bvals[None, :5])
        load_dwi(files[0], tmp_path / "short.bval", files[2])
    with pytest.raises(ParameterError, match=r"volumes \[3\] have lengths \[0.9"):
        check_gradients(bvals / 1000, bvecs * np.array([1, 1, 1, 0.9, 1, 1])[:, None])
    with pytest.raises(ParameterError, match="no b = 0 volume"):
        check_gradients(bvals[2:] / 1000, bvecs[2:])
    with pytest.raises(ParameterError, match="negative b-values at volumes \\[2\\]"):
        check_gradients(bvals / 1000 * np.array([1, 1, -1, 1, 1, 1]), bvecs)
    zero_dw = bvecs.copy()
    zero_dw[4] = 0
    with pytest.raises(ParameterError, match=r"volumes \[4\]"):
        check_gradients(bvals / 1000, zero_dw)
    with pytest.raises(DataFileError, match="bvec file not found"):
        load_dwi(files[0], files[1], tmp_path / "missing.bvec")
    (tmp_path / "garbage.bvec").write_text("1 2 x\n")
    with pytest.raises(DataFileError, match="not a list of numbers"):
        load_dwi(files[0], files[1], tmp_path / "garbage.bvec")
    nib.save(nib.Nifti1Image(np.ones((2, 2, 6), np.float32), np.eye(4)), tmp_path / "3d.nii.gz")
    with pytest.raises(ShapeError, match="must be 4D"):
        load_dwi(tmp_path / "3d.nii.gz", files[1], files[2])
