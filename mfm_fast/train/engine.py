"""The pre-training loop (what MAE's engine_pretrain.py is to its main_pretrain.py).

Per optimiser step: --accum-iter micro-batches of corrupt -> forward -> loss -> backward, the scheduled lr,
then clip and step, skipped on the device when the loss or gradient is non-finite. The logged quantities are
summed on the device and read every --log-every steps (the loop's only host syncs); checkpoints and pictures
follow at their intervals. ``train`` runs it on a TrainingRun that mfm_fast.pretrain builds and returns the
run's statistics.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import time
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from timm.scheduler import CosineLRScheduler
from torch import nn

from .._common import imagenet_normalize
from .checkpoint import CHECKPOINT_NAME, save_checkpoint, save_training_state
from ..folk import SelfDistillation, teacher_momentum
from .model import prediction
from .pretrain_data import Batches, sample_images
from .runtime import fingerprint, gather
from .tasks import Corruptor
from .visualize import render


class NonFiniteLoss(RuntimeError):
    """The loss became NaN / inf (without --skip-nonfinite)."""


@dataclasses.dataclass
class TrainingRun:
    """Everything the loop works on.

    net is the model itself (checkpoints, fingerprints, pictures); ddp_model is net or its
    DistributedDataParallel wrapper (for no_sync); model is what a step calls (ddp_model, torch.compile'd with
    --compile). sched is the schedule dict that checkpoints save; lr_scheduler is timm's scheduler built from
    it. distiller (the EMA teacher and DINO loss) is None unless --method folk."""

    args: argparse.Namespace
    rank: int
    world: int
    device: torch.device
    net: nn.Module
    ddp_model: nn.Module
    model: nn.Module
    optimizer: torch.optim.Optimizer
    sched: dict
    lr_scheduler: CosineLRScheduler
    scaler: torch.amp.GradScaler
    amp_dtype: Optional[torch.dtype]
    corruptor: Corruptor
    distiller: Optional[SelfDistillation]
    batches: Batches
    total_batch: int
    out_dir: Path

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def ckpt_path(self) -> Path:
        return self.out_dir / CHECKPOINT_NAME


class RunLog:
    """log.jsonl: one JSON record per line, written by rank 0 only (appended to when resuming)."""

    def __init__(self, path: Path, append: bool, enabled: bool):
        self.file = open(path, "a" if append else "w") if enabled else None

    def write(self, record: dict) -> None:
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()


class RunningSums:
    """On-device sums of the current log interval (loss and finite steps; --method folk: its reconstruction,
    distillation and KL parts), the run's count of skipped steps and its first non-finite step (-1: none)."""

    def __init__(self, device: torch.device):
        self.zero = torch.zeros((), device=device)
        self.loss, self.good, self.skipped = self.zero.clone(), self.zero.clone(), self.zero.clone()
        self.first_bad = self.zero - 1
        self.parts = self.zero.new_zeros(3)

    def add(self, step: int, bad: torch.Tensor, loss: torch.Tensor, parts: torch.Tensor) -> None:
        """Step `step` (0-based): its loss and parts count unless `bad` (a bool tensor, decided on the device)."""
        self.parts += torch.where(bad, self.zero, parts)
        self.first_bad = torch.where(bad & (self.first_bad < 0), float(step), self.first_bad)
        self.loss += torch.where(bad, self.zero, loss)
        self.good += (~bad).float()
        self.skipped += bad.float()

    def read(self, grad_norm: torch.Tensor, world: int) -> list:
        """[loss, finite steps, skipped, grad norm, rec, distill, kl]: sums over the ranks (the grad norm their
        mean), as floats: a host sync."""
        stats = torch.cat([torch.stack([self.loss, self.good, self.skipped, grad_norm.float()]), self.parts])
        if world > 1:
            dist.all_reduce(stats)
            stats[3] /= world
        return stats.tolist()

    def new_interval(self) -> None:
        self.loss.zero_()
        self.parts.zero_()
        self.good.zero_()


