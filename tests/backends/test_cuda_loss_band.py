"""The CUDA loss's band path (csrc/loss_band.cuh, csrc/loss_band.cu) under the mask_band promise.

Without a GPU: the CPU kernels of torch.ops.mfm_fast.masked_freq_loss_cuda run the same per-plane code as
the CUDA kernels (the band plane for images whose mask corner is 1, the full plane for the others), checked
against the fp64 reference on MFM disc masks (mixed low / high-pass batches) and against the torch backend's
errors on the same batch. With a GPU (marked `gpu`): backend="cuda" with mask_band against the reference.
"""

import os
import subprocess

import pytest
import torch

import mfm_fast
from mfm_fast.backends import cuda as cuda_backend
from mfm_fast.masks import disc_band
from helpers import ROOT, load_tool, max_rel_err, nvcc, reference_loss_and_grad

SKIPPED_BUILD = cuda_backend.build_info().get("status") == "skipped"
pytestmark = pytest.mark.skipif(SKIPPED_BUILD, reason="installed with MFM_FAST_SKIP_CUDA_BUILD=1")
OPS = torch.ops.mfm_fast
if not SKIPPED_BUILD:
    cuda_backend.unavailable_reason()  # loads _C
MEAN, STD = list(mfm_fast.IMAGENET_MEAN), list(mfm_fast.IMAGENET_STD)


def mfm_batch(n, side, dtype=torch.float32, seed=0, r1=None):
    """pred (dtype), raw [0, 1] target, disc masks (even images low-pass, odd high-pass) and their mask_band."""
    g = torch.Generator().manual_seed(seed)
    r1 = side // 14 if r1 is None else r1  # 16 at 224, 8 at 112
    target = torch.rand(n, 3, side, side, generator=g)
    pred = torch.randn(n, 3, side, side, generator=g).to(dtype)
    mask = mfm_fast.make_masks(n, side, side, r1=r1, low=torch.arange(n) % 2 == 0)
    return pred, target, mask, disc_band(side, side, r1, 999)


def host_loss(pred, target, mask, band, gamma=1.0, reduction="masked", need_grad=True, norm=True):
    return OPS.masked_freq_loss_cuda(pred, target, mask, gamma, reduction, 1.0, MEAN if norm else None,
                                     STD if norm else None, need_grad, band)



def torch_loss(pred, target, mask, **kw):
    p = pred.detach().requires_grad_(True)
    loss = mfm_fast.masked_freq_loss(p, target, mask, backend="torch", normalize_target=True, **kw)
    loss.backward()
    return loss.detach(), p.grad


@pytest.mark.parametrize("side", [224, 112])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("need_grad", [True, False])
def test_host_band_path_matches_reference(side, dtype, need_grad):
    pred, target, mask, band = mfm_batch(4, side, dtype, seed=side)
    assert band == side // 14
    ref, ref_grad = reference_loss_and_grad(pred, target, mask, normalize_target=True)
    t_loss, t_grad = torch_loss(pred, target, mask)
    loss, grad = host_loss(pred, target, mask, band, need_grad=need_grad)
    assert loss.dtype == torch.float32
    err, err_torch = max_rel_err(loss, ref), max_rel_err(t_loss, ref)
    assert err <= max(2 * err_torch, 2e-6), (err, err_torch)
    if not need_grad:
        assert grad.numel() == 0
        return
    assert grad.dtype == dtype and grad.shape == pred.shape
    gerr, gerr_torch = max_rel_err(grad, ref_grad), max_rel_err(t_grad, ref_grad)
    assert gerr <= 2 * gerr_torch + 1e-6, (gerr, gerr_torch)
    if dtype == torch.float32:
        assert err <= 1e-5 and gerr <= 1e-5
    # the high-pass planes' gradient lives on the band: per image, against the reference
    for n in range(pred.shape[0]):
        assert max_rel_err(grad[n], ref_grad[n]) <= max(2 * max_rel_err(t_grad[n], ref_grad[n]), 1e-5)


