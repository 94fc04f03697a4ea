"""NUFFT benchmark: qmrkit (planned, torch-native) vs FINUFFT (default, best σ) vs torchkbnufft.

Run (from the repository root, under the shared benchmark lock so timings are not disturbed):

    flock /tmp/qmrkit-bench.lock env PYTHONPATH=src python benchmarks/nufft.py [--quick]

Cases: (i) 2D 256², 402 radial spokes × 512 samples, 32 coils; (ii) 3D 128³ radial (4096 × 256 ≈
1.05 M samples), 1 and 8 coils; ε = 1e-3 and 1e-6; complex64; all libraries on the same number of
threads (2 by default, ``--threads``). Times are the best of ``--reps`` runs (after a warm-up);
errors are relative ℓ2 against FINUFFT in complex128 at ε = 1e-10 on the first coil (forward on
a random subset of 20 000 samples, adjoint in full). Results: a table on stdout and
``benchmarks/results/nufft.json`` (``nufft-quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small subset (2D at 128², 3D at 64³)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--cases", default="2d,3d1,3d8", help="comma list of 2d, 3d1, 3d8")
    p.add_argument("--eps", default="1e-3,1e-6")
    p.add_argument("--no-tkbn", action="store_true", help="skip torchkbnufft")
    p.add_argument("--out", default=None)
    p.add_argument(
        "--markdown", default=None, metavar="JSON", help="print a markdown table of a results file"
    )
    p.add_argument(
        "--planning",
        action="store_true",
        help="plan-construction times (fresh processes) and the normal-operator choice on radial\n"
        "multi-coil CG-SENSE, measured; writes results/nufft-planning.json",
    )
    p.add_argument("--plan-worker", nargs=2, metavar=("CASE", "EPS"), help=argparse.SUPPRESS)
    return p.parse_args()


ARGS = _parse()
os.environ.setdefault("OMP_NUM_THREADS", str(ARGS.threads))
os.environ.setdefault("MKL_NUM_THREADS", str(ARGS.threads))
os.environ.setdefault("QMRKIT_WISDOM_DIR", tempfile.mkdtemp(prefix="qmrkit-bench-wisdom-"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(ROOT / "src"))
from qmrkit import nufft  # noqa: E402

torch.set_num_threads(ARGS.threads)
CPU = torch.device("cpu")


def best_time(fn, reps: int) -> float:
    """Best of ``reps`` runs after a warm-up; a warm-up over 5 s counts as the only run."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    if first > 5.0:
        return first
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def rel(a, b) -> float:
    a = np.asarray(a, dtype=np.complex128).ravel()
    b = np.asarray(b, dtype=np.complex128).ravel()
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# -- problems -------------------------------------------------------------------------------------
def make_case(name: str, quick: bool):
    if name == "2d":
        n = 128 if quick else 256
        traj = nufft.radial(201 if quick else 402, 2 * n)
        return {
            "name": f"2D {n}² radial {traj.shape[0]} samples, 32 coils",
            "im_size": (n, n),
            "traj": traj,
            "coils": 32,
            "key": "2d",
        }
    n = 64 if quick else 128
    spokes = 1024 if quick else 4096
    traj = nufft.radial_3d(spokes, 2 * n)
    coils = 1 if name == "3d1" else 8
    return {
        "name": f"3D {n}³ radial {traj.shape[0]} samples, {coils} coil(s)",
        "im_size": (n, n, n),
        "traj": traj,
        "coils": coils,
        "key": name,
    }


def finufft_plans(traj, im_size, eps, coils, dtype="complex64", upsampfac=None):
    import finufft

    real = np.float32 if dtype == "complex64" else np.float64
    pts = [
        np.ascontiguousarray(2 * math.pi * traj[:, i].numpy(), dtype=real)
        for i in range(traj.shape[1])
    ]
    opts = {"nthreads": ARGS.threads}
    if upsampfac is not None:
        opts["upsampfac"] = upsampfac
    p2 = finufft.Plan(2, im_size, n_trans=coils, eps=eps, isign=-1, dtype=dtype, **opts)
    p2.setpts(*pts)
    p1 = finufft.Plan(1, im_size, n_trans=coils, eps=eps, isign=1, dtype=dtype, **opts)
    p1.setpts(*pts)
    return p2, p1


