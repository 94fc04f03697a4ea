"""``fit.adam`` on the three problems of ``fit_relaxometry.py`` (MOLLI, VFA, mono-exponential T2)
with L1 and L2 losses, one checkout against another: the loss of the returned maps and the
iteration count, to check that a change of the engine or of its rules holds beyond the MOLLI
benchmark of ``adam_ab.py``.

Each (checkout, problem, loss) runs in a fresh subprocess with one torch thread; the loss of the
returned maps is evaluated independently in float64 (``maps_loss``, as in ``adam_ab.py``); CPU
time (``time.process_time``) of the first call is reported for orientation only (use ``adam_ab.py``
for timings); with ``--repeats N`` each process runs the fit N times and also reports the fastest
warm call. ``--extra`` passes keyword arguments to the new checkout's ``fit.adam`` as a third
variant (e.g. ``"average_windows=False"``).

Usage::

    python benchmarks/adam_problems.py --base /path/to/old/src [--new src] [--n 4096]
        [--extra "average_windows=False"] [--repeats 5] [--out adam_problems]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time, warnings
import numpy as np
import torch
torch.set_num_threads(1)
sys.path.insert(0, {bench!r})
from fit_relaxometry import PROBLEMS
from qmrkit import fit
warnings.simplefilter("ignore")
spec = PROBLEMS[{problem!r}]
data, truth = spec["data"]({n})
model = spec["model"]()
cpus = []
for _ in range({repeats}):
    c0 = time.process_time()
    res = fit.adam(model, data, loss={loss!r}, progress=False, **{kwargs})
    cpus.append(time.process_time() - c0)
cpu = cpus[0]
pd = {{par.name: torch.as_tensor(np.asarray(res[par.name]), dtype=torch.float64).reshape(-1, 1)
      for par in model.parameters}}
r = (model.forward(pd).numpy() - data.reshape(data.shape[0], -1)) / res.settings["data_scale"]
maps_loss = float(np.mean(r * r)) if {loss!r} == "l2" else float(np.mean(np.abs(r)))
e = np.abs(res[spec["key"]].double().numpy().reshape(-1) - truth) / truth
print(json.dumps({{"cpu_s": cpu, "cpu_warm_min_s": min(cpus[1:] or cpus), "iterations": int(np.max(np.asarray(res.iterations))),
    "maps_loss": maps_loss, "err_median_pct": 100 * float(np.median(e)),
    "stop_reason": res.settings.get("stop_reason")}}))
"""


def run(src: str, problem: str, loss: str, n: int, kwargs: str, repeats: int = 1) -> dict:
    env = dict(os.environ, PYTHONPATH=src, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    code = CHILD.format(
        bench=str(Path(__file__).resolve().parent),
        problem=problem,
        loss=loss,
        n=n,
        repeats=repeats,
        kwargs="dict(" + kwargs + ")",
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", required=True, help="src folder of the baseline checkout")
    ap.add_argument("--new", default=str(ROOT / "src"))
    ap.add_argument("--n", type=int, default=4096, help="voxels per problem")
    ap.add_argument("--problems", default="molli,vfa,t2")
    ap.add_argument("--losses", default="l1,l2")
    ap.add_argument("--extra", default="", help="kwargs for a third variant of the new code")
    ap.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="calls per run in one process; cpu_warm_min_s is the fastest after the first",
    )
    ap.add_argument("--out", default="adam_problems")
    args = ap.parse_args()
    variants = [("base", args.base, ""), ("new", args.new, "")]
    if args.extra:
        variants.append(("new+" + args.extra, args.new, args.extra))
    payload: dict = {
        "base_src": args.base,
        "new_src": args.new,
        "n": args.n,
        "repeats": args.repeats,
        "results": {},
    }
    for problem in args.problems.split(","):
        for loss in args.losses.split(","):
            rows = {}
            for name, src, kw in variants:
                rows[name] = run(src, problem, loss, args.n, kw, args.repeats)
                r = rows[name]
                print(
                    f"{problem} {loss} {name}: maps loss {r['maps_loss']:.9e}, it "
                    f"{r['iterations']}, err {r['err_median_pct']:.3f} %, cpu {r['cpu_s']:.2f} s "
                    f"(warm min {r['cpu_warm_min_s']:.3f} s)",
                    flush=True,
                )
            rel = rows["new"]["maps_loss"] / rows["base"]["maps_loss"] - 1
            print(f"{problem} {loss}: new/base − 1 = {rel:+.2e}", flush=True)
            payload["results"][f"{problem}_{loss}"] = {"runs": rows, "maps_loss_rel_change": rel}
    print(write_results(args.out, payload))


if __name__ == "__main__":
    main()
