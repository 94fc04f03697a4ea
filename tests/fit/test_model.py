"""User-defined models, dictionary starts, results on disk."""

import json

import numpy as np
import pytest
import torch

from qmrkit import fit
from qmrkit.errors import BoundsError, ModelError, ParameterError
from qmrkit.sim import add_noise

B_VALUES = np.array([0.0, 0.2, 0.5, 1.0, 1.5, 2.0, 3.0])  # ms/µm²


def biexp(S0, f, Dfast, Dslow, b):
    """A bi-exponential (IVIM-like) diffusion decay written by a user: no derivatives."""
    return S0 * (f * torch.exp(-b * Dfast) + (1 - f) * torch.exp(-b * Dslow))


def _user_model():
    return fit.model_from_function(
        biexp,
        {"S0": (0, 10), "f": (0, 1), "Dfast": (1.0, 5.0, "µm²/ms"), "Dslow": (0.05, 1.0, "µm²/ms")},
        amplitude=["S0"],
        b=B_VALUES,
        name="biexp",
    )


def test_model_from_function_fits_without_derivatives():
    model = _user_model()
    rng = np.random.default_rng(0)
    n = 200
    truth = {
        "S0": rng.uniform(800, 1200, n),
        "f": rng.uniform(0.2, 0.4, n),
        "Dfast": rng.uniform(2.0, 3.0, n),
        "Dslow": rng.uniform(0.3, 0.6, n),
    }
    data = add_noise(model.simulate(truth).numpy(), 0.5, kind="gaussian", seed=1)
    res = fit.lm(model, data)  # starts from a dictionary search: the model has no closed form
    assert res.settings["start"] == "dictionary"
    assert res.converged.float().mean() > 0.99
    for k in ("Dslow", "f"):
        err = np.abs(res[k].numpy() - truth[k]) / truth[k]
        assert np.median(err) < 0.05, (k, np.median(err))
    # and LM found the least-squares minimum: scipy from the same point does not improve on it
    import scipy.optimize as so

    for v in range(5):
        p = np.array([res[k][v].item() for k in model.parameter_names], dtype=np.float64)

        def r(q, y=data[v]):
            return (
                q[0] * (q[1] * np.exp(-B_VALUES * q[2]) + (1 - q[1]) * np.exp(-B_VALUES * q[3])) - y
            )

        ref = so.least_squares(r, p, method="lm", xtol=1e-12, ftol=1e-12)
        assert ref.cost >= 0.5 * np.sum(r(p) ** 2) * (1 - 1e-4)


def test_model_from_function_errors():
    with pytest.raises(ModelError, match="does not accept"):
        fit.model_from_function(lambda S0, T2: S0, {"S0": (0, 1), "T2": (1, 2)}, te=[1, 2])
    with pytest.raises(ModelError, match="needs arguments"):
        fit.model_from_function(lambda S0, te, tr: S0 * te, {"S0": (0, 1)}, te=[1, 2])
    with pytest.raises(ModelError, match="torch.Tensor"):
        fit.model_from_function(lambda S0, te: np.exp(-te.numpy()), {"S0": (0, 1)}, te=[1, 2])
    with pytest.raises(BoundsError, match="lower bound must be < upper"):
        fit.model_from_function(lambda S0, te: S0 * te, {"S0": (1, 1)}, te=[1, 2])
    with pytest.raises(ModelError, match="shape"):
        fit.model_from_function(lambda S0, te: (S0 * te).sum(), {"S0": (0, 1)}, te=[1, 2])
    with pytest.raises(ParameterError, match="amplitude names"):
        fit.model_from_function(lambda S0, te: S0 * te, {"S0": (0, 1)}, amplitude=["M0"], te=[1, 2])


def test_dictionary_search_recovers_atoms_exactly():
    """Noiseless data made from the dictionary's own atoms are matched exactly (scale by projection)."""
    model = _user_model()
    from qmrkit.fit.dictionary import dictionary_atoms, search
    from qmrkit.fit.problem import make_problem

    probe = make_problem(model, np.ones((1, B_VALUES.size)), dtype=torch.float64)
    atoms = dictionary_atoms(probe, 500, seed=3)
    pick = atoms[[7, 123, 499]].clone()
    pick[:, 0] = torch.tensor([700.0, 1000.0, 1300.0])
    data = (
        model.to(None, torch.float64)
        .forward({n: pick[:, j : j + 1] for j, n in enumerate(model.parameter_names)})
        .numpy()
    )
    problem = make_problem(model, data, dtype=torch.float64)
    theta = search(problem, dictionary_atoms(problem, 500, seed=3))
    phys = problem.to_physical(theta)
    for j, n in enumerate(model.parameter_names):
        np.testing.assert_allclose(phys[n].numpy(), pick[:, j].numpy(), rtol=1e-9)
    res = fit.dictionary_search(model, data, n_atoms=500, seed=3)
    np.testing.assert_allclose(res["f"].numpy(), pick[:, 1].numpy(), rtol=1e-6)


def test_fit_result_save_roundtrip(tmp_path):
    from qmrkit import models
    from qmrkit.io import load_nifti

    te = np.array([10.0, 20, 40, 80])
    model = models.MonoExp(te, kind="T2")
    t2 = np.linspace(20, 120, 20).reshape(4, 5)
    data = model.simulate({"S0": np.full((4, 5), 900.0), "T2": t2}).numpy()
    affine = np.diag([1.5, 1.5, 4.0, 1.0])
    res = fit.lm(model, data, dtype=torch.float64)
    files = res.save(tmp_path, affine=affine, prefix="sub-01_")
    names = {p.name for p in files}
    assert {"sub-01_T2map.nii.gz", "sub-01_S0map.nii.gz", "sub-01_fit.json"} <= names
    arr, aff = load_nifti(tmp_path / "sub-01_T2map.nii.gz")
    np.testing.assert_allclose(arr, t2, rtol=1e-5)
    np.testing.assert_allclose(aff, affine)
    side = json.loads((tmp_path / "sub-01_fit.json").read_text())
    assert side["Model"] == "monoexp" and side["Units"]["T2map"] == "ms"
    assert side["VoxelsFitted"] == 20 and side["FractionConverged"] == 1.0
    assert "T2" in res.summary()
