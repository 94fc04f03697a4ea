"""Phantoms carry the reference values they claim; simulated series match their truth."""

import numpy as np
import pytest

from qmrkit import fit, models
from qmrkit.errors import ParameterError, ShapeError
from qmrkit.sim import MOLLI_TI, add_noise, cardiac_phantom, molli_series, nist_phantom


def test_nist_phantom_reference_values():
    ph = nist_phantom((96, 96), plate="T1", version=1)
    labels, t1, t2 = ph["labels"], ph["T1"], ph["T2"]
    assert set(np.unique(labels)) == set(range(15))
    # Stupic et al. 2021, T1 plate v1, spheres 1 and 14
    assert t1[labels == 1][0] == pytest.approx(1989.0) and t1[labels == 14][0] == pytest.approx(
        21.719
    )
    assert t2[labels == 3][0] == pytest.approx(717.9)
    ph2 = nist_phantom((64, 64, 16), plate="T2")
    assert ph2["T2"][ph2["labels"] == 14][0] == pytest.approx(5.592)
    areas = [np.sum(labels == k) for k in range(1, 15)]
    assert max(areas) - min(areas) <= 0.1 * max(areas)  # spheres of equal size


def test_cardiac_phantom_tissues():
    ph = cardiac_phantom((64, 64))
    names = ph["tissues"]
    for lab, name in names.items():
        if lab:
            assert (ph["labels"] == lab).sum() > 0, name
    assert ph["T1"][ph["labels"] == 0].max() == 0
    assert cardiac_phantom((32, 32, 4))["labels"].shape == (32, 32, 4)
    with pytest.raises(ShapeError):
        cardiac_phantom((4, 4))


def test_molli_series_truth_is_consistent():
    t1 = np.array([500.0, 1000.0, 1500.0])
    series, truth = molli_series(t1, 1000.0, MOLLI_TI, snr=None)
    np.testing.assert_allclose(truth["T1star"] * (truth["B"] / truth["A"] - 1), t1)
    np.testing.assert_allclose(
        series,
        models.MolliT1(MOLLI_TI).simulate({k: truth[k] for k in ("A", "B", "T1star")}).numpy(),
        rtol=1e-12,
    )
    with pytest.raises(ParameterError):
        molli_series(t1, 1.0, apparent_ratio=1.5)


def test_rician_noise_statistics():
    x = add_noise(np.zeros(200_000), 2.0, kind="rician", seed=1)
    assert np.mean(x) == pytest.approx(2.0 * np.sqrt(np.pi / 2), rel=0.01)  # Rayleigh mean
    g = add_noise(np.zeros(200_000), 2.0, kind="gaussian", seed=1)
    assert np.std(g) == pytest.approx(2.0, rel=0.01)


def test_demo_phantom_fit_is_unbiased():
    """The make-demo job: per-tissue T1 bias below 1% at SNR 50."""
    ph = cardiac_phantom((64, 64))
    series, _ = molli_series(ph["T1"], ph["PD"] * 1000, MOLLI_TI, snr=50, seed=0)
    res = fit.lm(models.MolliT1(MOLLI_TI), series, mask=ph["labels"] > 0)
    est = res["T1"].numpy()
    for lab in range(1, len(ph["tissues"])):
        sel = ph["labels"] == lab
        true = ph["T1"][sel][0]
        assert abs(np.mean(est[sel]) - true) / true < 0.01, ph["tissues"][lab]
