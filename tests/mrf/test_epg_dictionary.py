"""EPG against an independent Bloch simulation; dictionaries; matching."""

import numpy as np
import pytest
import torch

from qmrkit import mrf
from qmrkit.errors import DataFileError, ParameterError, ShapeError

from .bloch import bloch_fisp


@pytest.mark.parametrize(
    "t1, t2, b1",
    [(1000.0, 100.0, 1.0), (300.0, 40.0, 0.8), (2000.0, 500.0, 1.2), (800.0, 15.0, 1.0)],
)
def test_epg_matches_isochromat_bloch(t1, t2, b1):
    sched = mrf.fisp_schedule(120, seed=1)
    epg = mrf.epg_fisp(sched, [t1], [t2], [b1], dtype=torch.float64, tol=1e-12)[0].numpy()
    ref = bloch_fisp(sched.flip_angles, sched.tr, sched.te, sched.phase, t1, t2, b1, ti=sched.ti)
    assert np.abs(epg - ref).max() <= 1e-3 * np.abs(ref).max()
    assert np.abs(epg - ref).max() <= 1e-14  # measured 2e-16 to 8e-16: equal to rounding


def test_epg_with_rf_phases_and_no_inversion():
    rng = np.random.default_rng(0)
    sched = mrf.Schedule(
        rng.uniform(5, 60, 60),
        rng.uniform(10, 15, 60),
        2.5,
        rng.uniform(0, 360, 60),
        inversion=False,
    )
    epg = mrf.epg_fisp(sched, [900.0], [70.0], [0.9], dtype=torch.float64, tol=1e-12)[0].numpy()
    ref = bloch_fisp(
        sched.flip_angles, sched.tr, sched.te, sched.phase, 900.0, 70.0, 0.9, inversion=False
    )
    assert np.abs(epg - ref).max() <= 1e-14


def test_epg_truncation_and_float32():
    """The default truncation tolerance and float32 stay within 1e-4 of the exact simulation."""
    sched = mrf.fisp_schedule(400, seed=2)
    t1, t2 = np.array([300.0, 1000.0, 2500.0]), np.array([30.0, 90.0, 400.0])
    exact = mrf.epg_fisp(sched, t1, t2, dtype=torch.float64, tol=1e-14)
    approx = mrf.epg_fisp(sched, t1, t2)
    err = (approx.to(torch.complex128) - exact).abs().amax(1) / exact.abs().amax(1)
    assert float(err.max()) < 1e-4


def test_slice_profile_is_weighted_sum():
    sched = mrf.fisp_schedule(80, seed=3)
    prof = mrf.epg_fisp(
        sched, [1000.0], [80.0], slice_profile=([0.5, 1.0], [1.0, 3.0]), dtype=torch.float64
    )
    a = mrf.epg_fisp(sched, [1000.0], [80.0], [0.5], dtype=torch.float64)
    b = mrf.epg_fisp(sched, [1000.0], [80.0], [1.0], dtype=torch.float64)
    torch.testing.assert_close(prof, 0.25 * a + 0.75 * b)


@pytest.fixture(scope="module")
def small_dictionary():
    sched = mrf.fisp_schedule(300, seed=4)
    return mrf.Dictionary.build(
        sched,
        t1=mrf.log_grid(100, 3000, 0.15),
        t2=mrf.log_grid(10, 300, 0.15),
        b1=[0.8, 1.0, 1.2],
        dtype=torch.float64,
        energy=0.99999,
    )


def test_dictionary_grid_and_compression(small_dictionary):
    d = small_dictionary
    assert bool((d.t2 <= d.t1).all())
    assert torch.allclose(
        torch.linalg.vector_norm(d.atoms, dim=1), torch.ones(d.n_atoms, dtype=torch.float64)
    )
    assert d.energy >= 0.99999 and d.rank < 40
    # the basis is orthonormal and the compressed atoms keep ≥ 99.999 % of the energy on average
    eye = d.basis.conj().T @ d.basis
    torch.testing.assert_close(eye, torch.eye(d.rank, dtype=eye.dtype), atol=1e-10, rtol=0)
    kept = torch.linalg.vector_norm(d.project(d.atoms), dim=1) ** 2
    assert float(kept.mean()) >= 0.99999


