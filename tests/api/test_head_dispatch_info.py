"""MFMHead, backend dispatch and `python -m mfm_fast.info`."""

import logging
import subprocess
import sys

import pytest
import torch

import mfm_fast
from mfm_fast import dispatch
from helpers import masks_for


def test_head_shapes_cnn_and_tokens():
    head = mfm_fast.MFMHead(16, stride=4)
    assert head(torch.randn(2, 16, 3, 5)).shape == (2, 3, 12, 20)
    tokens = torch.randn(2, 1 + 9, 16)  # CLS + 3 x 3 patches
    out = head(tokens)
    assert out.shape == (2, 3, 12, 12)
    # prefix tokens are dropped: changing the CLS token does not change the output
    tokens2 = tokens.clone()
    tokens2[:, 0] += 100
    assert torch.equal(head(tokens2), out)
    # tokens_to_map keeps the row-major patch order
    fmap = mfm_fast.tokens_to_map(tokens)
    assert torch.equal(fmap[:, :, 1, 2], tokens[:, 1 + 1 * 3 + 2])


def test_head_for_timm_vit_and_resnet():
    timm = pytest.importorskip("timm")
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=64)
    head = mfm_fast.MFMHead.for_timm_model(vit)
    assert head.stride == 16 and head.in_features == vit.num_features
    x = torch.rand(2, 3, 64, 64)
    assert mfm_fast.predict_image(vit, head, x).shape == (2, 3, 64, 64)
    resnet = timm.create_model("resnet18", pretrained=False, num_classes=0)
    head = mfm_fast.MFMHead.for_timm_model(resnet)
    assert head.stride == 32
    assert mfm_fast.predict_image(resnet, head, x).shape == (2, 3, 64, 64)


def test_available_backends_reports_reasons():
    status = mfm_fast.available_backends("cpu")
    assert set(status) == set(mfm_fast.BACKENDS)
    assert status["reference"] is None and status["torch"] is None
    assert "the CUDA extension" in status["cuda"]  # CPU tensors (or not built)
    # triton runs corrupt on CPU tensors only under the interpreter (conftest sets it without a GPU)
    if not torch.cuda.is_available():
        assert mfm_fast.available_backends("cpu", "corrupt")["triton"] is None


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reason = mfm_fast.available_backends("cpu", "corrupt")["triton"]
    assert reason is not None and "TRITON_INTERPRET=1" in reason
    x = torch.rand(1, 3, 8, 8)
    with pytest.raises(RuntimeError, match="^backend='triton' for corrupt on cpu: Triton kernels run on CUDA"):
        mfm_fast.corrupt(x, masks_for(x.shape, r1=2), backend="triton")


def test_auto_picks_torch_on_cpu_and_logs_once(caplog):
    dispatch._logged.clear()
    with caplog.at_level(logging.INFO, logger="mfm_fast"):
        assert dispatch.choose_backend("auto", "corrupt", torch.device("cpu")) == "torch"
        assert dispatch.choose_backend("auto", "corrupt", torch.device("cpu")) == "torch"
    msgs = [r.getMessage() for r in caplog.records if "chose" in r.getMessage()]
    assert len(msgs) == 1 and "'torch'" in msgs[0] and "corrupt" in msgs[0]


def test_env_var_overrides_auto_but_not_an_explicit_choice(monkeypatch):
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64)
    m = masks_for(x.shape, r1=2)
    monkeypatch.setenv("MFM_FAST_BACKEND", "reference")
    assert dispatch.choose_backend("auto", "corrupt", x.device) == "reference"
    assert dispatch.choose_backend("torch", "corrupt", x.device) == "torch"
    monkeypatch.setenv("MFM_FAST_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="backend='cuda' for corrupt on cpu: the CUDA extension"):
        mfm_fast.corrupt(x, m)


def test_info_module_runs():
    out = subprocess.run([sys.executable, "-m", "mfm_fast.info"], capture_output=True, text=True, check=True).stdout
    assert "mfm_fast" in out and "torch" in out
    for name in mfm_fast.BACKENDS:
        assert name in out
    assert "  corrupt            reference  available" in out
    assert "triton corrupt, masked_freq_loss;" in out  # adaptive_masks: reference and torch only
    notes = [line for line in out.splitlines() if line.startswith("  [")]
    assert notes and len({n.split("] ", 1)[1] for n in notes}) == len(notes)  # each reason printed once
    if not torch.cuda.is_available():  # no row claims a backend runs on CUDA tensors without a GPU
        rows = [line for line in out.splitlines() if "  reference  " in line or "  torch  " in line]
        assert rows and all(line.rstrip().endswith("no GPU visible") for line in rows), rows


def test_info_require_cuda_ext_ends_with_a_loaded_or_not_loaded_line():
    proc = subprocess.run([sys.executable, "-m", "mfm_fast.info", "--require-cuda-ext"], capture_output=True, text=True)
    last = proc.stdout.strip().splitlines()[-1]
    if proc.returncode == 0:
        assert last.startswith("CUDA extension: loaded, built "), last
    else:
        assert proc.returncode == 1 and last.startswith("CUDA extension: NOT loaded: "), (proc.returncode, last)


def test_import_needs_no_gpu_and_exports_public_api():
    for name in ("MaskedFreqLoss", "masked_freq_loss", "corrupt", "FrequencyCorruption", "make_masks", "MFMHead",
                 "make_adaptive_masks", "available_backends", "set_value_checks"):
        assert hasattr(mfm_fast, name)


def test_auto_policy_on_cuda_skips_unvalidated_and_slower_backends(monkeypatch, caplog):
    """With every backend runnable, auto on CUDA picks triton for corrupt (cuda is not validated on a GPU)
    and torch for the loss (the Triton loss measured slower), and says why."""
    monkeypatch.setattr(dispatch, "backend_unavailable_reason", lambda name, device_type=None, op=None, size=None: None)
    dispatch._logged.clear()
    with caplog.at_level(logging.INFO, logger="mfm_fast"):
        assert dispatch.choose_backend("auto", "corrupt", torch.device("cuda")) == "triton"
        assert dispatch.choose_backend("auto", "masked_freq_loss", torch.device("cuda")) == "torch"
        assert dispatch.choose_backend("triton", "masked_freq_loss", torch.device("cuda")) == "triton"
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "not validated on a GPU" in text and "measured slower than the torch backend" in text
