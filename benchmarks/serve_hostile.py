"""Online service under hostile load: what one client can no longer take from the others.

Measured in one run, on loopback, each against an anchor measured in the same run:

1. Slow clients held: N connections that sent a config and then drip (N = 600 by default); a good
   ``fit:molli`` session's wall time with them versus without them; the server's resident memory
   cost per held connection; how long until every dripper was cut by the minimum data rate.
2. A header that takes a second to parse (0.9 MB, 7,000 dependencies): ``null`` session latency of
   other clients during the parse versus before it; the largest event-loop delay.
3. A corpus of bad inputs (truncations at and inside every message boundary, corrupted bytes,
   random bytes, oversized lengths, bad scans): how many were tried, how many got an error and
   CLOSE, and the good session's maps after them versus the in-process fit (max relative
   difference; must be 0 to float32 precision).

Usage: python benchmarks/serve_hostile.py [--slow-clients 600]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import struct
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.serve.helpers import BackgroundServer, header_xml, series_images  # noqa: E402

from _common import table, write_results  # noqa: E402
from qmrkit.pipelines import fit_maps  # noqa: E402
from qmrkit.serve import Limits, exchange  # noqa: E402
from qmrkit.serve.mrd_images import image_to_array  # noqa: E402
from qmrkit.serve.protocol import (  # noqa: E402
    MessageId,
    encode_close,
    encode_config_file,
    encode_object,
    encode_text,
)
from qmrkit.sim import MOLLI_TI, molli_series  # noqa: E402


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(x.split()[1]) for x in f if x.startswith("VmRSS")) / 1024


def _peak_rss_mb() -> float:
    """The process's peak resident set size since the last :func:`_reset_peak_rss` (VmHWM)."""
    with open("/proc/self/status") as f:
        return next(int(x.split()[1]) for x in f if x.startswith("VmHWM")) / 1024


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0); False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _series() -> np.ndarray:
    t1 = np.random.default_rng(3).uniform(500, 1800, (64, 64))
    return molli_series(t1, 1000.0, MOLLI_TI, snr=80, seed=3)[0].astype(np.float32)


def _good(port: int, series: np.ndarray) -> tuple[float, float]:
    """(wall seconds, max relative difference to the in-process fit) of one fit:molli session."""
    t0 = time.perf_counter()
    r = asyncio.run(
        exchange(
            "127.0.0.1",
            port,
            config="fit:molli",
            header_xml=header_xml(ti=MOLLI_TI),
            images=series_images(series),
        )
    )
    wall = time.perf_counter() - t0
    assert not r.errors, r.texts
    (t1,) = [image_to_array(i) for i in r.images if "T1map" in str(i.meta["SeriesDescription"])]
    ref = np.nan_to_num(
        fit_maps(series, "molli", {"ti": list(MOLLI_TI)}, mask="auto")["T1"].numpy()
    )
    ok = ref != 0
    return wall, float(np.max(np.abs(t1[ok] - ref[ok]) / np.abs(ref[ok])))


