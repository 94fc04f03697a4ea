"""Jacobians without autodiff overhead: closed-form relaxometry derivatives, the stacked
forward-mode pass, reverse mode, the unrolled small Cholesky solve, and LM results that do not
depend on which of them is used."""

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.autograd.forward_ad as fwAD

from qmrkit import fit, models
from qmrkit.errors import ParameterError
from qmrkit.fit.lm import _cholesky_solve_small, _load_forward_ad, residual_and_jacobian
from qmrkit.fit.problem import make_problem
from qmrkit.sim import MOLLI_TI, add_noise

from .helpers import start_away_from_optimum

TI = np.array(MOLLI_TI)
IR_TI = np.array([50.0, 150, 300, 600, 1200, 2400, 4800])
FA = np.array([2.0, 5, 10, 15, 20])
TE = np.array([5.0, 10, 20, 35, 55, 80])
SRC = str(Path(__file__).resolve().parents[2] / "src")
_load_forward_ad()  # torch's one-off load of forward mode, without its DeprecationWarning


def _params(model, n, rng):
    """Random physical parameters inside each parameter's bounds, as (n, 1) float64 columns."""
    lo = {"A": 0.5, "B": 1.2, "T1star": 200.0, "M0": 0.5, "T1": 200.0, "eta": 0.6, "S0": 0.5}
    hi = {"A": 1.0, "B": 2.0, "T1star": 1800.0, "M0": 2.0, "T1": 2500.0, "eta": 1.0, "S0": 2.0}
    lo.update(T2=10.0, T2star=5.0, R2=5.0, R2star=10.0, C=0.0)
    hi.update(T2=200.0, T2star=80.0, R2=100.0, R2star=200.0, C=0.2)
    return {
        k: torch.tensor(rng.uniform(lo[k], hi[k], (n, 1)), dtype=torch.float64)
        for k in model.parameter_names
    }


