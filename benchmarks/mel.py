"""Memory-efficient learning benchmark: peak memory and time per training step versus unrolls.

For each case (2D multi-coil, small 3D slab), memory mode (standard, checkpoint, reversible,
hybrid) and number of unrolls (1, 5, 10, 20), one training step (forward, L2 loss, backward, Adam)
is measured in a fresh subprocess:

* ``step_mb`` (the memory figure used for the ratios): the working memory of a training step in
  the steady state. After one warm-up step (which performs one-time initialisation: library
  workspaces and thread pools, FFT plans, Adam's moment buffers), freed heap memory is returned
  to the OS (``malloc_trim(0)``), the resident set size is recorded as the baseline, the kernel's
  peak-RSS counter is reset (``/proc/self/clear_refs`` ← 5) and the timed steps run; ``step_mb``
  is the peak RSS (``VmHWM``) during the timed steps minus that baseline. The baseline holds
  everything that persists between steps (model, optimiser state, data, operator, caches). On
  CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` minus the memory
  allocated before the timed steps.
* ``first_mb`` (reported, not used for ratios): peak RSS of the warm-up step minus the RSS just
  before it (model, data and operator built), i.e. including one-time initialisation; this was
  the only figure of the first version of this benchmark.
* time: median over ``--steps`` timed steps after the warm-up step.

Allocator: with glibc's default (dynamic) mmap threshold, large freed tensors stay in the heap
and fragment it, so RSS exceeds the bytes of live tensors by an amount that depends on the
allocation pattern (for ``standard`` about 30 MB instead of 17 MB per unroll in the ``modl``
case). ``--mmap-threshold BYTES`` sets ``MALLOC_MMAP_THRESHOLD_`` in the workers (every mode
alike): blocks above it are mapped and unmapped individually, so RSS follows the live tensors,
at the cost of page faults on every large allocation (slower steps; quote times from runs
without it). The value used is stored in the JSON ``meta``.

Usage::

    flock /tmp/qmrkit-bench.lock python benchmarks/mel.py            # full table
    python benchmarks/mel.py --cases modl --mmap-threshold 1048576   # memory tracking tensors
    python benchmarks/mel.py --quick                                 # 1, 5 unrolls, 2D only

Writes ``benchmarks/results/mel.json`` and prints a table with ratios against ``standard``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CASES = {
    # name: image shape, coils, denoiser channels/layers, acceleration
    "2d": dict(shape=(96, 96), coils=8, ndim=2, channels=16, layers=5, accel=4),
    "3d": dict(shape=(8, 48, 48), coils=4, ndim=3, channels=8, layers=5, accel=4),
    # MoDL-like: 5 convolutions x 64 channels on a 128x128 image, where one unroll's
    # activations (4 stored 64-channel maps, ~17 MB) dominate the per-step constant
    "modl": dict(shape=(128, 128), coils=8, ndim=2, channels=64, layers=5, accel=4),
}
MODES = ("standard", "checkpoint", "reversible", "hybrid")


def _status_mb(field: str) -> float:
    """``VmRSS``/``VmHWM`` of this process from ``/proc/self/status`` in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _trim_heap() -> None:
    """Return freed heap memory to the OS (glibc), so that the baseline is what persists."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


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
    denoiser: str = "residual",
) -> dict:
    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, str(HERE.parent / "src"))
    from qmrkit.learn import CouplingCNN, ResidualCNN, UnrolledNet
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
    if denoiser == "coupling":
        # three couplings of 3 convolutions: as many full-width (channels x channels)
        # convolutions as the 5-layer ResidualCNN (the 2->C and C->2 ones are cheap)
        den = CouplingCNN(cfg["ndim"], channels=cfg["channels"], layers=3, couplings=3)
    else:
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

    times = []
    fallbacks = 0
    drift = 0.0

    def run(i):
        nonlocal fallbacks, drift
        t0 = time.perf_counter()
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i > 0:
            times.append(time.perf_counter() - t0)
        fallbacks += net.last_backward.get("fallbacks", 0)
        drift = max(drift, net.last_backward.get("max_drift", 0.0))

    # warm-up step: includes one-time initialisation
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base0 = torch.cuda.memory_allocated() / 2**20
        run(0)
        first = torch.cuda.max_memory_allocated() / 2**20 - base0
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base0 = _status_mb("VmRSS")
        _reset_peak_rss()
        run(0)
        first = _status_mb("VmHWM") - base0
        _trim_heap()
        base = _status_mb("VmRSS")
        _reset_peak_rss()
    for i in range(1, steps + 1):
        run(i)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20 - base
    else:
        peak = _status_mb("VmHWM") - base
    times.sort()
    return dict(
        case=case,
        denoiser=denoiser,
        mode=mode,
        n_unrolls=n,
        device=device,
        peak_mb=peak,
        first_mb=first,
        step_s=times[len(times) // 2],
        fallbacks=fallbacks,
        max_drift=drift,
        baseline_mb=base,
        start_mb=base0,
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
    ap.add_argument(
        "--denoiser",
        default="residual",
        choices=("residual", "coupling"),
        help="ResidualCNN (spectral norm, fixed-point inversion) or CouplingCNN (exact inverse)",
    )
    ap.add_argument(
        "--mmap-threshold",
        type=int,
        default=None,
        help="set MALLOC_MMAP_THRESHOLD_ (bytes) in the workers (default: glibc's dynamic one)",
    )
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
                    args.denoiser,
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
                    "--denoiser",
                    args.denoiser,
                ]
                if args.drift_tol is not None:
                    cmd += ["--drift-tol", str(args.drift_tol)]
                env = dict(os.environ)
                if args.mmap_threshold is not None:
                    env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
                p = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if p.returncode != 0:
                    print(p.stderr[-2000:], file=sys.stderr)
                    raise SystemExit(f"worker {case} {mode} {n} failed")
                r = json.loads(p.stdout.strip().splitlines()[-1])
                rows.append(r)
                print(
                    f"{case} {mode:10s} N={n:2d}: {r['peak_mb']:8.1f} MB (first step "
                    f"{r['first_mb']:.1f})  {r['step_s']:7.3f} s"
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
        "step MB",
        "first-step MB",
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
            f"{r['first_mb']:.1f} | {r['step_s']:.3f} | {f(r['mem_reduction_vs_standard'], '.2f')}× | "
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
        denoiser=args.denoiser,
        mmap_threshold=args.mmap_threshold,
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
