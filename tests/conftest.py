"""Session set-up and fixtures for every test (the shared helpers live in tests/helpers.py)."""

import os

import pytest
import torch

# Triton kernels run on CPU tensors under the interpreter; it must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def restore_threads():
    """Put torch's CPU thread count back after a test that changes it (pretrain --threads)."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture
def host_vthreads(monkeypatch):
    """Set MFM_FAST_HOST_VTHREADS (the CUDA extension's host build reads it on every call) for one test."""
    return lambda n: monkeypatch.setenv("MFM_FAST_HOST_VTHREADS", str(n))
