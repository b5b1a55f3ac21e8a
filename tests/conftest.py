import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

# Triton kernels run on CPU tensors under the interpreter; it must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"

SHAPES = [(1, 3, 16, 16), (2, 3, 16, 24), (4, 3, 32, 32)]


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (in float64)."""
    a, e = actual.detach().double(), expected.detach().double()
    return float((a - e).abs().max() / e.abs().max().clamp_min(1e-300))


def masks_for(shape, r1=None):
    """Deterministic MFM masks for a (N, C, H, W) batch: low-pass for even n, high-pass for odd n."""
    import mfm_fast
    n, _, h, w = shape
    r1 = r1 if r1 is not None else max(1, min(h, w) // 6)
    return mfm_fast.make_masks(n, h, w, r1=r1, low=torch.arange(n) % 2 == 0)


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


def load_bench(stem):
    """bench/<stem>.py as a module, one instance per session (the bench tests share its compile caches)."""
    name = f"bench_{stem}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, BENCH_DIR / f"{stem}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]
