"""MFM (and FOLK) pre-training of a timm backbone with mfm_fast's corruption and MaskedFreqLoss.

    python -m mfm_fast.pretrain --device cpu --model test_vit --img-size 64 --batch-size 32 --steps 200
    python -m mfm_fast.pretrain --method folk --data-path /imagenet/train --preset vit_small --batch-size 128
    python -m mfm_fast.pretrain --data-path /imagenet/train --preset vit_base --batch-size 128
    torchrun --nproc_per_node=8 -m mfm_fast.pretrain --data-path /imagenet/train --preset vit_base --batch-size 128
    python -m mfm_fast.pretrain --synthetic --steps 100 --report-throughput --pipeline official,mfm_fast

Shape of the code (MAE / SimMIM style): args -> data -> model -> optimiser / schedule -> loop.
Per step: uint8 batch -> device -> per-image masks + corruption + normalisation on the device
(``--task mfm``) or a restoration degradation (sr / deblur / denoise, MFM_SPEC.md §5) ->
encoder.forward_features -> MFMHead -> MaskedFreqLoss("masked", or "mean" for restoration).
The recipe (MFM_SPEC.md §4, the released configs) is the default; see ``--help``.
``--method folk`` (MFM_SPEC.md §6, mfm_fast.folk): each sample is two augmented views; the student sees
them filtered by per-image Com / RCom masks and is trained on rec_weight x the masked spectral loss +
distill_weight x the DINO loss against an EMA teacher that sees the other view unfiltered.
Without --data-path or --synthetic the data are random crops of the photographs bundled in
scikit-image's wheel (offline; mfm_fast.data).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import math
import os
import random
import sys
import time
import zipfile
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import data as D
from ._common import imagenet_normalize
from .cli import OneLineParser
from .adaptive_masks import make_adaptive_masks
from .corruption import FrequencyCorruption, corrupt
from .head import MFMHead
from .loss import MaskedFreqLoss
from .folk import SelfDistillation, teacher_momentum
from .dispatch import backend_unavailable_reason
from .masks import disc_band, make_masks

PRESETS = {  # --preset: (timm model, p_low) of the released configs; the optimiser recipe is the same for all
    "vit_small": ("vit_small_patch16_224", 0.5),
    "vit_base": ("vit_base_patch16_224", 0.5),
    "resnet50": ("resnet50", 0.3),
}
TASKS = ("mfm", "sr", "deblur", "denoise")
METHODS = ("mfm", "folk")
MASKS = ("disc", "adaptive")
ADAPTIVE_MODES = ("mixed", "com", "rcom")
DISTANCES = ("complex", "magnitude_phase")
PIPELINES = ("mfm_fast", "official")
CHECKPOINT_NAME = "checkpoint.pth"


class ArgError(ValueError):
    """A bad command-line value; the message starts with the flag."""


class NonFiniteLoss(RuntimeError):
    """The loss became NaN / inf (without --skip-nonfinite)."""


# ---- arguments -----------------------------------------------------------------------------------

class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The module docstring as written; each option's default unless it is None / False or already said."""

    def _get_help_string(self, action):
        text = action.help or ""
        if not any(action.default is v for v in (None, False, argparse.SUPPRESS)) and "default" not in text:
            text += " (default: %(default)s)"
        return text


