"""``qmrkit batch``: subjects/hour in-process and on 1 and 2 Dask workers, and a sizing model.

Builds a synthetic BIDS study (``qmrkit.sim.bids_dataset``: MOLLI, half the subjects as 4D
series, half as ``inv-`` file collections), then times

* ``bare``: ``qmrkit fit`` on each subject's series in one process, nothing else (the floor);
* ``inprocess``: ``qmrkit batch --scheduler inprocess`` (the same fits plus BIDS indexing,
  stacking of collections, renaming into the derivatives tree, records);
* ``dask-1``, ``dask-2``: ``qmrkit batch`` on a LocalCluster of 1 and 2 worker processes (one
  torch thread each), counting the cluster start and the workers' first imports.

Every configuration writes a fresh derivatives folder. The sizing model for a study of
``--study`` subjects uses the measured per-subject cost on one worker (job seconds on the worker)
and the measured parallel efficiency of 2 workers::

    workers = ceil(N · c / (η · (T − s0)))

with N subjects, c seconds per subject per worker, η the efficiency (speed-up / workers), T the
deadline and s0 the start-up (cluster start + first imports). Run:

    PYTHONPATH=src python benchmarks/batch.py --subjects 6 --shape 64 64
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import table, write_results  # noqa: E402


def _bare(root: Path, out: Path) -> float:
    """``qmrkit fit`` per subject in this process (collections stacked beforehand, untimed)."""
    from qmrkit.dist.batch import _stack, run_fit
    from qmrkit.io.bids import BidsDataset, find_inputs

    items = find_inputs(BidsDataset(root), "molli")
    prepared = []
    for it in items:
        data = it.files[0]
        if len(it.files) > 1:
            data = out / f"{it.label}_series.nii.gz"
            _stack(it.files, data)
        ti = ",".join(repr(float(t)) for t in it.settings["ti"])
        prepared.append(["molli", "--data", str(data), "--ti", ti, "--no-figure", "--quiet"])
    t0 = time.perf_counter()
    for argv, it in zip(prepared, items, strict=True):
        run_fit([*argv, "--out", str(out / it.label)])
    return time.perf_counter() - t0


def _batch(root: Path, out: Path, scheduler: str, workers: int) -> dict:
    from qmrkit.dist import run_batch

    t0 = time.perf_counter()
    rep = run_batch(root, "molli", out=out, scheduler=scheduler, workers=workers, progress=False)
    wall = time.perf_counter() - t0
    assert not rep.failed, rep.table()
    jobs = [r.seconds for r in rep.records]
    solver = [r.fit_summary.get("ElapsedSeconds", float("nan")) for r in rep.records]
    return {"wall_s": wall, "job_s": jobs, "solver_s": solver}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--subjects", type=int, default=6)
    ap.add_argument("--shape", type=int, nargs=2, default=(64, 64))
    ap.add_argument("--study", type=int, default=1000, help="subjects of the sized study")
    ap.add_argument("--deadlines-h", type=float, nargs="+", default=(1.0, 8.0, 24.0))
    ap.add_argument("--name", default="batch")
    args = ap.parse_args()

    from qmrkit.sim.bids import bids_dataset

    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="qmrkit-batch-bench-"))
    try:
        root = tmp / "study"
        bids_dataset(root, n_subjects=args.subjects, shape=tuple(args.shape))
        n_inputs = args.subjects + 1  # the last subject has two sessions
        (tmp / "bare").mkdir()
        _bare(root, tmp / "warm")  # one warm-up pass: torch's first-call costs out of the floor
        rows = [{"config": "bare", "wall_s": _bare(root, tmp / "bare")}]
        for sched, w in (("inprocess", 1), ("local", 1), ("local", 2)):
            name = "inprocess" if sched == "inprocess" else f"dask-{w}"
            r = _batch(root, tmp / name, sched, w)
            rows.append({"config": name, **r})
        load_after = os.getloadavg()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    bare = rows[0]["wall_s"]
    for r in rows:
        r["inputs"] = n_inputs
        r["subjects_per_hour"] = n_inputs / r["wall_s"] * 3600
        r["overhead_vs_bare"] = r["wall_s"] / bare
        if "job_s" in r:
            r["mean_job_s"] = sum(r["job_s"]) / n_inputs
            r["median_solver_s"] = sorted(r["solver_s"])[n_inputs // 2]
    d1 = next(r for r in rows if r["config"] == "dask-1")
    d2 = next(r for r in rows if r["config"] == "dask-2")
    # per-subject cost on a worker: the median job (the first one on each worker includes
    # importing torch and qmrkit, which belongs to the start-up s0)
    c = sorted(d1["job_s"])[n_inputs // 2]
    s0 = max(0.0, d1["wall_s"] - c * n_inputs)  # cluster start + first imports + scheduling
    speedup = d1["wall_s"] / d2["wall_s"]
    eff = min(1.0, speedup / 2)
    sizing = []
    for hours in args.deadlines_h:
        t = hours * 3600
        need = math.ceil(args.study * c / (eff * (t - s0))) if t > s0 else None
        ideal = math.ceil(args.study * c / (t - s0)) if t > s0 else None
        # eta = 1: workers that do not share cores (one core each, e.g. Kubernetes pods with a
        # CPU request of 1); the measured eta holds for workers packed on this machine's cores
        sizing.append({"deadline_h": hours, "workers": need, "workers_if_eta_1": ideal})
    model = {
        "study_subjects": args.study,
        "c_s_per_subject_per_worker": c,
        "s0_startup_s": s0,
        "speedup_2_workers": speedup,
        "efficiency_2_workers": eff,
        "formula": "workers = ceil(N * c / (eta * (T - s0)))",
        "sizing": sizing,
    }
    cols = [
        ("config", "configuration", ""),
        ("wall_s", "wall s", ".1f"),
        ("subjects_per_hour", "subjects/hour", ",.0f"),
        ("overhead_vs_bare", "× bare qmrkit fit loop", ".2f"),
        ("mean_job_s", "mean job s (on worker)", ".2f"),
    ]
    print(table(rows, cols))
    print(json.dumps(model, indent=2))
    print(f"load average before {load_before}, after {load_after}")
    path = write_results(
        args.name,
        {
            "subjects": args.subjects,
            "inputs": n_inputs,
            "shape": list(args.shape),
            "voxels_per_input": args.shape[0] * args.shape[1],
            "rows": rows,
            "model": model,
            "loadavg_before": load_before,
            "loadavg_after": load_after,
            "cpu_count": os.cpu_count(),
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
