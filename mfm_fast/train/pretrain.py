"""MFM (and FOLK) pre-training of a timm backbone with mfm_fast's corruption and MaskedFreqLoss.

    python -m mfm_fast.pretrain --device cpu --model test_vit --img-size 64 --batch-size 32 --steps 200
    python -m mfm_fast.pretrain --method folk --data-path /imagenet/train --preset vit_small --batch-size 128
    python -m mfm_fast.pretrain --data-path /imagenet/train --preset vit_base --batch-size 128
    torchrun --nproc_per_node=8 -m mfm_fast.pretrain --data-path /imagenet/train --preset vit_base --batch-size 128
    python -m mfm_fast.pretrain --synthetic --steps 100 --report-throughput --pipeline official,mfm_fast

Shape of the code (MAE / SimMIM style): this script goes args -> model -> data -> optimiser / schedule, then
mfm_fast.train.engine runs the loop (mfm_fast.train.checkpoint saves and resumes it).
Per step: uint8 batch -> device -> per-image masks + corruption + normalisation on the device
(``--task mfm``) or a restoration degradation (sr / deblur / denoise, docs/spec.md §5) ->
encoder.forward_features -> MFMHead -> MaskedFreqLoss("masked", or "mean" for restoration).
The recipe (docs/spec.md §4, the released configs) is the default; see ``--help``.
``--method folk`` (docs/spec.md §6, mfm_fast.folk): each sample is two augmented views; the student sees
them filtered by per-image Com / RCom masks and is trained on rec_weight x the masked spectral loss +
distill_weight x the DINO loss against an EMA teacher that sees the other view unfiltered.
Without --data-path or --synthetic the data are random crops of the photographs bundled in
scikit-image's wheel (offline; mfm_fast.train.data).
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

from .. import backends
from .._optional import NEEDS, require
from ..cli import ArgError, OneLineParser
from .checkpoint import (check_checkpoint, load_checkpoint, load_training_state, plan_output,  # noqa: F401
                         prepare_output_dir, save_checkpoint, trim_log)
from .engine import NonFiniteLoss, RunLog, TrainingRun, train as train_loop
from .model import build_model, create_encoder, freeze_unused, is_vit, make_distiller  # noqa: F401
from .optim import lr_at, make_lr_scheduler, make_optimizer, make_schedule, param_groups  # noqa: F401
from .pretrain_args import ADAPTIVE_MODES, DISTANCES, MASKS, PRESETS, TASKS, check_backends, resolve_args
from .pretrain_data import Batches
from .runtime import amp_dtype_of, run_distributed
from .tasks import Corruptor, degrade  # noqa: F401

PROG = "python -m mfm_fast.pretrain"

# load_checkpoint, save_checkpoint, create_encoder, lr_at, param_groups and degrade are used by the library
# modules, not here; they stay importable from mfm_fast.train.pretrain as well.


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The module docstring as written; each option's default unless it is None / False or already said."""

    def _get_help_string(self, action):
        text = action.help or ""
        if not any(action.default is v for v in (None, False, argparse.SUPPRESS)) and "default" not in text:
            text += " (default: %(default)s)"
        return text


