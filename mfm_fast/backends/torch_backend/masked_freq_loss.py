"""Torch backend for the masked spectral loss: one rfft2 of (pred - target), analytic gradient.

Half-spectrum form of docs/spec.md §3. With D = rfft2_ortho(pred - target) on the unshifted half
grid (H, W//2 + 1), s = sqrt(|D|^2 + 1e-12), d = s^gamma and c the per-frequency weight (symmetrised
1 - mask, times the focal matrix, over the reduction's denominator Z):

    loss  = sum_k colw_k c_k d_k                (colw = 1, 2, ..., 2, 1 over the columns)
    dL/dp = irfft2_ortho(c * gamma * (d / s) * (D / s))     (= c gamma s^(gamma - 2) D)

s is computed hypot-style, s = hypot(hypot(Re D, Im D), 1e-6), never squaring |D|: an fp32 spectrum
of magnitude 1e19 (|D|^2 past fp32's 3.4e38) still gives the right d whenever d itself fits in fp32.

The gradient is computed in the forward pass (one extra irfft2), so backward only scales it by
grad_output. Double backward (``create_graph=True``: gradient penalties, Hessian-vector products)
recomputes the loss from the saved inputs with differentiable torch ops and differentiates that, so
second derivatives are exact (tests check them with gradgradcheck against the reference). Ops: ``torch.ops.mfm_fast.masked_freq_loss_torch`` (masked / mean / sum, returns
(loss, grad)) and ``torch.ops.mfm_fast.masked_freq_loss_map_torch`` (reduction "none", whose
backward transforms the incoming per-frequency gradient map).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..._common import channel_view, compute_dtype, from_blocks, to_blocks, to_unit_float
from ..._options import LossOptions, from_op_args, op_kwargs, schema_names
from ._halfspec import column_weights, full_from_half, symmetric_half

EPS = 1e-12
SQRT_EPS = 1e-6  # s = hypot(|D|, SQRT_EPS) = sqrt(|D|^2 + EPS)


def target_in(target: torch.Tensor, dtype: torch.dtype, target_mean, target_std) -> torch.Tensor:
    """target as `dtype` (uint8 / 255), normalised as (t - mean) / std per channel when target_mean is given."""
    t = to_unit_float(target, dtype)
    if target_mean is not None:
        t = (t - channel_view(target_mean, t)) / channel_view(target_std, t)
    return t


def focal_weights(magnitude: torch.Tensor, alpha: float, log_matrix: bool, batch_matrix: bool) -> torch.Tensor:
    """Focal matrix from |D|: a = |D|^alpha (log(1 + a) if log_matrix) / its max per (image, patch,
    channel) (or over the batch), NaN -> 0, clamped to [0, 1], detached."""
    focal = magnitude.detach() ** alpha
    if log_matrix:
        focal = torch.log(focal + 1.0)
    focal = focal / (focal.amax() if batch_matrix else focal.amax(dim=(-2, -1), keepdim=True))
    return torch.where(torch.isnan(focal), torch.zeros_like(focal), focal).clamp_(0.0, 1.0)


def reduction_scale(reduction: str, mask: Optional[torch.Tensor], n_images: int, channels: int, height: int,
                    width: int, ave_spectrum: bool, loss_weight: float, dtype: torch.dtype):
    """The factor turning the weighted sum into the reduction: masked 1 / (C sum(1 - mask)) (a tensor: no host
    sync), mean 1 / (entries of the map), sum 1; times loss_weight."""
    if reduction == "masked":
        return loss_weight / (channels * (1.0 - mask.to(dtype)).sum()).clamp_min(1e-30)
    if reduction == "mean":
        map_images = n_images if (mask is not None or not ave_spectrum) else 1
        return loss_weight / (map_images * channels * height * width)
    return loss_weight


def _spectral_terms(pred, target, mask, patch_factor, ave_spectrum, target_mean, target_std,
                    with_matrix, alpha, log_matrix, batch_matrix):
    """D (n, C, P, h, w//2+1) complex, s = sqrt(|D|^2 + 1e-12) (hypot-style: no overflow), the focal matrix or
    None, the symmetrised weight or None."""
    cdt = compute_dtype(pred)
    diff = to_blocks(pred.to(cdt) - target_in(target, cdt, target_mean, target_std), patch_factor)
    if ave_spectrum:
        diff = diff.mean(dim=0, keepdim=True)
    D = torch.fft.rfft2(diff, norm="ortho")
    magnitude = D.abs()  # hypot(Re, Im): no overflow
    focal = focal_weights(magnitude, alpha, log_matrix, batch_matrix) if with_matrix else None
    weight = None
    if mask is not None:
        weight = symmetric_half(to_blocks(1.0 - mask.to(cdt), patch_factor))[:, None]  # (N, 1, P, h, w//2+1)
    return D, torch.hypot(magnitude, magnitude.new_tensor(SQRT_EPS)), focal, weight


def pow_half_gamma(s2: torch.Tensor, gamma: float) -> torch.Tensor:
    """(s^2)^(gamma / 2) of a squared distance (the magnitude/phase distance)."""
    return s2.sqrt() if gamma == 1.0 else s2 ** (gamma / 2)


def pow_gamma(s: torch.Tensor, gamma: float) -> torch.Tensor:
    """d = s^gamma."""
    return s if gamma == 1.0 else s ** gamma


def _grad_from_coef(coef, D, s, gamma, n_images, height, width, patch_factor):
    """irfft2_ortho(coef * s^(gamma-2) * D), summed over the batch when D is an average spectrum.

    Formed as coef * s^(gamma-1) * (D / s): every factor stays in range when |D|^2 would overflow."""
    unit = D / s  # |D / s| <= 1
    G = (coef * pow_gamma(s, gamma - 1.0)) * unit if gamma != 1.0 else coef * unit
    if D.shape[0] == 1 and n_images > 1:  # ave_spectrum: D is the batch mean, dD/dp_n = F / N
        G = G.sum(dim=0, keepdim=True) / n_images
    g = from_blocks(torch.fft.irfft2(G, s=(height // patch_factor, width // patch_factor), norm="ortho"), patch_factor)
    return g.expand(n_images, -1, -1, -1)


@torch.library.custom_op("mfm_fast::masked_freq_loss_torch", mutates_args=())
def masked_freq_loss(pred: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor], loss_gamma: float,
                     reduction: str, with_matrix: bool, alpha: float, log_matrix: bool, batch_matrix: bool,
                     ave_spectrum: bool, patch_factor: int, loss_weight: float,
                     target_mean: Optional[list[float]], target_std: Optional[list[float]],
                     need_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scalar loss (reduction masked / mean / sum) and, when need_grad, dloss/dpred (N, C, H, W) in pred's dtype.

    The second output is empty when need_grad is False.
    """
    n, _, height, width = pred.shape
    loss, D, s, coef = _loss_terms(pred, target, mask, loss_gamma, reduction, with_matrix, alpha, log_matrix,
                                   batch_matrix, ave_spectrum, patch_factor, loss_weight, target_mean, target_std)
    if not need_grad:
        return loss, pred.new_empty(0)
    grad = _grad_from_coef(coef * loss_gamma, D, s, loss_gamma, n, height, width, patch_factor)
    return loss, grad.to(pred.dtype).contiguous()


def _loss_terms(pred, target, mask, loss_gamma, reduction, with_matrix, alpha, log_matrix, batch_matrix,
                ave_spectrum, patch_factor, loss_weight, target_mean, target_std):
    """(loss, D, s, coef = c * scale): plain differentiable torch ops (the double-backward path runs them)."""
    n, channels, height, width = pred.shape
    D, s, focal, weight = _spectral_terms(pred, target, mask, patch_factor, ave_spectrum, target_mean, target_std,
                                          with_matrix, alpha, log_matrix, batch_matrix)
    coef = 1.0
    if focal is not None:
        coef = focal
    if weight is not None:
        coef = weight * coef
    scale = reduction_scale(reduction, mask, n, channels, height, width, ave_spectrum, loss_weight, s.dtype)
    d = pow_gamma(s, loss_gamma)
    loss = ((coef * d) * column_weights(width // patch_factor, d)).sum() * scale
    return loss, D, s, coef * scale


def loss_value(pred, target, mask, options: LossOptions) -> torch.Tensor:
    """The scalar loss of :func:`masked_freq_loss` as differentiable torch ops (autograd through rfft2)."""
    return _loss_terms(pred, target, mask, **op_kwargs(options, _TERMS_OPTIONS))[0]


@masked_freq_loss.register_fake
def _(pred, target, mask, loss_gamma, reduction, with_matrix, alpha, log_matrix, batch_matrix, ave_spectrum,
      patch_factor, loss_weight, target_mean, target_std, need_grad):
    loss = pred.new_empty((), dtype=compute_dtype(pred))
    return loss, (pred.new_empty(pred.shape) if need_grad else pred.new_empty(0))


def _target_grad(grad_pred, target_std, dtype):
    """dL/dtarget = -dL/dpred, divided by std when the target is normalised inside the op."""
    grad = -grad_pred
    if target_std is not None:
        grad = grad / channel_view(target_std, grad)
    return grad.to(dtype)


class DoubleBackwardError(RuntimeError):
    """create_graph=True through a loss op whose backend has no differentiable recomputation."""


def register_saved_grad_autograd(op, recompute=None, scale_in_place=None) -> None:
    """Autograd for a loss op (pred, target, mask, ...) -> (loss, dloss/dpred computed in the forward pass):
    backward scales the saved gradient by grad_output (any strides) and maps it to the target
    (-grad, divided by the normalisation std when the op normalised the target: its argument
    ``target_std``, if the op has one). Shared by the torch, triton and cuda backends. `op`: a custom_op
    or its "namespace::name"; its inputs are read by their schema names.

    ``scale_in_place(grad, grad_output)``: scales the saved gradient buffer in place (no copy) and returns
    it, or returns None where it must not (see cuda_backend); then, and without it, ``grad * grad_output``
    (a new tensor).

    Double backward (backward under create_graph=True): ``recompute(pred, target, mask, options)``, with
    ``options`` the op's other arguments as {name: value}, must return the same scalar loss as
    differentiable torch ops; the gradient is then taken through it with create_graph=True, so it is exact
    to every order. Without ``recompute`` it raises :class:`DoubleBackwardError` (never a silent zero
    second derivative)."""
    name = getattr(op, "_name", str(op))
    names = schema_names(op)

    def setup_context(ctx, inputs, output):
        args = dict(zip(names, inputs))
        ctx.save_for_backward(output[1], *(inputs[:3] if recompute is not None else ()))
        ctx.options = dict(zip(names[3:], inputs[3:]))
        ctx.target_std = args.get("target_std")
        ctx.target_dtype = inputs[1].dtype

    def backward(ctx, grad_loss, _grad_of_grad):
        grad, *inputs = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the saved gradient has no graph of its own
            if recompute is None:
                raise DoubleBackwardError(
                    f"{name}: double backward (create_graph=True) is not supported by this backend (its gradient "
                    "is computed in the forward kernel); use backend='torch' or 'reference' for gradient "
                    "penalties and Hessian-vector products")
            return _recomputed_grads(ctx, lambda p, t, m: recompute(p, t, m, ctx.options), inputs, grad_loss,
                                     len(names))
        scaled = scale_in_place(grad, grad_loss) if scale_in_place is not None else None
        if scaled is None:
            scaled = grad * grad_loss.to(grad.dtype)
        grad_pred = scaled if ctx.needs_input_grad[0] else None
        grad_target = _target_grad(scaled, ctx.target_std, ctx.target_dtype) if ctx.needs_input_grad[1] else None
        return (grad_pred, grad_target) + (None,) * (len(names) - 2)

    torch.library.register_autograd(op, backward, setup_context=setup_context)


def _recomputed_grads(ctx, loss_of, inputs, grad_out, num_inputs):
    """Gradients of loss_of(pred, target, mask) w.r.t. pred / target (those that need one), with create_graph;
    None for the op's other `num_inputs` - 2 inputs."""
    pred, target, mask = inputs
    wrt = [t for t, need in ((pred, ctx.needs_input_grad[0]), (target, ctx.needs_input_grad[1])) if need]
    out = loss_of(pred, target, mask)
    grads = iter(torch.autograd.grad(out, wrt, grad_out, create_graph=True, allow_unused=True) if wrt else ())
    return tuple(next(grads) if need else None for need in ctx.needs_input_grad[:2]) + (None,) * (num_inputs - 2)


def loss_value_of_op_args(pred, target, mask, args: dict) -> torch.Tensor:
    """The loss of a flat loss op's arguments {name: value} (options it lacks at their defaults) as
    differentiable torch ops: the double-backward recomputation of every backend's loss op."""
    return loss_value(pred, target, mask, from_op_args(LossOptions, args))


register_saved_grad_autograd(masked_freq_loss, recompute=loss_value_of_op_args)
_TERMS_OPTIONS = tuple(n for n in schema_names(masked_freq_loss) if n not in ("pred", "target", "mask", "need_grad"))


@torch.library.custom_op("mfm_fast::masked_freq_loss_map_torch", mutates_args=())
def masked_freq_loss_map(pred: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor], loss_gamma: float,
                         with_matrix: bool, alpha: float, log_matrix: bool, batch_matrix: bool, ave_spectrum: bool,
                         patch_factor: int, loss_weight: float, target_mean: Optional[list[float]],
                         target_std: Optional[list[float]]) -> torch.Tensor:
    """The unreduced map loss_weight * w * d on the fftshift-ed grid: (N, C, H, W) (batch 1 for ave_spectrum without a mask)."""
    return loss_map_value(pred, target, mask, loss_gamma, with_matrix, alpha, log_matrix, batch_matrix, ave_spectrum,
                          patch_factor, loss_weight, target_mean, target_std)


def loss_map_value(pred, target, mask, loss_gamma, with_matrix, alpha, log_matrix, batch_matrix, ave_spectrum,
                   patch_factor, loss_weight, target_mean, target_std) -> torch.Tensor:
    """The map of :func:`masked_freq_loss_map` as differentiable torch ops (the double-backward path)."""
    width = pred.shape[-1]
    D, s, focal, _ = _spectral_terms(pred, target, None, patch_factor, ave_spectrum, target_mean, target_std,
                                     with_matrix, alpha, log_matrix, batch_matrix)
    d = pow_gamma(s, loss_gamma)
    if focal is not None:
        d = focal * d
    out = from_blocks(full_from_half(d, width // patch_factor), patch_factor)
    if mask is not None:
        out = out * (1.0 - mask.to(out.dtype))[:, None]
    return (out * loss_weight).to(compute_dtype(pred))


@masked_freq_loss_map.register_fake
def _(pred, target, mask, loss_gamma, with_matrix, alpha, log_matrix, batch_matrix, ave_spectrum,
      patch_factor, loss_weight, target_mean, target_std):
    n = pred.shape[0] if (mask is not None or not ave_spectrum) else 1
    return pred.new_empty((n,) + tuple(pred.shape[1:]), dtype=compute_dtype(pred))


def _map_setup_context(ctx, inputs, output):
    pred, target, mask = inputs[:3]
    ctx.save_for_backward(pred, target, mask)
    ctx.options = dict(zip(_MAP_NAMES[3:], inputs[3:]))


@torch.library.custom_op("mfm_fast::masked_freq_loss_map_backward_torch", mutates_args=())
def masked_freq_loss_map_backward(grad_map: torch.Tensor, pred: torch.Tensor, target: torch.Tensor,
                                  mask: Optional[torch.Tensor], loss_gamma: float, with_matrix: bool, alpha: float,
                                  log_matrix: bool, batch_matrix: bool, ave_spectrum: bool, patch_factor: int,
                                  loss_weight: float, target_mean: Optional[list[float]],
                                  target_std: Optional[list[float]]) -> torch.Tensor:
    """d(sum grad_map * map)/dpred (N, C, H, W) in the compute dtype: the backward of masked_freq_loss_map."""
    n, _, height, width = pred.shape
    D, s, focal, _ = _spectral_terms(pred, target, None, patch_factor, ave_spectrum, target_mean, target_std,
                                     with_matrix, alpha, log_matrix, batch_matrix)
    coef = grad_map.to(s.dtype) * (loss_weight * loss_gamma)
    if mask is not None:
        coef = coef * (1.0 - mask.to(s.dtype))[:, None]
    coef = symmetric_half(to_blocks(coef, patch_factor))
    if focal is not None:
        coef = coef * focal
    return _grad_from_coef(coef, D, s, loss_gamma, n, height, width, patch_factor).contiguous()


@masked_freq_loss_map_backward.register_fake
def _(grad_map, pred, *args):
    return pred.new_empty(pred.shape, dtype=compute_dtype(pred))


def _map_backward(ctx, grad_map):
    pred, target, mask = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: differentiate the map recomputed as plain torch ops
        return _recomputed_grads(ctx, lambda p, t, m: loss_map_value(p, t, m, **ctx.options), (pred, target, mask),
                                 grad_map, len(_MAP_NAMES))
    grad = masked_freq_loss_map_backward(grad_map, pred, target, mask, **ctx.options)
    grad_pred = grad.to(pred.dtype) if ctx.needs_input_grad[0] else None
    grad_target = _target_grad(grad, ctx.options["target_std"], target.dtype) if ctx.needs_input_grad[1] else None
    return (grad_pred, grad_target) + (None,) * (len(_MAP_NAMES) - 2)


_MAP_NAMES = schema_names(masked_freq_loss_map)
masked_freq_loss_map.register_autograd(_map_backward, setup_context=_map_setup_context)
