"""Linear operators (autograd-safe): the base class, composition and the dot test."""

from .base import Adjoint, Compose, Identity, LinearOperator, Scale, Sum, check_adjoint

__all__ = ["LinearOperator", "Adjoint", "Compose", "Sum", "Scale", "Identity", "check_adjoint"]
