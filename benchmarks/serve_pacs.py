"""``qmrkit serve --send-to``: does forwarding maps to a PACS delay the reply, and what does the
background write + C-STORE cost per session?

Starts a private Orthanc (Debian ``orthanc``; the test helper ``tests/orthanc.py``), then runs
``--sessions`` ``fit:molli`` sessions of an N×N MOLLI series through a server without and with
``send_to``, timing each reply (client side) and, from the server's metrics, the background
DICOM write (Parametric Map + MR) and C-STORE per session, and the drain at the end.

    python benchmarks/serve_pacs.py [--size 64] [--sessions 3]   # writes results/serve-pacs.json
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

from _common import table, write_results  # noqa: E402


def run(size: int, sessions: int) -> list[dict]:
    import numpy as np
    from tests.orthanc import running_orthanc
    from tests.serve.helpers import BackgroundServer, header_xml, series_images

    from qmrkit.serve import exchange
    from qmrkit.sim import MOLLI_TI, molli_series

    t1 = np.random.default_rng(0).uniform(500, 1800, (size, size))
    series, _ = molli_series(t1, 1000.0, MOLLI_TI, snr=80, seed=0)
    rows = []
    with tempfile.TemporaryDirectory() as d, running_orthanc(Path(d), "BENCH") as orthanc:
        for send_to in (None, orthanc["pacs"]):
            with BackgroundServer(**({"send_to": send_to} if send_to else {})) as srv:
                times = []
                for _ in range(sessions):
                    t0 = time.perf_counter()
                    reply = asyncio.run(
                        exchange(
                            "127.0.0.1",
                            srv.port,
                            config="fit:molli",
                            header_xml=header_xml(ti=MOLLI_TI),
                            images=series_images(series.astype(np.float32)),
                        )
                    )
                    times.append(time.perf_counter() - t0)
                    assert not reply.errors, reply.texts
                t0 = time.perf_counter()
            drain = time.perf_counter() - t0  # __exit__ drained: queued sends finished
            server = srv.server
            row = {
                "case": "send_to Orthanc" if send_to else "no PACS",
                "reply_first_s": times[0],
                "reply_median_s": float(np.median(times[1:] or times)),
                "drain_s": drain,
            }
            if send_to:
                m = server.metrics.pacs_stage
                row["write_s"] = m.labels("write")._sum.get() / sessions
                row["send_s"] = m.labels("send")._sum.get() / sessions
                row["sent"] = server.pacs.counts["sent"]
            rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--sessions", type=int, default=3)
    args = ap.parse_args()
    load = os.getloadavg()[0]
    rows = run(args.size, args.sessions)
    print(f"fit:molli {args.size}x{args.size}, {args.sessions} sessions, load average {load:.1f}")
    print(
        table(
            rows,
            [
                ("case", "case", ""),
                ("reply_first_s", "first reply s", ".2f"),
                ("reply_median_s", "later replies (median) s", ".2f"),
                ("write_s", "DICOM write / session s", ".2f"),
                ("send_s", "C-STORE / session s", ".2f"),
                ("drain_s", "drain s", ".2f"),
                ("sent", "sent", ""),
            ],
        )
    )
    path = write_results(
        "serve-pacs",
        {"size": args.size, "sessions": args.sessions, "load_average": load, "rows": rows},
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
