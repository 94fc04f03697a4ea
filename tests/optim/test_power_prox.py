"""Power iteration and proximal operators."""

import numpy as np
import pytest
import torch

from qmrkit.errors import DTypeError, ParameterError
from qmrkit.ops import FFT, FiniteDifference, Matrix, Vstack
from qmrkit.optim import power_iteration
from qmrkit.optim import prox as P

from ._problems import crandn


def test_power_iteration_matches_spectral_norm(device):
    A = crandn((30, 12), 0)
    est = power_iteration(Matrix(A), n_iter=300, tol=1e-12, dtype=torch.complex128, device=device)
    ref = np.linalg.norm(A.numpy(), 2) ** 2
    assert abs(est - ref) / ref < 1e-4
    assert est <= ref * (1 + 1e-10)  # Rayleigh quotients approach from below


def test_power_iteration_known_norms(device):
    assert abs(power_iteration(FFT((8, 8)), device=device) - 1.0) < 1e-5
    # periodic 2-D gradient on an even grid: ‖D‖² = 4 + 4 = 8 (checkerboard eigenvector)
    est = power_iteration(
        FiniteDifference((16, 16)), n_iter=500, tol=1e-10, dtype=torch.complex128, device=device
    )
    assert abs(est - 8.0) < 1e-3


def test_power_iteration_seed_callable_and_errors():
    A = Matrix(crandn((10, 5), 1))
    assert power_iteration(A, n_iter=5, seed=3) == power_iteration(A, n_iter=5, seed=3)
    M = A.normal
    assert abs(power_iteration(M, (5,), n_iter=50) - power_iteration(A, n_iter=50)) < 1e-4
    assert power_iteration(lambda x: 0 * x, (4,)) == 0.0
    with pytest.raises(ParameterError, match="ishape is required"):
        power_iteration(M)
    with pytest.raises(ParameterError, match="max_iter"):
        power_iteration(A, n_iter=0)


def _is_prox(prox, g, v, t, n_trials=200, scale=1e-2, seed=0):
    """Check that prox(v, t) minimises t·g(x) + ½‖x − v‖² against random perturbations."""
    x = prox(v, t)
    f0 = t * g(x) + 0.5 * float(torch.linalg.vector_norm(x - v) ** 2)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n_trials):
        d = torch.randn(v.shape, generator=gen, dtype=torch.float64)
        if v.is_complex():
            d = torch.complex(d, torch.randn(v.shape, generator=gen, dtype=torch.float64))
        xp = x + scale * d
        f = t * g(xp) + 0.5 * float(torch.linalg.vector_norm(xp - v) ** 2)
        if f < f0 - 1e-12:
            return False
    return True


@pytest.mark.parametrize(
    "make",
    [
        lambda: P.L1(0.7),
        lambda: P.GroupL1(0.7, axis=0),
        lambda: P.L2Squared(crandn((3, 5), 9), lam=2.0),
        lambda: P.Zero(),
    ],
    ids=["l1", "group-l1", "l2sq", "zero"],
)
def test_prox_minimises_its_objective(make):
    p = make()
    v = crandn((3, 5), 1)
    assert _is_prox(p, p.value, v, 0.8)


def test_soft_threshold_complex_keeps_phase_and_shrinks_magnitude():
    v = torch.tensor([3 + 4j, 0.3 + 0.4j, 0j, -2.0 + 0j], dtype=torch.complex128)
    out = P.soft_threshold(v, 1.0)
    expected = torch.tensor([(3 + 4j) * 4 / 5, 0, 0, -1.0], dtype=torch.complex128)
    torch.testing.assert_close(out, expected)
    r = torch.tensor([-3.0, 0.5, 2.0])
    torch.testing.assert_close(P.soft_threshold(r, 1.0), torch.tensor([-2.0, 0.0, 1.0]))


def test_group_soft_threshold_is_isotropic():
    g = torch.tensor([[3.0, 0.1], [4.0, 0.1]], dtype=torch.float64)  # groups along axis 0
    out = P.group_soft_threshold(g, 1.0, axis=0)
    torch.testing.assert_close(out[:, 0], torch.tensor([2.4, 3.2], dtype=torch.float64))
    assert torch.all(out[:, 1] == 0)