def get_args_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m mfm_fast.pretrain``, one argument group per topic."""
    p = OneLineParser(PROG, description=__doc__, formatter_class=_HelpFormatter)
    for add_group in (_model_options, _task_and_masks_options, _loss_options, _restoration_options,
                      _pipelines_options, _folk_options, _data_options, _optimisation_options, _run_options):
        add_group(p)
    return p


def _model_options(p: argparse.ArgumentParser) -> None:
    """The encoder: timm model, preset, crop size, stochastic depth."""
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help="timm model name, created with pretrained=False, num_classes=0 (default "
                        "vit_small_patch16_224; timm's test_vit / test_resnet are tiny ones for CPU tests)")
    g.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="released config: vit_small / vit_base (p_low 0.5) or resnet50 (p_low 0.3); "
                        "--model / --p-low override it")
    g.add_argument("--img-size", type=int, default=224, help="crop side S (even, a multiple of the encoder stride)")
    g.add_argument("--drop-path", type=float, default=0.0, help="stochastic depth rate of the encoder (recipe: 0)")


def _task_and_masks_options(p: argparse.ArgumentParser) -> None:
    """What is learned: the task, the method and the masks (disc radii, rings, jitter, patches; FOLK's Com / RCom)."""
    g = p.add_argument_group("task and masks")
    g.add_argument("--task", choices=TASKS, default="mfm",
                   help="mfm: frequency masking (masked loss); sr / deblur / denoise: the restoration baselines "
                        "of docs/spec.md §5 (loss with the 'mean' reduction)")
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


def _loss_options(p: argparse.ArgumentParser) -> None:
    """The masked spectral loss: distance and exponent."""
    g = p.add_argument_group("loss")
    g.add_argument("--distance", choices=DISTANCES, default="complex",
                   help="spectral distance of the loss: complex (MFM's |D|) or magnitude_phase (amplitude error + "
                        "--phase-weight x magnitude-weighted phase error)")
    g.add_argument("--phase-weight", type=float, default=1.0,
                   help="--distance magnitude_phase: weight of the phase term (1: the complex distance, 0: "
                        "amplitude only)")
    g.add_argument("--loss-gamma", type=float, default=1.0, help="exponent of the spectral distance")


def _restoration_options(p: argparse.ArgumentParser) -> None:
    """The degradations of the restoration baselines (docs/spec.md §5)."""
    g = p.add_argument_group("restoration tasks (--task sr / deblur / denoise)")
    g.add_argument("--sr-factor", type=int, default=8, help="--task sr: bicubic down/up factor")
    g.add_argument("--blur-sigma", type=float, default=5.0, help="--task deblur: Gaussian sigma (pixels)")
    g.add_argument("--blur-sizes", type=int, nargs="+", default=[7, 9, 11, 13, 15, 17, 19, 21],
                   help="--task deblur: odd kernel sizes, one drawn per image")
    g.add_argument("--noise-sigma", type=float, default=75.0, help="--task denoise: noise sigma in 0..255 units")


def _pipelines_options(p: argparse.ArgumentParser) -> None:
    """Which implementation corrupts and scores: the released code's ops or mfm_fast, and mfm_fast's backends."""
    g = p.add_argument_group("pipeline and backends")
    g.add_argument("--pipeline", default="mfm_fast",
                   help="mfm_fast, or official (eager replica of the released code's fft2 + fftshift corruption "
                        "and loss, for speed comparisons); a comma list (official,mfm_fast) runs each in turn "
                        "and prints a throughput table")
    g.add_argument("--corrupt-backend", default="auto",
                   help=f"mfm_fast backend of the corruption: auto, {', '.join(backends.names())}")
    g.add_argument("--loss-backend", default="auto",
                   help=f"mfm_fast backend of MaskedFreqLoss: auto, {', '.join(backends.names())}")


def _folk_options(p: argparse.ArgumentParser) -> None:
    """FOLK's loss weights, projection head, teacher and view augmentations."""
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


def _data_options(p: argparse.ArgumentParser) -> None:
    """The images: folder, synthetic batch or the bundled photos, crops, loader."""
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


def _optimisation_options(p: argparse.ArgumentParser) -> None:
    """Batch, schedule, AdamW, precision, compile."""
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


def _run_options(p: argparse.ArgumentParser) -> None:
    """Device, seed, output, checkpoints, logging, pictures, distributed backend."""
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


def train(args) -> dict:
    """Pre-train as `args` (from get_args_parser) say; returns the run's statistics (mfm_fast.train.engine.summary)."""
    args = resolve_args(args)
    if "," in args.pipeline or "," in str(args.method):
        raise ArgError(f"--{'pipeline' if ',' in args.pipeline else 'method'}: train() runs one; main() runs a comma "
                       "list in turn")
    if args.threads:
        torch.set_num_threads(args.threads)
    resume = plan_output(args, lambda path: check_checkpoint(path, "--resume", model=args.model,
                                                             img_size=args.img_size, method=args.method,
                                                             task=args.task))

    def body(rank: int, world: int, device: torch.device) -> dict:
        check_backends(args, device)
        return _train(args, rank, world, device, resume)
    return run_distributed(args, body)


def _train(args, rank: int, world: int, device: torch.device, resume: Optional[str]) -> dict:
    is_main, out_dir = rank == 0, Path(args.output_dir)
    torch.manual_seed(args.seed)  # identical initial weights on every rank (DDP also broadcasts them)
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    # model (it checks --img-size against the encoder's patch size or stride before anything is written)
    net = build_model(args).to(device)
    if is_main:
        prepare_output_dir(out_dir, fresh=resume is None)

    # data
    batches = Batches(args, rank, world, device)
    total_batch = args.batch_size * args.accum_iter * world

    # DDP, then torch.compile
    if args.p_low is None:
        args.p_low = 0.5 if is_vit(net.encoder) else 0.3
    frozen = freeze_unused(net, args.img_size)
    if args.channels_last:
        net = net.to(memory_format=torch.channels_last)
    ddp_model = nn.parallel.DistributedDataParallel(
        net, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else net
    model = torch.compile(ddp_model) if args.compile else ddp_model

    # optimiser, schedule, corruption + loss (+ the FOLK teacher)
    optimizer = make_optimizer(net, args)
    amp_dtype = amp_dtype_of(args, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    sched = make_schedule(args, batches.per_epoch, total_batch)
    corruptor = Corruptor(args, device, seed=args.seed + rank)
    distiller = make_distiller(net, args, sched, batches.per_epoch) if args.method == "folk" else None

    # resume: weights, optimiser, scaler, schedule, step, data position, every random stream
    step = 0
    if resume is not None:  # checked by plan_output: a full checkpoint of this model, size, method and task
        sched, step = load_training_state(resume, net=net, optimizer=optimizer, scaler=scaler, distiller=distiller,
                                          batches=batches, sched=sched, mask_gen=corruptor.gen, rank=rank, world=world)
        if is_main:
            trim_log(out_dir / "log.jsonl", step)
    lr_scheduler = make_lr_scheduler(optimizer, sched)

    run = TrainingRun(args=args, rank=rank, world=world, device=device, net=net, ddp_model=ddp_model, model=model,
                      optimizer=optimizer, sched=sched, lr_scheduler=lr_scheduler, scaler=scaler,
                      amp_dtype=amp_dtype, corruptor=corruptor, distiller=distiller, batches=batches,
                      total_batch=total_batch, out_dir=out_dir)
    log = RunLog(out_dir / "log.jsonl", append=resume is not None, enabled=is_main)
    log.write({"event": "resume" if resume is not None else "start", "step": step, "world_size": world,
               "total_batch": total_batch, "schedule": sched, "params": sum(p.numel() for p in net.parameters()),
               "frozen_unused": frozen, "device": str(device), "fused_adamw": bool(optimizer.defaults.get("fused")),
               "args": vars(args)})
    try:
        return train_loop(run, step, min(sched["total"], args.stop_at or sched["total"]), log)
    finally:
        log.close()


def main(argv=None) -> dict:
    """CLI entry: parses argv, runs train() once per (--method, --pipeline) entry, returns the last run's statistics."""
    require(PROG, *NEEDS["pretrain"])
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
