"""``qmrkit batch``: fit every subject of a BIDS dataset as dask.distributed tasks.

One path per job
----------------
A job is exactly ``qmrkit fit <model> --data|--dwi ... --out TMP`` (the same parser and handler
as the command line, :func:`run_fit`) on one subject/session's inputs, followed by renaming the
files it wrote into the BIDS-derivatives tree. So a map of ``qmrkit batch`` is byte for byte the
map ``qmrkit fit`` writes for the same inputs and flags, on any worker, except that maps named by a
BIDS qMRI suffix are put in the unit BIDS defines for it (``T1map``/``T2map``/``T2starmap``: qmrkit's
ms / 1000 = s, in float32; rates already 1/s) by :func:`qmrkit.io.bids.to_bids_units`, the one
conversion path, with the sidecar's ``Units`` to match. Inputs that BIDS stores as a
file collection (``inv-1``, ``inv-2``, ...) are first stacked into one 4D NIfTI in the job's
temporary folder (values and affine unchanged, float32 as ``load_nifti`` reads them).

Atomic outputs and resume
-------------------------
A job works in ``OUT/.qmrkit-tmp/<run>/<label>/``, then moves every file into place with
``os.replace`` (atomic on one file system: a reader sees a whole file or none), and last writes its
record ``OUT/logs/<label>_<model>.json`` (status, timing, worker, files). The record is the commit
point: a rerun skips a job whose record says ``done`` and whose files all exist, and redoes any
other (a job killed half-way leaves no record, so it is redone and its files overwritten).

Failures
--------
An input that cannot be fitted (corrupt file, missing sidecar field) becomes a ``failed`` record
with its one-line error; the other jobs go on. A worker that dies mid-task (killed, out of
memory) is replaced by the nanny and dask reruns its tasks elsewhere, up to
``distributed.scheduler.allowed-failures`` (default 3) deaths per task, after which the job is
reported failed (``KilledWorker``).

Voxel blocks
------------
``block_voxels=K`` splits an input of more than K voxels into blocks of at most K voxels (C order
of the image grid); each block is ``qmrkit fit ... --mask BLOCK`` as its own task, and one more task
puts the blocks' maps together. A block is fitted exactly as the whole volume would be except for
the data scale that ``fit`` normalises amplitudes by (the 99th percentile of the fitted voxels'
signal), so block results equal the whole-volume fit to the solver's tolerance, not bit for bit.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import shutil
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataFileError, ParameterError, QmrkitError, ShapeError
from ..io.bids import (
    BidsDataset,
    SubjectInput,
    derivative_name,
    find_inputs,
    ignore_patterns,
    to_bids_units,
    units_problem,
    update_bidsignore,
    write_dataset_description,
)

_log = logging.getLogger("qmrkit.dist")

#: flags of ``qmrkit fit`` per acquisition setting
_FLAGS = {"ti": "--ti", "te": "--te", "flip_angles": "--fa", "tr": "--tr"}
#: sidecar fields ``qmrkit fit --json`` reads (δ, Δ in s)
_DWI_TIMING_KEYS = ("SmallDelta", "BigDelta", "GradientDuration", "GradientSeparation")


@dataclass
class Job:
    """One subject/session input and how to fit it (pickled to a worker).

    Attributes
    ----------
    item : SubjectInput
        Input files and settings (:func:`qmrkit.io.bids.find_inputs`).
    model : str
        Registry name (``molli``, ``vfa``, ``dti``, ...).
    out : Path
        Derivatives root.
    run_dir : Path
        This run's temporary folder (``out/.qmrkit-tmp/<run id>``).
    fit_flags : list of str
        Extra ``qmrkit fit`` flags (``--solver``, ``--max-iter``, ``--float64``, ``--device``).
    torch_threads : int or None
        ``torch.set_num_threads`` on the worker before the fit (None: leave it).
    """

    item: SubjectInput
    model: str
    out: Path
    run_dir: Path
    fit_flags: list[str] = field(default_factory=list)
    torch_threads: int | None = None

    @property
    def label(self) -> str:
        return self.item.label

    @property
    def record_path(self) -> Path:
        return self.out / "logs" / f"{self.label}_{self.model}.json"

    @property
    def work(self) -> Path:
        return self.run_dir / self.label


@dataclass
class JobRecord:
    """What became of one job (also the JSON record under ``OUT/logs/``).

    ``status`` is ``done``, ``skipped`` (done by an earlier run) or ``failed``; ``seconds`` the
    job's wall time on its worker (s); ``files`` the derivative files relative to the output root.
    """

    label: str
    model: str
    status: str
    seconds: float = 0.0
    worker: str = ""
    files: list[str] = field(default_factory=list)
    message: str = ""
    fit_summary: dict[str, Any] = field(default_factory=dict)
    blocks: int = 1


# -- the per-subject work (runs on a worker) -------------------------------------------------------
def run_fit(argv: Sequence[str]) -> str:
    """Run ``qmrkit fit`` with ``argv`` (the words after ``fit``) in this process, exactly as the
    command line does; returns what it printed. Raises the error the command would report.

    Parse errors become :class:`~qmrkit.errors.ParameterError` with argparse's message.
    """
    from .. import cli

    with _FIT_LOCK:  # stdout is one per process: one fit at a time per worker process
        return _run_fit_locked(cli, argv)


#: ``run_fit`` swaps ``sys.stdout``; a worker with several threads runs its fits one by one
_FIT_LOCK = threading.Lock()


def _run_fit_locked(cli: Any, argv: Sequence[str]) -> str:
    parser = cli._parser()
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = parser.parse_args(["fit", *argv])
    except SystemExit:
        raise ParameterError(err.getvalue().strip() or "invalid qmrkit fit arguments") from None
    args.progress = False
    cli._check_output_folder(args.out)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        cli._HANDLERS["fit"](args)
    return buf.getvalue()


def _stack(files: Sequence[Path], dest: Path) -> Path:
    """One 4D NIfTI from single-image files of one geometry (affine of the first)."""
    import numpy as np

    from ..io.nifti import load_nifti, save_nifti

    arrays, affine, header = [], None, None
    for f in files:
        data, aff, hdr = load_nifti(f, with_header=True)
        data = data[..., 0] if data.ndim == 4 and data.shape[-1] == 1 else data
        if affine is None:
            affine, header, shape = aff, hdr, data.shape
        elif data.shape != shape:
            raise ShapeError(f"{f.name} has shape {data.shape}, {files[0].name} has {shape}")
        elif not np.allclose(aff, affine, atol=1e-4):
            raise ShapeError(f"{f.name} and {files[0].name} have different affines (geometry)")
        arrays.append(data)
    return save_nifti(dest, np.stack(arrays, axis=-1), affine=affine, like=header)


def _fit_argv(job: Job, work: Path, out: Path, mask: Path | None = None) -> list[str]:
    """The ``qmrkit fit`` words for ``job`` (its inputs prepared under ``work``)."""
    item = job.item
    argv = [job.model]
    if item.datatype == "dwi":
        argv += ["--dwi", str(item.files[0])]
        argv += ["--bval", str(item.dwi["bval"]), "--bvec", str(item.dwi["bvec"])]
        meta = item.dwi.get("metadata", {})
        timing = {k: meta[k] for k in _DWI_TIMING_KEYS if k in meta}
        if timing:  # the merged (inherited) sidecar as one file for --json
            side = work / "dwi.json"
            tmp = work / f".dwi-{uuid.uuid4().hex}.json"  # block tasks may write it at once
            tmp.write_text(json.dumps(timing))
            os.replace(tmp, side)
            argv += ["--json", str(side)]
    else:
        data = item.files[0] if len(item.files) == 1 else work / "series.nii.gz"
        if len(item.files) > 1 and not data.exists():
            # under a temporary name, then renamed: block tasks of one job may stack at once
            tmp = work / f".series-{uuid.uuid4().hex}.nii.gz"
            _stack(item.files, tmp)
            os.replace(tmp, data)
        argv += ["--data", str(data)]
        for name, flag in _FLAGS.items():
            if name in item.settings:
                v = item.settings[name]
                vals = v if isinstance(v, list) else [v]
                argv += [flag, ",".join(repr(float(x)) for x in vals)]
    if mask is not None:
        argv += ["--mask", str(mask)]
    return [*argv, *job.fit_flags, "--out", str(out), "--no-figure", "--quiet"]


def _set_threads(job: Job) -> None:
    if job.torch_threads:  # on a cluster worker (in-process runs leave the caller's settings)
        from .._threads import keep_heap

        keep_heap()  # the process policy's heap rule, once per worker process
        import torch

        torch.set_num_threads(job.torch_threads)


def _worker_name() -> str:
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):
        return f"{socket.gethostname()}:{os.getpid()}"


def _failed(job: Job, exc: BaseException, t0: float) -> JobRecord:
    if isinstance(exc, QmrkitError | OSError):
        msg = f"{type(exc).__name__}: {exc}"
    else:  # a bug: keep where it happened
        msg = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        msg += " | " + traceback.format_exc(limit=-3).strip().replace("\n", " | ")
    return JobRecord(
        job.label, job.model, "failed", time.perf_counter() - t0, _worker_name(), [], msg
    )


def fit_block(job: Job, index: int, block_voxels: int) -> dict[str, Any]:
    """Fit block ``index`` of ``job``'s input: ``qmrkit fit ... --mask`` of the voxels
    ``[index·K, (index+1)·K)`` in C order of the image grid (``K = block_voxels``) that the
    job's own mask keeps (``--mask auto``, the default: the object mask of the WHOLE volume, so
    background voxels stay NaN as in an unblocked fit; a mask file; or ``none``). Returns the
    folder it wrote (``"dir"``: ``mask.nii.gz`` and ``fit/``, under the job's work folder), the
    fit's wall time (``"seconds"``) and the whole-volume mask's sidecar entry (``"mask"``)."""
    import nibabel as nib
    import numpy as np

    from ..io.nifti import save_nifti

    if job.item.error:
        raise DataFileError(job.item.error)
    _set_threads(job)
    work = job.work
    bdir = work / f"block-{index}"
    shutil.rmtree(bdir, ignore_errors=True)  # a rerun after a killed worker starts clean
    bdir.mkdir(parents=True)
    argv = _fit_argv(job, work, bdir / "fit")
    src = Path(argv[argv.index("--dwi" if "--dwi" in argv else "--data") + 1])
    img = nib.load(str(src))
    spatial = tuple(img.shape[:-1])
    keep, info = _job_mask(job, img)
    flat = np.zeros(math.prod(spatial), dtype=np.uint8)
    flat[index * block_voxels : (index + 1) * block_voxels] = 1
    if keep is not None:
        flat &= keep.reshape(-1).astype(np.uint8)
    if not flat.any():  # a block of background only: nothing to fit, its voxels stay NaN
        return {"dir": str(bdir), "seconds": 0.0, "mask": info, "empty": True}
    mask = save_nifti(
        bdir / "mask.nii.gz", flat.reshape(spatial), affine=img.affine, like=img.header
    )
    t0 = time.perf_counter()
    run_fit([*argv, "--mask", str(mask)])
    return {"dir": str(bdir), "seconds": time.perf_counter() - t0, "mask": info}


def _job_mask(job: Job, img: Any) -> tuple[Any, dict[str, Any]]:
    """The voxels ``qmrkit fit`` would fit in the whole volume under the job's ``--mask`` flag
    (a boolean array in image shape, None for every voxel) and the ``"Mask"`` sidecar entry."""
    import nibabel as nib
    import numpy as np

    from ..pipelines.masking import object_mask

    word = "auto"  # qmrkit fit's default; the last --mask flag wins, as in argparse
    flags = list(job.fit_flags)
    for i, flag in enumerate(flags):
        if flag == "--mask" and i + 1 < len(flags):
            word = flags[i + 1]
        elif flag.startswith("--mask="):
            word = flag.split("=", 1)[1]
    n = math.prod(img.shape[:-1])
    if word.lower() == "none":
        return None, {"Method": "none", "VoxelCount": n}
    if word.lower() == "auto":
        auto = object_mask(np.asarray(img.dataobj))
        return auto.mask.cpu().numpy(), auto.sidecar()
    keep = np.asarray(nib.load(word).dataobj) != 0
    return keep, {"Method": "file", "File": word, "VoxelCount": int(keep.sum())}


def n_voxels(job: Job) -> int:
    """Image voxels of ``job``'s input (from the NIfTI header; 0 when it cannot be read)."""
    import nibabel as nib

    try:
        shape = nib.load(str(job.item.files[0])).shape
    except Exception:  # unreadable: the job itself reports it
        return 0
    return math.prod(shape[:3])  # BIDS images are 3D, series 4D


def run_job(job: Job, blocks: Sequence[dict[str, Any]] = ()) -> JobRecord:
    """Fit one input (or put its fitted blocks together) and publish its derivatives atomically.

    ``blocks``: the results of :func:`fit_block` for every block of a job split into voxel
    blocks (their maps are put together instead of fitting). Never raises for a problem of the
    input: that becomes a ``failed`` record (and no record file, so a rerun tries again).
    """
    t0 = time.perf_counter()
    if job.item.error:  # found while indexing the dataset
        return JobRecord(job.label, job.model, "failed", 0.0, _worker_name(), [], job.item.error)
    _set_threads(job)
    work = job.work
    try:
        work.mkdir(parents=True, exist_ok=True)
        fitted = work / "fit"
        shutil.rmtree(fitted, ignore_errors=True)
        if blocks:
            fitted_blocks = [Path(b["dir"]) for b in blocks if not b.get("empty")]
            if not fitted_blocks:
                raise ShapeError("no voxel to fit: the mask keeps no voxel of any block")
            _merge_blocks(fitted_blocks, fitted, blocks[0].get("mask"), len(blocks))
            printed = ""
        else:
            printed = run_fit(_fit_argv(job, work, fitted))
        record = _publish(job, fitted, t0)
        record.blocks = max(1, len(blocks))
        record.seconds += sum(b["seconds"] for b in blocks)  # the blocks' fits count too
        record.fit_summary["printed"] = printed.strip().splitlines()[-3:]
        _write_record(job, record)
        return record
    except Exception as exc:  # reported per subject; the batch goes on
        return _failed(job, exc, t0)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _merge_blocks(
    block_dirs: Sequence[Path],
    dest: Path,
    mask_info: dict[str, Any] | None = None,
    n_blocks: int | None = None,
) -> None:
    """Each fitted block's maps where its mask is set (voxels of no fitted block keep the first
    block's NaN); sidecars of the first block plus the block count ``n_blocks`` (default: the
    fitted ones) and the whole volume's ``"Mask"`` entry (each block's own entry names its block
    mask file)."""
    import nibabel as nib
    import numpy as np

    dest.mkdir(parents=True)
    masks = [np.asarray(nib.load(str(d / "mask.nii.gz")).dataobj) != 0 for d in block_dirs]
    first = block_dirs[0] / "fit"
    for f in sorted(first.iterdir()):
        if f.name.endswith(".nii.gz"):
            img = nib.load(str(f))
            arr = np.asarray(img.dataobj).copy()
            for d, m in zip(block_dirs[1:], masks[1:], strict=True):
                arr[m] = np.asarray(nib.load(str(d / "fit" / f.name)).dataobj)[m]
            nib.save(nib.Nifti1Image(arr, None, header=img.header), str(dest / f.name))
        elif f.suffix == ".json":
            meta = json.loads(f.read_text())
            meta["VoxelBlocks"] = n_blocks or len(block_dirs)
            if mask_info is not None and "Mask" in meta:
                meta["Mask"] = mask_info
            (dest / f.name).write_text(json.dumps(meta, indent=2))


def _publish(job: Job, fitted: Path, t0: float) -> JobRecord:
    """Rename ``qmrkit fit``'s files into the BIDS tree (each by ``os.replace``), BIDS maps
    converted to BIDS units by :func:`~qmrkit.io.bids.to_bids_units` on the way."""
    item = job.item
    summary = {}
    if (fitted / "fit.json").exists():
        summary = json.loads((fitted / "fit.json").read_text())
        for k in ("Input", "InputFiles", "Sources", "Software"):
            summary.pop(k, None)
    stage = job.work / "stage"
    shutil.rmtree(stage, ignore_errors=True)
    staged: list[tuple[Path, str]] = []
    for f in sorted(fitted.glob("*.nii.gz")):
        stem = f.name[: -len(".nii.gz")]
        folder, name = derivative_name(item, stem, ".nii.gz", job.model)
        _, side_name = derivative_name(item, stem, ".json", job.model)
        (stage / folder).mkdir(parents=True, exist_ok=True)
        os.replace(f, stage / folder / name)
        meta = json.loads((fitted / f"{stem}.json").read_text())
        for k in ("Input", "InputFiles"):  # temporary paths of the job: the BIDS URIs replace them
            meta.pop(k, None)
        # BIDS maps in BIDS units (T1map in s, not qmrkit's ms), on the staged copy
        meta = to_bids_units(stage / folder / name, meta)
        meta["Sources"] = list(item.sources)
        meta["qmrkitBatch"] = {
            "Job": item.label,
            "Command": f"qmrkit fit {job.model}",
            "Flags": job.fit_flags,
        }
        (stage / folder / side_name).write_text(json.dumps(meta, indent=2))
        staged += [
            (stage / folder / name, f"{folder}/{name}"),
            (stage / folder / side_name, f"{folder}/{side_name}"),
        ]
    if not staged:
        raise DataFileError(f"qmrkit fit wrote no maps for {item.label}")
    for src, rel in staged:
        dst = job.out / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)
    return JobRecord(
        item.label,
        job.model,
        "done",
        time.perf_counter() - t0,
        _worker_name(),
        [rel for _, rel in staged],
        fit_summary=summary,
    )


