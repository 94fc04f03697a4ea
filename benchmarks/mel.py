"""Memory-efficient learning benchmark: peak memory and time per training step versus unrolls.

For each case (2D multi-coil, small 3D slab), memory mode (standard, checkpoint, reversible,
hybrid) and number of unrolls (1, 5, 10, 20), one training step (forward, L2 loss, backward, Adam)
is measured in a fresh subprocess:

* memory: on CPU the peak resident set size (``resource.getrusage(...).ru_maxrss``) after the
  steps minus the resident set size of the same process just before the first step (model, data
  and operator already built); on CUDA ``torch.cuda.max_memory_allocated`` minus the memory
  allocated before the step;
* time: median over ``--steps`` timed steps after one warm-up step.

Usage::

    flock /tmp/qmrkit-bench.lock python benchmarks/mel.py            # full table
    python benchmarks/mel.py --quick                                 # 1, 5 unrolls, 2D only

Writes ``benchmarks/results/mel.json`` and prints a table with ratios against ``standard``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CASES = {
    # name: image shape, coils, denoiser channels/layers, acceleration
    "2d": dict(shape=(96, 96), coils=8, ndim=2, channels=16, layers=5, accel=4),
    "3d": dict(shape=(8, 48, 48), coils=4, ndim=3, channels=8, layers=5, accel=4),
}
MODES = ("standard", "checkpoint", "reversible", "hybrid")


def _rss_now_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(
    case: str,
    mode: str,
    n: int,
    steps: int,
    device: str,
    threads: int,
    lam: float,
    cg_iter: int,
    cg_tol: float,
    every: int,
    drift_tol: float | None,
) -> dict:
    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, str(HERE.parent / "src"))
    from qmrkit.learn import ResidualCNN, UnrolledNet
    from qmrkit.learn.data import SyntheticDataset, sample_operator

    cfg = CASES[case]
    dev = torch.device(device)
    kind = "2d" if cfg["ndim"] == 2 else "3d"
    ds = SyntheticDataset(
        1,
        cfg["shape"],
        n_coils=cfg["coils"],
        acceleration=cfg["accel"],
        noise=0.01,
        kind=kind,
        seed=0,
    )
    s = {k: v.to(dev) for k, v in ds[0].items()}
    A = sample_operator(s)
    torch.manual_seed(0)
    den = ResidualCNN(
        cfg["ndim"], channels=cfg["channels"], layers=cfg["layers"], spectral_norm=True
    )
    net = UnrolledNet(
        n,
        den,
        memory=mode,
        lam=lam,
        cg_tol=cg_tol,
        cg_max_iter=cg_iter,
        checkpoint_every=min(every, n),
        drift_tol=drift_tol,
    ).to(dev)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        x = net(s["y"], A)
        loss = (x - s["target"]).abs().pow(2).mean()
        loss.backward()
        opt.step()
        return float(loss.detach())

    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = _rss_now_mb()
    times = []
    fallbacks = 0
    drift = 0.0
    for i in range(steps + 1):
        t0 = time.perf_counter()
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i > 0:
            times.append(time.perf_counter() - t0)
        fallbacks += net.last_backward.get("fallbacks", 0)
        drift = max(drift, net.last_backward.get("max_drift", 0.0))
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20 - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    times.sort()
    return dict(
        case=case,
        mode=mode,
        n_unrolls=n,
        device=device,
        peak_mb=peak,
        step_s=times[len(times) // 2],
        fallbacks=fallbacks,
        max_drift=drift,
        baseline_mb=base,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--unrolls", nargs="+", type=int, default=[1, 5, 10, 20])
    ap.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lam", type=float, default=0.05, help="initial CG weight λ")
    ap.add_argument("--cg-iter", type=int, default=30, help="inner CG iteration cap")
    ap.add_argument("--cg-tol", type=float, default=1e-6, help="inner CG tolerance")
    ap.add_argument(
        "--drift-tol",
        type=float,
        default=None,
        help="accepted relative drift of recovered states (default: UnrolledNet's)",
    )
    ap.add_argument("--every", type=int, default=5, help="hybrid checkpoint interval K")
    ap.add_argument("--quick", action="store_true", help="2D only, 1 and 5 unrolls")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "mel.json")
    ap.add_argument("--worker", nargs=3, metavar=("CASE", "MODE", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        case, mode, n = args.worker
        print(
            json.dumps(
                worker(
                    case,
                    mode,
                    int(n),
                    args.steps,
                    args.device,
                    args.threads,
                    args.lam,
                    args.cg_iter,
                    args.cg_tol,
                    args.every,
                    args.drift_tol,
                )
            )
        )
        return
    if args.quick:
        args.cases, args.unrolls = ["2d"], [1, 5]
    rows = []
    for case in args.cases:
        for n in args.unrolls:
            for mode in args.modes:
                cmd = [
                    sys.executable,
                    __file__,
                    "--worker",
                    case,
                    mode,
                    str(n),
                    "--steps",
                    str(args.steps),
                    "--device",
                    args.device,
                    "--threads",
                    str(args.threads),
                    "--lam",
                    str(args.lam),
                    "--cg-iter",
                    str(args.cg_iter),
                    "--cg-tol",
                    str(args.cg_tol),
                    "--every",
                    str(args.every),
                ]
                if args.drift_tol is not None:
                    cmd += ["--drift-tol", str(args.drift_tol)]
                p = subprocess.run(cmd, capture_output=True, text=True)
                if p.returncode != 0:
                    print(p.stderr[-2000:], file=sys.stderr)
                    raise SystemExit(f"worker {case} {mode} {n} failed")
                r = json.loads(p.stdout.strip().splitlines()[-1])
                rows.append(r)
                print(
                    f"{case} {mode:10s} N={n:2d}: {r['peak_mb']:8.1f} MB  {r['step_s']:7.3f} s"
                    f"  fallbacks={r['fallbacks']}",
                    file=sys.stderr,
                    flush=True,
                )
    # ratios
    ref = {(r["case"], r["n_unrolls"]): r for r in rows if r["mode"] == "standard"}
    one = {r["case"]: r for r in rows if r["mode"] == "standard" and r["n_unrolls"] == 1}
    for r in rows:
        st = ref.get((r["case"], r["n_unrolls"]))
        r["mem_reduction_vs_standard"] = (
            st["peak_mb"] / r["peak_mb"] if st and r["peak_mb"] > 0 else None
        )
        r["time_vs_standard"] = r["step_s"] / st["step_s"] if st else None
        o = one.get(r["case"])
        r["peak_vs_single_unroll"] = r["peak_mb"] / o["peak_mb"] if o and o["peak_mb"] > 0 else None
    hdr = (
        "case",
        "mode",
        "N",
        "peak MB",
        "step s",
        "mem reduction",
        "time ratio",
        "peak/1-unroll",
        "fallbacks",
    )
    lines = ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]

    def f(v, fmt):
        return "–" if v is None else format(v, fmt)

    for r in rows:
        lines.append(
            f"| {r['case']} | {r['mode']} | {r['n_unrolls']} | {r['peak_mb']:.1f} | "
            f"{r['step_s']:.3f} | {f(r['mem_reduction_vs_standard'], '.2f')}× | "
            f"{f(r['time_vs_standard'], '.2f')}× | {f(r['peak_vs_single_unroll'], '.2f')}× | "
            f"{r['fallbacks']} |"
        )
    table = "\n".join(lines)
    print(table)
    import torch

    meta = dict(
        lam=args.lam,
        drift_tol=args.drift_tol,
        cg_iter=args.cg_iter,
        cg_tol=args.cg_tol,
        every=args.every,
        python=platform.python_version(),
        torch=torch.__version__,
        machine=platform.machine(),
        cpus=os.cpu_count(),
        threads=args.threads,
        device=args.device,
        steps=args.steps,
        cases=CASES,
        load_avg=os.getloadavg(),
        date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"meta": meta, "rows": rows, "table": table}, indent=2, default=str)
    )
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
