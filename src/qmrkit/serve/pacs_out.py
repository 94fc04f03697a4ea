"""Maps of finished sessions → DICOM → a PACS, in the background (``qmrkit serve --send-to``).

A :class:`PacsForwarder` takes the quantitative images a session's pipeline returned (the very
MRD images the client receives: ``DataRole=Quantitative``, e.g. every map of ``fit:<model>`` and
``mrf``), rebuilds each map series as an array in NIfTI order with its affine, writes it with
:func:`qmrkit.io.write_dicom_maps` (patient and study from the session's MRD header, as
``qmrkit mrf --dicom-out`` does) into a folder of its own, and sends the files by C-STORE with
:func:`qmrkit.io.pacs.send_dicom`.

Why a queue of its own: the client's reply must never wait for a PACS. :meth:`submit` only
puts the job in a bounded queue (no I/O, no parsing) and returns the line for the reply; worker
threads (daemon threads: a PACS that hangs cannot keep the process alive) write and send.
A PACS that cannot be reached is retried a bounded number of times with exponential backoff;
a full queue drops the job at once, says so in the reply and counts it, rather than growing
without bound. Every outcome is counted in ``qmrkit_pacs_sends_total{result=...}``.
"""

from __future__ import annotations

import dataclasses
import queue
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._optional import require
from .._progress import get_logger
from ..errors import ParameterError, QmrkitError
from .mrd_images import image_to_array, recon_fov_mm

log = get_logger("serve.pacs")

#: ``--dicom-kind`` → the kinds :func:`qmrkit.io.write_dicom_maps` writes
DICOM_KINDS: dict[str, tuple[str, ...]] = {"pmap": ("pmap",), "mr": ("mr",), "both": ("pmap", "mr")}

#: values of the ``result`` label of ``qmrkit_pacs_sends_total``
RESULTS = ("sent", "failed", "dropped", "abandoned")


@dataclass
class MapVolume:
    """One map series rebuilt from MRD images.

    Attributes
    ----------
    name : str
        File stem, e.g. ``"T1map"`` (the images' ``SeriesDescription`` without ``qmrkit_``).
    unit : str
        qmrkit unit from the images' ``Units`` meta (``"ms"``, ``"a.u."``, ``""``).
    array : (x, y, z) float32 array
        NIfTI order, the pixels of the MRD images unchanged.
    affine : (4, 4) array
        NIfTI (RAS, mm) affine from the images' field of view, position and directions.
    """

    name: str
    unit: str
    array: np.ndarray
    affine: np.ndarray


@dataclass
class PacsJob:
    """What one session hands to the forwarder: its header and its quantitative images."""

    header_xml: str
    images: list[Any]
    derivation: str
    submitted: float = 0.0


def _meta(img: Any) -> dict[str, str]:
    import ismrmrd

    m = ismrmrd.Meta.deserialize(img.attribute_string or "")
    out = {}
    for k in m.keys():
        v = m[k]
        v = v[0] if isinstance(v, list) else v
        out[k] = "" if v in (None, "None") else str(v)  # ismrmrd writes an empty value as None
    return out


def is_quantitative(obj: Any) -> bool:
    """Whether a pipeline output is an MRD image of a map (``DataRole=Quantitative``).

    A substring test on the meta text, not an XML parse: :meth:`PacsForwarder.submit` runs on
    the event loop and must stay cheap; the worker parses the meta properly.
    """
    text = getattr(obj, "attribute_string", None)
    return isinstance(text, str) and "Quantitative" in text