def _raw(port: int, payload: bytes, timeout: float = 30.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        out = b""
        while True:
            try:
                c = s.recv(65536)
            except OSError:
                break
            if not c:
                break
            out += c
    return out


def slow_clients(n: int, series: np.ndarray) -> dict:
    lim = Limits(min_rate_bytes_s=50, rate_window_s=4.0)
    with BackgroundServer(limits=lim) as srv:
        _good(srv.port, series)  # warm
        alone = min(_good(srv.port, series)[0] for _ in range(3))
        before = _rss_mb()
        socks = []
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", srv.port))
            s.sendall(encode_config_file("null") + b"\x05")  # then half a message id
            socks.append(s)
        time.sleep(0.5)
        held_mb = _rss_mb() - before
        with_slow, diff = _good(srv.port, series)
        t0 = time.monotonic()
        cut = 0
        for s in socks:
            s.settimeout(max(20 - (time.monotonic() - t0), 0.1))
            try:
                while s.recv(4096):
                    pass
                cut += 1
            except OSError:
                pass
            s.close()
        all_cut_s = time.monotonic() - t0
    return {
        "slow_clients": n,
        "good_alone_s": alone,
        "good_with_slow_s": with_slow,
        "ratio": with_slow / alone,
        "max_rel_diff": diff,
        "rss_per_conn_kb": 1024 * held_mb / n,
        "cut": cut,
        "cut_within_s": all_cut_s,
    }


def slow_header() -> dict:
    deps = [(f"Noise{i}", f"M-{i}") for i in range(7000)]
    xml = header_xml(dependencies=deps)
    with BackgroundServer() as srv:

        async def probe():
            t = time.perf_counter()
            await exchange("127.0.0.1", srv.port, config="null", header_xml=header_xml())
            return time.perf_counter() - t

        async def scenario():
            loop = asyncio.get_running_loop()
            base = [await probe() for _ in range(10)]
            srv.server.max_loop_lag = 0.0
            payload = encode_config_file("null") + encode_text(xml, MessageId.HEADER)
            t0 = time.perf_counter()
            slow = loop.run_in_executor(None, _raw, srv.port, payload + encode_close(), 120.0)
            await asyncio.sleep(0.1)
            during = [await probe() for _ in range(10)]
            await slow
            return base, during, time.perf_counter() - t0

        base, during, parse_s = asyncio.run(scenario())
        lag = srv.server.max_loop_lag
    return {
        "header_bytes": len(xml),
        "slow_session_s": parse_s,
        "probe_before_ms": 1e3 * float(np.median(base)),
        "probe_during_ms": 1e3 * float(np.median(during)),
        "probe_during_max_ms": 1e3 * float(np.max(during)),
        "max_loop_lag_ms": 1e3 * lag,
    }


def corpus(series: np.ndarray) -> dict:
    import ismrmrd

    from qmrkit.serve.client import read_mrd_file
    from qmrkit.sim import raw_scan

    tmp = Path(__import__("tempfile").mkdtemp())
    raw_scan((32, 32), n_coils=4, acceleration=1, seed=0, path=tmp / "scan.h5")
    header, acqs, _ = read_mrd_file(tmp / "scan.h5")
    msgs = [encode_config_file("sense"), encode_text(header, MessageId.HEADER)]
    msgs += [encode_object(a) for a in acqs[:12]]
    whole = b"".join(msgs)
    bounds = np.cumsum([0] + [len(m) for m in msgs])
    rng = np.random.default_rng(0)
    cases: list[bytes] = [whole[:c] for c in bounds[1:]]
    cases += [whole[: int(c) + 5] for c in bounds[1:-1]]
    for _ in range(150):
        blob = bytearray(whole)
        i = int(rng.integers(0, len(blob) - 4))
        blob[i : i + 4] = rng.integers(0, 256, 4, dtype=np.uint8).tobytes()
        cases.append(bytes(blob) + encode_close())
    cases += [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in (1, 3, 100, 10_000)]
    base = encode_config_file("null") + encode_text(header_xml(), MessageId.HEADER)
    cases += [
        base + encode_text("[" * 200_000) + encode_close(),
        base + b"\x05\x00" + struct.pack("<I", 1 << 31),
        encode_config_file("null") + b"\x03\x00" + struct.pack("<I", 1 << 30),
        base + b"\x99\x00",
    ]
    nan = [ismrmrd.Acquisition.from_array(np.full((4, 64), np.nan, np.complex64))]
    cases.append(
        encode_config_file("sense")
        + encode_text(header, MessageId.HEADER)
        + b"".join(encode_object(a) for a in nan)
        + encode_close()
    )
    replied = 0
    with BackgroundServer(limits=Limits(read_timeout=2.0)) as srv:
        # the server runs in this process: its memory is this process's (the client side of
        # each case is a socket and a few kB)
        rss_before = _rss_mb()
        reset = _reset_peak_rss()
        t0 = time.perf_counter()
        for c in cases:
            out = _raw(srv.port, c)
            replied += out.endswith(encode_close())
        elapsed = time.perf_counter() - t0
        peak = _peak_rss_mb() if reset else float("nan")
        rss_after = _rss_mb()
        _, diff = _good(srv.port, series)
        errors = {k[0]: int(v._value.get()) for k, v in srv.server.metrics.errors._metrics.items()}
    return {
        "cases": len(cases),
        "answered_with_close": replied,
        "seconds": elapsed,
        "errors_by_kind": errors,
        "good_max_rel_diff_after": diff,
        "rss_before_MB": rss_before,
        "rss_peak_MB": peak,
        "rss_after_MB": rss_after,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slow-clients", type=int, default=600)
    ap.add_argument(
        "--parts",
        default="slow,header,corpus",
        help="comma-separated subset of slow,header,corpus (a subset writes "
        "serve-hostile-<parts>.json, leaving the full run's file alone)",
    )
    args = ap.parse_args()
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    series = _series()
    out: dict = {}
    if "slow" in parts:
        out["slow_clients"] = _slow_part(args, series)
    if "header" in parts:
        out["slow_header"] = _header_part()
    if "corpus" in parts:
        out["corpus"] = _corpus_part(series)
    full = set(parts) == {"slow", "header", "corpus"}
    name = "serve-hostile" if full else "serve-hostile-" + "-".join(parts)
    path = write_results(name, out)
    print(f"\nwrote {path}")


def _slow_part(args: argparse.Namespace, series: np.ndarray) -> dict:
    print("== slow clients")
    sc = slow_clients(args.slow_clients, series)
    print(
        table(
            [sc],
            [
                ("slow_clients", "held", "d"),
                ("good_alone_s", "good scan alone (s)", ".3f"),
                ("good_with_slow_s", "with them (s)", ".3f"),
                ("ratio", "ratio", ".2f"),
                ("max_rel_diff", "maps vs in-process", ".1e"),
                ("rss_per_conn_kb", "RSS per held conn (kB)", ".1f"),
                ("cut", "cut by min rate", "d"),
                ("cut_within_s", "all cut within (s)", ".1f"),
            ],
        )
    )
    return sc


def _header_part() -> dict:
    print("\n== a header that takes long to parse")
    sh = slow_header()
    print(
        table(
            [sh],
            [
                ("header_bytes", "header bytes", "d"),
                ("slow_session_s", "its session (s)", ".2f"),
                ("probe_before_ms", "other session before (ms)", ".1f"),
                ("probe_during_ms", "during (ms, median)", ".1f"),
                ("probe_during_max_ms", "during (ms, max)", ".1f"),
                ("max_loop_lag_ms", "max loop lag (ms)", ".1f"),
            ],
        )
    )
    return sh


def _corpus_part(series: np.ndarray) -> dict:
    print("\n== bad-input corpus")
    co = corpus(series)
    print(
        table(
            [co],
            [
                ("cases", "inputs", "d"),
                ("answered_with_close", "answered with CLOSE", "d"),
                ("seconds", "total (s)", ".1f"),
                ("good_max_rel_diff_after", "good maps after vs in-process", ".1e"),
                ("rss_before_MB", "RSS before (MB)", ".0f"),
                ("rss_peak_MB", "peak RSS during (MB)", ".0f"),
                ("rss_after_MB", "RSS after (MB)", ".0f"),
            ],
        )
    )
    print("errors by kind:", co["errors_by_kind"])
    return co


if __name__ == "__main__":
    main()
