"""One frozen options object per op family, passed from the front-end to every backend.

The front-ends (mfm_fast.loss, mfm_fast.corruption, mfm_fast.adaptive_masks) validate the user's
arguments and build these; the backends read them by name. A torch.library op schema stays flat
(schemas need flat arguments): :func:`op_kwargs` fills such a schema's arguments from the options by
name, and :func:`schema_names` reads the names from the op. Low level: imports nothing from mfm_fast.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch


@dataclasses.dataclass(frozen=True)
class LossOptions:
    """Everything but the tensors of :func:`mfm_fast.masked_freq_loss`, validated (docs there).

    target_mean / target_std: per-channel statistics (None: the target is already normalised);
    mask_band: the promise R or None; precision: the Triton GEMM precision."""
    loss_gamma: float = 1.0
    reduction: str = "masked"
    with_matrix: bool = False
    alpha: float = 1.0
    log_matrix: bool = False
    batch_matrix: bool = False
    ave_spectrum: bool = False
    patch_factor: int = 1
    loss_weight: float = 1.0
    target_mean: Optional[Tuple[float, ...]] = None
    target_std: Optional[Tuple[float, ...]] = None
    mask_band: Optional[int] = None
    precision: str = "tf32x3"
    distance: str = "complex"
    phase_weight: float = 1.0


@dataclasses.dataclass(frozen=True)
class CorruptOptions:
    """Everything but the tensors of :func:`mfm_fast.corrupt` on one (N, C, H, W) batch of planes (patches
    already split), validated: per-channel mean / std, the result dtype, the mask_band promise (0: none)
    and the Triton GEMM precision."""
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    out_dtype: torch.dtype
    mask_band: int = 0
    precision: str = "tf32x3"


@dataclasses.dataclass(frozen=True)
class AdaptiveMaskOptions:
    """Everything but the tensors (images x, the per-image Com choice com) of
    :func:`mfm_fast.make_adaptive_masks`, validated."""
    keep_ratio: float
    magnitude: str = "mean"
    dc: Optional[str] = None


def schema_names(op) -> Tuple[str, ...]:
    """The argument names of a torch.library op (a custom_op, an OpOverload or a "namespace::name" string), in
    schema order."""
    if isinstance(op, str):
        namespace, name = op.split("::")
        op = getattr(getattr(torch.ops, namespace), name).default
    schema = op._opoverload._schema if hasattr(op, "_opoverload") else op._schema
    return tuple(argument.name for argument in schema.arguments)


def op_kwargs(options, names, **extra) -> dict:
    """{name: value} for the argument `names` of a flat op schema: from `extra` if given there, else the field
    of `options` with that name (tuples as lists, as schemas take list[float])."""
    out = {}
    for name in names:
        value = extra[name] if name in extra else getattr(options, name)
        out[name] = list(value) if isinstance(value, tuple) else value
    return out


def from_op_args(cls, args: dict):
    """An options object of class `cls` from a flat op's {argument: value}: the fields the op has, the
    defaults of the others (the ones the op does not implement)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in args.items() if k in fields})
