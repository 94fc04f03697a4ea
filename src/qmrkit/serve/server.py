"""The asyncio MRD streaming server (``qmrkit serve``).

Per connection: a config (CONFIG_FILE or CONFIG_TEXT), the XML header, an optional JSON text that
may override the config, then data (acquisitions, images, waveforms) until CLOSE. The selected
pipeline runs in a worker thread (the event loop keeps serving other connections), bounded by a
semaphore (``max_concurrent``; others wait, and the wait is measured). Results go back as MRD
images and TEXT log lines, always followed by CLOSE. A bad connection gets an error TEXT and CLOSE
and never affects another; SIGTERM drains in-flight scans before exiting.
"""

from __future__ import annotations

import asyncio
import signal
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._progress import get_logger
from ..errors import ProtocolError, QmrkitError
from .handlers import parse_parameters, resolve
from .metrics import Metrics
from .protocol import Limits, MessageId, MessageReader, encode_close, encode_object, encode_text

log = get_logger("serve")


@dataclass
class Session:
    """Everything one connection sent, as handed to a pipeline."""

    config: str = ""
    header_xml: str = ""
    header: Any = None
    parameters: dict[str, Any] = field(default_factory=dict)
    acquisitions: list[Any] = field(default_factory=list)
    images: list[Any] = field(default_factory=list)
    waveforms: list[Any] = field(default_factory=list)
    store: Any = None
    log: list[str] = field(default_factory=list)
    stages: dict[str, float] = field(default_factory=dict)

    def stage(self, name: str, seconds: float) -> None:
        self.stages[name] = self.stages.get(name, 0.0) + seconds


