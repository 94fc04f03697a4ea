"""Pieces that make memory-efficient backward passes cheaper: the warm-started CG re-run, the
Anderson-accelerated fixed-point inversion, and where the learn errors live."""

import warnings

import torch

from qmrkit import errors, learn
from qmrkit.learn.dc import CGDataConsistency
from qmrkit.learn.denoisers import fixed_point_inverse

from .conftest import make_problem


class _Counting:
    """Wraps a normal operator and counts its calls."""

    def __init__(self, A):
        self.A, self.calls = A, 0

    def N(self, x):
        self.calls += 1
        return self.A.N(x)


def test_cg_warm_start_from_the_solution_costs_one_normal_call():
    A, x, y = make_problem()
    rhs = A.H(y)
    torch.manual_seed(0)
    z = torch.randn_like(rhs)
    dc = CGDataConsistency(lam=0.3, cg_tol=1e-12, cg_max_iter=300).double()
    cold = _Counting(A)
    with torch.no_grad():
        x_cold = dc(z, rhs, cold, 1)
    assert cold.calls > 5  # a real solve
    warm = _Counting(A)
    with torch.no_grad():
        x_warm = dc(z, rhs, warm, 1, x_init=x_cold)
    assert warm.calls == 1  # only the initial residual
    assert float((x_warm - x_cold).norm() / x_cold.norm()) <= 1e-12
    # a poor starting point still gives the solution
    far = _Counting(A)
    with torch.no_grad():
        x_far = dc(z, rhs, far, 1, x_init=torch.zeros_like(z))
    assert float((x_far - x_cold).norm() / x_cold.norm()) <= 1e-10


