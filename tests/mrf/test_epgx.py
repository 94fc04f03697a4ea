"""EPG-X (two-pool exchange, RF-spoiled SPGR) against independent references.

(a) A Bloch–McConnell isochromat simulation in NumPy float64: N isochromats spread over one 2π
    cycle of dephasing per TR, each carrying the 6-vector (Mx, My, Mz) of both pools, propagated
    over a TR by ``scipy.linalg.expm`` of the 6×6 Bloch–McConnell generator (relaxation, recovery
    and exchange) — no phase graph, no 2×2 closed form. With N > 2·n_tr the isochromat average is
    the exact continuous average, so both must agree to rounding.
(b) The closed-form ideal-spoiling steady state (Ernst for one pool, the 2×2 longitudinal
    Bloch–McConnell system for two), reached by the phase graph after enough TRs.
"""

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from qmrkit.errors import ParameterError, ShapeError
from qmrkit.mrf.epgx import epgx_spgr, exchange_matrix_exp, spgr_two_pool_steady_state

# torch loads its forward-mode decompositions through torch.jit.script once per process
pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning"
)


def _rot(alpha, phi):
    """Right-handed rotation by alpha about (cos phi, sin phi, 0)."""
    ux, uy = np.cos(phi), np.sin(phi)
    c, s = np.cos(alpha), np.sin(alpha)
    return np.array(
        [
            [c + ux * ux * (1 - c), ux * uy * (1 - c), uy * s],
            [uy * ux * (1 - c), c + uy * uy * (1 - c), -ux * s],
            [-uy * s, ux * s, c],
        ]
    )


def bloch_mcconnell_spgr(flip_deg, tr, t1a, t2a, t1b, t2b, f, k, spoil_deg, n_tr, n_iso):
    """Signal (pool a, pool b) right after pulse n_tr − 1, demodulated as in epgx_spgr."""
    kab = k / 1000.0
    kba = kab * (1 - f) / f
    m0 = np.array([1 - f, f])
    # 7×7 affine generator on (xa, ya, za, xb, yb, zb, 1): relaxation, exchange, recovery
    G = np.zeros((7, 7))
    for p, (t1, t2, kout, kin) in enumerate(((t1a, t2a, kab, kba), (t1b, t2b, kba, kab))):
        o, q = 3 * p, 3 * (1 - p)
        for j, r in ((0, 1 / t2), (1, 1 / t2), (2, 1 / t1)):
            G[o + j, o + j] = -r - kout
            G[o + j, q + j] = kin
        G[o + 2, 6] = m0[p] / t1
    P = scipy.linalg.expm(G * tr)
    theta = 2 * np.pi * np.arange(n_iso) / n_iso
    M = np.zeros((n_iso, 7))
    M[:, 2], M[:, 5], M[:, 6] = m0[0], m0[1], 1.0
    a = np.deg2rad(flip_deg)
    for n in range(n_tr):
        phi = np.deg2rad(spoil_deg) * n * (n + 1) / 2
        R = _rot(a, phi)
        M[:, 0:3] = M[:, 0:3] @ R.T
        M[:, 3:6] = M[:, 3:6] @ R.T
        if n == n_tr - 1:
            fa_ = (M[:, 0] + 1j * M[:, 1]).mean()
            fb_ = (M[:, 3] + 1j * M[:, 4]).mean()
            return 1j * np.exp(-1j * phi) * np.array([fa_, fb_])
        M = M @ P.T
        # gradient dephasing: isochromat j precesses by theta_j (both pools alike)
        c, s = np.cos(theta), np.sin(theta)
        for o in (0, 3):
            x, y = M[:, o].copy(), M[:, o + 1].copy()
            M[:, o], M[:, o + 1] = c * x - s * y, s * x + c * y
    raise AssertionError


@pytest.mark.parametrize(
    "flip,tr,t1a,t2a,t1b,t2b,f,k,spoil",
    [
        (20.0, 30.0, 1000.0, 60.0, 250.0, 15.0, 0.15, 5.0, 50.0),
        (60.0, 20.0, 800.0, 80.0, 300.0, 20.0, 0.3, 15.0, 117.0),
        (8.0, 25.0, 1200.0, 100.0, 234.0, 15.0, 0.1, 0.0, 50.0),
    ],
)
def test_epgx_matches_bloch_mcconnell_isochromats(flip, tr, t1a, t2a, t1b, t2b, f, k, spoil):
    n_tr = 60
    ref = bloch_mcconnell_spgr(flip, tr, t1a, t2a, t1b, t2b, f, k, spoil, n_tr, 2 * n_tr + 8)
    out = epgx_spgr(
        [flip], tr, t1a, t2a, t1b, t2b, f, k, spoil_increment=spoil, n_tr=n_tr, n_states=n_tr
    )
    got = out[0, 0].numpy()
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-11)
    # and the transient signal is not trivially real/ideal: RF spoiling left a phase and the
    # result differs from the ideal-spoiling value by more than the tolerance used above
    ideal = epgx_spgr([flip], tr, t1a, t2a, t1b, t2b, f, k, spoiling="ideal", n_tr=n_tr)
    assert np.abs(got - ideal[0, 0].numpy()).max() > 1e-5


