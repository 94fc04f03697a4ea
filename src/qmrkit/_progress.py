"""Progress bars and logging set-up.

Library code logs through ``logging.getLogger("qmrkit.<module>")`` and never prints. Progress bars
(tqdm) show only when asked for and when stderr is a terminal, so logs and CI output stay clean.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


def get_logger(name: str) -> logging.Logger:
    """Logger under the ``qmrkit`` namespace (``get_logger("fit.lm")`` -> ``qmrkit.fit.lm``)."""
    return logging.getLogger(name if name.startswith("qmrkit") else f"qmrkit.{name}")


def progress_enabled(progress: bool | None) -> bool:
    """Resolve a ``progress`` option: None means "on when stderr is a terminal"."""
    if progress is None:
        return sys.stderr.isatty()
    return bool(progress)


class _NullBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _NullBar:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def progress_bar(total: int | None = None, desc: str = "", progress: bool | None = None) -> Any:
    """A tqdm bar (or a silent stand-in with the same methods) for manual updates."""
    if not progress_enabled(progress):
        return _NullBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


def track(
    iterable: Iterable[T], desc: str = "", total: int | None = None, progress: bool | None = None
) -> Iterator[T]:
    """Iterate with a progress bar when enabled."""
    if not progress_enabled(progress):
        yield from iterable
        return
    from tqdm.auto import tqdm

    yield from tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)


def configure_logging(verbosity: int = 0) -> None:
    """Set up console logging for the CLI: 0 warnings, 1 info, 2+ debug."""
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("qmrkit")
    root.handlers[:] = [handler]
    root.setLevel(level)
