"""The simulated DWI phantom: its physics against independent references (spherical quadrature,
the Watson distribution's closed-form p2, a low-b tensor fit), its files against io.load_dwi."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qmrkit.io import load_dwi, load_nifti
from qmrkit.models.diffusion import (
    DTI,
    NEXI,
    find_shells,
    real_sh,
    rotational_invariants,
    tensor_eig,
    tensor_from_cholesky,
    tensor_maps,
)
from qmrkit.models.diffusion.invariants import _default_fit_order
from qmrkit.sim import (
    DwiProtocol,
    dispersed_nexi_signal,
    dwi_phantom,
    dwi_protocol,
    odf_p2,
    watson_orientations,
)
from qmrkit.sim.diffusion import watson_p2

NAMES = ("f", "Dn", "De", "rn", "p2")


@pytest.fixture(scope="module")
def clean():
    """Noise-free 2D phantom, GACELLE's NEXI protocol (15 shells × 32 directions + 6 b = 0)."""
    return dwi_phantom((24, 24), snr=None, seed=3)


def _truth(ph, sel):
    return {k: torch.tensor(ph.truth[k][sel])[:, None] for k in NAMES}


def test_protocol_is_gacelle_nexi():
    p = dwi_protocol()
    shells = find_shells(p.bvals, p.small_delta, p.big_delta)
    assert len(shells) == 15 and all(s.index.size == 32 for s in shells)
    assert (p.bvals == 0).sum() == 6
    got = sorted((s.big_delta, round(s.b, 6)) for s in shells)
    want = sorted(
        [(13.0, b) for b in (2.3, 3.5, 4.8, 6.5)]
        + [(21.0, b) for b in (2.3, 3.5, 4.8, 6.5, 11.3)]
        + [(30.0, b) for b in (2.3, 3.5, 4.8, 6.5, 11.3, 17.3)]
    )
    assert got == want
    dw = p.bvals > 0
    np.testing.assert_allclose(np.linalg.norm(p.bvecs[dw], axis=1), 1.0, atol=1e-15)


def test_odf_p2_equals_double_sum_over_orientations():
    """(3‖T‖² − 1)/2 against the definition Σ_jk w_j w_k P₂(u_j·u_k), with unequal weights."""
    rng = np.random.default_rng(0)
    u = watson_orientations(rng.normal(size=(3, 3)), [0.5, 4.0, 20.0], 17, rng)
    w = rng.uniform(0.1, 1.0, size=(3, 17))
    w /= w.sum(1, keepdims=True)
    c = np.einsum("vki,vli->vkl", u, u)
    ref = np.sqrt(np.einsum("vk,vl,vkl->v", w, w, 0.5 * (3 * c * c - 1)))
    np.testing.assert_allclose(odf_p2(u, w), ref, rtol=1e-12)


@pytest.mark.parametrize("kappa", [0.0, 1.0, 3.0, 12.0])
def test_watson_sampler_matches_the_distribution(kappa):
    """⟨P₂(u·μ)⟩ of 200 000 draws equals the closed form (Dawson's integral) within 5 standard
    errors, for a mean direction off the axes."""
    mu = np.array([[0.3, -0.5, 0.8]])
    u = watson_orientations(mu, [kappa], 200_000, np.random.default_rng(1))[0]
    c = u @ (mu[0] / np.linalg.norm(mu[0]))
    p2 = 0.5 * (3 * c * c - 1)
    assert abs(p2.mean() - watson_p2(kappa)) < 5 * p2.std() / math.sqrt(p2.size)
    np.testing.assert_allclose(np.linalg.norm(u, axis=1), 1.0, atol=1e-12)


def _sphere_quadrature(n_theta: int, n_phi: int) -> tuple[np.ndarray, np.ndarray]:
    """Gauss–Legendre in cos θ × uniform φ: exact for polynomials of degree < min(2n_θ, n_φ)."""
    x, w = np.polynomial.legendre.leggauss(n_theta)
    phi = 2 * np.pi * np.arange(n_phi) / n_phi
    ct, ph = np.meshgrid(x, phi, indexing="ij")
    st = np.sqrt(1 - ct * ct)
    dirs = np.stack([st * np.cos(ph), st * np.sin(ph), ct], -1).reshape(-1, 3)
    return dirs, np.repeat(w, n_phi) * (2 * np.pi / n_phi)


