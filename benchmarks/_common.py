"""Shared helpers for benchmark scripts: timing, machine description, result files."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import numpy
        import scipy

        info.update(numpy=numpy.__version__, scipy=scipy.__version__)
    except ImportError:  # pragma: no cover
        pass
    return info


def best_time(
    fn: Callable[[], Any], repeat: int = 3, sync: Callable[[], None] | None = None
) -> tuple[float, Any]:
    """Minimum wall time over ``repeat`` runs (and the last result)."""
    best, out = float("inf"), None
    for _ in range(repeat):
        if sync:
            sync()
        t0 = time.perf_counter()
        out = fn()
        if sync:
            sync()
        best = min(best, time.perf_counter() - t0)
    return best, out


def write_results(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {
        "benchmark": name,
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        **payload,
    }
    path.write_text(json.dumps(payload, indent=2, default=_plain))
    return path


def _plain(obj: Any) -> Any:
    """JSON fallback for NumPy scalars and arrays."""
    if hasattr(obj, "item") and getattr(obj, "size", 1) == 1:
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    """Format rows as a Markdown table; columns are (key, header, format)."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    lines = [head, sep]
    for r in rows:
        cells = []
        for key, _, fmt in columns:
            v = r.get(key)
            cells.append("—" if v is None else (format(v, fmt) if fmt else str(v)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
