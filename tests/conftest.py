import pytest
import torch

import moeflux

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and moeflux.cuda_kernels_built() else [])
FLOAT_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]

# Tolerances for comparing against float64 references.
TOLERANCE = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
}


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(params=FLOAT_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def dtype(request):
    return request.param


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)
