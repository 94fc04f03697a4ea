"""Diffusion microstructure fitting: NEXI (and AxCaliberSMT when present), qmrkit vs scipy/emcee.

NEXI problem: GACELLE's demo-1 protocol (paper 004, table S1): 15 shells, b = 2.3, 3.5, 4.8,
6.5 ms/µm² at Δ = 13, 21 and 30 ms, 11.3 at Δ = 21 and 30 ms, 17.3 at Δ = 30 ms (narrow pulses,
t = Δ). Fitted: the spherical mean and l = 2 invariant of each shell (30 numbers), five parameters
(f, D_n, D_e, r_n, p₂). Truth drawn as in GACELLE's NEXI demo: f 0.1–0.8, D_n 1.5–3,
D_e 0.5–1.5 µm²/ms, t_ex 2–50 ms (r_n = (1 − f)/t_ex), p₂ 0.05–0.5; Gaussian noise σ = 1/50 on
the b0-normalised invariants (SNR 50 at b = 0, paper 004 §2.5).

Anchors, measured in the same run:
* scipy ``least_squares`` (trf, 2-point Jacobian, x_scale="jac") per voxel on one core, on a
  NumPy float64 NEXI, from the same start as ``fit.lm`` (NEXI's own dictionary start): timed on
  ``--scipy-voxels`` voxels and extrapolated per voxel (its time is linear in voxels);
* emcee ``EnsembleSampler`` per voxel (one walker per call, the usual way) on the NumPy model,
  timed on ``--emcee-voxels`` voxels and extrapolated per voxel.

qmrkit rows: ``fit.lm`` (float32) and ``fit.adam`` (L1 loss as GACELLE's askadam, float32, at
most 4000 iterations, stop at the loss plateau) at 10²…``--max-samples`` samples; ``fit.mcmc``
ensemble (32 walkers) and MH (4 chains), 2,000 steps, known σ. The first ``lm``/``adam`` call of
the process is reported separately (cold) from the timed (warm) runs.

AxCaliberSMT: when ``qmrkit.models.diffusion.AxCaliberSMT`` is importable, the same rows run on
GACELLE's demo-2 protocol (16 b-values: Δ = 13 ms: 0.05, 0.35, 0.8, 1.5, 2.4, 3.45, 4.75, 6; Δ = 30
ms: 0.2, 0.95, 2.3, 4.25, 6.75, 9.85, 13.5, 17.8 ms/µm²; δ = 6 ms as in GACELLE's AxCaliberSMT
demo), SNR 30; truth uniform over the middle 60 % of each parameter's bounds; the scipy/emcee
anchors call the qmrkit model in float64 (no independent NumPy model exists for it here).
Otherwise that section is skipped with a message.

Usage: python benchmarks/diffusion.py [--quick] [--max-samples 100000] [--adam-max 1000]
       [--scipy-voxels 200] [--emcee-voxels 3] [--mcmc-voxels 256] [--threads 2]
(run with a fresh ``TORCHINDUCTOR_CACHE_DIR=$(mktemp -d)`` for first calls that include the whole
compilation.)
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import scipy.optimize as so
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import table, write_results  # noqa: E402
from qmrkit import fit  # noqa: E402
from qmrkit.models.diffusion.nexi import NEXI, gauss_legendre_01, n_nodes_for  # noqa: E402

# GACELLE demo 1 (NEXI) and demo 2 (AxCaliberSMT) protocols, paper 004 table S1
NEXI_B = np.array([2.3, 3.5, 4.8, 6.5] * 3 + [11.3, 11.3, 17.3])
NEXI_DELTA = np.array([13.0] * 4 + [21.0] * 4 + [30.0] * 4 + [21.0, 30.0, 30.0])
AXC_B = np.array(
    [0.05, 0.35, 0.8, 1.5, 2.4, 3.45, 4.75, 6.0, 0.2, 0.95, 2.3, 4.25, 6.75, 9.85, 13.5, 17.8]
)
AXC_DELTA = np.array([13.0] * 8 + [30.0] * 8)
AXC_SMALL_DELTA = 6.0

# GACELLE's published figures (paper 004 §3.1; AMD EPYC 7313, one core, and an NVIDIA A40)
GACELLE = {
    "nexi_nlls_s_per_sample": 0.091,
    "nexi_mh_cpu_s_per_sample": 28.3,
    "axc_nlls_s_per_sample": 0.022,
    "axc_mh_cpu_s_per_sample": 4.6,
    "askadam_nexi_speedup_2.5e5": 451,
    "askadam_axc_speedup_2.5e5": 54,
    "ensemble_axc_speedup_2.5e5": 2027,
}


# ------------------------------------------------------------------------------------------------
# NEXI data and a NumPy model for the anchors
# ------------------------------------------------------------------------------------------------
def nexi_truth(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    f = rng.uniform(0.1, 0.8, n)
    tex = rng.uniform(2.0, 50.0, n)
    return {
        "f": f,
        "Dn": rng.uniform(1.5, 3.0, n),
        "De": rng.uniform(0.5, 1.5, n),
        "rn": (1 - f) / tex,
        "p2": rng.uniform(0.05, 0.5, n),
    }


class NumpyNexi:
    """Float64 NumPy NEXI invariants (eigen form of the 2×2 exponential, as qmrkit's kernel)."""

    def __init__(self, b: np.ndarray, t: np.ndarray):
        self.b, self.t = b[:, None], t[:, None]
        xi, w = gauss_legendre_01(n_nodes_for(b.max() * 3.5))
        self.xi2, self.w, self.w2 = xi * xi, w, w * 0.5 * (3 * xi * xi - 1)

    def __call__(self, p: np.ndarray) -> np.ndarray:
        f, dn, de, rn, p2 = p
        rnt = rn * self.t
        ret = rnt * f / max(1 - f, 1e-12)
        bn, bde = self.b * dn * self.xi2, self.b * de
        a, d = bn + rnt, bde + ret
        hd, m = 0.5 * (a - d), 0.5 * (a + d)
        s = np.sqrt(np.maximum(hd * hd + rnt * ret, 1e-30))
        proj = hd * (2 * f - 1) - 2 * rnt * f
        lam_hi = m + s
        lam_lo = (bn * d + rnt * bde) / lam_hi
        big = s + np.abs(proj)
        w_big, w_small = big / (2 * s), f * (1 - f) * (bn - bde) ** 2 / (2 * s * big)
        c_lo = np.where(proj >= 0, w_small, w_big)
        sig = c_lo * np.exp(-lam_lo) + (1 - c_lo) * np.exp(-lam_hi)
        return np.stack([sig @ self.w, -(sig @ self.w2) * p2], -1).reshape(-1)


def rel_errors(est: dict[str, np.ndarray], truth: dict[str, np.ndarray], names) -> dict:
    out = {}
    for k in names:
        e = np.abs(np.asarray(est[k], dtype=np.float64) - truth[k]) / np.abs(truth[k])
        out[k] = float(np.median(np.where(np.isfinite(e), e, np.inf)))
    return out


def scipy_fit(fun, y, x0, lo, hi):
    out = np.empty_like(x0)
    for v in range(len(y)):
        res = so.least_squares(
            lambda p, v=v: fun(p) - y[v],
            np.clip(x0[v], lo + 1e-9 * (hi - lo), hi - 1e-9 * (hi - lo)),
            bounds=(lo, hi),
            method="trf",
            x_scale="jac",
        )
        out[v] = res.x
    return out


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


# ------------------------------------------------------------------------------------------------
# one model: scipy, lm, adam over sample counts
# ------------------------------------------------------------------------------------------------
def fitting_rows(label, model, make, counts, adam_max, scipy_voxels, np_fun, names, derived):
    """Rows for one model. ``make(n)`` -> (data (n, M), truth dict); ``np_fun(p) -> (M,)``.

    qmrkit runs first, so that its first call of the process is a cold one; the scipy anchor
    follows, and the speed-ups are filled in at the end."""
    rows = []
    lo = np.array([p.lower for p in model.parameters])
    hi = np.array([p.upper for p in model.parameters])
    pnames = model.parameter_names
    for n in counts:
        y, truth = make(n, seed=n)
        truth = dict(truth, **{k: fn(truth) for k, fn in derived.items()})
        for solver in ("lm", "adam"):
            if solver == "adam" and n > adam_max:
                continue
            if solver == "lm":
                run = lambda y=y: fit.lm(model, y, progress=False)  # noqa: E731
            else:
                run = lambda y=y: fit.adam(  # noqa: E731
                    model, y, loss="l1", max_iter=4000, progress=False
                )
            el, res = timed(run)
            # the first call of the process (cold), and the first one that compiles the kernel
            # (NEXI fuses its kernel with torch.compile from 16,384 voxels), then a warm one
            comp = getattr(model, "_compiled", lambda n: False)(n)
            first = not any(r.get("solver") == solver for r in rows)
            first_comp = comp and not any(
                r.get("solver") == solver and r.get("compiled") for r in rows
            )
            if first or first_comp:
                kind = "first call, incl. compilation" if first_comp else "cold"
                rows.append(_row(label, solver, n, el, res, truth, names, kind, comp))
                el, res = timed(run)
            rows.append(_row(label, solver, n, el, res, truth, names, "warm", comp))
            print(
                f"  {label} {solver} n={n:,}: {el:.2f} s ({1000 * el / n:.3f} ms/voxel)", flush=True
            )

    # scipy anchor on a subset, same start as lm (the model's own start, else a dictionary)
    y_s, truth_s = make(scipy_voxels, seed=101)
    with torch.no_grad():
        guess = model.initial_guess(torch.as_tensor(y_s), {})
    if guess is None:
        start = fit.dictionary_search(model, y_s, dtype=torch.float64)
        x0 = np.stack([start[k].numpy() for k in pnames], 1)
    else:
        x0 = np.stack([guess[k].numpy() for k in pnames], 1)
    t_sc, p_sc = timed(lambda: scipy_fit(np_fun, y_s, x0, lo, hi))
    est_sc = {k: p_sc[:, j] for j, k in enumerate(pnames)}
    est_sc.update({k: fn(est_sc) for k, fn in derived.items()})
    truth_s = dict(truth_s, **{k: fn(truth_s) for k, fn in derived.items()})
    per_voxel_sc = t_sc / scipy_voxels
    print(f"  {label} scipy: {1000 * per_voxel_sc:.1f} ms/voxel", flush=True)
    # lm on the very same voxels: a like-for-like error comparison
    r_same = fit.lm(model, y_s, progress=False)
    est_same = {k: r_same[k].numpy() for k in list(pnames) + list(derived)}
    anchors = [
        {
            "model": label,
            "method": f"scipy least_squares per voxel, 1 core ({scipy_voxels} voxels, extrapolated)",
            "n": scipy_voxels,
            "seconds": t_sc,
            "ms_per_voxel": 1000 * per_voxel_sc,
            "err": rel_errors(est_sc, truth_s, names),
        },
        {
            "model": label,
            "method": "qmrkit fit.lm float32 on scipy's voxels (errors like for like)",
            "n": scipy_voxels,
            "seconds": None,
            "ms_per_voxel": None,
            "err": rel_errors(est_same, truth_s, names),
        },
    ]
    rows = anchors + rows
    for r in rows:
        r["speedup"] = (
            None if r["ms_per_voxel"] is None else 1000 * per_voxel_sc / r["ms_per_voxel"]
        )
    return rows, per_voxel_sc


def _row(label, solver, n, el, res, truth, names, kind, compiled):
    est = {k: res[k].numpy() for k in names}
    extra = (
        f"{res.settings['reasons']}"
        if solver == "lm"
        else f"{res.iterations} iterations, {res.settings['stop_reason']}"
    )
    return {
        "model": label,
        "solver": solver,
        "method": f"qmrkit fit.{solver} float32 ({kind}{', L1' if solver == 'adam' else ''}"
        f"{', compiled kernel' if compiled else ''})",
        "compiled": compiled,
        "n": n,
        "seconds": el,
        "ms_per_voxel": 1000 * el / n,
        "err": rel_errors(est, truth, names),
        "note": extra,
    }


# ------------------------------------------------------------------------------------------------
# MCMC: emcee per voxel vs fit.mcmc
# ------------------------------------------------------------------------------------------------
def mcmc_rows(label, model, y, sigma, np_fun, n_emcee, steps, walkers):
    import emcee

    pnames = model.parameter_names
    lo = np.array([p.lower for p in model.parameters])
    hi = np.array([p.upper for p in model.parameters])
    D = len(pnames)
    n = len(y)
    init = fit.lm(model, y, progress=False)
    # one short warm-up run (compilation of the kernel for this shape, if any) outside the timing
    for method, w in (("ensemble", walkers), ("mh", 4)):
        fit.mcmc(
            model,
            y,
            method=method,
            noise=sigma,
            n_walkers=w,
            n_steps=4,
            burnin=1,
            init=init,
            progress=False,
        )
    rows = []
    key = pnames[0]
    for method, w in (("ensemble", walkers), ("mh", 4)):
        el, res = timed(
            lambda method=method, w=w: fit.mcmc(
                model,
                y,
                method=method,
                noise=sigma,
                n_walkers=w,
                n_steps=steps,
                burnin=0.2,
                init=init,
                progress=False,
            )
        )
        kernel = " compiled kernel," if getattr(model, "compile", None) else ""
        rows.append(
            {
                "model": label,
                "method": f"qmrkit fit.mcmc {method} ({w} "
                f"{'walkers' if method == 'ensemble' else 'chains'},{kernel} "
                f"{'compiled' if res.settings['compile'] else 'eager'} moves)",
                "n": n,
                "seconds": el,
                "ms_per_voxel": 1000 * el / n,
                "ess": float(np.median(res.ess[key].numpy())),
                "acc": float(res.acceptance.median()),
                "mean0": res.mean[key].numpy()[:n_emcee],
            }
        )
    # emcee, one voxel at a time, one walker per logp call
    starts = np.stack([init[k].numpy()[:n_emcee] for k in pnames], 1).astype(np.float64)
    ess, means = [], []
    t0 = time.perf_counter()
    for v in range(n_emcee):
        yv = y[v]

        def logp(p, yv=yv):
            if np.any(p <= lo) or np.any(p >= hi):
                return -np.inf
            r = np_fun(p) - yv
            return -0.5 * float(r @ r) / sigma**2

        rng = np.random.default_rng(v)
        p0 = starts[v] + 1e-3 * (hi - lo) * rng.standard_normal((walkers, D))
        p0 = np.clip(p0, lo + 1e-6 * (hi - lo), hi - 1e-6 * (hi - lo))
        sampler = emcee.EnsembleSampler(walkers, D, logp)
        sampler.run_mcmc(p0, steps)
        burn = steps // 5
        tau = sampler.get_autocorr_time(discard=burn, quiet=True)
        ess.append((steps - burn) * walkers / tau[0])
        means.append(sampler.get_chain(discard=burn).reshape(-1, D)[:, 0].mean())
    el = time.perf_counter() - t0
    per_voxel_e = el / n_emcee
    rows.insert(
        0,
        {
            "model": label,
            "method": f"emcee EnsembleSampler per voxel ({walkers} walkers; {n_emcee} voxels, "
            "extrapolated)",
            "n": n_emcee,
            "seconds": el,
            "ms_per_voxel": 1000 * per_voxel_e,
            "ess": float(np.median(ess)),
            "acc": None,
            "mean0": np.array(means),
        },
    )
    for r in rows:
        r["speedup"] = 1000 * per_voxel_e / r["ms_per_voxel"]
        r["ess_per_s"] = r["ess"] / (r["ms_per_voxel"] / 1000)
        # posterior mean of the first parameter on emcee's voxels, as a sanity check
        r["mean_first"] = float(np.mean(r.pop("mean0")))
    return rows


# ------------------------------------------------------------------------------------------------
# AxCaliberSMT (written elsewhere): picked up when importable
# ------------------------------------------------------------------------------------------------
def build_axcaliber() -> tuple[Any, str]:
    try:
        from qmrkit.models.diffusion import AxCaliberSMT  # type: ignore[attr-defined]
    except ImportError as exc:
        return None, f"qmrkit.models.diffusion.AxCaliberSMT is not importable ({exc})"
    sig = inspect.signature(AxCaliberSMT)
    aliases = {
        "b": AXC_B,
        "bvals": AXC_B,
        "b_values": AXC_B,
        "big_delta": AXC_DELTA,
        "Delta": AXC_DELTA,
        "small_delta": AXC_SMALL_DELTA,
        "delta": AXC_SMALL_DELTA,
    }
    kwargs = {k: v for k, v in aliases.items() if k in sig.parameters}
    try:
        model = AxCaliberSMT(**kwargs)
    except Exception as exc:  # noqa: BLE001 - report any construction problem and skip
        return None, f"AxCaliberSMT({', '.join(kwargs)}) failed: {type(exc).__name__}: {exc}"
    return model, ""


def generic_truth(model, n, seed):
    rng = np.random.default_rng(seed)
    out = {}
    for p in model.parameters:
        lo, hi = p.lower, p.upper
        if p.log_scale:
            a, b = np.log(lo), np.log(hi)
            out[p.name] = np.exp(rng.uniform(a + 0.2 * (b - a), b - 0.2 * (b - a), n))
        else:
            out[p.name] = rng.uniform(lo + 0.2 * (hi - lo), hi - 0.2 * (hi - lo), n)
    return out


def torch_fun(model):
    m64 = model.to(dtype=torch.float64)
    names = model.parameter_names

    def fun(p):
        with torch.no_grad():
            cols = {
                k: torch.tensor([[float(p[j])]], dtype=torch.float64) for j, k in enumerate(names)
            }
            return m64.forward(cols)[0].numpy()

    return fun


# ------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-samples", type=float, default=1e5, help="largest sample count (lm)")
    ap.add_argument("--adam-max", type=float, default=1e3, help="largest sample count for adam")
    ap.add_argument("--scipy-voxels", type=int, default=200)
    ap.add_argument("--emcee-voxels", type=int, default=3)
    # 256 voxels: an ensemble half-step evaluates 16·256 = 4096 parameter sets, the compiled size
    ap.add_argument("--mcmc-voxels", type=int, default=256)
    ap.add_argument("--mcmc-steps", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="10²–10³ samples, small anchors")
    args = ap.parse_args()
    if args.quick:
        args.max_samples, args.adam_max = 1e3, 1e2
        args.scipy_voxels, args.emcee_voxels = 20, 1
        args.mcmc_voxels, args.mcmc_steps = 50, 500
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    counts = [int(c) for c in 10 ** np.arange(2, int(np.log10(args.max_samples)) + 1)]
    if counts[-1] < args.max_samples:
        counts.append(int(args.max_samples))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(
        f"diffusion benchmark: {torch.get_num_threads()} torch threads, CPU, load average "
        f"{load if load is None else round(load, 2)} at start"
    )

    sigma = 1 / 50
    nexi = NEXI(NEXI_B, NEXI_DELTA, orders=(0, 2))
    # data are simulated by an eager model (float64), so that no kernel is compiled before the
    # first timed call that needs it
    nexi_sim = NEXI(NEXI_B, NEXI_DELTA, orders=(0, 2), compile=False)
    np_nexi = NumpyNexi(NEXI_B, NEXI_DELTA)
    rng_noise = np.random.default_rng(7)

    def make_nexi(n, seed=0):
        truth = nexi_truth(n, seed)
        clean = nexi_sim.simulate(truth).numpy()
        return clean + rng_noise.normal(0, sigma, clean.shape), truth

    names = ["f", "Dn", "De", "rn", "p2", "tex"]
    tex = {"tex": lambda p: (1 - np.asarray(p["f"])) / np.asarray(p["rn"])}
    print("NEXI fitting")
    rows, per_sc = fitting_rows(
        "NEXI", nexi, make_nexi, counts, args.adam_max, args.scipy_voxels, np_nexi, names, tex
    )
    print("NEXI MCMC")
    y_mc, _ = make_nexi(args.mcmc_voxels, seed=55)
    # the samplers evaluate 16·voxels (ensemble half-steps) or 4·voxels (MH) parameter sets per
    # call, below NEXI's automatic compile threshold: ask for the fused kernel (≈4× here)
    nexi_c = NEXI(NEXI_B, NEXI_DELTA, orders=(0, 2), compile=True)
    mrows = mcmc_rows("NEXI", nexi_c, y_mc, sigma, np_nexi, args.emcee_voxels, args.mcmc_steps, 32)

    axc, why = build_axcaliber()
    axc_rows: list[dict] = []
    axc_mrows: list[dict] = []
    if axc is None:
        print(f"AxCaliberSMT: skipped — {why}")
    else:
        sig_a = 1 / 30
        rng_a = np.random.default_rng(8)

        def make_axc(n, seed=0):
            truth = generic_truth(axc, n, seed)
            clean = axc.simulate(truth).numpy()
            return clean + rng_a.normal(0, sig_a, clean.shape), truth

        print("AxCaliberSMT fitting")
        axc_rows, _ = fitting_rows(
            "AxCaliberSMT",
            axc,
            make_axc,
            counts,
            args.adam_max,
            args.scipy_voxels,
            torch_fun(axc),
            list(axc.parameter_names),
            {},
        )
        print("AxCaliberSMT MCMC")
        y_a, _ = make_axc(args.mcmc_voxels, seed=56)
        axc_mrows = mcmc_rows(
            "AxCaliberSMT", axc, y_a, sig_a, torch_fun(axc), args.emcee_voxels, args.mcmc_steps, 32
        )

    def flat(rs):
        out = []
        for r in rs:
            r = dict(r)
            for k, v in r.pop("err", {}).items():
                r[f"err_{k}"] = 100 * v
            out.append(r)
        return out

    fit_cols = [
        ("method", "method", ""),
        ("n", "samples", ","),
        ("seconds", "s", ".2f"),
        ("ms_per_voxel", "ms/voxel", ".3f"),
        ("speedup", "× scipy/voxel", ".0f"),
    ]
    for label, rs in (("NEXI", rows), ("AxCaliberSMT", axc_rows)):
        if not rs:
            continue
        err_keys = list(rs[0]["err"])
        cols = fit_cols + [(f"err_{k}", f"med err {k} %", ".1f") for k in err_keys]
        print(f"\n{label}: median |estimate − truth|/truth")
        print(table(flat(rs), cols))
    mc_cols = [
        ("method", "method", ""),
        ("n", "voxels", ","),
        ("seconds", "s", ".1f"),
        ("ms_per_voxel", "ms/voxel", ".2f"),
        ("speedup", "× emcee/voxel", ".0f"),
        ("ess", "median ESS (1st param)", ".0f"),
        ("ess_per_s", "ESS/s per voxel-second", ".0f"),
        ("acc", "acceptance", ".2f"),
        ("mean_first", "mean 1st param (emcee voxels)", ".3f"),
    ]
    for label, rs in (("NEXI", mrows), ("AxCaliberSMT", axc_mrows)):
        if rs:
            print(f"\n{label} MCMC, {args.mcmc_steps} steps (20 % burn-in), known σ")
            print(table(rs, mc_cols))
    path = write_results(
        "diffusion",
        {
            "settings": vars(args),
            "load_average_start": load,
            "load_average_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "nexi": {"fit": flat(rows), "mcmc": mrows},
            "axcaliber": {"fit": flat(axc_rows), "mcmc": axc_mrows, "skipped": why or None},
            "gacelle_published": GACELLE,
        },
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
