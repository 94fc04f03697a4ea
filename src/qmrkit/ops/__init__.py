"""Linear operators (autograd-safe): the base class, composition, the dot test, and the concrete
operators of reconstruction: FFT, sampling masks, coil sensitivities, finite differences,
diagonal weights, dense matrices, reshapes and vertical stacks; ``TensorCache``, the per-device/
dtype copy of an operator's data, for operators defined in other packages (``recon``)."""

from ._util import TensorCache
from .base import Adjoint, Compose, Identity, LinearOperator, Scale, Sum, check_adjoint
from .diff import FiniteDifference
from .elementwise import Diagonal, Matrix, Reshape
from .fft import FFT
from .sampling import Mask
from .sense import Sense
from .stack import Vstack

__all__ = [
    "LinearOperator",
    "Adjoint",
    "Compose",
    "Sum",
    "Scale",
    "Identity",
    "check_adjoint",
    "FFT",
    "Mask",
    "Sense",
    "FiniteDifference",
    "Diagonal",
    "Matrix",
    "Reshape",
    "Vstack",
    "TensorCache",
]
