"""Torch-native engine internals: chunked gather/scatter, the sparse build and the binned
method, against the NDFT;
the default memory budget derived from the available memory."""

from __future__ import annotations

import importlib
import logging

import numpy as np
import pytest
import torch
from nufft_testutils import crandn, ndft_matrix, rel

from qmrkit import nufft
from qmrkit._optional import available
from qmrkit.nufft import planner
from qmrkit.nufft.native import NativeEngine, sparse_bytes

plan_mod = importlib.import_module("qmrkit.nufft.plan")  # the module (nufft.plan is the function)
IM = (10, 11, 12)
TRAJ = np.random.default_rng(3).uniform(-0.5, 0.5, (700, 3))


def _engine(method, eps, dtype, chunk_bytes, acc_double=False):
    kernel, _, grid = planner.choose_for_sigma(eps, 1.5, IM)
    return NativeEngine(
        torch.as_tensor(TRAJ),
        IM,
        grid,
        kernel,
        dtype,
        method,
        chunk_bytes=chunk_bytes,
        accumulate_double=acc_double,
    )


@pytest.mark.parametrize(
    "method,dtype,eps,acc_double",
    [
        ("gather", torch.complex64, 1e-4, False),
        ("gather", torch.complex64, 1e-6, True),
        ("gather", torch.complex128, 1e-9, False),
        ("sparse", torch.complex64, 1e-4, False),
        ("sparse", torch.complex64, 1e-6, True),
        ("sparse", torch.complex128, 1e-9, False),
        ("binned", torch.complex64, 1e-4, False),
        ("binned", torch.complex64, 1e-6, True),
        ("binned", torch.complex128, 1e-9, False),
    ],
)
def test_chunked_engine_against_ndft(method, dtype, eps, acc_double):
    """Many chunks (the last one partial), 3 coils: forward and adjoint ≤ ε of the exact NDFT."""
    eng = _engine(method, eps, dtype, chunk_bytes=200_000, acc_double=acc_double)
    if method == "gather":  # really several chunks of samples
        assert eng._chunk(6) < len(TRAJ) and len(TRAJ) % eng._chunk(6) != 0
    e = ndft_matrix(TRAJ, IM)
    x = crandn((3, *IM), dtype, seed=1)
    y = crandn((3, len(TRAJ)), dtype, seed=2)
    yref = x.numpy().reshape(3, -1).astype(np.complex128) @ e.T
    xref = y.numpy().astype(np.complex128) @ e.conj()
    assert rel(eng.forward(x).numpy(), yref) <= eps
    assert rel(eng.adjoint(y).numpy().reshape(3, -1), xref) <= eps


def test_sparse_transpose_is_the_exact_transpose():
    """The CSR of the transpose holds the same entries as the CSR (adjointness to rounding)."""
    eng = _engine("sparse", 1e-9, torch.complex128, chunk_bytes=10**6)
    a = eng.csr.to_dense()
    at = eng.csr_t.to_dense()
    assert torch.equal(a.t(), at)
    # memory held: the planner's model plus the two row-pointer arrays it leaves out
    g = int(np.prod(eng.grid))
    model = sparse_bytes(len(TRAJ), eng.kernel.width, 3, 8)
    assert eng.memory_bytes() == model + 8 * (g + 1) + 8


def test_default_memory_budget_follows_available_memory(monkeypatch):
    cpu = torch.device("cpu")
    gib = 2**30
    for avail, expect in [
        (100 * gib, 30 * gib),  # 30 %
        (1000 * gib, 64 * gib),  # capped
        (2 * gib, 1 * gib),  # floor 1 GiB
        (int(1.5 * gib), int(0.75 * gib)),  # floor at most half of what is available
    ]:
        monkeypatch.setattr(plan_mod, "available_memory", lambda d, a=avail: a)
        assert plan_mod.default_memory_budget(cpu) == expect
    monkeypatch.setattr(plan_mod, "available_memory", lambda d: None)
    assert plan_mod.default_memory_budget(cpu) == plan_mod.DEFAULT_MEMORY_BUDGET


def test_available_memory_is_read_on_this_machine():
    avail = plan_mod.available_memory(torch.device("cpu"))
    assert avail is None or avail > 0


