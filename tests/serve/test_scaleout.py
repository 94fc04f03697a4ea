"""Scale-out: several `qmrkit serve` processes behind HAProxy (the local stand-in for the
Kubernetes Service), concurrent clients, one replica killed mid-run."""

import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from qmrkit.serve import send_scan
from qmrkit.serve.mrd_images import image_to_array
from qmrkit.sim import MOLLI_TI, molli_series

from .helpers import header_xml, series_images

pytestmark = pytest.mark.slow

TEMPLATE = Path(__file__).resolve().parents[2] / "deploy" / "haproxy" / "haproxy.cfg.template"


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(port, proc, timeout=60):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited: {proc.stdout.read()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"port {port} did not open")


@pytest.fixture
def cluster(tmp_path):
    if shutil.which("haproxy") is None:
        pytest.skip("haproxy is not installed (apt-get install haproxy); .ci/run installs it")
    store = tmp_path / "store"
    script = tmp_path / "replica.py"
    # replicas run the real fit pipeline, slowed down so that scans overlap and a kill lands mid-scan
    script.write_text(
        "import sys, time\nfrom qmrkit.serve import register\nfrom qmrkit.serve.handlers import HANDLERS\n"
        "from qmrkit.cli import main\n"
        "@register('slowfit')\ndef slowfit(session, arg):\n    time.sleep(1.5)\n"
        "    return HANDLERS['fit'](session, arg)\n"
        "raise SystemExit(main(['serve', '--port', sys.argv[1], '--store', sys.argv[2]]))\n"
    )
    ports = [_port(), _port()]
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(p), str(store)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for p in ports
    ]
    front = _port()
    servers = "\n".join(
        f"    server r{i} 127.0.0.1:{p} maxconn 1 check inter 300ms fall 1 rise 2"
        for i, p in enumerate(ports)
    )
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(TEMPLATE.read_text().format(frontend_port=front, servers=servers))
    hap = subprocess.Popen(
        ["haproxy", "-f", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        for p, proc in zip(ports, procs, strict=True):
            _wait(p, proc)
        _wait(front, hap)
        yield front, procs
    finally:
        for proc in (*procs, hap):
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)


def test_every_scan_completes_when_a_replica_dies(cluster):
    front, procs = cluster
    t1 = np.random.default_rng(1).uniform(500, 1800, (8, 8))
    series, _ = molli_series(t1, 1000.0, MOLLI_TI, snr=100, seed=1)
    images = series_images(series.astype(np.float32))

    def scan(i):
        return send_scan(
            "127.0.0.1",
            front,
            retries=6,
            backoff_s=0.5,
            config="slowfit:molli",
            header_xml=header_xml(ti=MOLLI_TI),
            images=images,
        )

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(scan, i) for i in range(4)]
        time.sleep(1.0)  # both replicas busy, two scans queued in HAProxy
        procs[0].kill()
        replies = [f.result(timeout=120) for f in futures]
    for r in replies:
        assert not r.errors, r.texts
        t1_map = next(
            image_to_array(im) for im in r.images if "T1map" in str(im.meta["SeriesDescription"])
        )
        assert np.median(np.abs(t1_map - t1) / t1) < 0.02


def test_dependency_stored_through_one_replica_is_seen_by_the_other(cluster):
    from qmrkit import models

    front, procs = cluster
    rng = np.random.default_rng(3)
    b1 = rng.uniform(0.7, 1.3, (6, 6)).astype(np.float32)
    t1 = rng.uniform(600, 1800, (6, 6))
    fa, tr = [3.0, 8.0, 15.0, 20.0], 15.0
    series = (
        models.VfaT1(fa, tr, b1=b1).simulate({"M0": np.full(b1.shape, 3000.0), "T1": t1}).numpy()
    )
    r = send_scan(
        "127.0.0.1",
        front,
        config="store-b1",
        header_xml=header_xml(measurement="B1-1", matrix=(6, 6, 1)),
        images=series_images(b1[..., None]),
    )
    assert not r.errors
    procs[0].kill()  # whichever replica stored it, the survivor must still find it
    hdr = header_xml(tr=[tr], flip=fa, measurement="VFA-2", dependencies=[("B1map", "B1-1")])
    for _ in range(2):
        r = send_scan(
            "127.0.0.1",
            front,
            retries=6,
            backoff_s=0.5,
            config="fit:vfa",
            header_xml=hdr,
            images=series_images(series.astype(np.float32)),
        )
        assert "using the stored B1 map" in r.texts
        t1_map = next(
            image_to_array(im) for im in r.images if "T1map" in str(im.meta["SeriesDescription"])
        )
        assert np.median(np.abs(t1_map - t1) / t1) < 1e-3
