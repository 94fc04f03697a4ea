"""Memory of a raw-data session: acquisitions streamed into k-space vs buffered, then assembled.

The server feeds each acquisition of a ``sense``/``tv``/``gridding``/``mrf`` session to
``io.mrd.ScanAssembler`` as it arrives (streamed); before, it kept every acquisition and assembled
the list at the end (``scan_from_acquisitions`` on a list: buffered). This script measures the
peak of traced allocations (``tracemalloc``; NumPy reports its buffers to it) from the first
acquisition to the finished scan, for Cartesian scans of increasing size, and reports it in
units of the k-space grid (``coils × matrix × 8`` bytes). Acquisitions are generated one at a
time, as a socket delivers them, and only the buffered path keeps them.

    python benchmarks/serve_memory.py            # writes benchmarks/results/serve-memory.json
"""

from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from _common import table, write_results  # noqa: E402

CASES = [
    # (name, shape (z, y, x) or (y, x), coils, acceleration, calibration lines, separate calib)
    ("2D 256² 32 coils R=2", (256, 256), 32, 2, 24, False),
    ("2D 256² 32 coils R=3, separate calib", (256, 256), 32, 3, 24, True),
    ("3D 32×128×128 8 coils R=2×1", (32, 128, 128), 8, (2, 1), 16, False),
]


def measure(shape, coils, accel, calib, separate) -> dict:
    from qmrkit.io.mrd import (
        ScanAssembler,
        _cartesian_acquisitions,
        header_for_scan,
        scan_from_acquisitions,
    )
    from qmrkit.sim import raw_scan

    scan = raw_scan(
        shape,
        n_coils=coils,
        acceleration=accel,
        calib=calib,
        separate_calibration=separate,
        noise_level=0.0,
        seed=0,
    )
    xml = header_for_scan(scan)
    grid = scan.kdata.numel() * 8
    out = {"grid_MB": grid / 2**20}
    for mode in ("streamed", "buffered"):
        tracemalloc.start()
        t0 = time.perf_counter()
        if mode == "streamed":
            asm = ScanAssembler(xml)
            n = 0
            for a in _cartesian_acquisitions(scan):
                asm.add(a)
                n += 1
            result = asm.finish()
        else:
            acqs = list(_cartesian_acquisitions(scan))
            n = len(acqs)
            result = scan_from_acquisitions(xml, acqs)
            del acqs
        seconds = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert result.kdata.shape == scan.kdata.shape
        out[f"{mode}_peak_MB"] = peak / 2**20
        out[f"{mode}_peak_grids"] = peak / grid
        out[f"{mode}_s"] = seconds
        out["acquisitions"] = n
        del result
    out["ratio_buffered_over_streamed"] = out["buffered_peak_MB"] / out["streamed_peak_MB"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.parse_args()
    rows = []
    for name, shape, coils, accel, calib, separate in CASES:
        r = measure(shape, coils, accel, calib, separate)
        rows.append({"case": name, **r})
        print(f"{name}: {r}", flush=True)
    print(
        table(
            rows,
            [
                ("case", "scan", "s"),
                ("acquisitions", "acquisitions", "d"),
                ("grid_MB", "k-space grid (MB)", ".1f"),
                ("streamed_peak_MB", "streamed peak (MB)", ".1f"),
                ("buffered_peak_MB", "buffered peak (MB)", ".1f"),
                ("ratio_buffered_over_streamed", "buffered / streamed", ".2f"),
            ],
        )
    )
    path = write_results("serve-memory", {"cases": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
