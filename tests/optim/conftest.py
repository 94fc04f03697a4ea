import pytest
import torch

_DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available"),
    ),
]


@pytest.fixture(params=_DEVICES)
def device(request):
    """Every device-agnostic test runs on CPU and, when present, on CUDA."""
    return torch.device(request.param)