def reference(case, x0: np.ndarray, y0: np.ndarray, subset: np.ndarray):
    """complex128 FINUFFT at ε = 1e-10 for coil 0: forward on ``subset``, adjoint in full."""
    import finufft

    traj = case["traj"].numpy()
    pts_sub = [2 * math.pi * traj[subset, i] for i in range(traj.shape[1])]
    pts = [2 * math.pi * traj[:, i] for i in range(traj.shape[1])]
    nd = traj.shape[1]
    x0 = x0.astype(np.complex128)
    y0 = y0.astype(np.complex128)
    f2 = {1: finufft.nufft1d2, 2: finufft.nufft2d2, 3: finufft.nufft3d2}[nd]
    f1 = {1: finufft.nufft1d1, 2: finufft.nufft2d1, 3: finufft.nufft3d1}[nd]
    yref = f2(*pts_sub, x0, eps=1e-10, isign=-1, nthreads=ARGS.threads)
    xref = f1(*pts, y0, case["im_size"], eps=1e-10, isign=1, nthreads=ARGS.threads)
    return yref, xref


def run_impl(label, fwd, adj, normal, x, y, reps, case, ref, subset, info="", coils_timed=None):
    tf = best_time(lambda: fwd(x), reps)
    ta = best_time(lambda: adj(y), reps)
    tn = best_time(lambda: normal(x), reps) if normal is not None else tf + ta
    yo = fwd(x)
    xo = adj(y)
    yo0 = np.asarray(yo[0] if yo.ndim > 1 else yo)
    xo0 = np.asarray(xo[0] if xo.ndim > len(case["im_size"]) else xo)
    row = {
        "case": case["name"],
        "key": case["key"],
        "impl": label,
        "fwd_s": tf,
        "adj_s": ta,
        "normal_s": tn,
        "normal_is_fwd_adj": normal is None,
        "err_fwd": rel(yo0[subset], ref[0]),
        "err_adj": rel(xo0, ref[1]),
        "info": info,
        "coils_timed": coils_timed or case["coils"],
    }
    print(
        f"  {label:<34} fwd {tf:8.3f}s  adj {ta:8.3f}s  normal {tn:8.3f}s  "
        f"err {row['err_fwd']:.1e}/{row['err_adj']:.1e}  {info}",
        flush=True,
    )
    return row