def get_args_parser() -> argparse.ArgumentParser:
    p = OneLineParser("python -m mfm_fast.pretrain", description=__doc__, formatter_class=_HelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help="timm model name, created with pretrained=False, num_classes=0 (default "
                        "vit_small_patch16_224; timm's test_vit / test_resnet are tiny ones for CPU tests)")
    g.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="released config: vit_small / vit_base (p_low 0.5) or resnet50 (p_low 0.3); "
                        "--model / --p-low override it")
    g.add_argument("--img-size", type=int, default=224, help="crop side S (even, a multiple of the encoder stride)")
    g.add_argument("--drop-path", type=float, default=0.0, help="stochastic depth rate of the encoder (recipe: 0)")

    g = p.add_argument_group("task and loss")
    g.add_argument("--task", choices=TASKS, default="mfm",
                   help="mfm: frequency masking (masked loss); sr / deblur / denoise: the restoration baselines "
                        "of MFM_SPEC.md §5 (loss with the 'mean' reduction)")
    g.add_argument("--p-low", type=float, default=None,
                   help="probability of a low-pass mask per image (default 0.5 for ViTs, 0.3 for CNNs)")
    g.add_argument("--r1", type=float, default=None,
                   help="mask radius (default 16 at 224 px, scaled with --img-size: 16 * S / 224)")
    g.add_argument("--r2", type=float, default=999, help="outer radius of the removed ring (999: none)")
    g.add_argument("--method", default="mfm",
                   help="mfm: masked frequency modeling; folk: FOLK (two views, adaptive masks, reconstruction + "
                        "self-distillation from an EMA teacher; see the FOLK options below); a comma list "
                        "(mfm,folk) runs each in turn (with --report-throughput: a cost comparison)")
    g.add_argument("--mask", choices=MASKS, default=None,
                   help="disc: MFM's low/high-pass discs (and --bands rings); adaptive: FOLK's per-image Com / RCom "
                        "masks from the image's own spectrum (default: disc for --method mfm, adaptive for folk)")
    g.add_argument("--adaptive-mode", choices=ADAPTIVE_MODES, default="mixed",
                   help="--mask adaptive: com keeps the dominant frequencies, rcom removes them, mixed picks one "
                        "per image (probability --p-com for com)")
    g.add_argument("--keep-ratio", type=float, default=0.01,
                   help="--mask adaptive: fraction of frequencies in the dominant set (FOLK's thresholds 0.005, "
                        "0.01, 0.05 read as this fraction)")
    g.add_argument("--p-com", type=float, default=0.5, help="--adaptive-mode mixed: probability of a Com mask")
    g.add_argument("--bands", nargs="+", default=None, metavar="R1,R2",
                   help="--mask disc: remove these rings r1^2 <= d^2 < r2^2 instead of --r1/--r2 (any number, e.g. "
                        "--bands 4,8 16,999); masks are still drawn low (rings removed) or high (rings kept)")
    g.add_argument("--radius-jitter", type=float, default=0.0,
                   help="--mask disc: shift every radius of every mask by its own U(-delta, delta)")
    g.add_argument("--mask-patch-factor", type=int, default=1,
                   help="patch-level masking: a pf x pf grid of patches, each with its own spectrum and mask, for "
                        "the corruption and the loss (MaskedFreqLoss patch_factor); radii in patch frequency units")
    g.add_argument("--distance", choices=DISTANCES, default="complex",
                   help="spectral distance of the loss: complex (MFM's |D|) or magnitude_phase (amplitude error + "
                        "--phase-weight x magnitude-weighted phase error)")
    g.add_argument("--phase-weight", type=float, default=1.0,
                   help="--distance magnitude_phase: weight of the phase term (1: the complex distance, 0: "
                        "amplitude only)")
    g.add_argument("--loss-gamma", type=float, default=1.0, help="exponent of the spectral distance")
    g.add_argument("--sr-factor", type=int, default=8, help="--task sr: bicubic down/up factor")
    g.add_argument("--blur-sigma", type=float, default=5.0, help="--task deblur: Gaussian sigma (pixels)")
    g.add_argument("--blur-sizes", type=int, nargs="+", default=[7, 9, 11, 13, 15, 17, 19, 21],
                   help="--task deblur: odd kernel sizes, one drawn per image")
    g.add_argument("--noise-sigma", type=float, default=75.0, help="--task denoise: noise sigma in 0..255 units")
    g.add_argument("--pipeline", default="mfm_fast",
                   help="mfm_fast, or official (eager replica of the released code's fft2 + fftshift corruption "
                        "and loss, for speed comparisons); a comma list (official,mfm_fast) runs each in turn "
                        "and prints a throughput table")
    g.add_argument("--corrupt-backend", default="auto",
                   help="mfm_fast backend of the corruption: auto, torch, triton, cuda or reference")
    g.add_argument("--loss-backend", default="auto",
                   help="mfm_fast backend of MaskedFreqLoss: auto, torch, triton, cuda or reference")

    g = p.add_argument_group("FOLK (--method folk; defaults: DINO's ViT-S/16 recipe)")
    g.add_argument("--rec-weight", type=float, default=1.0, help="weight of the reconstruction (masked spectral) loss")
    g.add_argument("--distill-weight", type=float, default=1.0, help="weight of the self-distillation loss")
    g.add_argument("--dino-out-dim", type=int, default=65536, help="prototypes K of the projection head")
    g.add_argument("--dino-hidden-dim", type=int, default=2048, help="hidden width of the projection MLP")
    g.add_argument("--dino-bottleneck-dim", type=int, default=256, help="bottleneck width of the projection MLP")
    g.add_argument("--dino-layers", type=int, default=3, help="linear layers of the projection MLP")
    g.add_argument("--no-norm-last-layer", action="store_true",
                   help="learn the scale of the weight-normalised last layer (DINO fixes it at 1)")
    g.add_argument("--student-temp", type=float, default=0.1, help="student softmax temperature")
    g.add_argument("--teacher-temp", type=float, default=0.04, help="teacher softmax temperature (sharpening)")
    g.add_argument("--warmup-teacher-temp", type=float, default=0.04,
                   help="teacher temperature at step 0, linear to --teacher-temp over --warmup-teacher-temp-epochs")
    g.add_argument("--warmup-teacher-temp-epochs", type=float, default=0, help="teacher temperature warm-up length")
    g.add_argument("--center-momentum", type=float, default=0.9, help="momentum of the teacher-output centre")
    g.add_argument("--momentum-teacher", type=float, default=0.996,
                   help="EMA momentum of the teacher at step 0, cosine to 1 at the last step")
    g.add_argument("--freeze-last-layer", type=float, default=1,
                   help="epochs during which the projection head's last layer is not updated")
    g.add_argument("--color-jitter", type=float, default=0.4,
                   help="colour-jitter strength of each view (DINO: 0.4, 0.4, 0.2, 0.1 for brightness, contrast, "
                        "saturation, hue; 0: off)")
    g.add_argument("--jitter-p", type=float, default=0.8, help="probability of colour jitter per view")
    g.add_argument("--grey-p", type=float, default=0.2, help="probability of a grey view")

    g = p.add_argument_group("data")
    g.add_argument("--data-path", default=None, help="ImageFolder root (root/class/img.jpg), e.g. ImageNet train")
    g.add_argument("--synthetic", action="store_true",
                   help="one random uint8 batch made on the device and reused: throughput without data loading")
    g.add_argument("--samples-per-epoch", type=int, default=4096,
                   help="epoch length of the built-in photo crops and of --synthetic")
    g.add_argument("--min-crop-scale", type=float, default=0.2, help="RandomResizedCrop scale (min, 1)")
    g.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1), help="DataLoader workers per process")
    g.add_argument("--no-pin-memory", action="store_true", help="do not pin host memory (pinned by default on CUDA)")
    g.add_argument("--overfit-batch", action="store_true",
                   help="debug: train on the first batch with the same masks every step")

    g = p.add_argument_group("optimisation (defaults: the released recipe)")
    g.add_argument("--batch-size", type=int, default=128, help="images per process per micro-batch")
    g.add_argument("--accum-iter", type=int, default=1, help="micro-batches accumulated per optimiser step")
    g.add_argument("--epochs", type=int, default=300, help="epochs (ignored when --steps is set)")
    g.add_argument("--steps", type=int, default=None, help="total optimiser steps (overrides --epochs)")
    g.add_argument("--warmup-epochs", type=float, default=20,
                   help="linear warm-up length; with --steps, warm-up keeps the fraction warmup_epochs / epochs")
    g.add_argument("--warmup-steps", type=int, default=None, help="warm-up length in steps (overrides the above)")
    g.add_argument("--blr", type=float, default=3e-4, help="base lr per 512 images: lr = blr * total_batch / 512")
    g.add_argument("--lr", type=float, default=None, help="absolute peak lr (overrides --blr)")
    g.add_argument("--warmup-lr", type=float, default=2.5e-7, help="lr at step 0, per 512 images")
    g.add_argument("--min-lr", type=float, default=2.5e-6, help="final cosine lr, per 512 images")
    g.add_argument("--weight-decay", type=float, default=0.05,
                   help="AdamW weight decay (none on 1-D params, biases, pos_embed, cls_token)")
    g.add_argument("--betas", type=float, nargs=2, default=[0.9, 0.95], help="AdamW betas")
    g.add_argument("--clip-grad", type=float, default=3.0, help="gradient-norm clip (0: off)")
    g.add_argument("--amp", choices=("auto", "bf16", "fp16", "none"), default="auto",
                   help="autocast dtype of the model (auto: bf16 on CUDA, none on CPU); fp16 uses a GradScaler")
    g.add_argument("--channels-last", action="store_true", help="channels_last model and inputs")
    g.add_argument("--compile", action="store_true", help="torch.compile the backbone + head")

    g = p.add_argument_group("run")
    g.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="auto: CUDA when available")
    g.add_argument("--seed", type=int, default=0, help="seed of weights, data order, crops and masks")
    g.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads per process (torch.set_num_threads; on a busy CPU 1 is often fastest)")
    g.add_argument("--output-dir", default="output/mfm_pretrain",
                   help="checkpoint.pth, encoder.pth, log.jsonl and vis/ go here")
    g.add_argument("--resume", default=None,
                   help="checkpoint.pth to continue from ('auto': <output-dir>/checkpoint.pth if it exists, else a "
                        "fresh start); log.jsonl keeps the records up to the checkpoint's step, as if uninterrupted")
    g.add_argument("--overwrite", action="store_true",
                   help="start afresh in an --output-dir that holds an earlier run (its checkpoint.pth, encoder.pth "
                        "and log.jsonl are replaced); without it such a run stops and names --resume auto")
    g.add_argument("--save-every", type=int, default=1000, help="checkpoint every N steps (and at the end)")
    g.add_argument("--no-checkpoint", action="store_true", help="write no checkpoint (throughput runs)")
    g.add_argument("--stop-at", type=int, default=None,
                   help="stop (with a checkpoint) after this step, as a preempted job would; the schedule "
                        "still spans the whole run, so --resume continues it")
    g.add_argument("--log-every", type=int, default=20,
                   help="log every N steps: the only host syncs of the loop (loss, NaN check, images/s)")
    g.add_argument("--vis-every", type=int, default=0, help="write a PNG grid every N steps (0: only at the end)")
    g.add_argument("--vis-num", type=int, default=4, help="samples in the PNG grid (0: no pictures)")
    g.add_argument("--skip-nonfinite", action="store_true",
                   help="skip optimiser steps whose loss or gradient is NaN / inf instead of stopping")
    g.add_argument("--no-progress", action="store_true", help="no tqdm bar; print a line per log step instead")
    g.add_argument("--report-throughput", action="store_true",
                   help="print a JSON line with images/s (after --timing-warmup steps) at the end")
    g.add_argument("--timing-warmup", type=int, default=10, help="steps left out of the images/s figure")
    g.add_argument("--dist-backend", choices=("auto", "nccl", "gloo"), default="auto",
                   help="torch.distributed backend under torchrun (auto: nccl on CUDA, gloo on CPU)")
    return p


