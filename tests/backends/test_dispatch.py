"""The backend registry (mfm_fast.backends) and its one decision (mfm_fast.dispatch): declarations, the
protocol, a backend registered from a test, explicit requests, fallbacks, the input-dependent auto policy."""

import inspect
import logging
import subprocess
import sys
import types

import pytest
import torch

import mfm_fast
from mfm_fast import backends, dispatch
from mfm_fast._options import CorruptOptions, LossOptions, op_kwargs, schema_names

STATS = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
_OP_ARGS = [("op", inspect.Parameter.empty), ("inputs", inspect.Parameter.empty), ("options", inspect.Parameter.empty)]
SIGNATURES = {  # the backend protocol: one signature per function (auto_reason optional)
    "unavailable_reason": [("device_type", None), ("size", None), ("build", True)],
    "unsupported_reason": _OP_ARGS, "run": _OP_ARGS, "auto_reason": _OP_ARGS,
}


def _parameters(function):
    return [(p.name, p.default) for p in inspect.signature(function).parameters.values()]


def test_the_registry_lists_the_four_backends():
    assert backends.names() == ("reference", "torch", "triton", "cuda") == mfm_fast.BACKENDS
    assert backends.fallback() == "torch"
    assert backends.auto_order("cuda") == ("cuda", "triton", "torch") and backends.auto_order("cpu") == ("torch",)
    assert {name: backends.get(name).ops for name in backends.names()} == {
        "reference": set(backends.OPS), "torch": set(backends.OPS), "triton": {"corrupt", "masked_freq_loss"},
        "cuda": {"corrupt", "masked_freq_loss"}}
    assert {(name, op) for name in backends.names() for op in backends.get(name).auto_skips} == {
        ("triton", "masked_freq_loss"), ("cuda", "corrupt"), ("cuda", "masked_freq_loss")}
    assert backends.OPS == ("corrupt", "masked_freq_loss", "adaptive_masks")


def test_every_backend_module_follows_the_protocol_with_one_signature():
    for name in backends.names():
        try:
            module = dispatch.backend_module(name)
        except ImportError:  # an install without it: nothing to inspect
            continue
        for attr, parameters in SIGNATURES.items():
            if attr == "auto_reason" and not hasattr(module, attr):
                continue  # optional
            assert _parameters(getattr(module, attr)) == parameters, (name, attr)


