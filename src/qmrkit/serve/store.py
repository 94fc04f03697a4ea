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
import secrets
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

    def digest(self, salt: bytes = b"") -> str:
        """A file-name-safe hash of the ids; with the store's secret ``salt`` the name of a
        patient's folder cannot be recomputed from a guessed patient id."""
        raw = "\x1f".join((self.subject, self.device, self.session)).encode()
        return hashlib.sha256(salt + raw).hexdigest()[:32]


@dataclass
class Dependency:
    kind: str  # "noise", "b1", ...
    measurement_id: str
    arrays: dict[str, np.ndarray]
    meta: dict[str, Any]
    created: float


@dataclass(frozen=True)
class StoredEntry:
    """One stored dependency as listed by :meth:`DirectoryStore.entries` (no arrays)."""

    kind: str
    measurement_id: str
    created: float  # seconds since the epoch
    expires: float


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
    """Dependencies as ``.npz`` files under ``root/<salted hash of subject|device|session>/``.

    * **Versions, nothing lost.** Every :meth:`put` writes a new file
      ``<kind>-<hash of measurement id>-<time ns>-<random>.npz`` (temporary file + rename): two
      writers of the same entry at once both land, and a reader takes the newest version; older
      versions are removed by :meth:`purge` once superseded for ``leftover_age_s``.
    * **Quota.** At most ``max_entries_per_key`` files and ``max_bytes_per_key`` bytes per
      subject/device/session; a put beyond that is refused with an error (not silently dropped).
    * **Salted names.** Folder names hash the ids with a secret salt kept in ``root/.salt``
      (created once, shared by every replica that mounts the store).
    """

    def __init__(
        self,
        root: str | Path,
        *,
        default_ttl_s: float = DEFAULT_TTL_S,
        max_entries_per_key: int = 256,
        max_bytes_per_key: int = 2 << 30,
    ):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.default_ttl_s = float(default_ttl_s)
        self.max_entries_per_key = int(max_entries_per_key)
        self.max_bytes_per_key = int(max_bytes_per_key)
        self._salt = self._load_salt()

    def _load_salt(self) -> bytes:
        path = self.root / ".salt"
        try:  # O_EXCL: of several replicas starting at once, exactly one creates it
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            for _ in range(50):  # another replica may be writing it right now
                salt = path.read_bytes()
                if len(salt) == 32:
                    return salt
                time.sleep(0.01)
            raise DataFileError(f"the store's salt file {path} is damaged; remove it") from None
        salt = secrets.token_bytes(32)
        with os.fdopen(fd, "wb") as f:
            f.write(salt)
            f.flush()
            os.fsync(f.fileno())
        return salt

    def _dir(self, key: DependencyKey) -> Path:
        return self.root / key.digest(self._salt)

    @staticmethod
    def _mid_hash(measurement_id: str) -> str:
        return hashlib.sha256(measurement_id.encode()).hexdigest()[:16]

    def put(
        self,
        key: DependencyKey,
        kind: str,
        measurement_id: str,
        arrays: dict[str, np.ndarray],
        meta: dict[str, Any] | None = None,
        ttl_s: float | None = None,
    ) -> None:
        """Store (atomically) a new version of a dependency; :meth:`get` returns the newest.

        Raises
        ------
        ParameterError
            A key without subject, device or session id, or a key over its quota.
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
        data = buf.getvalue()
        entries = list(d.glob("[!.]*.npz"))
        used = 0
        for p in entries:
            try:
                used += p.stat().st_size
            except OSError:  # removed by a purge meanwhile
                continue
        if len(entries) >= self.max_entries_per_key or used + len(data) > self.max_bytes_per_key:
            raise ParameterError(
                f"the calibration store is full for this subject/device/session ({len(entries)} "
                f"entries, {used / 2**20:.1f} MiB; quota {self.max_entries_per_key} entries, "
                f"{self.max_bytes_per_key / 2**20:.0f} MiB); nothing was stored"
            )
        stem = f"{kind}-{self._mid_hash(measurement_id)}"
        final = d / f"{stem}-{time.time_ns()}-{secrets.token_hex(4)}.npz"
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=".npz")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
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
        """The newest version of the dependency of ``kind`` with ``measurement_id`` (or the newest
        of that kind); None for an incomplete key (no subject, device or session id)."""
        if not key.complete:
            return None
        d = self._dir(key)
        if not d.is_dir():
            return None
        mid = "*" if measurement_id is None else f"{self._mid_hash(measurement_id)}-*"
        found = [
            dep for p in d.glob(f"{_safe(kind)}-{mid}.npz") if (dep := self._read(p)) is not None
        ]
        return max(found, key=lambda x: x.created) if found else None

    def entries(self, key: DependencyKey) -> list[StoredEntry]:
        """What is stored for one subject/device/session: the newest unexpired version of each
        (kind, measurement id), newest first; empty for an incomplete key.

        Only the small JSON header of each file is read (not its arrays), so answering a
        dependency query costs milliseconds even for large B1 maps.
        """
        if not key.complete:
            return []
        d = self._dir(key)
        if not d.is_dir():
            return []
        now = time.time()
        newest: dict[tuple[str, str], StoredEntry] = {}
        for p in d.glob("[!.]*.npz"):
            try:
                with np.load(p) as z:
                    header = json.loads(bytes(z["__header__"]).decode())
                entry = StoredEntry(
                    str(header["kind"]),
                    str(header["measurement_id"]),
                    float(header["created"]),
                    float(header["expires"]),
                )
            except (OSError, ValueError, KeyError, EOFError, TypeError, zipfile.BadZipFile):
                continue  # unreadable: purge() removes it; a query just does not list it
            if entry.expires < now:
                continue
            k = (entry.kind, entry.measurement_id)
            if k not in newest or entry.created > newest[k].created:
                newest[k] = entry
        return sorted(newest.values(), key=lambda e: -e.created)

    def purge(self, *, leftover_age_s: float = 3600.0) -> int:
        """Delete expired entries, unreadable ones, versions superseded for ``leftover_age_s``,
        and temporary files a crashed writer left behind (older than ``leftover_age_s``; younger
        ones may be a write in progress).
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
        newest: dict[tuple[Path, str], float] = {}
        entries: list[tuple[Path, float, bool]] = []
        for p in self.root.glob("*/[!.]*.npz"):
            try:
                with np.load(p) as z:
                    header = json.loads(bytes(z["__header__"]).decode())
                expired = float(header["expires"]) < now
                created = float(header["created"])
            except (OSError, ValueError, KeyError, EOFError, TypeError, zipfile.BadZipFile) as exc:
                # a file a reader cannot use is dead weight (truncated by a full disk, say)
                log.warning("removing unreadable dependency file %s: %s", p.name, exc)
                expired, created = True, 0.0
            entries.append((p, created, expired))
            if not expired:
                entry = (p.parent, p.name.rsplit("-", 2)[0])  # <kind>-<measurement hash>
                newest[entry] = max(newest.get(entry, 0.0), created)
        for p, created, expired in entries:
            entry = (p.parent, p.name.rsplit("-", 2)[0])
            superseded = created < newest.get(entry, 0.0) and now - created > leftover_age_s
            if expired or superseded:
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

    The measurements the header names in ``measurementDependency`` (of a matching type) and only
    those when it names any; otherwise the newest entry of the same subject/device/session. Never
    another subject's entry, and nothing at all for a header without subject, device or session
    id.

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
    if named:
        # the scanner said which calibration belongs to this scan: another one of the same
        # subject (an older B1 map, a noise scan of another coil set-up) is not a substitute
        return Lookup(
            None,
            f"no stored {label} used: the header names {', '.join(named)}, which is not in the "
            "store for this subject, device and session; no other is substituted",
        )
    dep = store.get(key, kind)
    if dep is not None:
        return Lookup(
            dep, f"stored {label} {dep.measurement_id or '(no id)'} of this subject/session"
        )
    return Lookup(None, f"no stored {label} for this subject, device and session")


