"""MRD dependency queries (message 1019, as Gadgetron answers them).

A scanner asks which calibrations of its subject/device/session the server already holds, so it can
skip sending a noise scan. The answer lists the scan's own subject only, comes back in Gadgetron's
wire layout (uint16 id, uint64 length, ISMRMRD meta XML), and is read here both by our client and
by a hand-written socket reader that parses the bytes independently with ``ismrmrd.Meta``.
"""

import asyncio
import json
import socket
import struct
import subprocess
import sys

import ismrmrd
import numpy as np
import pytest

from qmrkit.serve import DirectoryStore, exchange
from qmrkit.serve.protocol import (
    MessageId,
    encode_close,
    encode_config_file,
    encode_text,
)
from qmrkit.serve.store import DependencyKey, dependency_answer

from .helpers import BackgroundServer, header_xml


def _query(port, header):
    return asyncio.run(exchange("127.0.0.1", port, config="dependency-query", header_xml=header))


def _fill(store: DirectoryStore) -> None:
    sigma = {"sigma": np.ones(4, np.float32)}
    a = DependencyKey("PAT-A", "SCANNER-1", "FOR-1")
    b = DependencyKey("PAT-B", "SCANNER-1", "FOR-1")
    store.put(a, "noise", "NOISE-A1", sigma)
    store.put(a, "noise", "NOISE-A1", sigma)  # a second version: listed once
    store.put(a, "b1", "B1-A", {"b1": np.ones((4, 4), np.float32)})
    store.put(b, "noise", "NOISE-B1", sigma)
    store.put(a, "noise", "NOISE-OLD", sigma, ttl_s=-1.0)  # expired: never listed


def test_answer_lists_only_this_subjects_calibrations(tmp_path):
    store = DirectoryStore(tmp_path / "store")
    _fill(store)
    hdr_a = header_xml(
        patient="PAT-A",
        dependencies=[("Noise", "NOISE-A1"), ("Noise", "NOISE-B1"), ("B1map", "B1-A")],
    )
    hdr_b = header_xml(patient="PAT-B")
    hdr_anon = header_xml(patient="", dependencies=[("Noise", "NOISE-A1")])
    with BackgroundServer(store=store) as srv:
        ra, rb, ranon = (_query(srv.port, h) for h in (hdr_a, hdr_b, hdr_anon))
    assert ra.dependencies == {
        "NoiseDependencies": ["NOISE-A1"],
        "B1Dependencies": ["B1-A"],
        # subject B's noise is named by A's header but belongs to B: reported missing for A
        "FoundDependencies": ["Noise:NOISE-A1", "B1map:B1-A"],
        "MissingDependencies": ["Noise:NOISE-B1"],
        "status": ["success"],
    }
    assert rb.dependencies["NoiseDependencies"] == ["NOISE-B1"]
    assert rb.dependencies["B1Dependencies"] == []
    assert ranon.dependencies["NoiseDependencies"] == []
    assert ranon.dependencies["MissingDependencies"] == ["Noise:NOISE-A1"]
    assert ranon.dependencies["status"][0] == "incomplete"
    assert "lacks subjectInformation/patientID" in ranon.dependencies["status"][1]
    assert ra.texts == [
        "dependency-query: 1 noise and 1 B1 calibrations stored for this subject/device/session; "
        "named in the header: 2 found, 1 missing"
    ]
    assert not ra.errors and not rb.errors and not ranon.errors


