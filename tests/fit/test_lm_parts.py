"""``fit.lm`` split into parts fitted side by side in CPU threads: every voxel's result, its
iteration count and the cost history are those of the unsplit fit, bit for bit."""

import sys

import numpy as np
import pytest
import torch

from qmrkit import fit, models
from qmrkit.errors import ParameterError
from qmrkit.sim import MOLLI_TI, add_noise

from .helpers import molli_series

lm_module = sys.modules["qmrkit.fit.lm"]
TI = np.array(MOLLI_TI)
TE = np.array([10.0, 20, 30, 40, 60, 80, 100, 120])


def _molli(n, seed=0):
    return molli_series(n, seed)[1].reshape(30, 40, -1)


def _t2(n, seed=0):
    rng = np.random.default_rng(seed)
    t2 = rng.uniform(20, 200, n)
    clean = 1000.0 * np.exp(-TE / t2[:, None])
    return add_noise(clean, 20.0, kind="rician", seed=seed + 1).reshape(30, 40, -1)


@pytest.fixture
def small_parts(monkeypatch):
    """Parts of 100 voxels (the default minimum, 4,096, would leave these volumes whole)."""
    monkeypatch.setattr(lm_module, "_MIN_PART_VOXELS", 100)


CASES = {
    "molli": (lambda: models.MolliT1(TI), _molli),
    "t2": (lambda: models.MonoExp(TE), _t2),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("workers, batch_size", [(2, None), (3, None), (2, 250)])
def test_split_fit_equals_whole_fit(small_parts, name, workers, batch_size):
    make_model, make_data = CASES[name]
    model, data = make_model(), make_data(1200)
    mask = np.ones(data.shape[:2], bool)
    mask[:3] = False  # the parts are ranges of the masked voxels, not of the image
    whole = fit.lm(model, data, mask=mask, workers=1, batch_size=batch_size, progress=False)
    split = fit.lm(model, data, mask=mask, workers=workers, batch_size=batch_size, progress=False)
    assert whole.settings["workers"] == 1 and split.settings["workers"] == workers
    for k in model.parameter_names:
        a, b = whole[k].numpy(), split[k].numpy()
        assert np.array_equal(np.isnan(a), np.isnan(b)) and np.isnan(a[:3]).all()
        assert np.array_equal(a[~np.isnan(a)], b[~np.isnan(b)]), k
    assert torch.equal(whole.iterations, split.iterations)
    assert torch.equal(whole.converged, split.converged)
    # the history sums the parts' costs: the same sums, up to the order of float64 additions
    np.testing.assert_allclose(split.loss_history, whole.loss_history, rtol=1e-12)
    # and the fit is a fit: T1/T2 near the float64 reference of the same data
    ref = fit.lm(model, data, mask=mask, dtype=torch.float64, workers=1, progress=False)
    key = "T1" if name == "molli" else "T2"
    rel = np.abs(split[key].numpy() - ref[key].numpy()) / ref[key].numpy()
    assert np.nanmedian(rel) < 1e-5


def test_default_is_one_part(small_parts):
    """Splitting pays only on a loaded machine (see fit.lm's docstring): it is opt-in."""
    model, data = models.MonoExp(TE), _t2(1200)
    assert fit.lm(model, data, progress=False).settings["workers"] == 1


def test_small_volumes_are_not_split():
    """Below 4,096 voxels a part would cost more in per-operation overhead than it saves."""
    model, data = models.MonoExp(TE), _t2(1200)
    assert fit.lm(model, data, workers=8, progress=False).settings["workers"] == 1


def test_workers_must_be_positive():
    with pytest.raises(ParameterError, match="workers must be >= 1, got 0"):
        fit.lm(models.MonoExp(TE), _t2(1200), workers=0)