@pytest.mark.parametrize(
    "make",
    [
        lambda: P.L1(0.7),
        lambda: P.GroupL1(0.7, axis=0),
        lambda: P.L2Squared(crandn((3, 5), 9), lam=2.0),
    ],
    ids=["l1", "group-l1", "l2sq"],
)
@pytest.mark.parametrize("sigma", [0.1, 1.0, 7.0])
def test_closed_form_conjugates_match_moreau_identity(make, sigma):
    p = make()
    closed = P.conjugate(p)
    assert not isinstance(closed, P._Moreau)
    generic = P._Moreau(p)
    v = crandn((3, 5), 2) * 3
    torch.testing.assert_close(closed(v, sigma), generic(v, sigma), rtol=1e-10, atol=1e-10)


def test_projections():
    v = crandn((4, 6), 3) * 5
    ball = P.L2Ball(2.0)(v)
    assert abs(float(torch.linalg.vector_norm(ball)) - 2.0) < 1e-12
    torch.testing.assert_close(ball / ball.abs().max(), v / v.abs().max())  # same direction
    inside = 0.01 * v
    torch.testing.assert_close(P.L2Ball(2.0)(inside), inside)
    per_row = P.L2Ball(1.0, dim=-1)(v)
    torch.testing.assert_close(
        torch.linalg.vector_norm(per_row, dim=-1), torch.ones(4, dtype=torch.float64)
    )
    c = torch.ones(4, 6, dtype=torch.complex128)
    assert float(torch.linalg.vector_norm(P.L2Ball(1.0, center=c)(v) - c)) == pytest.approx(1.0)
    r = v.real
    torch.testing.assert_close(P.Box(0.0, 1.0)(r), r.clamp(0, 1))
    with pytest.raises(DTypeError, match="real"):
        P.Box(0.0)(v)
    with pytest.raises(ParameterError, match="lower"):
        P.Box(1.0, 0.0)
    with pytest.raises(ParameterError, match="at least one"):
        P.Box()
    lin = P.LinfBall(1.0)(v)
    assert float(lin.abs().max()) <= 1 + 1e-12
    torch.testing.assert_close(torch.angle(lin), torch.angle(v))


def test_stack_applies_one_prox_per_block():
    D = FiniteDifference((5, 4))
    A = Matrix(crandn((3, 20), 0))
    from qmrkit.ops import Reshape

    K = Vstack([D, A @ Reshape((5, 4), (20,))])
    y = crandn((3,), 1)
    s = P.Stack(K, [P.conjugate(P.GroupL1(0.5, axis=-3)), P.conjugate(P.L2Squared(y))])
    v = K(crandn((2, 5, 4), 2))
    out = s(v, 0.3)
    a, b = K.split(out)
    va, vb = K.split(v)
    torch.testing.assert_close(a, P.GroupLinfBall(0.5, axis=-3)(va))
    torch.testing.assert_close(b, (vb - 0.3 * y) / (1 + 0.3))
    with pytest.raises(ParameterError, match="2 blocks but 1"):
        P.Stack(K, [P.Zero()])


def test_prox_parameter_errors():
    with pytest.raises(ParameterError, match="lam"):
        P.L1(-1.0)
    with pytest.raises(ParameterError, match="radius"):
        P.L2Ball(-1.0)
    with pytest.raises(ParameterError, match="step"):
        P._Moreau(P.L1(1.0))(torch.ones(3), 0.0)


def test_fast_inner_products_match_the_definitions():
    from qmrkit.optim._common import abs2, norm, rdot

    a, b = crandn((3, 4, 5), 1), crandn((3, 4, 5), 2)
    torch.testing.assert_close(abs2(a), a.abs() ** 2)
    assert norm(a) == pytest.approx(float(torch.linalg.vector_norm(a)), rel=1e-12)
    full = rdot(a, b)
    assert full.shape == (1, 1, 1)
    assert float(full) == pytest.approx(float(torch.vdot(a.reshape(-1), b.reshape(-1)).real))
    per = rdot(a, b, 1)
    assert per.shape == (3, 1, 1)
    torch.testing.assert_close(per.reshape(3), (a.conj() * b).real.sum((1, 2)))
    r = torch.randn(3, 4, 5, dtype=torch.float64)
    torch.testing.assert_close(rdot(a, r, 1).reshape(3), (a.conj() * r).real.sum((1, 2)))
    torch.testing.assert_close(rdot(a.conj(), b), rdot(a.conj().resolve_conj(), b))
