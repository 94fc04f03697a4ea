"""Myelin water models: the three-pool complex GRE model (Nam 2015) and MCR-MWI with EPG-X.

References are independent: the complex signal is written out term by term in NumPy; MCR-MWI's
surrogate path is compared with the same model simulating EPG-X directly; fits recover known truth
(noise-free exactly, and on a white/grey-matter phantom at SNR 100 within 0.02 MWF).
"""

import math

import numpy as np
import pytest
import torch

from qmrkit.errors import ModelError, ParameterError
from qmrkit.fit import lm
from qmrkit.models import registry
from qmrkit.models.myelin import McrMwi, ThreePoolGRE, train_mcr_mwi_surrogate

TE = np.arange(1, 25) * 2.0  # ms


@pytest.fixture(scope="module")
def single_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _nam_numpy(te, p):
    w = 2 * np.pi * te / 1000
    s = (
        p["A_MW"] * np.exp(-te / p["T2s_MW"] + 1j * w * p["df_MW"])
        + p["A_AW"] * np.exp(-te / p["T2s_AW"] + 1j * w * p["df_AW"])
        + p["A_EW"] * np.exp(-te / p["T2s_EW"])
    )
    return s * np.exp(1j * (w * p["f_bg"] + p["phi0"]))


def _tissue(rng, mwf, n, t2s, df=(5.0, -2.0)):
    one = np.ones(n)
    return dict(
        A_MW=mwf * one,
        A_AW=(1 - mwf) * 0.6 * one,
        A_EW=(1 - mwf) * 0.4 * one,
        T2s_MW=t2s[0] * one,
        T2s_AW=t2s[1] * one,
        T2s_EW=t2s[2] * one,
        df_MW=df[0] * one,
        df_AW=df[1] * one,
        f_bg=rng.uniform(-30, 30, n),
        phi0=rng.uniform(-3, 3, n),
    )


def test_three_pool_signal_and_mwf():
    rng = np.random.default_rng(1)
    p = _tissue(rng, 0.12, 3, (9.0, 70.0, 45.0))
    model = ThreePoolGRE(TE)
    sig = model.simulate(p).numpy()
    for v in range(3):
        ref = _nam_numpy(TE, {k: x[v] for k, x in p.items()})
        np.testing.assert_allclose(sig[v], ref, rtol=1e-12, atol=1e-14)
    cols = {k: torch.as_tensor(x)[:, None] for k, x in p.items()}
    np.testing.assert_allclose(model.derived(cols)["MWF"].numpy(), 0.12, rtol=1e-12)


def test_three_pool_noise_free_fit(single_thread):
    rng = np.random.default_rng(2)
    p = _tissue(rng, 0.15, 4, (10.0, 64.0, 48.0))
    model = ThreePoolGRE(TE, fixed={"df_MW": 5.0, "df_AW": -2.0})
    assert "df_MW" not in model.parameter_names
    data = ThreePoolGRE(TE).simulate(p).numpy()
    res = lm(model, data, dtype=torch.float64, max_iter=300, progress=False)
    np.testing.assert_allclose(res.maps["MWF"].numpy(), 0.15, atol=2e-3)
    np.testing.assert_allclose(res.maps["T2s_MW"].numpy(), 10.0, rtol=0.02)


@pytest.mark.slow
def test_three_pool_phantom_snr100(single_thread):
    """WM (MWF 0.15) and GM (0.05) regions, complex Gaussian noise at SNR 100 (first echo):
    the ROI-mean MWF is within 0.02 of the truth."""
    rng = np.random.default_rng(0)
    n = 32
    wm = _tissue(rng, 0.15, n, (10.0, 64.0, 48.0))
    gm = _tissue(rng, 0.05, n, (10.0, 55.0, 45.0))
    p = {k: np.concatenate([wm[k], gm[k]]) for k in wm}
    clean = ThreePoolGRE(TE).simulate(p).numpy()
    sigma = np.abs(clean[:, 0]).mean() / 100
    noise = rng.standard_normal(clean.shape) + 1j * rng.standard_normal(clean.shape)
    data = clean + sigma * noise / math.sqrt(2)
    model = ThreePoolGRE(TE, fixed={"df_MW": 5.0, "df_AW": -2.0})
    res = lm(model, data, dtype=torch.float64, max_iter=200, progress=False)
    mwf = res.maps["MWF"].numpy()
    assert abs(mwf[:n].mean() - 0.15) < 0.02
    assert abs(mwf[n:].mean() - 0.05) < 0.02
    assert mwf[:n].mean() - mwf[n:].mean() > 0.05  # WM and GM are told apart


FA = [5.0, 10.0, 20.0, 30.0, 50.0, 70.0]
TE_MCR = np.arange(1, 13) * 3.0
TR = 45.0
RANGES = {
    "MWF": (0.02, 0.3, "lin", ""),
    "T1_IEW": (700.0, 1500.0, "log", "ms"),
    "k_IEW": (0.0, 6.0, "lin", "1/s"),
    "alpha": (3.0, 80.0, "lin", "deg"),
}


@pytest.fixture(scope="module")
def mcr_surrogate(single_thread):
    return train_mcr_mwi_surrogate(
        TR,
        ranges=RANGES,
        n_train=1024,
        n_val=256,
        n_test=256,
        hidden=(32, 32),
        max_epochs=150,
        batch_size=128,
        lr=1e-2,
        patience=30,
        threads=1,
        tol=1e-3,
    )


