"""GPU parity (marked `gpu`; skipped when no CUDA device is visible): every backend that can run on
CUDA against the fp64 reference computed on the CPU, at the MFM size 224 x 224, B = 64."""

import pytest
import torch

import mfm_fast
from helpers import max_rel_err

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def gpu_backends(op):
    """The backends that can run `op` on CUDA tensors in this build."""
    return [b for b in ("torch", "triton", "cuda") if mfm_fast.available_backends("cuda", op)[b] is None]


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.rand(64, 3, 224, 224, device="cuda", generator=g)
    pred = torch.randn(64, 3, 224, 224, device="cuda", generator=g)
    mask = mfm_fast.make_masks(64, 224, 224, r1=16, p_low=0.5, generator=g, device="cuda")
    return x, pred, mask


@pytest.mark.parametrize("backend", gpu_backends("corrupt"))
def test_corrupt_parity_224(backend, batch):
    x, _, mask = batch
    ref = mfm_fast.corrupt(x.cpu().double(), mask.cpu(), backend="reference")
    out = mfm_fast.corrupt(x, mask, backend=backend)
    assert out.is_cuda and max_rel_err(out.cpu(), ref) <= 1e-5


@pytest.mark.parametrize("backend", gpu_backends("masked_freq_loss"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_loss_parity_224(backend, dtype, batch):
    x, pred0, mask = batch
    p_ref = pred0.to(dtype).cpu().double().requires_grad_(True)  # fresh leaves: the fixture is shared
    ref = mfm_fast.masked_freq_loss(p_ref, x.cpu().double(), mask.cpu(), normalize_target=True, backend="reference")
    ref.backward()
    pred = pred0.to(dtype).clone().requires_grad_(True)
    loss = mfm_fast.masked_freq_loss(pred, x, mask, normalize_target=True, backend=backend)
    loss.backward()
    assert max_rel_err(loss.cpu(), ref) <= 1e-5
    tol = 1e-5 if dtype == torch.float32 else 2 ** -8
    assert max_rel_err(pred.grad.cpu(), p_ref.grad) <= tol


def test_masks_drawn_on_device_without_sync(batch):
    _, _, mask = batch
    assert mask.is_cuda and mask.shape == (64, 224, 224)
    is_low = mask[:, 112, 112] == 1
    assert torch.equal(mask[is_low].sum((1, 2)), torch.full_like(mask[is_low].sum((1, 2)), 793.0))
