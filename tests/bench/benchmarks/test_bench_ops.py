"""pytest-benchmark suite: one group per work item of bench/fft_mask.py, parametrised by provider.

    pytest tests/bench/benchmarks --benchmark-only --benchmark-group-by=group,param   # GPU: providers side by side
    pytest tests/bench/benchmarks --benchmark-disable                                 # CPU CI: one call each (smoke)

Providers and work items are bench/fft_mask.py's (copy is the raw fp32 copy of the batch); a provider
that cannot run a work item on this device is skipped with the reason. Shape from the environment:
MFM_BENCH_BATCH (default 64 on CUDA, 2 on CPU), MFM_BENCH_SIZE (224 / 16), MFM_BENCH_DTYPE (pred, fp32).
pytest-benchmark times wall clock: on CUDA every call ends with torch.cuda.synchronize() and there is
no L2 flush, so the headline figures come from bench/fft_mask.py. No test asserts a duration.
"""

import os

import pytest
import torch

from helpers import load_bench

pytest.importorskip("pytest_benchmark")



fft = load_bench("fft_mask")  # one instance per session: its torch.compile cache is shared
GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
BATCH = int(os.environ.get("MFM_BENCH_BATCH", 64 if GPU else 2))
SIZE = int(os.environ.get("MFM_BENCH_SIZE", 224 if GPU else 16))
DTYPE = os.environ.get("MFM_BENCH_DTYPE", "fp32")
R1 = min(16, SIZE // 8)  # as bench/fft_mask.py
CASE = f"B={BATCH} 3x{SIZE}x{SIZE} pred {DTYPE}"

pytestmark = pytest.mark.benchmark(warmup=True, warmup_iterations=3, min_rounds=5, max_time=0.5)


@pytest.fixture(scope="module")
def inputs():
    """The batch, its masks, pred and the mask_band promise; on CPU one torch thread, as bench/fft_mask.py."""
    threads = torch.get_num_threads()
    if not GPU:
        torch.set_num_threads(1)
    x, mask, pred = fft.make_inputs(BATCH, SIZE, R1, 0.5, fft.DTYPES[DTYPE], DEVICE)
    yield x, mask, pred, fft.mask_band(R1, SIZE)
    torch.set_num_threads(threads)


def synced(fn):
    if not GPU:
        return fn

    def call():
        fn()
        torch.cuda.synchronize()
    return call


@pytest.mark.parametrize("provider", ("copy",) + fft.PROVIDER_ORDER)
@pytest.mark.parametrize("work", fft.WORKS)
def test_work(benchmark, inputs, work, provider):
    reason = fft.unavailable(provider, work, DEVICE.type) if provider != "copy" else None
    if reason is not None:
        pytest.skip(reason)
    x, mask, pred, band = inputs
    benchmark.group = f"{fft.WORK_TITLES[work]} | {CASE}"
    benchmark.extra_info.update(device=fft.device_name(DEVICE), work=work, provider=provider,
                                floor_factor=fft.floor_factor(work, pred.element_size()))
    if provider == "copy":
        out = torch.empty_like(x)
        benchmark(synced(lambda: out.copy_(x)))
        return
    fn = fft.work_fn(provider, work, x, mask, pred, band)  # loss_bwd: backward of one untimed forward
    try:
        benchmark(synced(fn))
    finally:
        pred.grad = None
