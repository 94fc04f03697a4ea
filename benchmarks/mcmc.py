"""MCMC throughput: qmrkit.fit.mcmc (all voxels at once) versus emcee looping over voxels.

Problem: a 4-parameter IVIM model S = S0·(f·exp(−b·D*) + (1 − f)·exp(−b·D)), 11 b-values
(0–3 ms/µm²), Gaussian noise with known σ (SNR 50 at b = 0), 10,000 voxels. Same chain settings
for the ensemble samplers (32 walkers, 2,000 steps, 20% burn-in); MH uses 4 chains × 2,000 steps.
emcee (EnsembleSampler, one voxel at a time, the usual way) is timed on a subset of voxels and
scaled; all runs are in the same process, same machine, same thread count.

Reported: seconds for all voxels, ms/voxel, speed-up per voxel over emcee, median effective sample
size per voxel (for D), and ESS per second.

Usage: python benchmarks/mcmc.py [--voxels 10000] [--emcee-voxels 20] [--steps 2000]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import table, write_results  # noqa: E402
from qmrkit import fit  # noqa: E402

B = np.array([0.0, 0.05, 0.1, 0.2, 0.4, 0.8, 1.2, 1.6, 2.0, 2.5, 3.0])


def ivim(S0, f, Dp, D, b):
    return S0 * (f * torch.exp(-b * Dp) + (1 - f) * torch.exp(-b * D))


def make(n: int, seed: int = 0):
    model = fit.model_from_function(
        ivim,
        {"S0": (0, 10), "f": (0.0, 0.6), "Dp": (3.0, 50.0, "µm²/ms"), "D": (0.2, 3.0, "µm²/ms")},
        amplitude=["S0"],
        b=B,
        name="ivim",
    )
    rng = np.random.default_rng(seed)
    truth = {
        "S0": np.full(n, 1000.0),
        "f": rng.uniform(0.1, 0.3, n),
        "Dp": rng.uniform(8, 25, n),
        "D": rng.uniform(0.6, 1.4, n),
    }
    sigma = 20.0
    y = model.simulate(truth).numpy() + rng.normal(0, sigma, (n, B.size))
    return model, y, sigma


def run_emcee(y, sigma, starts, lo, hi, walkers, steps, burn):
    import emcee

    ess = []
    for v in range(len(y)):
        yv = y[v]

        def logp(p, yv=yv):
            if np.any(p < lo) or np.any(p > hi):
                return -np.inf
            s = p[0] * (p[1] * np.exp(-B * p[2]) + (1 - p[1]) * np.exp(-B * p[3]))
            return -0.5 * np.sum((s - yv) ** 2) / sigma**2

        rng = np.random.default_rng(v)
        p0 = starts[v] * (1 + 1e-3 * rng.standard_normal((walkers, 4)))
        sampler = emcee.EnsembleSampler(walkers, 4, logp)
        sampler.run_mcmc(p0, steps)
        tau = sampler.get_autocorr_time(discard=burn, quiet=True)
        ess.append((steps - burn) * walkers / tau[3])
    return np.array(ess)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--voxels", type=int, default=10_000)
    ap.add_argument("--emcee-voxels", type=int, default=20)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--walkers", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default=None)
    ap.add_argument("--no-eager", action="store_true", help="skip the eager (uncompiled) rows")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    n, steps, W = args.voxels, args.steps, args.walkers
    burn = steps // 5
    model, y, sigma = make(n)
    dev = torch.device(args.device) if args.device else torch.device("cpu")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    init = fit.lm(model, y, device=dev)
    rows = []

    # qmrkit, ensemble and MH (warm-up on a few voxels first); "compiled" rows include the
    # one-off torch.compile time (run with a fresh TORCHINDUCTOR_CACHE_DIR for a cold cache)
    fit.mcmc(model, y[:8], noise=sigma, n_steps=20, init=None, device=dev, compile=False)
    variants = [("ensemble", W, True), ("mh", 4, True)]
    if not args.no_eager:
        variants += [("ensemble", W, False), ("mh", 4, False)]
    for method, walkers, compiled in variants:
        sync()
        t0 = time.perf_counter()
        res = fit.mcmc(
            model,
            y,
            method=method,
            noise=sigma,
            n_walkers=walkers,
            n_steps=steps,
            burnin=burn,
            init=init,
            device=dev,
            compile=compiled,
            progress=False,
        )
        sync()
        el = time.perf_counter() - t0
        ess = float(np.median(res.ess["D"].cpu().numpy()))
        kind = "compiled, incl. compile time" if res.settings["compile"] else "eager"
        unit = "walkers" if method == "ensemble" else "chains"
        rows.append(
            {
                "method": f"qmrkit mcmc {method} ({walkers} {unit}; {kind})",
                "seconds": el,
                "ess": ess,
                "acc": float(res.acceptance.median()),
                "mean_D": float(res.mean["D"].mean()),
            }
        )

    # emcee on a subset, scaled
    k = args.emcee_voxels
    starts = np.stack([init[p].cpu().numpy()[:k] for p in ("S0", "f", "Dp", "D")], 1).astype(
        np.float64
    )
    scale = np.percentile(np.abs(y), 99)
    lo = np.array([0.0, 0.0, 3.0, 0.2])
    hi = np.array([10 * scale, 0.6, 50.0, 3.0])
    t0 = time.perf_counter()
    ess_e = run_emcee(y[:k], sigma, starts, lo, hi, W, steps, burn)
    el = (time.perf_counter() - t0) * n / k
    rows.insert(
        0,
        {
            "method": f"emcee EnsembleSampler per voxel ({W} walkers; {k} voxels, scaled)",
            "seconds": el,
            "ess": float(np.median(ess_e)),
            "acc": None,
        },
    )
    t_emcee = rows[0]["seconds"]
    for r in rows:
        r["ms_per_voxel"] = 1000 * r["seconds"] / n
        r["speedup"] = t_emcee / r["seconds"]
        r["ess_per_s"] = r["ess"] * n / r["seconds"]
    cols = [
        ("method", "method", ""),
        ("seconds", f"s ({n:,} voxels)", ".1f"),
        ("ms_per_voxel", "ms/voxel", ".3f"),
        ("speedup", "× emcee", ".0f"),
        ("ess", "median ESS of D per voxel", ".0f"),
        ("ess_per_s", "ESS/s (all voxels)", ",.0f"),
        ("acc", "acceptance", ".2f"),
    ]
    print(
        f"IVIM (4 parameters), {n:,} voxels, {steps} steps, device {dev}, "
        f"{torch.get_num_threads()} threads"
    )
    print(table(rows, cols))
    path = write_results(
        "mcmc",
        {
            "rows": rows,
            "voxels": n,
            "steps": steps,
            "walkers": W,
            "device": str(dev),
            "emcee_subset": k,
        },
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