def bench_case(case, eps_list, reps, with_tkbn=True):
    im_size, traj, coils = case["im_size"], case["traj"], case["coils"]
    m = traj.shape[0]
    g = torch.Generator().manual_seed(0)
    x = torch.complex(
        torch.randn((coils, *im_size), generator=g), torch.randn((coils, *im_size), generator=g)
    )
    y = torch.complex(torch.randn((coils, m), generator=g), torch.randn((coils, m), generator=g))
    subset = np.sort(np.random.default_rng(0).choice(m, size=min(m, 20000), replace=False))
    print(f"\n== {case['name']}", flush=True)
    t0 = time.perf_counter()
    ref = reference(case, x[0].numpy(), y[0].numpy(), subset)
    print(f"  (reference {time.perf_counter() - t0:.1f}s)", flush=True)
    rows = []
    heavy = math.prod(im_size) * coils > 4e6
    for eps in eps_list:
        print(f" ε = {eps:g}", flush=True)
        # qmrkit planned (measured tuning; plan time reported)
        t0 = time.perf_counter()
        op = nufft.plan(traj, im_size, eps=eps, batch=coils, tune="measure")
        tplan = time.perf_counter() - t0
        i = op.info
        rows.append(
            run_impl(
                "qmrkit planned",
                op.forward,
                op.adjoint,
                op.normal,
                x,
                y,
                reps,
                case,
                ref,
                subset,
                f"{i.backend}/{i.method} σ={i.oversampling:g} W={i.kernel_width} "
                f"normal={i.normal} plan {tplan:.1f}s",
            )
        )
        rows[-1]["plan_s"] = tplan
        rows[-1]["tuning_timings_s"] = i.timings
        # qmrkit torch-native forced (measured among torch candidates; heuristic for the heavy
        # 3D multi-coil case, where timing every gather candidate would take many minutes)
        t0 = time.perf_counter()
        op = nufft.plan(
            traj,
            im_size,
            eps=eps,
            batch=coils,
            tune="heuristic" if heavy else "measure",
            backend="torch",
            normal="direct",
        )
        tplan = time.perf_counter() - t0
        i = op.info
        rows.append(
            run_impl(
                "qmrkit torch-native",
                op.forward,
                op.adjoint,
                None,
                x,
                y,
                reps,
                case,
                ref,
                subset,
                f"{i.method} σ={i.oversampling:g} W={i.kernel_width} "
                f"grid={i.grid_size[0]} plan {tplan:.1f}s",
            )
        )
        rows[-1]["plan_s"] = tplan
        # qmrkit Toeplitz normal (forced)
        opt = nufft.plan(
            traj,
            im_size,
            eps=eps,
            batch=coils,
            backend="torch",
            normal="toeplitz",
            method=i.method,
            oversampling=i.oversampling,
        )
        tn = best_time(lambda: opt.normal(x), reps)  # noqa: B023 - called right here
        ref_n = op.adjoint(op.forward(x[:1]))
        err_n = rel(opt.normal(x[:1]).numpy(), ref_n.numpy())
        print(
            f"  {'qmrkit Toeplitz normal':<34} normal {tn:8.3f}s  "
            f"(vs torch-native fwd+adj, rel. diff {err_n:.1e})",
            flush=True,
        )
        rows.append(
            {
                "case": case["name"],
                "key": case["key"],
                "impl": "qmrkit Toeplitz normal",
                "normal_s": tn,
                "err_normal_vs_fwd_adj": err_n,
                "coils_timed": coils,
            }
        )
        # FINUFFT default and each upsampfac
        for up in (None, 1.25, 2.0):
            p2, p1 = finufft_plans(traj, im_size, eps, coils, upsampfac=up)
            xn, yn = x.numpy(), y.numpy()
            label = "finufft default" if up is None else f"finufft σ={up:g}"
            rows.append(
                run_impl(label, p2.execute, p1.execute, None, xn, yn, reps, case, ref, subset)
            )
            del p2, p1
        # torchkbnufft defaults (only once per case: it has no accuracy parameter)
        if not ARGS.no_tkbn and with_tkbn:
            rows.extend(bench_tkbn(case, x, y, ref, subset, heavy))
    return rows


def bench_tkbn(case, x, y, ref, subset, heavy):
    import torchkbnufft as tkbn

    im_size = case["im_size"]
    ktraj = (2 * math.pi * case["traj"]).to(torch.float32).T.contiguous()  # (ndim, M) radians
    fwd_op = tkbn.KbNufft(im_size=im_size)
    adj_op = tkbn.KbNufftAdjoint(im_size=im_size)
    coils = 1 if heavy else case["coils"]
    reps = 1 if heavy else ARGS.reps
    xs = x[:coils].unsqueeze(0)
    ys = y[:coils].unsqueeze(0)
    note = "defaults (6 pt, 2x grid, table)" + (", 1 coil, 1 rep" if heavy else "")

    def fwd(v):
        return fwd_op(v, ktraj)[0]

    def adj(v):
        return adj_op(v, ktraj)[0]

    t0 = time.perf_counter()
    row = run_impl(
        "torchkbnufft", fwd, adj, None, xs, ys, reps, case, ref, subset, note, coils_timed=coils
    )
    row["wall_s"] = time.perf_counter() - t0
    return [row]


