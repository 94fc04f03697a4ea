"""SNR-bounded lossy compression of raw k-space (Restivo et al., MAGMA 2019).

Choose the tolerated SNR loss ε; with the noise standard deviation σ of each channel (per real
component, from the noise scan) a uniform quantiser of step Δ adds error variance Δ²/12, so

    SNR_after / SNR_before = 1 / sqrt(1 + Δ²/(12σ²))   ⇒   Δ = σ·sqrt(12·((1 + ε)² − 1))

bounds the relative SNR loss by ε exactly (in expectation). The integers are stored in the
narrowest type that holds them, byte-shuffled and deflated (zlib, in the standard library).

The bound holds per channel of every acquisition, not only on average: the error variance each
channel actually gets is measured after quantisation, and a channel over ``σ²((1 + ε)² − 1)`` is
quantised again with a smaller step.

Payload layout, version 1 (little-endian; everything another client needs to implement it):

========  =======================  =========================================================
offset    type                     meaning
========  =======================  =========================================================
0         3 bytes ``QZ1``          magic and format version
3         uint8                    integer width w in bytes: 1, 2 or 4
4         uint16                   channels C (must equal the acquisition's active_channels)
6         float32 × C              quantiser step Δ_c per channel (finite, > 0)
6 + 4C    zlib stream              deflate of the byte-shuffled integers: the w byte planes of
                                   the int array q of shape (C, samples, 2) (real, imaginary),
                                   plane 0 (least significant byte) first
========  =======================  =========================================================

Decoded sample = q · Δ_c (complex64). In an MRD ACQUISITION message, an acquisition with flag
``ACQ_COMPRESSION2`` carries after its header and trajectory a uint32 byte count and this payload
instead of ``8·C·samples`` bytes of complex64 samples.
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
    s = np.broadcast_to(np.atleast_1d(np.asarray(sigma, dtype=np.float64)), (nc,))
    step = np.broadcast_to(quantiser_step(s, tolerance), (nc,)).astype(np.float32)
    ri = d.view(np.float32).reshape(nc, -1)
    q = np.rint(ri / step[:, None])
    # the formula bounds the loss in expectation; the error variance actually added is measured
    # per channel, and a channel over its bound is quantised again with a smaller step, so the
    # bound holds for every channel of every acquisition (and so of every scan)
    bound = s**2 * ((1.0 + tolerance) ** 2 - 1.0)
    for _ in range(8):
        err = ri - q * step[:, None]
        var = (err.astype(np.float64) ** 2).mean(axis=1) if ri.shape[1] else np.zeros(nc)
        over = var > bound
        if not over.any():
            break
        step = step.copy()
        step[over] = (step[over] * np.sqrt(0.95 * bound[over] / var[over])).astype(np.float32)
        q[over] = np.rint(ri[over] / step[over, None])
    else:  # |error| <= step/2 everywhere: a step of 2·sqrt(bound) cannot exceed it
        step = step.copy()
        step[over] = (2.0 * np.sqrt(bound[over]) * 0.99).astype(np.float32)
        q[over] = np.rint(ri[over] / step[over, None])
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
    if not (np.isfinite(step).all() and (step > 0).all()):
        raise ProtocolError("compressed payload has a non-finite or non-positive quantiser step")
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
