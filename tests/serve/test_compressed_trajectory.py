"""Compressed acquisitions that carry a trajectory (spiral, radial): the trajectory is read once
and both trajectory and samples come back as sent (samples within the quantiser's bound)."""

from __future__ import annotations

import ismrmrd
import numpy as np

from qmrkit.serve.protocol import encode_close, encode_compressed_acquisition

from .test_protocol import _read_all


def test_compressed_acquisitions_with_trajectory_round_trip():
    rng = np.random.default_rng(5)
    sigma, tol = 0.5, 0.01
    sent, stream = [], b""
    for i, nt in enumerate((2, 3, 2)):
        data = (rng.normal(0, 40, (4, 96)) + 1j * rng.normal(0, 40, (4, 96))).astype(np.complex64)
        traj = rng.uniform(-48, 48, (96, nt)).astype(np.float32)
        acq = ismrmrd.Acquisition.from_array(data, traj)
        acq.scan_counter = i
        sent.append(acq)
        stream += encode_compressed_acquisition(acq, np.full(4, sigma), tol)
    msgs = _read_all(stream + encode_close())
    assert len(msgs) == 4
    for acq, m in zip(sent, msgs[:3], strict=True):
        got = m.value
        assert m.compressed and int(got.scan_counter) == int(acq.scan_counter)
        np.testing.assert_array_equal(np.asarray(got.traj), np.asarray(acq.traj))
        err = np.asarray(got.data) - np.asarray(acq.data)
        # uniform quantisation: |error| ≤ step/2 per real component, step ≈ sqrt(12·((1+tol)²-1))·σ
        step = np.sqrt(12 * ((1 + tol) ** 2 - 1)) * sigma
        assert np.abs(err.real).max() <= step / 2 + 1e-4
        assert np.abs(err.imag).max() <= step / 2 + 1e-4