def test_invariants_by_quadrature_equal_nexi_exactly(clean):
    """The phantom's signal integrated over the sphere (no SH fit, no aliasing) has exactly the
    invariants NEXI predicts from the truth, S_0 = K_0 and S_2 = |K_2|·p2 (Funk–Hecke with the
    discrete ODF's p2), at the lowest and highest b of the protocol."""
    dirs, qw = _sphere_quadrature(160, 320)
    y2 = real_sh(2, dirs)[:, 1:]  # the five l = 2 functions
    rng = np.random.default_rng(0)
    sel = np.zeros(clean.labels.shape, bool)
    for lab in (4, 5):  # three grey- and three white-matter voxels
        idx = rng.choice(np.flatnonzero(clean.labels.reshape(-1) == lab), 3, replace=False)
        sel.reshape(-1)[idx] = True
    b, delta = np.array([2.3, 17.3]), np.array([13.0, 30.0])
    model = NEXI(b, delta, orders=(0, 2))
    pred = model.forward(_truth(clean, sel)).numpy().reshape(-1, 2, 2)
    for v, (u, params) in enumerate(
        zip(
            clean.orientations[sel],
            zip(*(clean.truth[k][sel] for k in NAMES), strict=True),
            strict=True,
        )
    ):
        p = dict(zip(NAMES, params, strict=True))
        for s in range(2):
            params, bvals = {k: [p[k]] for k in NAMES[:4]}, np.full(len(dirs), b[s])
            sig = dispersed_nexi_signal(u[None], params, bvals, dirs, delta[s], chunk=1)[0]
            s0 = (qw * sig).sum() / (4 * np.pi)
            s2 = np.linalg.norm((qw * sig) @ y2) / math.sqrt(4 * np.pi * 5)
            # 3e-14 measured
            np.testing.assert_allclose([s0, s2], pred[v, s], rtol=1e-9, atol=1e-12)


def test_phantom_invariants_equal_nexi_forward_within_the_sh_fit_error(clean):
    """Through rotational_invariants on the protocol's 32 directions per shell: every voxel and
    shell agrees with NEXI.forward on the truth to within the RMS residual of the SH fit (the
    part of the signal above the fitted order, which is what aliases into S_0 and S_2)."""
    ph = clean
    inv = rotational_invariants(
        ph.data.astype(np.float64),
        ph.bvals,
        ph.bvecs,
        small_delta=ph.small_delta,
        big_delta=ph.big_delta,
        l_max=2,
    )
    tis = (ph.labels == 4) | (ph.labels == 5)
    pred = NEXI.from_invariants(inv).forward(_truth(ph, tis)).numpy().reshape(-1, inv.b.size, 2)
    err = np.abs(pred - inv.values[tis])
    norm = ph.data[tis].astype(np.float64)
    norm = norm / norm[:, ph.bvals == 0].mean(-1, keepdims=True)
    rms = np.empty(err.shape[:2])
    for k, sh in enumerate(find_shells(ph.bvals, ph.small_delta, ph.big_delta)):
        y = real_sh(_default_fit_order(sh.index.size, 2), ph.bvecs[sh.index])
        c = norm[:, sh.index] @ np.linalg.pinv(y).T
        rms[:, k] = np.sqrt(((norm[:, sh.index] - c @ y.T) ** 2).mean(-1))
    assert (err[..., 0] <= rms).all() and (err[..., 1] <= rms).all()
    assert np.median(err) < 1e-3  # 2.4e-4 measured (max 4.5e-3)
    # CSF: free water, exp(−3b) on every direction, so its SH fit is exact
    csf = inv.values[ph.labels == 3]
    free_water = np.broadcast_to(np.exp(-3.0 * inv.b), csf.shape[:-1])
    np.testing.assert_allclose(csf[..., 0], free_water, rtol=1e-6)
    assert np.abs(csf[..., 1]).max() < 1e-6


def test_truth_tensor_is_the_low_b_limit():
    """The DTI-comparable truth (f·Dn·Σw uuᵀ + (1 − f)·De·I) is the b → 0 apparent tensor: DTI
    fits at b = 0.1 and 0.2 ms/µm², extrapolated linearly to b = 0 (the kurtosis term is linear in
    b), give its MD, FA and principal direction."""
    tensors = []
    for b in (0.1, 0.2):
        prot = dwi_protocol(((20.0, (b,)),), n_dirs=30, n_b0=2)
        ph = dwi_phantom((24, 24), protocol=prot, snr=None, seed=5)  # same truth for both b
        start = DTI(prot.bvals, prot.bvecs).initial_guess(
            torch.tensor(ph.data[ph.mask], dtype=torch.float64), {}
        )  # the log-linear WLS fit, exact up to the kurtosis of the noise-free signal
        tensors.append(tensor_from_cholesky(start).numpy())
    d0 = 2 * tensors[0] - tensors[1]
    evals, evecs = tensor_eig(torch.tensor(d0))
    maps = tensor_maps(evals)
    np.testing.assert_allclose(maps["MD"].numpy(), ph.truth["MD"][ph.mask], rtol=2e-3)
    np.testing.assert_allclose(maps["FA"].numpy(), ph.truth["FA"][ph.mask], atol=3e-3)
    tis = ph.labels[ph.mask] == 5
    cos = np.abs((evecs[:, :, 0].numpy() * ph.truth["V1"][ph.mask]).sum(-1))
    assert cos[tis].min() > 0.999