def ratios(rows):
    """Ratios of qmrkit rows against the anchors, per (case, ε)."""
    out = []
    groups = {}
    for r in rows:
        groups.setdefault((r["case"], r.get("eps")), []).append(r)
    for (case, eps), rs in groups.items():
        by = {r["impl"]: r for r in rs}
        planned = by.get("qmrkit planned")
        native = by.get("qmrkit torch-native")
        toep = by.get("qmrkit Toeplitz normal")
        fi = [by[k] for k in ("finufft σ=1.25", "finufft σ=2") if k in by]
        if not planned or not fi:
            continue

        def pair(r):
            return r["fwd_s"] + r["adj_s"]

        best = min(fi, key=pair)
        dflt = by["finufft default"]
        tk = by.get("torchkbnufft")
        d = {
            "case": case,
            "eps": eps,
            "planned_vs_finufft_best": pair(planned) / pair(best),
            "planned_vs_finufft_default": pair(planned) / pair(dflt),
            "finufft_best": best["impl"],
            "native_vs_finufft_best": pair(native) / pair(best) if native else None,
            "planned_normal_vs_fwd_adj": planned["normal_s"] / pair(planned),
            "toeplitz_vs_native_fwd_adj": pair(native) / toep["normal_s"]
            if toep and native
            else None,
        }
        if tk:
            per_coil_tk = pair(tk) / tk["coils_timed"]
            per_coil_pl = pair(planned) / planned["coils_timed"]
            d["torchkbnufft_vs_planned_speedup"] = per_coil_tk / per_coil_pl
            d["torchkbnufft_err"] = max(tk["err_fwd"], tk["err_adj"])
            d["planned_err"] = max(planned["err_fwd"], planned["err_adj"])
        out.append(d)
    return out


def write(rows, rat) -> Path:
    import finufft

    out = (
        Path(ARGS.out)
        if ARGS.out
        else ROOT / "benchmarks" / "results" / ("nufft-quick.json" if ARGS.quick else "nufft.json")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": " ".join(sys.argv),
        "threads": ARGS.threads,
        "reps": ARGS.reps,
        "torch": torch.__version__,
        "finufft": getattr(finufft, "__version__", "?"),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "load_avg_1_5_15": os.getloadavg(),
    }
    try:
        import torchkbnufft

        meta["torchkbnufft"] = torchkbnufft.__version__
    except ImportError:
        pass
    out.write_text(json.dumps({"meta": meta, "rows": rows, "ratios": rat}, indent=1))
    return out


def main():
    eps_list = [float(e) for e in ARGS.eps.split(",")]
    rows = []
    for key in ARGS.cases.split(","):
        case = make_case(key, ARGS.quick)
        for eps in eps_list:
            rs = bench_case(case, [eps], ARGS.reps, with_tkbn=eps == eps_list[0])
            for r in rs:
                r["eps"] = eps
            rows.extend(rs)
            write(rows, ratios(rows))  # partial results survive an interrupted run
        del case
    rat = ratios(rows)
    print("\n== ratios (time of fwd+adj; < 1 means qmrkit is faster)")
    for d in rat:
        line = (
            f"  {d['case']} ε={d['eps']:g}: planned/finufft-best "
            f"{d['planned_vs_finufft_best']:.2f} ({d['finufft_best']}), "
            f"planned/finufft-default "
            f"{d['planned_vs_finufft_default']:.2f}, native/finufft-best "
            f"{d['native_vs_finufft_best']:.2f}, planned normal/(fwd+adj) "
            f"{d['planned_normal_vs_fwd_adj']:.2f}, native fwd+adj / Toeplitz "
            f"{d['toeplitz_vs_native_fwd_adj']:.2f}"
        )
        if "torchkbnufft_vs_planned_speedup" in d:
            line += (
                f", speed-up over torchkbnufft (per coil) "
                f"{d['torchkbnufft_vs_planned_speedup']:.1f}x, error "
                f"{d['planned_err']:.1e} vs {d['torchkbnufft_err']:.1e}"
            )
        print(line)
    out = write(rows, rat)
    print(f"\nwritten {out}")


