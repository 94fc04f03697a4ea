"""Shared fixtures: the compute device(s) and thread settings."""

import os

# the library's thread policy (qmrkit._threads, as the CLI and server apply it): OpenMP workers
# sleep instead of spinning between parallel regions; it must be set before torch loads OpenMP
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

# under pytest-xdist each worker gets one thread, so two workers share two cores without thrashing
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="no CUDA device on this machine")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(params=DEVICES)
def device(request):
    """Every device-agnostic test runs on the CPU and, when present, on CUDA."""
    return torch.device(request.param)
