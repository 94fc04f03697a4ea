"""Scale-out of batch work on dask.distributed: ``qmrkit batch`` over BIDS datasets
(:func:`run_batch`). dask is the optional ``batch`` extra, imported only when a cluster is used."""

from .batch import BatchReport, Job, JobRecord, fit_block, plan_jobs, run_batch, run_fit, run_job

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
