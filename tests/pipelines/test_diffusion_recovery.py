"""AxCaliberSMT and SANDI recovered from noisy DWI with known truth: ``sim.dwi_phantom`` simulates
each model's own tissue per gradient direction (dispersed Watson ODFs, Rician noise), and
``pipelines.diffusion_maps`` (lm, float32) fits the spherical means of the rotational invariants.

Numbers are the per-tissue median of |estimate − truth|/truth over the 68 grey- and 129
white-matter voxels of a 24×24 phantom (measured on seeds 0 and 1; bounds leave about twice the
measured value, or the seed-to-seed spread, whichever is larger). Noise-free, every median is
≤ 1.5 % (the 32-direction SH fit's aliasing; 0.1–0.5 % in grey matter).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from qmrkit.io import DWI
from qmrkit.models.registry import diffusion_spec
from qmrkit.pipelines import diffusion_maps
from qmrkit.pipelines.diffusion import example_model
from qmrkit.sim import dwi_phantom

GM, WM = 4, 5


def _dwi(data, ph) -> DWI:
    return DWI(
        data=data[:, :, None],
        affine=ph.affine,
        bvals=ph.bvals,
        bvecs=ph.bvecs,
        small_delta=ph.small_delta,
        big_delta=ph.big_delta,
    )


@functools.cache
def _run(model: str, snr: float | None, noise: str = "rician", seed: int = 0):
    """Phantom and fitted maps (cached: several tests read one fit)."""
    ph = dwi_phantom((24, 24), model=model, snr=snr if noise == "rician" else None, seed=seed)
    data = ph.data
    if noise == "gaussian":  # the same σ as the Rician phantom, without the magnitude floor
        sigma = dwi_phantom((24, 24), model=model, snr=snr, seed=seed).sigma
        rng = np.random.default_rng(seed + 100)
        data = (ph.data + sigma * rng.normal(size=ph.data.shape)).astype(np.float32)
    out = diffusion_maps(_dwi(data, ph), model, mask=ph.mask[:, :, None], progress=False)
    return ph, {k: v.numpy()[..., 0] for k, v in out.maps.items()}


def _median_errors(ph, maps, lab, names):
    sel = ph.labels == lab
    rel = {k: np.abs(maps[k][sel] - ph.truth[k][sel]) / np.abs(ph.truth[k][sel]) for k in names}
    return {k: float(np.median(v)) for k, v in rel.items()}


def _check(ph, maps, bounds):
    for lab, tol in bounds.items():
        med = _median_errors(ph, maps, lab, tol)
        bad = {k: (round(med[k], 4), t) for k, t in tol.items() if not med[k] < t}
        assert not bad, (ph.model, ph.tissues[lab], bad)


# -------------------------------------------------------------------------------------------------
# AxCaliberSMT (GACELLE demo 2 protocol: Δ = 13/30 ms, 15 shells, b up to 17.8 ms/µm², δ = 8 ms)
# -------------------------------------------------------------------------------------------------
def test_axcalibersmt_recovered_at_snr_50():
    """Measured (seed 0 / 1): grey a 4.5/5.5 %, f 3.0/1.8 %, fcsf 9.5/11.1 %, DeR 6.2/6.7 %;
    white a 4.6/5.5 %, f 3.4/3.2 %. White-matter fcsf (0.03–0.12, small) and DeR are off by
    22–32 % with a +24–32 % DeR bias: the Rician floor of the high-b signal (see the Gaussian-noise
    test below), not asserted here."""
    ph, maps = _run("axcalibersmt", 50.0)
    _check(
        ph,
        maps,
        {
            GM: {"a": 0.09, "f": 0.06, "fcsf": 0.18, "DeR": 0.12, "fr": 0.06},
            WM: {"a": 0.09, "f": 0.06, "fr": 0.06},
        },
    )
    # CSF: free water everywhere
    csf = ph.labels == 3
    assert np.median(np.abs(maps["fcsf"][csf] - 1)) < 0.03


@pytest.mark.slow  # two more fits of 241 voxels, ≈ 30-60 s on 2 shared cores
def test_axcalibersmt_recovered_at_snr_100_and_the_white_matter_bias_is_the_rician_floor():
    """SNR 100, measured (seed 0): grey a 1.9 %, f 1.5 %, fcsf 4.9 %, DeR 2.5 %; white a 1.9 %,
    f 1.7 % (fcsf 15 %, DeR 13 %, Rician floor). With Gaussian noise of the SNR-50 σ the white
    matter's DeR median error falls from 32 % to 7.8 % and its signed bias from +32 % to −1.4 %:
    the bias is the magnitude floor of the b = 13.5/17.8 signal, not the fit."""
    ph, maps = _run("axcalibersmt", 100.0)
    _check(
        ph,
        maps,
        {
            GM: {"a": 0.04, "f": 0.03, "fcsf": 0.09, "DeR": 0.05},
            WM: {"a": 0.04, "f": 0.035},
        },
    )
    ph50, maps50 = _run("axcalibersmt", 50.0)
    for lab in (GM, WM):  # twice the SNR: smaller errors in a and f
        e100 = _median_errors(ph, maps, lab, ("a", "f"))
        e50 = _median_errors(ph50, maps50, lab, ("a", "f"))
        assert all(e100[k] < e50[k] for k in e100), (lab, e100, e50)
    gph, gmaps = _run("axcalibersmt", 50.0, "gaussian")
    wm = gph.labels == WM
    bias_g = np.median((gmaps["DeR"][wm] - gph.truth["DeR"][wm]) / gph.truth["DeR"][wm])
    bias_r = np.median((maps50["DeR"][wm] - ph50.truth["DeR"][wm]) / ph50.truth["DeR"][wm])
    assert abs(bias_g) < 0.05 and bias_r > 0.15, (bias_g, bias_r)
    _check(gph, gmaps, {WM: {"a": 0.05, "f": 0.05, "DeR": 0.12}})


# -------------------------------------------------------------------------------------------------
# SANDI (δ = 8 ms, Δ = 20/40 ms, b = 0.5–10 ms/µm²)
# -------------------------------------------------------------------------------------------------
def test_sandi_recovered_at_snr_50():
    """Measured (seed 0 / 1): grey fs 1.7/1.9 %, fnr 5.5/5.8 %, Dn 11.6/11.3 %, Rs 0.7/1.0 %,
    De 3.7/6.6 %; white fs 6.7/8.5 %, fnr 5.8/7.2 %, Dn 10.7/11.2 %, Rs 4.8/4.7 %,
    De 11.2/12.3 %. Every median signed bias is within 6 % of truth."""
    ph, maps = _run("sandi", 50.0)
    _check(
        ph,
        maps,
        {
            GM: {"fs": 0.04, "fnr": 0.10, "Dn": 0.17, "Rs": 0.02, "De": 0.10, "fn": 0.10},
            WM: {"fs": 0.13, "fnr": 0.11, "Dn": 0.17, "Rs": 0.08, "De": 0.18, "fn": 0.10},
        },
    )
    csf = ph.labels == 3
    assert np.median(np.abs(maps["De"][csf] - 3.0)) < 0.03


@pytest.mark.slow  # one more fit of 241 voxels, ≈ 20-30 s on 2 shared cores
def test_sandi_recovered_at_snr_100():
    """Measured (seed 0): grey fs 0.8 %, fnr 2.5 %, Dn 5.1 %, Rs 0.4 %, De 1.9 %; white fs 3.4 %,
    fnr 3.0 %, Dn 5.1 %, Rs 2.7 %, De 4.4 %."""
    ph, maps = _run("sandi", 100.0)
    _check(
        ph,
        maps,
        {
            GM: {"fs": 0.02, "fnr": 0.05, "Dn": 0.09, "Rs": 0.01, "De": 0.04},
            WM: {"fs": 0.06, "fnr": 0.06, "Dn": 0.09, "Rs": 0.05, "De": 0.08},
        },
    )


@pytest.mark.slow
@pytest.mark.parametrize("model", ["axcalibersmt", "sandi"])
def test_bias_within_5_percent_of_the_range(model):
    """The issue's acceptance: |median(estimate − truth)| < 5 % of each parameter's fitting range
    (its bounds) at SNR 50, per tissue — except AxCaliberSMT's white-matter DeR (Rician floor,
    ≈ 9 % of its 0.01–1.7 range)."""
    ph, maps = _run(model, 50.0)
    names = {"axcalibersmt": ("a", "f", "fcsf", "DeR"), "sandi": ("fs", "fnr", "Dn", "Rs", "De")}
    bounds = {p.name: (p.lower, p.upper) for p in example_model(model).parameters}
    assert diffusion_spec(model).cls is type(example_model(model))
    for lab in (GM, WM):
        sel = ph.labels == lab
        for k in names[model]:
            if model == "axcalibersmt" and lab == WM and k == "DeR":
                continue
            lo, hi = bounds[k]
            bias = np.median(maps[k][sel] - ph.truth[k][sel]) / (hi - lo)
            assert abs(bias) < 0.05, (model, ph.tissues[lab], k, bias)
