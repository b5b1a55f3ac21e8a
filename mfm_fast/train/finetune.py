"""Fine-tuning a timm classifier from an MFM / FOLK pre-trained encoder (the papers' evaluation protocol).

    python -m mfm_fast.finetune --device cpu --model test_vit --img-size 32 --init out/checkpoint.pth --epochs 5
    python -m mfm_fast.finetune --preset vit_base --init mfm_pretrain/checkpoint.pth --data-path /imagenet
    torchrun --nproc_per_node=8 -m mfm_fast.finetune --preset vit_base --init released_mfm_vit_base.pth \\
        --data-path /imagenet --batch-size 128
    python -m mfm_fast.finetune --init encoder.pth --dataset photos --shots 4 --model test_vit --img-size 32

The recipe is the released fine-tuning config (docs/finetuning.md): AdamW (0.9, 0.999), base lr 2e-3 per 512
images (lr = blr x total batch / 512), 5 warm-up epochs from 2.5e-7, cosine to 2.5e-7, weight decay 0.05, layer
decay 0.8 (timm.optim.param_groups_layer_decay: patch_embed, cls_token, pos_embed in group 0, block i in group
i + 1, fc_norm and head last; group g's lr is scaled by 0.8^(L + 1 - g)), drop path 0.1, Mixup 0.8 / CutMix 1.0
with label smoothing 0.1 (timm Mixup + SoftTargetCrossEntropy), RandAugment rand-m9-mstd0.5-inc1, random erasing
0.25, no colour jitter; val: resize 256 -> centre crop 224 (bicubic). ViTs are timm models with global_pool="avg"
(mean over the patch tokens, then fc_norm) initialised as the released VisionTransformer. ``--preset resnet50`` is
our own timm recipe (the released repository has none; see docs/finetuning.md).
--init takes an mfm_fast pre-training checkpoint.pth or encoder.pth (MFM or FOLK), a checkpoint of the released
MFM code (ViT or ResNet-50), or a finetune checkpoint; it prints one line with the keys it left out and the ones
it initialised fresh. Without --data-path the data are built-in (scikit-image's photos or faces, offline).
Output: checkpoint.pth (last; --resume auto continues it bit for bit), best.pth (best val top-1), log.jsonl,
curves.png. Evaluate a checkpoint elsewhere with ``python -m mfm_fast.evaluate``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from .._optional import NEEDS, require
from ..cli import ArgError, OneLineParser, check_ranges, flag_of
from . import finetune_data
from .checkpoint import load_checkpoint, plan_output, prepare_output_dir, set_rng_state, trim_log
from .data import ResumableSampler
from .engine import RunLog
from .finetune_engine import (BEST_NAME, CHECKPOINT_NAME, FinetuneRun, evaluate, load_finetune_checkpoint,
                              train as train_loop)
from .optim import make_lr_scheduler, make_schedule
from .released import create_classifier, describe_init, load_init
from .runtime import amp_dtype_of, run_distributed

PROG = "python -m mfm_fast.finetune"

# The released ViT fine-tuning recipe (configs/vit_*/finetune*.yaml, config.py): the defaults of every preset-able flag.
RECIPE = dict(model="vit_small_patch16_224", epochs=100, blr=2e-3, warmup_epochs=5.0, warmup_lr=2.5e-7,
              min_lr=2.5e-7, weight_decay=0.05, layer_decay=0.8, drop_path=0.1, opt="adamw", betas=[0.9, 0.999],
              clip_grad=0.0, mixup=0.8, cutmix=1.0, smoothing=0.1, bce=False, auto_augment="rand-m9-mstd0.5-inc1",
              reprob=0.25, color_jitter=0.0)
PRESETS = {
    "vit_small": dict(model="vit_small_patch16_224", epochs=200),  # finetune__vit_small__img224__200ep.yaml
    "vit_base": dict(model="vit_base_patch16_224", epochs=100),  # finetune__vit_base__img224__100ep.yaml
    # ours (the released code fine-tunes no ResNet): timm's "ResNet strikes back" A3 at 224 px, A2's drop path
    "resnet50": dict(model="resnet50", epochs=100, opt="lamb", blr=2e-3, weight_decay=0.02, layer_decay=1.0,
                     drop_path=0.05, mixup=0.1, cutmix=1.0, smoothing=0.0, bce=True,
                     auto_augment="rand-m6-mstd0.5-inc1", reprob=0.0, min_lr=1e-6),
}


def get_args_parser() -> argparse.ArgumentParser:
    p = OneLineParser(PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model and initialisation")
    g.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="released fine-tuning config (vit_small: 200 epochs, vit_base: 100) or our resnet50 recipe; "
                        "explicit flags override it")
    g.add_argument("--model", default=None, help="timm model (default: the preset's, else vit_small_patch16_224)")
    g.add_argument("--img-size", type=int, default=224, help="input side")
    g.add_argument("--drop-path", type=float, default=None, help="stochastic depth rate (recipe 0.1)")
    g.add_argument("--global-pool", choices=("avg", "token"), default="avg",
                   help="ViTs: avg = mean of the patch tokens + fc_norm (the released model; the encoder's final "
                        "norm is left out of --init), token = the cls token after the final norm")
    g.add_argument("--init", default="none",
                   help="weights to start from: an mfm_fast checkpoint.pth / encoder.pth, a released MFM checkpoint, "
                        "a finetune checkpoint, or none (random init)")
    g = p.add_argument_group("data")
    g.add_argument("--data-path", default=None, help="root with ImageFolder trees train/ and val/")
    g.add_argument("--dataset", choices=("photos", "faces"), default="photos",
                   help="built-in labelled data when --data-path is not given (scikit-image's wheel, offline)")
    g.add_argument("--train-per-class", type=int, default=64, help="photos: training crops per photo")
    g.add_argument("--val-per-class", type=int, default=16, help="photos: held-out crops per photo")
    g.add_argument("--shots", type=int, default=None, help="few-shot: K training images per class (seeded)")
    g.add_argument("--train-fraction", type=float, default=None,
                   help="a fraction F of each class's training images (seeded)")
    g.add_argument("--auto-augment", default=None,
                   help="timm RandAugment string, or none (recipe rand-m9-mstd0.5-inc1)")
    g.add_argument("--reprob", type=float, default=None, help="random-erasing probability (recipe 0.25)")
    g.add_argument("--color-jitter", type=float, default=None, help="colour jitter (recipe 0)")
    g.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1), help="DataLoader workers")
    g = p.add_argument_group("mixing and loss")
    g.add_argument("--mixup", type=float, default=None, help="Mixup alpha (recipe 0.8; 0: off)")
    g.add_argument("--cutmix", type=float, default=None, help="CutMix alpha (recipe 1.0; 0: off)")
    g.add_argument("--smoothing", type=float, default=None, help="label smoothing (recipe 0.1)")
    g.add_argument("--bce", action="store_true", default=None,
                   help="binary cross-entropy on the (mixed) targets instead of softmax cross-entropy (resnet50)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=128, help="images per process per micro-batch")
    g.add_argument("--accum-iter", type=int, default=1, help="micro-batches per optimiser step")
    g.add_argument("--epochs", type=int, default=None, help="epochs (recipe: 100 for ViT-B, 200 for ViT-S)")
    g.add_argument("--steps", type=int, default=None,
                   help="cap: the run is this many optimiser steps (the schedule spans them, warm-up keeps its "
                        "fraction of the epochs); evaluation after each epoch and at the end")
    g.add_argument("--warmup-epochs", type=float, default=None, help="linear warm-up (recipe 5)")
    g.add_argument("--blr", type=float, default=None, help="base lr per 512 images (recipe 2e-3)")
    g.add_argument("--lr", type=float, default=None, help="absolute peak lr (overrides --blr)")
    g.add_argument("--warmup-lr", type=float, default=None, help="lr at step 0 per 512 images (recipe 2.5e-7)")
    g.add_argument("--min-lr", type=float, default=None, help="final lr per 512 images (recipe 2.5e-7)")
    g.add_argument("--weight-decay", type=float, default=None, help="weight decay (recipe 0.05; none on 1-D / biases)")
    g.add_argument("--layer-decay", type=float, default=None, help="layer-wise lr decay (recipe 0.8; 1: off)")
    g.add_argument("--opt", choices=("adamw", "lamb", "sgd"), default=None, help="optimiser (recipe adamw)")
    g.add_argument("--betas", type=float, nargs=2, default=None, help="AdamW / LAMB betas (recipe 0.9 0.999)")
    g.add_argument("--clip-grad", type=float, default=None, help="gradient-norm clip (recipe 0: off)")
    g.add_argument("--ema", type=float, default=0.0, help="EMA decay of the weights (timm ModelEmaV3; 0: off)")
    g.add_argument("--amp", choices=("auto", "bf16", "fp16", "none"), default="auto",
                   help="autocast dtype (auto: bf16 on CUDA, none on the CPU)")
    g = p.add_argument_group("run")
    g.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="auto: CUDA when available")
    g.add_argument("--seed", type=int, default=0, help="seed of weights, subsets, data order and augmentation")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    g.add_argument("--output-dir", default="output/mfm_finetune", help="checkpoints, log.jsonl, curves.png go here")
    g.add_argument("--resume", default=None, help="checkpoint.pth to continue ('auto': <output-dir>/checkpoint.pth "
                                                  "if it exists)")
    g.add_argument("--overwrite", action="store_true", help="start afresh in an --output-dir that holds a run")
    g.add_argument("--eval-only", action="store_true",
                   help="evaluate the --resume checkpoint (or the --init weights) on val and stop")
    g.add_argument("--save-every", type=int, default=0, help="also checkpoint every N steps (0: after each epoch only)")
    g.add_argument("--stop-at", type=int, default=None, help="stop after this step (with a checkpoint), as a "
                                                             "preempted job would; --resume continues")
    g.add_argument("--no-checkpoint", action="store_true", help="write no checkpoint")
    g.add_argument("--log-every", type=int, default=20, help="log every N steps (the loop's only host syncs)")
    g.add_argument("--skip-nonfinite", action="store_true", help="skip non-finite steps instead of stopping")
    g.add_argument("--no-progress", action="store_true", help="no tqdm bar; a printed line per log step")
    g.add_argument("--dist-backend", choices=("auto", "nccl", "gloo"), default="auto", help="under torchrun")
    return p


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Preset and recipe defaults for the flags left unset, then every value checked (ArgError naming the flag)."""
    preset = PRESETS.get(args.preset, {})
    for name, value in RECIPE.items():
        if getattr(args, name, None) is None:
            setattr(args, name, preset.get(name, value))
    args.warmup_steps = None  # optim.make_schedule reads it
    if args.auto_augment in ("none", ""):
        args.auto_augment = None
    ints = {"img_size": 2, "batch_size": 1, "accum_iter": 1, "epochs": 1, "steps": 1, "num_workers": 0,
            "train_per_class": 1, "val_per_class": 1, "log_every": 1, "save_every": 0, "threads": 1, "stop_at": 1}
    check_ranges(args, ints, ("blr", "lr", "warmup_lr", "min_lr", "weight_decay", "drop_path", "mixup", "cutmix",
                              "smoothing", "reprob", "color_jitter", "warmup_epochs", "clip_grad", "ema"))
    for name in ("drop_path", "reprob", "smoothing", "ema"):
        if getattr(args, name) >= 1:
            raise ArgError(f"{flag_of(name)}: must be < 1, got {getattr(args, name)}")
    if not 0 < args.layer_decay <= 1:
        raise ArgError(f"--layer-decay: must be in (0, 1], got {args.layer_decay}")
    if (args.mixup > 0 or args.cutmix > 0) and args.batch_size % 2:
        raise ArgError(f"--batch-size: Mixup / CutMix pair the images of a batch, so it must be even, got "
                       f"{args.batch_size} (or pass --mixup 0 --cutmix 0)")
    import timm
    if not timm.is_model(args.model):
        raise ArgError(f"--model: {args.model!r} is not a timm model (see timm.list_models())")
    return args


