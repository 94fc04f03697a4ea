"""The MRD (ISMRMRD v1) streaming protocol: framing with size limits, for asyncio streams.

Every message is a little-endian ``uint16`` id and a body (see the table in the project's
REFERENCE). The ``ismrmrd`` package's header structs and (de)serialisers do the byte layout; this
module adds what a server facing the network needs: every length is checked against limits
*before* anything is allocated, every read has a timeout, and every malformed input raises
:class:`~qmrkit.errors.ProtocolError` with a message saying what was wrong.

Compressed acquisitions (flag ``ACQ_COMPRESSION2``) carry, after the header and trajectory, a
``uint32`` byte count and a payload from :mod:`qmrkit.serve.compression` instead of raw samples.
"""

from __future__ import annotations

import asyncio
import ctypes
import io
import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Protocol

import numpy as np

from ..errors import ProtocolError


class MessageId(IntEnum):
    CONFIG_FILE = 1
    CONFIG_TEXT = 2
    HEADER = 3
    CLOSE = 4
    TEXT = 5
    ACQUISITION = 1008
    DEPENDENCY_QUERY = 1019  # Gadgetron's answer to a dependency query: uint64 length + meta XML
    IMAGE = 1022
    WAVEFORM = 1026


CONFIG_FILE_SIZE = 1024
_IMAGE_DTYPES = {
    1: np.uint16,
    2: np.int16,
    3: np.uint32,
    4: np.int32,
    5: np.float32,
    6: np.float64,
    7: np.complex64,
    8: np.complex128,
}


@dataclass(frozen=True)
class Limits:
    """Bounds on what one message, and one session, may ask the server to allocate or wait for.

    Per message: sizes are checked from the declared lengths *before* anything is read or
    allocated (a compressed acquisition counts the size it would expand to). Per session (see
    :class:`qmrkit.serve.session.SessionBudget`): total bytes scaled to the scan the header
    describes (``session_budget_factor`` × expected + ``session_budget_slack_bytes``, at most
    ``max_session_bytes``),
    a message count, a minimum data rate (``min_rate_bytes_s`` over every ``rate_window_s``;
    0 disables) and a deadline for the whole upload.
    """

    max_text_bytes: int = 1 << 20  # TEXT and CONFIG_TEXT (JSON parameters, Gadgetron XML configs)
    # the MRD XML header: real ones are 5-200 kB; parsing takes ~1.4 s per MB and its objects
    # cost the garbage collector (a pause for every thread), so a larger one is refused
    max_header_bytes: int = 1 << 20
    max_channels: int = 1024
    max_samples: int = 1 << 20
    max_trajectory_dims: int = 16
    max_acquisition_bytes: int = 256 << 20
    max_image_bytes: int = 2 << 30
    max_attribute_bytes: int = 16 << 20
    max_waveform_bytes: int = 64 << 20
    read_timeout: float = 120.0  # seconds without progress before a connection is dropped
    max_session_bytes: int = 8 << 30
    session_budget_factor: float = 4.0
    session_budget_slack_bytes: int = 64 << 20
    max_session_messages: int = 4_000_000
    min_rate_bytes_s: float = 1024.0
    rate_window_s: float = 30.0
    session_deadline_s: float = 3600.0

    @property
    def max_preheader_bytes(self) -> int:
        """What a session may send before its header: a config and the header itself."""
        return self.max_header_bytes + self.max_text_bytes + 4096


@dataclass
class Message:
    """A decoded message: its id and value (str, ismrmrd object, or None for CLOSE).

    Read with ``decode=False``, a message whose decoding costs more than copying bytes (an
    acquisition, image or waveform) arrives with ``value=None`` and a ``decode`` callable;
    :meth:`decoded` runs it (in a worker thread on the server, so the event loop never waits
    on it). ``decoded_bytes`` is what the decoded value will hold, known before decoding.
    """

    id: MessageId
    value: Any = None
    nbytes: int = 0  # bytes on the wire (for metrics)
    compressed: bool = False
    decode: Callable[[], Any] | None = None
    decoded_bytes: int = 0

    def decoded(self) -> Message:
        if self.decode is not None:
            self.value, self.decode = self.decode(), None
        return self


class ReadBudget(Protocol):
    """What :class:`MessageReader` asks of a session budget (see ``serve.session``)."""

    def received(self, n: int) -> None: ...

    def timeout(self) -> tuple[float, str]: ...


def _acq_header_type():
    import ismrmrd

    return ismrmrd.AcquisitionHeader