# -- planning: plan construction and the normal-operator choice ----------------------------------
def plan_worker(key: str, eps: float) -> None:
    """In a fresh process: heuristic plan time (cold, then warm), first transforms, FINUFFT's."""
    case = make_case(key, quick=False)
    traj, im, coils = case["traj"], case["im_size"], case["coils"]
    out: dict = {"case": case["name"], "eps": eps}
    t0 = time.perf_counter()
    op = nufft.plan(traj, im, eps=eps, batch=coils)
    out["plan_cold_s"] = time.perf_counter() - t0  # first plan of the process
    t0 = time.perf_counter()
    op = nufft.plan(traj, im, eps=eps, batch=coils)
    out["plan_warm_s"] = time.perf_counter() - t0
    out["choice"] = (
        f"{op.info.backend}/{op.info.method}/σ={op.info.oversampling:g}/{op.info.normal}"
    )
    g = torch.Generator().manual_seed(0)
    x = torch.randn((coils, *im), generator=g, dtype=torch.complex64)
    pairs = []
    for _ in range(3):  # the sparse matrices of a "sparse" plan are built at the third transform
        t0 = time.perf_counter()
        y = op(x)
        op.H(y)
        pairs.append(time.perf_counter() - t0)
    out["first_pair_s"], out["second_pair_s"], out["third_pair_s"] = pairs
    try:
        t0 = time.perf_counter()
        finufft_plans(traj, im, eps, coils)
        out["finufft_plan_setpts_s"] = time.perf_counter() - t0
    except ImportError:
        out["finufft_plan_setpts_s"] = None
    print("RESULT " + json.dumps(out))


def normal_choice_rows() -> list[dict]:
    """8-coil radial CG-SENSE (30 iterations) with normal direct, Toeplitz and the planner's."""
    from qmrkit import recon
    from qmrkit.sim import coil_maps, shepp_logan

    rows = []
    n, nc = 256, 8
    x = torch.tensor(shepp_logan((n, n))["image"], dtype=torch.complex64)
    maps = coil_maps(nc, (n, n))
    for spokes in (100, 402):
        traj = nufft.golden_angle_radial(spokes, 2 * n).to(torch.float32)
        y = nufft.plan(traj, (n, n), eps=1e-6)(maps * x)
        row = {"case": f"2D {n}² radial {spokes}×{2 * n}, {nc} coils, CG 30 it, ε=1e-3"}
        res = {}
        for normal in ("auto", "direct", "toeplitz"):

            def solve(normal=normal, y=y, traj=traj, res=res):
                res[normal] = recon.sense(y, maps, traj=traj, max_iter=30, tol=0, normal=normal)

            t = best_time(solve, ARGS.reps - 1)
            row[f"{normal}_s"] = t
        row["auto_picked"] = res["auto"].settings["nufft_normal"]
        row["auto_backend"] = res["auto"].settings["nufft"]
        row["faster"] = "toeplitz" if row["toeplitz_s"] < row["direct_s"] else "direct"
        row["toeplitz_speedup"] = row["direct_s"] / row["toeplitz_s"]
        a, b = res["direct"].image, res["toeplitz"].image
        row["rel_diff_toeplitz_direct"] = float((a - b).norm() / b.norm())
        print(
            f"  {row['case']}: direct {row['direct_s']:.2f} s, Toeplitz {row['toeplitz_s']:.2f} s "
            f"(×{row['toeplitz_speedup']:.2f}), auto {row['auto_s']:.2f} s picked "
            f"{row['auto_picked']}"
        )
        rows.append(row)
    return rows


