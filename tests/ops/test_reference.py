"""Operators against independent NumPy references, and their bad-input errors."""

import numpy as np
import pytest
import torch

from qmrkit.errors import DTypeError, ParameterError, ShapeError
from qmrkit.ops import FFT, Diagonal, FiniteDifference, Mask, Matrix, Reshape, Sense, Vstack

RNG = np.random.default_rng(0)


def _cnp(*shape):
    return (RNG.standard_normal(shape) + 1j * RNG.standard_normal(shape)).astype(np.complex64)


# -- FFT ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "shape,axes",
    [
        ((16, 12), None),  # even: checkerboard-modulation route, n/2 even
        ((6, 10), None),  # even, n/2 odd: the modulation's sign flips
        ((2, 6, 10), None),
        ((7, 9), None),  # odd: roll route
        ((6, 7), None),  # mixed: roll route
        ((5, 6, 7), (0, 2)),
        ((4, 8, 6), (-2, -1)),
        ((5, 6, 10), (1, 2)),  # even transform axes, odd batch-like axis
    ],
)
def test_fft_matches_numpy_centred_ortho(shape, axes, device):
    x = _cnp(3, *shape)
    np_axes = (
        tuple(range(-len(shape), 0))
        if axes is None
        else tuple(a - len(shape) if a >= 0 else a for a in axes)
    )
    ref = np.fft.fftshift(
        np.fft.fftn(np.fft.ifftshift(x, axes=np_axes), axes=np_axes, norm="ortho"), axes=np_axes
    )
    F = FFT(shape, axes=axes)
    assert F._modulate == all(shape[a] % 2 == 0 for a in np_axes)
    y = F(torch.from_numpy(x).to(device)).cpu().numpy()
    assert np.max(np.abs(y - ref)) / np.max(np.abs(ref)) < 1e-5
    # unitary: the adjoint inverts it and the normal operator is the identity
    xt = torch.from_numpy(x).to(device)
    torch.testing.assert_close(F.H(F(xt)), xt, rtol=1e-5, atol=1e-5)
    assert F.N(xt) is xt or torch.equal(F.N(xt), xt)