def test_truncated_states_stay_within_tol():
    """Default state truncation (tol) changes the signal by no more than ~tol."""
    args = ([5.0, 15.0, 40.0], 30.0, 1000.0, 70.0, 250.0, 15.0, 0.2, 8.0)
    full = epgx_spgr(*args, n_tr=300, n_states=300)
    trunc = epgx_spgr(*args, n_tr=300, tol=1e-6)
    assert (full - trunc).abs().max() < 2e-6


def test_ernst_one_pool():
    """k = 0: each pool is its own Ernst steady state; with T2 ≪ TR RF spoiling is ideal."""
    fa = np.array([2.0, 5.0, 10.0, 20.0, 45.0, 80.0])
    tr, t1a, t1b, f = 40.0, 900.0, 300.0, 0.25
    out = epgx_spgr(fa, tr, t1a, 0.5, t1b, 0.5, f, 0.0, n_tr=600)
    a = np.deg2rad(fa)
    for p, (t1, m0) in enumerate(((t1a, 1 - f), (t1b, f))):
        e1 = math.exp(-tr / t1)
        ernst = m0 * np.sin(a) * (1 - e1) / (1 - np.cos(a) * e1)
        np.testing.assert_allclose(out[0, :, p].real.numpy(), ernst, rtol=1e-9, atol=1e-12)
        assert out[0, :, p].imag.abs().max() < 1e-12


def test_two_pool_closed_form_steady_state():
    """Ideal-spoiling closed form equals (i) the 'ideal' phase graph after many TRs, (ii) the RF
    spoiled graph when T2 ≪ TR, and (iii) a direct float64 scipy solve of the 2×2 system."""
    fa = np.array([3.0, 10.0, 25.0, 70.0])
    tr, t1a, t1b, f, k = 35.0, 1100.0, 250.0, 0.15, 6.0
    cf = spgr_two_pool_steady_state(fa, tr, [t1a, 800.0], t1b, f, k)
    assert cf.shape == (2, 4, 2)
    # (iii) independent: expm of the longitudinal generator, solve with numpy
    kab = k / 1000
    kba = kab * (1 - f) / f
    L = np.array([[-1 / t1a - kab, kba], [kab, -1 / t1b - kba]])
    E = scipy.linalg.expm(L * tr)
    m0 = np.array([1 - f, f])
    for j, a in enumerate(np.deg2rad(fa)):
        mz = np.linalg.solve(np.eye(2) - np.cos(a) * E, (np.eye(2) - E) @ m0)
        np.testing.assert_allclose(cf[0, j].numpy(), np.sin(a) * mz, rtol=1e-12)
    ideal = epgx_spgr(fa, tr, t1a, 60.0, t1b, 15.0, f, k, spoiling="ideal", n_tr=800)
    np.testing.assert_allclose(ideal[0].real.numpy(), cf[0].numpy(), rtol=1e-10)
    short_t2 = epgx_spgr(fa, tr, t1a, 0.5, t1b, 0.5, f, k, n_tr=800)
    np.testing.assert_allclose(short_t2[0].real.numpy(), cf[0].numpy(), rtol=1e-9, atol=1e-12)
    # with a realistic T2 RF spoiling is imperfect: a visible, physical deviation (> 0.1 %)
    real_t2 = epgx_spgr(fa, tr, t1a, 80.0, t1b, 15.0, f, k, n_tr=800)
    assert (real_t2[0, :, 0] - cf[0, :, 0]).abs().max() > 1e-3 * cf[0, :, 0].abs().max()


def test_default_n_tr_reaches_steady_state():
    fa = [4.0, 30.0]
    a = epgx_spgr(fa, 30.0, 1000.0, 0.5, 250.0, 0.5, 0.2, 5.0, tol=1e-6)
    cf = spgr_two_pool_steady_state(fa, 30.0, 1000.0, 250.0, 0.2, 5.0)
    assert (a.real - cf).abs().max() < 1e-5


