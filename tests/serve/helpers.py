"""Test helpers: MRD headers and images, a server running in a background thread."""

from __future__ import annotations

import asyncio
import socket
import threading

import numpy as np

from qmrkit.serve import Server
from qmrkit.serve.mrd_images import array_to_image


def header_xml(
    *,
    ti=None,
    te=None,
    tr=None,
    flip=None,
    patient="PAT-123",
    device="SCANNER-1",
    session="FOR-1",
    measurement="M-1",
    dependencies=(),
    matrix=(16, 16, 1),
) -> str:
    """A minimal MRD header; ``matrix`` (x, y, z) is the encoded and recon matrix."""
    mx, my, mz = matrix
    seq = ""
    for tag, vals in (("TR", tr), ("TE", te), ("TI", ti), ("flipAngle_deg", flip)):
        for v in vals or ():
            seq += f"<{tag}>{v}</{tag}>"
    deps = "".join(
        f"<measurementDependency><dependencyType>{t}</dependencyType><measurementID>{m}</measurementID>"
        f"</measurementDependency>"
        for t, m in dependencies
    )
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD">
  <subjectInformation><patientID>{patient}</patientID></subjectInformation>
  <measurementInformation><measurementID>{measurement}</measurementID><patientPosition>HFS</patientPosition>
    <frameOfReferenceUID>{session}</frameOfReferenceUID>{deps}</measurementInformation>
  <acquisitionSystemInformation><deviceID>{device}</deviceID><receiverChannels>4</receiverChannels></acquisitionSystemInformation>
  <experimentalConditions><H1resonanceFrequency_Hz>123000000</H1resonanceFrequency_Hz></experimentalConditions>
  <encoding>
    <encodedSpace><matrixSize><x>{mx}</x><y>{my}</y><z>{mz}</z></matrixSize><fieldOfView_mm><x>200</x><y>200</y><z>8</z></fieldOfView_mm></encodedSpace>
    <reconSpace><matrixSize><x>{mx}</x><y>{my}</y><z>{mz}</z></matrixSize><fieldOfView_mm><x>200</x><y>200</y><z>8</z></fieldOfView_mm></reconSpace>
    <encodingLimits></encodingLimits>
    <trajectory>cartesian</trajectory>
  </encoding>
  <sequenceParameters>{seq}</sequenceParameters>
</ismrmrdHeader>"""


def with_ids(
    xml: str,
    *,
    patient: str | None = "PAT-123",
    device: str | None = "SCANNER-1",
    session: str | None = "FOR-1",
    measurement: str | None = None,
    dependencies=(),
) -> str:
    """``xml`` (e.g. written by ``qmrkit.io.write_mrd``) with subject/device/session ids (None:
    leave the field out), a measurement id and ``measurementDependency`` entries set."""
    from ismrmrd import xsd

    h = xsd.CreateFromDocument(xml)
    h.subjectInformation = xsd.subjectInformationType(patientID=patient) if patient else None
    if h.acquisitionSystemInformation is None:
        h.acquisitionSystemInformation = xsd.acquisitionSystemInformationType()
    h.acquisitionSystemInformation.deviceID = device
    mi = h.measurementInformation or xsd.measurementInformationType(patientPosition="HFS")
    mi.frameOfReferenceUID = session
    if measurement is not None:
        mi.measurementID = measurement
    mi.measurementDependency = [
        xsd.measurementDependencyType(dependencyType=t, measurementID=m) for t, m in dependencies
    ]
    h.measurementInformation = mi
    out = h.toXML()
    return out.decode() if isinstance(out, bytes) else out


def series_images(series: np.ndarray) -> list:
    """(*spatial, n) → one MRD image per measurement."""
    return [
        array_to_image(series[..., i], series_index=0, image_index=i)
        for i in range(series.shape[-1])
    ]


class BackgroundServer:
    """A Server on 127.0.0.1 (ephemeral port) in its own thread and event loop."""

    def __init__(self, **kwargs):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.kwargs = kwargs
        self.server: Server | None = None

    def __enter__(self) -> BackgroundServer:
        self.thread.start()

        async def make():
            s = Server("127.0.0.1", 0, **self.kwargs)
            await s.start()
            return s

        # an isolated server warms its worker processes up before it listens
        self.server = asyncio.run_coroutine_threadsafe(make(), self.loop).result(180)
        self.port = self.server.address[1]
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.server.drain(10), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def raw_session(port: int, payload: bytes, *, read: bool = True, timeout: float = 20.0) -> bytes:
    """Send raw bytes, half-close, and return everything the server sends until it closes
    (``read=False``: send and leave)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(payload)
            if not read:
                return b""
            s.shutdown(socket.SHUT_WR)
        except OSError:  # the server may refuse and close before everything was sent
            pass
        chunks = []
        while True:
            try:
                c = s.recv(65536)
            except OSError:  # reset, timeout
                break
            if not c:
                break
            chunks.append(c)
    return b"".join(chunks)