def _write_record(job: Job, record: JobRecord) -> None:
    path = job.record_path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(asdict(record), indent=2, default=str))
    os.replace(tmp, path)  # the commit point of the job


def finished(job: Job) -> JobRecord | None:
    """The record of an earlier run that completed ``job`` (all its files present, sidecars with
    the units :func:`~qmrkit.io.bids.units_problem` accepts), else None."""
    try:
        rec = json.loads(job.record_path.read_text())
    except (OSError, ValueError):
        return None
    files = rec.get("files", [])
    if rec.get("status") != "done" or not all((job.out / f).exists() for f in files):
        return None
    # a tree written before BIDS maps were converted to BIDS units (T1map in ms) is redone, not
    # kept: one derivatives folder must not mix ms and s under the same suffix
    for f in files:
        if f.endswith(".json"):
            try:
                meta = json.loads((job.out / f).read_text())
            except (OSError, ValueError):
                return None
            if units_problem(Path(f).name, meta) is not None:
                return None
    rec["status"] = "skipped"
    return JobRecord(**rec)


# -- the client: jobs, scheduling, progress, summary -----------------------------------------------
@dataclass
class BatchReport:
    """Result of :func:`run_batch`: one record per input, the output root, the wall time (s)."""

    records: list[JobRecord]
    out: Path
    seconds: float
    scheduler: str

    @property
    def failed(self) -> list[JobRecord]:
        return [r for r in self.records if r.status == "failed"]

    def table(self) -> str:
        """The per-subject summary (one line per input)."""
        rows = [("input", "status", "seconds", "worker", "maps / message")]
        for r in self.records:
            what = r.message if r.status == "failed" else f"{len(r.files) // 2} maps"
            if r.blocks > 1:
                what += f" ({r.blocks} voxel blocks)"
            rows.append((r.label, r.status, f"{r.seconds:.2f}", r.worker, what))
        w = [max(len(row[i]) for row in rows) for i in range(4)]
        lines = [
            "  ".join(c.ljust(w[i]) for i, c in enumerate(row[:4])) + "  " + row[4] for row in rows
        ]
        counts = {
            k: sum(r.status == k for r in self.records) for k in ("done", "skipped", "failed")
        }
        lines.append(
            f"{counts['done']} done, {counts['skipped']} skipped (done before), "
            f"{counts['failed']} failed in {self.seconds:.1f} s on {self.scheduler}"
        )
        return "\n".join(lines)