def _affine(lo, hi, n=40, seed=0):
    """``f(v) = B v`` with symmetric ``B`` of eigenvalues spread over ``[lo, hi]``."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    B = Q @ torch.diag(torch.linspace(lo, hi, n, dtype=torch.float64)) @ Q.T
    z = torch.randn(n, generator=g, dtype=torch.float64)
    exact = torch.linalg.solve(torch.eye(n, dtype=torch.float64) + B, z)
    calls = [0]

    def f(v):
        calls[0] += 1
        return B @ v

    return f, z, exact, calls


def test_anderson_solves_contractive_inverse_with_fewer_evaluations():
    f, z, exact, calls = _affine(-0.9, 0.9)
    x, ok, res = fixed_point_inverse(f, z, tol=1e-12, max_iter=1000, anderson=0)
    plain = calls[0]
    assert ok and res <= 1e-12
    assert float((x - exact).norm() / exact.norm()) <= 1e-10
    calls[0] = 0
    xa, ok_a, res_a = fixed_point_inverse(f, z, tol=1e-12, max_iter=1000, anderson=5)
    assert ok_a and res_a <= 1e-12
    assert float((xa - exact).norm() / exact.norm()) <= 1e-10
    assert calls[0] * 2 < plain, (calls[0], plain)  # 106 vs 252 when written


def test_anderson_converges_where_plain_iteration_fails_complex():
    # eigenvalue 1.5: not a contraction, so the plain iteration must report failure; Anderson (a
    # quasi-Newton method) still solves the linear system -- why it is opt-in in UnrolledNet
    f, z, exact, _ = _affine(-0.5, 1.5, seed=1)
    _, ok, _ = fixed_point_inverse(f, z, tol=1e-10, max_iter=300, anderson=0)
    assert not ok
    xa, ok_a, _ = fixed_point_inverse(f, z, tol=1e-10, max_iter=300, anderson=8)
    assert ok_a
    assert float((xa - exact).norm() / exact.norm()) <= 1e-8
    # complex tensors go through the real view
    zc = torch.complex(z, torch.flip(z, (0,)))
    xc, okc, _ = fixed_point_inverse(lambda v: 0.5 * v.conj(), zc, tol=1e-12, anderson=3)
    assert okc
    assert float((xc + 0.5 * xc.conj() - zc).abs().max()) <= 1e-11


def test_reversible_with_anderson_equals_standard():
    from .test_unrolled import _grads, _rel

    A, x, y = make_problem()
    _, ref_g, ref_gy, _ = _grads("standard", A, x, y, n_unrolls=4)
    for mode in ("reversible", "hybrid"):
        _, g, gy, net = _grads(mode, A, x, y, n_unrolls=4, inversion_anderson=3, checkpoint_every=2)
        assert net.last_backward["fallbacks"] == 0, net.last_backward
        assert _rel(g, ref_g) <= 1e-8, (mode, _rel(g, ref_g))
        assert _rel(gy, ref_gy) <= 1e-8, mode


def test_learn_errors_derive_from_qmrkit_errors():
    assert learn.NonFiniteLossError is errors.NonFiniteLossError
    assert issubclass(learn.NonFiniteLossError, errors.QmrkitError)
    assert issubclass(learn.NonFiniteLossError, FloatingPointError)
    assert learn.InversionWarning is errors.InversionWarning
    assert issubclass(learn.InversionWarning, errors.ConvergenceWarning)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        warnings.warn("x", learn.InversionWarning, stacklevel=1)
    assert issubclass(rec[0].category, errors.QmrkitWarning)


class _OwnInverse(torch.nn.Module):
    """A ResidualCNN behind a custom ``inverse``: the backward cannot share evaluations."""

    def __init__(self, den):
        super().__init__()
        self.den, self.ndim, self.invertible = den, den.ndim, True

    def forward(self, x):
        return self.den(x)

    def inverse(self, z, tol=1e-10, max_iter=200, **kw):
        return self.den.inverse(z, tol=tol, max_iter=max_iter)


def test_fused_inversion_rerun_saves_denoiser_evaluations_and_stays_exact():
    from qmrkit.learn import ResidualCNN, UnrolledNet

    from .test_unrolled import _rel

    A, x, y = make_problem()
    n = 6
    results = {}
    for mode in ("standard", "reversible", "hybrid"):
        for wrap in (False, True):
            if mode == "standard" and wrap:
                continue
            torch.manual_seed(1)
            den = ResidualCNN(2, channels=4, layers=3, spectral_norm=True)
            calls = [0]
            den.body.register_forward_hook(lambda *a, c=calls: c.__setitem__(0, c[0] + 1))
            net = UnrolledNet(
                n,
                _OwnInverse(den) if wrap else den,
                memory=mode,
                lam=0.5,
                cg_tol=1e-12,
                cg_max_iter=300,
                checkpoint_every=3,
            )
            net = net.double().eval()
            out = net(y, A)
            (out - x).abs().pow(2).sum().backward()
            g = torch.cat([p.grad.flatten() for p in net.parameters()])
            if mode != "standard":
                assert net.last_backward["fallbacks"] == 0, net.last_backward
            results[mode, wrap] = (g, calls[0])
    ref = results["standard", False][0]
    for key, (g, _) in results.items():
        assert _rel(g, ref) <= 1e-8, (key, _rel(g, ref))
    # fused: the last inversion evaluation is the re-run's graph (and the next state's f gives
    # the starting point), so at least one evaluation per inverted unroll is saved
    for mode, inverted in (("reversible", n - 1), ("hybrid", n - 2)):
        fused, plain = results[mode, False][1], results[mode, True][1]
        assert fused <= plain - inverted, (mode, fused, plain)


def test_checkpoint_rerun_costs_one_normal_call_per_unroll():
    """Checkpointed unrolls re-run CG from their remembered outputs: the whole backward needs
    exactly one extra normal-operator call per unroll over standard backprop, and the same
    gradients."""
    from .test_unrolled import _grads, _rel

    counts, grads = {}, {}
    for mode in ("standard", "checkpoint"):
        A, x, y = make_problem()
        calls = [0]
        normal = A.N

        def counting(v, normal=normal, calls=calls):
            calls[0] += 1
            return normal(v)

        A.N = counting  # instance attribute: the data-consistency blocks call A.N
        _, g, gy, _ = _grads(mode, A, x, y, n_unrolls=4)
        counts[mode], grads[mode] = calls[0], (g, gy)
    assert counts["checkpoint"] == counts["standard"] + 4, counts
    assert _rel(grads["checkpoint"][0], grads["standard"][0]) <= 1e-8
    assert _rel(grads["checkpoint"][1], grads["standard"][1]) <= 1e-8