def _flag(name: str) -> str:
    """The command-line flag of an argparse destination: warmup_steps -> --warmup-steps."""
    return "--" + name.replace("_", "-")


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill preset-derived defaults and check every value; raises ArgError naming the flag."""
    args = argparse.Namespace(**vars(args))
    preset_model, preset_p_low = PRESETS[args.preset] if args.preset else (None, None)
    args.model = args.model or preset_model or "vit_small_patch16_224"
    positive = ("img_size", "batch_size", "accum_iter", "epochs", "samples_per_epoch", "log_every", "save_every",
                "sr_factor", "dino_out_dim", "dino_hidden_dim", "dino_bottleneck_dim", "dino_layers")
    for name in positive:
        if getattr(args, name) < 1:
            raise ArgError(f"{_flag(name)}: must be >= 1, got {getattr(args, name)}")
    for name in ("steps", "warmup_steps", "stop_at"):
        v = getattr(args, name)
        if v is not None and v < (0 if name == "warmup_steps" else 1):
            raise ArgError(f"{_flag(name)}: must be >= {0 if name == 'warmup_steps' else 1}, got {v}")
    if args.threads is not None and args.threads < 1:
        raise ArgError(f"--threads: must be >= 1, got {args.threads}")
    for name in ("vis_every", "vis_num", "num_workers", "timing_warmup"):
        if getattr(args, name) < 0:
            raise ArgError(f"{_flag(name)}: must be >= 0, got {getattr(args, name)}")
    if args.img_size % 2:
        raise ArgError(f"--img-size: must be even (the spectrum's DC sits at S // 2), got {args.img_size}")
    if not 0 < args.min_crop_scale <= 1:
        raise ArgError(f"--min-crop-scale: must be in (0, 1], got {args.min_crop_scale}")
    nonneg = ("blr", "warmup_lr", "min_lr", "weight_decay", "clip_grad", "drop_path", "noise_sigma", "radius_jitter",
              "phase_weight", "rec_weight", "distill_weight", "warmup_teacher_temp_epochs", "freeze_last_layer",
              "color_jitter")
    for name in nonneg:
        v = getattr(args, name)
        if not math.isfinite(v) or v < 0:
            raise ArgError(f"{_flag(name)}: must be a finite value >= 0, got {v}")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        raise ArgError(f"--lr: must be > 0, got {args.lr}")
    if not all(0 <= b < 1 for b in args.betas):
        raise ArgError(f"--betas: both must be in [0, 1), got {args.betas}")
    if args.task == "deblur" and (not args.blur_sizes or any(k < 1 or k % 2 == 0 for k in args.blur_sizes)):
        raise ArgError(f"--blur-sizes: must be odd positive kernel sizes, got {args.blur_sizes}")
    if args.task == "deblur" and max(args.blur_sizes) // 2 >= args.img_size:
        raise ArgError(f"--blur-sizes: the largest kernel {max(args.blur_sizes)} is too big for --img-size {args.img_size}")
    if args.task == "sr" and args.img_size % args.sr_factor:
        raise ArgError(f"--sr-factor: {args.sr_factor} must divide --img-size {args.img_size}")
    if args.task == "deblur" and args.blur_sigma <= 0:
        raise ArgError(f"--blur-sigma: must be > 0, got {args.blur_sigma}")
    pipelines = [s.strip() for s in str(args.pipeline).split(",") if s.strip()]
    if not pipelines or any(s not in PIPELINES for s in pipelines):
        raise ArgError(f"--pipeline: expected mfm_fast, official or a comma list of them, got {args.pipeline!r}")
    args.pipeline = ",".join(pipelines)
    from .dispatch import BACKENDS
    for name in ("corrupt_backend", "loss_backend"):
        if getattr(args, name) not in BACKENDS + ("auto",):
            raise ArgError(f"{_flag(name)}: expected auto or one of {', '.join(BACKENDS)}, "
                           f"got {getattr(args, name)!r}")
    if args.data_path is not None and args.synthetic:
        raise ArgError("--synthetic: cannot be combined with --data-path")
    if args.data_path is not None:
        try:
            D.check_data_path(args.data_path)
        except ValueError as exc:
            raise ArgError(str(exc)) from None
    import timm
    if not timm.is_model(args.model):
        raise ArgError(f"--model: {args.model!r} is not a timm model (see timm.list_models())")
    if args.p_low is None:
        args.p_low = preset_p_low if (preset_p_low is not None and args.model == preset_model) else None
    if args.p_low is not None and not 0 <= args.p_low <= 1:
        raise ArgError(f"--p-low: must be in [0, 1], got {args.p_low}")
    pf = args.mask_patch_factor
    if pf < 1 or args.img_size % pf or (args.img_size // pf) % 2:
        raise ArgError(f"--mask-patch-factor: must be >= 1 and divide --img-size {args.img_size} into even patch "
                       f"sides, got {pf}")
    if args.bands is not None and (args.r1 is not None or args.r2 != 999):
        raise ArgError("--bands: replaces --r1 / --r2; give either the rings or the radii")
    if args.r1 is None:
        args.r1 = 16 * args.img_size / pf / 224
    resolve_method_args(args)
    if not 0 <= args.r1 < args.r2:
        raise ArgError(f"--r1: must be >= 0 and < --r2 = {args.r2}, got {args.r1}")
    if args.stop_at is not None and args.steps is not None and args.stop_at > args.steps:
        raise ArgError(f"--stop-at: {args.stop_at} is past the last step (--steps {args.steps})")
    check_with_library(args)
    return args


# library argument name -> the flag that feeds it (library messages are reused, prefixed by the flag)
LIBRARY_FLAGS = {"loss_gamma": "--loss-gamma", "r1": "--r1", "r2": "--r2", "p_low": "--p-low", "bands": "--bands",
                 "radius_jitter": "--radius-jitter", "patch_factor": "--mask-patch-factor",
                 "phase_weight": "--phase-weight", "distance": "--distance", "keep_ratio": "--keep-ratio",
                 "p_com": "--p-com", "backend": "--loss-backend"}


def library_error(exc: Exception, flags: Dict[str, str]) -> ArgError:
    """A library ValueError / TypeError ("name: what is wrong") as an ArgError of the flag that fed `name`
    (re-raises it when no flag did: then it is a bug, not a bad argument)."""
    msg = str(exc)
    name = msg.split(":", 1)[0].strip()
    base = name.split("[", 1)[0].split(" ", 1)[0]
    if base not in flags:
        raise exc
    return ArgError(f"{flags[base]}: {msg.split(':', 1)[1].strip() if name == base else msg}")


def check_with_library(args: argparse.Namespace) -> None:
    """Run the library's own validators on the values the run will pass it (loss options, mask radii on the
    --img-size grid), so that a bad value stops at parse time with the library's message under its flag."""
    from .masks import check_rings, check_rings_on_grid
    for name, v in vars(args).items():
        if isinstance(v, float) and not math.isfinite(v) and name != "r2":
            raise ArgError(f"{_flag(name)}: must be finite, got {v}")
    try:
        MaskedFreqLoss(loss_gamma=args.loss_gamma, distance=args.distance, phase_weight=args.phase_weight,
                       patch_factor=args.mask_patch_factor, normalize_target=True)
        if args.task == "mfm" and args.mask == "disc":
            side = args.img_size // args.mask_patch_factor
            rings = check_rings(16, 999, args.bands) if args.bands is not None else check_rings(args.r1, args.r2, None)
            check_rings_on_grid(rings, side, side, args.bands is not None)
    except (ValueError, TypeError) as exc:
        raise library_error(exc, LIBRARY_FLAGS) from None


def resolve_method_args(args: argparse.Namespace) -> None:
    """Check --method / --mask / FOLK values in place; raises ArgError naming the flag."""
    if args.method not in METHODS:
        raise ArgError(f"--method: expected mfm, folk or a comma list of them, got {args.method!r}")
    if args.mask is None:
        args.mask = "adaptive" if args.method == "folk" else "disc"
    if args.method == "folk" and args.task != "mfm":
        raise ArgError(f"--method: folk reconstructs masked frequencies; it cannot be combined with --task {args.task}")
    if not 0 < args.keep_ratio < 1:
        raise ArgError(f"--keep-ratio: must be in (0, 1), got {args.keep_ratio}")
    for name in ("p_com", "jitter_p", "grey_p", "center_momentum", "momentum_teacher"):
        if not 0 <= getattr(args, name) <= 1:
            raise ArgError(f"{_flag(name)}: must be in [0, 1], got {getattr(args, name)}")
    if args.bands is not None:
        rings = []
        for text in args.bands:
            try:
                r1, r2 = (float(v) for v in str(text).split(","))
            except ValueError:
                raise ArgError(f"--bands: expected rings R1,R2 (e.g. 4,8 16,999), got {text!r}") from None
            if not (0 <= r1 < r2 and math.isfinite(r1)):
                raise ArgError(f"--bands: each ring needs 0 <= r1 < r2, got {text!r}")
            rings.append((r1, r2))
        args.bands = rings
    for name in ("student_temp", "teacher_temp", "warmup_teacher_temp"):
        if not getattr(args, name) > 0:
            raise ArgError(f"{_flag(name)}: must be > 0, got {getattr(args, name)}")
    if args.mask == "adaptive" and (args.bands is not None or args.radius_jitter or args.mask_patch_factor > 1):
        raise ArgError("--mask: adaptive masks take no --bands / --radius-jitter / --mask-patch-factor (disc only)")
    if args.mask == "adaptive" and args.task != "mfm":
        raise ArgError(f"--mask: adaptive masks are for --task mfm, not {args.task}")
    if "official" in args.pipeline.split(","):
        custom = args.method != "mfm" or args.mask != "disc" or args.bands is not None or args.radius_jitter or \
            args.mask_patch_factor > 1 or args.distance != "complex"
        if custom:
            raise ArgError("--pipeline: official replicates the released MFM code only (--method mfm, disc masks "
                           "without --bands / --radius-jitter / --mask-patch-factor, --distance complex)")


