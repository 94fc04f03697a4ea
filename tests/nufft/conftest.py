"""Shared fixtures of the NUFFT tests: devices and an exact float64 direct NDFT."""

from __future__ import annotations

import pytest
import torch

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(
                not torch.cuda.is_available(), reason="CUDA is not available on this machine"
            ),
        ],
    ),
]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(autouse=True)
def _wisdom_dir(tmp_path, monkeypatch):
    """Never read or write the user's wisdom from tests."""
    monkeypatch.setenv("QMRKIT_WISDOM_DIR", str(tmp_path / "wisdom"))
