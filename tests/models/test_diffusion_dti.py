"""DTI (qmrkit.models.DTI fitted by fit.lm) against DIPY's TensorModel (WLS and NLLS)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qmrkit import fit
from qmrkit.errors import ConvergenceWarning, ShapeError
from qmrkit.io.dwi import load_dwi
from qmrkit.models.diffusion import DTI, dti_wls, tensor_eig, tensor_maps

dipy_gradients = pytest.importorskip("dipy.core.gradients")
dipy_dti = pytest.importorskip("dipy.reconst.dti")


def _random_rotations(n: int, rng: np.random.Generator) -> np.ndarray:
    q = rng.normal(size=(n, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    return np.stack(
        [
            np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
            np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
            np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
        ],
        -2,
    )


def _scheme(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two b = 0 and 30 directions on b = 1 and 2 ms/µm²."""
    g = rng.normal(size=(30, 3))
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    b = np.r_[0.0, 0.0, np.where(np.arange(30) < 15, 1.0, 2.0)]
    return b, np.vstack([np.zeros((2, 3)), g])


def _tensors(n: int, rng: np.random.Generator) -> np.ndarray:
    """Tensors (µm²/ms) with random orientations, λ1 ∈ [1.2, 2], λ2, λ3 ∈ [0.2, 1]."""
    evals = np.stack(
        [rng.uniform(1.2, 2.0, n), rng.uniform(0.2, 1.0, n), rng.uniform(0.2, 1.0, n)], -1
    )
    rot = _random_rotations(n, rng)
    return np.einsum("nij,nj,nkj->nik", rot, evals, rot)


def _simulate(tensor, b, g, s0, sigma, rng):
    sig = s0[:, None] * np.exp(-b * np.einsum("ni,vij,nj->vn", g, tensor, g))
    if sigma:
        sig = np.hypot(sig + sigma * rng.normal(size=sig.shape), sigma * rng.normal(size=sig.shape))
    return sig


def _truth_maps(tensor):
    ev = np.linalg.eigvalsh(tensor)[:, ::-1]
    md = ev.mean(1)
    fa = np.sqrt(1.5 * ((ev - md[:, None]) ** 2).sum(1) / (ev**2).sum(1))
    return fa, md


def test_noise_free_recovery_and_dipy():
    rng = np.random.default_rng(3)
    b, g = _scheme(rng)
    tensor = _tensors(200, rng)
    data = _simulate(tensor, b, g, rng.uniform(500, 1500, 200), 0.0, rng)
    model = DTI(b, g)
    res = fit.lm(model, data, dtype=torch.float64, progress=False)
    fa, md = _truth_maps(tensor)
    np.testing.assert_allclose(res["FA"].numpy(), fa, rtol=1e-8)
    np.testing.assert_allclose(res["MD"].numpy(), md, rtol=1e-8)
    gtab = dipy_gradients.gradient_table(b * 1000, bvecs=g)
    ref = dipy_dti.TensorModel(gtab, fit_method="WLS").fit(data)
    np.testing.assert_allclose(res["FA"].numpy(), ref.fa, rtol=1e-8)
    np.testing.assert_allclose(res["MD"].numpy(), ref.md * 1000, rtol=1e-8)  # mm²/s → µm²/ms
    np.testing.assert_allclose(res["AD"].numpy(), ref.ad * 1000, rtol=1e-8)
    np.testing.assert_allclose(res["RD"].numpy(), ref.rd * 1000, rtol=1e-8)
    v1 = np.stack([res[f"V1{c}"].numpy() for c in "xyz"], -1)
    np.testing.assert_allclose(np.abs((v1 * ref.evecs[..., 0]).sum(-1)), 1.0, atol=1e-10)