class Clock:
    """Images/s of each log interval, and of the whole run after --timing-warmup steps (CUDA synchronised)."""

    def __init__(self, run: TrainingRun, start_step: int, end_step: int):
        self.device, self.total_batch, self.start_step = run.device, run.total_batch, start_step
        self.interval_start, self.interval_step = time.perf_counter(), start_step
        self.warmup = min(run.args.timing_warmup, max(end_step - start_step - 1, 0))
        self.timed_from = (self.sync(), start_step) if self.warmup == 0 else None  # (time, step) counted from

    def sync(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def step_done(self, step: int) -> None:
        if self.timed_from is None and step - self.start_step == self.warmup:
            self.timed_from = (self.sync(), step)

    def interval_rate(self, step: int) -> float:
        """Images/s since the previous call (or the start); starts the next interval."""
        now = time.perf_counter()
        rate = (step - self.interval_step) * self.total_batch / max(now - self.interval_start, 1e-9)
        self.interval_start, self.interval_step = now, step
        return rate

    def stop(self, step: int):
        """(timed steps, their seconds) of the run."""
        end = self.sync()
        if self.timed_from is None:
            return 0, float("nan")
        return step - self.timed_from[1], end - self.timed_from[0]


# ---- one optimiser step --------------------------------------------------------------------------------

def forward_backward(run: TrainingRun, x: torch.Tensor, step: int, sync_grads: bool):
    """One micro-batch x (uint8 (B, 3, S, S); view pairs (B, 2, 3, S, S) with --method folk): corrupt, forward,
    loss, backward of loss / accum_iter (DDP all-reduces the gradients only when sync_grads).
    Returns the loss and the folk parts [rec, distill, kl] (zeros without folk), detached."""
    args, corruptor, distiller = run.args, run.corruptor, run.distiller
    if args.overfit_batch:
        corruptor.gen.manual_seed(args.seed + run.rank)  # the same masks every step
    if distiller is not None:  # (B, 2, 3, S, S) -> the 2B views [u; v]: the student sees them filtered, the teacher clean
        x = x.transpose(0, 1).reshape(-1, *x.shape[2:])
    inp, target, mask = corruptor(x)
    if args.channels_last:
        inp = inp.contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast(run.device.type, dtype=run.amp_dtype or torch.bfloat16, enabled=run.amp_dtype is not None)
    parts = torch.zeros(3, device=run.device)
    with contextlib.nullcontext() if sync_grads else run.ddp_model.no_sync():
        with autocast:
            out = run.model(inp)
        loss = corruptor.loss(prediction(out), target, mask)
        if distiller is not None:
            clean = imagenet_normalize(x.float() / 255)
            if args.channels_last:
                clean = clean.contiguous(memory_format=torch.channels_last)
            with autocast:
                teacher_logits = distiller.teacher_logits(clean)
            distill = distiller(out[1], teacher_logits, step)
            parts = torch.stack([loss.detach(), distill.detach(), distiller.loss.last_kl])
            loss = args.rec_weight * loss + args.distill_weight * distill
        run.scaler.scale(loss / args.accum_iter).backward()
    return loss.detach(), parts


def accumulate_gradients(run: TrainingRun, stream: Iterator[torch.Tensor], step: int):
    """--accum-iter micro-batches from `stream` through forward_backward (DDP syncs on the last one only);
    returns the step's mean loss and mean folk parts."""
    n = run.args.accum_iter
    step_loss, step_parts = torch.zeros((), device=run.device), torch.zeros(3, device=run.device)
    for micro in range(n):
        loss, parts = forward_backward(run, next(stream), step, sync_grads=run.world == 1 or micro == n - 1)
        step_parts += parts / n
        step_loss += loss / n
    return step_loss, step_parts


def optimizer_step(net: nn.Module, optimizer, scaler, step_loss: torch.Tensor, args, world: int):
    """Clip, then step unless the loss or gradient is non-finite, deciding on the device: the fused AdamW
    kernel reads `found_inf` (as with a GradScaler) and skips the whole update. Returns (bad, grad norm)."""
    if scaler.is_enabled():
        scaler.unscale_(optimizer)
    params = [p for p in net.parameters() if p.grad is not None]
    if args.clip_grad > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.clip_grad)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    bad = ~torch.isfinite(step_loss)
    if not scaler.is_enabled():  # with fp16 an inf gradient is the scaler's business
        bad |= ~torch.isfinite(grad_norm)
    if world > 1:
        bad_f = bad.float()
        dist.all_reduce(bad_f, op=dist.ReduceOp.MAX)  # the same decision on every rank
        bad = bad_f > 0
    if scaler.is_enabled():
        scaler.step(optimizer)
        scaler.update()
    elif optimizer.defaults.get("fused"):
        optimizer.found_inf = bad.float()
        optimizer.step()
        del optimizer.found_inf
    elif not bool(bad):  # fallback without a fused AdamW: one host sync per step
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return bad, grad_norm


