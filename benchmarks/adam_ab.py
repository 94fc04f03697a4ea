"""Interleaved A/B of ``fit.adam`` on the MOLLI problem of ``fit_relaxometry.py``, in CPU time.

Each run is a fresh subprocess that imports qmrkit from one checkout's ``src``, builds the same
MOLLI T1 problem as ``benchmarks/fit_relaxometry.py`` (128×128 = 16,384 voxels, 8 TIs, SNR 50,
Rician noise, seed 0), warms up on 4 voxels, then times one
``fit.adam(model, series, loss=..., progress=False)`` call ``--calls`` times (default 2: the
first full-size call, then a warm one, as ``fit_relaxometry.py``'s best of 2) with
``time.process_time`` (CPU time of the process: robust to other processes loading the cores,
though not to their sharing caches and memory bandwidth) and one torch thread. Runs alternate
between the versions (A, B, A, B, …) so that slow drifts in machine load hit both alike.

Reported per run: CPU s, wall s, iterations, final loss (minimum of ``loss_history``), the loss
of the returned maps evaluated independently in float64 (``maps_loss``: with frozen voxels the
history counts each at its best iterate, so this is the like-for-like figure), median and
95th-percentile relative T1 error against the simulated truth (``fit_relaxometry.errors``).

Usage::

    python benchmarks/adam_ab.py --base /path/to/old/checkout/src [--new src] [--runs 5]
        [--losses l2,l1] [--out adam_ab]

``--base`` is typically a detached ``git worktree add /tmp/base b4310c4`` (the code when issue 17
was filed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
import numpy as np
import torch
torch.set_num_threads(1)
from qmrkit import fit, models
from qmrkit.sim import MOLLI_TI, add_noise
ti = np.asarray(MOLLI_TI)
n = 128 * 128
# the MOLLI problem of benchmarks/fit_relaxometry.py (molli_data, seed 0)
rng = np.random.default_rng(0)
t1 = rng.uniform(300, 2000, n)
ratio = rng.uniform(0.8, 0.9, n)
a = 1000.0 * ratio
b = a * (1 + 1 / ratio)
clean = a[:, None] - b[:, None] * np.exp(-ti / (ratio * t1)[:, None])
series = add_noise(clean, 1000.0 / 50.0, kind="rician", seed=1).reshape(128, 128, -1)
truth = t1.reshape(128, 128)
model = models.MolliT1(ti)
fit.adam(model, series[:2, :2], loss={loss!r}, max_iter=30, progress=False)  # warm-up
calls = []
for _ in range({calls}):
    c0, w0 = time.process_time(), time.perf_counter()
    res = fit.adam(model, series, loss={loss!r}, progress=False)
    calls.append((time.process_time() - c0, time.perf_counter() - w0))
cpu, wall = min(calls)
# the loss of the returned maps, evaluated independently in float64 (both versions alike)
pd = {{par.name: torch.as_tensor(np.asarray(res[par.name]), dtype=torch.float64).reshape(-1, 1)
      for par in model.parameters}}
r = (model.forward(pd).numpy() - series.reshape(n, -1)) / res.settings["data_scale"]
maps_loss = float(np.mean(r * r)) if {loss!r} == "l2" else float(np.mean(np.abs(r)))
est = res["T1"].double().numpy()
e = np.abs(est - truth) / truth
e = np.where(np.isfinite(e), e, np.inf)
print(json.dumps({{
    "cpu_s": cpu, "wall_s": wall, "cpu_s_first": calls[0][0], "cpu_s_calls": [c for c, _ in calls], "iterations": int(res.iterations if np.isscalar(res.iterations)
    else np.max(np.asarray(res.iterations))),
    "final_loss": min(res.loss_history), "last_loss": res.loss_history[-1],
    "maps_loss": maps_loss, "n_frozen": res.settings.get("n_frozen", 0),
    "t1_err_median_pct": 100 * float(np.median(e)),
    "t1_err_p95_pct": 100 * float(np.percentile(e, 95)),
    "stop_reason": res.settings.get("stop_reason"),
}}))
"""


def run_once(src: str, loss: str, calls: int) -> dict:
    env = dict(os.environ, PYTHONPATH=src, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-c", CHILD.format(loss=loss, calls=calls)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row["loadavg"] = (
        Path("/proc/loadavg").read_text().split()[:3] if os.path.exists("/proc/loadavg") else None
    )
    return row


def summarize(rows: list[dict]) -> dict:
    cpu = [r["cpu_s"] for r in rows]
    return {
        "cpu_s_median": statistics.median(cpu),
        "cpu_s_first_call_median": statistics.median(r["cpu_s_first"] for r in rows),
        "cpu_s_min": min(cpu),
        "cpu_s_max": max(cpu),
        "wall_s_median": statistics.median(r["wall_s"] for r in rows),
        "iterations": sorted({r["iterations"] for r in rows}),
        "final_loss": sorted({r["final_loss"] for r in rows}),
        "maps_loss": sorted({r["maps_loss"] for r in rows}),
        "n_frozen": sorted({r["n_frozen"] for r in rows}),
        "t1_err_median_pct": rows[0]["t1_err_median_pct"],
        "t1_err_p95_pct": rows[0]["t1_err_p95_pct"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", required=True, help="src folder of the baseline checkout")
    ap.add_argument("--new", default=str(ROOT / "src"), help="src folder of the new code")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--losses", default="l2,l1")
    ap.add_argument(
        "--calls", type=int, default=2, help="timed full-size calls per process (best is kept)"
    )
    ap.add_argument("--out", default="adam_ab")
    args = ap.parse_args()
    payload: dict = {"base_src": args.base, "new_src": args.new, "threads": 1, "results": {}}
    for loss in args.losses.split(","):
        runs: dict[str, list[dict]] = {"base": [], "new": []}
        for i in range(args.runs):
            for name, src in (("base", args.base), ("new", args.new)):
                row = run_once(src, loss, args.calls)
                runs[name].append(row)
                print(
                    f"{loss} {name} run {i}: cpu {row['cpu_s']:.3f} s (first call "
                    f"{row['cpu_s_first']:.3f} s), wall {row['wall_s']:.3f} s,"
                    f" it {row['iterations']}, loss {row['final_loss']:.8e}, maps loss "
                    f"{row['maps_loss']:.9e}, T1 err "
                    f"{row['t1_err_median_pct']:.3f}/{row['t1_err_p95_pct']:.3f} %, "
                    f"load {row['loadavg']}",
                    flush=True,
                )
        s = {k: summarize(v) for k, v in runs.items()}
        s["speedup_cpu_median"] = s["base"]["cpu_s_median"] / s["new"]["cpu_s_median"]
        s["speedup_cpu_first_call_median"] = (
            s["base"]["cpu_s_first_call_median"] / s["new"]["cpu_s_first_call_median"]
        )
        print(
            f"{loss}: speed-up (median CPU, best of {args.calls} calls) "
            f"{s['speedup_cpu_median']:.2f}×, first call {s['speedup_cpu_first_call_median']:.2f}×",
            flush=True,
        )
        payload["results"][loss] = {"summary": s, "runs": runs}
    print(write_results(args.out, payload))


if __name__ == "__main__":
    main()