def test_importing_the_package_imports_no_triton_and_no_extension_but_the_fallback_backend():
    code = ("import sys, mfm_fast; print(sorted(m for m in ('triton', 'mfm_fast._C', 'mfm_fast.kernels.corrupt', "
            "'mfm_fast.kernels.masked_freq_loss', 'mfm_fast.backends.cuda', 'mfm_fast.backends.torch_backend') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['mfm_fast.backends.torch_backend']"  # its torch.library ops exist before any trace


# ---- a backend registered from a test ----------------------------------------------------------------------

def _toy_module(calls: list) -> types.ModuleType:
    """A backend module that runs `corrupt` by returning a marker and recording the call."""
    toy = types.ModuleType("toy_backend_for_tests")

    def unavailable_reason(device_type=None, size=None, build=True):
        return None

    def unsupported_reason(op, inputs, options):
        return "float64 images go to the fallback" if inputs[0].dtype == torch.float64 else None

    def run(op, inputs, options):
        calls.append((op, tuple(inputs[0].shape), options.mask_band))
        return torch.full_like(inputs[0], 7.0)

    toy.unavailable_reason, toy.unsupported_reason, toy.run = unavailable_reason, unsupported_reason, run
    return toy


@pytest.fixture
def toy(monkeypatch):
    """Backend "toy" (ops {"corrupt"}, first in auto's order on CPU and CUDA tensors), registered for the test
    only; its calls are recorded in the yielded list."""
    calls = []
    monkeypatch.setitem(sys.modules, "toy_backend_for_tests", _toy_module(calls))
    dispatch._logged.clear()
    declaration = backends.Backend(name="toy", module="toy_backend_for_tests", ops=frozenset({"corrupt"}),
                                   where="the toy backend (tests)", auto_rank=-1, cpu_auto=True)
    with backends.registered(declaration):
        yield calls
    assert "toy" not in backends.names()


def test_a_backend_registered_from_a_test_runs_by_name_and_first_for_auto(toy, caplog):
    x, mask = torch.rand(2, 3, 8, 8), torch.ones(2, 8, 8)
    assert "toy" in mfm_fast.BACKENDS and mfm_fast.available_backends("cpu", "corrupt")["toy"] is None
    from mfm_fast import info

    assert any(line.split()[:2] == ["toy", "available"] for line in info.backend_table())  # the corrupt row
    assert torch.equal(mfm_fast.corrupt(x, mask, backend="toy"), torch.full_like(x, 7.0))
    assert toy == [("corrupt", (2, 3, 8, 8), 0)]
    with caplog.at_level(logging.INFO, logger="mfm_fast"):
        assert torch.equal(mfm_fast.corrupt(x, mask), torch.full_like(x, 7.0))  # auto: rank -1 comes first
        assert dispatch.LAST_CHOICE["corrupt"] == "toy" and len(toy) == 2
        assert dispatch.choose_backend("auto", "corrupt", torch.device("cpu")) == "toy"
        # an op it does not declare: auto skips it and takes the next one; by name it is not implemented
        assert dispatch.choose_backend("auto", "masked_freq_loss", torch.device("cpu")) == "torch"
        # inputs it does not support: the fallback runs them, logged once
        ref = mfm_fast.corrupt(x.double(), mask, backend="torch")
        assert torch.equal(mfm_fast.corrupt(x.double(), mask, backend="toy"), ref) and len(toy) == 2
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "backend='auto' chose 'toy' for corrupt on cpu tensors" in text
    assert "skipped toy: masked_freq_loss is not implemented in the toy backend (tests)" in text
    assert "backend 'toy' runs corrupt on the 'torch' backend: float64 images go to the fallback" in text
    with pytest.raises(NotImplementedError, match="^backend='toy' for masked_freq_loss on cpu: masked_freq_loss is "
                                                  "not implemented in the toy backend"):
        mfm_fast.masked_freq_loss(x, x, mask, backend="toy")


def test_auto_on_cuda_tries_a_registered_backend_where_its_rank_says(toy, monkeypatch):
    monkeypatch.setattr(dispatch, "backend_unavailable_reason", lambda name, device_type=None, op=None, size=None: None)
    assert backends.auto_order("cuda") == ("toy", "cuda", "triton", "torch")
    assert dispatch.choose_backend("auto", "corrupt", torch.device("cuda")) == "toy"
    monkeypatch.setenv("MFM_FAST_BACKEND", "toy")
    assert dispatch.choose_backend("auto", "corrupt", torch.device("cpu")) == "toy"


def test_a_registered_backend_is_removed_even_when_the_block_raises():
    declaration = backends.Backend(name="toy", module="toy_backend_for_tests", ops=frozenset({"corrupt"}),
                                   where="the toy backend (tests)")
    with pytest.raises(RuntimeError, match="inside"):
        with backends.registered(declaration):
            assert "toy" in backends.names()
            raise RuntimeError("inside")
    assert "toy" not in backends.names()
    with pytest.raises(ValueError, match="backend: expected one of .*got 'toy'"):
        dispatch.check_backend_name("toy")


def _declaration(**changes):
    fields = dict(name="toy", module="toy_backend_for_tests", ops=frozenset({"corrupt"}), where="the toy backend")
    return backends.Backend(**{**fields, **changes})


@pytest.mark.parametrize("changes, message", [
    (dict(name="torch"), r"^Backend 'torch': name: already registered"),
    (dict(name="auto"), r"^Backend 'auto': name: expected an identifier other than 'auto'"),
    (dict(ops=frozenset({"corrupt", "fft_everything"})),
     r"^Backend 'toy': ops: 'fft_everything' is not an op of the library"),
    (dict(ops="corrupt"), r"^Backend 'toy': ops: expected a set of op names"),
    (dict(fallback=True, ops=frozenset(backends.OPS)), r"^Backend 'toy': fallback: 'torch' is the fallback already"),
    (dict(fallback=True), r"^Backend 'toy': fallback: the fallback takes every op's unsupported inputs"),
    (dict(auto_rank=1), r"^Backend 'toy': auto_rank: 1 is 'triton''s already"),
    (dict(auto_rank="first"), r"^Backend 'toy': auto_rank: expected an int or None"),
    (dict(cpu_auto="yes"), r"^Backend 'toy': cpu_auto: expected True or False"),
    (dict(module="not a module"), r"^Backend 'toy': module: expected a dotted module path"),
    (dict(where=""), r"^Backend 'toy': where: expected a non-empty description"),
    (dict(auto_skips={"masked_freq_loss": "slow"}),
     r"^Backend 'toy': auto_skips: 'masked_freq_loss' is not one of its ops"),
    (dict(auto_skips={"corrupt": ""}), r"^Backend 'toy': auto_skips: 'corrupt': expected the measured reason"),
])
def test_a_malformed_or_conflicting_declaration_raises_naming_the_field(changes, message):
    before = backends.names()
    with pytest.raises(ValueError, match=message):
        backends.register(_declaration(**changes))
    assert backends.names() == before


def test_a_module_without_the_protocol_is_refused_on_first_use(monkeypatch):
    monkeypatch.setitem(sys.modules, "toy_backend_for_tests", types.ModuleType("toy_backend_for_tests"))
    with backends.registered(_declaration()):
        with pytest.raises(TypeError, match="toy_backend_for_tests lacks unavailable_reason, unsupported_reason, run"):
            backends.module("toy")
    with pytest.raises(KeyError, match="no backend 'toy' is registered"):
        backends.module("toy")


def test_a_backend_module_that_cannot_be_imported_is_a_reason_not_an_error():
    with backends.registered(_declaration(module="mfm_fast.no_such_backend_module")):
        reason = mfm_fast.available_backends("cpu", "corrupt")["toy"]
        assert reason.startswith("the toy backend cannot be imported (mfm_fast.no_such_backend_module: "), reason
        x = torch.rand(1, 3, 8, 8)
        with pytest.raises(RuntimeError, match="^backend='toy' for corrupt on cpu: the toy backend cannot be imported"):
            mfm_fast.corrupt(x, torch.ones(1, 8, 8), backend="toy")


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