CASES = {
    "molli": lambda: models.MolliT1(TI),
    "ir": lambda: models.InversionRecovery(IR_TI),
    "vfa": lambda: models.VfaT1(FA, 15.0),
    "vfa_b1": lambda: models.VfaT1(FA, 15.0, b1=0.9),
    "t2": lambda: models.MonoExp(TE, kind="T2"),
    "t2star": lambda: models.MonoExp(TE, kind="T2star"),
    "r2": lambda: models.MonoExp(TE, kind="R2"),
    "r2star": lambda: models.MonoExp(TE, kind="R2star"),
    "t2_offset": lambda: models.MonoExp(TE, kind="T2", offset=True),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_closed_form_jacobian_matches_forward_autodiff(name):
    model = CASES[name]()
    rng = np.random.default_rng(3)
    p = _params(model, 200, rng)
    if model.covariates:
        p["b1"] = torch.tensor(rng.uniform(0.8, 1.2, (200, 1)), dtype=torch.float64)
    sig, grads = model.jacobian(p)
    assert torch.allclose(sig, model.forward(p), rtol=1e-13, atol=0)
    assert set(grads) == set(model.parameter_names)
    for k in model.parameter_names:
        with fwAD.dual_level():
            q = dict(p)
            q[k] = fwAD.make_dual(p[k], torch.ones_like(p[k]))
            ref = fwAD.unpack_dual(model.forward(q)).tangent
        scale = ref.abs().max()
        assert float((grads[k] - ref).abs().max()) <= 1e-10 * float(scale), k


def test_closed_form_jacobian_matches_finite_differences_numpy():
    """An independent check of one formula (VFA ∂S/∂T1) by float64 central differences in NumPy."""
    model = models.VfaT1(FA, 15.0)
    m0, t1 = 1.3, 900.0
    p = {"M0": torch.tensor([[m0]], dtype=torch.float64), "T1": torch.tensor([[t1]]).double()}
    _, grads = model.jacobian(p)

    def s(t):
        a, e = np.deg2rad(FA), np.exp(-15.0 / t)
        return m0 * np.sin(a) * (1 - e) / (1 - np.cos(a) * e)

    h = 1e-3
    fd = (s(t1 + h) - s(t1 - h)) / (2 * h)
    np.testing.assert_allclose(grads["T1"][0].numpy(), fd, rtol=1e-7)


def _generic_problem(complex_data=False, weights=False):
    def sig(S0, T2, te):
        out = S0 * torch.exp(-te / T2)
        return out * torch.exp(1j * 0.01 * te) if complex_data else out

    model = fit.model_from_function(
        sig, {"S0": (0, 10), "T2": (1, 500, "ms")}, amplitude=["S0"], te=TE
    )
    rng = np.random.default_rng(5)
    s0, t2 = rng.uniform(0.5, 2, 50), rng.uniform(20, 150, 50)
    data = s0[:, None] * np.exp(-TE / t2[:, None]) + rng.normal(0, 0.01, (50, TE.size))
    if complex_data:
        data = data * np.exp(1j * 0.012 * TE)
    w = rng.uniform(0.5, 2.0, data.shape) if weights else None
    problem = make_problem(model, data, weights=w, dtype=torch.float64)
    theta = torch.tensor(np.stack([s0 / problem.scale, t2], 1))
    return problem, theta


@pytest.mark.parametrize("complex_data", [False, True])
@pytest.mark.parametrize("weights", [False, True])
def test_forward_stacked_and_reverse_modes_agree(complex_data, weights):
    problem, theta = _generic_problem(complex_data, weights)
    idx = torch.arange(10, 40)
    r_f, J_f = residual_and_jacobian(problem, theta[idx], idx, "forward")
    r_r, J_r = residual_and_jacobian(problem, theta[idx], idx, "reverse")
    # an independent reference: one make_dual per parameter (torch's forward mode, unstacked)
    cols = []
    for j in range(theta.shape[1]):
        tangent = torch.zeros_like(theta[idx])
        tangent[:, j] = 1.0
        with fwAD.dual_level():
            out = fwAD.unpack_dual(problem.residual(fwAD.make_dual(theta[idx], tangent), idx))
        cols.append(out.tangent)
    J_ref = torch.stack(cols, -1)
    assert J_f.shape == (30, TE.size * (2 if complex_data else 1), 2)
    assert torch.equal(r_f, r_r)
    assert float((J_f - J_ref).abs().max()) <= 1e-12 * float(J_ref.abs().max())
    assert float((J_r - J_ref).abs().max()) <= 1e-12 * float(J_ref.abs().max())


def test_model_mode_matches_autodiff_through_problem_with_weights():
    model = models.MolliT1(TI)
    rng = np.random.default_rng(8)
    p = _params(model, 40, rng)
    data = model.forward(p).numpy() * 1000 + rng.normal(0, 5, (40, TI.size))
    problem = make_problem(
        model, data, weights=rng.uniform(0.5, 2, data.shape), dtype=torch.float64
    )
    theta = torch.cat(
        [p["A"] * 1000 / problem.scale, p["B"] * 1000 / problem.scale, p["T1star"]], 1
    )
    r_m, J_m = residual_and_jacobian(problem, theta, None, "model")
    r_f, J_f = residual_and_jacobian(problem, theta, None, "forward")
    assert torch.allclose(r_m, r_f, rtol=1e-12, atol=1e-14)
    assert float((J_m - J_f).abs().max()) <= 1e-10 * float(J_f.abs().max())


def test_jacobian_mode_errors():
    problem, theta = _generic_problem()
    with pytest.raises(ParameterError, match="no closed-form"):
        residual_and_jacobian(problem, theta, None, "model")
    with pytest.raises(ParameterError, match="jacobian must be one of"):
        residual_and_jacobian(problem, theta, None, "complex-step")
    with pytest.raises(ParameterError, match="jacobian must be one of"):
        fit.lm(models.MolliT1(TI), np.ones((2, TI.size)), jacobian="numeric")


@pytest.mark.parametrize("P", [1, 2, 3, 5, 6])
def test_unrolled_cholesky_matches_lapack(P):
    g = torch.Generator().manual_seed(P)
    X = torch.randn(300, P + 3, P, dtype=torch.float64, generator=g)
    A = X.transpose(1, 2) @ X + 1e-3 * torch.eye(P, dtype=torch.float64)
    b = torch.randn(300, P, dtype=torch.float64, generator=g)
    # a few indefinite and NaN systems: flagged exactly where LAPACK's factorisation fails
    A[:7] = A[:7] - 50.0 * torch.eye(P, dtype=torch.float64)
    A[7, 0, 0] = float("nan")
    x, ok = _cholesky_solve_small(A, b)
    _, info = torch.linalg.cholesky_ex(A)
    assert torch.equal(ok, info == 0)
    ref = torch.linalg.solve(A[ok], b[ok])
    assert float((x[ok] - ref).abs().max()) <= 1e-9 * float(ref.abs().max())


def _phantom(name, n=400):
    rng = np.random.default_rng(11)
    if name == "molli":
        t1s = rng.uniform(300, 1700, n)
        a = rng.uniform(500, 1000, n)
        b = a * rng.uniform(1.9, 2.2, n)
        clean = np.abs(a[:, None] - b[:, None] * np.exp(-TI / t1s[:, None]))
        return models.MolliT1(TI), add_noise(clean, 15.0, seed=2)
    if name == "vfa":
        t1 = rng.uniform(300, 2500, n)
        e = np.exp(-15.0 / t1)[:, None]
        a = np.deg2rad(FA)
        clean = 800 * np.sin(a) * (1 - e) / (1 - np.cos(a) * e)
        return models.VfaT1(FA, 15.0), add_noise(clean, 2.0, seed=2)
    t2 = rng.uniform(15, 150, n)
    clean = 1000 * np.exp(-TE / t2[:, None])
    return models.MonoExp(TE), add_noise(clean, 20.0, seed=2)


@pytest.mark.parametrize("name", ["molli", "vfa", "monoexp"])
def test_lm_results_do_not_depend_on_the_jacobian_path(name):
    model, data = _phantom(name)
    fits = {
        mode: fit.lm(model, data, dtype=torch.float64, jacobian=mode, progress=False)
        for mode in ("model", "forward", "reverse")
    }
    for mode in ("forward", "reverse"):
        for k in model.parameter_names:
            a, b = fits["model"][k].numpy(), fits[mode][k].numpy()
            np.testing.assert_allclose(a, b, rtol=1e-6, err_msg=f"{mode} {k}")
    assert fits["model"].settings["jacobian"] == "model"


def test_lm_first_call_imports_no_compiler_machinery():
    """A closed-form model's fit neither loads torch's forward-mode decompositions nor dynamo."""
    code = textwrap.dedent(
        """
        import sys
        import numpy as np
        from qmrkit import fit, models
        from qmrkit.sim import MOLLI_TI
        m = models.MolliT1(MOLLI_TI)
        ti = np.asarray(MOLLI_TI)
        t1s = np.linspace(300, 1500, 64)[:, None]
        fit.lm(m, np.abs(1.0 - 1.9 * np.exp(-ti / t1s)), progress=False)
        print(sorted(k for k in ("torch._dynamo", "torch._decomp.decompositions_for_jvp", "sympy")
                     if k in sys.modules))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert out.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("n", [1, 2, 7, 100, 4097])
def test_selection_quantile_equals_sorting_quantile(n):
    from qmrkit.fit.problem import _quantile

    x = torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(n)) * 3
    assert _quantile(x, 0.99) == float(torch.quantile(x, 0.99))
    assert _quantile(x, 0.99) == pytest.approx(float(np.quantile(x.numpy(), 0.99)), rel=1e-15)


def test_recovery_start_in_chunks_equals_one_pass(monkeypatch):
    import qmrkit.models.relaxometry as relax

    model, data = _phantom("molli", n=300)
    ti = torch.tensor(TI)
    d = torch.tensor(data)
    whole = torch.stack(relax.recovery_start(ti, d, 5.0, 5000.0))
    monkeypatch.setattr(relax, "_START_CHUNK", 64)  # 5 chunks, the last one partial
    parts = torch.stack(relax.recovery_start(ti, d, 5.0, 5000.0))
    assert torch.equal(whole.nan_to_num(-1.0), parts.nan_to_num(-1.0))
    # and a useful start (LM refines it): T1* within 5 % of the truth in the median voxel and
    # within 30 % everywhere (measured 3.8 % and 24 %)
    t1s = np.random.default_rng(11).uniform(300, 1700, 300)
    err = np.abs(whole[2].numpy() / t1s - 1)
    assert np.median(err) < 0.05 and err.max() < 0.3


@pytest.mark.parametrize("loss", ["l2", "l1", "huber"])
def test_adam_closed_form_gradients_follow_the_autograd_trajectory(loss):
    """fit.adam on MolliT1 (closed-form gradients) and on the same model written as a plain
    function (autograd) take the same steps from the same start, in float64."""
    model, data = _phantom("molli", n=200)

    def molli(A, B, T1star, ti):
        return torch.abs(A - B * torch.exp(-ti / T1star))

    params = {p.name: p for p in model.parameters}
    generic = fit.model_from_function(molli, params, amplitude=["A", "B"], ti=TI)
    # from the optimum (where the closed-form start now sits) the steps would follow gradients
    # of rounding size, and the two derivative paths would part ways on rounding alone
    init = start_away_from_optimum(model, data)
    kw = dict(loss=loss, dtype=torch.float64, max_iter=60, init=init, progress=False)
    with pytest.warns(Warning):  # stops at max_iter by design
        a = fit.adam(model, data, **kw)
    with pytest.warns(Warning):
        b = fit.adam(generic, data, **kw)
    np.testing.assert_allclose(a.loss_history, b.loss_history, rtol=1e-9)
    for k in model.parameter_names:
        np.testing.assert_allclose(a[k].numpy(), b[k].numpy(), rtol=1e-8, err_msg=k)


def _recovery_start_reference(ti, data, tau_lo, tau_hi, n_tau=48):
    """The documented search done directly in float64 NumPy: every sign candidate, every τ of the
    log grid, (A, B) by least squares (infeasible unless both > 0), a parabola through each
    candidate's best grid point and its neighbours, the candidate with the lowest refined cost;
    then, for that candidate, the least-squares τ itself by scipy's bounded Brent search within
    one grid step of the parabola's τ (recovery_start polishes τ by a Newton step instead)."""
    from scipy.optimize import minimize_scalar

    order = np.argsort(ti)
    ts, d = ti[order], np.abs(data[:, order])
    V, M = d.shape
    logs = np.linspace(np.log(tau_lo), np.log(tau_hi), n_tau)
    out = np.full((3, V), np.nan)
    for v in range(V):
        kmin = int(d[v].argmin())
        best = (np.inf, 0.0)
        for k in sorted({min(max(c, 0), M) for c in (0, kmin - 1, kmin, kmin + 1, kmin + 2)}):
            y = np.where(np.arange(M) < k, -d[v], d[v])
            cost = np.full(n_tau, np.inf)
            for gi, lt in enumerate(logs):
                X = np.stack([np.ones(M), -np.exp(-ts / np.exp(lt))], 1)
                (a, b), *_ = np.linalg.lstsq(X, y, rcond=None)
                if a > 0 and b > 0:
                    cost[gi] = np.sum((X @ [a, b] - y) ** 2)
            g = int(np.clip(cost.argmin(), 1, n_tau - 2))
            cm, c0, cp = cost[g - 1 : g + 2]
            with np.errstate(invalid="ignore"):  # inf − inf where a neighbour is infeasible
                curv = cm - 2 * c0 + cp
            off, cmin = 0.0, c0
            if np.isfinite(cm) and np.isfinite(cp) and curv > 0:
                off = float(np.clip(0.5 * (cm - cp) / curv, -1, 1))
                cmin = c0 - 0.25 * (cm - cp) * off
            if cmin < best[0]:
                best = (cmin, logs[g] + off * (logs[1] - logs[0]), y)
        if not np.isfinite(best[0]):
            continue
        step = logs[1] - logs[0]
        s0 = float(np.clip(best[1], logs[0], logs[-1]))

        def cost_at(s, y=best[2]):
            X = np.stack([np.ones(M), -np.exp(-ts / np.exp(s))], 1)
            coef, *_ = np.linalg.lstsq(X, y, rcond=None)
            return np.sum((X @ coef - y) ** 2), coef

        lo, hi = max(s0 - step, logs[0]), min(s0 + step, logs[-1])
        found = minimize_scalar(
            lambda s: cost_at(s)[0], bounds=(lo, hi), method="bounded", options={"xatol": 1e-10}
        )
        (a, b) = cost_at(found.x)[1]
        out[:, v] = a, b, np.exp(found.x)
    return out


def test_recovery_start_equals_a_direct_float64_search():
    # the fast search (one float32 product, integer-packed argmax, float64 refinement) against
    # the same search written out voxel by voxel in float64
    model, data = _phantom("molli", n=300)
    got = torch.stack(
        models.recovery_start(
            torch.tensor(TI), torch.tensor(data, dtype=torch.float32), 5.0, 5000.0
        )
    ).numpy()
    ref = _recovery_start_reference(TI, data, 5.0, 5000.0)
    rel = np.abs(got / ref - 1)
    # the polished start sits at the least-squares optimum of its sign candidate: float32 data
    # and one Newton step leave ~1e-6 (measured: median 1.7e-6, worst voxel 6.4e-5); the
    # parabola alone is ~1e-2 off in τ
    assert not np.isnan(ref).any()
    assert np.median(rel) < 1e-5
    assert rel.max() < 2e-4, rel.max()