@pytest.mark.parametrize("pred_dtype", [torch.float16, torch.bfloat16])
def test_host_band_path_uint8_target_and_16_bit_pred(pred_dtype):
    pred, target, mask, band = mfm_batch(2, 112, pred_dtype, seed=3)
    u8 = (target * 255).round().to(torch.uint8)
    p = pred.detach().double().requires_grad_(True)
    ref = mfm_fast.masked_freq_loss(p, u8, mask, backend="reference", normalize_target=True)
    ref.backward()
    q = pred.detach().requires_grad_(True)
    mfm_fast.masked_freq_loss(q, u8, mask, backend="torch", normalize_target=True).backward()
    loss, grad = host_loss(pred, u8, mask, band)
    assert grad.dtype == pred_dtype and max_rel_err(loss, ref) <= 1e-5
    for n in range(2):  # image 1 is high-pass: the band path
        assert max_rel_err(grad[n], p.grad[n]) <= 2 * max_rel_err(q.grad[n], p.grad[n]) + 1e-6


@pytest.mark.parametrize("gamma, reduction", [(0.5, "masked"), (2.0, "sum"), (1.5, "mean")])
def test_host_band_path_options(gamma, reduction):
    pred, target, mask, band = mfm_batch(2, 112, seed=5)
    ref, ref_grad = reference_loss_and_grad(pred, target, mask, loss_gamma=gamma, reduction=reduction, normalize_target=True)
    loss, grad = host_loss(pred, target, mask, band, gamma, reduction)
    assert max_rel_err(loss, ref) <= 1e-5 and max_rel_err(grad, ref_grad) <= 1e-5


@pytest.mark.parametrize("side, r1", [(224, 20), (112, 24)])
def test_host_band_32(side, r1):
    """mask_band in 17..32 takes the 32-wide band."""
    pred, target, mask, band = mfm_batch(2, side, seed=7, r1=r1)
    assert 16 < band <= 32
    ref, ref_grad = reference_loss_and_grad(pred, target, mask, normalize_target=True)
    loss, grad = host_loss(pred, target, mask, band)
    assert max_rel_err(loss, ref) <= 1e-5 and max_rel_err(grad, ref_grad) <= 1e-5


def test_host_band_path_is_taken_and_the_promise_is_the_callers():
    """A high-pass mask that breaks the promise (a removed frequency outside the box) is not seen by the band
    path: the loss then differs from the reference (the caller's contract, as for the triton backend); a
    low-pass image (corner 0) takes the full path and stays exact; without a usable promise (none, R > 32)
    every plane takes the full path, bit for bit."""
    pred, target, mask, band = mfm_batch(2, 112, seed=9)
    full = host_loss(pred, target, mask, None)
    for too_wide in (33, 1000):
        wide = host_loss(pred, target, mask, too_wide)
        assert torch.equal(wide[0], full[0]) and torch.equal(wide[1], full[1])
    broken = mask.clone()
    broken[:, 3, 5] = 1 - broken[:, 3, 5]  # far outside the box |ky|, |kx| < 8 (centre at 56): keep <-> remove
    broken[:, 109, 107] = 1 - broken[:, 109, 107]  # and its mirror
    ref, ref_grad = reference_loss_and_grad(pred, target, broken, normalize_target=True)
    loss, grad = host_loss(pred, target, broken, band)
    assert max_rel_err(grad[0], ref_grad[0]) <= 1e-5  # image 0 low-pass: full path, sees the change
    assert max_rel_err(grad[1], ref_grad[1]) > 1e-3  # image 1 high-pass: band path, the change is outside it
    assert max_rel_err(loss, ref) > 1e-4



@pytest.mark.parametrize("side", [224, 112])
def test_host_band_phases_have_no_shared_writes(side, host_vthreads):
    """The band plane's phases over 2, 7 and 256 virtual threads, forwards and backwards: the same gradient
    bits as one thread (no two threads touch the same shared-memory element within a phase)."""
    pred, target, mask, band = mfm_batch(2, side, seed=11)
    mask[0] = mask[1]  # every image high-pass: only band planes
    host_vthreads(1)
    loss1, grad1 = host_loss(pred, target, mask, band, gamma=0.5)
    for n in (2, 7, 256):
        for signed in (n, -n):
            host_vthreads(signed)
            loss, grad = host_loss(pred, target, mask, band, gamma=0.5)
            assert torch.equal(grad, grad1), signed
            assert abs(loss.item() - loss1.item()) <= 1e-6 * abs(loss1.item())  # partial sums in another order


