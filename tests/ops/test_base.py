"""The LinearOperator base: composition, sums, scaling, adjoints, autograd wrapper."""

import pytest
import torch

from qmrkit.errors import ShapeError
from qmrkit.ops import LinearOperator, check_adjoint


class Matrix(LinearOperator):
    """A dense matrix as an operator, implemented outside autograd to test the wrapper."""

    autograd_safe = False

    def __init__(self, m):
        super().__init__((m.shape[1],), (m.shape[0],))
        self.m = m

    def _forward(self, x):
        return x.detach() @ self.m.T if x.requires_grad else x @ self.m.T

    def _adjoint(self, y):
        return y.detach() @ self.m.conj() if y.requires_grad else y @ self.m.conj()


def _rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.complex(torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)).to(
        torch.complex128
    )


def test_algebra_matches_dense_matrices():
    a, b = _rand(5, 4, seed=1), _rand(4, 3, seed=2)
    A, B = Matrix(a), Matrix(b)
    x = _rand(2, 3, seed=3)
    torch.testing.assert_close((A @ B)(x), x @ (a @ b).T)
    torch.testing.assert_close((A @ B).H(_rand(2, 5, seed=4)), _rand(2, 5, seed=4) @ (a @ b).conj())
    torch.testing.assert_close((2j * B)(x), 2j * (x @ b.T))
    torch.testing.assert_close((B + B).N(x), 4 * (x @ (b.conj().T @ b).T))
    assert check_adjoint(A @ B, dtype=torch.complex128) < 1e-12
    assert check_adjoint((3 - 1j) * A, dtype=torch.complex128) < 1e-12
    assert (
        check_adjoint(torch.tensor(2 + 1j, dtype=torch.complex128) * A, dtype=torch.complex128)
        < 1e-12
    )
    assert A.H.H is A


def test_autograd_wrapper_uses_adjoint():
    a = _rand(6, 4, seed=5)
    A = Matrix(a)
    x = _rand(4, seed=6).requires_grad_(True)
    loss = A(x).abs().pow(2).sum()
    (g,) = torch.autograd.grad(loss, x)
    # d/dx̄ ‖Ax‖² = 2 AᴴA x (PyTorch's convention for real losses of complex inputs)
    torch.testing.assert_close(g, 2 * (a.conj().T @ (a @ x.detach())))


def test_shape_errors():
    A = Matrix(_rand(5, 4))
    with pytest.raises(ShapeError, match=r"end in shape \(4,\)"):
        A(_rand(3))
    with pytest.raises(ShapeError, match="cannot compose"):
        A @ A