def test_matrix_exp_matches_torch():
    g = torch.Generator().manual_seed(0)
    ra, rb = torch.rand(6, generator=g, dtype=torch.float64), torch.rand(6, dtype=torch.float64)
    kab, kba = torch.rand(6, dtype=torch.float64), torch.rand(6, dtype=torch.float64)
    kab[0] = kba[0] = 0.0
    rb[1] = ra[1]
    kab[1] = kba[1] = 0.0  # identical pools without exchange: the q → 0 limit
    L = torch.stack([torch.stack([-ra - kab, kba], -1), torch.stack([kab, -rb - kba], -1)], dim=-2)
    ref = torch.linalg.matrix_exp(L * 3.0)
    np.testing.assert_allclose(
        exchange_matrix_exp(ra, rb, kab, kba, 3.0).numpy(), ref.numpy(), rtol=1e-12, atol=1e-14
    )


def test_batched_and_differentiable():
    """Batched voxels equal single runs; autograd (reverse and forward mode) equals central
    finite differences in float64."""
    t1 = torch.tensor([900.0, 1300.0], dtype=torch.float64, requires_grad=True)
    k = torch.tensor([3.0, 9.0], dtype=torch.float64, requires_grad=True)
    fa = [10.0, 40.0]
    kw = dict(n_tr=80, n_states=30)
    out = epgx_spgr(fa, 30.0, t1, 70.0, 250.0, 15.0, 0.2, k, b1=0.9, **kw)
    one = epgx_spgr(fa, 30.0, 1300.0, 70.0, 250.0, 15.0, 0.2, 9.0, b1=0.9, **kw)
    torch.testing.assert_close(out[1], one[0], rtol=1e-12, atol=1e-14)
    loss = (out.abs() ** 2).sum()
    g1, gk = torch.autograd.grad(loss, (t1, k))

    def lossf(t1v, kv):
        o = epgx_spgr(fa, 30.0, t1v, 70.0, 250.0, 15.0, 0.2, kv, b1=0.9, **kw)
        return float((o.abs() ** 2).sum())

    t1d, kd = t1.detach(), k.detach()
    h = 1e-3
    for j in range(2):
        e = torch.zeros(2, dtype=torch.float64)
        e[j] = 1
        fd1 = (lossf(t1d + h * e, kd) - lossf(t1d - h * e, kd)) / (2 * h)
        fdk = (lossf(t1d, kd + h * e) - lossf(t1d, kd - h * e)) / (2 * h)
        assert abs(g1[j] - fd1) < 1e-7 * max(1.0, abs(fd1))
        assert abs(gk[j] - fdk) < 1e-7 * max(1.0, abs(fdk))
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        dual = fwAD.make_dual(t1.detach(), torch.tensor([1.0, 0.0], dtype=torch.float64))
        o = epgx_spgr(fa, 30.0, dual, 70.0, 250.0, 15.0, 0.2, k.detach(), b1=0.9, **kw)
        tan = fwAD.unpack_dual(o).tangent
    h = 1e-3
    plus = epgx_spgr(
        fa, 30.0, t1.detach() + torch.tensor([h, 0.0]), 70.0, 250.0, 15.0, 0.2, kd, b1=0.9, **kw
    )
    minus = epgx_spgr(
        fa, 30.0, t1.detach() - torch.tensor([h, 0.0]), 70.0, 250.0, 15.0, 0.2, kd, b1=0.9, **kw
    )
    torch.testing.assert_close(tan[0], ((plus - minus) / (2 * h))[0], rtol=1e-6, atol=1e-10)


def test_errors():
    with pytest.raises(ParameterError, match="f"):
        epgx_spgr([10.0], 30.0, 1000.0, 60.0, 250.0, 15.0, 0.0, 1.0)
    with pytest.raises(ParameterError, match="k"):
        epgx_spgr([10.0], 30.0, 1000.0, 60.0, 250.0, 15.0, 0.1, -1.0)
    with pytest.raises(ParameterError, match="t2a"):
        epgx_spgr([10.0], 30.0, 1000.0, 0.0, 250.0, 15.0, 0.1, 1.0)
    with pytest.raises(ParameterError, match="spoiling"):
        epgx_spgr([10.0], 30.0, 1000.0, 60.0, 250.0, 15.0, 0.1, 1.0, spoiling="perfect")
    with pytest.raises(ShapeError, match="broadcast"):
        epgx_spgr([10.0], 30.0, [1000.0, 900.0], 60.0, 250.0, 15.0, [0.1, 0.2, 0.3], 1.0)
    with pytest.raises(ParameterError, match="tr"):
        epgx_spgr([10.0], -3.0, 1000.0, 60.0, 250.0, 15.0, 0.1, 1.0)
