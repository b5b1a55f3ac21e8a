"""Checkpoints of a pre-training run: atomic writes, the checks a checkpoint passes before any weight is
loaded (kind, model, size, method, task), the output folder's fresh-start / resume decision, every random
stream of every rank, and the log trimmed to the resumed step.

checkpoint.pth holds model, optimizer, scaler, step, epoch, batch_in_epoch, schedule, args, rng (one entry
per rank), world_size, format (and distiller for --method folk); torch.load(weights_only=True) reads it."""

from __future__ import annotations

import contextlib
import json
import os
import random
import sys
import zipfile
from pathlib import Path
from typing import Callable, Optional, Tuple

import numpy as np
import torch
from torch import nn

from ..cli import ArgError, flag_of as _flag
from .runtime import gather

CHECKPOINT_NAME = "checkpoint.pth"


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


def read_checkpoint(path, flag: str, expected: str, stand_ins=None):
    """torch.load(path, weights_only=True, mmap=True): tensors, numbers, strings only, the tensors memory-mapped.
    ArgError naming `flag` and ending with `expected` (what to pass instead): no such file, not a complete zip
    archive (truncated, another kind of file), unreadable. stand_ins(path) may list (class, "module.Name") pairs
    that take the place of the file's other Python objects (torch.serialization.safe_globals)."""
    p = Path(path)
    if not p.is_file():
        raise ArgError(f"{flag}: no such checkpoint {str(path)!r} ({expected})")
    if not zipfile.is_zipfile(p):
        raise ArgError(f"{flag}: {path} is not a torch checkpoint file (not a complete zip archive: truncated, or "
                       f"another kind of file); {expected}")
    try:
        with torch.serialization.safe_globals(stand_ins(p) if stand_ins else []):
            return torch.load(p, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # a damaged archive, a foreign pickle: all one line
        why = (str(exc).strip().splitlines() or [""])[0].split(". ")[0][:160]
        raise ArgError(f"{flag}: {path} is not a readable checkpoint ({type(exc).__name__}: {why}); "
                       f"{expected}") from None


def check_checkpoint(path, flag: str, **expected) -> dict:
    """The ``args`` of the pretrain checkpoint at `path`, checked before any weight is loaded; ArgError naming
    `flag` otherwise: no such file, unreadable (truncated, not a torch file), the encoder.pth state dict (timm
    weights only) instead of checkpoint.pth, or saved arguments that differ from ``expected`` (model,
    img_size, method, task: name -> value, None = any). Reads the pickle only (mmap), not the tensors."""
    p = Path(path)
    ckpt = read_checkpoint(p, flag, "expected a checkpoint.pth written by python -m mfm_fast.pretrain")
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


def plan_output(args, check_resume: Optional[Callable[[str], object]] = None,
                writes: bool = True) -> Optional[str]:
    """The checkpoint to resume from (None: a fresh start), after checking it (check_resume(path) raises an
    ArgError for one this run cannot continue) and the output folder.

    A fresh run into a folder that holds an earlier run's checkpoint.pth or log.jsonl stops (ArgError naming
    --resume auto and --overwrite) unless --overwrite is given, or the run writes nothing there (writes=False)."""
    out_dir = Path(args.output_dir)
    ckpt_path, log_path = out_dir / CHECKPOINT_NAME, out_dir / "log.jsonl"
    if out_dir.exists() and not out_dir.is_dir():
        raise ArgError(f"--output-dir: {args.output_dir!r} is a file, not a folder")
    resume = args.resume
    if resume == "auto":
        resume = str(ckpt_path) if ckpt_path.exists() else None
    if resume is not None and check_resume is not None:
        check_resume(resume)
    earlier = [f.name for f in (ckpt_path, log_path) if f.exists() and f.stat().st_size > 0]
    same = resume is not None and Path(resume).resolve() == ckpt_path.resolve()
    if earlier and writes and not same and not args.overwrite and args.resume != "auto":
        raise ArgError(f"--output-dir: {out_dir} already holds an earlier run ({', '.join(earlier)}); pass "
                       "--resume auto to continue it, --overwrite to replace it, or another --output-dir")
    return resume


def prepare_output_dir(out_dir: Path, fresh: bool, stale=(CHECKPOINT_NAME, "encoder.pth")) -> None:
    """Create --output-dir; on a fresh start (plan_output allowed it) remove an earlier run's `stale` files
    (checkpoint.pth, encoder.pth), so that no earlier checkpoint can be resumed later."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if fresh:
        for name in stale:
            (out_dir / name).unlink(missing_ok=True)


def rng_state(mask_gen: Optional[torch.Generator] = None) -> dict:
    """Every random stream of this process (and the mask generator, when the run has one), in a
    weights_only-loadable form."""
    np_state, py_state = np.random.get_state(), random.getstate()
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            **({"mask": mask_gen.get_state()} if mask_gen is not None else {}),
            "python": [list(py_state[1]), py_state[2]],
            "numpy": [torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                      float(np_state[4])]}


def set_rng_state(state: dict, mask_gen: Optional[torch.Generator] = None) -> None:
    """Restore what rng_state saved: torch (CPU and CUDA), the mask generator (when given), Python's and NumPy's
    streams."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if mask_gen is not None:
        mask_gen.set_state(state["mask"])
    random.setstate((3, tuple(state["python"][0]), state["python"][1]))
    keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))


