"""mrf_maps refuses inputs that do not fit the scan before any dictionary build or reconstruction."""

import numpy as np
import pytest

from qmrkit import mrf, pipelines, sim
from qmrkit.errors import ParameterError, ShapeError
from qmrkit.io import to_nifti_order


@pytest.fixture(scope="module")
def small_scan():
    # non-square (ny, nx) = (24, 20), a short schedule: cheap, and enough for shape checks
    return sim.mrf_scan((24, 20), n_coils=2, schedule=mrf.fisp_schedule(40), n_interleaves=8)


@pytest.fixture
def no_expensive_work(monkeypatch):
    """Fail the test if the dictionary build or the reconstruction starts."""
    from qmrkit.pipelines import mrf as pm

    def boom(*a, **k):
        raise AssertionError("expensive work started before the input was checked")

    monkeypatch.setattr(pm, "default_dictionary", boom)
    monkeypatch.setattr(mrf, "subspace_recon", boom)


def test_b1_in_array_order_is_refused_early(small_scan, no_expensive_work):
    b1 = small_scan.meta["truth"]["B1"]  # (ny, nx) = (24, 20): array order
    assert b1.shape == (24, 20)
    with pytest.raises(ShapeError, match=r"looks like array \(y, x\[, z\]\) order.*\(20, 24\)"):
        pipelines.mrf_maps(small_scan, b1_map=b1)
    with pytest.raises(ShapeError, match=r"shape \(20, 20\) but the image is \(20, 24\)"):
        pipelines.mrf_maps(small_scan, b1_map=np.ones((20, 20)))


def test_trajectory_that_disagrees_with_the_image_is_refused(small_scan, no_expensive_work):
    import copy

    s = copy.copy(small_scan)
    s.matrix_size = s.recon_size = (4, 24, 20)  # a 3D image from a 2D trajectory
    with pytest.raises(
        ShapeError, match=r"trajectory has 2 dimensions but the image .*\(4, 24, 20\)"
    ):
        pipelines.mrf_maps(s)
    s = copy.copy(small_scan)
    s.traj = None
    with pytest.raises(ParameterError, match="non-Cartesian"):
        pipelines.mrf_maps(s)
    s = copy.copy(small_scan)
    s.meta = {**s.meta, "frames": 39}
    with pytest.raises(ShapeError, match="39 frames"):
        pipelines.mrf_maps(s)


def test_maps_are_in_nifti_order_with_the_scan_affine(small_scan):
    """Non-square 2D: the maps have shape (nx, ny), equal the array-order match transposed."""
    d = mrf.Dictionary.build(
        small_scan.meta["schedule"],
        t1=mrf.log_grid(100, 3000, 0.3),
        t2=mrf.log_grid(10, 400, 0.3),
        keep_atoms=False,
    )
    m = pipelines.mrf_maps(small_scan, dictionary=d, pd_threshold=0)
    assert m.t1.shape == (20, 24) and m.pd.shape == (20, 24)
    np.testing.assert_array_equal(m.affine, small_scan.affine)
    # the same computation in array order through the domain functions
    from qmrkit.recon import walsh

    T = small_scan.meta["frames"]
    k = small_scan.kdata.reshape(2, T, -1)
    tr = small_scan.traj.reshape(T, -1, 2)
    cc = mrf.subspace_recon(k, tr, d.basis, (24, 20), eps=1e-3)
    s = walsh(cc[:, 0])
    x = (s.conj()[:, None] * cc).sum(0).movedim(0, -1)
    ref = mrf.match(x, d, mask=pipelines.object_mask(x).mask)
    np.testing.assert_array_equal(m.t1.numpy(), to_nifti_order(ref.t1.numpy(), 2))