# ---- model ----------------------------------------------------------------------------------------

class MFMModel(nn.Module):
    """timm encoder + MFMHead: corrupted normalised images (N, 3, S, S) -> prediction (N, 3, S, S)."""

    def __init__(self, encoder: nn.Module, head: MFMHead):
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder.forward_features(x))


def create_encoder(name: str, img_size: int, drop_path: float = 0.0) -> nn.Module:
    """timm.create_model(name, pretrained=False, num_classes=0, img_size=...) (img_size only where accepted)."""
    import timm
    kwargs = dict(pretrained=False, num_classes=0)
    if drop_path:
        kwargs["drop_path_rate"] = drop_path
    try:
        return timm.create_model(name, img_size=img_size, **kwargs)
    except TypeError as exc:
        if "img_size" not in str(exc):
            raise
        return timm.create_model(name, **kwargs)


def is_vit(encoder: nn.Module) -> bool:
    return hasattr(encoder, "patch_embed") and hasattr(encoder, "num_prefix_tokens")


def prediction(out) -> torch.Tensor:
    """The MFM prediction from a model output: MFMModel returns it, FOLKModel returns (prediction, logits)."""
    return out[0] if isinstance(out, tuple) else out


def build_model(args) -> nn.Module:
    """Encoder + head (stride = patch size for ViTs, the feature reduction, 32 for ResNets); checks the output size.

    --method folk adds the DINO projection head on the pooled features (mfm_fast.folk.FOLKModel)."""
    encoder = create_encoder(args.model, args.img_size, args.drop_path)
    if getattr(args, "method", "mfm") == "folk":
        from .folk import DINOHead, FOLKModel
        dino = DINOHead(encoder.num_features, args.dino_out_dim, args.dino_hidden_dim, args.dino_bottleneck_dim,
                        args.dino_layers, norm_last_layer=not args.no_norm_last_layer)
        net = FOLKModel(encoder, MFMHead.for_timm_model(encoder), dino)
    else:
        net = MFMModel(encoder, MFMHead.for_timm_model(encoder))
    was_training = net.training
    net.eval()
    with torch.no_grad():
        try:
            out = prediction(net(torch.zeros(1, 3, args.img_size, args.img_size)))
        except Exception as exc:
            raise ArgError(f"--img-size: {args.model} cannot take {args.img_size} px images ({type(exc).__name__}: "
                           f"{exc})") from None
    net.train(was_training)
    if tuple(out.shape) != (1, 3, args.img_size, args.img_size):
        raise ArgError(f"--img-size: {args.model} + MFMHead(stride {net.head.stride}) predicts "
                       f"{tuple(out.shape[-2:])} images from {args.img_size} px inputs; use a multiple of "
                       f"{net.head.stride}")
    return net


def freeze_unused(net: nn.Module, img_size: int) -> list:
    """Freeze parameters that the model's forward never uses (e.g. a classifier's norm), so DDP needs no
    find_unused_parameters; returns their names."""
    net.eval()
    out = net(torch.zeros(2, 3, img_size, img_size, device=next(net.parameters()).device))
    sum(o.float().sum() for o in (out if isinstance(out, tuple) else (out,))).backward()
    unused = [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None]
    for n, p in net.named_parameters():
        p.grad = None
        if n in unused:
            p.requires_grad_(False)
    net.train()
    return unused


