"""The CUDA extension backend (mfm_fast._C, csrc/).

Without a GPU (CI): the extension is built by `pip install -e .`, imports, registers its ops with the
right fake shapes and autograd, gives documented errors, and its CPU kernels, which run the SAME
per-plane C++ code (csrc/fft.cuh, csrc/planes.cuh) as the CUDA kernels, match the fp64 reference at
224 x 224 and 112 x 112. With a GPU (marked `gpu`): the CUDA kernels against the fp64 reference.
"""

import os
import re
import subprocess
import sys

import pytest
import torch

import mfm_fast
from mfm_fast.backends import cuda as cuda_backend
from mfm_fast import backends, dispatch
from helpers import load_tool, max_rel_err, nvcc, reference_loss_and_grad

SKIPPED_BUILD = (os.environ.get("MFM_FAST_SKIP_CUDA_BUILD", "") not in ("", "0")
                 or cuda_backend.build_info().get("status") == "skipped")
needs_ext = pytest.mark.skipif(SKIPPED_BUILD, reason="installed with MFM_FAST_SKIP_CUDA_BUILD=1")
needs_gpu = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
OPS = torch.ops.mfm_fast
if not SKIPPED_BUILD:
    cuda_backend.unavailable_reason()  # loads _C: torch.ops.mfm_fast.*_cuda exist for every test, run alone or not
MEAN, STD = list(mfm_fast.IMAGENET_MEAN), list(mfm_fast.IMAGENET_STD)


def masks(kind, n, side, generator=None):
    """(n, side, side) float32 keep masks: MFM low / high pass, a band, or random values (not Hermitian)."""
    r1 = side // 14
    if kind == "low":
        return mfm_fast.make_masks(n, side, side, r1=r1, low=torch.ones(n, dtype=torch.bool))
    if kind == "high":
        return mfm_fast.make_masks(n, side, side, r1=r1, low=torch.zeros(n, dtype=torch.bool))
    if kind == "band":
        return mfm_fast.make_masks(n, side, side, r1=r1, r2=3 * r1, low=torch.arange(n) % 2 == 0)
    return torch.rand(n, side, side, generator=generator)  # random: non-Hermitian, fractional



def cpu_kernel_loss(pred, target, mask, gamma=1.0, reduction="masked", weight=1.0, norm=False, need_grad=True):
    m = mask.float().contiguous() if mask is not None else None
    return OPS.masked_freq_loss_cuda(pred, target, m, gamma, reduction, weight, MEAN if norm else None,
                                     STD if norm else None, need_grad)


# ------------------------------------------------------------------ build, registration, errors (no GPU)
@needs_ext
def test_extension_built_and_reported():
    info = cuda_backend.build_info()
    assert info.get("status") == "built", f"the CUDA extension was not built: {info} (MFM_FAST_SKIP_CUDA_BUILD=1 skips)"
    assert info["torch_version"] == torch.__version__ and info["arch_list"] and info["nvcc"]
    import mfm_fast._C  # noqa: F401
    assert cuda_backend.unavailable_reason() is None
    for op in ("corrupt_cuda", "masked_freq_loss_cuda"):
        assert hasattr(OPS, op)
    out = subprocess.run([sys.executable, "-m", "mfm_fast.info"], capture_output=True, text=True, check=True).stdout
    assert "cuda ext     built" in out and "arch_list" in out


def test_dispatch_declares_cuda_but_auto_skips_it():
    assert backends.get("cuda").ops == {"corrupt", "masked_freq_loss"}
    for op in ("corrupt", "masked_freq_loss"):
        assert "not validated on a GPU" in dispatch.auto_skip_reason("cuda", op)
        assert dispatch.backend_unavailable_reason("cuda", "cpu", op) is not None


@needs_ext
def test_unsupported_sizes_are_reported():
    reason = dispatch.backend_unavailable_reason("cuda", None, "corrupt", (3, 64, 64))
    assert reason is not None and "224 x 224 / 112 x 112" in reason and "shared memory" not in reason
    big = dispatch.backend_unavailable_reason("cuda", None, "corrupt", (3, 256, 256))
    assert "needs 266,240 bytes of shared memory" in big  # (256 * 129 + 256) * 8: why 256 is not compiled
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(os.path.join(root, "csrc", "fft.cuh"), encoding="utf-8") as f:
        assert f"kHopperSmemPerBlock = {cuda_backend.SMEM_PER_BLOCK};" in f.read()
    assert dispatch.backend_unavailable_reason("cuda", None, "corrupt", (3, 224, 224)) is None
    assert "channels" in dispatch.backend_unavailable_reason("cuda", None, "corrupt", (9, 112, 112))


