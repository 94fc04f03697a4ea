"""Framing against the ismrmrd package's own serializer and deserializer; compression."""

import asyncio
import io

import ismrmrd
import numpy as np
import pytest
from ismrmrd.serialization import ConfigFile, ConfigText, ProtocolDeserializer, ProtocolSerializer

from qmrkit.errors import ProtocolError
from qmrkit.serve import (
    Limits,
    MessageId,
    MessageReader,
    decode_samples,
    encode_samples,
    quantiser_step,
)
from qmrkit.serve.protocol import (
    encode_close,
    encode_compressed_acquisition,
    encode_object,
    encode_text,
)

from .helpers import header_xml


def _acq(nc=4, ns=64, nt=2, seed=0, flags=0):
    rng = np.random.default_rng(seed)
    a = ismrmrd.Acquisition.from_array(
        (rng.normal(size=(nc, ns)) + 1j * rng.normal(size=(nc, ns))).astype(np.complex64),
        rng.normal(size=(ns, nt)).astype(np.float32) if nt else None,
    )
    a.scan_counter = seed
    if flags:
        a.set_flag(flags)
    return a


def _image(seed=0):
    rng = np.random.default_rng(seed)
    img = ismrmrd.Image.from_array(rng.normal(size=(1, 5, 6)).astype(np.float32))
    m = ismrmrd.Meta()
    m["DataRole"] = "Quantitative"
    img.attribute_string = m.serialize()
    img.image_index = seed
    return img


def _read_all(data: bytes, limits=None):
    async def go():
        r = asyncio.StreamReader()
        r.feed_data(data)
        r.feed_eof()
        mr = MessageReader(r, limits or Limits(read_timeout=2))
        out = []
        while True:
            msg = await mr.read()
            out.append(msg)
            if msg.id == MessageId.CLOSE:
                return out

    return asyncio.run(go())


def test_reads_what_ismrmrd_serializes():
    buf = io.BytesIO()
    from ismrmrd.xsd import CreateFromDocument

    hdr = CreateFromDocument(header_xml(ti=[100, 200]).encode())
    wf = ismrmrd.Waveform.from_array(np.arange(12, dtype=np.uint32).reshape(3, 4))
    with ProtocolSerializer(buf) as s:
        s.serialize(ConfigFile("fit:molli"))
        s.serialize(ConfigText("<config/>"))
        s.serialize(hdr)
        s.serialize("hello")
        s.serialize(_acq(seed=1))
        s.serialize(_acq(nt=0, seed=2))
        s.serialize(_image(seed=3))
        s.serialize(wf)
    msgs = _read_all(buf.getvalue())
    assert [m.id for m in msgs] == [
        MessageId.CONFIG_FILE,
        MessageId.CONFIG_TEXT,
        MessageId.HEADER,
        MessageId.TEXT,
        MessageId.ACQUISITION,
        MessageId.ACQUISITION,
        MessageId.IMAGE,
        MessageId.WAVEFORM,
        MessageId.CLOSE,
    ]
    assert (
        msgs[0].value == "fit:molli" and msgs[1].value == "<config/>" and msgs[3].value == "hello"
    )
    assert "<TI>100" in msgs[2].value.replace(".0", "") or "100" in msgs[2].value
    ref = _acq(seed=1)
    np.testing.assert_array_equal(msgs[4].value.data, ref.data)
    np.testing.assert_array_equal(msgs[4].value.traj, ref.traj)
    assert msgs[4].value.scan_counter == 1
    np.testing.assert_array_equal(msgs[6].value.data, _image(seed=3).data)
    assert msgs[6].value.meta["DataRole"] == "Quantitative"
    np.testing.assert_array_equal(msgs[7].value.data, wf.data)
    assert sum(m.nbytes for m in msgs) == len(buf.getvalue())