# ---- the loop ------------------------------------------------------------------------------------------

def train(run: TrainingRun, step: int, end_step: int, log: RunLog) -> dict:
    """Optimiser steps step + 1 .. end_step (the schedule spans sched["total"]); returns the run's statistics."""
    from tqdm import tqdm

    args, start_step = run.args, step
    sums, clock = RunningSums(run.device), Clock(run, step, end_step)
    vis_x = sample_images(args, args.vis_num, seed=args.seed).to(run.device) if (run.is_main and args.vis_num) else None
    if run.is_main:
        print(header(run, step, end_step), flush=True)
    bar = tqdm(total=end_step, initial=step, desc="pretrain", dynamic_ncols=True,
               disable=not run.is_main or args.no_progress)
    history = []
    stream = repeat_first(iter(run.batches)) if args.overfit_batch else iter(run.batches)
    run.model.train()
    while step < end_step:
        step_loss, step_parts = accumulate_gradients(run, stream, step)
        run.lr_scheduler.step_update(step)  # the lr of step `step` on every param group
        lr = run.optimizer.param_groups[0]["lr"]
        if run.distiller is not None:
            run.distiller.cancel_last_layer_grads(step)
        bad, grad_norm = optimizer_step(run.net, run.optimizer, run.scaler, step_loss, args, run.world)
        if run.distiller is not None:
            run.distiller.update_teacher(step)
        sums.add(step, bad, step_loss, step_parts)
        step += 1
        bar.update(1)
        clock.step_done(step)

        if step % args.log_every == 0 or step == end_step:
            record = log_record(run, sums, grad_norm, step, lr, clock)
            history.append(record)
            log.write(record)
            show(run, record, bar, end_step)
        if not args.no_checkpoint and step % args.save_every == 0 and step < end_step:
            check_finite(run, sums)
            save(run, step)
        if args.vis_every and step % args.vis_every == 0 and step < end_step:
            picture(run, vis_x, step)

    timed_steps, seconds = clock.stop(step)
    bar.close()
    check_finite(run, sums)
    if not args.no_checkpoint and step > start_step:
        save(run, step)
        if run.is_main:
            save_checkpoint(run.net.encoder.state_dict(), run.out_dir / "encoder.pth")  # plain timm weights
    picture(run, vis_x, step)
    result = summary(run, start_step, step, timed_steps, seconds, history, sums)
    log.write({"event": "end", **{k: v for k, v in result.items() if k != "history"}})
    return result