# ---- model, optimiser, loss -------------------------------------------------------------------------

def build_classifier(args, num_classes: int) -> nn.Module:
    """The timm classifier (ViTs: mean pooling + fc_norm, the released initialisation), checked on one image."""
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    try:
        net = create_classifier(args.model, num_classes, args.img_size, args.drop_path, released_init=True,
                                global_pool=args.global_pool)
    except (AssertionError, ValueError, TypeError) as exc:
        raise ArgError(f"--global-pool: {args.model} does not take global_pool={args.global_pool!r} "
                       f"({type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:120]})") from None
    try:
        with torch.no_grad():
            net.eval()(torch.zeros(1, 3, args.img_size, args.img_size))
    except Exception as exc:
        raise ArgError(f"--img-size: {args.model} cannot take {args.img_size} px images ({type(exc).__name__}: "
                       f"{(str(exc).splitlines() or [''])[0][:160]})") from None
    return net.train()


def param_groups(net: nn.Module, weight_decay: float, layer_decay: float) -> list:
    """timm's groups: no weight decay on 1-D parameters, biases and the model's no_weight_decay() names; with
    layer_decay < 1, param_groups_layer_decay's per-group lr_scale = layer_decay^(last group - group)."""
    from timm.optim import param_groups_layer_decay, param_groups_weight_decay
    skip = sorted(getattr(net, "no_weight_decay", lambda: set())())
    if layer_decay < 1:
        return param_groups_layer_decay(net, weight_decay, no_weight_decay_list=skip, layer_decay=layer_decay)
    return param_groups_weight_decay(net, weight_decay, no_weight_decay_list=skip)


