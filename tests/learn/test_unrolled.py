"""Gradients of every memory mode equal standard backprop; bad input gives clear errors."""

import warnings

import pytest
import torch

from qmrkit.errors import ParameterError, ShapeError
from qmrkit.learn import InversionWarning, ResidualCNN, UnrolledNet

from .conftest import make_problem

MODES = ["standard", "checkpoint", "reversible", "hybrid"]


def _grads(
    mode,
    A,
    x,
    y,
    *,
    ndim=2,
    dtype=torch.float64,
    n_unrolls=4,
    dc="cg",
    shared=True,
    sn=True,
    scale_weights=None,
    lam=0.5,
    cg_tol=1e-12,
    seed=1,
    conv="full",
    make_denoiser=None,
    **kw,
):
    torch.manual_seed(seed)
    if make_denoiser is None:
        den = ResidualCNN(ndim, channels=4, layers=3, spectral_norm=sn, conv=conv)
    else:  # another denoiser (e.g. CouplingCNN), built after the same seed
        den = make_denoiser()
    if scale_weights is not None:
        with torch.no_grad():
            for p in den.parameters():
                p.mul_(scale_weights)
    net = UnrolledNet(
        n_unrolls,
        den,
        data_consistency=dc,
        shared_weights=shared,
        memory=mode,
        lam=lam,
        step=0.5,
        cg_tol=cg_tol,
        cg_max_iter=300,
        **kw,
    )
    net = net.to(dtype=dtype, device=x.device).eval()  # eval: spectral-norm estimates fixed
    xin = A.H(y)
    yy = y.clone().requires_grad_(True)
    out = net(yy, A)
    loss = (out - x).abs().pow(2).sum()
    loss.backward()
    g = torch.cat([p.grad.flatten() for p in net.parameters()])
    assert torch.isfinite(g).all()
    del xin
    return out.detach(), g, yy.grad, net


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("dc", ["cg", "gradient"])
def test_modes_equal_standard_2d_float64(device, dc):
    A, x, y = make_problem(device=device)
    ref_out, ref_g, ref_gy, _ = _grads("standard", A, x, y, dc=dc)
    for mode in MODES[1:]:
        out, g, gy, net = _grads(mode, A, x, y, dc=dc, checkpoint_every=2)
        assert _rel(out, ref_out) <= 1e-10, mode
        assert _rel(g, ref_g) <= 1e-8, (mode, _rel(g, ref_g))
        assert _rel(gy, ref_gy) <= 1e-8, mode  # gradient w.r.t. the k-space data too
        if mode in ("reversible", "hybrid"):
            assert net.last_backward["fallbacks"] == 0, net.last_backward
            assert net.last_backward["inversions"] > 0


def test_lambda_gradient_matches_finite_difference():
    A, x, y = make_problem(batch=1)
    torch.manual_seed(0)
    den = ResidualCNN(2, channels=4, layers=2)
    net = UnrolledNet(3, den, lam=0.3, cg_tol=1e-13, cg_max_iter=300).double().eval()
    loss = (net(y, A) - x).abs().pow(2).sum()
    loss.backward()
    rho = net.dcs[0].rho
    ga = float(rho.grad)
    h = 1e-6
    with torch.no_grad():
        rho += h
        lp = float((net(y, A) - x).abs().pow(2).sum())
        rho -= 2 * h
        lm = float((net(y, A) - x).abs().pow(2).sum())
    assert abs(ga - (lp - lm) / (2 * h)) <= 1e-6 * max(1.0, abs(ga))


def test_modes_equal_standard_3d_float64():
    A, x, y = make_problem(shape=(4, 8, 8), n_coils=2, batch=1)
    ref_out, ref_g, _, _ = _grads("standard", A, x, y, ndim=3, n_unrolls=4)
    for mode in MODES[1:]:
        out, g, _, net = _grads(mode, A, x, y, ndim=3, n_unrolls=4)
        assert _rel(g, ref_g) <= 1e-8, (mode, _rel(g, ref_g))


def test_modes_equal_standard_2d_time_separable():
    A, x, y = make_problem(shape=(3, 8, 8), n_coils=2, batch=1, seed=3)
    ref_out, ref_g, _, _ = _grads("standard", A, x, y, ndim=3, n_unrolls=3, conv="separable")
    for mode in MODES[1:]:
        _, g, _, _ = _grads(mode, A, x, y, ndim=3, n_unrolls=3, conv="separable")
        assert _rel(g, ref_g) <= 1e-8, mode


def test_unshared_weights_equal_standard():
    A, x, y = make_problem()
    _, ref_g, _, _ = _grads("standard", A, x, y, shared=False, n_unrolls=4)
    for mode in MODES[1:]:
        _, g, _, _ = _grads(mode, A, x, y, shared=False, n_unrolls=4, checkpoint_every=2)
        assert _rel(g, ref_g) <= 1e-8, mode


