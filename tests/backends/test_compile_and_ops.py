"""torch.library registration: opcheck on the custom ops and torch.compile(fullgraph=True) on CPU."""

import pytest
import torch

import mfm_fast
from mfm_fast import backends
from helpers import masks_for, max_rel_err

OPS = torch.ops.mfm_fast


def _inputs(shape=(2, 3, 8, 8), requires_grad=True):
    pred = torch.randn(shape, requires_grad=requires_grad)
    target = torch.rand(shape)
    return pred, target, masks_for(shape, r1=2)


@pytest.mark.parametrize("need_grad,reduction", [(True, "masked"), (False, "mean"), (True, "sum")])
def test_opcheck_loss(need_grad, reduction):
    pred, target, m = _inputs(requires_grad=need_grad)
    args = (pred, target, m, 1.0, reduction, False, 1.0, False, False, False, 1, 1.0, None, None, need_grad)
    torch.library.opcheck(OPS.masked_freq_loss_torch.default, args)


def test_opcheck_loss_options():
    pred, target, m = _inputs()
    args = (pred, target, m, 2.0, "masked", True, 1.0, True, False, False, 2, 0.5,
            [0.485, 0.456, 0.406], [0.229, 0.224, 0.225], True)
    torch.library.opcheck(OPS.masked_freq_loss_torch.default, args)


@pytest.mark.parametrize("ave_spectrum,with_mask", [(False, True), (True, False)])
def test_opcheck_loss_map(ave_spectrum, with_mask):
    pred, target, m = _inputs()
    args = (pred, target, m if with_mask else None, 1.0, False, 1.0, False, False, ave_spectrum, 1, 1.0, None, None)
    torch.library.opcheck(OPS.masked_freq_loss_map_torch.default, args)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_opcheck_corrupt(out_dtype):
    x = torch.rand(2, 3, 8, 8)
    torch.library.opcheck(OPS.corrupt_torch.default, (x, masks_for(x.shape, r1=2), [0.5] * 3, [0.25] * 3, out_dtype))


@pytest.mark.slow
def test_compile_fullgraph_corrupt_plus_loss_matches_eager():
    torch._dynamo.reset()
    # a registry that changed before (a backend registered and removed, as tests do) must not break the trace
    with backends.registered(backends.Backend(name="toy_compile", module="toy", ops={"corrupt"}, where="a toy")):
        pass
    crit = mfm_fast.MaskedFreqLoss(normalize_target=True)

    def step(x, mask, pred):
        inp = mfm_fast.corrupt(x, mask)
        return crit(pred + 0.0 * inp, x, mask)

    x = torch.rand(2, 3, 16, 16)
    m = masks_for(x.shape, r1=3)
    pred_eager = torch.randn(2, 3, 16, 16, requires_grad=True)
    pred_comp = pred_eager.detach().clone().requires_grad_(True)
    eager = step(x, m, pred_eager)
    eager.backward()
    compiled = torch.compile(step, fullgraph=True)(x, m, pred_comp)
    compiled.backward()
    assert max_rel_err(compiled, eager) <= 1e-6
    assert max_rel_err(pred_comp.grad, pred_eager.grad) <= 1e-5


@pytest.mark.slow
def test_compile_fullgraph_none_reduction():
    torch._dynamo.reset()
    f = lambda p, t, m: mfm_fast.masked_freq_loss(p, t, m, reduction="none").square().sum()
    p0, t, m = _inputs()
    p1 = p0.detach().clone().requires_grad_(True)
    f(p0, t, m).backward()
    torch.compile(f, fullgraph=True)(p1, t, m).backward()
    assert max_rel_err(p1.grad, p0.grad) <= 1e-5


def test_opcheck_loss_map_backward():
    pred, target, m = _inputs()
    grad_map = torch.randn(pred.shape)
    args = (grad_map, pred.detach(), target, m, 0.5, True, 1.0, False, False, False, 2, 1.0, None, None)
    torch.library.opcheck(OPS.masked_freq_loss_map_backward_torch.default, args)