@needs_ext
@pytest.mark.parametrize("op", ["corrupt", "loss"])
def test_cpu_tensors_give_the_documented_error(op):
    x = torch.rand(1, 3, 112, 112)
    m = masks("low", 1, 112)
    with pytest.raises(RuntimeError, match=r"^backend='cuda' for \w+ on cpu: the CUDA extension backend runs on "
                                           r"CUDA tensors only"):
        if op == "corrupt":
            mfm_fast.corrupt(x, m, backend="cuda")
        else:
            mfm_fast.masked_freq_loss(torch.randn_like(x), x, m, backend="cuda")


@needs_ext
@pytest.mark.parametrize("case, call, match", [
    ("rank", lambda x, m: OPS.corrupt_cuda(x[0], m, MEAN, STD, torch.float32), r"must be \(N, C, H, W\)"),
    ("size", lambda x, m: OPS.corrupt_cuda(x[..., :64, :64].contiguous(), m, MEAN, STD, torch.float32),
     r"224 x 224 or 112 x 112"),
    ("non-square", lambda x, m: OPS.corrupt_cuda(x[..., :56].contiguous(), m, MEAN, STD, torch.float32),
     r"224 x 224 or 112 x 112"),
    ("contiguity", lambda x, m: OPS.corrupt_cuda(x.transpose(2, 3), m, MEAN, STD, torch.float32), "contiguous"),
    ("x-dtype", lambda x, m: OPS.corrupt_cuda(x.double(), m, MEAN, STD, torch.float32), "float32, float16"),
    ("out-dtype", lambda x, m: OPS.corrupt_cuda(x, m, MEAN, STD, torch.float64), "out_dtype must be"),
    ("mask-dtype", lambda x, m: OPS.corrupt_cuda(x, m.bool(), MEAN, STD, torch.float32), "mask must be float32"),
    ("mask-shape", lambda x, m: OPS.corrupt_cuda(x, m[:, :56], MEAN, STD, torch.float32), r"mask must be \(N, H, W\)"),
    ("stats", lambda x, m: OPS.corrupt_cuda(x, m, MEAN[:2], STD, torch.float32), "need 3 values"),
    ("loss-target-shape", lambda x, m: OPS.masked_freq_loss_cuda(x, x[:, :2].contiguous(), m, 1.0, "masked", 1.0,
                                                                 None, None, False), "does not match"),
    ("loss-reduction", lambda x, m: OPS.masked_freq_loss_cuda(x, x, m, 1.0, "avg", 1.0, None, None, False),
     "reduction must be"),
    ("loss-masked-needs-mask", lambda x, m: OPS.masked_freq_loss_cuda(x, x, None, 1.0, "masked", 1.0, None, None,
                                                                      False), "needs a mask"),
    ("loss-u8-pred", lambda x, m: OPS.masked_freq_loss_cuda(x.byte(), x, m, 1.0, "mean", 1.0, None, None, False),
     "pred must be float32"),
])
def test_op_checks(case, call, match):
    x = torch.rand(2, 3, 112, 112)
    m = masks("low", 2, 112)
    with pytest.raises(RuntimeError, match=match):
        call(x, m)


@needs_ext
def test_fake_tensor_shapes_and_opcheck():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(5, 3, 224, 224, dtype=torch.uint8)
        m = torch.empty(5, 224, 224)
        out = OPS.corrupt_cuda(x, m, MEAN, STD, torch.bfloat16)
        assert out.shape == x.shape and out.dtype == torch.bfloat16
        p = torch.empty(5, 3, 224, 224, dtype=torch.float16)
        loss, grad = OPS.masked_freq_loss_cuda(p, p, m, 1.0, "masked", 1.0, None, None, True)
        assert loss.shape == () and loss.dtype == torch.float32 and grad.shape == p.shape and grad.dtype == p.dtype
        _, empty = OPS.masked_freq_loss_cuda(p, p, m, 1.0, "masked", 1.0, None, None, False)
        assert empty.numel() == 0
    x = torch.rand(1, 2, 112, 112)
    m = masks("random", 1, 112)
    torch.library.opcheck(OPS.corrupt_cuda, (x, m, MEAN[:2], STD[:2], torch.float32))
    p = torch.randn(1, 2, 112, 112, requires_grad=True)
    torch.library.opcheck(OPS.masked_freq_loss_cuda, (p, x, m, 1.0, "masked", 1.0, MEAN[:2], STD[:2], True))