def test_fft_centre_convention():
    """A centred image delta (index n//2) has a flat spectrum with zero phase; DC at n//2."""
    for n in (8, 9):
        x = torch.zeros(n, n, dtype=torch.complex64)
        x[n // 2, n // 2] = 1
        k = FFT((n, n))(x)
        torch.testing.assert_close(k, torch.full_like(k, 1 / n))
        k = FFT((n, n))(torch.ones(n, n, dtype=torch.complex64))
        assert torch.argmax(k.abs()).item() == (n // 2) * n + n // 2


@pytest.mark.parametrize("norm", ["backward", "forward"])
def test_fft_uncentred_norms_match_numpy(norm):
    x = _cnp(2, 6, 5)
    ref = np.fft.fftn(x, axes=(-2, -1), norm=norm)
    y = FFT((6, 5), centred=False, norm=norm)(torch.from_numpy(x)).numpy()
    assert np.max(np.abs(y - ref)) / np.max(np.abs(ref)) < 1e-5


def test_fft_errors():
    with pytest.raises(ParameterError, match="norm"):
        FFT((4, 4), norm="unitary")
    with pytest.raises(ShapeError, match="out of range"):
        FFT((4, 4), axes=(2,))
    with pytest.raises(ShapeError, match=r"must end in shape \(4, 4\)"):
        FFT((4, 4))(torch.zeros(4, 5, dtype=torch.complex64))


# -- finite differences ---------------------------------------------------------------------------
def test_finite_difference_periodic_matches_numpy(device):
    x = _cnp(2, 5, 6, 7)
    D = FiniteDifference((5, 6, 7), axes=(0, 2), voxel_size=(2.0, 0.5))
    y = D(torch.from_numpy(x).to(device)).cpu().numpy()
    assert y.shape == (2, 2, 5, 6, 7)
    ref0 = (np.roll(x, -1, axis=-3) - x) / 2.0
    ref1 = (np.roll(x, -1, axis=-1) - x) / 0.5
    np.testing.assert_allclose(y[:, 0], ref0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y[:, 1], ref1, rtol=1e-5, atol=1e-5)


def test_finite_difference_neumann_matches_numpy(device):
    x = RNG.standard_normal((6, 7)).astype(np.float64)
    D = FiniteDifference((6, 7), boundary="neumann")
    y = D(torch.from_numpy(x).to(device)).cpu().numpy()
    np.testing.assert_allclose(y[0], np.diff(x, axis=0, append=x[-1:, :]), atol=1e-12)
    np.testing.assert_allclose(y[1], np.diff(x, axis=1, append=x[:, -1:]), atol=1e-12)
    # the adjoint is the negative divergence: explicit matrix check in 1-D
    n = 6
    Dm = np.diff(np.eye(n), axis=0, append=np.eye(n)[-1:])  # rows e_{i+1}-e_i, last row 0
    D1 = FiniteDifference((n,), boundary="neumann")
    yv = RNG.standard_normal((1, n))
    np.testing.assert_allclose(D1.H(torch.from_numpy(yv)).numpy(), Dm.T @ yv[0], atol=1e-12)


def test_finite_difference_of_constant_and_ramp():
    c = torch.full((5, 5), 3.0, dtype=torch.float64)
    for b in ("periodic", "neumann"):
        assert FiniteDifference((5, 5), boundary=b)(c).abs().max() == 0
    ramp = torch.arange(6.0, dtype=torch.float64).repeat(4, 1)  # increases along x by 1
    g = FiniteDifference((4, 6), boundary="neumann", voxel_size=0.5)(ramp)
    assert torch.all(g[0] == 0)
    assert torch.all(g[1, :, :-1] == 2.0) and torch.all(g[1, :, -1] == 0)


def test_finite_difference_errors():
    with pytest.raises(ParameterError, match="boundary"):
        FiniteDifference((4, 4), boundary="reflect")
    with pytest.raises(ShapeError, match="voxel_size has 1 entries but 2 axes"):
        FiniteDifference((4, 4), voxel_size=(1.0,))
    with pytest.raises(ParameterError, match="positive"):
        FiniteDifference((4, 4), voxel_size=0.0)
    with pytest.raises(ParameterError, match="repeated"):
        FiniteDifference((4, 4), axes=(1, -1))


# -- SENSE ----------------------------------------------------------------------------------------
def test_sense_forward_and_adjoint_against_explicit_sums(device):
    maps = _cnp(4, 6, 5)
    x = _cnp(3, 6, 5)  # 3 frames
    y = _cnp(3, 4, 6, 5)
    S = Sense(torch.from_numpy(maps))
    fx = S(torch.from_numpy(x).to(device)).cpu().numpy()
    ahy = S.H(torch.from_numpy(y).to(device)).cpu().numpy()
    ref_f = np.stack([[maps[c] * x[t] for c in range(4)] for t in range(3)])
    ref_a = np.stack([sum(np.conj(maps[c]) * y[t, c] for c in range(4)) for t in range(3)])
    np.testing.assert_allclose(fx, ref_f, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ahy, ref_a, rtol=1e-5, atol=1e-5)
    ref_n = np.sum(np.abs(maps) ** 2, axis=0) * x
    np.testing.assert_allclose(
        S.N(torch.from_numpy(x).to(device)).cpu().numpy(), ref_n, rtol=1e-5, atol=1e-5
    )


def test_sense_with_map_sets_against_explicit_sums():
    maps = _cnp(4, 2, 6, 5)  # (coils, sets, ny, nx): axes given explicitly
    x = _cnp(3, 2, 6, 5)  # 3 frames, one image per set
    y = _cnp(3, 4, 6, 5)
    S = Sense(maps, coil_axis=0, set_axis=1)
    assert S.ishape == (2, 6, 5) and S.oshape == (4, 6, 5) and S.n_sets == 2
    fx = S(torch.from_numpy(x)).numpy()
    ahy = S.H(torch.from_numpy(y)).numpy()
    ref_f = np.einsum("csyx,tsyx->tcyx", maps, x)
    ref_a = np.einsum("csyx,tcyx->tsyx", np.conj(maps), y)
    np.testing.assert_allclose(fx, ref_f, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ahy, ref_a, rtol=1e-5, atol=1e-5)
    with pytest.raises(ShapeError, match="same axis"):
        Sense(maps, coil_axis=1, set_axis=-3)
    with pytest.raises(ShapeError, match="set_axis=7"):
        Sense(maps, set_axis=7)


def test_sense_coil_axis_and_errors():
    maps = _cnp(6, 5, 4)
    a = Sense(maps, coil_axis=-1)
    b = Sense(np.moveaxis(maps, -1, 0))
    assert a.ishape == (6, 5) and a.oshape == (4, 6, 5)
    x = torch.from_numpy(_cnp(6, 5))
    torch.testing.assert_close(a(x), b(x))
    with pytest.raises(ShapeError, match=r"spatial shape \(6, 5\).*image shape is \(5, 6\)"):
        Sense(np.moveaxis(maps, -1, 0), ishape=(5, 6))
    with pytest.raises(ShapeError, match="coil axis"):
        Sense(np.ones(4, np.complex64))
    with pytest.raises(ShapeError, match=r"must end in shape \(6, 5\), got \(5, 6\)"):
        b(torch.zeros(5, 6, dtype=torch.complex64))


def test_cartesian_sense_normal_against_dense_matrix():
    """Mask·FFT·Sense as an explicit matrix: forward and normal operator agree with NumPy."""
    ny, nx, nc = 6, 4, 3
    maps = _cnp(nc, ny, nx)
    mask = RNG.random((ny, 1)) < 0.6
    mask[ny // 2] = True
    A = Mask(mask, shape=(nc, ny, nx)) @ FFT((nc, ny, nx), axes=(-2, -1)) @ Sense(maps)
    eye = torch.eye(ny * nx, dtype=torch.complex128).reshape(ny * nx, ny, nx)
    Am = A(eye).reshape(ny * nx, -1).T.numpy()  # columns = A e_j
    x = _cnp(ny, nx).astype(np.complex128)
    np.testing.assert_allclose(
        A(torch.from_numpy(x)).numpy().ravel(), Am @ x.ravel(), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        A.N(torch.from_numpy(x)).numpy().ravel(), Am.conj().T @ Am @ x.ravel(), rtol=1e-5, atol=1e-5
    )


# -- Mask, Diagonal, Matrix, Reshape, Vstack -------------------------------------------------------
def test_mask_properties_and_errors():
    m = np.zeros((8, 1), bool)
    m[::2] = True
    M = Mask(m, shape=(8, 6))
    assert M.n_sampled == 24 and M.acceleration == 2.0
    x = torch.from_numpy(_cnp(8, 6))
    torch.testing.assert_close(M(M(x)), M(x))
    assert M.H is M
    with pytest.raises(ParameterError, match="samples nothing"):
        Mask(np.zeros((4, 4)))
    with pytest.raises(ParameterError, match="0 or 1"):
        Mask(np.full((4, 4), 0.5))
    with pytest.raises(DTypeError, match="complex"):
        Mask(np.ones((4, 4), np.complex64))
    with pytest.raises(ShapeError, match="does not broadcast"):
        Mask(np.ones((3, 1)), shape=(4, 4))


def test_diagonal_matrix_reshape_vstack():
    w = _cnp(5, 4)
    x = torch.from_numpy(_cnp(2, 5, 4))
    D = Diagonal(w)
    torch.testing.assert_close(D.H(x), x * torch.from_numpy(w).conj())
    with pytest.raises(ShapeError, match="do not broadcast"):
        Diagonal(np.ones(3), shape=(5, 4))
    a = _cnp(6, 3)
    v = _cnp(2, 3)
    np.testing.assert_allclose(Matrix(a)(torch.from_numpy(v)).numpy(), v @ a.T, rtol=1e-5)
    with pytest.raises(ShapeError, match="2-D"):
        Matrix(np.ones(3))
    with pytest.raises(ShapeError, match="cannot reshape"):
        Reshape((4, 5), (3, 7))
    F, G = FiniteDifference((5, 4)), Diagonal(w)
    K = Vstack([F, G])
    y = K(x)
    assert y.shape == (2, 2 * 20 + 20)
    f, g = K.split(y)
    torch.testing.assert_close(f, F(x))
    torch.testing.assert_close(g, G(x))
    with pytest.raises(ShapeError, match="same input shape"):
        Vstack([F, Diagonal(np.ones((4, 5)))])


def test_coil_count_mismatch_is_caught_when_composing():
    maps = _cnp(3, 8, 6)
    with pytest.raises(ShapeError, match=r"FFT takes \(4, 8, 6\) but Sense gives \(3, 8, 6\)"):
        FFT((4, 8, 6), axes=(-2, -1)) @ Sense(maps)
    A = FFT((3, 8, 6), axes=(-2, -1)) @ Sense(maps)
    with pytest.raises(ShapeError, match=r"must end in shape \(3, 8, 6\), got \(4, 8, 6\)"):
        A.H(torch.zeros(4, 8, 6, dtype=torch.complex64))