class MessageReader:
    """Reads messages from an ``asyncio.StreamReader`` with limits and timeouts.

    With a ``budget`` (:class:`qmrkit.serve.session.SessionBudget`) every read waits at most what
    the budget allows (read timeout, minimum data rate, session deadline) and reports the bytes
    it got, so a client that drips bytes is cut even inside one long message.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        limits: Limits | None = None,
        budget: ReadBudget | None = None,
    ):
        self.reader = reader
        self.limits = limits or Limits()
        self.budget = budget
        self.bytes_read = 0

    def _timeout(self) -> tuple[float, str]:
        if self.budget is not None:
            return self.budget.timeout()
        t = self.limits.read_timeout
        return t, f"no data for {t:g} s"

    def _got(self, n: int) -> None:
        self.bytes_read += n
        if self.budget is not None:
            self.budget.received(n)

    async def _exactly(self, n: int, what: str) -> bytes:
        if n == 0:
            return b""
        # already buffered (StreamReader keeps its bytes in _buffer): no need to arm a timeout
        if len(self.reader._buffer) >= n:
            data = await self.reader.readexactly(n)
            self._got(n)
            return data
        # read what arrives, as it arrives: each piece is accounted (data rate) and the wait for
        # the next piece is bounded, so a slow client cannot hold a connection inside a message
        parts = bytearray()
        while len(parts) < n:
            seconds, why = self._timeout()
            try:
                chunk = await _with_timeout(self.reader.read(n - len(parts)), seconds)
            except asyncio.TimeoutError:
                raise ProtocolError(f"timed out waiting for {what}: {why}") from None
            if not chunk:
                raise ProtocolError(
                    f"connection closed in the middle of {what}: expected {n} bytes, got {len(parts)}"
                )
            parts += chunk
            self._got(len(chunk))
        return bytes(parts)

    async def read(self, decode: bool = True) -> Message:
        """The next message; raises ProtocolError on malformed input, EOFError at a clean end.

        With ``decode=False`` acquisitions, images and waveforms come undecoded (see
        :class:`Message`); every size is still checked before their bytes are read.
        """
        seconds, why = self._timeout()
        try:
            head = await _with_timeout(self.reader.readexactly(2), seconds)
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                raise EOFError("the peer closed the connection") from None
            raise ProtocolError("connection closed inside a message id") from None
        except asyncio.TimeoutError:
            raise ProtocolError(f"timed out waiting for a message: {why}") from None
        self._got(2)
        (mid,) = struct.unpack("<H", head)
        start = self.bytes_read - 2
        if mid == MessageId.CONFIG_FILE:
            raw = await self._exactly(CONFIG_FILE_SIZE, "a CONFIG_FILE body")
            return Message(
                MessageId.CONFIG_FILE,
                _text(raw.split(b"\x00", 1)[0], "CONFIG_FILE"),
                self.bytes_read - start,
            )
        if mid in (MessageId.CONFIG_TEXT, MessageId.HEADER, MessageId.TEXT):
            (n,) = struct.unpack("<I", await self._exactly(4, "a text length"))
            limit = (
                self.limits.max_header_bytes
                if mid == MessageId.HEADER
                else self.limits.max_text_bytes
            )
            if n > limit:
                raise ProtocolError(
                    f"{MessageId(mid).name} message of {n} bytes exceeds the limit of {limit}"
                )
            raw = await self._exactly(n, f"a {MessageId(mid).name} body")
            return Message(
                MessageId(mid),
                _text(raw.rstrip(b"\x00"), MessageId(mid).name),
                self.bytes_read - start,
            )
        if mid == MessageId.CLOSE:
            return Message(MessageId.CLOSE, None, 2)
        if mid == MessageId.DEPENDENCY_QUERY:
            (n,) = struct.unpack("<Q", await self._exactly(8, "a dependency answer length"))
            if n > self.limits.max_text_bytes:
                raise ProtocolError(
                    f"DEPENDENCY_QUERY message of {n} bytes exceeds the limit of "
                    f"{self.limits.max_text_bytes}"
                )
            raw = await self._exactly(n, "a DEPENDENCY_QUERY body")
            return Message(
                MessageId.DEPENDENCY_QUERY,
                _text(raw.rstrip(b"\x00"), "DEPENDENCY_QUERY"),
                self.bytes_read - start,
            )
        if mid == MessageId.ACQUISITION:
            msg = await self._acquisition()
        elif mid == MessageId.IMAGE:
            msg = await self._image()
        elif mid == MessageId.WAVEFORM:
            msg = await self._waveform()
        else:
            raise ProtocolError(
                f"unknown message id {mid}; known ids: {[int(m) for m in MessageId]}"
            )
        msg.nbytes = self.bytes_read - start
        return msg.decoded() if decode else msg

    async def _acquisition(self) -> Message:
        import ismrmrd

        H = ismrmrd.AcquisitionHeader
        raw = await self._exactly(ctypes.sizeof(H), "an acquisition header")
        h = H.from_buffer_copy(raw)
        lim = self.limits
        ns, nc, nt = int(h.number_of_samples), int(h.active_channels), int(h.trajectory_dimensions)
        if nc > lim.max_channels or ns > lim.max_samples or nt > lim.max_trajectory_dims:
            raise ProtocolError(
                f"acquisition with {nc} channels × {ns} samples × {nt} trajectory dims exceeds the limits "
                f"({lim.max_channels} channels, {lim.max_samples} samples, {lim.max_trajectory_dims} dims)"
            )
        compressed = bool(h.flags & (1 << (ismrmrd.ACQ_COMPRESSION2 - 1)))
        # what the acquisition holds once decoded, compressed or not: checked before expanding
        decoded = 4 * nt * ns + 8 * nc * ns
        if decoded > lim.max_acquisition_bytes:
            raise ProtocolError(
                f"acquisition of {decoded} bytes exceeds the limit of {lim.max_acquisition_bytes}"
            )
        traj = await self._exactly(4 * nt * ns, "acquisition trajectory")
        if compressed:
            (nbytes,) = struct.unpack("<I", await self._exactly(4, "a compressed length"))
            if nbytes > max(8 * nc * ns * 2, 4096) or nbytes > lim.max_acquisition_bytes:
                raise ProtocolError(
                    f"compressed acquisition payload of {nbytes} bytes is implausibly large "
                    f"for {nc} channels × {ns} samples"
                )
            payload = await self._exactly(nbytes, "compressed acquisition data")
        else:
            payload = await self._exactly(8 * nc * ns, "acquisition data")

        def decode() -> Any:
            if compressed:
                from .compression import decode_samples

                data = decode_samples(payload, nc, ns)
                h.flags &= ~(1 << (ismrmrd.ACQ_COMPRESSION2 - 1))
            else:
                data = np.frombuffer(payload, dtype=np.complex64).reshape(nc, ns)
            acq = ismrmrd.Acquisition(h)
            if nt:
                acq.traj[:] = np.frombuffer(traj, dtype=np.float32).reshape(ns, nt)
            if nc and ns:
                acq.data[:] = data
            return acq

        return Message(
            MessageId.ACQUISITION, compressed=compressed, decode=decode, decoded_bytes=decoded
        )

    async def _image(self) -> Message:
        import ismrmrd

        H = ismrmrd.ImageHeader
        raw = await self._exactly(ctypes.sizeof(H), "an image header")
        h = H.from_buffer_copy(raw)
        (nattr,) = struct.unpack("<Q", await self._exactly(8, "an image attribute length"))
        if nattr > self.limits.max_attribute_bytes:
            raise ProtocolError(
                f"image attributes of {nattr} bytes exceed the limit of {self.limits.max_attribute_bytes}"
            )
        attr = await self._exactly(nattr, "image attributes")
        dt = _IMAGE_DTYPES.get(int(h.data_type))
        if dt is None:
            raise ProtocolError(
                f"image data_type {int(h.data_type)} is not one of {sorted(_IMAGE_DTYPES)}"
            )
        n = int(h.matrix_size[0]) * int(h.matrix_size[1]) * int(h.matrix_size[2]) * int(h.channels)
        nbytes = n * np.dtype(dt).itemsize
        if nbytes > self.limits.max_image_bytes:
            raise ProtocolError(
                f"image of {nbytes} bytes exceeds the limit of {self.limits.max_image_bytes}"
            )
        pixels = await self._exactly(nbytes, "image pixels")

        def decode() -> Any:
            buf = io.BytesIO(raw + struct.pack("<Q", nattr) + attr + pixels)
            try:
                return ismrmrd.Image.deserialize_from(buf.read)
            except Exception as exc:  # malformed meta XML and the like
                raise ProtocolError(f"cannot decode image: {str(exc)[:200]}") from None

        return Message(MessageId.IMAGE, decode=decode, decoded_bytes=nbytes + nattr)

    async def _waveform(self) -> Message:
        import ismrmrd

        H = ismrmrd.WaveformHeader
        raw = await self._exactly(ctypes.sizeof(H), "a waveform header")
        h = H.from_buffer_copy(raw)
        nbytes = 4 * int(h.channels) * int(h.number_of_samples)
        if nbytes > self.limits.max_waveform_bytes:
            raise ProtocolError(
                f"waveform of {nbytes} bytes exceeds the limit of {self.limits.max_waveform_bytes}"
            )
        data = await self._exactly(nbytes, "waveform data")

        def decode() -> Any:
            try:
                return ismrmrd.Waveform.deserialize_from(io.BytesIO(raw + data).read)
            except Exception as exc:
                raise ProtocolError(f"cannot decode waveform: {str(exc)[:200]}") from None

        return Message(MessageId.WAVEFORM, decode=decode, decoded_bytes=nbytes)


if hasattr(asyncio, "timeout"):  # Python ≥ 3.11: a cheap deadline, no extra task per read

    async def _with_timeout(coro: Any, seconds: float) -> Any:
        async with asyncio.timeout(seconds):
            return await coro

else:  # pragma: no cover - Python 3.10

    async def _with_timeout(coro: Any, seconds: float) -> Any:
        return await asyncio.wait_for(coro, timeout=seconds)


def _text(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"{what} message is not valid UTF-8 text: {exc}") from None


# ------------------------------------------------------------------------------------------------
# encoding
# ------------------------------------------------------------------------------------------------
def encode_config_file(name: str) -> bytes:
    raw = name.encode("utf-8")
    if len(raw) >= CONFIG_FILE_SIZE:
        raise ProtocolError(
            f"config name too long ({len(raw)} bytes; at most {CONFIG_FILE_SIZE - 1})"
        )
    return struct.pack("<H", MessageId.CONFIG_FILE) + raw + b"\x00" * (CONFIG_FILE_SIZE - len(raw))


def encode_text(text: str, mid: MessageId = MessageId.TEXT) -> bytes:
    """A length-prefixed text message; like the FIRE tools, a NUL is appended and counted."""
    raw = text.encode("utf-8") + b"\x00"
    return struct.pack("<HI", mid, len(raw)) + raw


def encode_close() -> bytes:
    return struct.pack("<H", MessageId.CLOSE)


class DependencyAnswer(dict):
    """A pipeline output sent as a DEPENDENCY_QUERY (1019) message (attribute → values)."""


def encode_dependency_answer(answer: dict[str, list[str]]) -> bytes:
    """A DEPENDENCY_QUERY (1019) message: uint16 id, uint64 length, then the answer as an ISMRMRD
    meta container (``<ismrmrdMeta>`` XML), the layout Gadgetron's dependency-query writer uses."""
    import ismrmrd

    meta = ismrmrd.Meta()
    for name, values in answer.items():
        meta[name] = [str(v) for v in values]
    raw = meta.serialize().encode("utf-8")
    return struct.pack("<HQ", MessageId.DEPENDENCY_QUERY, len(raw)) + raw