def test_plan_uses_default_budget_and_logs_why(monkeypatch, caplog):
    traj = np.random.default_rng(0).uniform(-0.5, 0.5, (100, 2))
    need = sparse_bytes(100, 4, 2, 4)  # at least this for any sparse candidate (W ≥ 4)
    monkeypatch.setattr(plan_mod, "default_memory_budget", lambda d: need // 2)
    with caplog.at_level(logging.WARNING, logger="qmrkit.nufft"):
        op = nufft.plan(traj, (16, 16), method="sparse", backend="torch")
    assert op.info.method == "binned"
    assert "default: 30 % of the available memory" in op.info.reason
    assert any("falling back" in r.getMessage() for r in caplog.records)
    monkeypatch.setattr(plan_mod, "default_memory_budget", lambda d: 10**9)
    op = nufft.plan(traj, (16, 16), method="sparse", backend="torch")
    assert op.info.method == "sparse"


def test_wisdom_of_a_sparse_plan_over_todays_budget_is_not_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("QMRKIT_WISDOM_DIR", str(tmp_path))
    traj = nufft.golden_angle_radial(24, 64).numpy()
    kw = dict(eps=1e-3, tune="measure", backend="torch", method="sparse", normal="direct")
    monkeypatch.setattr(plan_mod, "default_memory_budget", lambda d: 10**9)
    op1 = nufft.plan(traj, (32, 32), **kw)
    assert op1.info.method == "sparse" and op1.info.tune == "measure"
    assert nufft.plan(traj, (32, 32), **kw).info.tune == "wisdom"
    # less memory available today: the remembered sparse plan does not fit and is re-planned
    monkeypatch.setattr(plan_mod, "default_memory_budget", lambda d: 1000)
    op3 = nufft.plan(traj, (32, 32), **kw)
    assert op3.info.tune == "measure" and op3.info.method == "binned"
    e = ndft_matrix(traj, (32, 32))
    x = crandn((32, 32), seed=3)
    assert rel(op3(x).numpy(), e @ x.numpy().ravel().astype(np.complex128)) <= 1e-3


@pytest.mark.skipif(not available("finufft"), reason="finufft is not installed")
def test_finufft_tiny_problem_is_bitwise_reproducible():
    """Below SMALL_SAMPLES FINUFFT runs on one thread: identical calls give identical bits (and
    the result still meets ε against the exact NDFT)."""
    traj = np.random.default_rng(1).uniform(-0.5, 0.5, (300, 2))
    op = nufft.plan(traj, (12, 13), eps=1e-6, dtype=torch.complex128, backend="finufft")
    y = crandn((300,), torch.complex128, seed=2)
    a, b = op.H(y), op.H(y)
    assert torch.equal(a, b)
    exact = ndft_matrix(traj, (12, 13)).conj().T @ y.numpy()
    assert rel(a.numpy().ravel(), exact) <= 1e-6


@pytest.mark.parametrize("im", [(21,), (10, 13), (7, 9, 11)])
def test_binned_small_bins_wide_halos_against_ndft(monkeypatch, im):
    """Bins smaller than the kernel (halos over several bins), grids not divisible by the bin,
    several padded lengths per slab and crowded bins: still ≤ ε of the exact NDFT, both ways."""
    from qmrkit.nufft import binned

    monkeypatch.setattr(binned, "BIN", 5)
    monkeypatch.setattr(binned, "CHUNK", 2)
    monkeypatch.setattr(binned, "GROUP_BYTES", 4096)  # several batched products per group
    rng = np.random.default_rng(7)
    traj = np.concatenate(
        [rng.uniform(-0.5, 0.5, (300, len(im))), rng.normal(0, 0.02, (200, len(im)))]
    )
    eps = 1e-6
    kernel, _, grid = planner.choose_for_sigma(eps, 1.5, im)
    assert any(g % 5 for g in grid) and kernel.width > 5
    eng = NativeEngine(torch.as_tensor(traj), im, grid, kernel, torch.complex128, "binned")
    assert len({g[1] for g in eng.binned.groups}) > 2
    e = ndft_matrix(traj, im)
    x = crandn((2, *im), torch.complex128, seed=1)
    y = crandn((2, len(traj)), torch.complex128, seed=2)
    assert rel(eng.forward(x).numpy(), x.numpy().reshape(2, -1) @ e.T) <= eps
    assert rel(eng.adjoint(y).numpy().reshape(2, -1), y.numpy() @ e.conj()) <= eps


def test_planner_prefers_binned_to_gather_on_cpu_when_sparse_does_not_fit():
    """3D, ε = 1e-6, 1M samples: the cost model ranks binned below gather (measured ~10x)."""
    p = planner.Problem((128, 128, 128), 2**20, 1, 1e-6, torch.complex64, 1, torch.device("cpu"))
    best = planner.candidates(p, ["torch"], ["binned", "gather"])[0]
    assert best.method == "binned"
    assert best.memory < 2**30
