"""Test helpers: MRD headers and images, a server running in a background thread."""

from __future__ import annotations

import asyncio
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
) -> str:
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
    <encodedSpace><matrixSize><x>16</x><y>16</y><z>1</z></matrixSize><fieldOfView_mm><x>200</x><y>200</y><z>8</z></fieldOfView_mm></encodedSpace>
    <reconSpace><matrixSize><x>16</x><y>16</y><z>1</z></matrixSize><fieldOfView_mm><x>200</x><y>200</y><z>8</z></fieldOfView_mm></reconSpace>
    <encodingLimits></encodingLimits>
    <trajectory>cartesian</trajectory>
  </encoding>
  <sequenceParameters>{seq}</sequenceParameters>
</ismrmrdHeader>"""


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

        self.server = asyncio.run_coroutine_threadsafe(make(), self.loop).result(10)
        self.port = self.server.address[1]
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.server.drain(10), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