def test_modes_equal_standard_float32(device):
    A, x, y = make_problem(dtype=torch.complex64, device=device)
    _, ref_g, _, _ = _grads("standard", A, x, y, dtype=torch.float32, cg_tol=1e-7, n_unrolls=4)
    for mode in MODES[1:]:
        _, g, _, net = _grads(
            mode, A, x, y, dtype=torch.float32, cg_tol=1e-7, n_unrolls=4, checkpoint_every=2
        )
        assert _rel(g, ref_g) <= 1e-4, (mode, _rel(g, ref_g))


def test_hybrid_drift_check_triggers_and_recovers():
    A, x, y = make_problem()
    kw = dict(sn=False, scale_weights=4.0, n_unrolls=6)
    _, ref_g, _, _ = _grads("standard", A, x, y, **kw)
    with pytest.warns(InversionWarning) as rec:
        _, g, _, net = _grads("hybrid", A, x, y, checkpoint_every=3, **kw)
    msgs = " ".join(str(r.message) for r in rec)
    assert "not built to be invertible" in msgs  # at construction
    assert "did not invert accurately" in msgs  # the drift check at run time
    assert net.last_backward["fallbacks"] >= 1
    assert net.last_backward["recomputed_unrolls"] >= 1
    assert _rel(g, ref_g) <= 1e-8


def test_reversible_with_non_invertible_denoiser_warns_and_falls_back():
    A, x, y = make_problem()
    kw = dict(sn=False, scale_weights=4.0, n_unrolls=5)
    _, ref_g, _, _ = _grads("standard", A, x, y, **kw)
    with pytest.warns(InversionWarning) as rec:
        _, g, _, net = _grads("reversible", A, x, y, **kw)
    msgs = " ".join(str(r.message) for r in rec)
    assert "not built to be invertible" in msgs  # at construction
    assert "could not be inverted" in msgs  # at run time
    assert net.last_backward["fallbacks"] >= 1
    assert _rel(g, ref_g) <= 1e-8


def test_reversible_raise_option():
    A, x, y = make_problem()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InversionWarning)
        with pytest.raises(ParameterError, match="could not be inverted"):
            _grads(
                "reversible",
                A,
                x,
                y,
                sn=False,
                scale_weights=4.0,
                n_unrolls=3,
                on_inversion_failure="raise",
            )


def test_reversible_refuses_non_residual_denoiser():
    den = torch.nn.Identity()
    with pytest.raises(ParameterError, match="invertible residual denoiser"):
        UnrolledNet(3, den, memory="reversible")


def test_dimension_mismatch_is_a_shape_error():
    A, x, y = make_problem(shape=(4, 8, 8), batch=1)
    net = UnrolledNet(2, ResidualCNN(2, channels=4, layers=2)).double()
    with pytest.raises(ShapeError, match="2-D images but the operator's image shape"):
        net(y, A)
    A2, x2, y2 = make_problem()
    with pytest.raises(ShapeError, match="k-space y must have shape"):
        net(y2[..., :8], A2)
    with pytest.raises(ShapeError, match="x0 must have shape"):
        net(y2, A2, x0=x2[0])


def test_bad_parameters():
    den = ResidualCNN(2)
    with pytest.raises(ParameterError, match="memory must be one of"):
        UnrolledNet(3, den, memory="magic")
    with pytest.raises(ParameterError, match="n_unrolls"):
        UnrolledNet(0, den)
    with pytest.raises(ParameterError, match="data_consistency"):
        UnrolledNet(2, den, data_consistency="admm")
    with pytest.raises(ParameterError, match="ndim"):
        ResidualCNN(4)


def test_no_grad_forward_and_lambda_positive():
    A, x, y = make_problem()
    net = UnrolledNet(
        3, ResidualCNN(2, channels=4, layers=2, spectral_norm=True), memory="reversible", lam=1e-3
    ).double()
    assert float(net.lam.detach().min()) > 0
    with torch.no_grad():
        out = net(y, A)
    assert out.shape == x.shape and not out.requires_grad


def test_spectral_norm_denoiser_is_contractive_and_inverts():
    torch.manual_seed(0)
    den = ResidualCNN(2, channels=8, layers=3, spectral_norm=True).double().eval()
    assert den.invertible
    # product of the measured per-convolution operator norms: finite, but only a loose bound (the
    # spectral norm of torch normalises the reshaped kernel, not the convolution operator)
    assert 0 < den.lipschitz_estimate((16, 16)) < 10
    x = torch.randn(2, 16, 16, dtype=torch.complex128)
    with torch.no_grad():
        z = den(x)
    xr, ok, res = den.inverse(z, tol=1e-13)
    assert ok and float((xr - x).abs().max()) < 1e-11