def _mcr_params(n, rng):
    return dict(
        S0=rng.uniform(0.5, 2.0, n),
        MWF=rng.uniform(0.05, 0.25, n),
        fAW=rng.uniform(0.4, 0.7, n),
        T2s_MW=rng.uniform(8, 14, n),
        T2s_AW=rng.uniform(55, 75, n),
        T2s_EW=rng.uniform(40, 50, n),
        T1_IEW=rng.uniform(800, 1300, n),
        k_IEW=rng.uniform(1, 5, n),
        df_MW=rng.uniform(3, 8, n),
        df_AW=rng.uniform(-3, 0, n),
        f_bg=rng.uniform(-20, 20, n),
        phi0=rng.uniform(-2, 2, n),
    )


def test_mcr_surrogate_matches_direct_epgx(mcr_surrogate):
    """Target: the surrogate model's signal within 0.5 % of the direct-EPG-X model's signal."""
    rng = np.random.default_rng(3)
    p = _mcr_params(16, rng)
    b1 = rng.uniform(0.9, 1.1, 16)
    direct = McrMwi(FA, TE_MCR, TR, None).simulate(p, b1=b1).numpy()
    fast = McrMwi(FA, TE_MCR, TR, mcr_surrogate).simulate(p, b1=b1).numpy()
    rel = np.abs(direct - fast).max(1) / np.abs(direct).max(1)
    assert rel.max() < 0.005
    # the surrogate matters: the closed form alone (no EPG-X correction) is off by more
    bm = McrMwi(FA, TE_MCR, TR, mcr_surrogate)
    bm.surrogate = _ZeroCorrection(mcr_surrogate)
    rel_bm = np.abs(direct - bm.simulate(p, b1=b1).numpy()).max(1) / np.abs(direct).max(1)
    assert rel_bm.max() > 3 * rel.max()


class _ZeroCorrection:
    def __init__(self, s):
        self.s = s

    def __call__(self, cols):
        v = cols["MWF"].shape[0]
        return torch.zeros((v, 4), dtype=cols["MWF"].dtype)


def test_mcr_fit_through_surrogate(mcr_surrogate):
    """lm through the surrogate: noise-free data made by the direct EPG-X model recover MWF."""
    rng = np.random.default_rng(4)
    p = _mcr_params(6, rng)
    fixed = {"df_MW": 5.0, "df_AW": -2.0}
    p["df_MW"][:] = 5.0
    p["df_AW"][:] = -2.0
    data = McrMwi(FA, TE_MCR, TR, None).simulate(p).numpy()
    model = McrMwi(FA, TE_MCR, TR, mcr_surrogate, fixed=fixed)
    res = lm(model, data, dtype=torch.float64, max_iter=300, progress=False)
    np.testing.assert_allclose(res.maps["MWF"].numpy(), p["MWF"], atol=0.01)
    assert np.allclose(res.maps["AWF"].numpy() + res.maps["EWF"].numpy(), 1 - res.maps["MWF"])


def test_mcr_errors_and_registry(mcr_surrogate):
    with pytest.raises(ModelError, match="tr"):
        McrMwi(FA, TE_MCR, 30.0, mcr_surrogate)
    with pytest.raises(ModelError, match="outside"):
        McrMwi([2.0, 85.0], TE_MCR, TR, mcr_surrogate)
    with pytest.raises(ParameterError, match="cannot fix"):
        McrMwi(FA, TE_MCR, TR, None, fixed={"T9": 1.0})
    with pytest.raises(ParameterError, match="te"):
        ThreePoolGRE([1.0, 2.0])
    m = registry.get("mcr-mwi", flip_angles=FA, te=TE_MCR, tr=TR)
    assert isinstance(m, McrMwi) and m.n_measurements == len(FA) * len(TE_MCR)
    assert isinstance(registry.get("three-pool-gre", te=TE), ThreePoolGRE)


@pytest.mark.slow
def test_mcr_phantom_snr100(mcr_surrogate):
    """Acceptance: MCR-MWI through the surrogate on a WM/GM phantom simulated with the direct
    EPG-X at SNR 100 recovers the ROI-mean MWF within 0.02."""
    rng = np.random.default_rng(5)
    n = 12
    p = _mcr_params(2 * n, rng)
    p["MWF"] = np.r_[np.full(n, 0.15), np.full(n, 0.05)]
    p["T1_IEW"] = np.r_[rng.uniform(900, 1100, n), rng.uniform(1200, 1450, n)]
    p["df_MW"][:] = 5.0
    p["df_AW"][:] = -2.0
    b1 = rng.uniform(0.9, 1.1, 2 * n)
    clean = McrMwi(FA, TE_MCR, TR, None).simulate(p, b1=b1).numpy()
    sigma = np.abs(clean.reshape(2 * n, len(FA), len(TE_MCR))[:, :, 0]).max(1).mean() / 100
    noise = rng.standard_normal(clean.shape) + 1j * rng.standard_normal(clean.shape)
    data = clean + sigma * noise / math.sqrt(2)
    model = McrMwi(FA, TE_MCR, TR, mcr_surrogate, fixed={"df_MW": 5.0, "df_AW": -2.0}, b1=b1)
    res = lm(model, data, dtype=torch.float64, max_iter=300, progress=False)
    mwf = res.maps["MWF"].numpy()
    assert abs(mwf[:n].mean() - 0.15) < 0.02
    assert abs(mwf[n:].mean() - 0.05) < 0.02
