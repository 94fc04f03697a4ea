"""The ``qmrkit batch`` subcommand (parser and handler; ``qmrkit.cli`` only hooks them in)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_batch_parser(sub: Any) -> None:
    """Add ``batch`` to the ``qmrkit`` subcommands."""
    from ..cli import _add_common, _device, _model_name, _positive_int

    b = sub.add_parser(
        "batch",
        help="fit every subject of a BIDS dataset (dask.distributed) into derivatives/qmrkit",
        description="Fit a model to every subject/session of a BIDS dataset — each one exactly as "
        "'qmrkit fit' would — as dask.distributed tasks, and write a BIDS-derivatives dataset. "
        "Finished subjects are skipped on a rerun (resume); a failed subject is reported and the "
        "others finish. Exit status 0 when every subject is done, 1 when any failed, 2 for a "
        "usage error. See docs/batch.md for the file names each model reads.",
    )
    b.add_argument("bids_root", type=Path, help="the raw BIDS dataset (folder with sub-*/)")
    b.add_argument(
        "--model",
        required=True,
        type=_model_name,
        help="molli, ir, vfa, t2, t2star, dti, nexi, ...",
    )
    b.add_argument(
        "--out",
        type=Path,
        help="derivatives folder (default BIDS_ROOT/derivatives/qmrkit)",
    )
    b.add_argument(
        "--scheduler",
        default="local",
        help="'local' (default): a LocalCluster for this run; tcp://HOST:PORT: an existing Dask "
        "cluster (e.g. from the Dask Kubernetes operator or Helm chart); 'inprocess': no Dask",
    )
    b.add_argument(
        "--workers", type=_positive_int, default=2, help="worker processes of --scheduler local (2)"
    )
    b.add_argument(
        "--threads-per-worker",
        type=_positive_int,
        default=1,
        help="torch threads of each job on a Dask worker (default 1: one core per worker "
        "process; scale with --workers)",
    )
    b.add_argument(
        "--participant-label",
        nargs="+",
        metavar="LABEL",
        help="subjects to fit (with or without 'sub-'; default all)",
    )
    b.add_argument("--session-label", nargs="+", metavar="LABEL", help="sessions to fit")
    b.add_argument(
        "--block-voxels",
        type=_positive_int,
        help="split an input with more voxels than this into voxel blocks, one task each "
        "(for big volumes; blocks equal the whole fit to the solver's tolerance)",
    )
    b.add_argument(
        "--solver",
        choices=("lm", "adam", "dictionary"),
        default="lm",
        help="solver of every fit, as 'qmrkit fit --solver' (default lm)",
    )
    b.add_argument("--max-iter", type=_positive_int, help="maximum solver iterations")
    b.add_argument("--device", type=_device, help="cpu, cuda or cuda:N on the workers")
    b.add_argument("--float64", action="store_true", help="compute in float64")
    b.add_argument("--overwrite", action="store_true", help="redo subjects an earlier run finished")
    _add_common(b)


def cmd_batch(args: argparse.Namespace) -> int:
    """Run the batch; print the per-subject table; 1 if any subject failed."""
    from ..errors import DataFileError
    from .batch import run_batch

    if not args.bids_root.is_dir():
        raise DataFileError(f"BIDS root {args.bids_root} is not a folder")
    flags = ["--solver", args.solver]
    if args.max_iter:
        flags += ["--max-iter", str(args.max_iter)]
    if args.device:
        flags += ["--device", args.device]
    if args.float64:
        flags.append("--float64")
    report = run_batch(
        args.bids_root,
        args.model,
        out=args.out,
        scheduler=args.scheduler,
        workers=args.workers,
        threads_per_worker=args.threads_per_worker,
        participant_label=args.participant_label,
        session_label=args.session_label,
        fit_flags=flags,
        block_voxels=args.block_voxels,
        overwrite=args.overwrite,
        progress=args.progress,
    )
    print(report.table())
    print(f"derivatives: {report.out}")
    return 1 if report.failed else 0
