"""Device and dtype helpers shared by every layer.

Convention: a public function that allocates takes ``device=None``; ``None`` means "the device of
the input tensors, else CPU". Nothing here ever moves data to a GPU unless asked.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from .errors import DeviceError, DTypeError

DeviceLike = str | torch.device | None

REAL_DTYPE = torch.float32
COMPLEX_DTYPE = torch.complex64

_COMPLEX_OF = {torch.float32: torch.complex64, torch.float64: torch.complex128}
_REAL_OF = {torch.complex64: torch.float32, torch.complex128: torch.float64}


def resolve_device(device: DeviceLike = None, *tensors: Any) -> torch.device:
    """Return the device to compute on.

    Parameters
    ----------
    device : str, torch.device or None
        Explicit device (``"cpu"``, ``"cuda"``, ``"cuda:1"``). ``None`` picks the device of the first
        tensor among ``tensors``, else the CPU.
    *tensors
        Inputs whose device is used when ``device`` is None; non-tensors are ignored.

    Raises
    ------
    DeviceError
        If the requested device does not exist on this machine.
    """
    if device is None:
        for t in tensors:
            if isinstance(t, torch.Tensor):
                return t.device
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise DeviceError(f"unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:N'") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                f"device {device!r} was requested but CUDA is not available on this machine; "
                "use device='cpu'"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(
                f"device {device!r} was requested but only {torch.cuda.device_count()} CUDA "
                "device(s) exist"
            )
    return dev


def as_tensor(
    x: Any,
    *,
    dtype: torch.dtype | None = None,
    device: DeviceLike = None,
    name: str = "array",
) -> torch.Tensor:
    """Convert ``x`` (tensor, NumPy array, list or scalar) to a tensor once, at a public edge.

    Real NumPy float64 input becomes ``dtype`` when given (else keeps its precision).
    """
    if isinstance(x, torch.Tensor):
        t = x
    else:
        try:
            arr = np.asarray(x)
        except Exception as exc:  # pragma: no cover - exotic inputs
            raise DTypeError(f"{name}: cannot convert {type(x).__name__} to an array") from exc
        if arr.dtype == object:
            raise DTypeError(f"{name}: expected a numeric array, got an array of Python objects")
        if arr.dtype.byteorder not in ("=", "|") and arr.dtype.byteorder != _native_order():
            arr = arr.astype(arr.dtype.newbyteorder("="))
        # ascontiguousarray would turn a 0-d array into shape (1,)
        t = (
            torch.tensor(arr.item())
            if arr.ndim == 0
            else torch.from_numpy(np.ascontiguousarray(arr))
        )
    dev = resolve_device(device, t)
    if dtype is not None:
        if t.is_complex() and not dtype.is_complex:
            raise DTypeError(f"{name}: expected real data ({dtype}), got complex {t.dtype}")
        t = t.to(dtype=dtype)
    return t.to(device=dev)


def _native_order() -> str:
    import sys

    return "<" if sys.byteorder == "little" else ">"


def complex_dtype_of(dtype: torch.dtype) -> torch.dtype:
    """Complex dtype matching a real one (float32 -> complex64); complex input is returned."""
    if dtype.is_complex:
        return dtype
    return _COMPLEX_OF.get(dtype, torch.complex64)


def real_dtype_of(dtype: torch.dtype) -> torch.dtype:
    """Real dtype matching a complex one (complex64 -> float32); real input is returned."""
    return _REAL_OF.get(dtype, dtype)


def same_device(tensors: Iterable[torch.Tensor], what: str = "inputs") -> torch.device:
    """Check that all tensors live on one device and return it."""
    devs = {t.device for t in tensors if isinstance(t, torch.Tensor)}
    if len(devs) > 1:
        raise DeviceError(
            f"{what} live on different devices {sorted(map(str, devs))}; move them with .to(device)"
        )
    return devs.pop() if devs else torch.device("cpu")


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels on ``device`` (needed for honest timings on CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
