"""qmrkit: quantitative MRI maps from raw data and image series, on CPU and GPU.

Subpackages are imported on first use (``qmrkit.fit``, ``qmrkit.models``, ``qmrkit.nufft``, ...),
so ``import qmrkit`` stays fast and pulls in no optional dependency.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_SUBPACKAGES = (
    "errors",
    "fit",
    "models",
    "ops",
    "nufft",
    "optim",
    "sim",
    "io",
    "mrf",
    "recon",
    "pipelines",
    "serve",
    "learn",
    "dist",
)

__all__ = ["__version__", "configure_process", *_SUBPACKAGES]


def configure_process(num_threads: int | None = None) -> int:
    """Apply the process policy of the ``qmrkit`` CLI and server to this process (opt-in).

    For scripts and notebooks that fit repeatedly: OpenMP threads sleep at barriers instead of
    spinning (``OMP_WAIT_POLICY=PASSIVE``, effective when called before torch is imported), torch
    uses ``num_threads`` (else ``$QMRKIT_NUM_THREADS``, ``$OMP_NUM_THREADS``, or the CPUs this
    process may use), and on Linux/glibc freed memory stays in the process for reuse instead of
    being unmapped and page-faulted back in by the next solver call (a warm ``fit.lm`` of 128²
    MOLLI voxels: 26–28 ms with it, 44–50 ms without, 2 threads). The price of the last rule is
    that the process keeps its peak heap; ``QMRKIT_MALLOC=default`` leaves malloc alone.
    ``import qmrkit`` alone changes none of this.

    Parameters
    ----------
    num_threads : int, optional
        Torch intra-op threads.

    Returns
    -------
    int
        The thread count applied.
    """
    from ._threads import configure_process as _configure

    return _configure(num_threads)


def __getattr__(name: str) -> Any:
    if name in _SUBPACKAGES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'qmrkit' has no attribute {name!r}")
