"""The MRD streaming client (``qmrkit send``): stream a scan, collect the images that come back."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._progress import get_logger, progress_bar
from ..errors import DataFileError, ParameterError, ProtocolError, ServiceError
from .protocol import (
    Limits,
    MessageId,
    MessageReader,
    decode_dependency_answer,
    encode_close,
    encode_compressed_acquisition,
    encode_config_file,
    encode_object,
    encode_text,
)

log = get_logger("serve.client")


@dataclass
class Reply:
    """What the server sent back."""

    images: list[Any] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    # the answer of a ``dependency-query`` session (attribute -> values), None otherwise
    dependencies: dict[str, list[str]] | None = None
    bytes_sent: int = 0
    bytes_raw: int = 0
    seconds: float = 0.0

    @property
    def errors(self) -> list[str]:
        return [
            t for t in self.texts if t.startswith(("error", "protocol error", "internal error"))
        ]


def client_tls_context(
    cert: str | Path | None = None,
    key: str | Path | None = None,
    ca: str | Path | None = None,
    *,
    server_hostname_check: bool = True,
) -> ssl.SSLContext:
    """Client TLS: verify the server against ``ca``; present ``cert``/``key`` for mutual TLS.

    The server's certificate must also carry the name the client connects to (``--host``, or
    ``server_hostname`` of :func:`exchange`): a certificate signed by the same CA for another
    server is refused. ``server_hostname_check=False`` turns that off (tests, IP-only labs).
    """
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca) if ca else None)
    ctx.check_hostname = server_hostname_check
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key) if key else None)
    return ctx


async def exchange(
    host: str,
    port: int,
    *,
    config: str,
    header_xml: str,
    acquisitions: list[Any] = (),
    images: list[Any] = (),
    parameters: dict[str, Any] | None = None,
    compress: float | None = None,
    noise_sigma: np.ndarray | None = None,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    limits: Limits | None = None,
    progress: bool | None = False,
) -> Reply:
    """One session: send everything, then read images/texts until CLOSE.

    With ``ssl_context`` the server's certificate is checked for ``server_hostname`` (default:
    ``host``).
    """
    t0 = time.perf_counter()
    if compress is not None and noise_sigma is None:
        raise ParameterError("compression needs the per-channel noise sigma (from the noise scan)")
    tls = {"ssl": ssl_context}
    if ssl_context is not None and server_hostname:
        tls["server_hostname"] = server_hostname
    reader, writer = await asyncio.open_connection(host, port, limit=1 << 20, **tls)
    reply = Reply()

    async def send(data: bytes, raw: int | None = None) -> None:
        writer.write(data)
        reply.bytes_sent += len(data)
        reply.bytes_raw += len(data) if raw is None else raw
        await writer.drain()

    async def send_all() -> None:
        await send(encode_config_file(config))
        await send(encode_text(header_xml, MessageId.HEADER))
        if parameters:
            await send(encode_text(json.dumps({"parameters": parameters})))
        bar = progress_bar(total=len(acquisitions) + len(images), desc="send", progress=progress)
        with bar:
            for acq in acquisitions:
                import ismrmrd

                noise = acq.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)
                raw = encode_object(acq)
                if compress is not None and not noise and acq.data.size:
                    await send(encode_compressed_acquisition(acq, noise_sigma, compress), len(raw))
                else:
                    await send(raw)
                bar.update(1)
            for img in images:
                await send(encode_object(img))
                bar.update(1)
        await send(encode_close())

    try:
        sender = asyncio.create_task(send_all())
        mr = MessageReader(reader, limits or Limits())
        while True:
            msg = await mr.read()
            if msg.id == MessageId.CLOSE:
                break
            if msg.id == MessageId.IMAGE:
                reply.images.append(msg.value)
            elif msg.id == MessageId.TEXT:
                reply.texts.append(msg.value)
                log.info("server: %s", msg.value)
            elif msg.id == MessageId.DEPENDENCY_QUERY:
                reply.dependencies = decode_dependency_answer(msg.value)
        try:
            await asyncio.wait_for(sender, timeout=5)
        except (ConnectionError, asyncio.TimeoutError):
            pass
    finally:
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), timeout=5)
        except (OSError, asyncio.TimeoutError, ssl.SSLError):
            pass
    reply.seconds = time.perf_counter() - t0
    return reply


def send_scan(
    host: str, port: int, *, retries: int = 3, backoff_s: float = 1.0, **kwargs: Any
) -> Reply:
    """:func:`exchange` with retries and exponential backoff when the service is unreachable or a
    replica dies mid-scan (the whole scan is sent again).

    Raises
    ------
    ServiceError
        When every attempt failed to connect or lost the connection, or TLS failed (not
        retried); the message names the address, the attempts and the last cause.
    ProtocolError
        When the server's replies were malformed on the last attempt.
    """
    if retries < 0:
        raise ParameterError(f"retries must be >= 0, got {retries}")
    attempt = 0
    while True:
        try:
            return asyncio.run(exchange(host, port, **kwargs))
        except ssl.SSLError as exc:
            raise ServiceError(
                f"TLS with {host}:{port} failed: {exc.reason or exc} (check --tls-ca, "
                "--tls-cert and --tls-key)"
            ) from exc
        except (ConnectionError, OSError, ProtocolError, EOFError) as exc:
            if attempt >= retries:
                if isinstance(exc, ProtocolError):
                    raise
                cause = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
                hint = (
                    " (is 'qmrkit serve' running there?)"
                    if isinstance(exc, ConnectionRefusedError)
                    else ""
                )
                raise ServiceError(
                    f"cannot reach the server at {host}:{port} after {attempt + 1} "
                    f"attempt{'s' if attempt else ''}: {cause}{hint}"
                ) from exc
            wait = backoff_s * 2**attempt
            log.warning("attempt %d failed (%s); retrying in %.1f s", attempt + 1, exc, wait)
            time.sleep(wait)
            attempt += 1


def read_mrd_file(path: str | Path) -> tuple[str | None, list[Any], list[Any]]:
    """Header XML (None when the file has none, as files of images written by
    :func:`qmrkit.io.write_mrd_images`), acquisitions and images (every image group) of an
    ISMRMRD HDF5 file."""
    import h5py
    import ismrmrd

    p = Path(path)
    if not p.exists():
        raise DataFileError(f"ISMRMRD file not found: {p}")
    try:
        with h5py.File(p, "r"):
            pass
        ds = ismrmrd.Dataset(str(p), "dataset", create_if_needed=False)
    except Exception as exc:
        raise DataFileError(f"{p} is not an ISMRMRD HDF5 file: {exc}") from None
    try:
        try:
            header = ds.read_xml_header()
            header = header.decode() if isinstance(header, bytes) else header
        except LookupError:  # ismrmrd: "XML header not found"
            header = None
        try:
            acqs = [ds.read_acquisition(i) for i in range(ds.number_of_acquisitions())]
        except Exception:
            acqs = []
        images = []
        for group in ds.list():
            if group in ("xml", "data", "waveforms"):
                continue
            try:
                images += [ds.read_image(group, i) for i in range(ds.number_of_images(group))]
            except Exception:
                continue
    finally:
        ds.close()
    return header, acqs, images


def header_from_images(images: list[Any]) -> str:
    """A minimal ISMRMRD XML header describing ``images`` (matrix and field of view of the first),
    for files that hold images but no header. It has no sequence parameters: acquisition
    settings (TI, TE, ...) then come from the session's parameters (``qmrkit send --param``), and
    no subject/device/session ids, so the server stores and finds no dependencies for it."""
    if not images:
        raise DataFileError("cannot describe an empty list of images")
    first = images[0]
    nx, ny, nz = (int(v) for v in first.matrix_size)
    fx, fy, fz = (float(v) for v in first.field_of_view)
    # ISMRMRD images default to a zero FOV; 1 mm voxels are the honest fallback
    fx, fy, fz = fx or float(nx), fy or float(ny), fz or float(nz)
    space = (
        f"<matrixSize><x>{nx}</x><y>{ny}</y><z>{nz}</z></matrixSize>"
        f"<fieldOfView_mm><x>{fx:g}</x><y>{fy:g}</y><z>{fz:g}</z></fieldOfView_mm>"
    )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD">'
        "<experimentalConditions><H1resonanceFrequency_Hz>0</H1resonanceFrequency_Hz>"
        "</experimentalConditions>"
        f"<encoding><encodedSpace>{space}</encodedSpace><reconSpace>{space}</reconSpace>"
        "<encodingLimits></encodingLimits><trajectory>cartesian</trajectory></encoding>"
        "</ismrmrdHeader>"
    )


def save_reply(reply: Reply, out: str | Path, *, header_xml: str | None = None) -> list[Path]:
    """Write returned images to ``out/images.h5`` (ISMRMRD) and one NIfTI per image series."""
    import ismrmrd

    from ..io.nifti import save_nifti
    from .mrd_images import image_to_array

    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    written = []
    h5 = d / "images.h5"
    ds = ismrmrd.Dataset(str(h5), "dataset", create_if_needed=True)
    try:
        if header_xml:
            ds.write_xml_header(header_xml)
        for img in reply.images:
            ds.append_image(f"series_{int(img.image_series_index)}", img)
    finally:
        ds.close()
    written.append(h5)
    by_series: dict[int, list[Any]] = {}
    for img in reply.images:
        by_series.setdefault(int(img.image_series_index), []).append(img)
    for idx, imgs in sorted(by_series.items()):
        name = f"series_{idx}"
        try:
            desc = imgs[0].meta.get("SeriesDescription")
            if desc:
                name = str(desc[0] if isinstance(desc, list) else desc).replace("qmrkit_", "")
        except Exception:
            pass
        arrays = [image_to_array(im) for im in sorted(imgs, key=lambda im: int(im.image_index))]
        arr = arrays[0] if len(arrays) == 1 else np.stack(arrays, axis=-1)
        written.append(
            save_nifti(
                d / f"{name}.nii.gz", arr.real.astype(np.float32) if np.iscomplexobj(arr) else arr
            )
        )
    (d / "log.txt").write_text("\n".join(reply.texts) + "\n")
    written.append(d / "log.txt")
    return written