def test_ismrmrd_deserializes_what_we_write():
    data = (
        encode_text("log line")
        + encode_object(_image(seed=4))
        + encode_object(_acq(seed=5))
        + encode_close()
    )
    objs = list(ProtocolDeserializer(io.BytesIO(data)).deserialize())
    assert objs[0].rstrip("\x00") == "log line"
    np.testing.assert_array_equal(objs[1].data, _image(seed=4).data)
    np.testing.assert_array_equal(objs[2].data, _acq(seed=5).data)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"\x07\x00", "unknown message id 7"),
        (b"\x05\x00\x10\x00\x00\x00abc", "connection closed in the middle"),
        (b"\x05\x00\xff\xff\xff\x7f", "exceeds the limit"),
        (b"\xf0\x03" + b"\x00" * 10, "connection closed in the middle of an acquisition header"),
        (b"\x01\x00" + b"\xff" * 1024, "not valid UTF-8"),
    ],
)
def test_malformed_input_raises_protocol_error(data, message):
    with pytest.raises(ProtocolError, match=message):
        _read_all(data + encode_close())


def test_oversized_acquisition_is_refused_before_allocation():
    acq = _acq(nc=4, ns=8)
    raw = bytearray(encode_object(acq))
    # patch number_of_samples (uint16 at offset 2+30) to a huge value in the header
    h = acq.getHead()
    h.number_of_samples = 65535
    h.active_channels = 1024
    raw[2 : 2 + 340] = bytes(h)
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        _read_all(bytes(raw), Limits(max_acquisition_bytes=1 << 20, read_timeout=2))


def test_compression_bounds_snr_loss_and_compresses():
    """Simulated 8-coil k-space: ≤ 1 % SNR loss, ≥ 3× smaller, decoded through the reader."""
    from qmrkit.sim import cardiac_phantom

    rng = np.random.default_rng(0)
    img = np.asarray(cardiac_phantom((96, 96))["PD"]) * 1000.0
    yy, xx = np.mgrid[-1:1:96j, -1:1:96j]
    maps = np.stack(
        [
            np.exp(-((yy - np.cos(a)) ** 2 + (xx - np.sin(a)) ** 2))
            for a in np.linspace(0, 6.28, 8, endpoint=False)
        ]
    )
    k = np.fft.fftshift(
        np.fft.fft2(np.fft.ifftshift(maps * img, axes=(-2, -1)), norm="ortho"), axes=(-2, -1)
    )
    sigma = 2.0
    k = (k + rng.normal(0, sigma, k.shape) + 1j * rng.normal(0, sigma, k.shape)).astype(
        np.complex64
    )
    wire, raw, err = 0, 0, []
    stream = b""
    for line in range(96):
        acq = ismrmrd.Acquisition.from_array(np.ascontiguousarray(k[:, line, :]))
        enc = encode_compressed_acquisition(acq, np.full(8, sigma), 0.01)
        stream += enc
        wire += len(enc)
        raw += len(encode_object(acq))
    msgs = _read_all(stream + encode_close())
    for line, m in enumerate(msgs[:-1]):
        assert m.compressed and not m.value.is_flag_set(ismrmrd.ACQ_COMPRESSION2)
        err.append(m.value.data - k[:, line, :])
    e = np.concatenate([x.ravel() for x in err])
    loss = np.sqrt(1 + np.mean(np.abs(e) ** 2) / (2 * sigma**2)) - 1
    assert loss <= 0.01, loss
    assert raw / wire >= 3.0, raw / wire
    # the quantiser step follows the formula
    assert quantiser_step(1.0, 0.01)[0] == pytest.approx(np.sqrt(12 * ((1 + 0.0097) ** 2 - 1)))


def test_corrupt_compressed_payload():
    payload = encode_samples(np.ones((2, 8), np.complex64), [1.0, 1.0], 0.01)
    with pytest.raises(ProtocolError, match="channels"):
        decode_samples(payload, 3, 8)
    with pytest.raises(ProtocolError, match="corrupt|decodes to"):
        decode_samples(payload[:-3] + b"xyz", 2, 8)
    with pytest.raises(ProtocolError, match="QZ1"):
        decode_samples(b"garbage", 2, 8)
