"""An MRD client written only with the ``ismrmrd`` package's own stream serializer.

A stand-in for the stock python-ismrmrd-server ``client.py`` (not installable here): it shares no
code with :mod:`qmrkit.serve` (its framing, header and object encoding are ismrmrd's
``ProtocolSerializer``/``ProtocolDeserializer``), so a server bug that qmrkit's own client would
mirror shows up.
"""

from __future__ import annotations

import socket

from ismrmrd.serialization import ConfigFile, ProtocolDeserializer, ProtocolSerializer
from ismrmrd.xsd import CreateFromDocument


def send_scan(
    port: int, config: str, header_xml: str, acquisitions, timeout: float = 120.0
) -> tuple[list, list[str]]:
    """Stream config, header and acquisitions, then CLOSE; return (images, texts) received."""
    header = CreateFromDocument(header_xml)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        with sock.makefile("wb") as w:
            ser = ProtocolSerializer(w)
            ser.serialize(ConfigFile(config))
            ser.serialize(header)
            for acq in acquisitions:
                ser.serialize(acq)
            ser.close()  # writes CLOSE and flushes
        images, texts = [], []
        with sock.makefile("rb") as r:
            for obj in ProtocolDeserializer(r).deserialize():  # ends at the server's CLOSE
                if isinstance(obj, str):
                    texts.append(str(obj).rstrip("\x00"))  # MRD texts end in NUL
                else:
                    images.append(obj)
    return images, texts