def test_noisy_wls_and_nlls_equal_dipy():
    """Rician noise (SNR 30 at b = 0). WLS: the same estimator as DIPY's (Chung 2006), equal to
    1e-9. NLLS: the same objective; qmrkit's lm reaches a cost no higher than DIPY's (scipy
    leastsq) in every voxel, and FA/MD agree to 1e-4 relative — DIPY's leastsq stops on a flat
    valley of the cost earlier than lm, which is where the remaining ~3e-5 comes from."""
    rng = np.random.default_rng(4)
    b, g = _scheme(rng)
    tensor = _tensors(300, rng)
    s0 = np.full(300, 1000.0)
    data = _simulate(tensor, b, g, s0, 1000.0 / 30, rng)
    gtab = dipy_gradients.gradient_table(b * 1000, bvecs=g)
    t, s0_hat = dti_wls(torch.from_numpy(b), torch.from_numpy(g), torch.from_numpy(data))
    maps = tensor_maps(tensor_eig(t)[0])
    wls = dipy_dti.TensorModel(gtab, fit_method="WLS", return_S0_hat=True).fit(data)
    np.testing.assert_allclose(maps["FA"].numpy(), wls.fa, rtol=1e-9)
    np.testing.assert_allclose(maps["MD"].numpy(), wls.md * 1000, rtol=1e-9)
    np.testing.assert_allclose(s0_hat.numpy(), wls.S0_hat, rtol=1e-9)

    model = DTI(b, g)
    res = fit.lm(model, data, dtype=torch.float64, ftol=1e-12, xtol=1e-12, progress=False)
    assert res.fraction_converged == 1.0
    nlls = dipy_dti.TensorModel(gtab, fit_method="NLLS", return_S0_hat=True).fit(data)
    cost_q = ((model.simulate({k: res[k] for k in model.parameter_names}).numpy() - data) ** 2).sum(
        1
    )
    cost_d = ((nlls.predict(gtab, S0=nlls.S0_hat) - data) ** 2).sum(1)
    assert (cost_q <= cost_d * (1 + 1e-12)).all()
    np.testing.assert_allclose(res["FA"].numpy(), nlls.fa, rtol=1e-4)
    np.testing.assert_allclose(res["MD"].numpy(), nlls.md * 1000, rtol=1e-4)


@pytest.mark.parametrize("name", ["small_101D", "small_25"])
def test_dipy_bundled_data(name):
    """DIPY's own small DWI files (inside the wheel). DIPY does not normalise b-vectors (these are
    unit to 5e-5), qmrkit does: DIPY gets qmrkit's table so both solve the same problem. Voxels
    with a zero sample are left out of the WLS comparison: DIPY floors the log at an absolute
    1e-4, qmrkit at 1e-4 × the voxel's largest sample (scale-free)."""
    from dipy.data import get_fnames

    dwi = load_dwi(*get_fnames(name=name))
    data = dwi.data.astype(np.float64)
    mask = (dwi.mean_b0() > 0.1 * dwi.mean_b0().max()) & (data > 0).all(-1)
    gtab = dipy_gradients.gradient_table(dwi.bvals * 1000, bvecs=dwi.bvecs)
    model = DTI.from_dwi(dwi)
    t, _ = dti_wls(model.b, model.g, torch.from_numpy(data[mask]))
    wls = dipy_dti.TensorModel(gtab, fit_method="WLS").fit(data[mask])
    np.testing.assert_allclose(tensor_maps(tensor_eig(t)[0])["FA"].numpy(), wls.fa, rtol=1e-9)
    res = fit.lm(
        model, data, mask=mask, dtype=torch.float64, ftol=1e-12, xtol=1e-12, progress=False
    )
    nlls = dipy_dti.TensorModel(gtab, fit_method="NLLS").fit(data[mask])
    np.testing.assert_allclose(res["FA"].numpy()[mask], nlls.fa, rtol=1e-4)
    np.testing.assert_allclose(res["MD"].numpy()[mask], nlls.md * 1000, rtol=1e-4)
    assert np.isnan(res["FA"].numpy()[~mask]).all()


def test_tensor_is_positive_and_errors():
    rng = np.random.default_rng(5)
    b, g = _scheme(rng)
    # pure noise gives indefinite WLS tensors; the fitted Cholesky tensor never is
    data = np.abs(rng.normal(100, 30, size=(50, b.size)))
    t, _ = dti_wls(torch.from_numpy(b), torch.from_numpy(g), torch.from_numpy(data))
    assert (tensor_eig(t)[0][:, 2] < 0).sum() > 10
    with pytest.warns(ConvergenceWarning):  # noise has flat directions; a voxel may crawl
        res = fit.lm(DTI(b, g), data, dtype=torch.float64, progress=False)
    assert (res["L3"].numpy() >= -1e-15).all()  # PSD up to the eigensolver's rounding
    with pytest.raises(ShapeError, match="at least 6 non-collinear"):
        DTI(b[:7], g[:7])
    with pytest.raises(ShapeError, match="non-collinear"):
        DTI(np.r_[0, np.ones(8)], np.vstack([[0, 0, 0], np.tile([[1.0, 0, 0], [0, 1, 0]], (4, 1))]))


def test_registry_builds_dti():
    from qmrkit import models

    rng = np.random.default_rng(6)
    b, g = _scheme(rng)
    m = models.get("dti", bvals=b, bvecs=g)
    assert isinstance(m, DTI) and m.n_measurements == b.size
    assert "dti" in models.available(diffusion=True) and "dti" not in models.available()
