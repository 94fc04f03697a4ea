"""Extended phase graph (EPG) simulation of gradient-spoiled FISP MR fingerprinting.

State vectors per atom: transverse F⁺ₖ, F⁻ₖ and longitudinal Zₖ for dephasing orders
k = 0..K−1 (Weigel, JMRI 2015). Per TR: RF rotation (flip α·B1, phase φ) → relaxation for TE →
readout of F⁺₀ → relaxation for TR − TE → one unit of unbalanced-gradient dephasing. An adiabatic
inversion (B1-insensitive) and a delay TI precede the first pulse when the schedule says so.

Atoms are batched: millions of (T1, T2, B1) combinations advance together on CPU or GPU.

Truncation is rigorous: a state at order k needs at least k TRs in the transverse plane to be
refocused to k = 0, so its contribution to the signal is bounded by E2(TR_min)^k. Atoms are
grouped by T2 and each group keeps K = ⌈ln(1/tol)·T2/TR_min⌉ + 1 orders (never more than
needed: orders above the TR count are zero anyway).
With all RF phases zero (FISP), F± are purely imaginary and Z real, so the simulation runs in real
arithmetic at half the cost.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from .._device import resolve_device
from .._progress import progress_bar
from ..errors import ParameterError, ShapeError
from .sequences import Schedule


def _as_1d(name: str, x: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x, dtype=np.float64) if not isinstance(x, torch.Tensor) else x)
    t = t.to(device=device, dtype=dtype).reshape(-1)
    if not torch.isfinite(t).all():
        raise ParameterError(f"{name} contains NaN or Inf")
    return t


def epg_fisp(
    schedule: Schedule,
    t1: Any,
    t2: Any,
    b1: Any = 1.0,
    *,
    slice_profile: tuple[Any, Any] | None = None,
    tol: float = 1e-6,
    max_states: int | None = None,
    device: Any = None,
    dtype: torch.dtype = torch.float32,
    batch_size: int = 16384,
    progress: bool | None = False,
) -> torch.Tensor:
    """Simulate FISP MRF signals of many atoms.

    Parameters
    ----------
    schedule : Schedule
        Flip angles (deg), TR, TE (ms), RF phases (deg), inversion and TI.
    t1, t2 : array (N,)
        Relaxation times in ms (broadcast against each other and ``b1``).
    b1 : array (N,) or float
        Transmit field as a fraction of nominal (scales every flip angle, not the inversion).
    slice_profile : (scales, weights), optional
        Flip-angle scale factors across the slice and their weights; the signal is the weighted sum.
    tol : float
        Truncation tolerance of the state orders (see module docs).
    max_states : int, optional
        Hard cap on the number of orders (default: what ``tol`` requires).
    device, dtype
        Where and in which real precision (float32 or float64) to simulate.
    batch_size : int
        Atoms per batch (bounds memory).
    progress : bool or None
        Show a progress bar (None: on a terminal or in a notebook). It advances by simulation
        work (atoms × state orders), so its ETA holds although high-T2 atoms cost more.

    Returns
    -------
    Tensor (N, n_tr), complex
        Signal at each echo for M0 = 1.
    """
    if dtype not in (torch.float32, torch.float64):
        raise ParameterError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    if not 0 < tol < 1:
        raise ParameterError(f"tol must be in (0, 1), got {tol}")
    dev = resolve_device(device, t1, t2)
    T1 = _as_1d("t1", t1, torch.float64, dev)
    T2 = _as_1d("t2", t2, torch.float64, dev)
    B1 = _as_1d("b1", b1, torch.float64, dev)
    try:
        T1, T2, B1 = torch.broadcast_tensors(T1, T2, B1)
    except RuntimeError as exc:
        raise ShapeError(
            f"t1 ({T1.numel()}), t2 ({T2.numel()}) and b1 ({B1.numel()}) must broadcast"
        ) from exc
    if (T1 <= 0).any() or (T2 <= 0).any() or (B1 < 0).any():
        raise ParameterError("t1 and t2 must be > 0 ms and b1 >= 0")
    if slice_profile is None:
        scales = torch.ones(1, dtype=torch.float64)
        weights = torch.ones(1, dtype=torch.float64)
    else:
        scales = torch.as_tensor(np.asarray(slice_profile[0], dtype=np.float64)).reshape(-1)
        weights = torch.as_tensor(np.asarray(slice_profile[1], dtype=np.float64)).reshape(-1)
        if scales.numel() != weights.numel() or scales.numel() == 0:
            raise ShapeError("slice_profile needs equal-length, non-empty scales and weights")
        weights = weights / weights.sum()
    n = T1.numel()
    cdtype = torch.complex64 if dtype == torch.float32 else torch.complex128
    out = torch.zeros((n, schedule.n_tr), dtype=cdtype, device=dev)
    tr_min = float(schedule.tr.min())
    k_cap = schedule.n_tr + 1 if max_states is None else int(max_states)
    # group atoms of similar T2 so each group keeps only the orders it needs, trading the
    # per-group overhead (a fixed cost per TR) against simulating needless orders
    k_need = torch.ceil(math.log(1.0 / tol) * T2 / tr_min).long() + 1
    k_need = k_need.clamp(2, min(k_cap, schedule.n_tr + 1))
    overhead = 1e6 if dev.type == "cuda" else 1.5e4  # fixed cost per group, in atom·orders
    groups = _groups(k_need, overhead)
    work = sum(K * idx.numel() for K, idx in groups)  # cost of a batch ∝ atoms × orders
    bar = progress_bar(
        total=work,
        desc=f"EPG {n} atoms",
        progress=progress,
        bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]",
    )
    with bar:
        for K, idx_all in groups:
            for g0 in range(0, idx_all.numel(), batch_size):
                idx = idx_all[g0 : g0 + batch_size]
                sig = torch.zeros((idx.numel(), schedule.n_tr), dtype=cdtype, device=dev)
                for s, w in zip(scales.tolist(), weights.tolist(), strict=True):
                    sig += w * _simulate(schedule, T1[idx], T2[idx], B1[idx] * s, K, dtype)
                out[idx] = sig
                bar.update(K * idx.numel())
    return out


def _groups(k_need: torch.Tensor, overhead: float) -> list[tuple[int, torch.Tensor]]:
    """Partition atoms into groups (K, indices) minimising Σ (overhead + n·K) by dynamic
    programming over the sorted distinct state counts."""
    vals, inv, counts = torch.unique(k_need, return_inverse=True, return_counts=True)
    u = vals.cpu().numpy().astype(np.float64)
    c = np.concatenate([[0.0], np.cumsum(counts.cpu().numpy())])
    U = len(u)
    best = np.zeros(U + 1)
    cut = np.zeros(U + 1, dtype=np.int64)
    for j in range(1, U + 1):
        i = np.arange(1, j + 1)  # group covers distinct values i..j (1-based)
        cost = best[i - 1] + overhead + (c[j] - c[i - 1]) * u[j - 1]
        a = int(np.argmin(cost))
        best[j], cut[j] = cost[a], a + 1
    groups = []
    j = U
    while j > 0:
        i = cut[j]
        members = torch.nonzero((inv >= i - 1) & (inv <= j - 1)).reshape(-1)
        groups.append((int(u[j - 1]), members))
        j = i - 1
    return groups[::-1]


def _simulate(
    schedule: Schedule,
    t1: torch.Tensor,
    t2: torch.Tensor,
    b1: torch.Tensor,
    K: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    if np.all(schedule.phase == 0):
        return _simulate_real(schedule, t1, t2, b1, K, dtype)
    return _simulate_complex(schedule, t1, t2, b1, K, dtype)


def _relax(t1: torch.Tensor, t2: torch.Tensor, tau: float, dtype: torch.dtype):
    e1 = torch.exp(-tau / t1).to(dtype)[:, None]
    e2 = torch.exp(-tau / t2).to(dtype)[:, None]
    return e1, e2


def _simulate_real(schedule, t1, t2, b1, K, dtype, block: int = 64):
    """φ = 0: F⁺ = i·fp, F⁻ = i·fm, Z = z with fp, fm, z real.

    Per TR the RF rotation and the relaxation over the whole TR are one 3×3 matrix per atom (the
    two relaxation periods compose exactly), applied to the state stack ``(n, 3, k)`` by a batched
    matrix product; the echo is the rotated F⁺₀ relaxed over TE. The matrices of ``block`` TRs are
    built at once so the loop over TRs runs few, large operations.
    """
    n = t1.numel()
    dev = t1.device
    X = torch.zeros((n, 3, K), dtype=dtype, device=dev)  # rows: fp, fm, z
    r1 = (1.0 / t1).to(torch.float64)
    r2 = (1.0 / t2).to(torch.float64)
    X[:, 2, 0] = 1.0
    if schedule.inversion:
        e1 = torch.exp(-schedule.ti * r1).to(dtype)
        X[:, 2, 0] = -e1 + (1 - e1)
    sig = torch.empty((n, schedule.n_tr), dtype=dtype, device=dev)
    alpha = torch.deg2rad(torch.as_tensor(schedule.flip_angles, dtype=torch.float64, device=dev))
    tr_all = torch.as_tensor(schedule.tr, dtype=torch.float64, device=dev)
    te_all = torch.as_tensor(schedule.te, dtype=torch.float64, device=dev)
    b1d = b1.to(torch.float64)
    for i0 in range(0, schedule.n_tr, block):
        sl = slice(i0, min(i0 + block, schedule.n_tr))
        a = alpha[sl, None] * b1d[None, :]  # (B, n)
        ca, sa = torch.cos(a), torch.sin(a)
        c2, s2 = 0.5 * (1 + ca), 0.5 * (1 - ca)
        e1 = torch.exp(-tr_all[sl, None] * r1[None])
        e2 = torch.exp(-tr_all[sl, None] * r2[None])
        R = (
            torch.stack(
                [
                    e2 * c2,
                    e2 * s2,
                    -e2 * sa,
                    e2 * s2,
                    e2 * c2,
                    e2 * sa,
                    0.5 * e1 * sa,
                    -0.5 * e1 * sa,
                    e1 * ca,
                ],
                dim=-1,
            )
            .to(dtype)
            .reshape(-1, n, 3, 3)
        )
        et = torch.exp(-te_all[sl, None] * r2[None])
        echo = torch.stack([c2 * et, s2 * et, -sa * et], dim=-1).to(dtype)[
            :, :, None, :
        ]  # (B, n, 1, 3)
        rec = (1 - e1).to(dtype)
        for j in range(R.shape[0]):
            i = i0 + j
            k = min(i + 1, K)  # orders above the number of TRs so far are still zero
            Xk = X[:, :, :k]
            sig[:, i] = torch.bmm(echo[j], Xk[:, :, :1])[:, 0, 0]
            Y = torch.bmm(R[j], Xk)
            Y[:, 2, 0] += rec[j]
            # dephasing by one order: F⁺ moves up, F⁻ moves down; F⁺₀ = conj(F⁻₀) → fp0 = −fm0
            k2 = min(k + 1, K)
            X[:, 0, 1:k2] = Y[:, 0, : k2 - 1]
            X[:, 1, : k - 1] = Y[:, 1, 1:k]
            X[:, 1, k - 1] = 0.0
            X[:, 0, 0] = -X[:, 1, 0]
            X[:, 2, :k] = Y[:, 2]
    return torch.complex(torch.zeros_like(sig), sig)


def _simulate_complex(schedule, t1, t2, b1, K, dtype):
    n = t1.numel()
    dev = t1.device
    cd = torch.complex64 if dtype == torch.float32 else torch.complex128
    fp = torch.zeros((n, K), dtype=cd, device=dev)
    fm = torch.zeros((n, K), dtype=cd, device=dev)
    z = torch.zeros((n, K), dtype=cd, device=dev)
    z[:, 0] = 1.0
    if schedule.inversion:
        z[:, 0] = -1.0
        e1, _ = _relax(t1, t2, schedule.ti, dtype)
        z[:, :1] = z[:, :1] * e1 + (1 - e1)
    sig = torch.empty((n, schedule.n_tr), dtype=cd, device=dev)
    alpha = torch.deg2rad(torch.as_tensor(schedule.flip_angles, dtype=torch.float64, device=dev))
    phase = np.deg2rad(schedule.phase)
    for i in range(schedule.n_tr):
        k = min(i + 1, K)
        a = (alpha[i] * b1).to(dtype)[:, None]
        ca, sa = torch.cos(a), torch.sin(a)
        c2, s2 = 0.5 * (1 + ca), 0.5 * (1 - ca)
        e = complex(math.cos(phase[i]), math.sin(phase[i]))
        e2p, e2m = e * e, (e * e).conjugate()
        P, M, Z = fp[:, :k], fm[:, :k], z[:, :k]
        nP = c2 * P + e2p * s2 * M - 1j * e * sa * Z
        nM = e2m * s2 * P + c2 * M + 1j * e.conjugate() * sa * Z
        nZ = -0.5j * e.conjugate() * sa * P + 0.5j * e * sa * M + ca * Z
        for tau, record in (
            (float(schedule.te[i]), True),
            (float(schedule.tr[i] - schedule.te[i]), False),
        ):
            e1, e2r = _relax(t1, t2, tau, dtype)
            nP, nM = nP * e2r, nM * e2r
            nZ = nZ * e1
            nZ[:, :1] += 1 - e1
            if record:
                sig[:, i] = nP[:, 0]
        k2 = min(k + 1, K)
        fp[:, 1:k2] = nP[:, : k2 - 1]
        fm[:, : k - 1] = nM[:, 1:k]
        fm[:, k - 1] = 0.0
        fp[:, 0] = fm[:, 0].conj()
        z[:, :k] = nZ
    return sig
