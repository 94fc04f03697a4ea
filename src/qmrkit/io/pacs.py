"""Sending DICOM files to a PACS by C-STORE (pynetdicom).

A PACS is named by a URL ``pacs://AET@host:port``: the called application entity title, the
host and the DICOM port (default 104). The calling AE title (qmrkit's) is configurable, since
PACS often accept only known callers.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .._optional import require
from ..errors import DataFileError, ParameterError, ServiceError

log = logging.getLogger("qmrkit.io.pacs")

_URL = re.compile(
    r"^pacs://(?P<aet>[^@/]+)@(?P<host>\[[0-9a-fA-F:.]+\]|[^:/\[\]]+)(?::(?P<port>\d+))?/?$"
)
_AET = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # 16 printable characters, no backslash


@dataclass(frozen=True)
class PacsAddress:
    """Where to send: called AE title, host and port."""

    aet: str
    host: str
    port: int = 104

    def __str__(self) -> str:
        return f"pacs://{self.aet}@{self.host}:{self.port}"


@dataclass
class SendReport:
    """What a :func:`send_dicom` call did.

    Attributes
    ----------
    address : PacsAddress
    sent : list of Path
        Files the PACS stored (status 0x0000, or a warning status 0xB000/0xB006/0xB007).
    failed : dict of Path -> str
        Files the PACS refused, with the status it returned.
    seconds : float
    """

    address: PacsAddress
    sent: list[Path] = field(default_factory=list)
    failed: dict[Path, str] = field(default_factory=dict)
    seconds: float = 0.0


def check_ae_title(aet: str, what: str = "AE title") -> str:
    """An AE title: 1 to 16 printable ASCII characters, no backslash, not all spaces."""
    if not isinstance(aet, str) or not _AET.match(aet) or not aet.strip():
        raise ParameterError(
            f"{what} must be 1 to 16 printable ASCII characters without a backslash, got {aet!r}"
        )
    return aet.strip()


def parse_pacs_url(url: str) -> PacsAddress:
    """``pacs://AET@host:port`` → :class:`PacsAddress` (port 104 when absent).

    Raises
    ------
    ParameterError
        The text is not of that form, the AE title is not 1–16 characters, or the port is not
        1–65535.
    """
    m = _URL.match(url.strip()) if isinstance(url, str) else None
    if m is None:
        raise ParameterError(
            f"expected a PACS address pacs://AET@host:port (e.g. pacs://ORTHANC@127.0.0.1:4242), "
            f"got {url!r}"
        )
    aet = check_ae_title(m.group("aet"), "the called AE title")
    port = int(m.group("port") or 104)
    if not 1 <= port <= 65535:
        raise ParameterError(f"the PACS port must be 1 to 65535, got {port} in {url!r}")
    return PacsAddress(aet, m.group("host").strip("[]"), port)


def send_dicom(
    files: Iterable[str | Path],
    address: str | PacsAddress,
    *,
    calling_aet: str = "QMRKIT",
    timeout: float = 30.0,
) -> SendReport:
    """Send DICOM files to a PACS over one association (C-STORE).

    Parameters
    ----------
    files : iterable of path
        DICOM files (Part 10), e.g. every file of the series :func:`write_dicom_maps` wrote.
    address : str or PacsAddress
        ``pacs://AET@host:port``.
    calling_aet : str
        qmrkit's AE title, as the PACS knows it (default ``QMRKIT``).
    timeout : float
        Seconds to wait for the association, for each reply and on the network.

    Returns
    -------
    SendReport

    Raises
    ------
    ServiceError
        The PACS cannot be reached, rejects or aborts the association, or accepts none of the
        files' SOP classes; the message names the address and the reason. Files it refuses
        one by one are reported in ``SendReport.failed`` (the others are still sent).
    """
    import time

    pydicom = require("pydicom")
    pynetdicom = require("pynetdicom")
    addr = parse_pacs_url(address) if isinstance(address, str) else address
    calling = check_ae_title(calling_aet, "the calling AE title")
    paths = [Path(f) for f in files]
    datasets = []
    for p in paths:
        try:
            datasets.append(pydicom.dcmread(p))
        except Exception as exc:
            raise DataFileError(f"cannot read DICOM file {p}: {type(exc).__name__}: {exc}") from exc
    report = SendReport(addr)
    if not datasets:
        return report
    ae = pynetdicom.AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    contexts = sorted(
        {(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets}
    )
    if len(contexts) > 128:
        raise ParameterError(f"{len(contexts)} SOP class/transfer syntax pairs; at most 128")
    for sop, ts in contexts:
        ae.add_requested_context(sop, [ts])
    t0 = time.perf_counter()
    try:
        assoc = ae.associate(addr.host, addr.port, ae_title=addr.aet)
    except Exception as exc:  # socket errors: DNS, refused
        raise ServiceError(f"cannot reach the PACS {addr}: {exc}") from exc
    if not assoc.is_established:
        # a PACS that refuses (wrong AE title) sends A-ASSOCIATE-RJ and closes the connection;
        # when the close reaches pynetdicom first (a busy machine) it reports an abort instead,
        # so both are "refused", with what was seen in brackets
        why = "did not answer"
        if assoc.is_rejected:
            why = "refused the association (A-ASSOCIATE-RJ)"
        elif assoc.is_aborted:
            why = "refused the association (it closed or aborted the connection)"
        raise ServiceError(
            f"the PACS {addr} {why} (calling AE title {calling!r}; check that it knows this AE "
            "title and the called AE title, and that it listens on that port)"
        )
    try:
        accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
        if not accepted:
            raise ServiceError(
                f"the PACS {addr} accepted none of the SOP classes "
                f"({', '.join(sorted({c[0] for c in contexts}))})"
            )
        for p, ds in zip(paths, datasets, strict=True):
            if str(ds.SOPClassUID) not in accepted:
                report.failed[p] = f"SOP class {ds.SOPClassUID} not accepted by the PACS"
                continue
            status = assoc.send_c_store(ds)
            code = getattr(status, "Status", None)
            if code is None:
                raise ServiceError(
                    f"the PACS {addr} gave no answer to C-STORE of {p} (connection lost or "
                    f"timed out after {timeout:g} s)"
                )
            if code in (0x0000, 0xB000, 0xB006, 0xB007):
                report.sent.append(p)
            else:
                report.failed[p] = f"status 0x{code:04X}"
    finally:
        assoc.release()
    report.seconds = time.perf_counter() - t0
    log.info("sent %d file(s) to %s in %.2f s", len(report.sent), addr, report.seconds)
    return report


__all__ = ["PacsAddress", "SendReport", "parse_pacs_url", "send_dicom", "check_ae_title"]
