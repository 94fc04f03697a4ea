"""MRF end to end on a simulated 2D NIST-phantom scan: accuracy per sphere, with and without B1.

Pipelines take and return NIfTI order (x, y[, z]); the simulation's truth is array order, so the
tests convert it with :func:`qmrkit.io.to_nifti_order` (``nifti`` below).
"""

import numpy as np
import pytest

from qmrkit import mrf, pipelines, sim
from qmrkit.io import to_nifti_order


def nifti(a):
    return to_nifti_order(np.asarray(a), np.ndim(a))


pytestmark = pytest.mark.slow
T2_MAX_IN_DICTIONARY = 500.0


@pytest.fixture(scope="module")
def scan_and_dictionary():
    scan = sim.mrf_scan((64, 64), n_coils=4, b1_amplitude=0.3, noise_level=0.002, seed=0)
    b1 = np.round(np.arange(0.6, 1.45, 0.1), 3)
    d = mrf.Dictionary.build(
        scan.meta["schedule"],
        t1=mrf.log_grid(10, 4000, 0.08),
        t2=mrf.log_grid(1, 500, 0.08),
        b1=b1,
        keep_atoms=False,
    )
    return scan, d


def _sphere_errors(maps, truth):
    e1, e2 = [], []
    truth = {k: nifti(truth[k]) for k in ("labels", "T1", "T2")}
    for s in range(1, 15):
        sel = truth["labels"] == s
        t1r, t2r = truth["T1"][sel][0], truth["T2"][sel][0]
        if t2r > T2_MAX_IN_DICTIONARY:
            continue  # outside the dictionary's range
        e1.append(abs(np.median(maps.t1.numpy()[sel]) / t1r - 1))
        e2.append(abs(np.median(maps.t2.numpy()[sel]) / t2r - 1))
    return np.array(e1), np.array(e2)


def test_nist_accuracy_with_b1_correction(scan_and_dictionary):
    scan, d = scan_and_dictionary
    truth = scan.meta["truth"]
    corrected = pipelines.mrf_maps(scan, dictionary=d, b1_map=nifti(truth["B1"]))
    e1, e2 = _sphere_errors(corrected, truth)
    assert np.median(e1) <= 0.03, e1
    assert np.median(e2) <= 0.05, e2
    # ignoring the ±30 % B1 field (every voxel matched at nominal B1) is markedly worse for T2
    uncorrected = pipelines.mrf_maps(scan, dictionary=d, b1_map=np.ones_like(truth["B1"]))
    u1, u2 = _sphere_errors(uncorrected, truth)
    assert np.median(u2) >= 2 * np.median(e2), (np.median(u2), np.median(e2))
    assert corrected.stages["total"] > 0 and {"subspace_recon", "matching"} <= set(corrected.stages)


def test_b1_outside_dictionary_is_clipped_with_warning(scan_and_dictionary):
    scan, d = scan_and_dictionary
    b1 = nifti(scan.meta["truth"]["B1"]).copy()
    # B1 beyond the dictionary's 1.4 in the object's half x < 32 (background voxels are not matched)
    half = nifti(scan.meta["truth"]["PD"]) > 0
    half[32:] = False
    b1[half] = 2.0
    with pytest.warns(mrf.B1RangeWarning, match="voxel"):
        m = pipelines.mrf_maps(scan, dictionary=d, b1_map=b1)
    assert m.info["b1_clipped"] >= 0.5 * half.sum()


def test_frames_must_match_schedule(scan_and_dictionary):
    from qmrkit.errors import ShapeError

    scan, d = scan_and_dictionary
    short = mrf.fisp_schedule(999, seed=0)
    with pytest.raises(ShapeError, match="frames"):
        pipelines.mrf_maps(scan, dictionary=d, schedule=short)


def test_3d_stack_of_spirals_with_partition_undersampling(scan_and_dictionary):
    """3D stack of spirals, ×2 interleaved partition undersampling, ±30 % B1: similar accuracy."""
    scan = sim.mrf_scan_3d((8, 48, 48), n_coils=4, partition_undersampling=2, seed=0)
    truth = scan.meta["truth"]
    assert scan.traj.shape[-1] == 3 and scan.meta["partition_undersampling"] == 2
    # the 2D scan's dictionary serves: the same schedule and T1/T2 grid (step 0.08), and B1
    # values 0.6–1.4 in steps of 0.1 that contain this scan's b1_grid (0.8–1.3), so every voxel
    # is matched among the same atoms as with a dictionary built for this scan's B1 range alone
    d = scan_and_dictionary[1]
    for k in ("flip_angles", "tr", "te"):
        np.testing.assert_array_equal(getattr(d.schedule, k), getattr(scan.meta["schedule"], k))
    assert d.schedule.ti == scan.meta["schedule"].ti
    np.testing.assert_allclose(d.grid[0], mrf.log_grid(10, 4000, 0.08))
    np.testing.assert_allclose(d.grid[1], mrf.log_grid(1, 500, 0.08))
    assert set(pipelines.b1_grid(truth["B1"], 0.1)) <= set(np.round(d.grid[2], 4))
    maps = pipelines.mrf_maps(scan, dictionary=d, b1_map=nifti(truth["B1"]))
    assert maps.t1.shape == (48, 48, 8)  # NIfTI order (x, y, z)
    e1, e2 = [], []
    truth = {k: nifti(truth[k]) for k in ("labels", "T1", "T2")}
    for s in range(1, 15):
        sel = truth["labels"] == s
        if not sel.any() or truth["T2"][sel][0] > T2_MAX_IN_DICTIONARY:
            continue
        e1.append(abs(np.median(maps.t1.numpy()[sel]) / truth["T1"][sel][0] - 1))
        e2.append(abs(np.median(maps.t2.numpy()[sel]) / truth["T2"][sel][0] - 1))
    assert len(e1) >= 10
    assert np.median(e1) <= 0.03 and np.median(e2) <= 0.05, (e1, e2)
