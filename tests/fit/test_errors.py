"""Bad input gets a clear qmrkit error, never a traceback from deep inside torch."""

import numpy as np
import pytest

from qmrkit import fit, models
from qmrkit.errors import (
    BoundsError,
    DataFileError,
    DeviceError,
    NonFiniteWarning,
    ParameterError,
    ShapeError,
    UnknownNameError,
)

TI = [100, 180, 260, 1000, 1080, 1900, 2000, 2800]


def test_series_length_mismatch_names_both():
    with pytest.raises(ShapeError, match=r"7 measurements.*8 inversion times"):
        fit.lm(models.MolliT1(TI), np.ones((4, 4, 7)))


def test_mask_shape_mismatch():
    with pytest.raises(ShapeError, match=r"mask has shape \(3, 4\).*\(4, 4\)"):
        fit.lm(models.MolliT1(TI), np.ones((4, 4, 8)), mask=np.ones((3, 4)))


def test_bounds_lower_not_below_upper():
    with pytest.raises(BoundsError, match="lower bound must be < upper"):
        fit.Parameter("T1", 10.0, 5.0)


def test_unknown_model_lists_available():
    with pytest.raises(UnknownNameError, match="available models: .*molli"):
        models.get("mollie", ti=TI)


def test_nonfinite_voxels_excluded_with_count():
    data = np.abs(np.random.default_rng(0).normal(500, 50, (5, 5, 8)))
    data[0, 0, 0] = np.nan
    data[1, 1, 3] = np.inf
    with pytest.warns(NonFiniteWarning, match="2 voxel"):
        res = fit.lm(models.MolliT1(TI), data)
    assert np.isnan(res["T1"].numpy()[0, 0]) and np.isnan(res["T1"].numpy()[1, 1])
    assert res.n_excluded == 2


def test_empty_mask_and_all_zero_data():
    with pytest.raises(ShapeError, match="no voxel to fit"):
        fit.lm(models.MolliT1(TI), np.ones((2, 2, 8)), mask=np.zeros((2, 2)))
    with pytest.raises(ParameterError, match="all zero"):
        fit.lm(models.MolliT1(TI), np.zeros((2, 2, 8)))


def test_unreadable_nifti_names_path(tmp_path):
    from qmrkit.io import load_nifti

    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not a nifti file")
    with pytest.raises(DataFileError, match="broken.nii.gz"):
        load_nifti(bad)
    with pytest.raises(DataFileError, match="not found"):
        load_nifti(tmp_path / "missing.nii")


def test_bad_options():
    data = np.ones((2, 2, 8))
    m = models.MolliT1(TI)
    with pytest.raises(ParameterError, match="loss"):
        fit.adam(m, data, loss="l3")
    with pytest.raises(ParameterError, match="optimizer"):
        fit.adam(m, data, optimizer="lbfgs")
    with pytest.raises(ParameterError, match="max_iter"):
        fit.lm(m, data, max_iter=0)
    with pytest.raises(ParameterError, match="convergence_window"):
        fit.adam(m, data, convergence_window=1)
    with pytest.raises(ParameterError, match="unknown parameters"):
        fit.adam(m, data, regularizers=[fit.TotalVariation("T2", 0.1)])
    with pytest.raises(ParameterError, match="flip_angles"):
        models.VfaT1([0, 10], 15)
    with pytest.raises(ShapeError, match="B1|b1"):
        fit.lm(models.VfaT1([3, 15], 15, b1=np.ones((3, 3))), np.ones((2, 2, 2)))


def test_infinite_bounds_rejected_by_adam():
    model = fit.model_from_function(
        lambda S0, k, t: S0 * (1 - k * t),
        {"S0": (0, 10), "k": (-np.inf, np.inf)},
        amplitude=["S0"],
        t=[0.0, 1, 2],
    )
    with pytest.raises(BoundsError, match="finite bounds"):
        fit.adam(model, np.ones((2, 3)))


def test_unavailable_device():
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(DeviceError, match="CUDA is not available"):
        fit.lm(models.MolliT1(TI), np.ones((2, 2, 8)), device="cuda")
