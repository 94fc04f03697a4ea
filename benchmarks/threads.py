"""Thread policy under contention: a 2D CG-SENSE solve alone and next to one busy process,
with qmrkit's policy (``qmrkit._threads.configure_process``: OMP_WAIT_POLICY=PASSIVE, threads =
CPUs available) and without it (the environment as given, torch's defaults).

Every case runs in a fresh process, because OpenMP reads its wait policy when torch is imported.
The competitor is one Python process spinning on a core. Writes benchmarks/results/threads.json;
the slowdown (median with competitor / median alone) should be <= 2 with the policy.

    PYTHONPATH=src python benchmarks/threads.py [--reps 7] [--size 192] [--coils 8] [--iters 20]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _common import RESULTS

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import os, sys, time, json
if {policy}:
    from qmrkit._threads import configure_process
    configure_process()
import torch
n, C, iters, reps = {size}, {coils}, {iters}, {reps}
g = torch.Generator().manual_seed(0)
maps = torch.randn(C, n, n, dtype=torch.complex64, generator=g)
maps = maps / maps.abs().pow(2).sum(0).sqrt()
mask = (torch.rand(n, n, generator=g) < 0.4).to(torch.complex64)
truth = torch.randn(n, n, dtype=torch.complex64, generator=g)

def A(x):  # coil images -> undersampled k-space (orthonormal FFT)
    return mask * torch.fft.fft2(maps * x, norm="ortho")

def AH(y):
    return (maps.conj() * torch.fft.ifft2(mask * y, norm="ortho")).sum(0)

def solve(b, lam=1e-3):  # CG on (A^H A + lam I) x = A^H b: the 2D CG-SENSE solve
    x = torch.zeros_like(truth); r = AH(b) - 0; p = r.clone(); rr = (r.conj() * r).sum().real
    for _ in range(iters):
        q = AH(A(p)) + lam * p
        a = rr / (p.conj() * q).sum().real
        x = x + a * p; r = r - a * q
        rr_new = (r.conj() * r).sum().real
        p = r + (rr_new / rr) * p; rr = rr_new
    return x

b = A(truth)
solve(b)  # warm-up
times = []
for _ in range(reps):
    t = time.perf_counter(); solve(b); times.append(time.perf_counter() - t)
print(json.dumps({{"times": times, "threads": torch.get_num_threads(),
                  "wait_policy": os.environ.get("OMP_WAIT_POLICY")}}))
"""


def run_case(policy: bool, competitor: bool, opts: argparse.Namespace) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    env["PYTHONPATH"] = str(ROOT / "src")
    code = CHILD.format(
        policy=policy, size=opts.size, coils=opts.coils, iters=opts.iters, reps=opts.reps
    )
    busy = None
    if competitor:
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    res = json.loads(out.stdout.strip().splitlines()[-1])
    t = sorted(res["times"])
    res.update(median_s=t[len(t) // 2], best_s=t[0])
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--size", type=int, default=192)
    ap.add_argument("--coils", type=int, default=8)
    ap.add_argument("--iters", type=int, default=20)
    opts = ap.parse_args()
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    rows = {}
    for policy in (True, False):
        name = "policy" if policy else "no_policy"
        quiet = run_case(policy, False, opts)
        busy = run_case(policy, True, opts)
        rows[name] = {
            "alone": quiet,
            "with_one_busy_process": busy,
            "slowdown_median": busy["median_s"] / quiet["median_s"],
        }
        print(
            f"{name:>9}: alone {quiet['median_s']:.3f} s, with a busy process "
            f"{busy['median_s']:.3f} s -> slowdown {rows[name]['slowdown_median']:.2f}x "
            f"(threads {quiet['threads']}, OMP_WAIT_POLICY={quiet['wait_policy']})"
        )
    result = {
        "benchmark": "2D CG-SENSE solve alone vs next to one busy process",
        "problem": {"size": opts.size, "coils": opts.coils, "cg_iters": opts.iters},
        "reps": opts.reps,
        "cpus": os.cpu_count(),
        "loadavg_before": load_before,
        "loadavg_after": Path("/proc/loadavg").read_text().split()[:3],
        "target": "slowdown <= 2x with the policy",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        **rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "threads.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {RESULTS / 'threads.json'}")


if __name__ == "__main__":
    main()
