"""Write tests/fixtures/released_vit_tiny.pth: a tiny ViT of the released MFM code, in its checkpoint forms, with
the outputs the released code computes from them (tests/trainer/test_released.py reads it; run this once).

    python tools/make_released_fixture.py [--repo /work/.mirror/Jiahao000+MFM/repo] [--out tests/fixtures/...]

--repo: a checkout of github.com/Jiahao000/MFM or its bare git directory (read with git archive HEAD into a
temporary folder). Its models/vision_transformer.py, models/mfm.py and utils.py are imported unmodified.

The fixture holds:
  source             repository, commit and files the numbers come from
  dims               the VisionTransformer's arguments (32 px, patch 8, width 32, depth 2, 2 heads, MLP ratio 2
                     (4 would not fit the fixture in 300 KB), 5 classes)
  images             (4, 3, 32, 32) uint8; the inputs are images / 255 * 4 - 2 (float32)
  finetuned          {"model": state dict} of a VisionTransformer(use_mean_pooling=True, num_classes=5) whose
                     every parameter (q_bias, v_bias, LayerNorms, fc_norm, head included) got seeded noise
  finetuned_features, finetuned_logits    its forward_features (4, 32) and forward (4, 5) on the inputs
  pretrained         {"model": {"encoder." + k: ...}} of a noisy VisionTransformerForMFM (use_mean_pooling
                     False: norm.* kept, no head), plus decoder.0.weight / decoder.0.bias (zero, stride 0)
  pretrained_features   forward_features of a fresh use_mean_pooling model after the released fine-tuning's
                     utils.load_pretrained of that checkpoint (strict=False: norm.* unused, fc_norm / head fresh)
  pretrained_fresh   that model's fc_norm.* and head.* after loading (fresh: fc_norm 1 / 0, head random)
  init_seed, init_finetune, init_pretrain   the released constructors' initialisation with torch.manual_seed(
                     init_seed) at its first draw (VisionTransformer(num_classes=5) / VisionTransformerForMFM):
                     per tensor [sum, sum of squares, first, middle, last element] in float64
"""

from __future__ import annotations

import argparse
import io
import logging
import subprocess
import sys
import tarfile
import tempfile
import types
from functools import partial
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
MIRROR = "/work/.mirror/Jiahao000+MFM/repo"
DIMS = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, qkv_bias=True,
            init_values=None)
NUM_CLASSES, SEED, INIT_SEED, NOISE = 5, 0, 1234, 0.1


def checkout(repo: str, into: Path) -> tuple:
    """(folder with the released code, commit): the folder itself, or `git archive HEAD` of a git directory."""
    path = Path(repo)
    git = ["git", f"--git-dir={path}"] if not (path / "models").is_dir() else ["git", "-C", str(path)]
    commit = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    if (path / "models").is_dir():
        return path, commit
    archive = subprocess.run(git + ["archive", "HEAD"], capture_output=True, check=True).stdout
    tarfile.open(fileobj=io.BytesIO(archive)).extractall(into)
    return into, commit


def perturb(model: nn.Module, gen: torch.Generator) -> None:
    """Every parameter += NOISE * N(0, 1), so that no part of the checkpoint is at its initial value."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(NOISE * torch.randn(p.shape, generator=gen))


def seeded(cls, seed: int, **kwargs):
    """cls(**kwargs) with torch.manual_seed(seed) just before its first _trunc_normal_ call: the draws that
    follow are the released constructor's initialisation, in its order."""
    state = {"seeded": False}

    class Seeded(cls):
        def _trunc_normal_(self, tensor, mean=0., std=1.):
            if not state["seeded"]:
                torch.manual_seed(seed)
                state["seeded"] = True
            super()._trunc_normal_(tensor, mean=mean, std=std)

    return Seeded(**kwargs)