def save_training_state(path, *, step: int, net: nn.Module, optimizer, scaler, distiller, batches, sched: dict,
                        args, mask_gen: torch.Generator, rank: int, world: int) -> None:
    """Write the run's checkpoint.pth at `step` (rank 0 writes; collective: every rank hands in its random
    streams). `batches` gives the data position (epoch, batch_in_epoch); distiller is None unless --method folk."""
    rngs = gather(rng_state(mask_gen), world)
    if rank != 0:
        return
    save_checkpoint({"model": net.state_dict(), "optimizer": optimizer.state_dict(),
                     "scaler": scaler.state_dict() if scaler.is_enabled() else None, "step": step,
                     "epoch": batches.epoch, "batch_in_epoch": batches.batch_in_epoch, "schedule": sched,
                     "args": vars(args), "rng": rngs, "world_size": world, "format": 1,
                     **({"distiller": distiller.state_dict()} if distiller is not None else {})}, path)


def load_training_state(path, *, net: nn.Module, optimizer, scaler, distiller, batches, sched: dict,
                        mask_gen: torch.Generator, rank: int, world: int) -> Tuple[dict, int]:
    """Restore a checkpoint (checked by plan_output: a full checkpoint of this model, size, method and task)
    into the run: weights, optimiser, scaler, data position and, on the same number of processes, every random
    stream. Returns (schedule, step) to continue: the checkpoint's schedule, whatever `sched` these arguments give."""
    ckpt = load_checkpoint(path)
    net.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if distiller is not None:
        if "distiller" not in ckpt:
            raise ArgError(f"--resume: {path} is not a --method folk checkpoint (no teacher)")
        distiller.load_state_dict(ckpt["distiller"])
    if ckpt["scaler"]:
        scaler.load_state_dict(ckpt["scaler"])
    if ckpt["schedule"] != sched and rank == 0:
        print(f"pretrain: --resume: continuing the checkpoint's schedule {ckpt['schedule']} "
              f"(these arguments give {sched})", file=sys.stderr)
    batches.epoch, batches.batch_in_epoch = ckpt["epoch"], ckpt["batch_in_epoch"]
    if ckpt["world_size"] == world:
        set_rng_state(ckpt["rng"][rank], mask_gen)
    elif rank == 0:
        print(f"pretrain: --resume: the checkpoint ran on {ckpt['world_size']} processes, this run on {world}: "
              "weights, optimiser and schedule continue, data order and masks do not", file=sys.stderr)
    return ckpt["schedule"], ckpt["step"]
