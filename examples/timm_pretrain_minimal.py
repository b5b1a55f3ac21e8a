"""MFM pre-training inside your own loop: mfm_fast's corruption + MaskedFreqLoss around a timm ViT.

    python examples/timm_pretrain_minimal.py                                   # ViT-S/16, 224 px
    python examples/timm_pretrain_minimal.py --model test_vit --img-size 32 --steps 5 --batch-size 8
The full trainer (recipe, DDP, checkpoints, pictures) is `python -m mfm_fast.pretrain`.
"""
import argparse
import os

import torch

import mfm_fast
from mfm_fast._optional import require

require(os.path.basename(__file__), "timm", "skimage")  # one line and exit 2 unless pip install -e '.[train]'
import timm  # noqa: E402

from mfm_fast.train.data import PhotoCrops  # noqa: E402  (offline photo crops from scikit-image; use your own DataLoader)

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--model", default="vit_small_patch16_224", help="a timm ViT (CNNs: drop img_size below)")
p.add_argument("--img-size", type=int, default=224, help="crop side")
p.add_argument("--batch-size", type=int, default=64, help="images per step")
p.add_argument("--steps", type=int, default=50, help="optimiser steps")
args = p.parse_args()
device = "cuda" if torch.cuda.is_available() else "cpu"

encoder = timm.create_model(args.model, pretrained=False, num_classes=0, img_size=args.img_size).to(device)
head = mfm_fast.MFMHead.for_timm_model(encoder).to(device)  # 1x1 conv + PixelShuffle(patch size)
corruption = mfm_fast.FrequencyCorruption(r1=16 * args.img_size / 224, p_low=0.5)  # one mask per image
criterion = mfm_fast.MaskedFreqLoss(normalize_target=True)  # target: the raw clean pixels
params = list(encoder.parameters()) + list(head.parameters())
optimizer = torch.optim.AdamW(params, lr=3e-4 * args.batch_size / 512, betas=(0.9, 0.95), weight_decay=0.05)
loader = torch.utils.data.DataLoader(PhotoCrops(args.img_size), batch_size=args.batch_size, shuffle=True,
                                     drop_last=True)

step = 0
while step < args.steps:
    for images, _ in loader:  # uint8 (N, 3, S, S); float pixels in [0, 1] work too
        images = images.to(device, non_blocking=True)
        inp, mask = corruption(images)  # normalised corrupted input, keep mask (N, S, S)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            pred = head(encoder.forward_features(inp))  # (N, 3, S, S) in normalised space
        loss = criterion(pred, images, mask)  # one masked spectral mean over the batch
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 3.0)
        optimizer.step()
        step += 1
        if step % 10 == 0 or step == args.steps:
            print(f"step {step} loss {loss.item():.4f}")  # .item() syncs: only when printing
        if step == args.steps:
            break
