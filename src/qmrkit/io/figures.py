"""PNG figures of parameter maps (numpy, matplotlib's colormaps, Pillow; headless).

The implementation lives in :mod:`qmrkit._figure`, which imports neither torch nor pyplot so that
the CLI can render in a separate, quickly started process (:class:`qmrkit._figure.FigureWorker`).
"""

from __future__ import annotations

from .._figure import save_map_figure

__all__ = ["save_map_figure"]
