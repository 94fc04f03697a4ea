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

__all__ = ["__version__", *_SUBPACKAGES]


def __getattr__(name: str) -> Any:
    if name in _SUBPACKAGES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'qmrkit' has no attribute {name!r}")
