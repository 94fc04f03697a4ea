"""Package attributes imported on first use (module ``__getattr__``, PEP 562).

``qmrkit.io`` and ``qmrkit.pipelines`` name many readers and pipelines whose dependencies
(pydicom, ismrmrd, the reconstruction code) a given command does not need: importing them all up
front cost ``qmrkit fit`` ≈ 0.3 s. Their ``__init__`` declares which submodule defines each
public name and installs the two functions returned here.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any


def lazy_exports(
    package: str, exports: Mapping[str, str], submodules: Iterable[str], public: Iterable[str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``.

    Parameters
    ----------
    package : str
        The package's ``__name__``.
    exports : mapping of str -> str
        Public name -> the submodule (relative name) that defines it.
    submodules : iterable of str
        Submodules reachable as attributes, as when the package imported them all.
    public : iterable of str
        The package's ``__all__``.
    """
    subs = frozenset(submodules)
    names = frozenset(public)

    def __getattr__(name: str) -> Any:
        if name in subs:
            return importlib.import_module(f".{name}", package)
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{module}", package), name)
        vars(sys.modules[package])[name] = value  # later look-ups skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | names)

    return __getattr__, __dir__