def dependency_answer(store: DirectoryStore | None, header: Any) -> dict[str, list[str]]:
    """The answer to an MRD dependency query (message 1019, as Gadgetron's) for one scan.

    Lists what is stored for the scan's own subject/device/session only: a scanner asks "is the
    noise calibration I am about to send already there?" and skips it if so. Another subject's
    entries are never listed (the store is keyed by subject, device and session; a header without
    all three ids gets an empty answer and says why).

    Returns
    -------
    dict
        ``status`` (``["success"]`` or ``["incomplete", reason]``), ``NoiseDependencies`` and
        ``B1Dependencies`` (measurement ids stored, newest first; ``NoiseDependencies`` is the
        attribute Gadgetron's dependency query fills), ``FoundDependencies`` and
        ``MissingDependencies`` (the header's ``measurementDependency`` entries as
        ``"<type>:<measurement id>"``, each found in the store or not).
    """
    answer: dict[str, list[str]] = {
        "NoiseDependencies": [],
        "B1Dependencies": [],
        "FoundDependencies": [],
        "MissingDependencies": [],
    }
    key = key_from_header(header)
    named = dependencies_in_header(header)
    if store is None:
        answer["status"] = ["incomplete", "this server has no dependency store (--store DIR)"]
        answer["MissingDependencies"] = [f"{t}:{m}" for t, m in named]
        return answer
    if not key.complete:
        answer["status"] = [
            "incomplete",
            f"the MRD header lacks {', '.join(key.missing)}; stored calibrations are only "
            "matched by subject, device and session",
        ]
        answer["MissingDependencies"] = [f"{t}:{m}" for t, m in named]
        return answer
    stored = store.entries(key)
    for e in stored:
        if e.kind == "noise":
            answer["NoiseDependencies"].append(e.measurement_id)
        elif e.kind == "b1":
            answer["B1Dependencies"].append(e.measurement_id)
    for t, mid in named:
        hit = any(e.measurement_id == mid and _type_matches(t, e.kind) for e in stored)
        answer["FoundDependencies" if hit else "MissingDependencies"].append(f"{t}:{mid}")
    answer["status"] = ["success"]
    return answer


def open_store(spec: str | Path | None) -> DirectoryStore:
    """A store from a path (the only backend so far)."""
    if spec is None:
        raise DataFileError("no dependency store configured")
    return DirectoryStore(spec)
