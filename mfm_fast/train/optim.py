"""Optimiser and learning-rate schedule of the pre-training recipe: AdamW on timm's weight-decay groups, and
timm's CosineLRScheduler stepped once per optimiser step (linear warm-up, then a cosine over the whole run)."""

from __future__ import annotations

import logging
from typing import Dict

import torch
from torch import nn
from timm.optim import param_groups_weight_decay
from timm.scheduler import CosineLRScheduler


def param_groups(net: nn.Module, weight_decay: float) -> list:
    """AdamW groups of timm.optim.param_groups_weight_decay: decay on >= 2-D weights; none on 1-D params,
    biases, the encoder's pos_embed, cls_token and its own no_weight_decay() names. Frozen parameters are left out.

    Ordered [decay, no_decay] (timm returns the reverse): the group layout of the optimiser states that
    checkpoints hold. With weight_decay 0 timm returns one no-decay group."""
    skip = set(getattr(net.encoder, "no_weight_decay", lambda: set())()) | {"pos_embed", "cls_token"}
    groups = param_groups_weight_decay(net, weight_decay, no_weight_decay_list=[f"encoder.{n}" for n in sorted(skip)])
    return sorted(groups, key=lambda g: g["weight_decay"] == 0)  # stable: decay first, then no_decay


def make_optimizer(net: nn.Module, args) -> torch.optim.Optimizer:
    """AdamW(betas, eps 1e-8), fused when the device supports it (then NaN steps are skipped on the device)."""
    groups = param_groups(net, args.weight_decay)
    try:
        return torch.optim.AdamW(groups, lr=0.0, betas=tuple(args.betas), eps=1e-8, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(groups, lr=0.0, betas=tuple(args.betas), eps=1e-8)


def make_schedule(args, batches_per_epoch: int, total_batch: int) -> dict:
    """Peak / warm-up / final lr (given per 512 images, scaled by total_batch / 512), warm-up and total steps.

    This plain dict is what checkpoints save and a resumed run continues (make_lr_scheduler turns it into the
    scheduler)."""
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


def make_lr_scheduler(optimizer: torch.optim.Optimizer, sched: Dict[str, float]) -> CosineLRScheduler:
    """timm's CosineLRScheduler over optimiser steps (t_in_epochs=False; call step_update(step) before step
    `step`, 0-based), as in the released code. lr(t) = warmup_lr + t (lr - warmup_lr) / warmup for t < warmup,
    else min_lr + (lr - min_lr) (1 + cos(pi t / total)) / 2: the cosine spans the whole run, warm-up included
    (warmup_prefix=False). The scheduler is stateless given t, so a resumed run rebuilds it from `sched`."""
    for group in optimizer.param_groups:
        # timm's base value per group is its "initial_lr" (set only when absent): a loaded optimiser state
        # must not carry another run's peak into this schedule
        group["initial_lr"] = sched["lr"]
    timm_log = logging.getLogger(CosineLRScheduler.__module__)
    level = timm_log.level
    timm_log.setLevel(logging.ERROR)  # a 1-step run is valid here; timm warns that its cosine then has no effect
    try:
        # t_initial must be >= 1 for timm; a run of 0 steps never asks for an lr
        return CosineLRScheduler(optimizer, t_initial=max(int(sched["total"]), 1), lr_min=sched["min_lr"],
                                 warmup_t=sched["warmup"], warmup_lr_init=sched["warmup_lr"], t_in_epochs=False)
    finally:
        timm_log.setLevel(level)


def lr_at(step: int, sched: Dict[str, float]) -> float:
    """The learning rate of optimiser step `step` (0-based) under `sched` (make_lr_scheduler's value)."""
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=sched["lr"])
    make_lr_scheduler(optimizer, sched).step_update(step)
    return optimizer.param_groups[0]["lr"]