def test_wire_layout_read_by_an_independent_socket_client(tmp_path):
    """Bytes as Gadgetron writes them: id 1019, uint64 length, ISMRMRD meta XML."""
    store = DirectoryStore(tmp_path / "store")
    _fill(store)
    hdr = header_xml(patient="PAT-A", dependencies=[("Noise", "NOISE-A1")])
    with BackgroundServer(store=store) as srv:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as s:
            s.sendall(
                encode_config_file("dependency-query")
                + encode_text(hdr, MessageId.HEADER)
                + encode_close()
            )
            data = b""
            while chunk := s.recv(65536):
                data += chunk
    (mid,) = struct.unpack_from("<H", data, 0)
    assert mid == 1019
    (n,) = struct.unpack_from("<Q", data, 2)
    meta = ismrmrd.Meta.deserialize(data[10 : 10 + n].decode())
    assert meta["NoiseDependencies"] == "NOISE-A1" or meta["NoiseDependencies"] == ["NOISE-A1"]
    assert meta["FoundDependencies"] in ("Noise:NOISE-A1", ["Noise:NOISE-A1"])
    rest = data[10 + n :]
    # then the TEXT line and CLOSE
    (tid, tlen) = struct.unpack_from("<HI", rest, 0)
    assert tid == 5 and rest[6 : 6 + tlen].rstrip(b"\x00").decode().startswith("dependency-query:")
    assert rest[6 + tlen :] == struct.pack("<H", 4)


def test_answer_without_store_or_header(tmp_path):
    from ismrmrd import xsd

    hdr = xsd.CreateFromDocument(header_xml(dependencies=[("Noise", "N-1")]))
    ans = dependency_answer(None, hdr)
    assert ans["status"][0] == "incomplete" and "--store" in ans["status"][1]
    assert ans["MissingDependencies"] == ["Noise:N-1"]
    with BackgroundServer(store=DirectoryStore(tmp_path / "s")) as srv:
        r = asyncio.run(exchange("127.0.0.1", srv.port, config="dependency-query", header_xml=""))
    # an empty header is refused at the boundary with one line, and nothing else comes back
    assert r.dependencies is None
    assert len(r.errors) == 1


def test_cli_send_writes_the_answer(tmp_path):
    """``qmrkit send --config dependency-query`` sends the header only and writes the answer."""
    import shutil

    from qmrkit.serve.client import read_mrd_file
    from qmrkit.sim import raw_scan

    from .helpers import with_ids

    scan = tmp_path / "scan.h5"
    raw_scan((32, 32), n_coils=4, seed=1, path=scan)
    xml, _, _ = read_mrd_file(scan)
    tagged = tmp_path / "tagged.h5"
    shutil.copy(scan, tagged)
    ds = ismrmrd.Dataset(str(tagged), "dataset", create_if_needed=False)
    ds.write_xml_header(with_ids(xml, patient="PAT-A", dependencies=[("Noise", "NOISE-A1")]))
    ds.close()
    store = DirectoryStore(tmp_path / "store")
    _fill(store)
    with BackgroundServer(store=store) as srv:
        out = tmp_path / "out"
        p = subprocess.run(
            [
                sys.executable,
                "-m",
                "qmrkit",
                "send",
                str(tagged),
                "--port",
                str(srv.port),
                "--config",
                "dependency-query",
                "--out",
                str(out),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert p.returncode == 0, p.stderr
    ans = json.loads((out / "dependencies.json").read_text())
    assert ans["NoiseDependencies"] == ["NOISE-A1"]
    assert ans["FoundDependencies"] == ["Noise:NOISE-A1"]
    # only the header crossed the socket: a few kB, not the scan's raw data
    sent = int(p.stdout.split("sent ")[1].split(" bytes")[0].replace(",", ""))
    assert sent < 16_384 < scan.stat().st_size


@pytest.mark.parametrize("n", [0, 1 << 30])
def test_client_refuses_oversized_or_empty_answers(n):
    """A reply claiming more than the text limit is refused before its bytes are read."""
    from qmrkit.errors import ProtocolError
    from qmrkit.serve.protocol import Limits, MessageReader

    async def read():
        r = asyncio.StreamReader()
        r.feed_data(struct.pack("<HQ", 1019, n))
        r.feed_eof()
        return await MessageReader(r, Limits()).read()

    if n == 0:
        msg = asyncio.run(read())
        assert msg.id == MessageId.DEPENDENCY_QUERY and msg.value == ""
    else:
        with pytest.raises(ProtocolError, match="exceeds the limit"):
            asyncio.run(read())
