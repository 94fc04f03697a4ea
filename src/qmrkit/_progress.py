"""Progress bars and logging set-up: the one place that decides whether a bar is shown.

Library code logs through ``logging.getLogger("qmrkit.<module>")`` and never prints. Every long
step (dictionary build, reconstruction iterations, fits, training) takes ``progress=None`` and
asks :func:`progress_enabled`, which resolves it the same way everywhere:

* ``True`` / ``False``: shown / not shown, as asked;
* ``None`` (the default): the process-wide default set by :func:`set_progress_default` (the CLI's
  ``--quiet`` sets it to ``False``), else on when stderr is a terminal or the code runs in a
  Jupyter kernel (where ``tqdm.auto`` draws a widget), off otherwise (logs, CI, pipes).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

# None: decide per call (terminal or notebook); True/False: a process-wide override
_default: bool | None = None


def get_logger(name: str) -> logging.Logger:
    """Logger under the ``qmrkit`` namespace (``get_logger("fit.lm")`` -> ``qmrkit.fit.lm``)."""
    return logging.getLogger(name if name.startswith("qmrkit") else f"qmrkit.{name}")


def set_progress_default(progress: bool | None) -> bool | None:
    """Set what ``progress=None`` means in this process (None: terminal or notebook); returns the
    previous setting so callers can restore it."""
    global _default
    previous, _default = _default, progress
    return previous


def in_notebook() -> bool:
    """True inside a Jupyter (IPython kernel) session, where tqdm.auto shows a widget."""
    shell = sys.modules.get("IPython")
    if shell is None or "ipykernel" not in sys.modules:
        return False
    try:
        ip = shell.get_ipython()  # type: ignore[attr-defined]
    except Exception:  # pragma: no cover - exotic IPython builds
        return False
    return ip is not None and type(ip).__name__ == "ZMQInteractiveShell"


def progress_enabled(progress: bool | None) -> bool:
    """Resolve a ``progress`` option (see the module docstring)."""
    if progress is not None:
        return bool(progress)
    if _default is not None:
        return _default
    try:
        tty = sys.stderr.isatty()
    except (AttributeError, ValueError):  # closed or replaced stderr
        tty = False
    return tty or in_notebook()


class _NullBar:
    n = 0
    total = None

    def update(self, n: float = 1) -> None:
        pass

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass

    def set_description(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _NullBar:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def _tqdm(**kwargs: Any) -> Any:
    """Create the bar (a seam for tests, which record the bars a run creates)."""
    from tqdm.auto import tqdm

    return tqdm(**kwargs)


def progress_bar(
    total: float | None = None,
    desc: str = "",
    progress: bool | None = None,
    **options: Any,
) -> Any:
    """A tqdm bar (or a silent stand-in with the same methods) for manual updates.

    ``options`` go to tqdm (e.g. ``unit="voxel"``, ``bar_format=...``).
    """
    if not progress_enabled(progress):
        return _NullBar()
    return _tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, **options)


def track(
    iterable: Iterable[T], desc: str = "", total: int | None = None, progress: bool | None = None
) -> Iterator[T]:
    """Iterate with a progress bar when enabled."""
    if not progress_enabled(progress):
        yield from iterable
        return
    bar = _tqdm(iterable=iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)
    yield from bar


def configure_logging(verbosity: int = 0, *, quiet: bool = False) -> None:
    """Set up console logging for the CLI: 0 warnings, 1 info, 2+ debug; ``quiet``: errors only."""
    if quiet:
        level = logging.ERROR
    else:
        level = (
            logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
        )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("qmrkit")
    root.handlers[:] = [handler]
    root.setLevel(level)
