"""``qmrkit fit molli`` on a 128² series (8 TIs), process start to process exit, as a user runs it.

Each run is a fresh process calling the console script's function (``qmrkit.cli:entry``; with
``--function main``, ``sys.exit(main())`` as before issue 17 item 3) with ``--timings``. Recorded
per run: wall time from ``fork`` to the process's exit (every file written), the CPU time of the
process and its children (the figure worker), the per-stage ``Timings`` from ``fit.json``, the
files written and the load average before the run. Anchor, measured right before each run in
the same way: ``python -c "import torch"`` (process start to exit), the floor no torch-based
command can go below; the CLI's time above it is what qmrkit itself costs. Writes
benchmarks/results/cli_fit.json.

    PYTHONPATH=src python benchmarks/cli_fit.py [--runs 3] [--function entry|main] [--threads 2]

The series is ``fit_relaxometry.molli_data(16384)`` (the relaxometry benchmark's phantom), saved
once as ``/tmp/cli_molli128.nii.gz``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import RESULTS

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(tempfile.gettempdir()) / "cli_molli128.nii.gz"
TI = "100,180,260,1000,1080,1900,2000,2800"


def make_data() -> Path:
    if not DATA.exists():
        import nibabel as nib
        import numpy as np

        from fit_relaxometry import molli_data

        d, _ = molli_data(16384)
        img = nib.Nifti1Image(d.reshape(128, 128, 1, -1).astype(np.float32), np.eye(4))
        nib.save(img, str(DATA))
    return DATA


def run_once(function: str, threads: int, out: Path) -> dict:
    argv = ["qmrkit", "fit", "molli", "--data", str(DATA), "--ti", TI, "--out", str(out)]
    argv += ["--timings", "--threads", str(threads)]
    code = f"import sys; from qmrkit.cli import {function} as f; sys.argv = {argv!r}; "
    code += "sys.exit(f())" if function == "main" else "f()"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"qmrkit fit failed ({done.returncode}): {done.stderr[-2000:]}")
    timings = json.loads((out / "fit.json").read_text())["Timings"]
    return {
        "wall_s": round(wall, 3),
        "cpu_s": round((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), 3),
        "timings": timings,
        "files": len(list(out.iterdir())),
        "load_before": round(load, 2),
    }


def torch_floor() -> float:
    """Wall time of a process that only imports torch and exits (the anchor)."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], check=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--function", choices=("entry", "main"), default="entry")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--output", default=str(RESULTS / "cli_fit.json"))
    args = ap.parse_args()
    make_data()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            floor = torch_floor()
            r = run_once(args.function, args.threads, Path(tmp) / f"run{i}")
            r["import_torch_process_s"] = round(floor, 3)
            r["above_torch_s"] = round(r["wall_s"] - floor, 3)
            runs.append(r)
            stages = ", ".join(f"{k[:-2]} {v:.2f}" for k, v in r["timings"].items())
            print(
                f"run {i}: wall {r['wall_s']:.2f} s (python -c 'import torch': {floor:.2f} s, "
                f"above it {r['above_torch_s']:.2f} s), cpu {r['cpu_s']:.2f} s, load "
                f"{r['load_before']:.2f}, {r['files']} files; {stages}"
            )
    walls = sorted(r["wall_s"] for r in runs)
    record = {
        "command": "qmrkit fit molli, 128x128x1 series, 8 TIs, --timings",
        "function": args.function,
        "threads": args.threads,
        "cpus": os.cpu_count(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "median_wall_s": walls[len(walls) // 2],
        "median_import_torch_process_s": sorted(r["import_torch_process_s"] for r in runs)[
            len(runs) // 2
        ],
        "median_above_torch_s": sorted(r["above_torch_s"] for r in runs)[len(runs) // 2],
        "runs": runs,
    }
    Path(args.output).write_text(json.dumps(record, indent=2) + "\n")
    print(
        f"median wall {record['median_wall_s']:.2f} s, import-torch process "
        f"{record['median_import_torch_process_s']:.2f} s, above it "
        f"{record['median_above_torch_s']:.2f} s -> {args.output}"
    )


if __name__ == "__main__":
    main()
