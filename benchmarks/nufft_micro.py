"""Quick same-run micro-benchmarks of the NUFFT engines (minutes, not the 40-minute suite).

Ratios against FINUFFT measured in the same process are what count on a shared machine.

    PYTHONPATH=src python benchmarks/nufft_micro.py engines --eps 1e-3 --sigma 1.5 --coils 1 \
        --impl finufft:1.25:single,gather,sparse
    PYTHONPATH=src python benchmarks/nufft_micro.py toeplitz --eps 1e-3

``engines``: 3D 128³ koosh ball (4096 spokes × 256 = 1,048,576 samples), torch-native
``NativeEngine`` (method ``gather``, ``sparse`` or ``binned`` at the given σ, kernel width
from ε) against FINUFFT plans (``finufft:<upsampfac>:<single|double>``), best of ``--reps`` interleaved runs;
``--errors`` adds relative errors against FINUFFT complex128 at 1e-10 (first coil).
``toeplitz``: 2D 256², 402 spokes × 512, 32 coils, torch-native forward+adjoint (planned
method/σ) against the Toeplitz normal.
``build``: wall time and peak RSS (``VmHWM``, this process) of building the sparse engine of the
3D case at ``--sigma`` / ``--eps`` (the plan-time cost of ``method="sparse"``).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from qmrkit import nufft
from qmrkit.nufft import planner as pl
from qmrkit.nufft.native import NativeEngine


def engines(a: argparse.Namespace) -> None:
    import finufft

    n, coils, eps = 128, a.coils, a.eps
    traj = nufft.radial_3d(4096, 2 * n)
    m = traj.shape[0]
    kernel, _, grid = pl.choose_for_sigma(eps, a.sigma, (n, n, n))
    x = torch.randn(coils, n, n, n, dtype=torch.complex64)
    y = torch.randn(coils, m, dtype=torch.complex64)
    pts = 2 * np.pi * traj.numpy()
    impls = {}
    for name in a.impl.split(","):
        if name.startswith("finufft"):
            _, us, prec = name.split(":")
            dt = "complex64" if prec == "single" else "complex128"
            p = [pts[:, i].astype(np.float32 if prec == "single" else np.float64) for i in range(3)]
            plans = []
            for kind, sign in ((2, -1), (1, 1)):
                f = finufft.Plan(
                    kind, (n, n, n), n_trans=coils, eps=eps, isign=sign, dtype=dt,
                    upsampfac=float(us), nthreads=torch.get_num_threads(), modeord=0,
                )  # fmt: skip
                f.setpts(*[q.copy() for q in p])
                plans.append(f)
            xn, yn = x.numpy().astype(dt), y.numpy().astype(dt)
            impls[name] = (
                lambda f=plans[0], d=xn: f.execute(d),
                lambda f=plans[1], d=yn: f.execute(d),
            )
        else:
            t = time.perf_counter()
            eng = NativeEngine(
                traj, (n, n, n), grid, kernel, torch.complex64, name,
                accumulate_double=eps < 1e-5,
            )  # fmt: skip
            print(
                f"{name}: build {time.perf_counter() - t:.2f} s, "
                f"holds {eng.memory_bytes() / 2**30:.2f} GiB",
                flush=True,
            )
            impls[name] = (lambda e=eng: e.forward(x), lambda e=eng: e.adjoint(y))
    print(f"eps={eps} σ={a.sigma} W={kernel.width} grid={grid} coils={coils} M={m}", flush=True)
    best = {k: [np.inf, np.inf] for k in impls}
    for r in range(a.reps):
        for k, (f, h) in impls.items():
            t = time.perf_counter()
            f()
            tf = time.perf_counter() - t
            t = time.perf_counter()
            h()
            ta = time.perf_counter() - t
            best[k] = [min(best[k][0], tf), min(best[k][1], ta)]
            print(f"  rep {r} {k}: fwd {tf:.3f} s, adj {ta:.3f} s", flush=True)
    if a.errors:
        # relative l2 errors against FINUFFT in complex128 at 1e-10 (forward: all samples)
        pts64 = [pts[:, i].astype(np.float64).copy() for i in range(3)]
        x0 = x[0].numpy().astype(np.complex128)
        y0 = y[0].numpy().astype(np.complex128)
        yref = finufft.nufft3d2(*pts64, x0, eps=1e-10, isign=-1, modeord=0)
        xref = finufft.nufft3d1(*pts64, y0, (n, n, n), eps=1e-10, isign=1, modeord=0)
        for k, (f, h) in impls.items():
            yf, xa = (np.asarray(v).reshape(coils, -1)[0] for v in (f(), h()))
            ef = np.linalg.norm(yf - yref) / np.linalg.norm(yref)
            ea = np.linalg.norm(xa - xref.ravel()) / np.linalg.norm(xref)
            print(f"{k:22s} error fwd {ef:.1e} adj {ea:.1e}", flush=True)
    ref = next(iter(best))
    for k, (tf, ta) in best.items():
        rf, ra = best[ref]
        print(
            f"{k:22s} fwd {tf:.3f} adj {ta:.3f} | / {ref}: fwd {tf / rf:.2f} adj {ta / ra:.2f} "
            f"pair {(tf + ta) / (rf + ra):.2f}"
        )


def toeplitz(a: argparse.Namespace) -> None:
    n, coils = 256, 32
    traj = nufft.radial(402, 2 * n)
    op = nufft.plan(traj, (n, n), eps=a.eps, batch=coils, backend="torch", normal="direct")
    top = nufft.plan(
        traj, (n, n), eps=a.eps, batch=coils, backend="torch", normal="toeplitz",
        method=op.info.method, oversampling=op.info.oversampling,
    )  # fmt: skip
    print(op, flush=True)
    x = torch.randn(coils, n, n, dtype=torch.complex64)
    best = {"fwd+adj": np.inf, "toeplitz": np.inf}
    for _ in range(a.reps):
        t = time.perf_counter()
        u = op.H(op(x))
        best["fwd+adj"] = min(best["fwd+adj"], time.perf_counter() - t)
        t = time.perf_counter()
        v = top.normal(x)
        best["toeplitz"] = min(best["toeplitz"], time.perf_counter() - t)
    diff = float((u - v).norm() / u.norm())
    print(
        f"fwd+adj {best['fwd+adj']:.3f} s, toeplitz {best['toeplitz']:.3f} s, "
        f"ratio {best['fwd+adj'] / best['toeplitz']:.2f}, rel. diff {diff:.1e}"
    )


def build(a: argparse.Namespace) -> None:
    traj = nufft.radial_3d(1024, 1024)
    p = pl.Problem((128,) * 3, traj.shape[0], 1, a.eps, torch.complex64, 1, torch.device("cpu"))
    c = pl.native_candidate(p, "sparse", a.sigma)
    t = time.perf_counter()
    eng = NativeEngine(traj, (128,) * 3, c.grid, c.kernel, torch.complex64, method="sparse")
    dt = time.perf_counter() - t
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    print(
        f"{c.label()} W={c.width} grid={c.grid}: build {dt:.2f} s, peak RSS {hwm:.0f} MB, "
        f"operator {eng.memory_bytes() / 2**20:.0f} MiB"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["engines", "toeplitz", "build"])
    p.add_argument("--eps", type=float, default=1e-3)
    p.add_argument("--sigma", type=float, default=1.5)
    p.add_argument("--coils", type=int, default=1)
    p.add_argument("--impl", default="finufft:1.25:single,gather,sparse")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--errors", action="store_true", help="also measure errors (engines)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    {"engines": engines, "toeplitz": toeplitz, "build": build}[a.what](a)


if __name__ == "__main__":
    main()
