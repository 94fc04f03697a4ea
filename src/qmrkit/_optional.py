"""Optional dependencies, probed in one place and imported lazily.

``import qmrkit`` never imports any of these; a feature that needs one calls :func:`require`,
which either returns the module or raises :class:`~qmrkit.errors.OptionalDependencyError`
naming the pip extra that provides it.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from .errors import OptionalDependencyError

# module name -> (pip extra, what it is for)
OPTIONAL = {
    "finufft": ("nufft", "the FINUFFT CPU backend of qmrkit.nufft"),
    "cufinufft": ("gpu", "the cuFINUFFT GPU backend of qmrkit.nufft"),
    # core dependencies (listed so that a broken environment still gets a clear message)
    "ismrmrd": (None, "reading and writing ISMRMRD/MRD raw data"),
    "h5py": (None, "HDF5 files"),
    "prometheus_client": (None, "the metrics endpoint of qmrkit serve"),
    "dask": ("batch", "qmrkit batch: scale-out over dask.distributed"),
    "distributed": ("batch", "qmrkit batch: scale-out over dask.distributed"),
    "safetensors": ("learn", "safetensors checkpoints in qmrkit.learn (train, load_model)"),
    "pydicom": ("dicom", "reading and writing DICOM (qmrkit.io.read_dicom, --dicom-out)"),
    "highdicom": ("dicom", "DICOM Parametric Map output (--dicom-out pmap)"),
    "pynetdicom": ("dicom", "sending maps to a PACS by DICOM C-STORE (--send-to)"),
    "torchkbnufft": ("test", "the torchkbnufft comparison in tests and benchmarks"),
}


def available(name: str) -> bool:
    """True if the optional module ``name`` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def require(name: str) -> ModuleType:
    """Import and return the optional module ``name``.

    Raises
    ------
    OptionalDependencyError
        If it is not installed; the message says which extra installs it.
    """
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        extra, purpose = OPTIONAL.get(name, (None, "this feature"))
        hint = f"pip install 'qmrkit[{extra}]'" if extra else f"pip install {name}"
        raise OptionalDependencyError(
            f"{name} is needed for {purpose} but is not installed; install it with: {hint}"
        ) from exc