# det > 0 (RAS, neurological; sheared): FSL negates x of the voxel-frame vectors
SHEARED = np.array([[0.0, -1.8, 0.0, 30.0], [2.2, 0.0, 0.1, -12.0], [0, 0, 3.0, 5.0], [0, 0, 0, 1]])


@pytest.mark.parametrize(
    "affine, protocol",
    [(SHEARED, "tsv"), (np.diag([-2.0, 2.5, 3.0, 1.0]), "yaml")],  # det < 0: no flip
)
def test_written_files_read_back_identically(tmp_path, affine, protocol):
    ph = dwi_phantom((12, 10), protocol=dwi_protocol(n_dirs=8), snr=30, seed=1)
    paths = ph.save(tmp_path, affine=affine, protocol=protocol)
    dwi = load_dwi(paths["dwi"], paths["bval"], paths["bvec"], protocol=paths["protocol"])
    assert dwi.data.shape == (12, 10, 1, ph.bvals.size)
    np.testing.assert_array_equal(dwi.data[:, :, 0], ph.data)
    np.testing.assert_array_equal(dwi.bvals, ph.bvals)
    np.testing.assert_array_equal(dwi.bvecs_voxel(), ph.bvecs)
    flip = 1.0 if np.linalg.det(affine[:3, :3]) < 0 else -1.0
    np.testing.assert_array_equal(dwi.bvecs[:, 0], flip * ph.bvecs[:, 0])
    np.testing.assert_array_equal(dwi.small_delta, ph.small_delta)
    np.testing.assert_array_equal(dwi.big_delta, ph.big_delta)
    np.testing.assert_array_equal(dwi.affine, affine.astype(np.float32))  # sform is float32
    mask, maff = load_nifti(paths["mask"])
    np.testing.assert_array_equal(mask[:, :, 0] > 0, ph.mask)
    np.testing.assert_array_equal(maff, dwi.affine)
    bval_text = paths["bval"].read_text().split()
    assert bval_text[:3] == ["0", "0", "2300"]  # s/mm², whole numbers


def test_seed_reproducible_and_rician_noise_level():
    prot = dwi_protocol(((20.0, (1.0, 2.5)),), n_dirs=12, n_b0=4)
    a = dwi_phantom((32, 32), protocol=prot, snr=30, seed=7)
    b = dwi_phantom((32, 32), protocol=prot, snr=30, seed=7)
    c = dwi_phantom((32, 32), protocol=prot, snr=30, seed=8)
    np.testing.assert_array_equal(a.data, b.data)
    assert not np.array_equal(a.data, c.data)
    tis = (a.labels == 4) | (a.labels == 5)
    assert a.sigma == pytest.approx(a.truth["S0"][tis].mean() / 30)
    # background is pure Rician noise on a zero signal: Rayleigh, mean σ·sqrt(π/2)
    bg = a.data[a.labels == 0].astype(np.float64)
    assert bg.mean() == pytest.approx(a.sigma * math.sqrt(math.pi / 2), rel=0.02)
    # b = 0 white matter: S0 plus noise of that σ (Rician ≈ Gaussian at SNR ≈ 20)
    wm = a.data[a.labels == 5][:, prot.bvals == 0]
    s0 = a.truth["S0"][a.labels == 5][:, None]
    assert np.std(wm - s0) == pytest.approx(a.sigma, rel=0.05)


def test_three_d_phantom_and_truth_ranges():
    p = dwi_protocol(((20.0, (1.0,)),), n_dirs=6, n_b0=1)
    prot = DwiProtocol(p.bvals, p.bvecs, p.small_delta, p.big_delta)  # a user-built protocol
    ph = dwi_phantom((16, 14, 12), protocol=prot, snr=None, n_orientations=8, seed=2)
    assert ph.data.shape == (16, 14, 12, 7) and ph.orientations.shape == (16, 14, 12, 8, 3)
    assert set(np.unique(ph.labels)) == {0, 3, 4, 5}
    for lab, ranges in ((4, (0.30, 0.45)), (5, (0.55, 0.68))):
        f = ph.truth["f"][ph.labels == lab]
        assert f.min() >= ranges[0] and f.max() <= ranges[1]
    rn = ph.truth["rn"][ph.labels >= 4]
    assert rn.min() >= NEXI._BASE[3].lower  # truth inside NEXI's fitting bounds
    np.testing.assert_allclose(
        ph.truth["tex"][ph.labels >= 4],
        (1 - ph.truth["f"][ph.labels >= 4]) / rn,
        rtol=1e-12,
    )
    assert np.isnan(ph.truth["rn"][ph.labels == 3]).all()
    assert (ph.truth["De"][ph.labels == 3] == 3.0).all()
