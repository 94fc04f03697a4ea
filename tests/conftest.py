"""Shared fixtures: the compute device(s) and thread settings."""

import logging
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


def _is_cuda(value) -> bool:
    if isinstance(value, torch.device):
        return value.type == "cuda"
    return isinstance(value, str) and value.split(":")[0] == "cuda"


def pytest_collection_modifyitems(config, items):
    # Every test parametrised with a CUDA device carries the `gpu` mark, whichever conftest's
    # device list it came from, so `pytest -m gpu` (benchmarks/gpu_check.py) selects all of them.
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and any(_is_cuda(v) for v in callspec.params.values()):
            item.add_marker(pytest.mark.gpu)
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="no CUDA device on this machine")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
    # Files with a test marked slow run first, each file's tests in their own order. `make test`
    # runs `-n 2 --dist loadfile --no-loadscope-reorder`: whole files go to the 2 workers in this
    # order, so the minute-long files start early and the many short ones fill the gaps at the end
    # (xdist's default reorder sends files with the most tests first, which left the long MRF
    # and README files to run last on one worker while the other idled).
    slow_files = {item.path for item in items if item.get_closest_marker("slow") is not None}
    items.sort(key=lambda item: item.path not in slow_files)  # stable sort: collection order kept


@pytest.fixture(params=DEVICES)
def device(request):
    """Every device-agnostic test runs on the CPU and, when present, on CUDA."""
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _one_thread_per_worker():
    """Under xdist, every test starts with one torch thread: code run in-process that applies the
    process policy (the README's ``qmrkit.configure_process()``, the CLI's entry) sets the
    machine's CPU count, which would otherwise last for the rest of the worker."""
    if os.environ.get("PYTEST_XDIST_WORKER") and torch.get_num_threads() != 1:
        torch.set_num_threads(1)
    yield


@pytest.fixture(autouse=True)
def _library_logging():
    """Start every test with the ``qmrkit`` logger as a library leaves it (no handler, level
    unset, records propagating to the root, where ``caplog`` listens). The CLI run in-process
    (``qmrkit.cli.main``, also from module-scoped fixtures) configures it for a console
    (``--quiet``: errors only) and that would otherwise last for the rest of the xdist worker:
    seen as tests/nufft/test_planner.py::test_wisdom_unwritable_is_not_fatal missing its logged
    warning after a CLI test file on the same worker."""
    logger = logging.getLogger("qmrkit")
    logger.setLevel(logging.NOTSET)
    logger.handlers[:] = []
    logger.propagate = True
    yield