def param_groups(net: nn.Module, weight_decay: float):
    """AdamW groups: decay on >= 2-D weights; none on 1-D params, biases, pos_embed, cls_token (and the
    encoder's no_weight_decay())."""
    skip = set(getattr(net.encoder, "no_weight_decay", lambda: set())())
    decay, no_decay = [], []
    for name, p in net.named_parameters():
        if not p.requires_grad:
            continue
        short = name.split(".", 1)[1] if name.startswith("encoder.") else name
        if p.ndim <= 1 or name.endswith(".bias") or short in skip or short in ("pos_embed", "cls_token"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(net: nn.Module, args) -> torch.optim.Optimizer:
    """AdamW(betas, eps 1e-8), fused when the device supports it (then NaN steps are skipped on the device)."""
    groups = param_groups(net, args.weight_decay)
    try:
        return torch.optim.AdamW(groups, lr=0.0, betas=tuple(args.betas), eps=1e-8, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(groups, lr=0.0, betas=tuple(args.betas), eps=1e-8)


def lr_at(step: int, sched: Dict[str, float]) -> float:
    """Learning rate of optimiser step `step` (0-based), as timm's CosineLRScheduler in the released code:
    warmup_lr + step (lr - warmup_lr) / warmup for step < warmup, else
    min_lr + (lr - min_lr) (1 + cos(pi step / total)) / 2 (the cosine spans the whole run)."""
    if step < sched["warmup"]:
        return sched["warmup_lr"] + step * (sched["lr"] - sched["warmup_lr"]) / sched["warmup"]
    return sched["min_lr"] + 0.5 * (sched["lr"] - sched["min_lr"]) * (1 + math.cos(math.pi * step / sched["total"]))


# ---- corruption of a batch (on the device) --------------------------------------------------------

def degrade(x: torch.Tensor, args, gen: torch.Generator) -> torch.Tensor:
    """Restoration input from clean x (N, 3, H, W) in [0, 1] (MFM_SPEC.md §5; not normalised).

    sr: bicubic to (H/f, W/f), clamp, bicubic back, clamp. deblur: per image an isotropic Gaussian
    (sigma, kernel size drawn from --blur-sizes) with reflect-101 borders (cv2.filter2D's). denoise:
    x + N(0, (sigma / 255)^2) per pixel and channel, no clamp."""
    n, c, h, w = x.shape
    if args.task == "sr":
        f = args.sr_factor
        down = F.interpolate(x, size=(h // f, w // f), mode="bicubic", align_corners=False).clamp(0, 1)
        return F.interpolate(down, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)
    if args.task == "denoise":
        return x + torch.randn(x.shape, generator=gen, device=x.device) * (args.noise_sigma / 255.0)
    sizes = torch.tensor(args.blur_sizes, device=x.device)
    half = sizes[torch.randint(len(args.blur_sizes), (n,), generator=gen, device=x.device)] // 2  # (N,)
    k = max(args.blur_sizes) // 2
    r = torch.arange(-k, k + 1, device=x.device, dtype=x.dtype)
    gauss = torch.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * args.blur_sigma ** 2))
    inside = (r.abs()[None, :, None] <= half[:, None, None]) & (r.abs()[None, None, :] <= half[:, None, None])
    kernel = gauss * inside
    kernel = (kernel / kernel.sum((1, 2), keepdim=True)).repeat_interleave(c, 0)[:, None]  # (N*C, 1, K, K)
    padded = F.pad(x.reshape(1, n * c, h, w), (k, k, k, k), mode="reflect")
    return F.conv2d(padded, kernel, groups=n * c).reshape(n, c, h, w)


class Corruptor:
    """uint8 batch (N, 3, S, S) on the device -> (encoder input, loss target, keep mask or None).

    Masks / blur sizes / noise come from a private generator on the device (seed), saved in checkpoints.
    mfm_fast pipeline: FrequencyCorruption straight from uint8 and the uint8 target normalised inside
    MaskedFreqLoss. official: the released code's op sequence (mfm_fast._official) on float pixels."""

    def __init__(self, args, device: torch.device, seed: int):
        self.args, self.device = args, device
        self.gen = torch.Generator(device).manual_seed(seed)
        self.official = args.pipeline == "official"
        self.adaptive = getattr(args, "mask", "disc") == "adaptive"  # (older checkpoints lack the new options)
        # adaptive masks have reference and torch backends only; "auto" picks torch for the others
        self.mask_backend = args.corrupt_backend if args.corrupt_backend in ("reference", "torch") else "auto"
        self.pf, self.bands = getattr(args, "mask_patch_factor", 1), getattr(args, "bands", None)
        radii = {"bands": self.bands} if self.bands is not None else {"r1": args.r1, "r2": args.r2}
        self.corruption = FrequencyCorruption(p_low=args.p_low if args.p_low is not None else 0.5,
                                              radius_jitter=getattr(args, "radius_jitter", 0.0),
                                              patch_factor=self.pf, backend=args.corrupt_backend, **radii)
        mfm = args.task == "mfm"
        distance = getattr(args, "distance", "complex")
        loss_options = {"distance": distance, "phase_weight": args.phase_weight} if distance != "complex" else {}
        self.criterion = MaskedFreqLoss(loss_gamma=args.loss_gamma, reduction="masked" if mfm else "mean",
                                        normalize_target=True, backend=args.loss_backend, patch_factor=self.pf,
                                        **loss_options)

    def __call__(self, x: torch.Tensor, low: Optional[torch.Tensor] = None):
        """x uint8 (N, 3, S, S) -> (encoder input, loss target, keep mask or None). For the masks, ``low`` (bool
        (N,)) forces low-pass (disc) or Com (adaptive) per image."""
        a = self.args
        if a.task == "mfm":
            n, _, h, w = x.shape
            if self.adaptive:
                com = low if a.adaptive_mode == "mixed" else None  # com / rcom modes fix the choice
                mask = make_adaptive_masks(x, a.adaptive_mode, a.keep_ratio, p_com=a.p_com, com=com,
                                           generator=self.gen, backend=self.mask_backend)
                return corrupt(x, mask, backend=a.corrupt_backend), x, mask
            if not self.official:
                inp, mask = self.corruption(x, low=low, generator=self.gen)
                return inp, x, mask
            mask = make_masks(n, h, w, a.r1, a.r2, self.corruption.p_low, low=low, generator=self.gen,
                              device=x.device)
            x01 = x.float() / 255
            from . import _official  # the released code's op sequence: the --pipeline official baseline only
            return _official.corrupt(x01, mask), x01, mask
        x01 = x.float() / 255
        return imagenet_normalize(degrade(x01, a, self.gen)), (x01 if self.official else x), None

    def labels(self, low: torch.Tensor) -> Optional[list]:
        """Picture row names for masks forced by ``low`` (bool (N,)); None: the picture's own low/high-pass guess."""
        a = self.args
        if a.task != "mfm":
            return None
        if self.adaptive:
            names = {"com": ["Com"], "rcom": ["RCom"]}.get(a.adaptive_mode) or ["Com", "RCom"]
            kinds = [names[0] if (len(names) == 1 or bool(b)) else names[1] for b in low.tolist()]
            return [f"{k}, keep_ratio {a.keep_ratio:g}" for k in kinds]
        if self.bands is None and self.pf == 1 and disc_band(a.img_size, a.img_size, a.r1, a.r2) is not None:
            return None  # MFM discs (the ring reaches the corners): low-pass keeps DC, high-pass removes it
        where = f" ({self.pf}x{self.pf} patches)" if self.pf > 1 else ""
        return [("rings removed" if bool(b) else "rings kept") + where for b in low.tolist()]

    def loss(self, pred: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        if self.official:
            from . import _official  # the --pipeline official baseline only
            return _official.loss(pred, target, mask, self.args.loss_gamma)
        return self.criterion(pred, target, mask)


# ---- data --------------------------------------------------------------------------------------------

def build_dataset(args, seed: int):
    transform = D.MFMTransform(args.img_size, scale=(args.min_crop_scale, 1.0))
    if args.method == "folk":
        transform = D.TwoViews(transform, jitter=args.color_jitter, p_jitter=args.jitter_p, p_grey=args.grey_p)
    if args.data_path is not None:
        return D.FolderImages(args.data_path, transform, seed=seed, count_skips=True)
    return D.PhotoCrops(args.img_size, split="train", length=args.samples_per_epoch, seed=seed, transform=transform)


def sample_images(args, num: int, seed: int = 0, data_path: Optional[str] = None) -> torch.Tensor:
    """`num` fixed uint8 images (N, 3, S, S) for pictures: held-out photo crops, or the first images of data_path."""
    if data_path is None and args.data_path is None and args.synthetic:
        return torch.randint(0, 256, (num, 3, args.img_size, args.img_size), dtype=torch.uint8,
                             generator=torch.Generator().manual_seed(seed))
    path = data_path if data_path is not None else args.data_path
    if path is not None:
        ds = D.FolderImages(D.check_data_path(path), D.CenterCrop(args.img_size), seed=seed)
        idx = torch.linspace(0, len(ds) - 1, num).round().long().tolist()
    else:
        ds = D.PhotoCrops(args.img_size, split="val", length=num, seed=seed, transform=D.SquareCrops(args.img_size))
        idx = list(range(num))
    return torch.stack([ds[i][0] for i in idx])


@torch.no_grad()
def render(net: nn.Module, corruptor: Corruptor, x: torch.Tensor, path, title: Optional[str] = None,
           amp_dtype: Optional[torch.dtype] = None):
    """Corrupt x (masks alternate low / high-pass, or Com / RCom), reconstruct, write the PNG grid (mfm_fast.visualize)."""
    from .visualize import save_grid
    low = torch.arange(x.shape[0], device=x.device) % 2 == 0
    state = corruptor.gen.get_state()
    inp, _, mask = corruptor(x, low=low)
    corruptor.gen.set_state(state)  # pictures must not shift the training's random stream
    was_training = net.training
    net.eval()
    with torch.autocast(x.device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
        pred = prediction(net(inp))
    net.train(was_training)
    return save_grid(path, x, inp, pred.float(), mask, title=title, row_labels=corruptor.labels(low),
                     patch_factor=corruptor.pf)


# ---- runtime helpers ----------------------------------------------------------------------------------

def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ArgError("--device: cuda was asked for but torch.cuda.is_available() is False")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def init_distributed(args):
    """(rank, world_size, device). Under torchrun (WORLD_SIZE > 1) joins the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(args.device)
    if world <= 1:
        return 0, 1, device
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    backend = args.dist_backend if args.dist_backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return rank, world, device


def save_checkpoint(state: dict, path) -> Path:
    """torch.save to a temporary file in the same folder, fsync, then os.replace: a crash at any moment
    leaves either the previous checkpoint or the new one, never a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):  # left by a process killed mid-write
        stale.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    with contextlib.suppress(OSError):  # persist the rename itself
        fd = os.open(path.parent, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    return path


def load_checkpoint(path) -> dict:
    """torch.load(weights_only=True) of a pretrain checkpoint (tensors, numbers, strings only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def check_checkpoint(path, flag: str, **expected) -> dict:
    """The ``args`` of the pretrain checkpoint at `path`, checked before any weight is loaded; ArgError naming
    `flag` otherwise: no such file, unreadable (truncated, not a torch file), the encoder.pth state dict (timm
    weights only) instead of checkpoint.pth, or saved arguments that differ from ``expected`` (model,
    img_size, method, task: name -> value, None = any). Reads the pickle only (mmap), not the tensors."""
    p = Path(path)
    if not p.is_file():
        raise ArgError(f"{flag}: no such checkpoint {str(path)!r} (expected a checkpoint.pth written by "
                       "python -m mfm_fast.pretrain)")
    if not zipfile.is_zipfile(p):
        raise ArgError(f"{flag}: {path} is not a torch checkpoint file (not a complete zip archive: truncated, or "
                       "another kind of file); expected a checkpoint.pth written by python -m mfm_fast.pretrain")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # a damaged archive, a foreign pickle: all one line
        why = (str(exc).strip().splitlines() or [""])[0].split(". ")[0][:160]
        raise ArgError(f"{flag}: {path} is not a readable checkpoint ({type(exc).__name__}: {why}); expected a "
                       "complete checkpoint.pth written by python -m mfm_fast.pretrain") from None
    if isinstance(ckpt, dict) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise ArgError(f"{flag}: {path} is a state dict of weights only (the encoder.pth that pretrain writes for "
                       f"timm), not a run checkpoint; use {p.parent / CHECKPOINT_NAME} from the same run")
    if not isinstance(ckpt, dict) or not {"model", "args", "step"} <= set(ckpt) or not isinstance(ckpt["args"], dict):
        raise ArgError(f"{flag}: {path} is not a pretrain checkpoint (no model / args / step entries); expected a "
                       "checkpoint.pth written by python -m mfm_fast.pretrain")
    saved = ckpt["args"]
    defaults = {"method": "mfm", "task": "mfm"}
    for name, want in expected.items():
        have = saved.get(name, defaults.get(name))
        if want is not None and have != want:
            raise ArgError(f"{flag}: {path} is a checkpoint of {_flag(name)} {have}, not {_flag(name)} {want}; pass "
                           f"{_flag(name)} {have} to use it, or a checkpoint of a {_flag(name)} {want} run")
    return dict(saved, step=ckpt["step"], has_distiller="distiller" in ckpt)


def trim_log(path: Path, step: int) -> None:
    """Rewrite log.jsonl atomically (temporary file + os.replace) as an uninterrupted run would have it at
    `step`: records of later steps, "end" records of earlier segments and a torn last line are dropped."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line torn by a kill mid-write
            continue
        if record.get("event") == "end" or record.get("step", 0) > step:
            continue
        kept.append(line + "\n")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def plan_output(args) -> Optional[str]:
    """The checkpoint to resume from (None: a fresh start), after checking it and the output folder.

    A fresh run into a folder that holds an earlier run's checkpoint.pth or log.jsonl stops (ArgError naming
    --resume auto and --overwrite) unless --overwrite is given."""
    out_dir = Path(args.output_dir)
    ckpt_path, log_path = out_dir / CHECKPOINT_NAME, out_dir / "log.jsonl"
    if out_dir.exists() and not out_dir.is_dir():
        raise ArgError(f"--output-dir: {args.output_dir!r} is a file, not a folder")
    resume = args.resume
    if resume == "auto":
        resume = str(ckpt_path) if ckpt_path.exists() else None
    if resume is not None:
        check_checkpoint(resume, "--resume", model=args.model, img_size=args.img_size, method=args.method,
                         task=args.task)
    earlier = [f.name for f in (ckpt_path, log_path) if f.exists() and f.stat().st_size > 0]
    same = resume is not None and Path(resume).resolve() == ckpt_path.resolve()
    if earlier and not same and not args.overwrite and args.resume != "auto":
        raise ArgError(f"--output-dir: {out_dir} already holds an earlier run ({', '.join(earlier)}); pass "
                       "--resume auto to continue it, --overwrite to replace it, or another --output-dir")
    return resume


def rng_state(mask_gen: torch.Generator) -> dict:
    """Every random stream of this process, in a weights_only-loadable form."""
    np_state, py_state = np.random.get_state(), random.getstate()
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "mask": mask_gen.get_state(), "python": [list(py_state[1]), py_state[2]],
            "numpy": [torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                      float(np_state[4])]}


def set_rng_state(state: dict, mask_gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    mask_gen.set_state(state["mask"])
    random.setstate((3, tuple(state["python"][0]), state["python"][1]))
    keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))


def fingerprint(net: nn.Module) -> str:
    """SHA-256 of every parameter's bytes: equal on all ranks iff the weights are identical (buffers such as
    BatchNorm running statistics are rank-local under DDP and left out)."""
    h = hashlib.sha256()
    for name, t in net.named_parameters():
        h.update(name.encode())
        h.update(t.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())  # logical order, any layout
    return h.hexdigest()


def gather(obj, world: int) -> list:
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def amp_dtype_of(args, device: torch.device) -> Optional[torch.dtype]:
    name = args.amp if args.amp != "auto" else ("bf16" if device.type == "cuda" else "none")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[name]


# ---- the loop ----------------------------------------------------------------------------------------

def make_distiller(net: nn.Module, args, sched: dict, batches_per_epoch: int) -> SelfDistillation:
    """--method folk: the EMA teacher and DINO loss, with epoch-valued options converted to optimiser steps."""
    steps_per_epoch = max(1, batches_per_epoch // args.accum_iter)
    return SelfDistillation(net, sched["total"], momentum_teacher=args.momentum_teacher,
                            student_temp=args.student_temp, teacher_temp=args.teacher_temp,
                            warmup_teacher_temp=args.warmup_teacher_temp,
                            warmup_teacher_temp_steps=int(round(args.warmup_teacher_temp_epochs * steps_per_epoch)),
                            center_momentum=args.center_momentum,
                            freeze_last_layer_steps=int(round(args.freeze_last_layer * steps_per_epoch)))


def train(args) -> dict:
    """Pre-train as `args` (from get_args_parser) say; returns the run's statistics (see the end)."""
    args = resolve_args(args)
    if "," in args.pipeline or "," in str(args.method):
        raise ArgError(f"--{'pipeline' if ',' in args.pipeline else 'method'}: train() runs one; main() runs a comma "
                       "list in turn")
    if args.threads:
        torch.set_num_threads(args.threads)
    resume = plan_output(args)
    rank, world, device = init_distributed(args)
    for flag, op in (("--corrupt-backend", "corrupt"), ("--loss-backend", "masked_freq_loss")):
        name = getattr(args, flag[2:].replace("-", "_"))
        why = None if name == "auto" or args.pipeline == "official" else backend_unavailable_reason(
            name, device.type, op, (3, args.img_size // args.mask_patch_factor, args.img_size // args.mask_patch_factor))
        if why is not None:
            raise ArgError(f"{flag}: {name} cannot run on --device {device.type} ({why})")
    try:
        return _train(args, rank, world, device, resume)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


class Batches:
    """Endless per-process uint8 batches (B, 3, S, S) ((B, 2, 3, S, S) view pairs for --method folk) on the device,
    resumable at (epoch, batch_in_epoch).

    Data: --synthetic (one random batch made on the device), --data-path (ImageFolder) or the built-in
    photo crops; a seeded DistributedSampler shards and shuffles each epoch; batches are counted before
    they are handed out, so a checkpoint taken after a step resumes with the next batch."""

    def __init__(self, args, rank: int, world: int, device: torch.device):
        self.args, self.device, self.epoch, self.batch_in_epoch = args, device, 0, 0
        self.unreadable = 0  # image reads skipped (unreadable files; FolderImages warns per file)
        if args.synthetic:
            views = (2,) if args.method == "folk" else ()
            self.fixed = torch.randint(0, 256, (args.batch_size, *views, 3, args.img_size, args.img_size), dtype=torch.uint8,
                                       generator=torch.Generator(device).manual_seed(args.seed + rank), device=device)
            self.per_epoch = max(1, args.samples_per_epoch // (args.batch_size * world))
            return
        try:
            self.dataset = build_dataset(args, args.seed)
        except ValueError as exc:  # an --data-path without images
            raise ArgError(str(exc)) from None
        self.sampler = D.ResumableSampler(self.dataset, num_replicas=world, rank=rank, shuffle=True, seed=args.seed,
                                          drop_last=True)
        self.loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=args.batch_size, sampler=self.sampler, num_workers=args.num_workers,
            drop_last=True, pin_memory=device.type == "cuda" and not args.no_pin_memory,
            generator=torch.Generator().manual_seed(args.seed))  # keeps the global RNG untouched
        self.per_epoch = len(self.sampler) // args.batch_size
        if self.per_epoch == 0:
            raise ArgError(f"--batch-size: {args.batch_size} x {world} processes is more than the "
                           f"{len(self.dataset)} images of an epoch")

    def __iter__(self):
        while True:
            if self.args.synthetic:
                for _ in range(self.per_epoch - self.batch_in_epoch):
                    self.batch_in_epoch += 1
                    yield self.fixed
            else:
                self.sampler.set_epoch(self.epoch)
                self.dataset.set_epoch(self.epoch)
                self.sampler.start = self.batch_in_epoch * self.args.batch_size
                for x, _, *skips in self.loader:
                    if skips:  # FolderImages(count_skips=True): unreadable files passed over for each item
                        self.unreadable += int(skips[0].sum())
                    self.batch_in_epoch += 1
                    yield x.to(self.device, non_blocking=True)
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0


def make_schedule(args, batches_per_epoch: int, total_batch: int) -> dict:
    """Peak / warm-up / final lr (given per 512 images, scaled by total_batch / 512), warm-up and total steps."""
    total = args.steps or args.epochs * batches_per_epoch // args.accum_iter
    if args.warmup_steps is not None:
        warmup = args.warmup_steps
    elif args.steps:  # keep the recipe's warm-up fraction
        warmup = int(round(total * args.warmup_epochs / args.epochs))
    else:
        warmup = int(args.warmup_epochs * batches_per_epoch // args.accum_iter)
    scale = total_batch / 512
    return {"lr": args.lr if args.lr is not None else args.blr * scale, "warmup_lr": args.warmup_lr * scale,
            "min_lr": args.min_lr * scale, "warmup": warmup, "total": total}


def optimizer_step(net: nn.Module, optimizer, scaler, step_loss: torch.Tensor, args, world: int):
    """Clip, then step unless the loss or gradient is non-finite, deciding on the device: the fused AdamW
    kernel reads `found_inf` (as with a GradScaler) and skips the whole update. Returns (bad, grad norm)."""
    if scaler.is_enabled():
        scaler.unscale_(optimizer)
    params = [p for p in net.parameters() if p.grad is not None]
    if args.clip_grad > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.clip_grad)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    bad = ~torch.isfinite(step_loss)
    if not scaler.is_enabled():  # with fp16 an inf gradient is the scaler's business
        bad |= ~torch.isfinite(grad_norm)
    if world > 1:
        bad_f = bad.float()
        dist.all_reduce(bad_f, op=dist.ReduceOp.MAX)  # the same decision on every rank
        bad = bad_f > 0
    if scaler.is_enabled():
        scaler.step(optimizer)
        scaler.update()
    elif optimizer.defaults.get("fused"):
        optimizer.found_inf = bad.float()
        optimizer.step()
        del optimizer.found_inf
    elif not bool(bad):  # fallback without a fused AdamW: one host sync per step
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return bad, grad_norm


def _fmt(value: Optional[float], spec: str) -> str:
    """A logged mean for the progress line: "none" when no step of the interval was finite."""
    return "none" if value is None else format(value, spec)


def _train(args, rank: int, world: int, device: torch.device, resume: Optional[str]) -> dict:
    is_main = rank == 0
    out_dir, ckpt_path = Path(args.output_dir), Path(args.output_dir) / CHECKPOINT_NAME
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if resume is None:  # a fresh start (plan_output allowed it): no earlier checkpoint may be resumed later
            for old in (ckpt_path, out_dir / "encoder.pth"):
                old.unlink(missing_ok=True)
    torch.manual_seed(args.seed)  # identical initial weights on every rank (DDP also broadcasts them)
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    # data
    batches = Batches(args, rank, world, device)
    total_batch = args.batch_size * args.accum_iter * world

    # model: encoder + head, then DDP, then torch.compile
    net = build_model(args).to(device)
    if args.p_low is None:
        args.p_low = 0.5 if is_vit(net.encoder) else 0.3
    frozen = freeze_unused(net, args.img_size)
    if args.channels_last:
        net = net.to(memory_format=torch.channels_last)
    ddp_model = nn.parallel.DistributedDataParallel(
        net, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else net
    model = torch.compile(ddp_model) if args.compile else ddp_model

    # optimiser, schedule, corruption + loss
    optimizer = make_optimizer(net, args)
    amp_dtype = amp_dtype_of(args, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    sched = make_schedule(args, batches.per_epoch, total_batch)
    corruptor = Corruptor(args, device, seed=args.seed + rank)
    folk = args.method == "folk"
    distiller = make_distiller(net, args, sched, batches.per_epoch) if folk else None

    # resume: weights, optimiser, scaler, schedule, step, data position, every random stream
    step = 0
    if resume is not None:  # checked by plan_output: a full checkpoint of this model, size, method and task
        ckpt = load_checkpoint(resume)
        net.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if folk:
            if "distiller" not in ckpt:
                raise ArgError(f"--resume: {resume} is not a --method folk checkpoint (no teacher)")
            distiller.load_state_dict(ckpt["distiller"])
        if ckpt["scaler"]:
            scaler.load_state_dict(ckpt["scaler"])
        if ckpt["schedule"] != sched and is_main:
            print(f"pretrain: --resume: continuing the checkpoint's schedule {ckpt['schedule']} "
                  f"(these arguments give {sched})", file=sys.stderr)
        sched, step = ckpt["schedule"], ckpt["step"]
        batches.epoch, batches.batch_in_epoch = ckpt["epoch"], ckpt["batch_in_epoch"]
        if ckpt["world_size"] == world:
            set_rng_state(ckpt["rng"][rank], corruptor.gen)
        elif is_main:
            print(f"pretrain: --resume: the checkpoint ran on {ckpt['world_size']} processes, this run on {world}: "
                  "weights, optimiser and schedule continue, data order and masks do not", file=sys.stderr)
        del ckpt
    start_step, end_step = step, min(sched["total"], args.stop_at or sched["total"])

    def checkpoint() -> None:  # collective: every rank hands in its random streams
        rngs = gather(rng_state(corruptor.gen), world)
        if is_main:
            save_checkpoint({"model": net.state_dict(), "optimizer": optimizer.state_dict(),
                             "scaler": scaler.state_dict() if scaler.is_enabled() else None, "step": step,
                             "epoch": batches.epoch, "batch_in_epoch": batches.batch_in_epoch, "schedule": sched,
                             "args": vars(args), "rng": rngs, "world_size": world, "format": 1,
                             **({"distiller": distiller.state_dict()} if folk else {})}, ckpt_path)

    if is_main and resume is not None:
        trim_log(out_dir / "log.jsonl", step)
    log_file = open(out_dir / "log.jsonl", "a" if resume is not None else "w") if is_main else None

    def log(record: dict) -> None:
        if log_file:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()

    log({"event": "resume" if resume is not None else "start", "step": step, "world_size": world, "total_batch": total_batch, "schedule": sched,
         "params": sum(p.numel() for p in net.parameters()), "frozen_unused": frozen, "device": str(device),
         "fused_adamw": bool(optimizer.defaults.get("fused")), "args": vars(args)})
    vis_x = sample_images(args, args.vis_num, seed=args.seed).to(device) if (is_main and args.vis_num) else None

    def picture() -> None:
        if vis_x is not None:
            render(net, corruptor, vis_x, out_dir / "vis" / f"step_{step:07d}.png", amp_dtype=amp_dtype,
                   title=f"{args.model}, {'method folk' if folk else 'task ' + args.task}, step {step}")

    # on-device running sums, read only at log steps (the loop's only host syncs)
    zero = torch.zeros((), device=device)
    loss_sum, good_steps, skipped, first_bad = zero.clone(), zero.clone(), zero.clone(), zero - 1
    parts_sum = zero.new_zeros(3)  # --method folk: reconstruction and distillation losses, the latter's KL part

    def check_finite_so_far() -> None:
        bad = int(first_bad.item())
        if bad >= 0 and not args.skip_nonfinite:
            last = f"; {ckpt_path} holds the last good checkpoint" if ckpt_path.exists() else ""
            raise NonFiniteLoss(f"non-finite loss or gradient at step {bad + 1} (the weights were not updated "
                                f"by it{last}). Lower --blr / --lr, keep --clip-grad, use --amp bf16 rather than "
                                "fp16, check the data, or pass --skip-nonfinite to skip such steps.")

    def sync() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    from tqdm import tqdm
    bar = tqdm(total=end_step, initial=step, desc="pretrain", dynamic_ncols=True,
               disable=not is_main or args.no_progress)
    history, t_log, steps_at_log = [], time.perf_counter(), step
    timing_warmup = min(args.timing_warmup, max(end_step - start_step - 1, 0))
    timed_from = (sync(), step) if timing_warmup == 0 else None  # images/s counts from here
    stream = iter(batches)
    model.train()
    while step < end_step:
        # forward + backward over accum_iter micro-batches
        step_loss, part_sum_step = zero.clone(), parts_sum.new_zeros(3)
        for micro in range(args.accum_iter):
            x = next(stream)
            if args.overfit_batch:
                corruptor.gen.manual_seed(args.seed + rank)  # the same masks every step
                stream = itertools.repeat(x)
            if folk:  # (B, 2, 3, S, S) -> the 2B views [u; v]: the student sees them filtered, the teacher clean
                x = x.transpose(0, 1).reshape(-1, *x.shape[2:])
            inp, target, mask = corruptor(x)
            if args.channels_last:
                inp = inp.contiguous(memory_format=torch.channels_last)
            no_sync = world > 1 and micro < args.accum_iter - 1
            autocast = torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None)
            with ddp_model.no_sync() if no_sync else contextlib.nullcontext():
                with autocast:
                    out = model(inp)
                loss = corruptor.loss(prediction(out), target, mask)
                if folk:
                    clean = imagenet_normalize(x.float() / 255)
                    with autocast:
                        teacher_logits = distiller.teacher_logits(
                            clean.contiguous(memory_format=torch.channels_last) if args.channels_last else clean)
                    distill = distiller(out[1], teacher_logits, step)
                    parts = torch.stack([loss.detach(), distill.detach(), distiller.loss.last_kl])
                    part_sum_step += parts / args.accum_iter
                    loss = args.rec_weight * loss + args.distill_weight * distill
                scaler.scale(loss / args.accum_iter).backward()
            step_loss += loss.detach() / args.accum_iter

        # optimiser step at the scheduled lr (skipped on the device if non-finite)
        lr = lr_at(step, sched)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if folk:
            distiller.cancel_last_layer_grads(step)
        bad, grad_norm = optimizer_step(net, optimizer, scaler, step_loss, args, world)
        if folk:
            distiller.update_teacher(step)
            parts_sum += torch.where(bad, zero, part_sum_step)
        first_bad = torch.where(bad & (first_bad < 0), float(step), first_bad)
        loss_sum += torch.where(bad, zero, step_loss)
        good_steps += (~bad).float()
        skipped += bad.float()
        step += 1
        bar.update(1)

        if timed_from is None and step - start_step == timing_warmup:
            timed_from = (sync(), step)
        if step % args.log_every == 0 or step == end_step:
            stats = torch.cat([torch.stack([loss_sum, good_steps, skipped, grad_norm.float()]), parts_sum])
            if world > 1:
                dist.all_reduce(stats)
                stats[3] /= world
            loss_total, n_good, n_skipped, gnorm, rec_total, distill_total, kl_total = stats.tolist()  # host sync
            check_finite_so_far()
            now = time.perf_counter()
            ips = (step - steps_at_log) * total_batch / max(now - t_log, 1e-9)
            mean = (lambda total: total / n_good if n_good else None)  # noqa: E731  (no finite step: null)
            record = {"step": step, "epoch": batches.epoch, "loss": mean(loss_total), "lr": lr,
                      "grad_norm": gnorm, "images_per_s": ips, "skipped": int(n_skipped), "time": time.time()}
            if batches.unreadable:
                record["unreadable_skipped"] = batches.unreadable
            if folk:
                record.update(loss_rec=mean(rec_total), loss_distill=mean(distill_total), distill_kl=mean(kl_total),
                              teacher_momentum=teacher_momentum(step - 1, sched["total"], args.momentum_teacher))
            history.append(record)
            log(record)
            bar.set_postfix(loss=_fmt(record["loss"], ".4f"), lr=f"{lr:.2e}", img_s=f"{ips:.0f}")
            if is_main and args.no_progress:
                parts = (f" (rec {_fmt(record['loss_rec'], '.5f')} distill {_fmt(record['loss_distill'], '.5f')})"
                         if folk else "")
                print(f"step {step}/{end_step} loss {_fmt(record['loss'], '.5f')}{parts} lr {lr:.3e} grad_norm {gnorm:.3f} "
                      f"{ips:.1f} img/s" + (f" skipped {int(n_skipped)}" if n_skipped else ""), flush=True)
            loss_sum.zero_()
            parts_sum.zero_()
            good_steps.zero_()
            t_log, steps_at_log = now, step
        if not args.no_checkpoint and step % args.save_every == 0 and step < end_step:
            check_finite_so_far()
            checkpoint()
        if args.vis_every and step % args.vis_every == 0 and step < end_step:
            picture()

    t_end = sync()
    bar.close()
    check_finite_so_far()
    if not args.no_checkpoint and step > start_step:
        checkpoint()
        if is_main:
            save_checkpoint(net.encoder.state_dict(), out_dir / "encoder.pth")  # plain timm weights
    picture()
    fingerprints = gather(fingerprint(net), world)
    teacher_fingerprints = gather(fingerprint(distiller.teacher.module), world) if folk else None

    timed_steps = step - timed_from[1] if timed_from else 0
    seconds = t_end - timed_from[0] if timed_from else float("nan")
    result = {
        "model": args.model, "pipeline": args.pipeline, "method": args.method, "task": args.task,
        "views_per_image": 2 if folk else 1, "device": str(device),
        "world_size": world, "batch_size": args.batch_size, "total_batch": total_batch, "img_size": args.img_size,
        "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "none", "compile": args.compile,
        "channels_last": args.channels_last, "start_step": start_step, "final_step": step,
        "timed_steps": timed_steps,
        "images_per_s": timed_steps * total_batch / seconds if timed_steps else float("nan"),
        "step_ms": 1e3 * seconds / timed_steps if timed_steps else float("nan"),
        "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None,
        "final_loss": history[-1]["loss"] if history else None, "skipped": int(skipped.item()),
        "unreadable_skipped": batches.unreadable,
        "history": history, "rank_fingerprints": fingerprints, "teacher_fingerprints": teacher_fingerprints,
        "checkpoint": str(ckpt_path) if not args.no_checkpoint else None,
    }
    log({"event": "end", **{k: v for k, v in result.items() if k != "history"}})
    if log_file:
        log_file.close()
    return result


def main(argv=None) -> dict:
    """CLI entry: parses argv, runs train() once per (--method, --pipeline) entry, returns the last run's statistics."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    try:
        methods = [m.strip() for m in str(args.method).split(",") if m.strip()] or [""]
        runs = [(m, p) for m in methods
                for p in resolve_args(argparse.Namespace(**{**vars(args), "method": m})).pipeline.split(",")]
        results = []
        for method, pipeline in runs:
            run_args = argparse.Namespace(**{**vars(args), "method": method, "pipeline": pipeline})
            parts = ([method] if len(methods) > 1 else []) + ([pipeline] if len(runs) > len(methods) else [])
            if parts:
                run_args.output_dir = str(Path(args.output_dir, *parts))
            results.append(train(run_args))
    except ArgError as exc:
        parser.error(str(exc))
    except NonFiniteLoss as exc:
        print(f"pretrain: error: {exc}", file=sys.stderr)
        raise SystemExit(1)
    if args.report_throughput and int(os.environ.get("RANK", "0")) == 0:
        base = results[0]["images_per_s"]
        for r in results:
            keys = ("pipeline", "method", "views_per_image", "model", "device", "world_size", "total_batch", "img_size",
                    "amp", "compile", "timed_steps", "images_per_s", "step_ms", "peak_mem_gb", "final_loss")
            print(json.dumps({**{k: r[k] for k in keys}, "speedup_vs_first": r["images_per_s"] / base}))
    return results[-1]


if __name__ == "__main__":
    main(sys.argv[1:])