def header(run: TrainingRun, step: int, end_step: int) -> str:
    """What the run is about to do (printed before the progress bar): device, model, image size, batch, steps,
    method / task, data, the backends of the corruption and the loss, the output folder."""
    a = run.args
    params = sum(p.numel() for p in run.net.parameters()) / 1e6
    procs = f" x {run.world} processes" if run.world > 1 else ""
    accum = f" x {a.accum_iter} accumulated" if a.accum_iter > 1 else ""
    data = a.data_path or ("synthetic" if a.synthetic else "built-in photo crops (scikit-image)")
    what = f"--method {a.method}" + (f" ({a.mask} masks)" if a.task == "mfm" else "") + f", --task {a.task}"
    if a.pipeline == "official":
        backends = "the released code's eager ops (--pipeline official)"
    else:
        backends = ", ".join(f"{op} {name}" for op, name in chosen_backends(run).items())
        backends += f" (from --corrupt-backend {a.corrupt_backend}, --loss-backend {a.loss_backend})"
        if a.task != "mfm":
            backends += f"; the {a.task} degradation runs as torch ops"
    amp = str(run.amp_dtype).replace("torch.", "") if run.amp_dtype else "fp32"
    steps = f"steps {step + 1}..{end_step} of {run.sched['total']}" if end_step > step else \
        f"nothing to train (step {step} of {run.sched['total']} is done)"
    return "\n".join([
        f"pretrain: {a.model} ({params:.1f}M params) on {run.device} ({amp}), {a.img_size} px",
        f"  batch {a.batch_size}{accum}{procs} = {run.total_batch} images per step, {steps}, "
        f"warm-up {run.sched['warmup']}, peak lr {run.sched['lr']:.3g}",
        f"  {what}, data: {data}",
        f"  backends: {backends}",
        f"  output: {run.out_dir}",
    ])


def chosen_backends(run: TrainingRun) -> dict:
    """{op: backend} that mfm_fast.dispatch picks for this run's corruption and loss, found by running them
    once on two blank images (the masks' random stream is left where it was)."""
    from .. import dispatch

    side = run.args.img_size
    x = torch.zeros(2, 3, side, side, dtype=torch.uint8, device=run.device)
    state = run.corruptor.gen.get_state()
    dispatch.LAST_CHOICE.clear()
    try:
        with torch.no_grad():
            inp, target, mask = run.corruptor(x)
            run.corruptor.criterion(inp, target, mask)  # what Corruptor.loss runs (mfm_fast pipeline)
    finally:
        run.corruptor.gen.set_state(state)
    return dict(dispatch.LAST_CHOICE)