def test_match_noiseless_atoms_exact(small_dictionary):
    d = small_dictionary
    idx = torch.tensor([3, 77, 400, d.n_atoms - 1])
    m0 = torch.tensor([0.5 + 0.2j, 1.0, 2.0 - 1.0j, 0.1j], dtype=torch.complex128)
    x = d.atoms[idx] * d.norms[idx, None] * m0[:, None]
    full = mrf.match(x, d)
    assert torch.equal(full.index, idx)
    torch.testing.assert_close(full.m0, m0)
    torch.testing.assert_close(full.score, torch.ones(4, dtype=torch.float64))
    sub = mrf.match(d.project(x), d)  # subspace coefficients: the same answer
    assert torch.equal(sub.index, idx)
    torch.testing.assert_close(sub.m0, m0, rtol=1e-3, atol=1e-4)
    exact = mrf.match(x, d, refine=False)
    torch.testing.assert_close(exact.t1, d.t1[idx])
    torch.testing.assert_close(exact.t2, d.t2[idx])
    # sub-grid refinement moves an on-grid atom by a small fraction of the grid step at most
    assert float((full.t1 / d.t1[idx] - 1).abs().max()) < 0.03
    assert float((full.t2 / d.t2[idx] - 1).abs().max()) < 0.03


def test_subgrid_refinement_beats_the_grid():
    """Off-grid tissues on a 10 % grid: refinement brings the error from ~grid/2 to below 1.5 %."""
    sched = mrf.fisp_schedule(400, seed=1)
    d = mrf.Dictionary.build(
        sched, t1=mrf.log_grid(100, 3000, 0.1), t2=mrf.log_grid(10, 300, 0.1), dtype=torch.float64
    )
    t1 = np.array([333.0, 777.0, 1234.0, 2000.0])
    t2 = np.array([33.0, 55.0, 111.0, 222.0])
    x = mrf.epg_fisp(sched, t1, t2, dtype=torch.float64) * 0.8
    coarse = mrf.match(x, d, refine=False)
    fine = mrf.match(x, d)
    err = lambda r, ref, k: np.abs(getattr(r, k).numpy() / ref - 1)  # noqa: E731
    assert err(fine, t1, "t1").max() < 0.015 and err(fine, t2, "t2").max() < 0.015
    assert err(fine, t1, "t1").mean() < 0.3 * err(coarse, t1, "t1").mean()
    sub = mrf.match(d.project(x), d)  # the subspace gives the same refined values
    np.testing.assert_allclose(sub.t1.numpy(), fine.t1.numpy(), rtol=2e-3)


def test_match_with_b1_map_searches_only_its_slice(small_dictionary):
    d = small_dictionary
    # atoms simulated at B1 = 1.2 but a B1 map claiming 0.8: the match must come from the 0.8 slice
    idx = torch.nonzero(d.b1 == 1.2).reshape(-1)[:5]
    x = d.atoms[idx].reshape(1, 5, -1)
    r = mrf.match(x, d, b1_map=np.full((1, 5), 0.8))
    assert bool((r.b1 == 0.8).all())
    r2 = mrf.match(x, d, b1_map=np.full((1, 5), 1.21))
    assert torch.equal(r2.index.reshape(-1), idx)
    with pytest.warns(mrf.B1RangeWarning, match="2 voxel"):
        r3 = mrf.match(x, d, b1_map=np.array([[1.5, 1.2, 1.2, 0.3, 1.0]]))
    assert r3.n_b1_clipped == 2


def test_dictionary_save_load(tmp_path, small_dictionary):
    p = small_dictionary.save(tmp_path / "dict.npz")
    d2 = mrf.Dictionary.load(p)
    assert d2.rank == small_dictionary.rank and d2.n_atoms == small_dictionary.n_atoms
    torch.testing.assert_close(d2.atoms, small_dictionary.atoms)
    np.testing.assert_array_equal(d2.schedule.flip_angles, small_dictionary.schedule.flip_angles)
    with pytest.raises(DataFileError):
        mrf.Dictionary.load(tmp_path / "missing.npz")


def test_schedule_io_and_bad_input(tmp_path):
    s = mrf.fisp_schedule(200, seed=5)
    assert s.n_tr == 200 and 11.5 <= s.tr.min() and s.tr.max() <= 14.5
    assert s.flip_angles.max() == pytest.approx(70.0, abs=0.5) and s.flip_angles.min() >= 5.0 - 1e-9
    p = s.save(tmp_path / "sched.txt")
    s2 = mrf.Schedule.load(p)
    np.testing.assert_allclose(s2.tr, s.tr)
    assert s2.inversion and s2.ti == s.ti
    with pytest.raises(ShapeError, match="equal length"):
        mrf.Schedule([10, 20, 30], [12, 12], 2.0)
    with pytest.raises(ParameterError, match="TR must exceed TE"):
        mrf.Schedule([10, 20], [12, 2.0], 2.0)
    with pytest.raises(ParameterError, match="empty after removing T2 > T1"):
        mrf.Dictionary.build(s, t1=[50.0, 80.0], t2=[100.0, 200.0])
    with pytest.raises(ShapeError, match="last axis"):
        d = mrf.Dictionary.build(mrf.fisp_schedule(50), t1=[500.0], t2=[50.0])
        mrf.match(np.ones((2, 7)), d)
