"""Scale-out of batch work on dask.distributed: ``qmrkit batch`` over BIDS datasets
(:func:`run_batch`). dask is the optional ``batch`` extra, imported only when a cluster is used.

The names below load on first use (PEP 562), so that building the ``qmrkit`` parser, which
imports :mod:`qmrkit.dist.cli`, does not import torch, nibabel or the I/O stack.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for type checkers and IDEs; at run time see __getattr__
    from .batch import (  # noqa: F401
        BatchReport,
        Job,
        JobRecord,
        fit_block,
        plan_jobs,
        run_batch,
        run_fit,
        run_job,
    )

__all__ = [
    "run_batch",
    "plan_jobs",
    "run_job",
    "run_fit",
    "fit_block",
    "Job",
    "JobRecord",
    "BatchReport",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import batch

        return getattr(batch, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
