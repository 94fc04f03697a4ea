"""A private Orthanc PACS for tests (Debian package ``orthanc``): JSON config in a temporary
folder, storage and index there, DICOM and HTTP on free loopback ports, no remote access, no
authentication, the called AE title checked. Used by ``tests/io/test_pacs.py`` (``qmrkit fit
--send-to``) and ``tests/serve/test_serve_pacs.py`` (``qmrkit serve --send-to``)."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

ORTHANC = shutil.which("Orthanc") or next(
    (p for p in ("/usr/sbin/Orthanc", "/usr/bin/Orthanc") if Path(p).exists()), None
)
SKIP_REASON = "the Orthanc server is not installed (Debian package 'orthanc'; .ci/run installs it)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 10.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


@contextlib.contextmanager
def running_orthanc(root: Path, aet: str) -> Iterator[dict]:
    """Start Orthanc with its files under ``root``; yields ``url`` (REST), ``pacs``
    (``pacs://AET@127.0.0.1:port``) and ``port``; skips the test without Orthanc."""
    if ORTHANC is None:
        pytest.skip(SKIP_REASON)
    dicom_port, http_port = free_port(), free_port()
    config = {
        "Name": "qmrkit-test",
        "DicomAet": aet,
        "DicomPort": dicom_port,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "StorageDirectory": str(root / "storage"),
        "IndexDirectory": str(root / "index"),
        "DicomCheckCalledAet": True,
        "Plugins": [],
    }
    (root / "orthanc.json").write_text(json.dumps(config))
    log = (root / "orthanc.log").open("w")
    proc = subprocess.Popen(
        [ORTHANC, str(root / "orthanc.json")], cwd=root, stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{http_port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if json.loads(http_get(url + "/system", 2))["DicomAet"] == aet:
                break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("Orthanc did not start:\n" + (root / "orthanc.log").read_text()[-2000:])
        time.sleep(0.2)
    try:
        yield {"url": url, "pacs": f"pacs://{aet}@127.0.0.1:{dicom_port}", "port": dicom_port}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def stored_instances(url: str) -> dict[str, list]:
    """SeriesDescription -> datasets stored by Orthanc (read back through GET .../file)."""
    import pydicom

    out: dict[str, list] = {}
    for iid in json.loads(http_get(url + "/instances")):
        ds = pydicom.dcmread(io.BytesIO(http_get(f"{url}/instances/{iid}/file")))
        out.setdefault(str(ds.SeriesDescription), []).append(ds)
    return out
