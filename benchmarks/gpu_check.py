"""One GPU check: the CUDA tests and a short GPU version of each benchmark, in one command.

On a machine with one CUDA GPU this runs, each part in its own subprocess with its own time budget
(so one hang or crash costs that part only):

``env``     interpreter, torch, device, which optional packages import (and why not)
``tests``   every test marked ``gpu`` or parametrised with a CUDA device (``pytest -m gpu``;
            tests/conftest.py marks the CUDA-parametrised ones), results per test from the log
``nufft``   qmrkit's torch-native NUFFT against cuFINUFFT: plan, forward and adjoint times, the
            difference between the two and the error against a float64 direct NDFT on a subset
``lm``      ``fit.lm`` on 10⁶ MOLLI voxels (T1 error against the simulated truth)
``mcmc``    ``fit.mcmc`` (ensemble, IVIM, 32 walkers × 2,000 steps) at 10⁵ and, when the 10⁵ run
            says it fits the budget, 10⁶ voxels: ms per voxel
``mrf``     2D MR fingerprinting, 256² × 8 coils, scan to maps (per-stage seconds, T1/T2 error)
``mel``     memory-efficient learning: peak GPU memory of a training step per memory mode

and writes ``gpu-check.json`` (every part's status, reason, seconds and figures) to ``--out``
(default ``benchmarks/results``). Without a GPU it runs end to end in CPU mode: the tests and
every GPU figure are skipped with the reason stated, and each benchmark part runs a small CPU
version instead whose sanity figures (errors against references) are recorded; the file is then
``gpu-check-cpu.json``. ``tests/test_gpu_check.py`` runs that mode in CI.

The lent GPU machine has no network: ``make gpu-wheels`` (benchmarks/gpu_wheels.py) prepares the
wheels of qmrkit's dependencies that its interpreter lacks in ``.gpu-wheels/``; this script
installs them (``pip install --no-index --target``) into a temporary folder put on the children's
``PYTHONPATH``. The exact device-tool command is in docs/gpu.md.

Usage: python3 benchmarks/gpu_check.py [--out DIR] [--cpu] [--parts env,tests,...] [--budget 480]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# seconds per part on the GPU machine; together with the wheel install they fit in 8 minutes
BUDGETS = {"env": 40, "tests": 180, "nufft": 45, "lm": 30, "mcmc": 80, "mrf": 60, "mel": 30}
PARTS = tuple(BUDGETS)
OPTIONAL = ("finufft", "cufinufft", "nibabel", "ismrmrd", "emcee", "torchkbnufft", "xdist")


# ------------------------------------------------------------------------------------- helpers
def _sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, dev, repeat: int = 3) -> tuple[float, Any]:
    """Median wall time of ``repeat`` calls (device synchronised) and the last result."""
    times, out = [], None
    for _ in range(repeat):
        _sync(dev)
        t0 = time.perf_counter()
        out = fn()
        _sync(dev)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2], out


class Skip(Exception):
    """Raised by a part (or one of its figures) that cannot run here, with the reason."""


# ----------------------------------------------------------------------------------- the parts
def part_env(gpu: bool, a: argparse.Namespace) -> dict:
    import importlib

    import torch

    out: dict[str, Any] = {
        "python": platform.python_version(),
        "executable": sys.executable,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cpu_count": os.cpu_count(),
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out.update(
            device=p.name,
            capability=f"{p.major}.{p.minor}",
            memory_gib=round(p.total_memory / 2**30, 1),
            multiprocessors=p.multi_processor_count,
        )
    mods = {}
    for name in OPTIONAL:
        try:
            m = importlib.import_module(name)
            mods[name] = getattr(m, "__version__", "importable")
        except Exception as e:  # an OSError from a missing CUDA library counts too
            mods[name] = f"not importable: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    out["packages"] = mods
    import qmrkit

    out["qmrkit"] = str(Path(qmrkit.__file__).parent)
    return out


def part_tests(gpu: bool, a: argparse.Namespace) -> dict:
    if not gpu:
        raise Skip("no CUDA device: the CUDA-parametrised tests exist only where torch sees one")
    import importlib.util

    log = Path(a.scratch) / "pytest.log"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-v", "-p", "no:cacheprovider"]
    cmd += ["--continue-on-collection-errors", "-o", "addopts=", "tests"]
    if importlib.util.find_spec("xdist") and a.workers > 1:
        cmd += ["-n", str(a.workers)]
    if importlib.util.find_spec("pytest_timeout"):
        cmd += ["--timeout", "90"]
    # the part's own time limit minus a margin, so the summary below is written before the
    # parent's limit for this part kills the whole process
    limit = max(10.0, a.part_limit - 15)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=limit)
            rc = rc.returncode
            timed_out = False
        except subprocess.TimeoutExpired:
            rc, timed_out = None, True
    text = log.read_text(errors="replace")
    if a.out:
        shutil.copy(log, Path(a.out) / ("gpu-tests.log"))
    res = _parse_pytest(text)
    res.update(
        returncode=rc,
        timed_out=timed_out,
        seconds=time.perf_counter() - t0,
        command=" ".join(cmd[1:]),
        tail=text[-3000:],
    )
    return res


_OUTCOME = re.compile(r"(\S+::\S+?)\s+(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b")
_OUTCOME_X = re.compile(r"\b(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\s+(\S+::\S+)")


def _parse_pytest(text: str) -> dict:
    """Per-test outcomes from a verbose pytest log (plain or xdist), also from a cut-off one."""
    outcome: dict[str, str] = {}
    for line in text.splitlines():
        m = _OUTCOME_X.search(line)
        if m:
            outcome[m.group(2)] = m.group(1)
            continue
        m = _OUTCOME.search(line)
        if m:
            outcome[m.group(1)] = m.group(2)
    counts: dict[str, int] = {}
    for o in outcome.values():
        counts[o.lower()] = counts.get(o.lower(), 0) + 1
    failed = sorted(k for k, v in outcome.items() if v in ("FAILED", "ERROR"))
    collect_errors = sorted(set(re.findall(r"ERROR collecting (\S+)", text)))
    return {"counts": counts, "failed": failed[:100], "collection_errors": collect_errors}


def _traj_radial(spokes: int, samples: int):
    import numpy as np

    ang = np.pi * ((np.sqrt(5) - 1) / 2) * np.arange(spokes)  # golden angle
    r = (np.arange(samples) - samples / 2) / samples
    k = np.stack([np.outer(np.cos(ang), r), np.outer(np.sin(ang), r)], -1).reshape(-1, 2)
    return k.astype(np.float32)


def _ndft(x, traj, idx):
    """Float64 direct NDFT of images ``x`` (B, *N) at the points ``traj[idx]`` (the reference)."""
    import torch

    shape = x.shape[1:]
    axes = [torch.arange(n, dtype=torch.float64) - n // 2 for n in shape]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, len(shape))
    k = torch.as_tensor(traj[idx], dtype=torch.float64)
    e = torch.exp(-2j * torch.pi * (k @ grid.T))
    return x.reshape(x.shape[0], -1).to(torch.complex128) @ e.T


def part_nufft(gpu: bool, a: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    from qmrkit import nufft

    dev = torch.device("cuda" if gpu else "cpu")
    if gpu:
        cases = [("2d", (256, 256), 8, _traj_radial(402, 512), 1e-6)]
        cases.append(("2d", (256, 256), 8, _traj_radial(402, 512), 1e-3))
        rng = np.random.default_rng(0)
        cases.append(("3d", (128,) * 3, 1, rng.uniform(-0.5, 0.5, (2_000_000, 3)), 1e-3))
    else:
        cases = [("2d", (64, 64), 2, _traj_radial(100, 128), 1e-6)]
    rows = []
    for name, shape, coils, traj, eps in cases:
        g = torch.Generator().manual_seed(1)
        x = torch.randn((coils, *shape), generator=g, dtype=torch.complex64).to(dev)
        idx = np.random.default_rng(2).choice(len(traj), 256, replace=False)
        ref = _ndft(x[:1].cpu(), traj, idx)
        row: dict[str, Any] = {"case": name, "size": list(shape), "coils": coils}
        row.update(points=len(traj), eps=eps)
        outs = {}
        for backend in ("torch", "cufinufft") if gpu else ("torch",):
            try:
                _sync(dev)
                t0 = time.perf_counter()
                op = nufft.plan(traj, shape, eps=eps, batch=coils, device=dev, backend=backend)
                _sync(dev)
                row[f"{backend}_plan_s"] = time.perf_counter() - t0
                _sync(dev)
                t0 = time.perf_counter()
                op(x)  # first call: deferred set-up (weights, sparse matrices), cuFFT plans
                _sync(dev)
                row[f"{backend}_first_forward_s"] = time.perf_counter() - t0
                row[f"{backend}_forward_s"], y = _timed(lambda op=op, x=x: op(x), dev)
                row[f"{backend}_adjoint_s"], _ = _timed(lambda op=op, y=y: op.H(y), dev)
                err = (y[:1, idx].cpu().to(torch.complex128) - ref).norm() / ref.norm()
                row[f"{backend}_err_vs_ndft"] = float(err)
                row[f"{backend}_choice"] = str(getattr(op, "info", ""))[:300]
                outs[backend] = y
            except Exception as e:
                row[f"{backend}_skipped"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        if "torch" in outs and "cufinufft" in outs:
            d = (outs["torch"] - outs["cufinufft"]).norm() / outs["cufinufft"].norm()
            row["rel_diff_torch_vs_cufinufft"] = float(d)
            row["forward_ratio_vs_cufinufft"] = row["torch_forward_s"] / row["cufinufft_forward_s"]
        rows.append(row)
    out: dict[str, Any] = {"device": str(dev), "rows": rows}
    if not gpu:
        out["skipped"] = "no CUDA device: GPU rows and cuFINUFFT skipped; CPU torch-native only"
    return out


def _molli(n: int, seed: int):
    import numpy as np

    from qmrkit.sim import MOLLI_TI, add_noise

    ti = np.asarray(MOLLI_TI)
    rng = np.random.default_rng(seed)
    t1 = rng.uniform(300, 2000, n)
    ratio = rng.uniform(0.8, 0.9, n)
    a_ = 1000.0 * ratio
    b_ = a_ * (1 + 1 / ratio)
    clean = a_[:, None] - b_[:, None] * np.exp(-ti / (ratio * t1)[:, None])
    return ti, add_noise(clean, 1000.0 / 50.0, kind="rician", seed=seed + 1), t1


def part_lm(gpu: bool, a: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    from qmrkit import fit, models

    n = a.lm_voxels if gpu else 2048
    dev = torch.device("cuda" if gpu else "cpu")
    ti, y, t1 = _molli(n, seed=5)
    model = models.MolliT1(ti)
    yt = torch.as_tensor(y, dtype=torch.float32, device=dev)
    _sync(dev)
    t0 = time.perf_counter()
    fit.lm(model, yt[:256], device=dev, progress=False)  # first call: set-up, kernels
    _sync(dev)
    first = time.perf_counter() - t0
    secs, r = _timed(lambda: fit.lm(model, yt, device=dev, progress=False), dev, repeat=2)
    rel = np.abs(r["T1"].cpu().numpy().ravel() / t1 - 1)
    out = {
        "device": str(dev),
        "voxels": n,
        "warmup_256_s": first,
        "seconds": secs,
        "voxels_per_s": n / secs,
        "median_t1_err": float(np.median(rel)),
        "p95_t1_err": float(np.percentile(rel, 95)),
        "converged": float(r.fraction_converged),
        "target": "10⁶ MOLLI voxels < 1 s on the GPU",
    }
    if not gpu:
        out["skipped"] = "no CUDA device: 10⁶-voxel GPU run skipped; 2,048 voxels on the CPU"
    return out


def part_mcmc(gpu: bool, a: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    sys.path.insert(0, str(HERE))
    from mcmc import make
    from qmrkit import fit

    dev = torch.device("cuda" if gpu else "cpu")
    steps, walkers = (2000, 32) if gpu else (200, 16)
    sizes = [a.mcmc_voxels // 10, a.mcmc_voxels] if gpu else [128]
    t_start = time.perf_counter()
    runs = []
    for n in sizes:
        if runs:  # only when the larger run fits what is left of this part's budget
            left = a.part_limit - (time.perf_counter() - t_start) - 10
            need = runs[-1]["seconds"] * n / runs[-1]["voxels"] * 1.2
            if need > left:
                runs.append({"voxels": n, "skipped": f"projected {need:.0f} s > {left:.0f} s left"})
                break
        model, y, sigma = make(n)
        init = fit.lm(model, y, device=dev, progress=False)
        _sync(dev)
        t0 = time.perf_counter()
        res = fit.mcmc(
            model,
            y,
            noise=sigma,
            n_walkers=walkers,
            n_steps=steps,
            burnin=steps // 5,
            init=init,
            device=dev,
            progress=False,
        )
        _sync(dev)
        el = time.perf_counter() - t0
        d = res.mean["D"].cpu().numpy().ravel()
        runs.append(
            {
                "voxels": n,
                "seconds": el,
                "ms_per_voxel": 1000 * el / n,
                "compiled": bool(res.settings.get("compile")),
                "median_ess_D": float(np.median(res.ess["D"].cpu().numpy())),
                "acceptance": float(res.acceptance.median()),
                "mean_D_in_bounds": bool(np.all((d > 0.2) & (d < 3.0))),
            }
        )
    out = {
        "device": str(dev),
        "walkers": walkers,
        "steps": steps,
        "runs": runs,
        "target": "< 0.2 ms/voxel (GACELLE ≈ 2 ms/voxel on an A40)",
    }
    if not gpu:
        out["skipped"] = "no CUDA device: 10⁵/10⁶-voxel GPU runs skipped; 128 voxels on the CPU"
    return out


def part_mrf(gpu: bool, a: argparse.Namespace) -> dict:
    import warnings

    import numpy as np
    import torch

    from qmrkit import mrf, pipelines, sim
    from qmrkit.io import to_nifti_order

    warnings.simplefilter("ignore")
    dev = torch.device("cuda" if gpu else "cpu")
    n, coils, step, trs = (256, 8, 0.08, 1000) if gpu else (48, 1, 0.25, 200)
    sched = mrf.fisp_schedule(trs, seed=0)
    t0 = time.perf_counter()
    scan = sim.mrf_scan((n, n), n_coils=coils, b1_amplitude=0.3, seed=0, schedule=sched)
    t_sim = time.perf_counter() - t0
    b1 = to_nifti_order(scan.meta["truth"]["B1"], 2)
    t0 = time.perf_counter()
    db = mrf.Dictionary.build(
        sched,
        t1=mrf.log_grid(10, 4000, step),
        t2=mrf.log_grid(1, 500, step),
        b1=pipelines.b1_grid(b1, 0.1),
        keep_atoms=False,
        device=dev,
    )
    _sync(dev)
    t_dict = time.perf_counter() - t0
    pipelines.mrf_maps(scan, dictionary=db, b1_map=b1, device=dev)  # warm-up (plans, caches)
    _sync(dev)
    t0 = time.perf_counter()
    maps = pipelines.mrf_maps(scan, dictionary=db, b1_map=b1, device=dev)
    _sync(dev)
    total = time.perf_counter() - t0
    truth = {k: to_nifti_order(scan.meta["truth"][k], 2) for k in ("labels", "T1", "T2")}
    errs = []
    for s in np.unique(truth["labels"]):
        sel = truth["labels"] == s
        if s == 0 or sel.sum() < 4 or truth["T2"][sel][0] > 500:
            continue
        t1m, t2m = (np.median(m.cpu().numpy()[sel]) for m in (maps.t1, maps.t2))
        errs.append((abs(t1m / truth["T1"][sel][0] - 1), abs(t2m / truth["T2"][sel][0] - 1)))
    e = np.array(errs)
    out = {
        "device": str(dev),
        "size": n,
        "coils": coils,
        "trs": trs,
        "scan_to_maps_s": total,
        "stages": {k: float(v) for k, v in maps.stages.items()},
        "simulation_s": t_sim,
        "dictionary_s": t_dict,
        "dictionary_atoms": db.n_atoms,
        # spheres the matching left unassigned (NaN) at the CPU mode's coarse size count apart
        "spheres": len(e),
        "spheres_unmatched": int(np.isnan(e[:, 0]).sum()),
        "median_t1_err": float(np.nanmedian(e[:, 0])),
        "median_t2_err": float(np.nanmedian(e[:, 1])),
        "target": "2D 256² scan to maps ≤ 1 s on the GPU",
    }
    if not gpu:
        out["skipped"] = f"no CUDA device: 256² GPU run skipped; {n}² × {coils} coils on the CPU"
    return out


def part_mel(gpu: bool, a: argparse.Namespace) -> dict:
    sys.path.insert(0, str(HERE))
    from mel import worker

    device = "cuda" if gpu else "cpu"
    n, modes = (10, ("standard", "checkpoint", "reversible")) if gpu else (2, ("standard",))
    rows = []
    for mode in modes:
        r = worker("2d", mode, n, 2 if gpu else 1, device, 4 if gpu else 1, 0.05, 30, 1e-6, 5, None)
        rows.append({k: r[k] for k in ("mode", "n_unrolls", "peak_mb", "first_mb", "step_s")})
    out: dict[str, Any] = {"device": device, "case": "2d (96², 8 coils)", "rows": rows}
    if gpu:
        std = rows[0]["peak_mb"]
        for r in rows:
            r["memory_vs_standard"] = r["peak_mb"] / std if std > 0 else None
    else:
        out["skipped"] = (
            "no CUDA device: GPU memory rows skipped; one standard row on the CPU (RSS)"
        )
    return out


# ------------------------------------------------------------------------------ orchestration
def _child(part: str, gpu: bool, a: argparse.Namespace) -> None:
    """Run one part in this (child) process and write its JSON to ``a.result``."""
    import torch

    if a.threads > 0:
        torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    try:
        res = {"status": "ok", **globals()[f"part_{part}"](gpu, a)}
    except Skip as e:
        res = {"status": "skipped", "reason": str(e)}
    except Exception as e:
        res = {
            "status": "failed",
            "reason": f"{type(e).__name__}: {e}"[:1000],
            "traceback": traceback.format_exc()[-4000:],
        }
    res["seconds"] = time.perf_counter() - t0
    Path(a.result).write_text(json.dumps(res, default=_plain))


def _plain(obj: Any) -> Any:
    if hasattr(obj, "item") and getattr(obj, "size", 1) == 1:
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def install_wheels(wheels: Path, scratch: Path) -> dict:
    """Install the prepared wheels (no network, no dependencies resolved) into a private folder."""
    files = sorted(glob.glob(str(wheels / "*.whl")))
    if not files:
        return {"status": "skipped", "reason": f"no wheels in {wheels}"}
    site = scratch / "site"
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
    cmd += ["--no-cache-dir", "--disable-pip-version-check", "--target", str(site), *files]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    info = {"wheels": [Path(f).name for f in files], "seconds": time.perf_counter() - t0}
    if p.returncode != 0:
        return {**info, "status": "failed", "reason": p.stderr[-2000:]}
    return {**info, "status": "ok", "site": str(site)}


def cuda_library_path(site: Path | None, scratch: Path) -> tuple[list[str], str | None]:
    """Folders for ``LD_LIBRARY_PATH`` so that cuFINUFFT's CUDA 12 build loads next to torch's.

    The cufinufft wheels on PyPI link ``libcudart.so.12`` and ``libcufft.so.11``. The runtime
    comes as a wheel (nvidia-cuda-runtime-cu12, 0.7 MB of library); cuFFT 11 is a 200 MB wheel,
    so when no ``libcufft.so.11`` is found, the cuFFT that torch ships is offered under that name
    (its C API is the same). Whether that works is decided by measurement: the NUFFT part
    compares cuFINUFFT's result with qmrkit's and a float64 NDFT.
    """
    dirs: list[str] = []
    note = None
    roots = [Path(p) for p in sys.path if p and Path(p).is_dir()]
    if site:
        roots.insert(0, site)
    found11 = None
    newest = None
    for r in roots:
        for lib in glob.glob(str(r / "nvidia" / "**" / "libcudart.so.12"), recursive=True):
            dirs.append(str(Path(lib).parent))
        for lib in glob.glob(str(r / "nvidia" / "**" / "libcufft.so.*"), recursive=True):
            if lib.endswith(".so.11"):
                found11 = lib
            elif re.search(r"libcufft\.so\.\d+$", lib):
                newest = lib
    if found11:
        dirs.append(str(Path(found11).parent))
    elif newest:
        shim = scratch / "cufft-shim"
        shim.mkdir(exist_ok=True)
        link = shim / "libcufft.so.11"
        if not link.exists():
            link.symlink_to(newest)
        dirs.append(str(shim))
        note = f"libcufft.so.11 not found; offered {newest} under that name"
    return list(dict.fromkeys(dirs)), note


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(HERE / "results"), help="folder for gpu-check*.json")
    ap.add_argument("--cpu", action="store_true", help="CPU mode even where CUDA is present")
    ap.add_argument("--parts", default=",".join(PARTS), help="comma list of " + ",".join(PARTS))
    ap.add_argument("--budget", type=float, default=480.0, help="seconds for everything")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every part's budget")
    ap.add_argument("--wheels", default=str(ROOT / ".gpu-wheels"), help="prepared wheels")
    ap.add_argument("--workers", type=int, default=8, help="pytest-xdist workers (tests part)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    ap.add_argument("--lm-voxels", type=int, default=1_000_000)
    ap.add_argument("--mcmc-voxels", type=int, default=1_000_000)
    ap.add_argument("--part", help=argparse.SUPPRESS)  # child mode
    ap.add_argument("--gpu", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--scratch", help=argparse.SUPPRESS)
    ap.add_argument("--part-limit", type=float, default=60.0, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.part:
        _child(a.part, a.gpu, a)
        return 0

    t_all = time.perf_counter()
    parts = [p.strip() for p in a.parts.split(",") if p.strip()]
    bad = [p for p in parts if p not in PARTS]
    if bad:
        ap.error(f"unknown part(s) {bad}; expected some of {list(PARTS)}")
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="qmrkit-gpu-check-"))
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("QMRKIT_WISDOM_DIR", str(scratch / "wisdom"))
    report: dict[str, Any] = {"benchmark": "gpu-check", "date": time.strftime("%Y-%m-%d %H:%M:%S")}

    # wheels first (they may provide what the probe below looks for)
    site = None
    wheels = Path(a.wheels)
    if wheels.is_dir():
        report["wheels"] = install_wheels(wheels, scratch)
        if report["wheels"]["status"] == "ok":
            site = Path(report["wheels"]["site"])
    else:
        report["wheels"] = {"status": "skipped", "reason": f"{wheels} does not exist"}
    # the package under test comes first, the wheels after it, the interpreter's own last
    pp = [str(ROOT / "src")] + ([str(site)] if site else []) + [env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in pp if p)

    probe = subprocess.run(
        [sys.executable, "-c", "import torch; print(int(torch.cuda.is_available()))"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    has_cuda = probe.stdout.strip() == "1"
    gpu = has_cuda and not a.cpu
    report["mode"] = "gpu" if gpu else "cpu"
    report["mode_reason"] = (
        "CUDA device present"
        if gpu
        else ("--cpu given" if a.cpu else "torch.cuda.is_available() is False on this machine")
    )
    if gpu:
        dirs, note = cuda_library_path(site, scratch)
        if dirs:
            env["LD_LIBRARY_PATH"] = os.pathsep.join(dirs + [env.get("LD_LIBRARY_PATH", "")])
        report["cuda_libraries"] = {"ld_library_path": dirs, "note": note}

    name = "gpu-check" if gpu else "gpu-check-cpu"
    path = out_dir / f"{name}.json"
    report["parts"] = {}
    for part in parts:
        left = a.budget * a.scale - (time.perf_counter() - t_all)
        limit = min(BUDGETS[part] * a.scale, left)
        if limit < 5:
            report["parts"][part] = {"status": "skipped", "reason": "the overall budget is spent"}
            continue
        res_file = scratch / f"{part}.json"
        cmd = [sys.executable, __file__, "--part", part, "--result", str(res_file)]
        cmd += ["--scratch", str(scratch), "--part-limit", str(limit), "--out", str(out_dir)]
        cmd += ["--workers", str(a.workers), "--threads", str(a.threads)]
        cmd += ["--lm-voxels", str(a.lm_voxels), "--mcmc-voxels", str(a.mcmc_voxels)]
        cmd += ["--gpu"] if gpu else []
        t0 = time.perf_counter()
        print(f"== {part} (budget {limit:.0f} s)", flush=True)
        try:
            p = subprocess.run(
                cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit
            )
            if res_file.exists():
                res = json.loads(res_file.read_text())
            else:
                res = {"status": "failed", "reason": f"exit code {p.returncode}, no result"}
                res["stderr"] = p.stderr[-3000:]
        except subprocess.TimeoutExpired as e:
            err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr
            res = {"status": "timeout", "reason": f"over its budget of {limit:.0f} s"}
            res["stderr"] = (err or "")[-3000:]
        res["wall_s"] = time.perf_counter() - t0
        res["budget_s"] = limit
        report["parts"][part] = res
        line = res.get("reason") or res.get("skipped") or ""
        print(f"   {res['status']} in {res['wall_s']:.1f} s {line}"[:300], flush=True)
        path.write_text(json.dumps(report, indent=2, default=_plain))  # partial results survive

    report["total_s"] = time.perf_counter() - t_all
    status = [r["status"] for r in report["parts"].values()]
    report["ok"] = all(s in ("ok", "skipped") for s in status)
    tests = report["parts"].get("tests", {})
    if tests.get("status") == "ok" and (
        tests.get("counts", {}).get("failed") or tests["timed_out"]
    ):
        report["ok"] = False
    path.write_text(json.dumps(report, indent=2, default=_plain))
    shutil.rmtree(scratch, ignore_errors=True)
    print(f"wrote {path} in {report['total_s']:.0f} s; ok={report['ok']}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
