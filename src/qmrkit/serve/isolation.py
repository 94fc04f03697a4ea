"""Run one session's pipeline in a process of its own, with a time and a memory budget.

With ``qmrkit serve --isolate`` a reconstruction that crashes (a segfault in a library, the
kernel's OOM killer), runs away, or grows past its memory budget ends *its* session with an
error, and the server and every other session go on: a thread cannot be stopped, a process can.

Processes are forked from a ``forkserver`` that has imported qmrkit's pipelines and torch once, so
a scan pays for a fork, not for imports (≈ 0.1–0.3 s on this project's 2-core CI machine).
The session goes to the child pickled (ismrmrd objects pickle), the outputs come back the same
way. The parent polls the child's resident memory (``/proc/<pid>/status``) and its clock.
"""

from __future__ import annotations

import multiprocessing as mp
import signal
import time
from collections.abc import Sequence
from typing import Any

from .._progress import get_logger
from ..errors import QmrkitError, ResourceLimitError
from .session import Session

log = get_logger("serve.isolation")

_CONTEXTS: dict[tuple[str, ...], Any] = {}
_PRELOAD = (
    "qmrkit.serve.handlers",
    "qmrkit.pipelines",
    "qmrkit.recon",
    "qmrkit.serve._worker_warmup",
)


def _context(imports: Sequence[str]) -> Any:
    """The forkserver context (one per set of extra modules to import in the workers)."""
    key = tuple(imports)
    if key not in _CONTEXTS:
        method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
        ctx = mp.get_context(method)
        if method == "forkserver":
            ctx.set_forkserver_preload([*_PRELOAD, *key])
        _CONTEXTS[key] = ctx
    return _CONTEXTS[key]


def _child(conn: Any, session: Session, imports: Sequence[str]) -> None:
    """Worker body: import the extra pipeline modules, run the handler, send what happened."""
    import importlib

    from ._worker_warmup import worker_threads
    from .handlers import resolve

    worker_threads()
    try:
        for name in imports:
            importlib.import_module(name)
        handler, arg = resolve(session.config)
        outputs = handler(session, arg)
        conn.send(("ok", outputs, session.log, session.stages))
    except QmrkitError as exc:
        conn.send(("error", exc, session.log, session.stages))
    except BaseException as exc:  # reported to the parent as an internal error
        conn.send(("internal", f"{type(exc).__name__}: {exc}", session.log, session.stages))
    finally:
        conn.close()


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "did not finish"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (killed: out of memory?)" if -code == signal.SIGKILL else ""
        return f"died of {name}{hint}"
    return f"exited with status {code}"


def run_isolated(
    session: Session,
    *,
    time_budget_s: float | None = None,
    memory_budget_bytes: int | None = None,
    imports: Sequence[str] = (),
    poll_s: float = 0.02,
) -> list[Any]:
    """Run ``session``'s pipeline in a child process and return its outputs.

    The child's log lines and stage timings are copied into ``session``.

    Raises
    ------
    QmrkitError
        What the pipeline raised (the same class and message as in-process).
    ResourceLimitError
        The child ran past ``time_budget_s``, grew past ``memory_budget_bytes`` of resident
        memory (it is killed), or died (a crash, the OOM killer).
    RuntimeError
        Any other exception of the pipeline, as ``"<type>: <message>"``.
    """
    ctx = _context(imports)
    receiver, sender = ctx.Pipe(duplex=False)
    proc = ctx.Process(
        target=_child, args=(sender, session, tuple(imports)), name="qmrkit-scan", daemon=True
    )
    t0 = time.monotonic()
    proc.start()
    sender.close()  # the child holds the only writer: EOF when it dies
    peak = 0
    try:
        while True:
            if receiver.poll(poll_s):
                try:
                    status, payload, lines, stages = receiver.recv()
                except EOFError:  # died before it could answer
                    proc.join(5)
                    raise ResourceLimitError(
                        f"the reconstruction process {_describe_exit(proc.exitcode)}; this scan "
                        "was not processed, the server goes on"
                    ) from None
                break
            elapsed = time.monotonic() - t0
            if time_budget_s is not None and elapsed > time_budget_s:
                proc.kill()
                raise ResourceLimitError(
                    f"the reconstruction ran past its time budget of {time_budget_s:g} s and was "
                    "stopped"
                )
            rss = _rss_bytes(proc.pid) if proc.pid else 0
            peak = max(peak, rss)
            if memory_budget_bytes is not None and rss > memory_budget_bytes:
                proc.kill()
                raise ResourceLimitError(
                    f"the reconstruction used {rss / 2**20:.0f} MiB, more than its memory "
                    f"budget of {memory_budget_bytes / 2**20:.0f} MiB, and was stopped"
                )
    finally:
        proc.join(5)
        if proc.is_alive():  # pragma: no cover - a child that ignores the end of its work
            proc.kill()
            proc.join(5)
        receiver.close()
    session.log.extend(line for line in lines if line not in session.log)
    for name, seconds in stages.items():
        session.stage(name, seconds)
    log.info(
        "isolated %s: %.2f s, peak resident %.0f MiB (pid %d)",
        session.config.split(":")[0][:32],
        time.monotonic() - t0,
        peak / 2**20,
        proc.pid or -1,
    )
    if status == "error":
        raise payload
    if status == "internal":
        raise RuntimeError(payload)
    return payload


def warm_up(imports: Sequence[str] = ()) -> None:
    """Start the forkserver now and wait until it has imported torch and the pipelines and
    warmed them up (a null session through it), so the first scan does not pay for that."""
    run_isolated(Session(config="null"), imports=imports)