def tls_context(cert: str | Path, key: str | Path, ca: str | Path | None = None) -> ssl.SSLContext:
    """Server TLS; with ``ca`` only clients presenting a certificate signed by it may connect."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert), str(key))
    if ca is not None:
        ctx.load_verify_locations(str(ca))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class Server:
    """An MRD server; ``await start()``, then ``await serve_forever()`` or ``await drain()``."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 9002,
        *,
        store: Any = None,
        max_concurrent: int = 1,
        limits: Limits | None = None,
        ssl_context: ssl.SSLContext | None = None,
        metrics: Metrics | None = None,
    ):
        self.host, self.port = host, port
        self.store = store
        self.limits = limits or Limits()
        self.ssl_context = ssl_context
        self.metrics = metrics or Metrics()
        self._slots = asyncio.Semaphore(max_concurrent)
        self._executor = ThreadPoolExecutor(
            max_workers=max_concurrent, thread_name_prefix="qmrkit-recon"
        )
        self._server: asyncio.AbstractServer | None = None
        self._active: set[asyncio.Task] = set()
        self._draining = False

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
        self._server = await asyncio.start_server(
            self._on_connect, self.host, self.port, ssl=self.ssl_context, limit=1 << 20
        )
        log.info("listening on %s:%d%s", *self.address, " (TLS)" if self.ssl_context else "")

    async def serve_forever(self) -> None:
        if self._server is None:
            await self.start()
        assert self._server is not None
        async with self._server:
            await self._server.serve_forever()

    async def drain(self, grace_s: float = 600.0) -> None:
        """Stop accepting, let in-flight scans finish (up to ``grace_s``), then close."""
        self._draining = True
        if self._server is not None:
            self._server.close()
        if self._active:
            log.info("draining %d in-flight session(s)", len(self._active))
            await asyncio.wait(self._active, timeout=grace_s)
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- one connection --------------------------------------------------------------------------
    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._active.add(task)
        self.metrics.connections.inc()
        try:
            await self._session(reader, writer)
        finally:
            self._active.discard(task)
            try:
                writer.close()
                await asyncio.wait_for(writer.wait_closed(), timeout=5)
            except (OSError, asyncio.TimeoutError, ssl.SSLError):
                pass

    async def _send(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(data)
        await asyncio.wait_for(writer.drain(), timeout=self.limits.read_timeout)

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        mr = MessageReader(reader, self.limits)
        session = Session(store=self.store)
        try:
            if self._draining:
                raise ProtocolError("the server is shutting down; retry on another replica")
            await self._receive(mr, session)
        except EOFError:
            log.info("client left before CLOSE; session dropped")
            self.metrics.errors.labels("disconnect").inc()
            return
        except ProtocolError as exc:
            self.metrics.errors.labels("protocol").inc()
            log.warning("protocol error: %s", exc)
            await self._reply_error(writer, f"protocol error: {exc}")
            return
        except (ConnectionError, ssl.SSLError) as exc:
            self.metrics.errors.labels("connection").inc()
            log.info("connection error: %s", exc)
            return
        try:
            outputs = await self._run(session)
        except QmrkitError as exc:
            self.metrics.errors.labels("pipeline").inc()
            log.warning("pipeline error: %s", exc)
            await self._reply_error(writer, f"error: {exc}")
            return
        except Exception as exc:  # never let one scan take the server down
            self.metrics.errors.labels("internal").inc()
            log.exception("internal error in pipeline %r", session.config)
            await self._reply_error(writer, f"internal error: {type(exc).__name__}: {exc}")
            return
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
        except (ConnectionError, asyncio.TimeoutError, ssl.SSLError, RuntimeError):
            pass

    async def _receive(self, mr: MessageReader, session: Session) -> None:
        first = await mr.read()
        if first.id not in (MessageId.CONFIG_FILE, MessageId.CONFIG_TEXT):
            raise ProtocolError(f"a session must start with a config message, got {first.id.name}")
        session.config = first.value.strip()
        while True:
            msg = await mr.read()
            self.metrics.bytes_received.labels("compressed" if msg.compressed else "raw").inc(
                msg.nbytes
            )
            if msg.id == MessageId.CLOSE:
                return
            if msg.id == MessageId.HEADER:
                session.header_xml = msg.value
                session.header = _parse_header(msg.value)
            elif msg.id == MessageId.TEXT:
                params = parse_parameters(msg.value)
                if params:
                    session.parameters.update(params)
                    if isinstance(params.get("config"), str):
                        session.config = params["config"]
            elif msg.id == MessageId.ACQUISITION:
                session.acquisitions.append(msg.value)
            elif msg.id == MessageId.IMAGE:
                session.images.append(msg.value)
            elif msg.id == MessageId.WAVEFORM:
                session.waveforms.append(msg.value)
            else:
                raise ProtocolError(f"unexpected {msg.id.name} message inside a session")

    async def _run(self, session: Session) -> list[Any]:
        handler, arg = resolve(session.config)
        name = session.config.split(":")[0]
        t_wait = time.perf_counter()
        self.metrics.queued.inc()
        async with self._slots:
            self.metrics.queued.dec()
            self.metrics.queue_time.observe(time.perf_counter() - t_wait)
            self.metrics.in_flight.inc()
            t0 = time.perf_counter()
            try:
                loop = asyncio.get_running_loop()
                out = await loop.run_in_executor(self._executor, handler, session, arg)
            finally:
                self.metrics.in_flight.dec()
                self.metrics.duration.labels(name).observe(time.perf_counter() - t0)
                for stage, s in session.stages.items():
                    self.metrics.stage.labels(name, stage).observe(s)
        return out


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
    ssl_context: ssl.SSLContext | None = None,
    metrics_port: int | None = None,
    grace_s: float = 600.0,
    limits: Limits | None = None,
) -> None:
    """Run until SIGTERM/SIGINT, then drain gracefully (blocking; for the CLI)."""

    async def main() -> None:
        server = Server(
            host,
            port,
            store=store,
            max_concurrent=max_concurrent,
            ssl_context=ssl_context,
            limits=limits,
        )
        if metrics_port is not None:
            server.metrics.start_http(metrics_port, addr=host)
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
