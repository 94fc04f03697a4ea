"""The asyncio MRD streaming server (``qmrkit serve``).

Per connection: a config (CONFIG_FILE or CONFIG_TEXT), the XML header, an optional JSON text that
may override the config, then data (acquisitions, images, waveforms) until CLOSE. The selected
pipeline runs in a worker thread, bounded by a semaphore (``max_concurrent``; others wait, and the
wait is measured). Results go back as MRD images and TEXT log lines, always followed by CLOSE.

No client can take the service from the others:

* the event loop only moves bytes: the XML header, JSON parameters, decompression and the decoding
  of acquisitions, images and waveforms run in a small parse pool, pipelines in the recon pool;
* every session has a budget (:class:`~qmrkit.serve.session.SessionBudget`): bytes scaled to the
  scan its header describes, a message count, a minimum data rate and a deadline;
* at most ``max_connections`` connections are served at once; more are refused with an error;
* the config name is checked against the registered pipelines before anything else is read, and
  a client's text is never echoed whole (:func:`~qmrkit.serve.session.shorten`);
* every failure that leaves a connection open ends with an error TEXT and CLOSE; SIGTERM stops
  accepting, lets in-flight scans finish within ``grace_s`` and then ends the rest with an error.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import os
import signal
import ssl
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .._progress import get_logger
from ..errors import ParameterError, ProtocolError, QmrkitError
from .handlers import handler_name, parse_parameters, resolve, streams
from .metrics import Metrics
from .protocol import (
    Limits,
    Message,
    MessageId,
    MessageReader,
    encode_close,
    encode_object,
    encode_text,
)
from .session import Session, SessionBudget, shorten

log = get_logger("serve")

#: decoding on the event loop is cheaper than a thread hop below this many bytes (a memcpy)
_INLINE_DECODE_BYTES = 64 << 10

__all__ = ["Server", "Session", "run_server", "tls_context"]


def tls_context(
    cert: str | Path,
    key: str | Path,
    ca: str | Path | None = None,
    *,
    allow_anonymous: bool = False,
) -> ssl.SSLContext:
    """Server TLS; with ``ca`` only clients presenting a certificate signed by it may connect.

    Without ``ca`` any client may connect (encrypted, but anonymous): refused unless
    ``allow_anonymous=True`` says that is intended (``qmrkit serve --allow-anonymous``).
    """
    if ca is None and not allow_anonymous:
        raise ParameterError(
            "TLS without a client CA accepts anonymous clients; give --tls-ca (the CA that signs "
            "client certificates) or --allow-anonymous to accept any client"
        )
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert), str(key))
    if ca is not None:
        ctx.load_verify_locations(str(ca))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class Server:
    """An MRD server; ``await start()``, then ``await serve_forever()`` or ``await drain()``.

    Parameters
    ----------
    host, port : str, int
        Address to listen on (port 0: any free port, see :attr:`address`).
    store : Store, optional
        Calibration dependencies (``store-noise``, ``store-b1`` and their use); expired entries
        and crash leftovers are purged every ``purge_interval_s``.
    max_concurrent : int
        Pipelines running at once (each in a worker thread).
    max_connections : int
        Connections served at once; more are answered with an error and CLOSE.
    limits : Limits
        Per-message and per-session bounds.
    ssl_context : ssl.SSLContext, optional
        From :func:`tls_context`.
    metrics : Metrics, optional
    purge_interval_s : float
        How often the store's expired entries are deleted (0: never).
    isolate : bool
        Run every pipeline in a process of its own (:mod:`qmrkit.serve.isolation`): a crash or
        runaway scan ends that session with an error and nothing else.
    scan_time_budget_s, scan_memory_budget_bytes : float, int, optional
        Per-scan wall time and resident memory; a scan past either is stopped (needs
        ``isolate``).
    pipeline_modules : tuple of str
        Modules that register extra pipelines (``@qmrkit.serve.register``), imported by the
        isolated workers too.
    send_to : str, optional
        ``pacs://AET@host:port``: every finished map series (``DataRole=Quantitative`` images:
        ``fit:<model>``, ``mrf``) is also written as DICOM and sent there by C-STORE, in the
        background after the reply (:class:`~qmrkit.serve.pacs_out.PacsForwarder`).
    calling_aet : str
        qmrkit's AE title towards the PACS.
    dicom_kind : {"both", "pmap", "mr"}
        Parametric Map, MR images with a rescale slope, or both.
    pacs_options : dict, optional
        Further :class:`~qmrkit.serve.pacs_out.PacsForwarder` settings (``retries``,
        ``backoff_s``, ``timeout_s``, ``max_queue``, ``workers``, ``spool``).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 9002,
        *,
        store: Any = None,
        max_concurrent: int = 1,
        max_connections: int = 1024,
        limits: Limits | None = None,
        ssl_context: ssl.SSLContext | None = None,
        metrics: Metrics | None = None,
        purge_interval_s: float = 600.0,
        isolate: bool = False,
        scan_time_budget_s: float | None = None,
        scan_memory_budget_bytes: int | None = None,
        pipeline_modules: tuple[str, ...] = (),
        send_to: str | None = None,
        calling_aet: str = "QMRKIT",
        dicom_kind: str = "both",
        pacs_options: dict[str, Any] | None = None,
    ):
        if not isolate and (scan_time_budget_s is not None or scan_memory_budget_bytes):
            raise ParameterError(
                "per-scan time and memory budgets need isolation (--isolate): a reconstruction "
                "thread cannot be stopped, a process can"
            )
        if max_concurrent < 1 or max_connections < 1:
            raise ParameterError(
                f"max_concurrent and max_connections must be >= 1, got {max_concurrent}, "
                f"{max_connections}"
            )
        self.host, self.port = host, port
        self.store = store
        self.limits = limits or Limits()
        self.ssl_context = ssl_context
        self.metrics = metrics or Metrics()
        self.max_connections = _fit_to_file_limit(int(max_connections))
        self.purge_interval_s = float(purge_interval_s)
        self.isolate = bool(isolate)
        self.scan_time_budget_s = scan_time_budget_s
        self.scan_memory_budget_bytes = scan_memory_budget_bytes
        self.pipeline_modules = tuple(pipeline_modules)
        self.pacs = None
        if send_to is not None:  # a bad address or a missing package fails here, at start
            from .pacs_out import PacsForwarder

            self.pacs = PacsForwarder(
                send_to,
                calling_aet=calling_aet,
                dicom_kind=dicom_kind,
                metrics=self.metrics,
                **(pacs_options or {}),
            )
        self._slots = asyncio.Semaphore(max_concurrent)
        self._executor = ThreadPoolExecutor(
            max_workers=max_concurrent, thread_name_prefix="qmrkit-recon"
        )
        # decoding and parsing: off the event loop, and apart from the pipelines so a long
        # reconstruction never delays another client's upload
        self._parse_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="qmrkit-parse")
        self._server: asyncio.AbstractServer | None = None
        self._active: set[asyncio.Task] = set()
        self._background: list[asyncio.Task] = []
        self._draining = False
        self._grace_expired = False
        #: the longest the event loop was late (seconds), measured every 20 ms
        self.max_loop_lag = 0.0

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[:2]

    async def start(self) -> None:
        # load torch's forward-mode AD decompositions (used by every fit) now, in this thread:
        # loading them runs torch.jit.script's ast parsing, which must not happen in a worker
        # thread while another thread parses (CPython 3.11 "AST constructor recursion depth
        # mismatch"), and it takes the ≈1 s out of the first session
        from ..fit.lm import _load_forward_ad

        _load_forward_ad()
        # everything imported so far (torch, ismrmrd, the models) lives as long as the process:
        # moved out of the collector's view, a full collection — which stops every thread,
        # the event loop included — walks only what sessions allocate
        gc.freeze()
        if self.isolate:  # the forkserver imports torch and the pipelines once, now
            from .isolation import warm_up

            await asyncio.get_running_loop().run_in_executor(
                self._parse_pool, warm_up, self.pipeline_modules
            )
        self._server = await asyncio.start_server(
            self._on_connect, self.host, self.port, ssl=self.ssl_context, limit=1 << 20
        )
        self._background.append(asyncio.create_task(self._watch_loop_lag()))
        if self.pacs is not None:
            self.pacs.start()
        if self.store is not None and self.purge_interval_s > 0 and hasattr(self.store, "purge"):
            self._background.append(asyncio.create_task(self._purge_periodically()))
        log.info("listening on %s:%d%s", *self.address, " (TLS)" if self.ssl_context else "")

    async def serve_forever(self) -> None:
        if self._server is None:
            await self.start()
        assert self._server is not None
        async with self._server:
            await self._server.serve_forever()

    async def drain(self, grace_s: float = 600.0) -> None:
        """Stop accepting, let in-flight scans finish (up to ``grace_s``), then end the rest:
        each gets an error TEXT and CLOSE."""
        self._draining = True
        t_drain = time.monotonic()
        if self._server is not None:
            self._server.close()
        if self._active:
            log.info("draining %d in-flight session(s)", len(self._active))
            _, pending = await asyncio.wait(self._active, timeout=grace_s)
            if pending:
                self._grace_expired = True
                log.warning(
                    "grace period of %g s expired; ending %d session(s)", grace_s, len(pending)
                )
                for task in pending:
                    task.cancel()
                await asyncio.wait(pending, timeout=10)
        if self.pacs is not None:  # queued PACS sends get what is left of the grace period
            left = max(grace_s - (time.monotonic() - t_drain), 0.0)
            await asyncio.to_thread(self.pacs.close, left)
        for task in self._background:
            task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._parse_pool.shutdown(wait=False, cancel_futures=True)

    async def _watch_loop_lag(self, period: float = 0.02) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t = loop.time()
            await asyncio.sleep(period)
            lag = loop.time() - t - period
            if lag > self.max_loop_lag:
                self.max_loop_lag = lag
                self.metrics.loop_lag.set(lag)

    async def _purge_periodically(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.purge_interval_s)
            try:
                n = await loop.run_in_executor(self._parse_pool, self.store.purge)
                if n:
                    log.info("store: purged %d expired or leftover file(s)", n)
            except Exception:  # a purge must never take the server down
                log.exception("store purge failed")

    # -- one connection --------------------------------------------------------------------------
    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._active) >= self.max_connections:
            self.metrics.refused.inc()
            log.warning("connection refused: %d connections open", len(self._active))
            await self._reply_error(
                writer,
                f"error: the server is at its limit of {self.max_connections} connections; "
                "retry later or on another replica",
            )
            await self._close(writer)
            return
        self._active.add(task)
        self.metrics.connections.inc()
        try:
            await self._session(reader, writer)
        except asyncio.CancelledError:
            if self._grace_expired:
                await self._reply_error(
                    writer,
                    "error: the server shut down before this scan finished (its grace period "
                    "expired); send the scan again",
                )
                self.metrics.errors.labels("shutdown").inc()
                return
            raise
        finally:
            self._active.discard(task)
            await self._close(writer)

    @staticmethod
    async def _close(writer: asyncio.StreamWriter) -> None:
        try:
            writer.close()
            await asyncio.wait_for(writer.wait_closed(), timeout=5)
        except (OSError, asyncio.TimeoutError, ssl.SSLError, RuntimeError):
            pass

    async def _send(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(data)
        await asyncio.wait_for(writer.drain(), timeout=self.limits.read_timeout)

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        budget = SessionBudget(self.limits)
        mr = MessageReader(reader, self.limits, budget)
        session = Session(store=self.store)
        try:
            if self._draining:
                raise ProtocolError("the server is shutting down; retry on another replica")
            await self._receive(mr, session, budget)
        except EOFError:
            log.info("client left before CLOSE; session dropped")
            self.metrics.errors.labels("disconnect").inc()
            return
        except (ConnectionError, ssl.SSLError) as exc:
            self.metrics.errors.labels("connection").inc()
            log.info("connection error: %s", shorten(str(exc), 200))
            return
        except QmrkitError as exc:  # ProtocolError, an unknown config, bad parameters
            self.metrics.errors.labels("protocol").inc()
            log.warning("refused session: %s", shorten(str(exc), 300))
            prefix = "protocol error" if isinstance(exc, ProtocolError) else "error"
            await self._reply_error(writer, f"{prefix}: {shorten(str(exc), 2000)}")
            return
        except Exception as exc:  # never let one client's bytes take the server down
            self.metrics.errors.labels("internal").inc()
            log.exception("internal error while receiving a session")
            await self._reply_error(writer, f"internal error: {type(exc).__name__}")
            return
        try:
            outputs = await self._run(session)
        except QmrkitError as exc:
            self.metrics.errors.labels("pipeline").inc()
            log.warning("pipeline error: %s", shorten(str(exc), 300))
            await self._reply_error(writer, f"error: {exc}")
            return
        except Exception as exc:  # never let one scan take the server down
            self.metrics.errors.labels("internal").inc()
            log.exception("internal error in pipeline %r", handler_name(session.config))
            await self._reply_error(writer, f"internal error: {type(exc).__name__}: {exc}")
            return
        if self.pacs is not None:  # queued only: the reply never waits for the PACS
            line = self.pacs.submit(outputs, session.header_xml, _derivation(session.config))
            if line:
                outputs = [*outputs, line]
        try:
            for line in session.log:
                await self._send(writer, encode_text(line))
            for obj in outputs:
                await self._send(
                    writer, encode_text(obj) if isinstance(obj, str) else encode_object(obj)
                )
            await self._send(writer, encode_close())
        except (ConnectionError, asyncio.TimeoutError, ssl.SSLError) as exc:
            self.metrics.errors.labels("connection").inc()
            log.info("client went away while results were sent: %s", exc)

    async def _reply_error(self, writer: asyncio.StreamWriter, text: str) -> None:
        try:
            await self._send(writer, encode_text(text))
            await self._send(writer, encode_close())
        except (ConnectionError, asyncio.TimeoutError, ssl.SSLError, RuntimeError, OSError):
            pass

    async def _off_loop(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._parse_pool, fn, *args)

    async def _receive(self, mr: MessageReader, session: Session, budget: SessionBudget) -> None:
        first = await mr.read()
        if first.id not in (MessageId.CONFIG_FILE, MessageId.CONFIG_TEXT):
            raise ProtocolError(f"a session must start with a config message, got {first.id.name}")
        budget.message(first.nbytes)
        session.config = first.value.strip()
        checked = False  # the config may still be replaced by JSON parameters (FIRE clients)
        while True:
            msg: Message = await mr.read(decode=False)
            budget.message(msg.nbytes, msg.decoded_bytes)
            self.metrics.bytes_received.labels("compressed" if msg.compressed else "raw").inc(
                msg.nbytes
            )
            if msg.id == MessageId.CLOSE:
                return
            if msg.id == MessageId.HEADER:
                if session.header is not None:
                    raise ProtocolError("a session has one MRD header; a second one was sent")
                session.header_xml = msg.value
                session.header = await self._off_loop(_parse_header, msg.value)
                budget.set_header(session.header)
            elif msg.id == MessageId.TEXT:
                params = await self._off_loop(parse_parameters, msg.value)
                if params:
                    session.parameters.update(params)
                    if isinstance(params.get("config"), str):
                        resolve(params["config"])
                        session.config = params["config"].strip()
            elif msg.id in (MessageId.ACQUISITION, MessageId.IMAGE, MessageId.WAVEFORM):
                if not checked:  # an unknown pipeline is refused before its data is read
                    resolve(session.config)
                    checked = True
                    if session.header is not None and streams(session.config):
                        from ..io.mrd import ScanAssembler

                        session.assembler = await self._off_loop(
                            functools.partial(ScanAssembler, session.header_xml, source="stream")
                        )
                if msg.id == MessageId.ACQUISITION and session.assembler is not None:
                    # decoded and placed in k-space off the loop, one at a time: the next
                    # message is read only when this one is stored (a queue of one)
                    await self._off_loop(_decode_into, msg, session.assembler)
                    continue
                if msg.decoded_bytes > _INLINE_DECODE_BYTES or msg.compressed:
                    await self._off_loop(msg.decoded)
                else:
                    msg.decoded()
                target = {
                    MessageId.ACQUISITION: session.acquisitions,
                    MessageId.IMAGE: session.images,
                    MessageId.WAVEFORM: session.waveforms,
                }[msg.id]
                target.append(msg.value)
            else:
                raise ProtocolError(f"unexpected {msg.id.name} message inside a session")

    async def _run(self, session: Session) -> list[Any]:
        handler, arg = resolve(session.config)
        name = handler_name(session.config)
        t_wait = time.perf_counter()
        self.metrics.queued.inc()
        async with self._slots:
            self.metrics.queued.dec()
            self.metrics.queue_time.observe(time.perf_counter() - t_wait)
            self.metrics.in_flight.inc()
            t0 = time.perf_counter()
            try:
                loop = asyncio.get_running_loop()
                if self.isolate:
                    from .isolation import run_isolated

                    job = functools.partial(
                        run_isolated,
                        session,
                        time_budget_s=self.scan_time_budget_s,
                        memory_budget_bytes=self.scan_memory_budget_bytes,
                        imports=self.pipeline_modules,
                    )
                    out = await loop.run_in_executor(self._executor, job)
                else:
                    out = await loop.run_in_executor(self._executor, handler, session, arg)
            finally:
                self.metrics.in_flight.dec()
                self.metrics.duration.labels(name).observe(time.perf_counter() - t0)
                for stage, s in session.stages.items():
                    self.metrics.stage.labels(name, stage).observe(s)
        return out


def _derivation(config: str) -> str:
    """DerivationDescription of forwarded maps: the pipeline (a registered name) and its model."""
    name = handler_name(config)
    _, _, arg = str(config).partition(":")
    return f"qmrkit serve {name}" + (f":{shorten(arg.strip(), 32)}" if name == "fit" else "")


def _decode_into(msg: Message, assembler: Any) -> None:
    assembler.add(msg.decoded().value)
    msg.value = None  # the samples now live in k-space only


def _fit_to_file_limit(max_connections: int) -> int:
    """Raise the process's open-file limit so ``max_connections`` sockets fit (two descriptors
    each, room for files and pipelines); where the hard limit is lower, serve fewer and say so.
    A server that runs out of descriptors refuses everyone, good scans included."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on POSIX
        return max_connections
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * max_connections + 256
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < need:
        fitted = max((soft - 256) // 2, 1)
        log.warning(
            "open-file limit %d allows %d connections, not %d; serving %d",
            soft,
            fitted,
            max_connections,
            fitted,
        )
        return fitted
    return max_connections


def _parse_header(xml: str) -> Any:
    from ismrmrd.xsd import CreateFromDocument

    try:
        return CreateFromDocument(xml.encode("utf-8"))
    except Exception as exc:
        raise ProtocolError(f"the MRD header is not valid ISMRMRD XML: {str(exc)[:200]}") from None


def run_server(
    host: str,
    port: int,
    *,
    store: Any = None,
    max_concurrent: int = 1,
    max_connections: int = 1024,
    ssl_context: ssl.SSLContext | None = None,
    metrics_port: int | None = None,
    metrics_host: str = "127.0.0.1",
    grace_s: float = 600.0,
    limits: Limits | None = None,
    isolate: bool = False,
    scan_time_budget_s: float | None = None,
    scan_memory_budget_bytes: int | None = None,
    pipeline_modules: tuple[str, ...] = (),
    send_to: str | None = None,
    calling_aet: str = "QMRKIT",
    dicom_kind: str = "both",
    pacs_options: dict[str, Any] | None = None,
) -> None:
    """Run until SIGTERM/SIGINT, then drain gracefully (blocking; for the CLI).

    Metrics are served on ``metrics_host:metrics_port`` (loopback by default: the service address
    is often published, the metrics should only reach the cluster's scraper). When the grace
    period ends with a pipeline thread still running (a reconstruction cannot be interrupted),
    the process exits anyway once every client has had its error and CLOSE.

    The process gets qmrkit's thread policy (:func:`qmrkit._threads.configure_process`: passive
    OpenMP waiting, the intra-op thread count), which isolated workers inherit.
    """
    from .._threads import configure_process

    configure_process()

    async def main() -> None:
        server = Server(
            host,
            port,
            store=store,
            max_concurrent=max_concurrent,
            max_connections=max_connections,
            ssl_context=ssl_context,
            limits=limits,
            isolate=isolate,
            scan_time_budget_s=scan_time_budget_s,
            scan_memory_budget_bytes=scan_memory_budget_bytes,
            pipeline_modules=pipeline_modules,
            send_to=send_to,
            calling_aet=calling_aet,
            dicom_kind=dicom_kind,
            pacs_options=pacs_options,
        )
        if metrics_port is not None:
            server.metrics.start_http(metrics_port, addr=metrics_host)
        await server.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        print(f"qmrkit serve: listening on {server.address[0]}:{server.address[1]}", flush=True)
        await stop.wait()
        print("qmrkit serve: draining", flush=True)
        await server.drain(grace_s)

    asyncio.run(main())
    workers = [t for t in threading.enumerate() if t.name.startswith("qmrkit-recon")]
    deadline = time.monotonic() + 1.0
    for t in workers:  # idle workers leave at once after shutdown; busy ones do not
        t.join(max(deadline - time.monotonic(), 0.0))
    busy = [t.name for t in workers if t.is_alive()]
    if busy:
        # worker threads are joined at interpreter exit; one stuck in a reconstruction would keep
        # the process alive past its grace period, so leave without waiting for it
        print(
            f"qmrkit serve: grace period over; exiting with {len(busy)} pipeline(s) unfinished",
            flush=True,
        )
        sys.stderr.flush()
        os._exit(0)
