"""Errors and warnings raised by qmrkit.

Every error says what was expected, what was received and, where possible, how to fix it.
The classes also derive from the matching built-in exception (``ValueError``, ``ImportError``,
``OSError``), so code that catches the built-ins keeps working.
"""

from __future__ import annotations


class QmrkitError(Exception):
    """Base class of every error raised by qmrkit."""


class ShapeError(QmrkitError, ValueError):
    """An array has the wrong shape or number of dimensions."""


class DTypeError(QmrkitError, TypeError):
    """An array has the wrong data type (e.g. real where complex is needed)."""


class DeviceError(QmrkitError, ValueError):
    """Arrays live on different devices, or a requested device is not available."""


class BoundsError(QmrkitError, ValueError):
    """Parameter bounds are invalid (lower >= upper) or a value lies outside its bounds."""


class ParameterError(QmrkitError, ValueError):
    """An option or argument has an invalid value (out of range, wrong unit, unknown name)."""


class UnknownNameError(ParameterError, KeyError):
    """A name (model, solver, backend, ...) is not known; the message lists the known ones."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class ModelError(QmrkitError, ValueError):
    """A signal model is malformed (e.g. a forward function returning the wrong shape)."""


class DataFileError(QmrkitError, OSError):
    """A data file cannot be read or written (missing, corrupt, wrong format)."""


class DicomError(DataFileError):
    """DICOM files cannot be used as given: several series mixed, a tag the fit needs is missing,
    or the images do not form one regular grid (orientations differ, uneven slice spacing); the
    message names the files, series or tags involved."""


class ProtocolError(QmrkitError, ValueError):
    """A network message or acquisition protocol is malformed."""


class ServiceError(QmrkitError, ConnectionError):
    """The reconstruction server cannot be reached, refused the connection or broke it (the
    message names the address and what was tried)."""


class ResourceLimitError(QmrkitError, RuntimeError):
    """Work stopped because it ran past a time or memory budget, or its process died."""


class OptionalDependencyError(QmrkitError, ImportError):
    """An optional package is needed for this feature; the message names the extra to install."""


class NonFiniteLossError(QmrkitError, FloatingPointError):
    """Training produced a non-finite loss or gradient and was stopped (``qmrkit.learn.train``);
    the message names the epoch, step, cause and the last good checkpoint."""


class QmrkitWarning(UserWarning):
    """Base class of qmrkit warnings."""


class ConvergenceWarning(QmrkitWarning):
    """A solver stopped before meeting its convergence criteria."""


class InversionWarning(ConvergenceWarning):
    """An unroll of a memory-efficient network could not be inverted accurately (the inversion
    did not converge, or recovered states drifted); states were recomputed instead."""


class NonFiniteWarning(QmrkitWarning):
    """Non-finite values (NaN or Inf) were found and excluded; the message counts them."""


class UnitsWarning(QmrkitWarning):
    """A value looks like it is in the wrong unit (flip angles in radians, times in seconds);
    qmrkit uses degrees and milliseconds. The computation runs as asked."""


class QmrkitDeprecationWarning(QmrkitWarning, DeprecationWarning):
    """A deprecated qmrkit feature was used."""


__all__ = [
    "QmrkitError",
    "NonFiniteLossError",
    "InversionWarning",
    "ShapeError",
    "DTypeError",
    "DeviceError",
    "BoundsError",
    "ParameterError",
    "UnknownNameError",
    "ModelError",
    "DataFileError",
    "DicomError",
    "ProtocolError",
    "ServiceError",
    "OptionalDependencyError",
    "QmrkitWarning",
    "ConvergenceWarning",
    "NonFiniteWarning",
    "UnitsWarning",
    "QmrkitDeprecationWarning",
]
