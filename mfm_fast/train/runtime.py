"""Where the run executes: the device, the torch.distributed process group under torchrun, the autocast
dtype, and the cross-rank helpers (gather, weight fingerprints)."""

from __future__ import annotations

import hashlib
import os
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from ..cli import ArgError


def pick_device(name: str) -> torch.device:
    """--device auto | cuda | cpu -> torch.device (auto: CUDA when available); ArgError when cuda is missing."""
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


def run_distributed(args, body):
    """body(rank, world_size, device) inside the process group of init_distributed(args), which is destroyed
    afterwards (also on an error)."""
    rank, world, device = init_distributed(args)
    try:
        return body(rank, world, device)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def fingerprint(net: nn.Module) -> str:
    """SHA-256 of every parameter's bytes: equal on all ranks iff the weights are identical (buffers such as
    BatchNorm running statistics are rank-local under DDP and left out)."""
    h = hashlib.sha256()
    for name, t in net.named_parameters():
        h.update(name.encode())
        h.update(t.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())  # logical order, any layout
    return h.hexdigest()


def gather(obj, world: int) -> list:
    """`obj` of every rank, in rank order (all_gather_object; [obj] in a single process)."""
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def amp_dtype_of(args, device: torch.device) -> Optional[torch.dtype]:
    """--amp -> the autocast dtype (None: no autocast); auto is bf16 on CUDA, none on the CPU."""
    name = args.amp if args.amp != "auto" else ("bf16" if device.type == "cuda" else "none")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[name]