def test_op_schema_fake_and_autograd_with_mask_band():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        p = torch.empty(2, 3, 224, 224, dtype=torch.bfloat16)
        m = torch.empty(2, 224, 224)
        loss, grad = OPS.masked_freq_loss_cuda(p, p, m, 1.0, "masked", 1.0, None, None, True, 16)
        assert loss.shape == () and grad.shape == p.shape and grad.dtype == p.dtype
    pred, target, mask, band = mfm_batch(2, 112, seed=13)
    p = pred.clone().requires_grad_(True)
    torch.library.opcheck(OPS.masked_freq_loss_cuda, (p, target, mask, 1.0, "masked", 1.0, MEAN, STD, True, band))
    loss = cuda_backend.masked_freq_loss(p, target, mask, 1.0, "masked", 1.0, MEAN, STD, True, band)
    (2 * loss).backward()
    _, ref_grad = reference_loss_and_grad(pred, target, mask, normalize_target=True)
    assert max_rel_err(p.grad, 2 * ref_grad) <= 1e-5
    with pytest.raises(RuntimeError, match="mask_band must be >= 1"):
        host_loss(pred, target, mask, 0)


@pytest.mark.skipif(nvcc() is None, reason="nvcc not found (the extension was built elsewhere)")
@pytest.mark.slow
def test_sm90_band_kernels_no_local_memory(tmp_path):
    """nvcc -Xptxas -v for sm_90 (setup.py's flags): every band kernel (224 / 112, RB 16 / 32, with and without
    the gradient) has no stack frame and no spills; the 224 x 16 kernel with the gradient fits 3 CTAs of 224
    threads per SM (ptxas's budget for __launch_bounds__(224, 3): 80 registers)."""
    from torch.utils.cpp_extension import include_paths
    sass_model = load_tool("sass_model")

    out = subprocess.run([nvcc(), "-std=c++17", "-O3", "-lineinfo", *(f"-I{p}" for p in include_paths()),
                          "-arch=sm_90", "-Xptxas", "-v", "-cubin", "-o", str(tmp_path / "k.cubin"),
                          os.path.join(ROOT, "csrc", "loss_band.cu")], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    kernels = {n: f for n, f in sass_model.parse_ptxas(out.stderr).items() if "loss_band_kernel" in n}
    assert len(kernels) == 8, list(kernels)
    for name, facts in kernels.items():
        assert facts["stack"] == 0 and facts["spill_stores"] == 0, (name, facts)
    main = next(f for n, f in kernels.items() if "ILi224ELi16ELb1E" in n)
    assert main["registers"] <= 80


# ------------------------------------------------------------------ GPU (the CUDA kernels)
@pytest.mark.parametrize("side", [224, 112])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 6])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_band_path_fwd_bwd(side, dtype, n):
    pred, target, mask, band = mfm_batch(n, side, dtype, seed=side + n)
    ref, ref_grad = reference_loss_and_grad(pred, target, mask, normalize_target=True)
    t_loss, t_grad = torch_loss(pred, target, mask)
    p = pred.cuda().requires_grad_(True)
    loss = mfm_fast.masked_freq_loss(p, target.cuda(), mask.cuda(), backend="cuda", normalize_target=True,
                                     mask_band=band)
    loss.backward()
    assert max_rel_err(loss.cpu(), ref) <= max(2 * max_rel_err(t_loss, ref), 2e-6)
    assert max_rel_err(p.grad.cpu(), ref_grad) <= 2 * max_rel_err(t_grad, ref_grad) + 1e-6
    again = mfm_fast.masked_freq_loss(p.detach(), target.cuda(), mask.cuda(), backend="cuda", normalize_target=True,
                                      mask_band=band)
    assert torch.equal(again, loss.detach())  # deterministic
