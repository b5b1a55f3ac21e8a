"""The released MFM architecture on timm (create_classifier, the released initialisation, the pinned key bias,
the pre-training presets) and --init (load_init / describe_init) on every kind of checkpoint it takes.

The expected numbers come from tests/fixtures/released_vit_tiny.pth, computed by the released code itself
(tests/fixtures/make_released_vit_tiny.py: its VisionTransformer, VisionTransformerForMFM and load_pretrained), or from
closed-form statistics; none is computed by the code under test. CPU, one thread, 32 px models.
"""

import argparse
import json
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from torch import nn

from mfm_fast.cli import ArgError
from mfm_fast.train import pretrain
from mfm_fast.train.model import build_model
from mfm_fast.train.released import apply_released_vit_init, create_classifier, describe_init, load_init

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "released_vit_tiny.pth"
TINY = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)  # the fixture's released ViT
PRETRAIN = ["--device", "cpu", "--model", "test_vit", "--img-size", "32", "--batch-size", "4", "--num-workers", "0",
            "--vis-num", "0", "--no-progress", "--threads", "1", "--steps", "1"]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def fix():
    return torch.load(FIXTURE, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def files(fix, tmp_path_factory):
    """The fixture's two released checkpoints as files."""
    out = tmp_path_factory.mktemp("released")
    torch.save(fix["finetuned"], out / "finetuned.pth")
    torch.save(fix["pretrained"], out / "pretrained.pth")
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One-step mfm_fast pre-training runs of test_vit (MFM and FOLK): their output folders."""
    out, n = tmp_path_factory.mktemp("pretrain"), torch.get_num_threads()
    try:
        for method in ("mfm", "folk"):
            pretrain.main(PRETRAIN + ["--method", method, "--output-dir", str(out / method)])
    finally:
        torch.set_num_threads(n)
    return out


def tiny(num_classes=5, img_size=32, **kw):
    return create_classifier("vit_tiny_patch16_224", num_classes, img_size, **TINY, **kw).eval()


def inputs(fix):
    return fix["images"].float() / 255 * 4 - 2  # as tests/fixtures/make_released_vit_tiny.py


def features_and_logits(net, x):
    with torch.no_grad():
        return net.forward_head(net.forward_features(x), pre_logits=True), net(x)


def refusal(path, net, img_size=32, flag="--init"):
    """load_init's ArgError message, checked to be one line naming the flag."""
    with pytest.raises(ArgError) as info:
        load_init(path, net, img_size=img_size, flag=flag)
    msg = str(info.value)
    assert msg.startswith(flag + ": ") and "\n" not in msg, msg
    return msg


# ---- the architecture --------------------------------------------------------------------------------

def test_timm_vit_with_avg_pooling_is_the_released_fine_tuning_head():
    """timm's global_pool="avg": mean of the patch tokens -> fc_norm (LayerNorm, eps 1e-6), norm Identity; no
    layer scale; pos_embed with a cls slot; a qkv bias (the released q_bias / 0 / v_bias)."""
    net = tiny()
    assert isinstance(net.norm, nn.Identity) and isinstance(net.fc_norm, nn.LayerNorm)
    norms = [m for m in net.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 2 * 2 + 1 and all(m.eps == 1e-6 for m in norms)
    assert all(isinstance(b.ls1, nn.Identity) and isinstance(b.ls2, nn.Identity) for b in net.blocks)
    assert net.global_pool == "avg" and net.num_prefix_tokens == 1 and net.pos_embed.shape == (1, 1 + 16, 32)
    assert net.blocks[0].attn.qkv.bias.shape == (3 * 32,)


@pytest.mark.parametrize("released_init", [False, True])
def test_released_fine_tuned_checkpoint_gives_the_released_outputs(fix, files, released_init):
    net = tiny(released_init=released_init)
    report = load_init(files / "finetuned.pth", net, img_size=32)
    assert report["kind"] == "released_finetune" and report["left_out"] == [] and report["fresh"] == []
    assert report["loaded"] == len(net.state_dict())
    features, logits = features_and_logits(net, inputs(fix))
    torch.testing.assert_close(features, fix["finetuned_features"], rtol=0, atol=1e-5)
    torch.testing.assert_close(logits, fix["finetuned_logits"], rtol=0, atol=1e-5)
    qkv = fix["finetuned"]["model"]["blocks.1.attn.q_bias"], fix["finetuned"]["model"]["blocks.1.attn.v_bias"]
    assert torch.equal(net.blocks[1].attn.qkv.bias, torch.cat([qkv[0], torch.zeros(32), qkv[1]]))
    line = describe_init(report)
    assert "\n" not in line and "released MFM fine-tuned" in line and "left out none; fresh none" in line


def test_released_pretraining_checkpoint_gives_the_released_fine_tuning_features(fix, files):
    """The released fine-tuning's load_pretrained: encoder.* without the prefix, strict=False: norm.* unused,
    fc_norm (1 / 0) and head fresh; decoder.* dropped."""
    net = tiny(released_init=True)
    report = load_init(files / "pretrained.pth", net, img_size=32)
    assert report["kind"] == "released_pretrain"
    assert report["left_out"] == ["encoder.norm.weight", "encoder.norm.bias", "decoder.0.weight", "decoder.0.bias"]
    assert report["fresh"] == ["fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"]
    assert report["loaded"] == len(net.state_dict()) - 4
    for key in ("fc_norm.weight", "fc_norm.bias"):
        assert torch.equal(net.state_dict()[key], fix["pretrained_fresh"][key])
    features, _ = features_and_logits(net, inputs(fix))
    torch.testing.assert_close(features, fix["pretrained_features"], rtol=0, atol=1e-5)
    line = describe_init(report)
    assert "\n" not in line and "released MFM pre-training" in line
    assert "left out encoder.norm.* (2), decoder.* (2); fresh fc_norm.* (2), head.* (2)" in line


def _fingerprint(t: torch.Tensor) -> torch.Tensor:
    x = t.detach().double().flatten()  # as tests/fixtures/make_released_vit_tiny.py
    return torch.stack([x.sum(), (x * x).sum(), x[0], x[x.numel() // 2], x[-1]])


@pytest.mark.parametrize("pretraining", [False, True])
def test_released_init_draws_what_the_released_constructor_draws(fix, pretraining):
    """Same seed at the first draw -> the released VisionTransformer's (VisionTransformerForMFM's) weights."""
    if pretraining:
        net = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, **TINY)
    else:
        net = create_classifier("vit_tiny_patch16_224", 5, 32, **TINY)
    torch.manual_seed(fix["init_seed"])
    apply_released_vit_init(net, pretraining=pretraining)
    ours = net.state_dict()
    expected = fix["init_pretrain" if pretraining else "init_finetune"]
    for key, want in expected.items():
        if key.endswith(("attn.q_bias", "attn.v_bias")):
            bias = ours[key.rsplit(".", 1)[0] + ".qkv.bias"]
            have = bias[:32] if key.endswith("q_bias") else bias[64:]
        else:
            have = ours[key]
        torch.testing.assert_close(_fingerprint(have), want, rtol=1e-12, atol=1e-15, msg=key)
    assert {k for k in ours if not k.endswith("qkv.bias")} == {k for k in expected if "_bias" not in k}


# ---- the presets: released initialisation and pinned key bias ---------------------------------------------

def _std(t):
    return t.detach().double().std().item()


def test_fine_tuning_preset_has_the_released_initialisation():
    torch.manual_seed(0)
    net = create_classifier("vit_tiny_patch16_224", 10, 32, released_init=True, depth=4)
    assert isinstance(net.norm, nn.Identity) and isinstance(net.fc_norm, nn.LayerNorm)
    assert all(m.eps == 1e-6 and torch.all(m.weight == 1) and torch.all(m.bias == 0)
               for m in net.modules() if isinstance(m, nn.LayerNorm))
    for i, block in enumerate(net.blocks):
        for w in (block.attn.qkv.weight, block.mlp.fc1.weight):
            assert _std(w) == pytest.approx(0.02, rel=0.03)
        for w in (block.attn.proj.weight, block.mlp.fc2.weight):  # / sqrt(2 (i + 1))
            assert _std(w) / _std(block.mlp.fc1.weight) == pytest.approx(1 / math.sqrt(2 * (i + 1)), rel=0.04)
        assert torch.all(block.attn.qkv.bias == 0) and torch.all(block.mlp.fc2.bias == 0)
    assert _std(net.pos_embed) == pytest.approx(0.02, rel=0.1)
    assert _std(net.head.weight) == pytest.approx(0.001 * 0.02, rel=0.12) and torch.all(net.head.bias == 0)
    assert net.patch_embed.proj.weight.abs().max() > 0.02  # truncated at +-2, not +-std


def test_pinned_key_bias_stays_zero_under_adamw():
    """A loss that pushes every qkv bias: q and v move, the pinned key third stays exactly 0 (unpinned: moves)."""
    from timm.optim import param_groups_weight_decay

    def train(released_init):
        torch.manual_seed(0)
        net = create_classifier("test_vit", 7, 32, released_init=released_init).train()
        opt = torch.optim.AdamW(param_groups_weight_decay(net, 0.05), lr=1e-2)
        x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
        for _ in range(3):
            loss = nn.functional.cross_entropy(net(x), y) + sum(b.attn.qkv.bias.sum() for b in net.blocks)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return [b.attn.qkv.bias.detach().view(3, -1) for b in net.blocks]

    for q, k, v in train(True):
        assert torch.all(k == 0) and torch.all(q != 0) and torch.all(v != 0)
    assert all(torch.all(k != 0) for _, k, _ in train(False))


def _pretrain_args(preset, model="vit_small_patch16_224"):
    return argparse.Namespace(model=model, img_size=32, drop_path=0.0, method="mfm", preset=preset)


def test_pre_training_preset_has_the_released_encoder():
    """--preset vit_small: VisionTransformerForMFM's initialisation (truncated at +-std: |w| <= .02, std of a
    N(0, 1) truncated to [-1, 1] = sqrt(1 - 2 phi(1) / (2 Phi(1) - 1)) = 0.5396 of .02) and no key bias."""
    torch.manual_seed(0)
    enc = build_model(_pretrain_args("vit_small")).encoder
    weights = [m.weight for m in enc.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert all(w.abs().max() <= 0.02 for w in weights + [enc.pos_embed, enc.cls_token])
    phi1, mass = math.exp(-0.5) / math.sqrt(2 * math.pi), math.erf(1 / math.sqrt(2))
    assert _std(enc.blocks[0].mlp.fc1.weight) == pytest.approx(0.02 * math.sqrt(1 - 2 * phi1 / mass), rel=0.02)
    assert _std(enc.blocks[5].attn.proj.weight) / _std(enc.blocks[5].attn.qkv.weight) == pytest.approx(
        1 / math.sqrt(12), rel=0.04)
    assert isinstance(enc.norm, nn.LayerNorm) and torch.all(enc.norm.weight == 1)  # the final norm is kept
    bias = enc.blocks[0].attn.qkv.bias
    (bias * torch.arange(1, bias.numel() + 1)).sum().backward()
    assert torch.all(bias[384:768] == 0) and torch.all(bias.grad[384:768] == 0) and torch.all(bias.grad[:384] != 0)

    torch.manual_seed(0)
    plain = build_model(_pretrain_args(None)).encoder  # no preset: timm's initialisation
    assert plain.blocks[0].mlp.fc1.weight.abs().max() > 0.02
    bias = plain.blocks[0].attn.qkv.bias
    (bias * torch.arange(1, bias.numel() + 1)).sum().backward()
    assert torch.all(bias.grad[384:768] != 0)


# ---- --init with mfm_fast checkpoints -----------------------------------------------------------------

@pytest.mark.parametrize("method", ["mfm", "folk"])
def test_mfm_fast_pretraining_checkpoint_and_encoder_pth_load_every_encoder_tensor(runs, method):
    encoder = torch.load(runs / method / "encoder.pth", weights_only=True)
    ckpt = torch.load(runs / method / "checkpoint.pth", weights_only=True)
    heads = [k for k in ckpt["model"] if not k.startswith("encoder.")]
    assert heads and all(k.startswith(("head.", "dino_head.")) for k in heads)
    for name, prefix in (("checkpoint.pth", "encoder."), ("encoder.pth", "")):
        net = create_classifier("test_vit", 17, 32)
        report = load_init(runs / method / name, net, img_size=32)
        # the only encoder tensors left out are the final norm's: mean pooling has fc_norm in its place
        assert sorted(report["left_out"]) == sorted([prefix + "norm.weight", prefix + "norm.bias"]
                                                    + (heads if prefix else []))
        assert report["fresh"] == ["fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"]
        state = net.state_dict()
        assert report["loaded"] == len(state) - 4 == len(encoder) - 2
        for key, value in encoder.items():
            if not key.startswith("norm."):
                assert torch.equal(state[key], value), key
        assert report["kind"] == ("mfm_fast_pretrain" if prefix else "mfm_fast_encoder")

    net = create_classifier("test_vit", 17, 32, global_pool="token")  # cls token after the final norm
    report = load_init(runs / method / "checkpoint.pth", net, img_size=32)
    assert sorted(report["left_out"]) == sorted(heads)  # no encoder tensor left out
    assert report["fresh"] == ["head.weight", "head.bias"] and report["loaded"] == len(encoder)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in encoder.items())

    net = create_classifier("test_vit", 17, 32, released_init=True)  # pinned: the key bias back to 0
    load_init(runs / method / "checkpoint.pth", net, img_size=32)
    q, k, v = net.blocks[1].attn.qkv.bias.detach().view(3, -1)
    q0, _, v0 = encoder["blocks.1.attn.qkv.bias"].view(3, -1)
    assert torch.all(k == 0) and torch.equal(q, q0) and torch.equal(v, v0)


def test_finetune_checkpoint_loads_whole_or_with_a_fresh_head(tmp_path):
    torch.manual_seed(1)
    trained = create_classifier("test_vit", 17, 32)
    path = tmp_path / "best.pth"
    torch.save({"kind": "finetune", "model": trained.state_dict(), "step": 5,
                "args": {"model": "test_vit", "img_size": 32, "num_classes": 17}}, path)
    net = create_classifier("test_vit", 17, 32)
    report = load_init(path, net, img_size=32)
    assert report["kind"] == "mfm_fast_finetune" and report["left_out"] == [] and report["fresh"] == []
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in trained.state_dict().items())
    net = create_classifier("test_vit", 5, 32)
    report = load_init(path, net, img_size=32)
    assert report["left_out"] == report["fresh"] == ["head.weight", "head.bias"]
    assert torch.equal(net.fc_norm.weight, trained.fc_norm.weight)
    assert "left out head.* (2); fresh head.* (2)" in describe_init(report)


# ---- --init with released ResNet checkpoints (and the released config object) --------------------------

def _fake_yacs(monkeypatch):
    """A yacs.config.CfgNode (a dict subclass with attribute state) to pickle, as the released checkpoints do."""
    class CfgNode(dict):
        def __init__(self, d=None):
            super().__init__(d or {})
            self.__dict__.update(__immutable__=True, __deprecated_keys__=set(), __new_allowed__=False)
    CfgNode.__module__, CfgNode.__qualname__ = "yacs.config", "CfgNode"
    yacs, config = types.ModuleType("yacs"), types.ModuleType("yacs.config")
    config.CfgNode, yacs.config = CfgNode, config
    monkeypatch.setitem(sys.modules, "yacs", yacs)
    monkeypatch.setitem(sys.modules, "yacs.config", config)
    return CfgNode


def test_released_resnet_checkpoint_with_its_config(tmp_path, monkeypatch):
    CfgNode = _fake_yacs(monkeypatch)
    torch.manual_seed(2)
    encoder = timm.create_model("test_resnet", num_classes=0)  # ResNetForMFM is timm's ResNet: the same keys
    path = tmp_path / "ckpt_epoch_299.pth"
    torch.save({"model": {**{"encoder." + k: v for k, v in encoder.state_dict().items()},
                          "decoder.0.weight": torch.zeros(8, 2048, 1, 1)},
                "config": CfgNode({"MODEL": CfgNode({"TYPE": "resnet", "BETAS": (0.9, 0.95)})}),
                "max_accuracy": np.float64(0.0), "epoch": 299, "optimizer": {"state": {}, "param_groups": []}}, path)
    monkeypatch.delitem(sys.modules, "yacs.config")  # --init reads the file without yacs
    monkeypatch.delitem(sys.modules, "yacs")
    with pytest.raises(Exception):
        torch.load(path, weights_only=True)  # what a plain weights-only load says about this file
    net = create_classifier("test_resnet", 3, 32)
    report = load_init(path, net, img_size=32)
    assert report["kind"] == "released_pretrain" and report["left_out"] == ["decoder.0.weight"]
    assert report["fresh"] == ["fc.weight", "fc.bias"]
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in encoder.state_dict().items())


# ---- refusals -------------------------------------------------------------------------------------------

def test_refusals_are_one_line_naming_the_flag(fix, files, runs, tmp_path):
    net = tiny()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert "no such checkpoint" in refusal(tmp_path / "nothing.pth", net)
    (tmp_path / "log.json").write_text(json.dumps({"model": "vit"}))
    assert "is not a torch checkpoint file" in refusal(tmp_path / "log.json", net)
    whole = (files / "finetuned.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(whole[: len(whole) // 2])
    assert "is not a torch checkpoint file" in refusal(tmp_path / "cut.pth", net)

    torch.save({"a": torch.zeros(3), "b": torch.ones(2, 2)}, tmp_path / "tensors.pth")
    msg = refusal(tmp_path / "tensors.pth", net)
    assert "no known kind" in msg and "2 tensors (a, b)" in msg
    torch.save([1, 2], tmp_path / "list.pth")
    assert "no known kind: it holds a list" in refusal(tmp_path / "list.pth", net)
    torch.save({"epoch": 3, "losses": [1.0]}, tmp_path / "stats.pth")
    msg = refusal(tmp_path / "stats.pth", net, flag="--checkpoint")
    assert "no known kind" in msg and "epoch, losses" in msg

    msg = refusal(files / "finetuned.pth", create_classifier("test_resnet", 5, 32))
    assert "does not fit test_resnet" in msg and "conv1.0.weight" in msg
    assert "the file holds a ViT of width 32, depth 2, patch 8" in msg
    msg = refusal(files / "pretrained.pth", create_classifier("test_vit", 5, 32))
    assert "cls_token is (1, 1, 32) in the file, (1, 1, 64) here" in msg
    msg = refusal(runs / "mfm" / "checkpoint.pth", tiny())
    assert "cls_token is (1, 1, 64) in the file, (1, 1, 32) here" in msg and "test_vit (its run's --model)" in msg

    msg = refusal(files / "pretrained.pth", tiny(img_size=64), img_size=64)
    assert "pre-trained at 32 px" in msg and "this run is 64 px: pass --img-size 32" in msg
    msg = refusal(files / "finetuned.pth", tiny(img_size=16), img_size=16)
    assert "fine-tuned at 32 px" in msg and "this run is 16 px: pass --img-size 32" in msg
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())  # nothing loaded on refusal