def make_optimizer(net: nn.Module, args) -> torch.optim.Optimizer:
    """AdamW (fused where the device has it), LAMB (timm) or SGD with momentum 0.9, on param_groups."""
    groups = param_groups(net, args.weight_decay, args.layer_decay)
    if args.opt == "adamw":
        try:
            return torch.optim.AdamW(groups, lr=0.0, betas=tuple(args.betas), eps=1e-8, fused=True)
        except (RuntimeError, ValueError):
            return torch.optim.AdamW(groups, lr=0.0, betas=tuple(args.betas), eps=1e-8)
    if args.opt == "lamb":
        from timm.optim import Lamb
        return Lamb(groups, lr=0.0, betas=tuple(args.betas))
    return torch.optim.SGD(groups, lr=0.0, momentum=0.9)


def make_mixup(args, num_classes: int):
    """timm Mixup (mixup / cutmix alphas, label smoothing; switch probability 0.5, per batch), or None when both
    alphas are 0: its targets are (B, K) rows that sum to 1."""
    if args.mixup <= 0 and args.cutmix <= 0:
        return None
    from timm.data import Mixup
    return Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=args.smoothing,
                 num_classes=num_classes, prob=1.0, switch_prob=0.5, mode="batch")


def make_criterion(args, mixing: bool) -> nn.Module:
    """SoftTargetCrossEntropy on mixed targets; LabelSmoothingCrossEntropy / CrossEntropy otherwise; --bce: timm's
    BinaryCrossEntropy (it takes both kinds of target)."""
    from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    if args.bce:
        return BinaryCrossEntropy(smoothing=0.0 if mixing else args.smoothing)
    if mixing:
        return SoftTargetCrossEntropy()
    return LabelSmoothingCrossEntropy(args.smoothing) if args.smoothing > 0 else nn.CrossEntropyLoss()


