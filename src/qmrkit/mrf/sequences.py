"""MR fingerprinting acquisition schedules (flip angles, TR, TE, RF phase, inversion).

Angles in degrees, times in ms.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataFileError, ParameterError, ShapeError


@dataclass(frozen=True)
class Schedule:
    """An MRF sequence: one RF pulse and one readout per TR.

    Attributes
    ----------
    flip_angles : ndarray (n_tr,)
        Nominal flip angles in degrees.
    tr : ndarray (n_tr,)
        Repetition times in ms.
    te : ndarray (n_tr,)
        Echo times in ms (0 < TE < TR).
    phase : ndarray (n_tr,)
        RF phases in degrees (0 for FISP).
    inversion : bool
        An adiabatic (B1-insensitive) inversion precedes the first pulse.
    ti : float
        Delay from the inversion to the first pulse in ms.
    """

    flip_angles: np.ndarray
    tr: np.ndarray
    te: np.ndarray
    phase: np.ndarray = field(default=None)  # type: ignore[assignment]
    inversion: bool = True
    ti: float = 20.0

    def __post_init__(self) -> None:
        fa = np.atleast_1d(np.asarray(self.flip_angles, dtype=np.float64))
        n = fa.size
        tr = _broadcast("tr", self.tr, n)
        te = _broadcast("te", self.te, n)
        ph = _broadcast("phase", 0.0 if self.phase is None else self.phase, n)
        for name, a in (("flip_angles", fa), ("tr", tr), ("te", te), ("phase", ph)):
            if not np.isfinite(a).all():
                raise ParameterError(f"schedule {name} contains NaN or Inf")
        if n == 0:
            raise ShapeError("a schedule needs at least one TR")
        if (tr <= 0).any() or (te <= 0).any():
            raise ParameterError("TR and TE must be positive (ms)")
        if (tr <= te).any():
            i = int(np.argmax(tr <= te))
            raise ParameterError(
                f"TR must exceed TE in every TR; at index {i}: TR={tr[i]} ms, TE={te[i]} ms"
            )
        if self.inversion and not self.ti >= 0:
            raise ParameterError(f"ti must be >= 0 ms, got {self.ti}")
        object.__setattr__(self, "flip_angles", fa)
        object.__setattr__(self, "tr", tr)
        object.__setattr__(self, "te", te)
        object.__setattr__(self, "phase", ph)

    @property
    def n_tr(self) -> int:
        return int(self.flip_angles.size)

    @property
    def duration_ms(self) -> float:
        return float(self.tr.sum() + (self.ti if self.inversion else 0.0))

    def header_parameters(self) -> dict[str, list[float]]:
        """The schedule as ISMRMRD sequenceParameters: ``TR``, ``TE``, ``flipAngle_deg`` (one per
        TR), ``TI`` (0 without inversion) and, when any is non-zero, ``rf_phase_deg`` (ISMRMRD
        has no field for it; :func:`qmrkit.io.write_mrd` stores it as a user parameter).
        :func:`schedule_from_header` reads them back."""
        out = {
            "TR": [float(v) for v in self.tr],
            "TE": [float(v) for v in self.te],
            "TI": [float(self.ti) if self.inversion else 0.0],
            "flipAngle_deg": [float(v) for v in self.flip_angles],
        }
        if np.any(self.phase != 0):
            out["rf_phase_deg"] = [float(v) for v in self.phase]
        return out

    def save(self, path: str | Path) -> Path:
        """Write the schedule as a text table (columns: flip_deg tr_ms te_ms phase_deg)."""
        p = Path(path)
        header = f"inversion={int(self.inversion)} ti_ms={self.ti}\nflip_deg tr_ms te_ms phase_deg"
        np.savetxt(p, np.stack([self.flip_angles, self.tr, self.te, self.phase], 1), header=header)
        return p

    @classmethod
    def load(cls, path: str | Path) -> Schedule:
        """Read a schedule written by :meth:`save` (or any 2–4 column text table; header optional)."""
        p = Path(path)
        if not p.exists():
            raise DataFileError(f"schedule file not found: {p}")
        inversion, ti = True, 20.0
        for line in p.read_text().splitlines():
            if line.startswith("#") and "inversion=" in line:
                for tok in line[1:].split():
                    k, _, v = tok.partition("=")
                    if k == "inversion":
                        inversion = bool(int(v))
                    elif k == "ti_ms":
                        ti = float(v)
        try:
            arr = np.loadtxt(p, ndmin=2)
        except ValueError as exc:
            raise DataFileError(f"cannot read schedule table {p}: {exc}") from exc
        if arr.shape[1] < 3:
            raise DataFileError(
                f"schedule table {p} needs columns flip_deg tr_ms te_ms [phase_deg]"
            )
        phase = arr[:, 3] if arr.shape[1] > 3 else 0.0
        return cls(arr[:, 0], arr[:, 1], arr[:, 2], phase, inversion=inversion, ti=ti)


def schedule_from_header(header: Any) -> Schedule:
    """The MRF schedule stored in an ISMRMRD header's ``sequenceParameters`` (TR, TE and
    flipAngle_deg lists, one entry per TR; TI > 0 means an inversion TI ms before the first pulse)."""
    if isinstance(header, str | bytes):
        from ismrmrd.xsd import CreateFromDocument

        header = CreateFromDocument(header.encode() if isinstance(header, str) else header)
    sp = getattr(header, "sequenceParameters", None)
    fa = list(getattr(sp, "flipAngle_deg", None) or [])
    if sp is None or len(fa) < 2:
        raise ParameterError(
            "the header carries no MRF schedule: sequenceParameters needs one flipAngle_deg (and TR, TE) "
            "per TR; pass the schedule explicitly"
        )
    ti = list(getattr(sp, "TI", None) or [0.0])
    return Schedule(
        fa,
        list(sp.TR),
        list(sp.TE),
        _rf_phases(header, len(fa)),
        inversion=float(ti[0]) > 0,
        ti=float(ti[0]),
    )


def _rf_phases(header: Any, n: int) -> Any:
    """RF phases (degrees) from the user parameter :func:`qmrkit.io.write_mrd` stores them in."""
    from ..io.mrd import RF_PHASE_PARAMETER

    up = getattr(header, "userParameters", None)
    for p in getattr(up, "userParameterString", None) or []:
        if p.name == RF_PHASE_PARAMETER:
            values = [float(v) for v in str(p.value).split(",")]
            if len(values) != n:
                raise ParameterError(
                    f"the header lists {len(values)} RF phases for {n} flip angles"
                )
            return values
    return 0.0


def _broadcast(name: str, value: Any, n: int) -> np.ndarray:
    a = np.atleast_1d(np.asarray(value, dtype=np.float64))
    if a.size == 1:
        return np.full(n, float(a[0]))
    if a.size != n:
        raise ShapeError(
            f"schedule arrays must have equal length: flip_angles has {n}, {name} has {a.size}"
        )
    return a


def _smooth_noise(n: int, rng: np.random.Generator, n_knots: int = 12) -> np.ndarray:
    """Perlin-like smooth noise in [0, 1]: cubic interpolation of random knot values."""
    from scipy.interpolate import CubicSpline

    knots = rng.uniform(0, 1, n_knots)
    x = np.linspace(0, n - 1, n_knots)
    y = CubicSpline(x, knots, bc_type="natural")(np.arange(n))
    y = (y - y.min()) / max(y.max() - y.min(), 1e-12)
    return y


def fisp_schedule(
    n_tr: int = 1000,
    *,
    peaks: tuple[float, ...] = (35.0, 43.0, 70.0, 45.0, 27.0),
    floor: float = 5.0,
    gap: int = 10,
    tr_range: tuple[float, float] = (11.5, 14.5),
    te: float = 2.0,
    ti: float = 20.0,
    seed: int = 0,
) -> Schedule:
    """A FISP MRF schedule in the style of Jiang et al. (MRM 2015).

    Flip angles: half-sine lobes (one per entry of ``peaks``, degrees) of equal length above a
    ``floor`` (degrees), separated by ``gap`` TRs at the floor; TR varies smoothly (Perlin-like)
    within ``tr_range`` (ms); TE fixed; one adiabatic inversion ``ti`` ms before the first pulse.
    """
    if n_tr < len(peaks) * 4:
        raise ParameterError(f"n_tr={n_tr} is too short for {len(peaks)} flip-angle lobes")
    if not tr_range[0] > te:
        raise ParameterError(f"the shortest TR ({tr_range[0]} ms) must exceed TE ({te} ms)")
    rng = np.random.default_rng(seed)
    n_lobes = len(peaks)
    lobe = max(4, (n_tr - gap * (n_lobes - 1)) // n_lobes)
    fa = np.full(n_tr, float(floor))
    pos = 0
    for p in peaks:
        end = min(pos + lobe, n_tr)
        t = np.arange(end - pos)
        fa[pos:end] = floor + (p - floor) * np.sin(np.pi * (t + 0.5) / lobe)
        pos = end + gap
        if pos >= n_tr:
            break
    tr = tr_range[0] + (tr_range[1] - tr_range[0]) * _smooth_noise(n_tr, rng)
    return Schedule(fa, tr, te, 0.0, inversion=True, ti=ti)