def plan_jobs(
    bids_root: str | Path,
    model: str,
    *,
    out: str | Path | None = None,
    participant_label: Sequence[str] | None = None,
    session_label: Sequence[str] | None = None,
    fit_flags: Sequence[str] = (),
    torch_threads: int | None = None,
) -> tuple[BidsDataset, list[Job], Path]:
    """Index ``bids_root`` and make one :class:`Job` per input of ``model``; returns the dataset,
    the jobs and the derivatives root (default ``bids_root/derivatives/qmrkit``)."""
    from ..models.registry import check_name

    key = check_name(model)
    ds = BidsDataset(bids_root)
    outp = Path(out) if out is not None else ds.root / "derivatives" / "qmrkit"
    items = find_inputs(ds, key, participant_label=participant_label, session_label=session_label)
    if not items:
        raise DataFileError(
            f"no inputs for model {key!r} in {ds.root} (see docs/batch.md for the file names "
            "each model looks for)"
        )
    run_dir = outp / ".qmrkit-tmp" / f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
    jobs = [Job(i, key, outp, run_dir, list(fit_flags), torch_threads) for i in items]
    return ds, jobs, outp


def run_batch(
    bids_root: str | Path,
    model: str,
    *,
    out: str | Path | None = None,
    scheduler: str | Any = "local",
    workers: int = 2,
    threads_per_worker: int = 1,
    participant_label: Sequence[str] | None = None,
    session_label: Sequence[str] | None = None,
    fit_flags: Sequence[str] = (),
    block_voxels: int | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
    on_start: Callable[[Any], None] | None = None,
) -> BatchReport:
    """Fit every input of ``model`` in a BIDS dataset and write ``derivatives/qmrkit``.

    Parameters
    ----------
    bids_root : path
        The raw BIDS dataset.
    model : str
        Registry name (``molli``, ``ir``, ``vfa``, ``t2``, ``t2star``, ``dti``, ``nexi``, ...).
    out : path, optional
        Derivatives root (default ``bids_root/derivatives/qmrkit``).
    scheduler : str or distributed.Client
        ``"local"``: a LocalCluster of ``workers`` processes for this run; ``"tcp://host:port"``:
        an existing cluster's scheduler; ``"inprocess"``: no Dask, jobs one after the other in
        this process (the reference the benchmark compares against); or a ``Client``.
    workers : int
        Worker processes of the LocalCluster (``"local"`` only). Each runs one job at a time.
    threads_per_worker : int
        torch threads of each job on a Dask worker (default 1: one core per worker process, no
        oversubscription; scale with processes). ``"inprocess"`` leaves torch's default.
    participant_label, session_label : list of str, optional
        Subjects/sessions to fit (with or without ``sub-``/``ses-``; default all).
    fit_flags : list of str
        Extra ``qmrkit fit`` flags for every job, e.g. ``["--solver", "lm", "--max-iter", "50"]``.
    block_voxels : int, optional
        Split inputs with more voxels than this into voxel blocks, one task each (module docs).
    overwrite : bool
        Redo inputs that an earlier run finished (default: skip them, i.e. resume).
    progress : bool, optional
        tqdm bar over inputs (default: on a terminal).
    on_start : callable, optional
        Called with the ``distributed.Client`` once the jobs are submitted (tests use it to kill
        a worker mid-run).

    Returns
    -------
    BatchReport
        One record per input (``done``, ``skipped`` or ``failed`` with its message).
    """
    from .._progress import progress_bar

    t0 = time.perf_counter()
    check_scheduler(scheduler)
    if scheduler not in ("inprocess",):
        from .._optional import require

        require("distributed")  # before any file is written
    if block_voxels is not None and block_voxels < 1:
        raise ParameterError(f"block_voxels must be >= 1, got {block_voxels}")
    ds, jobs, outp = plan_jobs(
        bids_root,
        model,
        out=out,
        participant_label=participant_label,
        session_label=session_label,
        fit_flags=fit_flags,
        torch_threads=None if scheduler == "inprocess" else threads_per_worker,
    )
    solver = fit_flags[list(fit_flags).index("--solver") + 1] if "--solver" in fit_flags else "lm"
    write_dataset_description(outp, ds, model=jobs[0].model, solver=solver)
    records: dict[str, JobRecord] = {}
    todo = []
    for job in jobs:
        done = None if overwrite else finished(job)
        if done is not None:
            records[job.label] = done
        else:
            todo.append(job)
    bar = progress_bar(total=len(jobs), desc="subjects", progress=progress, unit="subject")
    bar.update(len(records))
    name = "inprocess"
    try:
        if todo and scheduler == "inprocess":
            for job in todo:
                n = _n_blocks(job, block_voxels)
                try:
                    blocks = [fit_block(job, i, block_voxels) for i in range(n)] if n > 1 else []
                    records[job.label] = run_job(job, blocks)
                except Exception as exc:  # a block's error: reported, the others go on
                    records[job.label] = _failed(job, exc, time.perf_counter())
                bar.update(1)
        elif todo:
            with _client(scheduler, workers) as client:
                name = _describe(client)
                futures = _submit(client, todo, block_voxels)
                if on_start is not None:
                    on_start(client)
                records.update(_gather(futures, todo, bar))
    finally:
        bar.close()
        shutil.rmtree(jobs[0].run_dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            jobs[0].run_dir.parent.rmdir()  # only when no other run uses it
    ordered = [records[j.label] for j in jobs]
    update_bidsignore(outp, ignore_patterns(f for r in ordered for f in r.files))
    return BatchReport(ordered, outp, time.perf_counter() - t0, name)


def check_scheduler(scheduler: Any) -> None:
    """``"local"``, ``"inprocess"``, a scheduler address or a Client; else a ParameterError."""
    if not isinstance(scheduler, str):
        return
    if scheduler in ("local", "inprocess"):
        return
    if not scheduler.startswith(("tcp://", "tls://", "ucx://", "inproc://")):
        raise ParameterError(
            "--scheduler must be 'local', 'inprocess' or a scheduler address such as "
            f"tcp://host:8786, got {scheduler!r}"
        )


def _n_blocks(job: Job, block_voxels: int | None) -> int:
    """Voxel blocks of ``job`` (1: fit whole)."""
    if not block_voxels:
        return 1
    return max(1, math.ceil(n_voxels(job) / block_voxels))


@contextlib.contextmanager
def _client(scheduler: Any, workers: int):
    """A Client for ``scheduler`` (closing what this function started)."""
    from .._optional import require

    require("dask")
    distributed = require("distributed")
    if not isinstance(scheduler, str):  # a Client given by the caller: not closed here
        yield scheduler
        return
    if scheduler == "local":
        if workers < 1:
            raise ParameterError(f"--workers must be >= 1, got {workers}")
        # processes: every worker has its own interpreter and torch (no GIL sharing); no
        # dashboard (bokeh is not a dependency, and a test run needs no open port)
        with (
            distributed.LocalCluster(
                n_workers=workers,
                threads_per_worker=1,  # one job at a time per process (torch threads: per job)
                processes=True,
                dashboard_address=None,
                silence_logs=40,
            ) as cluster,
            distributed.Client(cluster) as client,
        ):
            yield client
        return
    try:
        client = distributed.Client(scheduler, timeout="20s")
    except OSError as exc:
        raise DataFileError(f"cannot reach the Dask scheduler at {scheduler}: {exc}") from exc
    try:
        yield client
    finally:
        client.close()


def _describe(client: Any) -> str:
    info = client.scheduler_info()
    n = len(info.get("workers", {}))
    return f"dask {info.get('address', '?')} ({n} worker{'s' if n != 1 else ''})"


def _submit(client: Any, jobs: Sequence[Job], block_voxels: int | None) -> dict[str, Any]:
    """One future per job (a merge task over block tasks for big inputs). Keys are the job labels,
    so a task rerun after a worker death keeps its name in logs."""
    futures = {}
    tag = uuid.uuid4().hex[:6]
    for job in jobs:
        n = _n_blocks(job, block_voxels)
        if n > 1:
            blocks = [
                client.submit(
                    fit_block,
                    job,
                    i,
                    block_voxels,
                    key=f"qmrkit-block-{job.label}-{i}-{tag}",
                    pure=False,
                )
                for i in range(n)
            ]
            futures[job.label] = client.submit(
                run_job, job, blocks, key=f"qmrkit-merge-{job.label}-{tag}", pure=False
            )
        else:
            futures[job.label] = client.submit(
                run_job, job, key=f"qmrkit-fit-{job.label}-{tag}", pure=False
            )
    return futures


def _gather(futures: dict[str, Any], jobs: Sequence[Job], bar: Any) -> dict[str, JobRecord]:
    """Records as the futures finish; a task that could not finish (its worker died too often,
    a block failed) becomes a failed record."""
    from distributed import as_completed

    by_future = {f.key: label for label, f in futures.items()}
    jobs_by_label = {j.label: j for j in jobs}
    out: dict[str, JobRecord] = {}
    for fut in as_completed(list(futures.values())):
        label = by_future[fut.key]
        try:
            rec = fut.result()
        except Exception as exc:  # KilledWorker, a block's error: reported, the others go on
            job = jobs_by_label[label]
            rec = JobRecord(label, job.model, "failed", 0.0, "", [], f"{type(exc).__name__}: {exc}")
        out[label] = rec
        bar.update(1)
        if rec.status == "failed":
            _log.warning("failed: %s: %s", label, rec.message)
    return out
