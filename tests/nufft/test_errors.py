"""Bad input gives clear errors; the sparse method falls back within the memory budget."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from nufft_testutils import crandn

from qmrkit import nufft
from qmrkit.errors import (
    DeviceError,
    DTypeError,
    ParameterError,
    QmrkitError,
    ShapeError,
    UnknownNameError,
)

TRAJ = np.random.default_rng(0).uniform(-0.5, 0.5, (100, 2))


def test_traj_out_of_range_names_range_and_converters():
    with pytest.raises(ParameterError) as info:
        nufft.plan(TRAJ * 2 * np.pi, (16, 16))
    msg = str(info.value)
    assert "[-0.5, 0.5)" in msg and "from_radians" in msg and "from_ismrmrd" in msg
    lo, hi = (TRAJ * 2 * np.pi).min(), (TRAJ * 2 * np.pi).max()
    assert f"{lo:.6g}" in msg and f"{hi:.6g}" in msg


def test_converters_fix_units():
    op = nufft.plan(nufft.from_radians(TRAJ * 2 * np.pi), (16, 16))
    assert op.oshape == (100,)
    ism = TRAJ * 16
    k = nufft.from_ismrmrd(ism, 16)
    assert np.allclose(k.numpy(), TRAJ)
    assert np.allclose(nufft.to_radians(TRAJ).numpy(), TRAJ * 2 * np.pi)
    with pytest.raises(ShapeError):
        nufft.from_ismrmrd(ism, (16, 16, 16))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_traj(bad):
    t = TRAJ.copy()
    t[5, 1] = bad
    with pytest.raises(ParameterError, match="non-finite"):
        nufft.plan(t, (16, 16))


def test_wrong_ndim_and_im_size():
    with pytest.raises(ShapeError, match="ndim"):
        nufft.plan(TRAJ, (16, 16, 16))
    with pytest.raises(ShapeError):
        nufft.plan(TRAJ[:, 0], (16,))  # (M,) is not (M, 1)
    with pytest.raises(ShapeError):
        nufft.plan(np.zeros((10, 4)), (4, 4, 4, 4))
    with pytest.raises(ShapeError):
        nufft.plan(TRAJ, (16, 0))
    with pytest.raises(ShapeError):
        nufft.plan(TRAJ, "abc")


@pytest.mark.parametrize("eps", [0.0, 1e-15, 0.2, 1.0, -1e-3, float("nan")])
def test_eps_out_of_range(eps):
    with pytest.raises(ParameterError, match="eps"):
        nufft.plan(TRAJ, (16, 16), eps=eps)


def test_unknown_names():
    for kw in (
        {"backend": "nfft"},
        {"method": "fast"},
        {"tune": "exhaustive"},
        {"normal": "circulant"},
    ):
        with pytest.raises(UnknownNameError):
            nufft.plan(TRAJ, (16, 16), **kw)
    with pytest.raises(DTypeError):
        nufft.plan(TRAJ, (16, 16), dtype=torch.float32)
    with pytest.raises(DTypeError):
        nufft.plan(TRAJ.astype(np.complex64), (16, 16))


def test_data_dtype_device_shape_mismatch():
    op = nufft.plan(TRAJ, (16, 16), eps=1e-3)
    with pytest.raises(DTypeError, match="complex64"):
        op(crandn((16, 16), torch.complex128))
    with pytest.raises(DTypeError):
        op(torch.randn(16, 16))
    with pytest.raises(DTypeError):
        op.H(crandn((100,), torch.complex128))
    with pytest.raises(ShapeError):
        op(crandn((16, 15)))
    with pytest.raises(ShapeError):
        op.H(crandn((99,)))
    if torch.cuda.is_available():
        with pytest.raises(DeviceError):
            op(crandn((16, 16), device="cuda"))
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError):
            nufft.plan(TRAJ, (16, 16), device="cuda")


def test_finufft_backend_on_cuda_is_refused():
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available on this machine")
    with pytest.raises(DeviceError):
        nufft.plan(TRAJ, (16, 16), backend="finufft", device="cuda")


def test_sparse_over_budget_falls_back_with_logged_reason(caplog):
    with caplog.at_level(logging.WARNING, logger="qmrkit.nufft"):
        op = nufft.plan(TRAJ, (16, 16), method="sparse", backend="torch", memory_budget=1000)
    assert op.info.method == "binned"  # the CPU's fallback without a precomputed matrix
    assert "memory_budget" in op.info.reason
    assert any(
        "falling back" in r.getMessage() and "memory_budget" in r.getMessage()
        for r in caplog.records
    )
    # within budget the sparse method is used
    op = nufft.plan(TRAJ, (16, 16), method="sparse", backend="torch", memory_budget=10**8)
    assert op.info.method == "sparse" and op.info.memory_bytes > 0


def test_unreachable_eps_with_forced_low_oversampling():
    with pytest.raises(ParameterError, match="no NUFFT configuration"):
        nufft.plan(
            TRAJ, (16, 16), eps=1e-12, dtype=torch.complex128, oversampling=1.25, backend="torch"
        )


def test_complex64_high_accuracy_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="qmrkit.nufft"):
        nufft.plan(TRAJ, (16, 16), eps=1e-8, backend="torch")
    assert any("complex128" in r.getMessage() for r in caplog.records)


def test_errors_are_qmrkit_errors():
    with pytest.raises(QmrkitError):
        nufft.plan(TRAJ + 1, (16, 16))


def test_single_precision_finufft_runs_double_below_its_floor():
    pytest.importorskip("finufft")
    from nufft_testutils import ndft_matrix, rel

    op = nufft.plan(TRAJ, (16, 16), eps=1e-6, backend="finufft")
    assert op.info.backend == "finufft" and "double" in op.info.reason
    x = crandn((16, 16), seed=3)
    y = op(x)
    assert y.dtype == torch.complex64
    ref = ndft_matrix(TRAJ, (16, 16)) @ x.numpy().astype(np.complex128).ravel()
    assert rel(y.numpy(), ref) <= 1e-6
