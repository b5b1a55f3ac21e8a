"""The backend registry and its one decision (mfm_fast.dispatch): declarations, explicit requests, fallbacks,
the input-dependent auto policy."""

import logging

import pytest
import torch

import mfm_fast
from mfm_fast import dispatch
from mfm_fast._options import CorruptOptions, LossOptions, op_kwargs, schema_names

STATS = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def test_every_backend_module_declares_what_dispatch_lists():
    for name in mfm_fast.BACKENDS:
        if dispatch.backend_unavailable_reason(name) is not None:
            continue  # triton / the extension not importable here: nothing to compare
        module = dispatch.backend_module(name)
        assert set(module.OPS) == dispatch.IMPLEMENTED[name], name
        for attr in ("unavailable_reason", "unsupported_reason", "run"):
            assert callable(getattr(module, attr)), (name, attr)


def test_options_fill_a_flat_schema_by_name():
    names = schema_names("mfm_fast::masked_freq_loss_torch")
    assert names[:3] == ("pred", "target", "mask") and names[-1] == "need_grad"
    kw = op_kwargs(LossOptions(loss_gamma=0.5, target_mean=(0.1, 0.2), target_std=(1.0, 2.0)), names[3:],
                   need_grad=True)
    assert kw["loss_gamma"] == 0.5 and kw["target_mean"] == [0.1, 0.2] and kw["need_grad"] is True
    assert list(kw) == list(names[3:])
    with pytest.raises(AttributeError):
        op_kwargs(LossOptions(), ("no_such_option",))


def _every_backend_available(monkeypatch):
    monkeypatch.setattr(dispatch, "backend_unavailable_reason", lambda name, device_type=None, op=None, size=None: None)
    dispatch._logged.clear()


@pytest.mark.skipif(mfm_fast.available_backends("cpu", "corrupt")["triton"] is not None, reason="needs triton")
def test_auto_on_cuda_picks_the_triton_corruption_only_for_a_band_it_takes(monkeypatch, caplog):
    _every_backend_available(monkeypatch)
    x, mask = torch.rand(2, 3, 32, 32), torch.ones(2, 32, 32)
    cuda = torch.device("cuda")
    with caplog.at_level(logging.INFO, logger="mfm_fast"):
        band = CorruptOptions(**STATS, out_dtype=torch.float32, mask_band=4)
        assert dispatch.choose_backend("auto", "corrupt", cuda, (x, mask), band) == "triton"
        none = CorruptOptions(**STATS, out_dtype=torch.float32)
        assert dispatch.choose_backend("auto", "corrupt", cuda, (x, mask), none) == "torch"
        too_wide = CorruptOptions(**STATS, out_dtype=torch.float32, mask_band=17)  # 2R > the 32 side
        assert dispatch.choose_backend("auto", "corrupt", cuda, (x, mask), too_wide) == "torch"
        assert dispatch.choose_backend("triton", "corrupt", cuda, (x, mask), none) == "triton"  # asked for: runs
        assert dispatch.choose_backend("triton", "corrupt", cuda, (x.double(), mask), band) == "torch"
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "chose 'torch' for corrupt on cuda tensors; skipped cuda: auto skips it" in text
    assert "triton: masks without a mask_band promise take the general DFT-as-GEMM path" in text
    assert "backend 'triton' runs corrupt on the 'torch' backend: float64 images" in text


@pytest.mark.skipif(mfm_fast.available_backends("cpu", "corrupt")["triton"] is not None, reason="needs triton")
def test_an_explicit_triton_loss_hands_unfused_options_to_torch_and_auto_skips_it(monkeypatch, caplog):
    _every_backend_available(monkeypatch)
    pred, target, mask = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16), torch.ones(2, 16, 16)
    cuda = torch.device("cuda")
    with caplog.at_level(logging.INFO, logger="mfm_fast"):
        assert dispatch.choose_backend("triton", "masked_freq_loss", cuda, (pred, target, mask), LossOptions()) == "triton"
        unfused = LossOptions(reduction="none")
        assert dispatch.choose_backend("triton", "masked_freq_loss", cuda, (pred, target, mask), unfused) == "torch"
        assert dispatch.choose_backend("auto", "masked_freq_loss", cuda, (pred, target, mask), LossOptions()) == "torch"
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "backend 'triton' runs masked_freq_loss on the 'torch' backend: reduction='none'" in text
    assert "triton: auto skips it: measured slower than the torch backend" in text


def test_an_explicit_backend_that_cannot_run_raises_before_any_input_check(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, mask = torch.rand(1, 3, 8, 8), torch.ones(1, 8, 8)
    options = CorruptOptions(**STATS, out_dtype=torch.float32)
    with pytest.raises(RuntimeError, match="^backend='triton' for corrupt on cpu: Triton kernels run on CUDA"):
        dispatch.run("corrupt", "triton", (x, mask), options)
    with pytest.raises(NotImplementedError, match="adaptive_masks is not implemented in the Triton backend"):
        mfm_fast.make_adaptive_masks(x, backend="triton")


def test_run_gives_the_chosen_backends_result():
    x, mask = torch.rand(2, 3, 16, 16), mfm_fast.make_masks(2, 16, 16, r1=3)
    options = CorruptOptions(**STATS, out_dtype=torch.float64)
    ref = dispatch.run("corrupt", "reference", (x.double(), mask), options)
    fast = dispatch.run("corrupt", "torch", (x.double(), mask), options)
    assert ref.dtype == fast.dtype == torch.float64 and torch.allclose(ref, fast, atol=1e-12)


@pytest.mark.skipif(mfm_fast.available_backends(None, "corrupt")["cuda"] is not None, reason="needs the extension")
def test_an_explicit_cuda_backend_raises_for_a_size_it_is_not_compiled_for(monkeypatch):
    from mfm_fast.backends import cuda as cuda_backend

    monkeypatch.setattr(cuda_backend.torch.cuda, "is_available", lambda: True)  # sizes are checked after the device
    x, mask = torch.rand(1, 3, 64, 64), torch.ones(1, 64, 64)
    options = CorruptOptions(**STATS, out_dtype=torch.float32)
    with pytest.raises(RuntimeError, match="^backend='cuda' for corrupt on cuda: 64 x 64 planes: .*224 x 224 / 112"):
        dispatch.choose_backend("cuda", "corrupt", torch.device("cuda"), (x, mask), options)
    assert dispatch.choose_backend("cuda", "corrupt", torch.device("cuda"), (torch.rand(1, 3, 112, 112),
                                   torch.ones(1, 112, 112)), options) == "cuda"
    f64 = CorruptOptions(**STATS, out_dtype=torch.float64)
    assert dispatch.choose_backend("cuda", "corrupt", torch.device("cuda"), (torch.rand(1, 3, 112, 112),
                                   torch.ones(1, 112, 112)), f64) == "torch"
