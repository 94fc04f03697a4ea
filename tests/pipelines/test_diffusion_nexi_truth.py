"""NEXI on the DWI phantom against its known truth with every solver the CLI offers: lm at SNR 30
(the issue's second SNR), adam with and without TV at SNR 50, MCMC posterior calibration at SNR 50.
All through ``pipelines.diffusion_maps`` on the phantom's DWI (32 directions per shell, Rician
noise), as ``qmrkit fit nexi`` runs it. Errors are per-tissue medians of |estimate − truth|/truth.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qmrkit.io import DWI
from qmrkit.pipelines import diffusion_maps
from qmrkit.sim import dwi_phantom

GM, WM = 4, 5


def _dwi(ph) -> DWI:
    return DWI(
        data=ph.data[:, :, None],
        affine=ph.affine,
        bvals=ph.bvals,
        bvecs=ph.bvecs,
        small_delta=ph.small_delta,
        big_delta=ph.big_delta,
    )


def _errors(ph, maps, sel, names=("f", "Dn", "De", "rn", "p2", "tex")):
    return {
        k: float(
            np.median(np.abs(maps[k].numpy()[..., 0][sel] - ph.truth[k][sel]) / ph.truth[k][sel])
        )
        for k in names
    }


def test_lm_at_snr_30():
    """SNR 30 (GACELLE's lower SNR), 24×24 phantom, lm float32. Measured median errors, seeds 0/1:
    grey matter (68 voxels) f 6.4/9.5 %, Dn 17.4/15.7 %, De 5.2/5.5 %, p2 10.2/10.0 %, and — poorly
    determined at this SNR — rn 44 % (median bias −42/−47 %), t_ex 82/88 % (bias +71/+89 %); at
    SNR 50 the same voxels give f 4.7/5.6 %, Dn 12.5/13.5 %, De 3.6/3.9 %, p2 5.1 %, rn 20 %,
    t_ex 26/30 %. White matter (129 voxels) is biased by the Rician floor of its high-b signal:
    f +26/+29 %, Dn +32/+36 %, p2 −23 % at SNR 30 (+13–16 %, +20–24 %, −13 % at SNR 50); its De is
    12.3 % off at SNR 30."""
    ph30 = dwi_phantom((24, 24), snr=30, seed=0)
    ph50 = dwi_phantom((24, 24), snr=50, seed=0)
    tis = (ph30.labels == GM) | (ph30.labels == WM)
    m30 = diffusion_maps(_dwi(ph30), "nexi", mask=tis[:, :, None], progress=False).maps
    m50 = diffusion_maps(_dwi(ph50), "nexi", mask=tis[:, :, None], progress=False).maps
    gm = ph30.labels == GM
    e30, e50 = _errors(ph30, m30, gm), _errors(ph50, m50, gm)
    bounds = {"f": 0.13, "Dn": 0.25, "De": 0.08, "p2": 0.14, "rn": 0.60}
    assert all(e30[k] < t for k, t in bounds.items()), e30
    for k in ("f", "Dn", "De", "rn", "p2", "tex"):  # lower SNR, larger errors
        assert e30[k] > e50[k], (k, e30[k], e50[k])
    wm = ph30.labels == WM
    assert _errors(ph30, m30, wm, ("De",))["De"] < 0.18
    # the white-matter f bias grows as the SNR falls (Rician floor), it is not solver noise
    b30 = np.median(m30["f"].numpy()[..., 0][wm] / ph30.truth["f"][wm]) - 1
    b50 = np.median(m50["f"].numpy()[..., 0][wm] / ph50.truth["f"][wm]) - 1
    assert b30 > b50 > 0.05, (b30, b50)


@pytest.mark.slow  # two adam runs (≤ 4000 iterations) on 83 voxels: ≈ 40 s each on 2 shared cores
@pytest.mark.filterwarnings("ignore::qmrkit.errors.ConvergenceWarning")
def test_adam_tv_improves_exchange_against_truth():
    """adam (L1, ≤ 4000 iterations, GACELLE demo 1) on the white matter of a 20×20 phantom at SNR
    50 (83 voxels; the grey ribbon is 1–2 voxels wide at this size, and TV across the grey/white
    boundary biases it: on grey + white, λ = 0.01 raised grey Dn 12.9 → 25.5 %), without TV and
    with λ = 0.01 on f_n and r_n (``--tv fn:0.01 --tv rn:0.01``). Measured: rn 23.2 → 20.6 %,
    t_ex 19.6 → 12.4 %, f 17.2 → 17.0 %, Dn 24.3 → 25.9 %, p2 14.1 → 13.8 %, De 5.5 → 5.9 %
    (λ = 0.003: rn 19.4 %, t_ex 14.0 %). The regularised exchange parameters improve; f and Dn
    are dominated by the Rician-floor bias, which TV cannot remove."""
    ph = dwi_phantom((20, 20), snr=50, seed=0)
    wm = ph.labels == WM
    kw = {"mask": wm[:, :, None], "solver": "adam", "progress": False}
    none = _errors(ph, diffusion_maps(_dwi(ph), "nexi", **kw).maps, wm)
    tv = _errors(ph, diffusion_maps(_dwi(ph), "nexi", tv={"fn": 0.01, "rn": 0.01}, **kw).maps, wm)
    assert tv["tex"] < none["tex"] - 0.03, (none, tv)
    assert tv["rn"] < none["rn"] - 0.01, (none, tv)
    assert tv["f"] < none["f"] + 0.01, (none, tv)


@pytest.mark.slow  # ensemble MCMC on 16 voxels in float64: ≈ 50 s on 2 shared cores
def test_mcmc_posterior_covers_the_truth():
    """Ensemble MCMC (defaults: 16 walkers × 2000 steps, σ sampled) on 16 grey-matter voxels at
    SNR 50, float64. Check: the truth lies within 2 posterior standard deviations of the
    posterior mean. Measured: f, Dn, De 15/16 voxels, p2 14/16 (|z| median 0.76, 0.82, 0.80,
    1.08), median posterior std / truth 7.7 %, 18 %, 3.7 %, 5.5 %. rn is NOT covered: 7/16 within
    2σ, median |z| 2.4 (posterior std 10 % of truth, error 20 %): its posterior is narrower than
    its error, as the Gaussian likelihood on the invariants ignores the Rician floor and the SH
    fit's aliasing (see docs/diffusion.md)."""
    ph = dwi_phantom((20, 20), snr=50, seed=0)
    gm = ph.labels == GM
    rng = np.random.default_rng(0)
    sub = np.zeros_like(gm)
    sub.reshape(-1)[rng.choice(np.flatnonzero(gm.reshape(-1)), 16, replace=False)] = True
    out = diffusion_maps(
        _dwi(ph), "nexi", mask=sub[:, :, None], solver="mcmc", dtype=torch.float64, progress=False
    )
    res = out.result
    assert res.settings["method"] == "ensemble"
    for k, need in {"f": 13, "Dn": 13, "De": 13, "p2": 12}.items():
        mean = res.mean[k].numpy()[..., 0][sub]
        std = res.std[k].numpy()[..., 0][sub]
        inside = int((np.abs(mean - ph.truth[k][sub]) < 2 * std).sum())
        assert inside >= need, (k, inside)