# ---- output folder and resume --------------------------------------------------------------------------

def check_finetune_checkpoint(path, flag: str, args, num_classes: int) -> dict:
    """A finetune checkpoint (finetune_engine.load_finetune_checkpoint) of this model, image size, pooling and
    class count, else ArgError naming `flag`."""
    ckpt = load_finetune_checkpoint(path, flag)
    saved = ckpt["args"]
    for name, want in (("model", args.model), ("img_size", args.img_size), ("global_pool", args.global_pool),
                       ("num_classes", num_classes)):
        if saved.get(name, "avg" if name == "global_pool" else None) != want:
            raise ArgError(f"{flag}: {path} is a checkpoint of {name} {saved.get(name)}, this run has {want}")
    return ckpt


def restore(run: FinetuneRun, ckpt: dict) -> int:
    """Weights, optimiser, scaler, EMA, data position and (same world size) every random stream; returns the step."""
    run.net.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt.get("scaler"):
        run.scaler.load_state_dict(ckpt["scaler"])
    if run.ema is not None and "ema" in ckpt:
        run.ema.module.load_state_dict(ckpt["ema"])
    run.epoch, run.batch_in_epoch, run.best_top1 = ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["best_top1"]
    if ckpt["world_size"] == run.world:
        set_rng_state(ckpt["rng"][run.rank])
    elif run.is_main:
        print(f"finetune: --resume: the checkpoint ran on {ckpt['world_size']} processes, this run on {run.world}: "
              "weights, optimiser and schedule continue, data order does not", file=sys.stderr)
    return ckpt["step"]


# ---- the run -------------------------------------------------------------------------------------------

def train(args) -> dict:
    """Fine-tune as `args` (from get_args_parser) say; returns the run's statistics."""
    args = resolve_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    resume = plan_output(args, writes=not args.eval_only)  # its checkpoint is checked once the classes are known
    return run_distributed(args, lambda rank, world, device: _train(args, rank, world, device, resume))


