"""The main job on built-in data (``make demo``).

Simulates a MOLLI series (5(3)3 inversion times, Rician noise at SNR 50) of a cardiac phantom with
known T1, writes it as NIfTI, fits it through the same code path as ``qmrkit fit molli`` (batched
Levenberg–Marquardt), prints truth versus estimate per tissue and writes the maps, a figure and a
JSON sidecar to the output folder.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("demo-output"))
    p.add_argument("--snr", type=float, default=50.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    return run(args.out, snr=args.snr, seed=args.seed)


if __name__ == "__main__":
    sys.exit(main())