def maps_from_images(images: Sequence[Any], header: Any = None) -> list[MapVolume]:
    """Group quantitative MRD images into map volumes (one per ``image_series_index``).

    Parameters
    ----------
    images : sequence of ismrmrd.Image
        2D images of one series are stacked along z in ``image_index`` order (the per-partition
        images of a 3D ``mrf`` scan); a 3D image is taken whole.
    header : ismrmrdHeader, optional
        Its reconSpace field of view is used for images whose own ``field_of_view`` is zero.

    Returns
    -------
    list of MapVolume
        In series order. The voxel size is field of view / matrix; the z step of stacked 2D
        images is the distance between their positions (their field of view z otherwise).
    """
    from ..io.geometry import ScanGeometry, nifti_affine

    series: dict[int, list[tuple[Any, dict[str, str]]]] = {}
    for img in images:
        meta = _meta(img)
        if meta.get("DataRole") == "Quantitative":
            series.setdefault(int(img.image_series_index), []).append((img, meta))
    out = []
    for index in sorted(series):
        members = sorted(series[index], key=lambda p: int(p[0].image_index))
        first, meta = members[0]
        arrays = [image_to_array(im) for im, _ in members]
        if len(arrays) == 1:
            arr = arrays[0] if arrays[0].ndim == 3 else arrays[0][:, :, None]
        elif all(a.ndim == 2 for a in arrays) and len({a.shape for a in arrays}) == 1:
            arr = np.stack(arrays, axis=2)
        else:
            raise ParameterError(
                f"map series {index} has {len(arrays)} images of shapes "
                f"{sorted({a.shape for a in arrays})}; expected one volume or equal 2D planes"
            )
        nx, ny, nz_img = (int(v) for v in first.matrix_size)
        fov = tuple(float(v) for v in first.field_of_view)
        if not any(fov):
            fov = recon_fov_mm(header) or (float(nx), float(ny), 1.0)
        voxel = [fov[0] / nx, fov[1] / ny, fov[2] / max(nz_img, 1)]
        voxel = [v if v > 0 else 1.0 for v in voxel]
        geometry = ScanGeometry.from_acquisition(first)
        if len(members) > 1:
            step = (
                np.asarray(members[-1][0].position[:3], dtype=np.float64)
                - np.asarray(first.position[:3], dtype=np.float64)
            ) / (len(members) - 1)
            dz = float(np.linalg.norm(step))
            if dz > 0:  # the planes' own spacing and direction
                voxel[2] = dz
                geometry = dataclasses.replace(
                    geometry or ScanGeometry(position=tuple(first.position[:3])),
                    slice_dir=tuple(float(v) for v in step / dz),
                )
        # the first plane's affine: nifti_affine puts `position` at the centre voxel of x, y and,
        # for a plane (z size 1), at z index 0; the stack grows from there along slice_dir
        shape_for_affine = (arr.shape[0], arr.shape[1], arr.shape[2] if len(members) == 1 else 1)
        affine = nifti_affine(shape_for_affine, voxel, geometry)
        name = meta.get("SeriesDescription", "") or f"map{index}"
        name = name[len("qmrkit_") :] if name.startswith("qmrkit_") else name
        out.append(MapVolume(name, meta.get("Units", ""), arr.astype(np.float32), affine))
    return out


def write_job(job: PacsJob, directory: Path, kinds: Sequence[str]) -> list[Path]:
    """Write a job's maps as DICOM under ``directory``; the files, in series order."""
    from ismrmrd.xsd import CreateFromDocument

    from ..io.dicom_out import write_dicom_maps

    header = CreateFromDocument(job.header_xml.encode("utf-8")) if job.header_xml else None
    volumes = maps_from_images(job.images, header)
    if not volumes:
        return []
    # maps of one session share one affine (that of the series or scan): one call, so that they
    # share a new study when the header names none; otherwise one call per map, with the study
    # and frame of reference pinned in the header first so that they still share them
    same = all(np.allclose(v.affine, volumes[0].affine, atol=1e-6) for v in volumes)
    groups = [volumes] if same else [[v] for v in volumes]
    if len(groups) > 1 and header is not None:
        _pin_uids(header)
    files: list[Path] = []
    number = 9001
    for group in groups:
        written = write_dicom_maps(
            directory,
            {v.name: v.array for v in group},
            units={v.name: v.unit for v in group},
            affine=group[0].affine,
            reference=header,
            kinds=kinds,
            derivation=job.derivation,
            series_number=number,
        )
        number += len(written)
        files += [f for s in written for f in s.files]
    return files


def _pin_uids(header: Any) -> None:
    """Give an MRD header a study instance UID (and a frame of reference UID where it has
    measurement information) when it lacks them, so that several DICOM writes share them."""
    import pydicom
    from ismrmrd import xsd

    if header.studyInformation is None:
        header.studyInformation = xsd.studyInformationType()
    if not header.studyInformation.studyInstanceUID:
        header.studyInformation.studyInstanceUID = pydicom.uid.generate_uid()
    meas = header.measurementInformation
    if meas is not None and not meas.frameOfReferenceUID:
        meas.frameOfReferenceUID = pydicom.uid.generate_uid()


