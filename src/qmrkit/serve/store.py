"""Calibration dependencies (noise covariance, B1 maps) kept between scans.

Like Gadgetron's dependency storage: a calibration scan stores its result under keys taken from
the MRD header (subject, device, session, measurement id) with a time-to-live; a later scan finds
it through its header's ``measurementDependency`` list, or by the same subject/device/session.

A header without all three ids (``subjectInformation/patientID``,
``acquisitionSystemInformation/deviceID`` or ``stationName``,
``measurementInformation/frameOfReferenceUID`` or ``studyInformation/studyInstanceUID``) gets no
stored dependency: nothing is stored under, or looked up with, an incomplete key, so one subject's
calibration can never reach another's scan through a shared "unknown" entry.

:class:`DirectoryStore` keeps entries as files on a directory (a shared volume on Kubernetes, so
every replica sees them). Writes are atomic (temporary file + rename) so a reader never sees half an
entry. Identifiers are hashed in file names, and never logged.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .._progress import get_logger
from ..errors import DataFileError, ParameterError

log = get_logger("serve.store")

DEFAULT_TTL_S = 48 * 3600.0


@dataclass(frozen=True)
class DependencyKey:
    """Who and what a calibration belongs to (values come from the MRD header)."""

    subject: str = ""
    device: str = ""
    session: str = ""

    @property
    def missing(self) -> list[str]:
        """The MRD header fields this key lacks (empty when complete)."""
        return [
            name
            for name, value in (
                ("subjectInformation/patientID", self.subject),
                ("acquisitionSystemInformation/deviceID", self.device),
                ("measurementInformation/frameOfReferenceUID", self.session),
            )
            if not value
        ]

    @property
    def complete(self) -> bool:
        return not self.missing

    def digest(self) -> str:
        raw = "\x1f".join((self.subject, self.device, self.session)).encode()
        return hashlib.sha256(raw).hexdigest()[:32]


@dataclass
class Dependency:
    kind: str  # "noise", "b1", ...
    measurement_id: str
    arrays: dict[str, np.ndarray]
    meta: dict[str, Any]
    created: float


class Store(Protocol):
    def put(
        self,
        key: DependencyKey,
        kind: str,
        measurement_id: str,
        arrays: dict[str, np.ndarray],
        meta: dict[str, Any] | None = None,
        ttl_s: float | None = None,
    ) -> None: ...

    def get(
        self, key: DependencyKey, kind: str, measurement_id: str | None = None
    ) -> Dependency | None: ...


def _safe(name: str) -> str:
    if not name or any(c in name for c in "/\\\x00") or name in (".", ".."):
        raise ParameterError(f"invalid dependency name {name!r}")
    return name


class DirectoryStore:
    """Dependencies as ``.npz`` files under ``root/<hash of subject|device|session>/``."""

    def __init__(self, root: str | Path, *, default_ttl_s: float = DEFAULT_TTL_S):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.default_ttl_s = float(default_ttl_s)

    def _dir(self, key: DependencyKey) -> Path:
        return self.root / key.digest()

    def put(
        self,
        key: DependencyKey,
        kind: str,
        measurement_id: str,
        arrays: dict[str, np.ndarray],
        meta: dict[str, Any] | None = None,
        ttl_s: float | None = None,
    ) -> None:
        """Store (atomically) a dependency; a later put of the same kind and id replaces it.

        Raises ParameterError for a key without subject, device or session id.
        """
        if not key.complete:
            raise ParameterError(
                f"a calibration needs subject, device and session ids; the MRD header lacks "
                f"{', '.join(key.missing)}"
            )
        d = self._dir(key)
        d.mkdir(parents=True, exist_ok=True)
        now = time.time()
        header = {
            "kind": _safe(kind),
            "measurement_id": measurement_id,
            "created": now,
            "expires": now + (self.default_ttl_s if ttl_s is None else float(ttl_s)),
            "meta": meta or {},
        }
        buf = io.BytesIO()
        np.savez(
            buf,
            __header__=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8),
            **{f"a_{k}": np.asarray(v) for k, v in arrays.items()},
        )
        mid = hashlib.sha256(measurement_id.encode()).hexdigest()[:16]
        final = d / f"{kind}-{mid}.npz"
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=".npz")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(buf.getvalue())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        log.info("stored a %s dependency (%d arrays)", kind, len(arrays))

    def _read(self, path: Path) -> Dependency | None:
        try:
            with np.load(path) as z:
                header = json.loads(bytes(z["__header__"]).decode())
                arrays = {k[2:]: z[k] for k in z.files if k.startswith("a_")}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            log.warning("skipping unreadable dependency file %s: %s", path.name, exc)
            return None
        if header["expires"] < time.time():
            return None
        return Dependency(
            header["kind"], header["measurement_id"], arrays, header["meta"], header["created"]
        )

    def get(
        self, key: DependencyKey, kind: str, measurement_id: str | None = None
    ) -> Dependency | None:
        """The dependency of ``kind`` with ``measurement_id`` (or the newest one of that kind);
        None for an incomplete key (no subject, device or session id)."""
        if not key.complete:
            return None
        d = self._dir(key)
        if not d.is_dir():
            return None
        if measurement_id is not None:
            mid = hashlib.sha256(measurement_id.encode()).hexdigest()[:16]
            p = d / f"{_safe(kind)}-{mid}.npz"
            return self._read(p) if p.exists() else None
        found = [dep for p in d.glob(f"{_safe(kind)}-*.npz") if (dep := self._read(p)) is not None]
        return max(found, key=lambda x: x.created) if found else None

    def purge(self, *, leftover_age_s: float = 3600.0) -> int:
        """Delete expired entries, unreadable ones, and temporary files a crashed writer left
        behind (older than ``leftover_age_s``; younger ones may be a write in progress).
        Returns how many files were removed; never raises for one bad file."""
        n = 0
        now = time.time()
        for p in self.root.glob("*/.tmp-*"):
            try:
                if now - p.stat().st_mtime > leftover_age_s:
                    p.unlink(missing_ok=True)
                    n += 1
            except OSError:
                continue
        for p in self.root.glob("*/[!.]*.npz"):
            try:
                with np.load(p) as z:
                    header = json.loads(bytes(z["__header__"]).decode())
                expired = float(header["expires"]) < now
            except (OSError, ValueError, KeyError, EOFError, TypeError, zipfile.BadZipFile) as exc:
                # a file a reader cannot use is dead weight (truncated by a full disk, say)
                log.warning("removing unreadable dependency file %s: %s", p.name, exc)
                expired = True
            if expired:
                try:
                    p.unlink(missing_ok=True)
                    n += 1
                except OSError:
                    continue
        return n

    def purge_expired(self) -> int:
        """Alias of :meth:`purge` (kept for old callers)."""
        return self.purge()


def key_from_header(header: Any) -> DependencyKey:
    """Subject/device/session keys from an ismrmrd header (missing fields become "")."""

    def attr(obj: Any, *names: str) -> str:
        for n in names:
            obj = getattr(obj, n, None) if obj is not None else None
        return "" if obj is None else str(obj)

    subject = attr(header, "subjectInformation", "patientID")
    device = attr(header, "acquisitionSystemInformation", "deviceID") or attr(
        header, "acquisitionSystemInformation", "stationName"
    )
    session = attr(header, "measurementInformation", "frameOfReferenceUID") or attr(
        header, "studyInformation", "studyInstanceUID"
    )
    return DependencyKey(subject, device, session)


def measurement_id(header: Any) -> str:
    mi = getattr(header, "measurementInformation", None)
    return str(getattr(mi, "measurementID", "") or "") if mi is not None else ""


def dependencies_in_header(header: Any) -> list[tuple[str, str]]:
    """``(dependencyType, measurementID)`` pairs listed in the header."""
    mi = getattr(header, "measurementInformation", None)
    deps = getattr(mi, "measurementDependency", None) or []
    return [(str(d.dependencyType), str(d.measurementID)) for d in deps]


@dataclass
class Lookup:
    """The result of :func:`find_dependency`: the dependency (or None) and one line saying which
    one was chosen, or why none."""

    dependency: Dependency | None
    note: str


def _type_matches(dependency_type: str, kind: str) -> bool:
    """``"Noise"`` ↔ ``"noise"``, ``"B1map"``/``"B1_map"`` ↔ ``"b1"``."""
    return dependency_type.lower().replace("_", "").startswith(kind.lower().replace("_", ""))


def find_dependency(store: Store, header: Any, kind: str, label: str | None = None) -> Lookup:
    """The stored ``kind`` dependency of the scan described by ``header``.

    First the measurements the header names in ``measurementDependency`` (of a matching type),
    then the newest entry of the same subject/device/session. Never another subject's entry, and
    nothing at all for a header without subject, device or session id.

    Parameters
    ----------
    store : Store
    header : ismrmrdHeader
    kind : str
        ``"noise"``, ``"b1"``, ...
    label : str, optional
        What to call it in the note (default ``kind``).
    """
    label = label or kind
    key = key_from_header(header)
    if not key.complete:
        return Lookup(
            None,
            f"no stored {label} used: the MRD header lacks {', '.join(key.missing)}, and stored "
            "calibrations are only matched by subject, device and session",
        )
    named = [mid for t, mid in dependencies_in_header(header) if _type_matches(t, kind)]
    for mid in named:
        dep = store.get(key, kind, mid)
        if dep is not None:
            return Lookup(dep, f"stored {label} {mid} (named in the header)")
    dep = store.get(key, kind)
    if dep is not None:
        why = f"; the header names {', '.join(named)}, not in the store" if named else ""
        return Lookup(
            dep, f"stored {label} {dep.measurement_id or '(no id)'} of this subject/session{why}"
        )
    return Lookup(None, f"no stored {label} for this subject, device and session")


def open_store(spec: str | Path | None) -> DirectoryStore:
    """A store from a path (the only backend so far)."""
    if spec is None:
        raise DataFileError("no dependency store configured")
    return DirectoryStore(spec)
