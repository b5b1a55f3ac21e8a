"""The pre-training model: a timm encoder + MFMHead (``--method folk``: + the DINO projection head and its EMA
teacher), built and checked for the run's image size."""

from __future__ import annotations

import torch
from torch import nn

from ..cli import ArgError
from ..folk import DINOHead, FOLKModel, SelfDistillation
from ..head import MFMHead, timm_stride
from .released import apply_released_vit_init, create_timm_model, is_vit, pin_key_bias


class MFMModel(nn.Module):
    """timm encoder + MFMHead: corrupted normalised images (N, 3, S, S) -> prediction (N, 3, S, S)."""

    def __init__(self, encoder: nn.Module, head: MFMHead):
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder.forward_features(x))


def create_encoder(name: str, img_size: int, drop_path: float = 0.0) -> nn.Module:
    """timm.create_model(name, pretrained=False, num_classes=0, img_size=...) (img_size only where accepted)."""
    return create_timm_model(name, img_size, num_classes=0, **({"drop_path_rate": drop_path} if drop_path else {}))


def prediction(out) -> torch.Tensor:
    """The MFM prediction from a model output: MFMModel returns it, FOLKModel returns (prediction, logits)."""
    return out[0] if isinstance(out, tuple) else out


def check_img_size(name: str, encoder: nn.Module, img_size: int) -> None:
    """--img-size: a multiple of the encoder's patch size (ViTs) or stride (CNNs), else an ArgError naming both."""
    stride = timm_stride(encoder)
    if img_size % stride == 0:
        return
    what = "patch size" if is_vit(encoder) else "stride"
    below = img_size // stride * stride
    fits = " or ".join(str(v) for v in (below, below + stride) if v > 0)
    raise ArgError(f"--img-size: {img_size} px is {'smaller than' if img_size < stride else 'not a multiple of'} "
                   f"{name}'s {what} {stride}; use a multiple of {stride} (e.g. {fits})")


def build_model(args) -> nn.Module:
    """Encoder + head (stride = patch size for ViTs, the feature reduction, 32 for ResNets); checks the output size.

    --method folk adds the DINO projection head on the pooled features (mfm_fast.folk.FOLKModel). --preset
    vit_small / vit_base: the released pre-training encoder's initialisation and no key bias (released.py)."""
    encoder = create_encoder(args.model, args.img_size, args.drop_path)
    check_img_size(args.model, encoder, args.img_size)
    if getattr(args, "preset", None) in ("vit_small", "vit_base") and is_vit(encoder):
        pin_key_bias(apply_released_vit_init(encoder, pretraining=True))  # the released encoder
    if getattr(args, "method", "mfm") == "folk":
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




def make_distiller(net: nn.Module, args, sched: dict, batches_per_epoch: int) -> SelfDistillation:
    """--method folk: the EMA teacher and DINO loss, with epoch-valued options converted to optimiser steps."""
    steps_per_epoch = max(1, batches_per_epoch // args.accum_iter)
    return SelfDistillation(net, sched["total"], momentum_teacher=args.momentum_teacher,
                            student_temp=args.student_temp, teacher_temp=args.teacher_temp,
                            warmup_teacher_temp=args.warmup_teacher_temp,
                            warmup_teacher_temp_steps=int(round(args.warmup_teacher_temp_epochs * steps_per_epoch)),
                            center_momentum=args.center_momentum,
                            freeze_last_layer_steps=int(round(args.freeze_last_layer * steps_per_epoch)))