def planning() -> None:
    import subprocess

    plans = []
    for key in ("2d", "3d1"):
        for eps in (1e-3, 1e-6):
            env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
            r = subprocess.run(
                [sys.executable, __file__, "--threads", str(ARGS.threads)]
                + ["--plan-worker", key, str(eps)],
                capture_output=True,
                text=True,
                env=env,
            )
            line = [v for v in r.stdout.splitlines() if v.startswith("RESULT ")]
            if not line:
                raise RuntimeError(f"plan worker {key} {eps} failed: {r.stderr[-2000:]}")
            d = json.loads(line[0][7:])
            print(
                f"  {d['case']} ε={eps:g}: plan {1e3 * d['plan_cold_s']:.0f} ms cold / "
                f"{1e3 * d['plan_warm_s']:.0f} ms warm ({d['choice']}); fwd+adj 1st "
                f"{d['first_pair_s']:.2f} s, 3rd {d['third_pair_s']:.2f} s; FINUFFT plan+setpts "
                f"{1e3 * (d['finufft_plan_setpts_s'] or float('nan')):.0f} ms"
            )
            plans.append(d)
    print("normal operator, measured:")
    normal = normal_choice_rows()
    out = Path(ARGS.out) if ARGS.out else ROOT / "benchmarks" / "results" / "nufft-planning.json"
    out.write_text(
        json.dumps(
            {
                "machine": {
                    "platform": platform.platform(),
                    "threads": ARGS.threads,
                    "torch": torch.__version__,
                    "load_avg": os.getloadavg(),
                },
                "plans": plans,
                "normal": normal,
            },
            indent=2,
        )
    )
    print(f"written {out}")


def markdown(path: str) -> str:
    """Markdown tables (timings, then ratios) of a results JSON written by this script."""
    data = json.loads(Path(path).read_text())
    lines = [
        "| case | ε | implementation | fwd s | adj s | normal s | err fwd | err adj | notes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:

        def f(k, fmt, r=r):
            v = r.get(k)
            return format(v, fmt) if isinstance(v, (int, float)) else ""

        note = r.get("info", "")
        if r["impl"] == "qmrkit Toeplitz normal":
            note = f"rel. diff to torch-native fwd+adj {r['err_normal_vs_fwd_adj']:.1e}"
        elif r.get("normal_is_fwd_adj"):
            note = (note + "; normal = fwd+adj").strip("; ")
        lines.append(
            f"| {r['case']} | {r['eps']:g} | {r['impl']} | {f('fwd_s', '.3f')} | "
            f"{f('adj_s', '.3f')} | {f('normal_s', '.3f')} | {f('err_fwd', '.1e')} | "
            f"{f('err_adj', '.1e')} | {note} |"
        )
    lines += [
        "",
        "| case | ε | planned / finufft best | planned / finufft default | native / finufft best "
        "| planned normal / (fwd+adj) | native (fwd+adj) / Toeplitz | torchkbnufft / planned "
        "(per coil) | error planned vs torchkbnufft |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for d in data["ratios"]:
        tk = d.get("torchkbnufft_vs_planned_speedup")
        lines.append(
            f"| {d['case']} | {d['eps']:g} | {d['planned_vs_finufft_best']:.2f} "
            f"({d['finufft_best']}) | {d['planned_vs_finufft_default']:.2f} | "
            f"{d['native_vs_finufft_best']:.2f} | {d['planned_normal_vs_fwd_adj']:.2f} | "
            f"{d['toeplitz_vs_native_fwd_adj']:.2f} | "
            + (f"{tk:.1f}x" if tk else "")
            + " | "
            + (f"{d['planned_err']:.1e} vs {d['torchkbnufft_err']:.1e}" if tk else "")
            + " |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    if ARGS.markdown:
        print(markdown(ARGS.markdown))
    elif ARGS.plan_worker:
        plan_worker(ARGS.plan_worker[0], float(ARGS.plan_worker[1]))
    elif ARGS.planning:
        planning()
    else:
        main()
