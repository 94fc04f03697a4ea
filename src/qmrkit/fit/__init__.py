"""Generic parameter estimation for any signal model written in PyTorch.

Solvers: :func:`lm` (batched Levenberg–Marquardt, the default for smooth models), :func:`adam`
(whole-volume gradient descent with Adam/SGDM/RMSProp, L1/L2/Huber losses and regularisers: total
variation on image grids, :class:`GraphTV` along surface-mesh edges, :class:`Prior`),
:func:`dictionary_search` (starts, or a fit of its own). Neural-network surrogates of slow
simulators (:func:`train_surrogate`, :class:`SurrogateModel`) serve as forward models. This package
knows no MRI physics: models live in :mod:`qmrkit.models` or come from :func:`model_from_function`.
"""

from .adam import adam
from .dictionary import dictionary_search
from .lm import lm
from .mcmc import McmcResult, mcmc
from .model import FunctionModel, Model, Parameter, model_from_function, scratch
from .problem import Problem, make_problem
from .regularizers import (
    CustomRegularizer,
    GraphTV,
    Prior,
    Regularizer,
    RegularizerContext,
    TotalVariation,
)
from .result import FitResult
from .surrogate import Surrogate, SurrogateModel, SurrogateReport, sample_inputs, train_surrogate

__all__ = [
    "Model",
    "Parameter",
    "FunctionModel",
    "model_from_function",
    "scratch",
    "Problem",
    "make_problem",
    "FitResult",
    "lm",
    "adam",
    "mcmc",
    "McmcResult",
    "Regularizer",
    "RegularizerContext",
    "TotalVariation",
    "GraphTV",
    "Prior",
    "CustomRegularizer",
    "dictionary_search",
    "Surrogate",
    "SurrogateModel",
    "SurrogateReport",
    "train_surrogate",
    "sample_inputs",
]
