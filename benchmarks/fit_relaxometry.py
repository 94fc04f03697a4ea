"""MOLLI T1 fitting speed and accuracy: qmrkit versus per-voxel scipy (Torch T1's baseline).

Problem: 128×128 = 16,384 voxels, a 5(3)3 MOLLI (8 TIs), Rician noise at SNR 50, T1 uniform in
300–2000 ms, T1*/T1 in 0.8–0.9. Every method fits the same data with the same 3-parameter model
|A − B·exp(−TI/T1*)|; T1 = T1*(B/A − 1).

Anchors (measured in the same run, same machine):
* scipy Nelder–Mead per voxel (bounded, MSE loss, generic start [max S, 2·max S, 1000 ms]):
  Torch T1's CPU baseline; timed on a subset and scaled to all voxels;
* scipy least_squares (trf) per voxel from the same generic start; timed on a subset and scaled.

qmrkit runs are timed after one warm-up call (torch initialises forward-mode AD once per process).

Usage: python benchmarks/fit_relaxometry.py [--voxels-scipy 300] [--gpu-voxels 1000000]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import scipy.optimize as so
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import best_time, table, write_results  # noqa: E402
from qmrkit import fit, models  # noqa: E402
from qmrkit.sim import MOLLI_TI, add_noise  # noqa: E402

TI = np.asarray(MOLLI_TI)


def make_data(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    t1 = rng.uniform(300, 2000, n)
    ratio = rng.uniform(0.8, 0.9, n)
    m0 = 1000.0
    a = m0 * ratio
    b = a * (1 + 1 / ratio)
    t1s = ratio * t1
    clean = a[:, None] - b[:, None] * np.exp(-TI / t1s[:, None])
    return add_noise(clean, m0 / 50.0, kind="rician", seed=seed + 1), t1


def molli_np(p):
    return np.abs(p[0] - p[1] * np.exp(-TI / p[2]))


def generic_start(y):
    return np.array([y.max(), 2 * y.max(), 1000.0])


def scipy_nelder_mead(data):
    out = np.empty((len(data), 3))
    for v, y in enumerate(data):
        res = so.minimize(
            lambda p, y=y: np.mean((molli_np(p) - y) ** 2),
            generic_start(y),
            method="Nelder-Mead",
            bounds=[(0, None), (0, None), (1, 6000)],
            options={"maxiter": 2000, "xatol": 1e-4, "fatol": 1e-8},
        )
        out[v] = res.x
    return out


def scipy_least_squares(data):
    out = np.empty((len(data), 3))
    for v, y in enumerate(data):
        res = so.least_squares(
            lambda p, y=y: molli_np(p) - y,
            generic_start(y),
            bounds=([0, 0, 1], [np.inf, np.inf, 6000]),
            method="trf",
        )
        out[v] = res.x
    return out


def t1_from(p):
    return p[:, 2] * (p[:, 1] / p[:, 0] - 1)


def errors(t1_est, t1_true):
    e = np.abs(t1_est - t1_true) / t1_true
    e = np.where(np.isfinite(e), e, np.inf)
    return float(np.median(e)), float(np.percentile(e, 95))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--voxels-scipy", type=int, default=300, help="voxels timed for scipy (scaled up)"
    )
    ap.add_argument("--gpu-voxels", type=int, default=1_000_000)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")

    n = 128 * 128
    data, t1 = make_data(n)
    series = data.reshape(128, 128, len(TI))
    model = models.MolliT1(TI)
    rows = []

    # anchors on a subset, scaled to all voxels (they are per-voxel loops: time is linear in voxels)
    k = args.voxels_scipy
    t0 = time.perf_counter()
    p_nm = scipy_nelder_mead(data[:k])
    t_nm = (time.perf_counter() - t0) * n / k
    rows.append(
        {
            "method": f"scipy Nelder–Mead per voxel ({k} voxels, scaled)",
            "seconds": t_nm,
            **dict(zip(("med", "p95"), errors(t1_from(p_nm), t1[:k]), strict=True)),
        }
    )
    t0 = time.perf_counter()
    p_ls = scipy_least_squares(data[:k])
    t_ls = (time.perf_counter() - t0) * n / k
    rows.append(
        {
            "method": f"scipy least_squares per voxel ({k} voxels, scaled)",
            "seconds": t_ls,
            **dict(zip(("med", "p95"), errors(t1_from(p_ls), t1[:k]), strict=True)),
        }
    )

    # qmrkit: one warm-up on a small slice, then the best of three runs
    fit.lm(model, series[:4])
    fit.adam(model, series[:4], max_iter=30)
    t_lm, r_lm = best_time(lambda: fit.lm(model, series, progress=False))
    rows.append(
        {
            "method": "qmrkit fit.lm (float32)",
            "seconds": t_lm,
            **dict(zip(("med", "p95"), errors(r_lm["T1"].numpy().ravel(), t1), strict=True)),
            "iters": float(np.median(r_lm.iterations.numpy())),
        }
    )
    t_lm64, r_lm64 = best_time(lambda: fit.lm(model, series, dtype=torch.float64, progress=False))
    rows.append(
        {
            "method": "qmrkit fit.lm (float64)",
            "seconds": t_lm64,
            **dict(zip(("med", "p95"), errors(r_lm64["T1"].numpy().ravel(), t1), strict=True)),
            "iters": float(np.median(r_lm64.iterations.numpy())),
        }
    )
    for loss in ("l2", "l1"):
        t_ad, r_ad = best_time(
            lambda loss=loss: fit.adam(model, series, loss=loss, progress=False), repeat=2
        )
        rows.append(
            {
                "method": f"qmrkit fit.adam ({loss} loss, float32)",
                "seconds": t_ad,
                **dict(zip(("med", "p95"), errors(r_ad["T1"].numpy().ravel(), t1), strict=True)),
                "iters": float(r_ad.iterations),
            }
        )
    for r in rows:
        r["voxels_per_s"] = n / r["seconds"]
        r["speedup_vs_nm"] = t_nm / r["seconds"]
        r["med"] *= 100
        r["p95"] *= 100

    cols = [
        ("method", "method", ""),
        ("seconds", "s (16,384 vox)", ".3f"),
        ("voxels_per_s", "voxels/s", ",.0f"),
        ("speedup_vs_nm", "× Nelder–Mead", ".1f"),
        ("med", "median T1 err %", ".2f"),
        ("p95", "95th pct T1 err %", ".2f"),
        ("iters", "iterations", ".0f"),
    ]
    print(f"MOLLI T1, 128×128 voxels, 8 TIs, SNR 50, {torch.get_num_threads()} torch threads, CPU")
    print(table(rows, cols))

    gpu = None
    if torch.cuda.is_available():
        big, _ = make_data(args.gpu_voxels, seed=5)
        dev = torch.device("cuda")
        bt = torch.as_tensor(big, dtype=torch.float32, device=dev)
        fit.lm(model, bt[:1024], device=dev)
        t_gpu, r_gpu = best_time(
            lambda: fit.lm(model, bt, device=dev, progress=False), sync=torch.cuda.synchronize
        )
        gpu = {
            "voxels": args.gpu_voxels,
            "seconds": t_gpu,
            "device": torch.cuda.get_device_name(0),
            "converged": float(r_gpu.fraction_converged),
        }
        print(
            f"\nGPU: {args.gpu_voxels:,} MOLLI voxels with fit.lm in {t_gpu:.3f} s on {gpu['device']}"
        )
    path = write_results(
        "fit_relaxometry", {"rows": rows, "gpu": gpu, "voxels": n, "scipy_subset": k}
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
