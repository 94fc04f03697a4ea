"""NIfTI order and the NIfTI affine of MRD scans, checked against hand-built matrices."""

import math

import numpy as np
import pytest
import torch

from qmrkit import sim
from qmrkit.errors import ShapeError
from qmrkit.io import read_mrd, write_mrd
from qmrkit.io.geometry import (
    ScanGeometry,
    affine_from_mrd,
    affines_match,
    from_nifti_order,
    map_from_nifti,
    to_nifti_order,
)

pytest.importorskip("ismrmrd", reason="MRD geometry tests need the 'mrd' extra")
nib_affines = pytest.importorskip("nibabel.affines")


def test_nifti_order_numpy_and_torch():
    a = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)  # (batch, z, y, x)
    b = to_nifti_order(a, 3)
    assert b.shape == (2, 5, 4, 3) and b[1, 4, 2, 0] == a[1, 0, 2, 4]
    np.testing.assert_array_equal(from_nifti_order(b, 3), a)
    t = torch.as_tensor(a)
    assert torch.equal(to_nifti_order(t, 2), t.transpose(-1, -2))
    assert torch.equal(from_nifti_order(to_nifti_order(t, 3), 3), t)


def test_map_from_nifti_names_both_orders():
    m = np.random.default_rng(0).random((6, 4))  # NIfTI (x, y) of a (ny, nx) = (4, 6) image
    np.testing.assert_array_equal(map_from_nifti(m, (4, 6)), m.T)
    with pytest.raises(ShapeError, match=r"looks like array \(y, x\[, z\]\) order.*\(6, 4\)"):
        map_from_nifti(m.T, (4, 6))
    with pytest.raises(ShapeError, match=r"shape \(5, 4\) but the image is \(6, 4\)"):
        map_from_nifti(np.ones((5, 4)), (4, 6))


def _oblique():
    a = math.radians(25.0)
    return ScanGeometry(
        position=(12.0, -30.0, 45.0),
        read_dir=(math.cos(a), math.sin(a), 0.0),
        phase_dir=(-math.sin(a), math.cos(a), 0.0),
        slice_dir=(0.0, 0.0, 1.0),
    )


def test_oblique_affine_against_hand_built_matrix(tmp_path):
    """3D oblique Cartesian scan: file → affine equals nibabel's from_matvec of the LPS→RAS
    rotated, scaled directions, and known voxels land at the hand-computed mm positions."""
    s = sim.raw_scan((6, 8, 10), n_coils=2, acceleration=1, calib=0, fov_mm=200.0)
    s.geometry = _oblique()
    r = read_mrd(write_mrd(tmp_path / "obl.h5", s))
    for name in ("position", "read_dir", "phase_dir", "slice_dir"):
        np.testing.assert_allclose(getattr(r.geometry, name), getattr(s.geometry, name), atol=1e-6)
    voxel = np.array([200 / 10, 200 / 8, 200 / 6])  # x (read), y (phase), z (partition), mm
    g = s.geometry
    dirs_lps = np.stack([g.read_dir, g.phase_dir, g.slice_dir], axis=1)
    flip = np.diag([-1.0, -1.0, 1.0])
    centre = np.array([10 // 2, 8 // 2, 6 // 2])
    origin_lps = np.array(g.position) - dirs_lps @ (voxel * centre)
    expected = nib_affines.from_matvec(flip @ dirs_lps @ np.diag(voxel), flip @ origin_lps)
    np.testing.assert_allclose(r.affine, expected, atol=1e-4)
    import ismrmrd

    ds = ismrmrd.Dataset(str(tmp_path / "obl.h5"), "dataset", create_if_needed=False)
    acq = ds.read_acquisition(1)  # 0 is the noise scan
    np.testing.assert_allclose(affine_from_mrd(ds.read_xml_header(), acq), r.affine, atol=1e-12)
    ds.close()
    # voxel (i, j, k) centre: position + (i-5)·20·read + (j-4)·25·phase + (k-3)·33.3·slice (LPS)
    for ijk in [(5, 4, 3), (0, 0, 0), (9, 7, 5), (2, 6, 1)]:
        off = np.array(ijk) - centre
        lps = np.array(g.position) + dirs_lps @ (off * voxel)
        ras = nib_affines.apply_affine(r.affine, ijk)
        np.testing.assert_allclose(ras, [-lps[0], -lps[1], lps[2]], atol=1e-4)


def test_2d_affine_uses_slice_thickness_and_identity_without_geometry():
    s = sim.mrf_scan((20, 16), n_coils=2, schedule=None, n_interleaves=8, samples=64)
    dx = 250.0 / 20  # larger axis spans 250 mm
    np.testing.assert_allclose(
        s.affine,
        [[-dx, 0, 0, dx * 8], [0, -dx, 0, dx * 10], [0, 0, 5.0, 0], [0, 0, 0, 1]],
        atol=1e-9,
    )
    assert affines_match(s.affine, s.affine + 1e-6)
    shifted = s.affine.copy()
    shifted[0, 3] += dx
    assert not affines_match(s.affine, shifted)
    assert not affines_match(s.affine, s.affine @ np.diag([1, 1, 2, 1]))