def repeat_first(stream: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
    """--overfit-batch: the stream's first batch, again and again (drawn when first asked for)."""
    first = next(stream)
    while True:
        yield first


def check_finite(run: TrainingRun, sums: RunningSums) -> None:
    """NonFiniteLoss naming the first non-finite step so far (one host sync), unless --skip-nonfinite."""
    bad = int(sums.first_bad.item())
    if bad >= 0 and not run.args.skip_nonfinite:
        last = f"; {run.ckpt_path} holds the last good checkpoint" if run.ckpt_path.exists() else ""
        raise NonFiniteLoss(f"non-finite loss or gradient at step {bad + 1} (the weights were not updated "
                            f"by it{last}). Lower --blr / --lr, keep --clip-grad, use --amp bf16 rather than "
                            "fp16, check the data, or pass --skip-nonfinite to skip such steps.")


def log_record(run: TrainingRun, sums: RunningSums, grad_norm: torch.Tensor, step: int, lr: float,
               clock: Clock) -> dict:
    """The log record of the interval ending at `step` (a host sync; stops on a non-finite step); starts the next."""
    loss_total, n_good, n_skipped, gnorm, rec_total, distill_total, kl_total = sums.read(grad_norm, run.world)
    check_finite(run, sums)
    ips = clock.interval_rate(step)
    record = {"step": step, "epoch": run.batches.epoch, "loss": _mean(loss_total, n_good), "lr": lr,
              "grad_norm": gnorm, "images_per_s": ips, "skipped": int(n_skipped), "time": time.time()}
    if run.batches.unreadable:
        record["unreadable_skipped"] = run.batches.unreadable
    if run.distiller is not None:
        record.update(loss_rec=_mean(rec_total, n_good), loss_distill=_mean(distill_total, n_good),
                      distill_kl=_mean(kl_total, n_good),
                      teacher_momentum=teacher_momentum(step - 1, run.sched["total"], run.args.momentum_teacher))
    sums.new_interval()
    return record


def show(run: TrainingRun, record: dict, bar, end_step: int) -> None:
    """The tqdm bar's loss / lr / images/s; with --no-progress a printed line instead (rank 0)."""
    lr, ips = record["lr"], record["images_per_s"]
    bar.set_postfix(loss=_fmt(record["loss"], ".4f"), lr=f"{lr:.2e}", img_s=f"{ips:.0f}")
    if run.is_main and run.args.no_progress:
        parts = (f" (rec {_fmt(record['loss_rec'], '.5f')} distill {_fmt(record['loss_distill'], '.5f')})"
                 if run.distiller is not None else "")
        skipped = f" skipped {record['skipped']}" if record["skipped"] else ""
        print(f"step {record['step']}/{end_step} loss {_fmt(record['loss'], '.5f')}{parts} lr {lr:.3e} "
              f"grad_norm {record['grad_norm']:.3f} {ips:.1f} img/s" + skipped, flush=True)


def save(run: TrainingRun, step: int) -> None:
    """checkpoint.pth at `step` (collective: every rank hands in its random streams)."""
    save_training_state(run.ckpt_path, step=step, net=run.net, optimizer=run.optimizer, scaler=run.scaler,
                        distiller=run.distiller, batches=run.batches, sched=run.sched, args=run.args,
                        mask_gen=run.corruptor.gen, rank=run.rank, world=run.world)


def picture(run: TrainingRun, vis_x: Optional[torch.Tensor], step: int) -> None:
    """vis/step_<step>.png: the fixed images corrupted and reconstructed (rank 0, when --vis-num > 0)."""
    if vis_x is None:
        return
    what = "method folk" if run.distiller is not None else "task " + run.args.task
    render(run.net, run.corruptor, vis_x, run.out_dir / "vis" / f"step_{step:07d}.png", amp_dtype=run.amp_dtype,
           title=f"{run.args.model}, {what}, step {step}")


def summary(run: TrainingRun, start_step: int, step: int, timed_steps: int, seconds: float, history: list,
            sums: RunningSums) -> dict:
    """The statistics train() returns (and the end record of log.jsonl holds, less the history)."""
    args, amp_dtype = run.args, run.amp_dtype
    fingerprints = gather(fingerprint(run.net), run.world)  # collective, like the teacher's
    teacher = gather(fingerprint(run.distiller.teacher.module), run.world) if run.distiller is not None else None
    return {
        "model": args.model, "pipeline": args.pipeline, "method": args.method, "task": args.task,
        "views_per_image": 2 if run.distiller is not None else 1, "device": str(run.device),
        "world_size": run.world, "batch_size": args.batch_size, "total_batch": run.total_batch,
        "img_size": args.img_size, "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "none",
        "compile": args.compile, "channels_last": args.channels_last, "start_step": start_step, "final_step": step,
        "timed_steps": timed_steps,
        "images_per_s": timed_steps * run.total_batch / seconds if timed_steps else float("nan"),
        "step_ms": 1e3 * seconds / timed_steps if timed_steps else float("nan"),
        "peak_mem_gb": torch.cuda.max_memory_allocated(run.device) / 2 ** 30 if run.device.type == "cuda" else None,
        "final_loss": history[-1]["loss"] if history else None, "skipped": int(sums.skipped.item()),
        "unreadable_skipped": run.batches.unreadable,
        "history": history, "rank_fingerprints": fingerprints,
        "teacher_fingerprints": teacher,
        "checkpoint": str(run.ckpt_path) if not args.no_checkpoint else None,
    }


def _mean(total: float, n: float) -> Optional[float]:
    """A logged mean over the finite steps of an interval (None, JSON null, when there were none)."""
    return total / n if n else None


def _fmt(value: Optional[float], spec: str) -> str:
    """A logged mean for the progress line: "none" when no step of the interval was finite."""
    return "none" if value is None else format(value, spec)
