"""The thread policy: one rule for torch's intra-op threads and OpenMP's wait policy.

Every process qmrkit starts and controls (the ``qmrkit`` CLI, ``qmrkit serve`` and its isolated
workers, a batch worker) calls :func:`configure_process` first — before torch is imported where
possible. Library code never changes threads on its own: a program that imports qmrkit keeps
whatever it set.

The rule
--------
* **Wait policy**: ``OMP_WAIT_POLICY=PASSIVE`` unless the environment already sets it. With the
  default (active) policy an OpenMP thread that reaches a barrier spins on its core; when another
  process competes for the cores, the spinning threads steal the time the working thread needs and
  a parallel region waits for a thread that is not running: a 2-thread 2D solve on a 2-core
  machine with one busy competitor measured 0.45 s → 7.4 s. Passive waiting sleeps at barriers,
  which costs a few µs per region when the machine is quiet (qmrkit's parallel regions are
  element-wise ops and FFTs of ≥ 10⁴ elements, far longer). OpenMP reads the variable when its
  runtime starts, i.e. when torch is imported: set later, it reaches only child processes.
* **Intra-op threads**, first that applies: the ``--threads`` flag (``num_threads``), the
  ``QMRKIT_NUM_THREADS`` environment variable, ``OMP_NUM_THREADS``, else the number of CPUs this
  process may run on (``os.sched_getaffinity``: a container or ``taskset`` limit is respected,
  where torch's own default counts the machine's cores and oversubscribes a limited process).
  The count goes to ``OMP_NUM_THREADS`` (for torch imported later and for child processes) and to
  ``torch.set_num_threads`` when torch is already imported.
* **Heap** (glibc, Linux): freed tensor memory stays in the process for reuse instead of going
  back to the kernel, by ``mallopt``: allocations up to 256 MiB come from the heap (not from
  ``mmap``), and up to 1 GiB of free heap is kept (``M_TRIM_THRESHOLD``). With glibc's defaults
  every solver iteration's multi-MB temporaries are unmapped when freed and page-faulted in again
  when the next one is allocated: a warm ``fit.lm`` of 128² MOLLI voxels took 2,600–6,300 minor
  page faults per call and 62–86 ms (2 threads); with the policy 26–120 faults and 45–53 ms (same
  machine, same minutes). The cost is that the process keeps its peak heap (up to the 1 GiB of
  free memory) instead of returning it. ``QMRKIT_MALLOC=default`` (or setting glibc's own
  ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``) leaves malloc as it is.
"""

from __future__ import annotations

import os
import sys

from .errors import ParameterError

#: environment variable with qmrkit's intra-op thread count
ENV = "QMRKIT_NUM_THREADS"
#: environment variable: "default" leaves glibc's malloc settings alone
MALLOC_ENV = "QMRKIT_MALLOC"

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers
_MMAP_THRESHOLD = 256 << 20
_TRIM_THRESHOLD = 1 << 30


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask; ``os.cpu_count()`` where unknown)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except (AttributeError, OSError):  # not on Linux
        return max(os.cpu_count() or 1, 1)


def _positive(text: str, source: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise ParameterError(f"{source} must be a positive integer, got {text!r}")
    return n


def thread_count(num_threads: int | None = None) -> int:
    """The intra-op thread count of the rule (module docstring): ``num_threads``, else
    ``$QMRKIT_NUM_THREADS``, else ``$OMP_NUM_THREADS``, else :func:`available_cpus`.

    Raises
    ------
    ParameterError
        If ``num_threads`` or ``$QMRKIT_NUM_THREADS`` is not a positive integer.
    """
    if num_threads is not None:
        return _positive(str(num_threads), "the thread count (--threads)")
    if os.environ.get(ENV, "").strip():
        return _positive(os.environ[ENV].strip(), ENV)
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) > 0:
        return int(omp)
    return available_cpus()


def configure_process(num_threads: int | None = None) -> int:
    """Apply the thread policy to this process (and, through the environment, its children).

    Call it at the entry of a process qmrkit controls, before importing torch (the wait policy
    only takes effect for an OpenMP runtime started afterwards). Calling it again (e.g. once the
    command line is parsed) updates the thread count.

    Parameters
    ----------
    num_threads : int, optional
        Intra-op threads; default from the environment (module docstring).

    Returns
    -------
    int
        The thread count applied.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    keep_heap()
    n = thread_count(num_threads)
    os.environ["OMP_NUM_THREADS"] = str(n)
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "set_num_threads"):
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
    return n


_HEAP_DONE: bool | None = None


def keep_heap() -> bool:
    """Apply the heap rule of the module docstring once per process (glibc only).

    Returns
    -------
    bool
        True when glibc's ``mallopt`` accepted both settings (in this call or an earlier one);
        False where it does not apply (not glibc, opted out, or the user tuned malloc).
    """
    global _HEAP_DONE
    if _HEAP_DONE is not None:
        return _HEAP_DONE
    _HEAP_DONE = False
    opted_out = os.environ.get(MALLOC_ENV, "").strip().lower() == "default"
    user_tuned = any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"))
    if opted_out or user_tuned or not sys.platform.startswith("linux"):
        return False
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) == 1
    ok = mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1 and ok
    _HEAP_DONE = ok
    return ok