@needs_ext
def test_compiles_fullgraph():
    x = torch.rand(1, 3, 112, 112)
    m = masks("low", 1, 112)

    def f(p):
        loss, _ = OPS.masked_freq_loss_cuda(p, x, m, 1.0, "masked", 1.0, MEAN, STD, True)
        return loss

    p = torch.randn(1, 3, 112, 112, requires_grad=True)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    compiled(p).backward()
    p2 = p.detach().clone().requires_grad_(True)
    f(p2).backward()
    assert torch.equal(p.grad, p2.grad)



def _nvcc_cmd(source, *args):
    from torch.utils.cpp_extension import include_paths
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return [nvcc(), "-std=c++17", "-O3", *(f"-I{p}" for p in include_paths()), *args,
            os.path.join(root, "csrc", source)]


@pytest.mark.slow
@needs_ext
@pytest.mark.skipif(nvcc() is None, reason="nvcc not found (the extension was built elsewhere)")
@pytest.mark.parametrize("source", ["corrupt.cu", "masked_freq_loss.cu"])
def test_sm90_plane_kernels_keep_the_fft_in_registers_and_prefetch(source, tmp_path):
    """nvcc -Xptxas -v for sm_90: the plane kernels hold no per-thread line arrays (the first version had a
    3,840-byte stack frame per thread at 224) and spill nothing (one extra field in the args struct once
    cost 84 bytes of spills), and their PTX asks L2 for the next plane's inputs (one bulk prefetch per
    input: 2 per corruption kernel and 3 per loss kernel, at 224 and 112; the loss has a kernel with and one
    without the gradient's inverse)."""
    out = subprocess.run(_nvcc_cmd(source, "-arch=sm_90", "-Xptxas", "-v", "-keep", "-keep-dir", str(tmp_path),
                                   "-c", "-o", str(tmp_path / "k.o")),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    kernels = {name: facts for name, facts in load_tool("sass_model").parse_ptxas(out.stderr).items()
               if re.search(r"(?:corrupt|loss)_kernel", name)}
    n_kernels = 2 if source == "corrupt.cu" else 4  # 224 and 112 (the loss: with and without the gradient)
    assert len(kernels) == n_kernels, out.stderr[-2000:]
    for name, facts in kernels.items():
        assert facts["stack"] <= 256 and facts["spill_stores"] == 0, (name, facts)
    ptx = (tmp_path / source.replace(".cu", ".ptx")).read_text()
    inputs = 2 if source == "corrupt.cu" else 3
    assert ptx.count("cp.async.bulk.prefetch.L2.global") == n_kernels * inputs, "sm_90 PTX: L2 bulk prefetch"


@pytest.mark.slow
@needs_ext
@pytest.mark.skipif(nvcc() is None, reason="nvcc not found (the extension was built elsewhere)")
def test_pre_hopper_build_prefetches_by_lines(tmp_path):
    """Before sm_90 there is no bulk prefetch: the sm_80 PTX prefetches 128-byte lines instead."""
    out = subprocess.run(_nvcc_cmd("corrupt.cu", "-arch=sm_80", "-ptx", "-o", str(tmp_path / "k.ptx")),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    ptx = (tmp_path / "k.ptx").read_text()
    assert "prefetch.global.L2" in ptx and "cp.async.bulk" not in ptx


# ------------------------------------------------------------------ the kernel maths, host build (no GPU)
@needs_ext
@pytest.mark.parametrize("side", [224, 112])
@pytest.mark.parametrize("kind", ["low", "high", "band", "random"])
def test_host_corrupt_matches_reference(side, kind):
    g = torch.Generator().manual_seed(side)
    n = 2
    x = torch.rand(n, 3, side, side, generator=g)
    m = masks(kind, n, side, g)
    ref = mfm_fast.corrupt(x.double(), m, backend="reference")
    out = OPS.corrupt_cuda(x, m.float().contiguous(), MEAN, STD, torch.float32)
    assert out.dtype == torch.float32 and max_rel_err(out, ref) <= 1e-5



@needs_ext
@pytest.mark.parametrize("side", [224, 112])
def test_host_phases_have_no_shared_writes(side, host_vthreads):
    """Every FFT phase split over 2..256 virtual threads, run forwards and backwards, gives the same bits
    as one thread: no phase lets two threads touch the same element (what would race on the GPU)."""
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, side, side, generator=g)
    pred = torch.randn(2, 3, side, side, generator=g)
    m = masks("random", 2, side, g)
    host_vthreads(1)
    out1 = OPS.corrupt_cuda(x, m, MEAN, STD, torch.float32)
    loss1, grad1 = cpu_kernel_loss(pred, x, m, gamma=0.5, norm=True)
    for n in (2, 7, 256):
        for signed in (n, -n):
            host_vthreads(signed)
            assert torch.equal(OPS.corrupt_cuda(x, m, MEAN, STD, torch.float32), out1), signed
            loss, grad = cpu_kernel_loss(pred, x, m, gamma=0.5, norm=True)
            assert torch.equal(grad, grad1), signed
            assert abs(loss.item() - loss1.item()) <= 1e-6 * abs(loss1.item())  # partial sums in another order


@needs_ext
@pytest.mark.parametrize("dtype, out_dtype", [(torch.uint8, torch.float32), (torch.bfloat16, torch.bfloat16),
                                              (torch.float16, torch.float16), (torch.float32, torch.bfloat16)])
def test_host_corrupt_dtypes(dtype, out_dtype):
    side = 112
    x = torch.rand(2, 3, side, side)
    x = (x * 255).round().to(torch.uint8) if dtype == torch.uint8 else x.to(dtype)
    m = masks("band", 2, side)
    ref = mfm_fast.corrupt(x if dtype == torch.uint8 else x.double(), m, backend="reference", out_dtype=torch.float64)
    same = mfm_fast.corrupt(x, m, backend="torch", out_dtype=out_dtype)  # torch on the same dtypes
    out = OPS.corrupt_cuda(x, m, MEAN, STD, out_dtype)
    assert out.dtype == out_dtype
    err, err_torch = (out.double() - ref).abs().max(), (same.double() - ref).abs().max()
    assert err <= 2 * err_torch + 1e-5 * ref.abs().max()


@needs_ext
@pytest.mark.parametrize("side", [224, 112])
@pytest.mark.parametrize("kind", ["low", "high", "band", "random"])
def test_host_loss_matches_reference(side, kind):
    g = torch.Generator().manual_seed(side + 1)
    n = 2
    x = torch.rand(n, 3, side, side, generator=g)
    pred = torch.randn(n, 3, side, side, generator=g)
    m = masks(kind, n, side, g)
    ref, ref_grad = reference_loss_and_grad(pred, x, m, normalize_target=True)
    loss, grad = cpu_kernel_loss(pred, x, m, norm=True)
    assert loss.dtype == torch.float32 and max_rel_err(loss, ref) <= 1e-5
    assert max_rel_err(grad, ref_grad) <= 1e-5


@needs_ext
@pytest.mark.parametrize("gamma, reduction, weight", [(0.5, "masked", 1.0), (2.0, "mean", 0.5), (1.0, "sum", 2.0),
                                                      (1.5, "mean", 1.0)])
def test_host_loss_options(gamma, reduction, weight):
    side = 112
    x = torch.rand(3, 3, side, side)
    pred = torch.randn(3, 3, side, side)
    m = masks("band", 3, side) if reduction != "mean" or gamma != 1.5 else None
    ref, ref_grad = reference_loss_and_grad(pred, x, m, loss_gamma=gamma, reduction=reduction, loss_weight=weight)
    loss, grad = cpu_kernel_loss(pred, x, m, gamma, reduction, weight)
    assert max_rel_err(loss, ref) <= 1e-5 and max_rel_err(grad, ref_grad) <= 1e-5


@needs_ext
def test_host_loss_edge_facts_and_low_precision():
    side = 112
    x = torch.rand(2, 3, side, side)
    t = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    loss, _ = cpu_kernel_loss(t, x, masks("low", 2, side), norm=True, need_grad=False)
    assert abs(loss.item() - 1e-6) <= 1e-11  # pred == normalise(target): exactly the epsilon's sqrt
    u8 = (x * 255).round().to(torch.uint8)
    pred = torch.randn(2, 3, side, side).to(torch.bfloat16)
    m = masks("high", 2, side)
    ref, ref_grad = reference_loss_and_grad(pred, u8, m, normalize_target=True)
    loss, grad = cpu_kernel_loss(pred, u8, m, norm=True)
    assert grad.dtype == torch.bfloat16 and max_rel_err(loss, ref) <= 1e-5
    p = pred.detach().requires_grad_(True)
    mfm_fast.masked_freq_loss(p, u8, m, normalize_target=True, backend="torch").backward()
    err, err_torch = (grad.double() - ref_grad).abs().max(), (p.grad.double() - ref_grad).abs().max()
    assert err <= 2 * err_torch + 1e-12


def _offset_view(t):
    """t's values in a contiguous tensor whose data starts one element past a 16-byte boundary."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype)
    view = flat[1:].view(t.shape)
    view.copy_(t)
    assert view.is_contiguous() and view.data_ptr() % 16 != 0
    return view


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8])
def test_host_unaligned_buffers_take_the_scalar_path(dtype):
    """Buffers off 16-byte alignment (the kernels then read and write element by element, not 4 at a
    time) give the same bits as aligned ones."""
    side = 112
    g = torch.Generator().manual_seed(7)
    x = torch.rand(2, 3, side, side, generator=g)
    x = (x * 255).round().to(torch.uint8) if dtype == torch.uint8 else x.to(dtype)
    m = masks("band", 2, side, g)
    out_dtype = torch.float32 if dtype == torch.uint8 else dtype
    aligned = OPS.corrupt_cuda(x, m, MEAN, STD, out_dtype)
    assert torch.equal(OPS.corrupt_cuda(_offset_view(x), m, MEAN, STD, out_dtype), aligned)
    if dtype != torch.uint8:
        pred = torch.randn(2, 3, side, side, generator=g).to(dtype)
        loss, grad = cpu_kernel_loss(pred, x, m, norm=True)
        loss_u, grad_u = cpu_kernel_loss(_offset_view(pred), _offset_view(x), m, norm=True)
        assert torch.equal(grad_u, grad) and torch.equal(loss_u, loss)


@needs_ext
@pytest.mark.parametrize("gamma", [1.0, 0.5, 1.5])
def test_host_loss_large_magnitude_does_not_overflow(gamma):
    """pred x 1e19 (|D|^2 past float32's range, the loss itself about 1e19): the fp32 distance is scaled
    before squaring, so loss and gradient match the fp64 reference."""
    side = 112
    g = torch.Generator().manual_seed(11)
    x = torch.rand(2, 3, side, side, generator=g)
    pred = torch.randn(2, 3, side, side, generator=g) * 1e19
    m = masks("high", 2, side, g)
    assert torch.fft.rfft2(pred.double(), norm="ortho").abs().max() ** 2 > torch.finfo(torch.float32).max
    ref, ref_grad = reference_loss_and_grad(pred, x, m, normalize_target=True, loss_gamma=gamma)
    loss, grad = cpu_kernel_loss(pred, x, m, gamma=gamma, norm=True)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert max_rel_err(loss, ref) <= 1e-5 and max_rel_err(grad, ref_grad) <= 1e-5


@needs_ext
def test_host_loss_autograd_scales_by_grad_output():
    side = 112
    x = torch.rand(2, 3, side, side)
    m = masks("random", 2, side)
    pred = torch.randn(2, 3, side, side, requires_grad=True)
    target = x.clone().requires_grad_(True)
    loss, _ = OPS.masked_freq_loss_cuda(pred, target, m, 1.0, "masked", 1.0, MEAN, STD, True)
    (3.0 * loss).backward()
    ref, ref_grad = reference_loss_and_grad(pred, x, m, normalize_target=True)
    assert max_rel_err(pred.grad, 3.0 * ref_grad) <= 1e-5
    std = torch.tensor(STD).view(1, 3, 1, 1)
    assert max_rel_err(target.grad, -3.0 * ref_grad / std) <= 1e-5


def _same_bits(a, b):
    """a and b hold the same bits, NaNs (whatever their payload) in the same places."""
    ints = torch.int32 if a.dtype == torch.float32 else torch.int16
    nan = b.isnan()
    return torch.equal(a.isnan(), nan) and torch.equal(a.view(ints)[~nan], b.view(ints)[~nan])


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_host_scale_grad_in_place(dtype):
    """scale_grad_cuda_ (the loss backward's grad *= grad_output): the same bits as torch's
    grad * grad_output.to(dtype), in place; grad_output 1 (also one that rounds to 1 in dtype) leaves every
    bit as it was; NaN / inf scales propagate as torch's multiply does."""
    g0 = (torch.randn(2, 3, 112, 112) * 1e-3).to(dtype)
    g0[0, 0, 0, :3] = torch.tensor([float("inf"), float("nan"), -0.0])
    for s in (1.0, 1.0 + 2.0 ** -20, 3.0, 0.3, -2.5, 2.0 ** -24, 1e30, float("nan"), float("inf")):
        g = g0.clone()
        ptr = g.data_ptr()
        scale = torch.tensor(s)
        OPS.scale_grad_cuda_(g, scale)
        want = g0 * scale.to(dtype)
        assert g.data_ptr() == ptr and g.dtype == dtype
        assert _same_bits(g, want), s
    odd = torch.randn(7, dtype=dtype)  # a length with a tail (not a multiple of 4)
    want = odd * torch.tensor(0.7).to(dtype)
    OPS.scale_grad_cuda_(odd, torch.tensor(0.7))
    assert torch.equal(odd, want)
    with pytest.raises(RuntimeError, match="scale must be one float32 value"):
        OPS.scale_grad_cuda_(g0.clone(), torch.tensor([1.0, 2.0]))
    with pytest.raises(RuntimeError, match="scale must be one float32 value"):
        OPS.scale_grad_cuda_(g0.clone(), torch.tensor(1.0, dtype=torch.float64))
    torch.library.opcheck(OPS.scale_grad_cuda_, (g0.float().clone(), torch.tensor(0.5)))


@needs_ext
def test_host_loss_backward_hands_on_its_own_gradient_buffer():
    """A backward that frees the graph scales the op's saved gradient in place and hands that buffer on
    (pred.grad is it: no copy), with the same bits as grad * grad_output; one that keeps the graph
    (retain_graph=True) multiplies out of place, so later backwards read the gradient unchanged, also
    when pred.grad accumulates between them."""
    side = 112
    x = torch.rand(2, 3, side, side)
    m = masks("random", 2, side)
    pred = torch.randn(2, 3, side, side, requires_grad=True)
    _, g = OPS.masked_freq_loss_cuda(pred.detach(), x, m, 1.0, "masked", 1.0, MEAN, STD, True)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    for scale in (1.0, 2.5):
        pred.grad = None
        target = x.clone().requires_grad_(True)
        loss, _ = OPS.masked_freq_loss_cuda(pred, target, m, 1.0, "masked", 1.0, MEAN, STD, True)
        buffer = loss.grad_fn.saved_tensors[0].data_ptr()
        (scale * loss).backward()
        assert pred.grad.data_ptr() == buffer and torch.equal(pred.grad, g * torch.tensor(scale))
        assert torch.equal(target.grad, -(g * torch.tensor(scale)) / std)
    pred.grad = None
    loss, _ = OPS.masked_freq_loss_cuda(pred, x, m, 1.0, "masked", 1.0, MEAN, STD, True)
    buffer = loss.grad_fn.saved_tensors[0].data_ptr()
    (4.0 * loss).backward(retain_graph=True)
    assert pred.grad.data_ptr() != buffer and torch.equal(pred.grad, g * 4.0)
    (3.0 * loss).backward(retain_graph=True)  # accumulates into pred.grad
    loss.backward()
    assert torch.equal(pred.grad, g * 4.0 + g * 3.0 + g)


@needs_ext
def test_host_wrappers_take_any_layout():
    """cuda_backend's entry points (what backend="cuda" calls) on CPU tensors: channels_last, bool masks."""
    side = 112
    x = torch.rand(2, 3, side, side).contiguous(memory_format=torch.channels_last)
    m = masks("low", 2, side).bool()
    out = cuda_backend.corrupt(x, m, MEAN, STD, torch.float32)
    assert max_rel_err(out, mfm_fast.corrupt(x.double(), m, backend="reference")) <= 1e-5
    pred = torch.randn(2, 3, side, side).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    loss = cuda_backend.masked_freq_loss(pred, x, m, 1.0, "masked", 1.0, MEAN, STD, True)
    loss.backward()
    ref, ref_grad = reference_loss_and_grad(pred, x, m, normalize_target=True)
    assert max_rel_err(loss, ref) <= 1e-5 and max_rel_err(pred.grad, ref_grad) <= 1e-5


# ------------------------------------------------------------------ CUDA kernels (GPU only)
def gpu(f):
    """Marks a test `gpu`: skipped without a CUDA device or without the extension."""
    for mark in needs_gpu + [needs_ext]:
        f = mark(f)
    return f


def _gpu_batch(n, side, kind, dtype=torch.float32, seed=0):
    """x, pred, mask on the GPU (drawn on the CPU, so every run sees the same values)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, side, side, generator=g)
    pred = torch.randn(n, 3, side, side, generator=g).to(dtype)
    return x.cuda(), pred.cuda(), masks(kind, n, side, g).cuda()


@gpu
@pytest.mark.parametrize("side", [224, 112])
@pytest.mark.parametrize("kind", ["low", "high", "band", "random"])
@pytest.mark.parametrize("n", [1, 256])
def test_gpu_corrupt_parity(side, kind, n):
    x, _, m = _gpu_batch(n, side, kind)
    ref = mfm_fast.corrupt(x.double(), m, backend="reference")  # fp64 oracle, on the GPU
    out = mfm_fast.corrupt(x, m, backend="cuda")
    assert out.is_cuda and out.dtype == torch.float32 and max_rel_err(out, ref) <= 1e-5


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.uint8])
def test_gpu_corrupt_dtypes(dtype):
    x, _, m = _gpu_batch(8, 224, "band")
    x = (x * 255).round().to(torch.uint8) if dtype == torch.uint8 else x.to(dtype)
    out_dtype = torch.float32 if dtype == torch.uint8 else dtype
    ref = mfm_fast.corrupt(x if dtype == torch.uint8 else x.double(), m, backend="reference", out_dtype=torch.float64)
    same = mfm_fast.corrupt(x, m, backend="torch", out_dtype=out_dtype)
    out = mfm_fast.corrupt(x, m, backend="cuda", out_dtype=out_dtype)
    assert out.dtype == out_dtype
    assert (out.double() - ref).abs().max() <= 2 * (same.double() - ref).abs().max() + 1e-5 * ref.abs().max()


@gpu
@pytest.mark.parametrize("side", [224, 112])
@pytest.mark.parametrize("kind", ["low", "high", "band", "random"])
@pytest.mark.parametrize("n", [1, 256])
def test_gpu_loss_parity_fwd_bwd(side, kind, n):
    x, pred, m = _gpu_batch(n, side, kind, seed=1)
    ref, ref_grad = reference_loss_and_grad(pred, x, m, normalize_target=True)
    p = pred.clone().requires_grad_(True)
    loss = mfm_fast.masked_freq_loss(p, x, m, normalize_target=True, backend="cuda")
    loss.backward()
    assert loss.dtype == torch.float32 and max_rel_err(loss, ref) <= 1e-5
    assert max_rel_err(p.grad, ref_grad) <= 1e-5


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_loss_low_precision(dtype):
    x, pred, m = _gpu_batch(16, 224, "low", dtype=dtype, seed=2)
    ref, ref_grad = reference_loss_and_grad(pred, x, m, normalize_target=True)
    got = {}
    for backend in ("torch", "cuda"):
        p = pred.clone().requires_grad_(True)
        loss = mfm_fast.masked_freq_loss(p, x, m, normalize_target=True, backend=backend)
        loss.backward()
        got[backend] = (loss.detach(), p.grad)
    assert got["cuda"][1].dtype == dtype and max_rel_err(got["cuda"][0], ref) <= 1e-5
    err = (got["cuda"][1].double() - ref_grad).abs().max()
    assert err <= 2 * (got["torch"][1].double() - ref_grad).abs().max() + 1e-12


@gpu
@pytest.mark.parametrize("gamma, reduction", [(0.5, "masked"), (2.0, "mean"), (1.0, "sum")])
def test_gpu_loss_options_channels_last_and_strided_grad_output(gamma, reduction):
    x, pred, m = _gpu_batch(4, 112, "band", seed=3)
    ref, ref_grad = reference_loss_and_grad(pred, x, m, loss_gamma=gamma, reduction=reduction)
    p = pred.contiguous(memory_format=torch.channels_last).requires_grad_(True)  # non-contiguous NCHW input
    loss = mfm_fast.masked_freq_loss(p, x, m, loss_gamma=gamma, reduction=reduction, backend="cuda")
    go = torch.tensor([3.0, -1.0], device="cuda")[::2].view(())  # a grad_output that is a view
    loss.backward(go)
    assert max_rel_err(loss, ref) <= 1e-5 and max_rel_err(p.grad, 3.0 * ref_grad) <= 1e-5


@gpu
def test_gpu_unaligned_buffers_and_large_magnitude():
    """On the GPU: buffers off 16-byte alignment (scalar path) give the vector path's bits, and pred x 1e19
    matches the fp64 reference (the distance is scaled before squaring)."""
    x, pred, m = _gpu_batch(8, 224, "band", seed=6)

    def offset(t):
        flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
        view = flat[1:].view(t.shape)
        view.copy_(t)
        return view
    assert torch.equal(OPS.corrupt_cuda(offset(x), m, MEAN, STD, torch.float32),
                       OPS.corrupt_cuda(x, m, MEAN, STD, torch.float32))
    loss, grad = cpu_kernel_loss(pred, x, m, norm=True)
    loss_u, grad_u = cpu_kernel_loss(offset(pred), offset(x), m, norm=True)
    assert torch.equal(grad_u, grad) and torch.equal(loss_u, loss)
    big = pred * 1e19
    ref, ref_grad = reference_loss_and_grad(big, x, m, normalize_target=True)
    loss, grad = cpu_kernel_loss(big, x, m, norm=True)
    assert max_rel_err(loss, ref) <= 1e-5 and max_rel_err(grad, ref_grad) <= 1e-5


@gpu
def test_gpu_determinism_and_current_stream():
    x, pred, m = _gpu_batch(64, 224, "random", seed=4)
    runs = []
    for _ in range(2):
        p = pred.clone().requires_grad_(True)
        loss = mfm_fast.masked_freq_loss(p, x, m, normalize_target=True, backend="cuda")
        loss.backward()
        runs.append((loss.detach(), p.grad, mfm_fast.corrupt(x, m, backend="cuda")))
    for a, b in zip(*runs):
        assert torch.equal(a, b)  # bit-identical reruns
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        out = mfm_fast.corrupt(x, m, backend="cuda")
    s.synchronize()
    assert torch.equal(out, runs[0][2])


@gpu
def test_gpu_l2_prefetch_is_only_a_hint(monkeypatch):
    """MFM_FAST_CUDA_PREFETCH=0 (no L2 prefetch of the next plane) gives the same bits; 600 planes is more
    than one wave of resident CTAs, so the prefetching run does prefetch."""
    x, pred, m = _gpu_batch(200, 224, "random", seed=5)
    runs = []
    for flag in ("1", "0"):
        monkeypatch.setenv("MFM_FAST_CUDA_PREFETCH", flag)
        p = pred.clone().requires_grad_(True)
        loss = mfm_fast.masked_freq_loss(p, x, m, backend="cuda")
        loss.backward()
        runs.append((loss.detach(), p.grad, mfm_fast.corrupt(x, m, backend="cuda")))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_scale_grad_matches_torch_and_backward_hands_on_the_buffer(dtype):
    g0 = torch.randn(3, 3, 224, 224, device="cuda").to(dtype)
    for s in (1.0, 0.3, 65536.0, float("nan")):
        g = g0.clone()
        OPS.scale_grad_cuda_(g, torch.tensor(s, device="cuda"))
        assert _same_bits(g, g0 * torch.tensor(s, device="cuda").to(dtype)), s
    odd = g0.flatten()[1:8]  # an unaligned view of 7 elements: the scalar path and the tail
    want = odd * torch.tensor(0.7, device="cuda").to(dtype)
    OPS.scale_grad_cuda_(odd, torch.tensor(0.7, device="cuda"))
    assert torch.equal(odd, want)
    x, pred, m = _gpu_batch(2, 224, "low", seed=6)
    p = pred.to(dtype).requires_grad_(True)
    loss, g = OPS.masked_freq_loss_cuda(p.detach(), x, m.float(), 1.0, "masked", 1.0, None, None, True)
    loss, _ = OPS.masked_freq_loss_cuda(p, x, m.float(), 1.0, "masked", 1.0, None, None, True)
    buffer = loss.grad_fn.saved_tensors[0].data_ptr()
    loss.backward()
    assert p.grad.data_ptr() == buffer and torch.equal(p.grad, g)


@gpu
def test_gpu_compile_fullgraph():
    x, pred, m = _gpu_batch(2, 224, "low", seed=5)
    f = lambda p: mfm_fast.masked_freq_loss(p, x, m, normalize_target=True, backend="cuda")  # noqa: E731
    p1, p2 = pred.clone().requires_grad_(True), pred.clone().requires_grad_(True)
    torch.compile(f, fullgraph=True)(p1).backward()
    f(p2).backward()
    assert torch.equal(p1.grad, p2.grad)


@gpu
def test_gpu_auto_does_not_pick_cuda_and_sizes_raise():
    assert dispatch.choose_backend("auto", "corrupt", torch.device("cuda")) != "cuda"
    assert dispatch.choose_backend("auto", "masked_freq_loss", torch.device("cuda")) != "cuda"
    x = torch.rand(1, 3, 64, 64, device="cuda")
    with pytest.raises(RuntimeError, match="224 x 224 / 112 x 112"):
        mfm_fast.corrupt(x, masks("low", 1, 64).cuda(), backend="cuda")