def fingerprint(state: dict) -> dict:
    """Per tensor: [sum, sum of squares, first, middle, last element] (float64)."""
    rows = []
    for v in state.values():
        x = v.detach().double().flatten()
        rows.append(torch.stack([x.sum(), (x * x).sum(), x[0], x[x.numel() // 2], x[-1]]))
    table = torch.stack(rows)  # one storage: the rows are views of it
    return {k: table[i] for i, k in enumerate(state)}


def build(code: Path, commit: str) -> dict:
    sys.path.insert(0, str(code))
    from models.mfm import VisionTransformerForMFM  # noqa: E402  (the released code, unmodified)
    from models.vision_transformer import VisionTransformer
    import utils as released_utils

    norm = partial(nn.LayerNorm, eps=1e-6)
    cfg = types.SimpleNamespace(MODEL=types.SimpleNamespace(TYPE="vit", VIT=types.SimpleNamespace(
        DECODER=types.SimpleNamespace(DEPTH=0))), DATA=types.SimpleNamespace(FILTER_TYPE="mfm"))
    finetune_kw = dict(DIMS, norm_layer=norm, use_mean_pooling=True, num_classes=NUM_CLASSES)
    pretrain_kw = dict(DIMS, norm_layer=norm, use_mean_pooling=False, num_classes=0, config=cfg)
    gen = torch.Generator().manual_seed(SEED)
    images = torch.randint(0, 256, (4, 3, 32, 32), generator=gen, dtype=torch.uint8)
    x = images.float() / 255 * 4 - 2

    torch.manual_seed(SEED)
    finetuned = VisionTransformer(**finetune_kw).eval()
    perturb(finetuned, gen)
    pretrained = VisionTransformerForMFM(**pretrain_kw).eval()
    perturb(pretrained, gen)
    pre_ckpt = {"model": {**{"encoder." + k: v for k, v in pretrained.state_dict().items()},
                          "decoder.0.weight": torch.zeros(1).expand(8 * 8 * 3, 32, 1, 1),
                          "decoder.0.bias": torch.zeros(1).expand(8 * 8 * 3)}}
    with tempfile.TemporaryDirectory() as tmp:  # the released fine-tuning's own loader
        path = Path(tmp, "pretrained.pth")
        torch.save(pre_ckpt, path)
        fresh = VisionTransformer(**finetune_kw).eval()
        released_utils.load_pretrained(types.SimpleNamespace(PRETRAINED=str(path), MODEL=cfg.MODEL), fresh,
                                       logging.getLogger("released"))
    with torch.no_grad():
        out = dict(finetuned_features=finetuned.forward_features(x), finetuned_logits=finetuned(x),
                   pretrained_features=fresh.forward_features(x))
    return dict(
        source=(f"github.com/Jiahao000/MFM @ {commit}: models/vision_transformer.py (VisionTransformer), "
                "models/mfm.py (VisionTransformerForMFM), utils.py (load_pretrained); "
                "written by tools/make_released_fixture.py"),
        dims=dict(DIMS, num_classes=NUM_CLASSES, layer_norm_eps=1e-6), images=images,
        finetuned={"model": finetuned.state_dict()}, pretrained=pre_ckpt,
        pretrained_fresh={k: v for k, v in fresh.state_dict().items() if k.split(".")[0] in ("fc_norm", "head")},
        init_seed=INIT_SEED,
        init_finetune=fingerprint(seeded(VisionTransformer, INIT_SEED, **finetune_kw).state_dict()),
        init_pretrain=fingerprint(seeded(VisionTransformerForMFM, INIT_SEED, **pretrain_kw).state_dict()),
        **out)


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo", default=MIRROR, help="the released repository: a checkout or a bare git directory")
    p.add_argument("--out", default=str(ROOT / "tests" / "fixtures" / "released_vit_tiny.pth"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        fixture = build(*checkout(args.repo, Path(tmp)))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(fixture, out)
    print(f"{out}: {out.stat().st_size / 1024:.0f} KiB from {fixture['source']}")
    return out


if __name__ == "__main__":
    main()