def decode_dependency_answer(xml: str) -> dict[str, list[str]]:
    """The dict of :func:`encode_dependency_answer` back from its meta XML."""
    import ismrmrd

    if not xml.strip():
        return {}
    try:
        meta = ismrmrd.Meta.deserialize(xml)
    except Exception as exc:  # the XML parser's errors vary; the message is what matters
        raise ProtocolError(f"DEPENDENCY_QUERY answer is not ISMRMRD meta XML: {exc}") from None
    return {k: list(v) if isinstance(v, list) else [v] for k, v in meta.items()}


def encode_object(obj: Any) -> bytes:
    """An ismrmrd Acquisition, Image, Waveform or header (serialised by the ismrmrd package), or a
    :class:`DependencyAnswer`."""
    if isinstance(obj, DependencyAnswer):
        return encode_dependency_answer(obj)
    import ismrmrd
    from ismrmrd.serialization import ProtocolSerializer
    from ismrmrd.xsd import ismrmrdHeader

    if isinstance(obj, ismrmrdHeader):
        return encode_text(obj.toXML(), MessageId.HEADER)
    if not isinstance(obj, ismrmrd.Acquisition | ismrmrd.Image | ismrmrd.Waveform):
        raise ProtocolError(f"cannot encode {type(obj).__name__} as an MRD message")
    buf = io.BytesIO()
    ProtocolSerializer(buf).serialize(obj)
    return buf.getvalue()


def encode_compressed_acquisition(acq: Any, sigma: np.ndarray, tolerance: float) -> bytes:
    """An acquisition whose samples are quantised within the SNR-loss ``tolerance``."""
    import ismrmrd

    from .compression import encode_samples

    payload = encode_samples(np.asarray(acq.data), sigma, tolerance)
    h = acq.getHead()
    h.flags |= 1 << (ismrmrd.ACQ_COMPRESSION2 - 1)
    traj = np.ascontiguousarray(acq.traj, dtype=np.float32).tobytes()
    return (
        struct.pack("<H", MessageId.ACQUISITION)
        + bytes(h)
        + traj
        + struct.pack("<I", len(payload))
        + payload
    )
