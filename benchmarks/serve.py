"""Online service: protocol throughput, server overhead, compression, concurrent scans.

1. Protocol throughput on loopback (MB/s): one scan of raw acquisitions streamed to a ``null``
   pipeline, qmrkit's server versus python-ismrmrd-server (the FIRE reference server) with its
   ``null`` config — the same client (qmrkit's) for both, same run. The reference server is not
   part of qmrkit: pass its checkout with ``--reference DIR`` (skipped otherwise).
2. Server overhead: ``fit:molli`` on a 128×128 series through the server versus calling
   ``qmrkit.pipelines.fit_maps`` in-process.
3. SNR-bounded compression: ratio and encode/decode speed versus tolerance on simulated 16-coil
   k-space with noise.
4. Concurrent scans: N ``qmrkit serve`` processes behind HAProxy, 4 clients, scans per minute.

Usage: python benchmarks/serve.py [--reference /path/to/python-ismrmrd-server]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _common import table, write_results  # noqa: E402
from qmrkit.pipelines import fit_maps  # noqa: E402
from qmrkit.serve import decode_samples, encode_samples, exchange, send_scan  # noqa: E402
from qmrkit.sim import MOLLI_TI, molli_series  # noqa: E402
from serve.helpers import BackgroundServer, header_xml, series_images  # noqa: E402


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(port: int, proc=None, timeout: float = 60) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(proc.stdout.read() if proc.stdout else "process exited")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(port)


def acquisitions(n: int, channels: int, samples: int):
    import ismrmrd

    rng = np.random.default_rng(0)
    block = (
        rng.normal(size=(channels, samples)) + 1j * rng.normal(size=(channels, samples))
    ).astype(np.complex64)
    out = []
    for i in range(n):
        a = ismrmrd.Acquisition.from_array(block)
        a.scan_counter = i
        out.append(a)
    return out


def throughput(port: int, acqs, repeat: int = 3) -> float:
    best = float("inf")
    mb = sum(a.data.nbytes + 340 for a in acqs) / 1e6
    for _ in range(repeat):
        t0 = time.perf_counter()
        asyncio.run(
            exchange("127.0.0.1", port, config="null", header_xml=header_xml(), acquisitions=acqs)
        )
        best = min(best, time.perf_counter() - t0)
    return mb / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--reference", type=Path, help="checkout of python-ismrmrd-server (for the anchor)"
    )
    ap.add_argument("--acquisitions", type=int, default=1000)
    args = ap.parse_args()
    results: dict = {}

    # 1. throughput
    acqs = acquisitions(args.acquisitions, 16, 512)
    rows = []
    # both servers run as separate processes (the client must not share their interpreter)
    port = _port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "qmrkit", "serve", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _wait(port, proc)
        throughput(port, acqs[:10], repeat=1)
        rows.append({"server": "qmrkit serve (null)", "mb_s": throughput(port, acqs)})
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    if args.reference and (args.reference / "main.py").exists():
        port = _port()
        with tempfile.TemporaryDirectory() as tmp:
            ref = Path(tmp) / "ref"
            shutil.copytree(args.reference, ref)
            proc = subprocess.Popen(
                [sys.executable, "main.py", "-p", str(port), "-H", "127.0.0.1"],
                cwd=ref,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            try:
                _wait(port, proc)
                rows.append(
                    {"server": "python-ismrmrd-server (null)", "mb_s": throughput(port, acqs)}
                )
            except Exception as exc:  # report, do not invent a number
                print(f"reference server failed: {exc}")
            finally:
                proc.kill()
                proc.wait()
                proc.stdout.close()
    else:
        print("python-ismrmrd-server not given (--reference): anchor row skipped")
    base = rows[-1]["mb_s"] if len(rows) > 1 else None
    for r in rows:
        r["ratio"] = r["mb_s"] / base if base else None
    print(
        f"\n1. Protocol throughput, {len(acqs)} acquisitions × 16 channels × 512 samples "
        f"({sum(a.data.nbytes for a in acqs) / 1e6:.0f} MB), loopback"
    )
    print(
        table(
            rows,
            [("server", "server", ""), ("mb_s", "MB/s", ".0f"), ("ratio", "× reference", ".2f")],
        )
    )
    results["throughput"] = rows

    # 2. overhead versus in-process
    t1 = np.random.default_rng(0).uniform(400, 2000, (128, 128))
    series, _ = molli_series(t1, 1000.0, MOLLI_TI, snr=50, seed=0)
    series = series.astype(np.float32)
    images = series_images(series)
    fit_maps(series[:4, :4], "molli", {"ti": list(MOLLI_TI)})
    best_direct = min(
        _timed(lambda: fit_maps(series, "molli", {"ti": list(MOLLI_TI)})) for _ in range(3)
    )
    with BackgroundServer() as srv:
        hdr = header_xml(ti=MOLLI_TI)
        asyncio.run(
            exchange(
                "127.0.0.1", srv.port, config="fit:molli", header_xml=hdr, images=images[:1] * 8
            )
        )
        best_srv = min(
            _timed(
                lambda: asyncio.run(
                    exchange(
                        "127.0.0.1", srv.port, config="fit:molli", header_xml=hdr, images=images
                    )
                )
            )
            for _ in range(3)
        )
    over = {
        "direct_s": best_direct,
        "server_s": best_srv,
        "overhead_pct": 100 * (best_srv - best_direct) / best_direct,
    }
    print(
        f"\n2. MOLLI 128×128 fit: in-process {best_direct:.3f} s, through the server {best_srv:.3f} s "
        f"(overhead {over['overhead_pct']:.1f} %)"
    )
    results["overhead"] = over

    # 3. compression
    from qmrkit.sim import cardiac_phantom

    rng = np.random.default_rng(1)
    img = np.asarray(cardiac_phantom((256, 256))["PD"]) * 1000.0
    yy, xx = np.mgrid[-1:1:256j, -1:1:256j]
    maps = np.stack(
        [
            np.exp(-((yy - np.cos(a)) ** 2 + (xx - np.sin(a)) ** 2))
            for a in np.linspace(0, 6.28, 16, endpoint=False)
        ]
    )
    k = np.fft.fftshift(
        np.fft.fft2(np.fft.ifftshift(maps * img, axes=(-2, -1)), norm="ortho"), axes=(-2, -1)
    )
    sigma = 2.0
    k = (k + rng.normal(0, sigma, k.shape) + 1j * rng.normal(0, sigma, k.shape)).astype(
        np.complex64
    )
    lines = [np.ascontiguousarray(k[:, i, :]) for i in range(256)]
    crow = []
    for tol in (0.005, 0.01, 0.02, 0.05):
        t0 = time.perf_counter()
        enc = [encode_samples(x, np.full(16, sigma), tol) for x in lines]
        te = time.perf_counter() - t0
        t0 = time.perf_counter()
        dec = [decode_samples(p, 16, 256) for p in enc]
        td = time.perf_counter() - t0
        err = np.concatenate([(a - b).ravel() for a, b in zip(dec, lines, strict=True)])
        raw = sum(x.nbytes for x in lines)
        crow.append(
            {
                "tol": 100 * tol,
                "ratio": raw / sum(len(p) for p in enc),
                "loss": 100 * (np.sqrt(1 + np.mean(np.abs(err) ** 2) / (2 * sigma**2)) - 1),
                "enc": raw / te / 1e6,
                "dec": raw / td / 1e6,
            }
        )
    print("\n3. SNR-bounded compression, 16 coils, 256×256 k-space with noise")
    print(
        table(
            crow,
            [
                ("tol", "tolerance %", ".1f"),
                ("ratio", "ratio", ".2f"),
                ("loss", "measured SNR loss %", ".3f"),
                ("enc", "encode MB/s", ".0f"),
                ("dec", "decode MB/s", ".0f"),
            ],
        )
    )
    results["compression"] = crow

    # 4. concurrent scans behind HAProxy
    crows = []
    if shutil.which("haproxy"):
        tmpl = (
            Path(__file__).resolve().parents[1] / "deploy" / "haproxy" / "haproxy.cfg.template"
        ).read_text()
        small = series_images(series[:64, :64])
        for n_workers in (1, 2, 4):
            ports = [_port() for _ in range(n_workers)]
            procs = [
                subprocess.Popen(
                    [sys.executable, "-m", "qmrkit", "serve", "--port", str(p)],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
                for p in ports
            ]
            front = _port()
            with tempfile.TemporaryDirectory() as tmp:
                cfg = Path(tmp) / "h.cfg"
                cfg.write_text(
                    tmpl.format(
                        frontend_port=front,
                        servers="\n".join(
                            f"    server r{i} 127.0.0.1:{p} maxconn 1" for i, p in enumerate(ports)
                        ),
                    )
                )
                hap = subprocess.Popen(["haproxy", "-f", str(cfg)])
                try:
                    for p, pr in zip(ports, procs, strict=True):
                        _wait(p, pr)
                    _wait(front)
                    for p in ports:  # warm each worker
                        send_scan(
                            "127.0.0.1",
                            p,
                            config="fit:molli",
                            header_xml=header_xml(ti=MOLLI_TI),
                            images=small,
                        )
                    n_scans = 8
                    t0 = time.perf_counter()
                    with ThreadPoolExecutor(4) as pool:
                        list(
                            pool.map(
                                lambda _, front=front: send_scan(
                                    "127.0.0.1",
                                    front,
                                    config="fit:molli",
                                    header_xml=header_xml(ti=MOLLI_TI),
                                    images=small,
                                ),
                                range(n_scans),
                            )
                        )
                    el = time.perf_counter() - t0
                    crows.append({"workers": n_workers, "scans_per_min": 60 * n_scans / el})
                finally:
                    hap.kill()
                    hap.wait()
                    for pr in procs:
                        pr.kill()
                        pr.wait()
                        pr.stdout.close()
        for r in crows:
            r["speedup"] = r["scans_per_min"] / crows[0]["scans_per_min"]
        print("\n4. Concurrent MOLLI 64×64 scans (4 clients) behind HAProxy")
        print(
            table(
                crows,
                [
                    ("workers", "worker processes", ""),
                    ("scans_per_min", "scans/min", ".1f"),
                    ("speedup", "× 1 worker", ".2f"),
                ],
            )
        )
    else:
        print("haproxy not installed: concurrent-scan section skipped")
    results["concurrent"] = crows
    path = write_results("serve", results)
    print(f"\nwrote {path}")


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
