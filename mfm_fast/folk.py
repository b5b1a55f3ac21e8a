"""FOLK self-distillation (docs/spec.md §6): the student, the DINO-style projection head and loss, the EMA teacher.

FOLK (Monsefi et al., ICLR 2025) trains on two augmented views u, v of each image. The student sees
frequency-filtered views u~, v~ (image-adaptive Com / RCom masks, :func:`mfm_fast.make_adaptive_masks`)
and has two jobs:

(a) reconstruct the removed frequencies: MFM head + :class:`mfm_fast.MaskedFreqLoss`, target u (resp. v);
(b) predict the teacher's representation of the *other*, unfiltered view: DINO cross-entropy
    H(t(u), s(v~)) + H(t(v), s(u~)), halved, with t = softmax((teacher(.) - c) / T_t) (centering c +
    sharpening T_t) and s = log_softmax(student(.) / T_s).

The teacher is an exponential moving average of the student's encoder + projection head (never of
the MFM head), updated after every optimiser step with a momentum that follows DINO's cosine schedule
from ``momentum_teacher`` (0.996) to 1. Defaults are DINO's (ViT-S/16 recipe): 3-layer MLP head,
hidden 2048, bottleneck 256, 65,536 prototypes, weight-normalised last layer with fixed norm, student
temperature 0.1, teacher temperature 0.04 (linear warm-up from ``warmup_teacher_temp`` optional),
centre momentum 0.9. Every value is an option of ``python -m mfm_fast.pretrain --method folk``.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .head import MFMHead


class DINOHead(nn.Module):
    """DINO projection head: MLP (in -> hidden -> ... -> bottleneck, GELU), L2-normalise, weight-normalised
    linear layer to ``out_dim`` prototypes. (N, in_dim) -> (N, out_dim) logits.

    The last layer is W = g * V / ||V||_row (torch's weight norm, dim 0); with ``norm_last_layer`` the
    scale g is fixed at 1 (DINO's default, which stabilises training)."""

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 nlayers: int = 3, norm_last_layer: bool = True):
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"nlayers: must be >= 1, got {nlayers}")
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers = []
        for i in range(nlayers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < nlayers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        self.last_layer.parametrizations.weight.original0.data.fill_(1.0)
        self.last_layer.parametrizations.weight.original0.requires_grad_(not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


class FOLKModel(nn.Module):
    """The student: timm encoder + MFMHead + DINOHead. x (N, 3, S, S) -> (prediction (N, 3, S, S), logits (N, K)).

    One encoder pass feeds both heads: the MFM head reads the feature map / tokens, the projection head the
    pooled representation ``encoder.forward_head(features, pre_logits=True)`` (the CLS token of a ViT, the
    global average of a CNN)."""

    def __init__(self, encoder: nn.Module, head: MFMHead, dino_head: DINOHead):
        super().__init__()
        self.encoder, self.head, self.dino_head = encoder, head, dino_head

    def forward(self, x: torch.Tensor):
        features = self.encoder.forward_features(x)
        return self.head(features), self.dino_head(self.encoder.forward_head(features, pre_logits=True))


class Projector(nn.Module):
    """encoder + projection head without the MFM head: what the teacher is. x -> logits (N, K).

    Built around the student's own modules (shared parameters), it is also the student side of the EMA."""

    def __init__(self, encoder: nn.Module, dino_head: DINOHead):
        super().__init__()
        self.encoder, self.dino_head = encoder, dino_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dino_head(self.encoder.forward_head(self.encoder.forward_features(x), pre_logits=True))


def teacher_momentum(step: int, total: int, base: float = 0.996) -> float:
    """DINO's cosine EMA schedule: 1 - (1 - base) (cos(pi step / total) + 1) / 2, from base at step 0 to 1."""
    return 1.0 - (1.0 - base) * (math.cos(math.pi * step / max(total, 1)) + 1.0) / 2.0


def teacher_temperature(step: int, warmup_steps: int, warmup_temp: float = 0.04, temp: float = 0.04) -> float:
    """DINO's teacher temperature: linear from warmup_temp to temp over warmup_steps, then temp."""
    if step >= warmup_steps:
        return temp
    return warmup_temp + (temp - warmup_temp) * step / warmup_steps


class DINOLoss(nn.Module):
    """Cross-view distillation loss with centering and sharpening (DINO), for 2 views.

    forward(student_logits (2B, K), teacher_logits (2B, K), teacher_temp) -> scalar, with both inputs laid
    out as [view u of the B images; view v]: 0.5 * (H(t_u, s_v) + H(t_v, s_u)), H(t, s) = mean over images of
    -sum_k t_k log s_k, t = softmax((teacher - center) / teacher_temp), s = softmax(student / student_temp).
    Computed in float32. ``last_kl`` keeps (detached, on the device) the loss minus the teacher's mean entropy,
    i.e. 0.5 (KL(t_u || s_v) + KL(t_v || s_u)): the part the student can still remove (the entropy part rises
    while the centre flattens the teacher). In training mode the centre then moves to
    center_momentum * center + (1 - center_momentum) * mean(teacher logits) (averaged over every process
    under torch.distributed), on the device: no host sync."""

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.student_temp, self.center_momentum = student_temp, center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        if student.shape != teacher.shape or student.dim() != 2 or student.shape[0] % 2:
            raise ValueError(f"student, teacher: expected equal shapes (2B, K), got {tuple(student.shape)} and "
                             f"{tuple(teacher.shape)}")
        teacher = teacher.detach().float()
        log_s = F.log_softmax(student.float() / self.student_temp, dim=-1).chunk(2)
        log_t = F.log_softmax((teacher - self.center) / teacher_temp, dim=-1)
        p_t = log_t.exp()
        t = p_t.chunk(2)
        loss = 0.5 * (-(t[0] * log_s[1]).sum(-1).mean() - (t[1] * log_s[0]).sum(-1).mean())
        self.last_kl = (loss + (p_t * log_t).sum(-1).mean()).detach()  # + the mean teacher entropy
        if self.training:
            self.update_center(teacher)
        return loss

    @torch.no_grad()
    def update_center(self, teacher: torch.Tensor) -> None:
        batch_sum = teacher.sum(dim=0, keepdim=True)
        count = teacher.shape[0]
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_sum)
            count *= dist.get_world_size()
        self.center.mul_(self.center_momentum).add_(batch_sum / count, alpha=1.0 - self.center_momentum)


class SelfDistillation(nn.Module):
    """FOLK's teacher side for a training loop: the EMA teacher, the DINO loss and their schedules.

    ``student``: a :class:`FOLKModel` (already on its device). The teacher is a deep copy of the student's
    encoder + projection head (timm's ``ModelEmaV3``: parameters and float buffers, teacher in eval mode,
    no gradients), updated by :meth:`update_teacher` only. Steps are optimiser steps (0-based).
    """

    def __init__(self, student: FOLKModel, total_steps: int, *, momentum_teacher: float = 0.996,
                 student_temp: float = 0.1, teacher_temp: float = 0.04, warmup_teacher_temp: float = 0.04,
                 warmup_teacher_temp_steps: int = 0, center_momentum: float = 0.9, freeze_last_layer_steps: int = 0):
        super().__init__()
        from timm.utils import ModelEmaV3

        self._student = [Projector(student.encoder, student.dino_head)]  # a list: not a submodule of self
        self.teacher = ModelEmaV3(self._student[0], decay=momentum_teacher, foreach=True)
        self.teacher.requires_grad_(False)
        out_dim = student.dino_head.last_layer.weight.shape[0]
        self.loss = DINOLoss(out_dim, student_temp, center_momentum).to(next(student.parameters()).device)
        self.total_steps, self.momentum_teacher = total_steps, momentum_teacher
        self.temps = (warmup_teacher_temp, teacher_temp, warmup_teacher_temp_steps)
        self.freeze_last_layer_steps = freeze_last_layer_steps
        self.last_layer = list(student.dino_head.last_layer.parameters())

    @torch.no_grad()
    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's logits (N, K) of normalised unfiltered views x (N, 3, S, S)."""
        return self.teacher.module(x)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, step: int) -> torch.Tensor:
        """The DINO loss of :class:`DINOLoss` at this step's teacher temperature (updates the centre; its KL part
        is then in ``self.loss.last_kl``)."""
        warm, temp, warm_steps = self.temps
        return self.loss(student_logits, teacher_logits, teacher_temperature(step, warm_steps, warm, temp))

    def cancel_last_layer_grads(self, step: int) -> None:
        """DINO freezes the projection head's last layer for the first steps: drop its gradients."""
        if step < self.freeze_last_layer_steps:
            for p in self.last_layer:
                p.grad = None

    @torch.no_grad()
    def update_teacher(self, step: int) -> float:
        """teacher <- m teacher + (1 - m) student with m = teacher_momentum(step); returns m."""
        m = teacher_momentum(step, self.total_steps, self.momentum_teacher)
        self.teacher.apply_update_(self._student[0], decay=m)
        return m
