"""FOLK pre-training inside your own loop: adaptive Com / RCom masks, MFM reconstruction and self-distillation.

    python examples/folk_minimal.py                                          # ViT-S/16, 224 px
    python examples/folk_minimal.py --model test_vit --img-size 32 --steps 5 --batch-size 8 --out-dim 256
The full trainer (recipe, DDP, checkpoints, pictures) is `python -m mfm_fast.pretrain --method folk`.
"""
import argparse
import os

import torch

import mfm_fast
from mfm_fast._optional import require

require(os.path.basename(__file__), "timm", "torchvision", "skimage")  # exit 2 unless pip install -e '.[train]'
import timm  # noqa: E402

from mfm_fast.train.data import MFMTransform, PhotoCrops, TwoViews  # noqa: E402  (offline photo crops, two views each)
from mfm_fast.folk import DINOHead, FOLKModel, SelfDistillation  # noqa: E402

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--model", default="vit_small_patch16_224", help="a timm ViT (CNNs: drop img_size below)")
p.add_argument("--img-size", type=int, default=224, help="crop side")
p.add_argument("--batch-size", type=int, default=64, help="images (view pairs) per step")
p.add_argument("--steps", type=int, default=50, help="optimiser steps")
p.add_argument("--out-dim", type=int, default=65536, help="DINO prototypes")
args = p.parse_args()
device = "cuda" if torch.cuda.is_available() else "cpu"

encoder = timm.create_model(args.model, pretrained=False, num_classes=0, img_size=args.img_size)
student = FOLKModel(encoder, mfm_fast.MFMHead.for_timm_model(encoder),
                    DINOHead(encoder.num_features, out_dim=args.out_dim)).to(device)
distill = SelfDistillation(student, total_steps=args.steps)  # EMA teacher + DINO loss with DINO's defaults
criterion = mfm_fast.MaskedFreqLoss(normalize_target=True)  # target: the raw clean pixels
params = [q for q in student.parameters() if q.requires_grad]
optimizer = torch.optim.AdamW(params, lr=3e-4 * args.batch_size / 512, betas=(0.9, 0.95), weight_decay=0.05)
data = PhotoCrops(args.img_size, transform=TwoViews(MFMTransform(args.img_size)))
loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, shuffle=True, drop_last=True)
mean = torch.tensor(mfm_fast.IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
std = torch.tensor(mfm_fast.IMAGENET_STD, device=device).view(1, 3, 1, 1)

step = 0
while step < args.steps:
    for pairs, _ in loader:  # uint8 (N, 2, 3, S, S)
        views = pairs.to(device, non_blocking=True).transpose(0, 1).flatten(0, 1)  # (2N, 3, S, S): [u; v]
        mask = mfm_fast.make_adaptive_masks(views, "mixed", keep_ratio=0.01)  # Com or RCom per view
        inp = mfm_fast.corrupt(views, mask)  # the filtered views the student sees
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            pred, student_logits = student(inp)
            teacher_logits = distill.teacher_logits((views / 255.0 - mean) / std)  # unfiltered views
        rec = criterion(pred, views, mask)  # reconstruct the removed frequencies
        dino = distill(student_logits, teacher_logits, step)  # each filtered view predicts the other clean view
        loss = rec + dino
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 3.0)
        optimizer.step()
        distill.update_teacher(step)  # EMA: the teacher's only update
        step += 1
        if step % 10 == 0 or step == args.steps:
            print(f"step {step} loss {loss.item():.4f} (rec {rec.item():.4f}, distill {dino.item():.4f})")
        if step == args.steps:
            break
