"""The checks of ``python -m mfm_fast.pretrain``'s arguments: preset-derived defaults, every value against its
range, and the library's own validators on the values the run will pass it. A bad value raises ArgError whose
message starts with its flag (the script prints it as one line)."""

from __future__ import annotations

import argparse
import math
from typing import Dict

import torch

from . import data as D
from ..cli import ArgError, check_ranges, flag_of as _flag
from ..backends import names as backend_names
from ..dispatch import backend_unavailable_reason
from ..loss import MaskedFreqLoss
from ..masks import check_rings, check_rings_on_grid

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


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill preset-derived defaults and check every value; raises ArgError naming the flag."""
    args = argparse.Namespace(**vars(args))
    preset_model, preset_p_low = PRESETS[args.preset] if args.preset else (None, None)
    args.model = args.model or preset_model or "vit_small_patch16_224"
    check_numbers(args)
    check_restoration_args(args)
    pipelines = [s.strip() for s in str(args.pipeline).split(",") if s.strip()]
    if not pipelines or any(s not in PIPELINES for s in pipelines):
        raise ArgError(f"--pipeline: expected mfm_fast, official or a comma list of them, got {args.pipeline!r}")
    args.pipeline = ",".join(pipelines)
    for name in ("corrupt_backend", "loss_backend"):
        if getattr(args, name) not in backend_names() + ("auto",):
            raise ArgError(f"{_flag(name)}: expected auto or one of {', '.join(backend_names())}, "
                           f"got {getattr(args, name)!r}")
    check_output_and_data_args(args)
    import timm
    if not timm.is_model(args.model):
        raise ArgError(f"--model: {args.model!r} is not a timm model (see timm.list_models())")
    resolve_mask_args(args, preset_model, preset_p_low)
    resolve_method_args(args)
    if not 0 <= args.r1 < args.r2:
        raise ArgError(f"--r1: must be >= 0 and < --r2 = {args.r2}, got {args.r1}")
    if args.stop_at is not None and args.steps is not None and args.stop_at > args.steps:
        raise ArgError(f"--stop-at: {args.stop_at} is past the last step (--steps {args.steps})")
    check_with_library(args)
    return args


def check_numbers(args: argparse.Namespace) -> None:
    """Every number against its range (counts >= 1 or >= 0, rates >= 0 and finite, an even --img-size, ...)."""
    positive = ("img_size", "batch_size", "accum_iter", "epochs", "samples_per_epoch", "log_every", "save_every",
                "sr_factor", "dino_out_dim", "dino_hidden_dim", "dino_bottleneck_dim", "dino_layers", "steps",
                "stop_at", "threads")
    least = {**dict.fromkeys(positive, 1),
             **dict.fromkeys(("warmup_steps", "vis_every", "vis_num", "num_workers", "timing_warmup"), 0)}
    nonneg = ("blr", "warmup_lr", "min_lr", "weight_decay", "clip_grad", "drop_path", "noise_sigma", "radius_jitter",
              "phase_weight", "rec_weight", "distill_weight", "warmup_teacher_temp_epochs", "freeze_last_layer",
              "color_jitter")
    check_ranges(args, least, nonneg)
    if args.img_size % 2:
        raise ArgError(f"--img-size: must be even (the spectrum's DC sits at S // 2), got {args.img_size}")
    if not 0 < args.min_crop_scale <= 1:
        raise ArgError(f"--min-crop-scale: must be in (0, 1], got {args.min_crop_scale}")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        raise ArgError(f"--lr: must be > 0, got {args.lr}")
    if not all(0 <= b < 1 for b in args.betas):
        raise ArgError(f"--betas: both must be in [0, 1), got {args.betas}")


def check_restoration_args(args: argparse.Namespace) -> None:
    """--task deblur's kernel sizes and sigma, --task sr's factor."""
    if args.task == "deblur" and (not args.blur_sizes or any(k < 1 or k % 2 == 0 for k in args.blur_sizes)):
        raise ArgError(f"--blur-sizes: must be odd positive kernel sizes, got {args.blur_sizes}")
    if args.task == "deblur" and max(args.blur_sizes) // 2 >= args.img_size:
        raise ArgError(f"--blur-sizes: the largest kernel {max(args.blur_sizes)} is too big for --img-size {args.img_size}")
    if args.task == "sr" and args.img_size % args.sr_factor:
        raise ArgError(f"--sr-factor: {args.sr_factor} must divide --img-size {args.img_size}")
    if args.task == "deblur" and args.blur_sigma <= 0:
        raise ArgError(f"--blur-sigma: must be > 0, got {args.blur_sigma}")


def check_output_and_data_args(args: argparse.Namespace) -> None:
    """--overwrite against --resume, --data-path against --synthetic, and the folder itself."""
    if args.overwrite and args.resume is not None:
        raise ArgError(f"--overwrite: cannot be combined with --resume {args.resume} (--resume continues the run in "
                       "--output-dir, --overwrite starts it afresh); drop one of them")
    if args.data_path is not None and args.synthetic:
        raise ArgError("--synthetic: cannot be combined with --data-path")
    if args.data_path is not None:
        try:
            D.check_data_path(args.data_path)
        except ValueError as exc:
            raise ArgError(str(exc)) from None


def resolve_mask_args(args: argparse.Namespace, preset_model, preset_p_low) -> None:
    """--p-low from the preset (for its own model), --mask-patch-factor, --bands against --r1 / --r2, and --r1's
    default (16 at 224 px, in patch frequency units)."""
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




def check_backends(args: argparse.Namespace, device: torch.device) -> None:
    """--corrupt-backend / --loss-backend: a named backend must run on the device at the run's image size."""
    for flag, op in (("--corrupt-backend", "corrupt"), ("--loss-backend", "masked_freq_loss")):
        name = getattr(args, flag[2:].replace("-", "_"))
        side = args.img_size // args.mask_patch_factor
        why = None if name == "auto" or args.pipeline == "official" else backend_unavailable_reason(
            name, device.type, op, (3, side, side))
        if why is not None:
            raise ArgError(f"{flag}: {name} cannot run on --device {device.type} ({why})")
