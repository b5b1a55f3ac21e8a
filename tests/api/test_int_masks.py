"""Integer and bool masks mean "nonzero = kept" on every backend.

A uint8 0 / 255 mask (the usual image convention), an int64 0 / 1 mask (the released data loader's) and
other integer masks give bit-identical results to the bool mask with the same zeros, for the corruption and
for the loss and its gradient, on the reference, torch, Triton (interpreter) and the CUDA extension's host
build. Float masks keep their meaning: a weight in [0, 1].
"""

import pytest
import torch

import mfm_fast
from mfm_fast.backends import cuda as cuda_backend
from mfm_fast import dispatch
from helpers import max_rel_err

SIDE = 32
CUDA_SIDE = 112  # a plane size the CUDA extension is compiled for (its host build runs it on the CPU)
BACKENDS = ("reference", "torch", "triton", "cuda")


def _bool_masks(n=2, side=SIDE):
    return mfm_fast.make_masks(n, side, side, r1=side // 8, low=torch.tensor([True, False])[:n]) > 0


def _integer_forms(keep, every=True):
    """Integer masks with the same zeros as the bool mask `keep` (`every`: more than the two usual ones)."""
    forms = {"uint8 0/255": keep.to(torch.uint8) * 255, "int64 0/1": keep.to(torch.int64)}
    if every:
        signed = torch.where(keep, torch.tensor(-1, dtype=torch.int8), torch.tensor(0, dtype=torch.int8))
        forms.update({"int64 0/2": keep.to(torch.int64) * 2, "int8 0/-1": signed, "int32 0/7": keep.to(torch.int32) * 7})
    return forms


@pytest.fixture
def host_cuda(monkeypatch):
    """Let backend='cuda' take CPU tensors, so the public API runs the extension's host build of its kernels."""
    reason = cuda_backend.unavailable_reason()
    if reason is not None and "CUDA tensors only" not in reason:
        pytest.skip(f"CUDA extension not loaded: {reason}")
    real = dispatch.backend_unavailable_reason

    def allow_host(name, device_type=None, op=None, size=None, build=True):
        if name == "cuda" and device_type == "cpu":
            return cuda_backend.size_reason(size[1], size[2], size[0]) if size else None
        return real(name, device_type, op, size, build=build)

    monkeypatch.setattr(dispatch, "backend_unavailable_reason", allow_host)


def _run_corrupt(backend, x, mask):
    return mfm_fast.corrupt(x, mask, backend=backend)


def _run_loss(backend, pred, target, mask):
    p = pred.clone().requires_grad_(True)
    loss = mfm_fast.masked_freq_loss(p, target, mask, normalize_target=True, backend=backend)
    loss.backward()
    return loss.detach(), p.grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_integer_masks_give_the_bool_result_bit_for_bit(backend, request):
    if backend == "cuda":
        request.getfixturevalue("host_cuda")
    torch.manual_seed(0)
    side = CUDA_SIDE if backend == "cuda" else SIDE
    keep = _bool_masks(side=side)
    dtype = torch.float64 if backend == "reference" else torch.float32
    x = torch.rand(2, 3, side, side, dtype=dtype)
    pred = torch.randn(2, 3, side, side, dtype=dtype)
    want_inp = _run_corrupt(backend, x, keep)
    want_loss, want_grad = _run_loss(backend, pred, x, keep)
    # the bool result is the float 0 / 1 mask's result (checked against fp64, so the bool path is not garbage)
    ref = mfm_fast.corrupt(x.double(), keep.double(), backend="reference")
    assert max_rel_err(want_inp, ref) <= 1e-5
    for name, mask in _integer_forms(keep, every=backend in ("reference", "torch")).items():
        got_inp = _run_corrupt(backend, x, mask)
        got_loss, got_grad = _run_loss(backend, pred, x, mask)
        assert torch.equal(got_inp, want_inp), (backend, name)
        assert torch.equal(got_loss, want_loss) and torch.equal(got_grad, want_grad), (backend, name)
        assert torch.isfinite(got_loss) and 0 < float(got_loss) < 1e3, (backend, name, float(got_loss))


def test_uint8_255_mask_is_a_keep_mask_not_a_weight_of_255():
    """The loss weight of a kept frequency is 0 whatever the integer says: 255 does not make it -254."""
    torch.manual_seed(1)
    keep = _bool_masks()
    x = torch.rand(2, 3, SIDE, SIDE)
    pred = torch.randn(2, 3, SIDE, SIDE)
    loss_255 = mfm_fast.masked_freq_loss(pred, x, keep.to(torch.uint8) * 255, backend="torch")
    loss_float = mfm_fast.masked_freq_loss(pred, x, keep.float(), backend="torch")
    assert torch.equal(loss_255, loss_float)


def test_integer_masks_are_accepted_with_value_checks_on():
    """Value checks hold float masks to [0, 1]; integer masks are nonzero = kept, so 255 is fine there."""
    keep = _bool_masks()
    x = torch.rand(2, 3, SIDE, SIDE)
    mfm_fast.set_value_checks(True)
    try:
        out = mfm_fast.corrupt(x, keep.to(torch.uint8) * 255, backend="torch")
        assert torch.equal(out, mfm_fast.corrupt(x, keep, backend="torch"))
        with pytest.raises(ValueError, match=r"^mask: values must lie in \[0, 1\]"):
            mfm_fast.corrupt(x, keep.float() * 255, backend="torch")
    finally:
        mfm_fast.set_value_checks(False)


def test_float_masks_keep_their_meaning():
    """A float mask is a weight: 0.5 everywhere is not the all-kept mask."""
    x = torch.rand(1, 3, 32, 32)
    half = mfm_fast.corrupt(x, torch.full((1, 32, 32), 0.5), backend="reference")
    ones = mfm_fast.corrupt(x, torch.ones(1, 32, 32), backend="reference")
    assert not torch.equal(half, ones)