class PacsForwarder:
    """A bounded background queue that writes map series as DICOM and C-STOREs them.

    Parameters
    ----------
    url : str
        ``pacs://AET@host:port`` (checked now: :class:`~qmrkit.errors.ParameterError`).
    calling_aet : str
        qmrkit's AE title towards the PACS.
    dicom_kind : {"both", "pmap", "mr"}
        Parametric Map (float values, UCUM units), MR images with a rescale slope, or both.
    metrics : Metrics, optional
        Where outcomes are counted (``qmrkit_pacs_sends_total{result}``, retries, queue depth).
    workers : int
        Sending threads (default 1: a PACS is usually happiest with one association at a time).
    max_queue : int
        Jobs waiting at most; a job beyond this is dropped (and counted) at once.
    retries : int
        Further attempts after a failed send (the PACS could not be reached, refused or aborted
        the association, or lost the connection); files the PACS refuses one by one are not
        retried (the same files would be refused again).
    backoff_s : float
        Wait before the first retry; doubled for each further one.
    timeout_s : float
        pynetdicom's association, DIMSE and network timeouts (s).
    spool : path, optional
        Where each job's folder is made (default: the system temporary folder); removed after
        the job, sent or not.
    sender : callable, optional
        ``send_dicom`` (replaceable for tests).
    """

    def __init__(
        self,
        url: str,
        *,
        calling_aet: str = "QMRKIT",
        dicom_kind: str = "both",
        metrics: Any = None,
        workers: int = 1,
        max_queue: int = 32,
        retries: int = 3,
        backoff_s: float = 2.0,
        timeout_s: float = 30.0,
        spool: str | Path | None = None,
        sender: Callable[..., Any] | None = None,
    ):
        from ..io.pacs import check_ae_title, parse_pacs_url, send_dicom

        self.address = parse_pacs_url(url)
        self.calling_aet = check_ae_title(calling_aet, "the calling AE title")
        if dicom_kind not in DICOM_KINDS:
            raise ParameterError(
                f"the DICOM kind must be one of {sorted(DICOM_KINDS)}, got {dicom_kind!r}"
            )
        self.kinds = DICOM_KINDS[dicom_kind]
        if workers < 1 or max_queue < 1 or retries < 0 or backoff_s < 0 or timeout_s <= 0:
            raise ParameterError(
                "PACS forwarding needs workers >= 1, max_queue >= 1, retries >= 0, backoff_s >= 0 "
                f"and timeout_s > 0; got {workers}, {max_queue}, {retries}, {backoff_s}, "
                f"{timeout_s}"
            )
        # the packages are checked when the server starts, not when the first map is ready
        require("pydicom")
        require("pynetdicom")
        if "pmap" in self.kinds:
            require("highdicom")
        self.metrics = metrics
        self.workers, self.retries = int(workers), int(retries)
        self.backoff_s, self.timeout_s = float(backoff_s), float(timeout_s)
        self.spool = Path(spool) if spool is not None else None
        self._send = sender or send_dicom
        self._queue: queue.Queue[PacsJob] = queue.Queue(maxsize=int(max_queue))
        self._pending = 0  # queued + being sent
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._accepting = True
        self._threads: list[threading.Thread] = []
        #: outcome counts, also kept here for callers without Prometheus
        self.counts = dict.fromkeys(RESULTS, 0)

    def start(self) -> None:
        """Start the worker threads (idempotent)."""
        if self._threads:
            return
        for i in range(self.workers):
            t = threading.Thread(target=self._work, name=f"qmrkit-pacs-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        log.info(
            "maps of finished sessions go to %s (kinds %s)", self.address, "+".join(self.kinds)
        )

    @property
    def pending(self) -> int:
        """Jobs waiting or being sent."""
        with self._cond:
            return self._pending

    def submit(self, outputs: Sequence[Any], header_xml: str, derivation: str) -> str | None:
        """Queue the quantitative images among ``outputs``; the line for the client's reply,
        or None when there are no maps. Never blocks and never does I/O."""
        images = [o for o in outputs if is_quantitative(o)]
        if not images:
            return None
        if not self._threads:
            self.start()
        with self._cond:
            accepted = self._accepting
            if accepted:
                try:
                    self._queue.put_nowait(
                        PacsJob(header_xml, images, derivation, time.monotonic())
                    )
                    self._pending += 1
                except queue.Full:
                    accepted = False
            depth = self._pending
        self._gauge(depth)
        if not accepted:
            self._count("dropped")
            why = (
                "the server is shutting down"
                if not self._accepting
                else f"{self._queue.maxsize} sends are already waiting (the PACS is slow or down)"
            )
            log.warning("PACS %s: maps of a session dropped: %s", self.address, why)
            return f"maps NOT sent to PACS {self.address.aet}: {why}"
        return (
            f"maps queued for PACS {self.address.aet} at {self.address.host}:{self.address.port} "
            f"({len(images)} image(s), DICOM {'+'.join(self.kinds)})"
        )

    def close(self, timeout: float) -> int:
        """Stop accepting jobs, wait up to ``timeout`` s for queued sends, then give up on the
        rest (counted as ``abandoned``; a send in progress is cut by its own network timeout).
        Returns the number of jobs abandoned."""
        with self._cond:
            self._accepting = False
            deadline = time.monotonic() + max(float(timeout), 0.0)
            while self._pending and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
            left_over = self._pending
        self._stop.set()  # backoff waits end now; queued jobs are abandoned by the workers
        abandoned = 0
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
            abandoned += 1
            self._finish("abandoned")
        if left_over:
            log.warning(
                "PACS %s: %d send(s) unfinished at shutdown (%d never started)",
                self.address,
                left_over,
                abandoned,
            )
        return left_over

    # -- worker side ------------------------------------------------------------------------------
    def _count(self, result: str) -> None:
        with self._cond:  # workers and the event loop thread both count
            self.counts[result] += 1
        if self.metrics is not None:
            self.metrics.pacs_sends.labels(result).inc()

    def _gauge(self, depth: int) -> None:
        if self.metrics is not None:
            self.metrics.pacs_queue.set(depth)

    def _finish(self, result: str) -> None:
        self._count(result)
        with self._cond:
            self._pending -= 1
            depth = self._pending
            self._cond.notify_all()
        self._gauge(depth)

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                job = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            result = "failed"
            try:
                result = self._run(job)
            except Exception:  # a job must never end the worker
                log.exception("PACS %s: internal error while sending maps", self.address)
            finally:
                self._finish(result)

    def _run(self, job: PacsJob) -> str:
        if self.spool is not None:
            self.spool.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix="qmrkit-pacs-", dir=self.spool))
        try:
            t0 = time.perf_counter()
            try:
                files = write_job(job, folder, self.kinds)
            except QmrkitError as exc:
                log.warning("PACS %s: maps not written as DICOM: %s", self.address, exc)
                return "failed"
            if self.metrics is not None:
                self.metrics.pacs_stage.labels("write").observe(time.perf_counter() - t0)
            return self._send_with_retries(files)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _send_with_retries(self, files: list[Path]) -> str:
        from ..errors import ServiceError

        for attempt in range(self.retries + 1):
            if attempt:
                wait = self.backoff_s * 2 ** (attempt - 1)
                if self._stop.wait(wait):  # shutting down: no more retries
                    return "abandoned"
                if self.metrics is not None:
                    self.metrics.pacs_retries.inc()
            t0 = time.perf_counter()
            try:
                report = self._send(
                    files, self.address, calling_aet=self.calling_aet, timeout=self.timeout_s
                )
            except (ServiceError, OSError) as exc:
                log.warning(
                    "PACS %s: attempt %d of %d failed: %s",
                    self.address,
                    attempt + 1,
                    self.retries + 1,
                    exc,
                )
                continue
            if self.metrics is not None:
                self.metrics.pacs_stage.labels("send").observe(time.perf_counter() - t0)
            if report.failed:
                first = next(iter(report.failed.items()))
                log.warning(
                    "PACS %s refused %d of %d file(s), e.g. %s: %s",
                    self.address,
                    len(report.failed),
                    len(files),
                    first[0].name,
                    first[1],
                )
                return "failed"
            log.info("PACS %s: stored %d file(s)", self.address, len(report.sent))
            return "sent"
        log.error(
            "PACS %s: maps not sent after %d attempt(s); they are lost to the PACS (the client "
            "has them)",
            self.address,
            self.retries + 1,
        )
        return "failed"


__all__ = ["PacsForwarder", "PacsJob", "MapVolume", "maps_from_images", "write_job", "DICOM_KINDS"]
