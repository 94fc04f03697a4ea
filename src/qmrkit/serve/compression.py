"""SNR-bounded lossy compression of raw k-space (Restivo et al., MAGMA 2019).

Choose the tolerated SNR loss ε; with the noise standard deviation σ of each channel (per real
component, from the noise scan) a uniform quantiser of step Δ adds error variance Δ²/12, so

    SNR_after / SNR_before = 1 / sqrt(1 + Δ²/(12σ²))   ⇒   Δ = σ·sqrt(12·((1 + ε)² − 1))

bounds the relative SNR loss by ε exactly (in expectation). The integers are stored in the
narrowest type that holds them, byte-shuffled and deflated (zlib, in the standard library).

Payload layout: b"QZ1", uint8 integer width (1, 2 or 4), uint16 channels, float32 step per
channel, then zlib(byte-shuffled int array of shape (channels, samples, 2)).
"""

from __future__ import annotations

import math
import struct
import zlib

import numpy as np

from ..errors import ParameterError, ProtocolError

MAGIC = b"QZ1"
_WIDTH = {1: np.int8, 2: np.int16, 4: np.int32}


def quantiser_step(sigma: np.ndarray | float, tolerance: float) -> np.ndarray:
    """Quantiser step Δ per channel for SNR loss ``tolerance`` (e.g. 0.01 for 1 %)."""
    if not 0 < tolerance < 1:
        raise ParameterError(f"the SNR-loss tolerance must be in (0, 1), got {tolerance}")
    s = np.atleast_1d(np.asarray(sigma, dtype=np.float64))
    if not (np.isfinite(s).all() and (s > 0).all()):
        raise ParameterError("noise sigma must be positive and finite for every channel")
    # design for 97 % of the tolerance: the bound holds in expectation, and the margin keeps the
    # measured loss below it for finite data
    eff = 0.97 * tolerance
    return s * math.sqrt(12.0 * ((1.0 + eff) ** 2 - 1.0))


def encode_samples(
    data: np.ndarray, sigma: np.ndarray | float, tolerance: float, level: int = 6
) -> bytes:
    """Quantise complex samples ``(channels, samples)`` and compress them."""
    d = np.asarray(data, dtype=np.complex64)
    if d.ndim != 2:
        raise ParameterError(f"samples must be (channels, samples), got shape {d.shape}")
    nc = d.shape[0]
    step = np.broadcast_to(quantiser_step(sigma, tolerance), (nc,)).astype(np.float32)
    ri = d.view(np.float32).reshape(nc, -1)
    q = np.rint(ri / step[:, None])
    peak = float(np.abs(q).max()) if q.size else 0.0
    width = 1 if peak < 127 else 2 if peak < 32767 else 4
    if peak >= 2**31 - 1:
        raise ParameterError("samples too large for the quantiser (check sigma's units)")
    qi = q.astype(_WIDTH[width])
    shuffled = qi.view(np.uint8).reshape(-1, width).T.copy()  # byte planes compress better
    body = zlib.compress(shuffled.tobytes(), level)
    return MAGIC + struct.pack("<BH", width, nc) + step.tobytes() + body


def decode_samples(payload: bytes, channels: int, samples: int) -> np.ndarray:
    """Inverse of :func:`encode_samples`; checks every size against the expected shape."""
    if len(payload) < 6 or payload[:3] != MAGIC:
        raise ProtocolError("compressed acquisition payload does not start with the QZ1 marker")
    width, nc = struct.unpack("<BH", payload[3:6])
    if width not in _WIDTH or nc != channels:
        raise ProtocolError(
            f"compressed payload has width {width} and {nc} channels; expected {channels} channels"
        )
    off = 6 + 4 * nc
    if len(payload) < off:
        raise ProtocolError("compressed payload is truncated")
    step = np.frombuffer(payload[6:off], dtype=np.float32)
    expected = channels * samples * 2 * width
    try:
        d = zlib.decompressobj()
        raw = d.decompress(payload[off:], expected + 1)
    except zlib.error as exc:
        raise ProtocolError(f"compressed payload is corrupt: {exc}") from None
    if len(raw) != expected:
        raise ProtocolError(f"compressed payload decodes to {len(raw)} bytes, expected {expected}")
    q = (
        np.frombuffer(raw, dtype=np.uint8)
        .reshape(width, -1)
        .T.copy()
        .view(_WIDTH[width])
        .reshape(channels, -1)
    )
    return (q.astype(np.float32) * step[:, None]).view(np.complex64).reshape(channels, samples)


def snr_loss(sigma: float, step: float) -> float:
    """Expected relative SNR loss of a quantiser with step Δ on noise σ."""
    return math.sqrt(1.0 + step**2 / (12.0 * sigma**2)) - 1.0
