"""The main job on built-in data (``make demo``).

1. MR fingerprinting (the main job): simulates a 2D FISP MRF scan of the ISMRM/NIST phantom's T2
   plate (8 coils, one rotating spiral interleaf per TR, 1000 TRs, noise, a ±30 % B1 field), writes
   it as an ISMRMRD file, reconstructs it through ``qmrkit mrf`` (subspace reconstruction, coil
   combination, B1-corrected dictionary matching) and prints reference versus measured T1/T2 per
   sphere; maps and a figure go to ``<out>/mrf``.
2. MOLLI T1 fitting: a simulated cardiac MOLLI series fitted by ``qmrkit fit molli``; truth versus
   estimate per tissue; maps in ``<out>/molli``.
3. Diffusion microstructure (NEXI): a simulated brain-like multi-shell, multi-Δ DWI slice
   (GACELLE's NEXI protocol, SNR 50) written as NIfTI + bval/bvec + protocol TSV, fitted by
   ``qmrkit fit nexi``; truth versus estimate per tissue; maps in ``<out>/diffusion``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np


def run_mrf(out: Path, *, shape: tuple[int, int] = (96, 96), seed: int = 0) -> int:
    import time as _time

    from .cli import main as cli_main
    from .io import load_nifti, to_nifti_order
    from .io.mrd import write_mrd
    from .io.nifti import save_nifti
    from .sim import mrf_scan

    out.mkdir(parents=True, exist_ok=True)
    t0 = _time.perf_counter()
    scan = mrf_scan(shape, n_coils=8, b1_amplitude=0.3, seed=seed)
    truth = scan.meta["truth"]
    path = write_mrd(out / "mrf_scan.h5", scan)
    # files and pipelines use NIfTI order (x, y); the simulation's truth is array order (y, x)
    b1 = to_nifti_order(truth["B1"], 2).astype(np.float32)
    b1_path = save_nifti(out / "b1.nii.gz", b1, affine=scan.affine)
    print(
        f"simulated a 2D FISP MRF scan: {shape[0]}x{shape[1]}, 8 coils, {scan.meta['frames']} TRs, "
        f"{scan.meta['samples']} spiral samples per TR, B1 0.7-1.3 -> {path} ({_time.perf_counter() - t0:.1f} s)"
    )
    status = cli_main(
        [
            "mrf",
            str(path),
            "--b1",
            str(b1_path),
            "--out",
            str(out / "maps"),
            "--dictionary-step",
            "0.08",
            "--b1-step",
            "0.1",
        ]
    )
    if status != 0:
        return status
    t1, _ = load_nifti(out / "maps" / "T1map.nii.gz")
    t2, _ = load_nifti(out / "maps" / "T2map.nii.gz")
    labels = to_nifti_order(truth["labels"], 2)
    print(
        f"\n{'sphere':<7} {'T1 ref (ms)':>11} {'T1 (ms)':>9} {'err':>7}   {'T2 ref (ms)':>11} {'T2 (ms)':>9} {'err':>7}"
    )
    e1s, e2s = [], []
    for s in range(1, 15):
        sel = labels == s
        r1, r2 = truth["T1"][truth["labels"] == s][0], truth["T2"][truth["labels"] == s][0]
        m1, m2 = float(np.median(t1[sel])), float(np.median(t2[sel]))
        e1, e2 = m1 / r1 - 1, m2 / r2 - 1
        note = "  (T2 above the dictionary's 500 ms)" if r2 > 500 else ""
        if not note:
            e1s.append(abs(e1))
            e2s.append(abs(e2))
        print(
            f"{s:<7} {r1:>11.1f} {m1:>9.1f} {100 * e1:>6.1f}%   {r2:>11.1f} {m2:>9.1f} {100 * e2:>6.1f}%{note}"
        )
    print(
        f"median |error| over spheres in range: T1 {100 * np.median(e1s):.1f}%, T2 {100 * np.median(e2s):.1f}%"
    )
    print(f"MRF maps and figure (maps.png) are in {out / 'maps'}")
    return 0


def run(out: Path, *, shape: tuple[int, int] = (128, 128), snr: float = 50.0, seed: int = 0) -> int:
    from .cli import main as cli_main
    from .io import load_nifti, save_nifti
    from .sim import MOLLI_TI, cardiac_phantom, molli_series

    out.mkdir(parents=True, exist_ok=True)
    ph = cardiac_phantom(shape)
    pd = np.asarray(ph["PD"]) * 1000.0
    series, truth = molli_series(ph["T1"], pd, MOLLI_TI, snr=snr, seed=seed)
    series_path = save_nifti(out / "molli_series.nii.gz", series.astype(np.float32))
    mask_path = save_nifti(out / "mask.nii.gz", (np.asarray(ph["labels"]) > 0).astype(np.uint8))
    print(
        f"simulated MOLLI series {series.shape} (TI = {', '.join(f'{t:g}' for t in MOLLI_TI)} ms, "
        f"SNR {snr:g}, Rician noise) -> {series_path}"
    )
    t0 = time.perf_counter()
    status = cli_main(
        [
            "fit",
            "molli",
            "--data",
            str(series_path),
            "--mask",
            str(mask_path),
            "--ti",
            ",".join(f"{t:g}" for t in MOLLI_TI),
            "--out",
            str(out / "maps"),
            "--no-progress",
        ]
    )
    if status != 0:
        return status
    elapsed = time.perf_counter() - t0
    t1_est, _ = load_nifti(out / "maps" / "T1map.nii.gz")
    labels = np.asarray(ph["labels"])
    print()
    print(
        f"{'tissue':<12} {'voxels':>6} {'true T1 (ms)':>13} {'fitted T1 (ms)':>18} {'bias':>8} {'|err| median':>13}"
    )
    worst = 0.0
    for lab, name in ph["tissues"].items():
        if lab == 0:
            continue
        sel = labels == lab
        if not sel.any():
            continue
        true = float(np.asarray(ph["T1"])[sel][0])
        est = t1_est[sel]
        bias = (np.mean(est) - true) / true
        med = np.median(np.abs(est - true) / true)
        worst = max(worst, abs(bias))
        print(
            f"{name:<12} {sel.sum():>6} {true:>13.0f} {np.mean(est):>10.0f} ± {np.std(est):>5.0f} "
            f"{100 * bias:>7.2f}% {100 * med:>12.2f}%"
        )
    print(f"\nfit + file I/O took {elapsed:.2f} s; largest tissue bias {100 * worst:.2f}%")
    print(f"maps, figure (maps.png) and sidecar (fit.json) are in {out / 'maps'}")
    return 0


def run_diffusion(
    out: Path, *, shape: tuple[int, int] = (18, 18), snr: float = 50.0, seed: int = 0
) -> int:
    """NEXI on a simulated DWI slice through files and ``qmrkit fit nexi`` (module docs)."""
    from .cli import main as cli_main
    from .io import load_nifti, save_nifti
    from .sim import dwi_phantom

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ph = dwi_phantom(shape, snr=snr, seed=seed)
    paths = ph.save(out)
    # NEXI describes grey and white matter; CSF (free water) is left out of the fit here
    tissue = (ph.labels == 4) | (ph.labels == 5)
    mask = save_nifti(
        out / "tissue_mask.nii.gz", tissue[:, :, None].astype(np.uint8), affine=ph.affine
    )
    n_shells = len({(b, d) for b, d in zip(ph.bvals, ph.big_delta, strict=True) if b > 0})
    print(
        f"simulated a {shape[0]}x{shape[1]} DWI slice: {ph.bvals.size} volumes ({n_shells} shells "
        f"over Δ = {', '.join(f'{d:g}' for d in sorted(set(ph.big_delta)))} ms, b up to "
        f"{ph.bvals.max():g} ms/µm²), SNR {snr:g}, Rician noise -> {paths['dwi']} "
        f"({time.perf_counter() - t0:.1f} s)"
    )
    t0 = time.perf_counter()
    argv = ["fit", "nexi", "--dwi", str(paths["dwi"]), "--bval", str(paths["bval"])]
    argv += ["--bvec", str(paths["bvec"]), "--protocol", str(paths["protocol"])]
    status = cli_main([*argv, "--mask", str(mask), "--out", str(out / "maps"), "--no-progress"])
    if status != 0:
        return status
    elapsed = time.perf_counter() - t0
    names = {"fn": "f", "Dn": "Dn", "De": "De", "p2": "p2", "tex": "tex"}
    est = {k: load_nifti(out / "maps" / f"{k}.nii.gz")[0][:, :, 0] for k in names}
    print(f"\n{'tissue':<13} {'voxels':>6}  " + "".join(f"{k + ' true/fit':>19}" for k in names))
    for lab in (4, 5):
        sel = ph.labels == lab
        cells = "".join(
            f"{np.median(ph.truth[v][sel]):>9.3g} /{np.median(est[k][sel]):>8.3g}"
            for k, v in names.items()
        )
        print(f"{ph.tissues[lab]:<13} {int(sel.sum()):>6}  {cells}")
    print(
        "(medians per tissue; fn: neurite fraction, Dn/De: µm²/ms, p2: dispersion index, tex: "
        "exchange time, ms.\n White matter's low signal at high b sits on the Rician noise floor, "
        "which biases fn, Dn and p2 there;\n with Gaussian noise of the same σ its medians are "
        "within 1 % of the truth, t_ex within 8 %)"
    )
    print(f"fit + file I/O took {elapsed:.1f} s; NEXI maps and figure are in {out / 'maps'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("demo-output"))
    p.add_argument("--snr", type=float, default=50.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--job", choices=("all", "mrf", "molli", "diffusion"), default="all")
    args = p.parse_args(argv)
    status = 0
    if args.job in ("all", "mrf"):
        print("== MR fingerprinting ==")
        status = run_mrf(args.out / "mrf", seed=args.seed)
    if status == 0 and args.job in ("all", "molli"):
        print("\n== MOLLI T1 fitting ==")
        status = run(args.out / "molli", snr=args.snr, seed=args.seed)
    if status == 0 and args.job in ("all", "diffusion"):
        print("\n== Diffusion microstructure (NEXI) ==")
        status = run_diffusion(args.out / "diffusion", snr=args.snr, seed=args.seed)
    return status


if __name__ == "__main__":
    sys.exit(main())
