"""One client session's state and the budgets that keep one client from taking the service.

The rooms of :mod:`qmrkit.serve`, each using only the ones below it::

    server.py    connections, event loop, executors, shutdown       (uses everything below)
    handlers.py  pipelines by config name                             (uses session, store, pipelines)
    session.py   what one connection sent + its budgets               (uses protocol)
    protocol.py  MRD framing with per-message limits                  (uses nothing of serve)
    store.py     calibration dependencies on disk                     (uses nothing of serve)

A :class:`Session` is filled by the server as messages arrive and handed to a handler once the
client says CLOSE. :class:`SessionBudget` bounds what one session may cost before any pipeline
runs: bytes (on the wire and once decoded), messages, a minimum data rate and a deadline, with
defaults scaled to what the session's MRD header says the scan is.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import ProtocolError
from .protocol import Limits

#: per-readout counters whose encoding-limit ranges multiply into the number of readouts
_READOUT_COUNTERS = (
    "kspace_encoding_step_1",
    "kspace_encoding_step_2",
    "slice",
    "contrast",
    "phase",
    "repetition",
    "set",
    "average",
    "segment",
)


@dataclass
class Session:
    """Everything one connection sent, as handed to a pipeline."""

    config: str = ""
    header_xml: str = ""
    header: Any = None
    parameters: dict[str, Any] = field(default_factory=dict)
    acquisitions: list[Any] = field(default_factory=list)
    # raw-data pipelines (``streams`` in handlers): acquisitions go into this
    # ``io.mrd.ScanAssembler`` as they arrive instead of into ``acquisitions``
    assembler: Any = None
    images: list[Any] = field(default_factory=list)
    waveforms: list[Any] = field(default_factory=list)
    store: Any = None
    log: list[str] = field(default_factory=list)
    stages: dict[str, float] = field(default_factory=dict)

    def stage(self, name: str, seconds: float) -> None:
        self.stages[name] = self.stages.get(name, 0.0) + seconds


def shorten(text: str, n: int = 64) -> str:
    """``text`` cut to ``n`` characters for messages and logs (a client's text is never echoed
    whole: a 1 MiB config name must not become a 1 MiB reply or log line)."""
    text = str(text)
    return text if len(text) <= n else f"{text[:n]}… ({len(text)} characters)"


def expected_session_bytes(header: Any) -> int | None:
    """Bytes a scan of this MRD header should take on the wire, or None when it does not say.

    Readouts = the product of the header's encoding-limit ranges (lines × partitions × slices ×
    contrasts × phases × repetitions × sets × averages × segments); each of
    ``receiverChannels`` (32 if absent) × 2·matrix x samples (readout oversampling) in complex64,
    plus a trajectory of up to 3 floats per sample. Image series are counted as matrix x·y·z ×
    contrasts × 16 bytes. Used to scale the session budget, so it errs high.
    """
    try:
        enc = header.encoding[0]
        ms = enc.encodedSpace.matrixSize
        nx, ny, nz = max(int(ms.x), 1), max(int(ms.y), 1), max(int(ms.z), 1)
    except (AttributeError, IndexError, TypeError, ValueError):
        return None
    lim = getattr(enc, "encodingLimits", None)
    readouts = 1
    known = False
    for name in _READOUT_COUNTERS:
        lv = getattr(lim, name, None) if lim is not None else None
        if lv is None:
            continue
        lo, hi = int(getattr(lv, "minimum", 0) or 0), int(getattr(lv, "maximum", 0) or 0)
        readouts *= max(hi - lo + 1, 1)
        known = True
    if not known:
        return None
    asi = getattr(header, "acquisitionSystemInformation", None)
    channels = int(getattr(asi, "receiverChannels", 0) or 0) or 32
    per_readout = channels * 2 * nx * 8 + 3 * 2 * nx * 4 + 340  # samples, trajectory, header
    images = nx * ny * nz * 16
    return readouts * per_readout + images


class SessionBudget:
    """Counts what a session has sent and refuses it once it exceeds its budget.

    * bytes on the wire and bytes once decoded (a compressed acquisition counts what it expands
      to, before it is expanded): at most ``limits.session_budget_factor`` × what the header says
      the scan takes (:func:`expected_session_bytes`) + ``limits.session_budget_slack_bytes``,
      never more than
      ``limits.max_session_bytes``; before the header, ``limits.max_preheader_bytes``.
    * messages: at most ``limits.max_session_messages``.
    * data rate: in every window of ``limits.rate_window_s`` seconds the client must send
      ``limits.min_rate_bytes_s`` × window bytes, or finish; :meth:`timeout` tells the reader how
      long the next read may wait.
    * deadline: the whole upload within ``limits.session_deadline_s``.
    """

    def __init__(self, limits: Limits, clock: Callable[[], float] = time.monotonic):
        self.limits = limits
        self.clock = clock
        self.start = clock()
        self.window_start = self.start
        self.window_bytes = 0
        self.bytes = 0
        self.messages = 0
        self.max_bytes = limits.max_preheader_bytes

    def set_header(self, header: Any) -> None:
        """Scale the byte budget to the scan the header describes."""
        lim = self.limits
        expected = expected_session_bytes(header)
        if expected is None:
            self.max_bytes = lim.max_session_bytes
        else:
            scaled = lim.session_budget_factor * expected + lim.session_budget_slack_bytes
            self.max_bytes = int(min(scaled, lim.max_session_bytes))

    def received(self, n: int) -> None:
        """``n`` bytes arrived on the wire (called for every read, so the rate sees progress
        inside long messages)."""
        self.window_bytes += n
        if self.window_bytes >= self._window_quota:  # quota met: a new window starts now
            self.window_start, self.window_bytes = self.clock(), 0

    @property
    def _window_quota(self) -> float:
        return self.limits.min_rate_bytes_s * self.limits.rate_window_s

    def message(self, wire_bytes: int, decoded_bytes: int = 0) -> None:
        """Account one message; ProtocolError when the session is over budget."""
        self.messages += 1
        self.bytes += max(int(wire_bytes), int(decoded_bytes))
        lim = self.limits
        if self.messages > lim.max_session_messages:
            raise ProtocolError(f"session exceeds the limit of {lim.max_session_messages} messages")
        if self.bytes > self.max_bytes:
            raise ProtocolError(
                f"session exceeds its budget of {_mib(self.max_bytes)} "
                f"({_mib(self.bytes)} received or declared); the budget scales with the scan "
                "the MRD header describes"
            )

    def timeout(self) -> tuple[float, str]:
        """How long the next read may wait, and what it is waiting against."""
        now = self.clock()
        lim = self.limits
        choices = [(lim.read_timeout, f"no data for {lim.read_timeout:g} s")]
        if lim.session_deadline_s and math.isfinite(lim.session_deadline_s):
            choices.append(
                (
                    self.start + lim.session_deadline_s - now,
                    f"the session deadline of {lim.session_deadline_s:g} s passed",
                )
            )
        if lim.min_rate_bytes_s > 0:
            choices.append(
                (
                    self.window_start + lim.rate_window_s - now,
                    f"the client sent less than {lim.min_rate_bytes_s:g} bytes/s over "
                    f"{lim.rate_window_s:g} s (minimum data rate)",
                )
            )
        seconds, why = min(choices, key=lambda c: c[0])
        return max(seconds, 0.0), why


def _mib(n: float) -> str:
    return f"{n / (1 << 20):.1f} MiB"
