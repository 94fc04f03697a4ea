"""Benchmark of the operator and solver layers (qmrkit.ops, qmrkit.optim).

Cartesian 2-D SENSE at 256² with 8 simulated coils, R = 4 (every 4th line plus 24 central
calibration lines):

* operator throughput: forward + adjoint of FFT, Sense, the full Mask·FFT·Sense, FiniteDifference;
* CG-SENSE, 30 iterations: qmrkit ``optim.cg`` versus SciPy's ``scipy.sparse.linalg.cg`` on the
  same operator written with NumPy FFTs (a plain reference implementation), time and NRMSE;
* TV reconstruction by ``optim.pdhg`` (100 iterations) against CG-SENSE NRMSE.

Run: ``PYTHONPATH=src python benchmarks/optim_ops.py [--size 256] [--repeat 3]``. Prints a table
and writes ``benchmarks/results/optim_ops.json``. Self-contained (the phantom and coil maps are
built here), so it depends on nothing outside ops/optim.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import scipy.sparse.linalg as spla
import torch

from qmrkit import ops, optim
from qmrkit.optim import prox


def phantom(n: int) -> np.ndarray:
    """A few ellipses with different intensities and a phase ramp (complex64)."""
    y, x = np.mgrid[-1 : 1 : n * 1j, -1 : 1 : n * 1j]
    img = np.zeros((n, n), np.float64)
    for cx, cy, ax, ay, v in [
        (0, 0, 0.7, 0.9, 1.0),
        (0, 0, 0.62, 0.82, -0.6),
        (0.25, 0.1, 0.15, 0.3, 0.5),
        (-0.25, -0.2, 0.18, 0.12, 0.8),
        (0.0, 0.5, 0.1, 0.08, 0.4),
    ]:
        img[((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 <= 1] += v
    return (img * np.exp(1j * 0.5 * np.pi * x)).astype(np.complex64)


def coil_maps(n: int, nc: int) -> np.ndarray:
    """Smooth Biot–Savart-like sensitivities of coils on a ring, normalised to Σ|S|² = 1."""
    y, x = np.mgrid[-1 : 1 : n * 1j, -1 : 1 : n * 1j]
    maps = []
    for c in range(nc):
        a = 2 * np.pi * c / nc
        cx, cy = 1.5 * np.cos(a), 1.5 * np.sin(a)
        d2 = (x - cx) ** 2 + (y - cy) ** 2
        maps.append(np.exp(1j * (a + 0.3 * x)) / d2)
    m = np.stack(maps)
    return (m / np.sqrt((np.abs(m) ** 2).sum(0))).astype(np.complex64)


def timeit(fn, repeat: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def nrmse(x: np.ndarray, ref: np.ndarray, support: np.ndarray) -> float:
    return float(np.linalg.norm((x - ref)[support]) / np.linalg.norm(ref[support]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--coils", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "optim_ops.json"))
    args = ap.parse_args()
    n, nc = args.size, args.coils
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)

    truth = phantom(n)
    maps = coil_maps(n, nc)
    mask = np.zeros((n, 1), bool)
    mask[::4] = True
    mask[n // 2 - 12 : n // 2 + 12] = True
    shape = (nc, n, n)
    F = ops.FFT(shape, axes=(-2, -1))
    M = ops.Mask(mask, shape=shape)
    S = ops.Sense(maps)
    A = M @ F @ S
    sigma = 0.01  # complex noise std per k-space sample (ortho FFT: same std per image pixel)
    noise = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)
    y = A(torch.from_numpy(truth)) + M(torch.from_numpy(sigma / np.sqrt(2) * noise))
    support = np.abs(truth) > 0.05
    rows = []

    # -- operators ---------------------------------------------------------------------------
    x_img = torch.from_numpy(truth)
    x_coil = S(x_img)
    D = ops.FiniteDifference((n, n), boundary="neumann")
    for name, op, x in [
        ("FFT 8x256² (fwd+adj)", F, x_coil),
        ("Sense (fwd+adj)", S, x_img),
        ("Mask·FFT·Sense normal", A, x_img),
        ("FiniteDifference 2-D (fwd+adj)", D, x_img),
    ]:
        if name.endswith("normal"):
            t = timeit(lambda op=op, x=x: op.N(x), args.repeat)
        else:
            t = timeit(lambda op=op, x=x: op.H(op(x)), args.repeat)
        rows.append({"case": name, "time_s": t})

    # -- CG-SENSE: qmrkit vs scipy on NumPy FFTs ---------------------------------------------
    n_iter, lam_cg = 30, 1e-2  # light Tikhonov: the ring-coil maps give a high g-factor at R=4
    b = A.H(y)
    res = optim.cg(A, b, lam=lam_cg, max_iter=n_iter, tol=0)
    t_q = timeit(lambda: optim.cg(A, b, lam=lam_cg, max_iter=n_iter, tol=0), args.repeat)
    e_q = nrmse(res.x.numpy(), truth, support)

    maps_np, m_np = maps, mask.astype(np.float32)

    def normal_np(v):
        img = v.reshape(n, n).astype(np.complex64)
        k = (
            np.fft.fftshift(
                np.fft.fft2(np.fft.ifftshift(maps_np * img, axes=(-2, -1)), norm="ortho"),
                axes=(-2, -1),
            )
            * m_np
        )
        c = np.fft.fftshift(
            np.fft.ifft2(np.fft.ifftshift(k, axes=(-2, -1)), norm="ortho"), axes=(-2, -1)
        )
        return (np.conj(maps_np) * c).sum(0).ravel() + lam_cg * v

    L = spla.LinearOperator((n * n, n * n), matvec=normal_np, dtype=np.complex64)
    b_np = b.numpy().ravel()

    def run_scipy():
        return spla.cg(L, b_np, rtol=1e-30, atol=0.0, maxiter=n_iter)[0]

    x_s = run_scipy()
    t_s = timeit(run_scipy, args.repeat)
    e_s = nrmse(x_s.reshape(n, n), truth, support)
    rows.append({"case": f"CG-SENSE {n_iter} it, qmrkit", "time_s": t_q, "nrmse": e_q})
    rows.append({"case": f"CG-SENSE {n_iter} it, scipy+numpy", "time_s": t_s, "nrmse": e_s})
    rows.append({"case": "zero-filled (Aᴴy)", "nrmse": nrmse(b.numpy(), truth, support)})

    # -- TV by PDHG -----------------------------------------------------------------------------
    lam = 2e-3
    K = ops.Vstack([A, D])
    fstar = prox.Stack(
        K, [prox.conjugate(prox.L2Squared(y)), prox.conjugate(prox.GroupL1(lam, axis=-3))]
    )
    t0 = time.perf_counter()
    tv = optim.pdhg(K, fstar, None, x0=res.x.clone(), max_iter=100, tol=0)
    t_tv = time.perf_counter() - t0
    rows.append(
        {
            "case": f"TV (PDHG 100 it, λ={lam})",
            "time_s": t_tv,
            "nrmse": nrmse(tv.x.numpy(), truth, support),
        }
    )

    print(
        f"qmrkit ops/optim benchmark: {n}², {nc} coils, R≈{M.acceleration:.2f}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(
        f"CG: lam={lam_cg}; noise sigma={sigma} per k-space sample; timings are the best of "
        f"{args.repeat} runs (shared machines are noisy)"
    )
    print(f"{'case':40s} {'time [ms]':>10s} {'NRMSE':>8s}")
    for r in rows:
        t = f"{1e3 * r['time_s']:10.1f}" if "time_s" in r else f"{'':10s}"
        e = f"{r['nrmse']:8.4f}" if "nrmse" in r else ""
        print(f"{r['case']:40s} {t} {e}")
    print(f"qmrkit / scipy CG time: {t_q / t_s:.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "size": n,
                "coils": nc,
                "acceleration": M.acceleration,
                "cg_iterations": n_iter,
                "cg_lam": lam_cg,
                "noise_sigma": sigma,
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "machine": platform.processor() or platform.machine(),
                "rows": rows,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