def _train(args, rank: int, world: int, device: torch.device, resume: Optional[str]) -> dict:
    is_main, out_dir = rank == 0, Path(args.output_dir)
    try:
        data = finetune_data.build_finetune_data(args)
    except ValueError as exc:
        raise ArgError(str(exc)) from None
    args.num_classes, args.class_names = data.num_classes, list(data.class_names)
    net = build_classifier(args, data.num_classes)
    ckpt = check_finetune_checkpoint(resume, "--resume", args, data.num_classes) if resume else None
    if args.init != "none" and ckpt is None:
        report = load_init(args.init, net, img_size=args.img_size)
        if is_main:
            print(f"finetune: {describe_init(report)}", flush=True)
    net.to(device)
    torch.manual_seed(args.seed + rank)  # drop path and the rest of this process's draws
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)  # timm Mixup draws from NumPy
    amp_dtype = amp_dtype_of(args, device)
    if args.eval_only:
        if ckpt is not None:
            net.load_state_dict(ckpt["model"])
        val = evaluate(net, data.val, args, device, amp_dtype, rank, world)
        if is_main:
            print(json.dumps({"eval_only": True, "model": args.model, "init": args.init, "resume": resume, **val}))
        return {"eval": val}

    sampler = ResumableSampler(data.train, num_replicas=world, rank=rank, shuffle=True, seed=args.seed, drop_last=True)
    loader = torch.utils.data.DataLoader(data.train, batch_size=args.batch_size, sampler=sampler,
                                         num_workers=args.num_workers, drop_last=True,
                                         pin_memory=device.type == "cuda", generator=torch.Generator())
    per_epoch = len(sampler) // args.batch_size
    if per_epoch == 0:
        raise ArgError(f"--batch-size: {args.batch_size} x {world} processes is more than the {len(data.train)} "
                       "training images")
    total_batch = args.batch_size * args.accum_iter * world
    sched = make_schedule(args, per_epoch, total_batch)
    model = nn.parallel.DistributedDataParallel(
        net, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else net
    optimizer = make_optimizer(net, args)
    ema = None
    if args.ema > 0:
        from timm.utils import ModelEmaV3
        ema = ModelEmaV3(net, decay=args.ema)
    mixup = make_mixup(args, data.num_classes)
    run = FinetuneRun(args=args, rank=rank, world=world, device=device, net=net, model=model, ema=ema,
                      optimizer=optimizer, lr_scheduler=None, sched=sched,
                      scaler=torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16),
                      amp_dtype=amp_dtype, mixup=mixup, criterion=make_criterion(args, mixup is not None), data=data,
                      sampler=sampler, loader=loader, per_epoch=per_epoch, out_dir=out_dir)
    step = 0
    if ckpt is not None:
        ckpt = load_checkpoint(resume)
        step, run.sched = restore(run, ckpt), ckpt["schedule"]
    run.lr_scheduler = make_lr_scheduler(optimizer, run.sched)
    if is_main:
        prepare_output_dir(out_dir, fresh=ckpt is None, stale=(CHECKPOINT_NAME, BEST_NAME, "curves.png"))
        if ckpt is not None:
            trim_log(out_dir / "log.jsonl", step)
    log = RunLog(out_dir / "log.jsonl", append=ckpt is not None, enabled=is_main)
    log.write({"event": "resume" if ckpt is not None else "start", "step": step, "world_size": world,
               "total_batch": total_batch, "schedule": run.sched, "per_epoch": per_epoch, "data": data.description,
               "subset": data.subset, "init": args.init, "args": vars(args)})
    end_step = min(run.sched["total"], args.stop_at or run.sched["total"])
    if is_main:
        print(header(run, step, end_step, total_batch), flush=True)
    try:
        return train_loop(run, step, end_step, log)
    finally:
        log.close()


def header(run: FinetuneRun, step: int, end_step: int, total_batch: int) -> str:
    a, s = run.args, run.sched
    params = sum(p.numel() for p in run.net.parameters()) / 1e6
    mix = f"mixup {a.mixup} / cutmix {a.cutmix}" if run.mixup is not None else "no mixing"
    return "\n".join([
        f"finetune: {a.model} ({params:.1f}M params, {a.num_classes} classes) on {run.device}, {a.img_size} px, "
        f"init: {a.init}",
        f"  batch {a.batch_size}" + (f" x {a.accum_iter} accumulated" if a.accum_iter > 1 else "")
        + (f" x {run.world} processes" if run.world > 1 else "") + f" = {total_batch} images per step; "
        f"steps {step + 1}..{end_step} of {s['total']} ({run.per_epoch} per epoch), warm-up {s['warmup']}",
        f"  {a.opt} peak lr {s['lr']:.3g}, layer decay {a.layer_decay}, weight decay {a.weight_decay}, drop path "
        f"{a.drop_path}, {mix}, smoothing {a.smoothing}, RandAugment {a.auto_augment}, erasing {a.reprob}",
        f"  data: {run.data.description}",
        f"  output: {run.out_dir}",
    ])


def main(argv=None) -> dict:
    require(PROG, *NEEDS["finetune"])
    parser = get_args_parser()
    args = parser.parse_args(argv)
    try:
        return train(args)
    except ArgError as exc:
        parser.error(str(exc))
    except FloatingPointError as exc:
        print(f"finetune: error: {exc}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
