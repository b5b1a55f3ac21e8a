"""The fine-tuning loop: optimiser steps over epochs of mixed-up batches, top-1 / top-5 on val after each epoch,
kill-safe checkpoints (checkpoint.pth: the whole state, every --save-every steps and after each epoch; best.pth:
the weights of the best val top-1), log.jsonl and curves.png.

A step: --accum-iter micro-batches of (Mixup / CutMix) -> forward (autocast) -> loss / accum_iter -> backward, then
the scheduled lr (layer-decayed per group by timm's lr_scale), clip and step (skipped on the device when the loss or
gradient is not finite), then the EMA. The losses are summed on the device and read every --log-every steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from ..cli import ArgError
from .checkpoint import CHECKPOINT_NAME, read_checkpoint, rng_state, save_checkpoint
from .data import ResumableSampler
from .engine import RunLog, optimizer_step
from .runtime import fingerprint, gather

BEST_NAME, KIND = "best.pth", "finetune"
WANT = "a best.pth or checkpoint.pth written by python -m mfm_fast.finetune"


@dataclasses.dataclass
class FinetuneRun:
    """What the loop works on. net is the classifier itself (checkpoints); model is what a step calls (net or its
    DDP wrapper); ema is a timm ModelEmaV3 or None; mixup a timm Mixup or None; sched the schedule dict that
    checkpoints save (mfm_fast.train.optim.make_schedule)."""

    args: object
    rank: int
    world: int
    device: torch.device
    net: nn.Module
    model: nn.Module
    ema: Optional[nn.Module]
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    sched: dict
    scaler: torch.amp.GradScaler
    amp_dtype: Optional[torch.dtype]
    mixup: object
    criterion: nn.Module
    data: object  # finetune_data.FinetuneData
    sampler: ResumableSampler
    loader: torch.utils.data.DataLoader
    per_epoch: int
    out_dir: Path
    epoch: int = 0
    batch_in_epoch: int = 0
    best_top1: float = -1.0
    epoch_ended: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def batches(run: FinetuneRun):
    """Endless (x, y) micro-batches on the device, resumable at (epoch, batch_in_epoch). Batches are counted before
    they are handed out; with an epoch's last batch the counters move to the next epoch and ``epoch_ended`` is
    set, so that a checkpoint taken after that step resumes with the next epoch."""
    while True:
        run.sampler.set_epoch(run.epoch)
        run.data.train.set_epoch(run.epoch)
        run.sampler.start = run.batch_in_epoch * run.args.batch_size
        for x, y in run.loader:
            run.batch_in_epoch += 1
            if run.batch_in_epoch == run.per_epoch:
                run.epoch, run.batch_in_epoch, run.epoch_ended = run.epoch + 1, 0, True
            yield x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)


def forward_backward(run: FinetuneRun, x: torch.Tensor, y: torch.Tensor, sync_grads: bool) -> torch.Tensor:
    """One micro-batch: Mixup / CutMix (soft targets), forward, loss, backward of loss / accum_iter."""
    if run.mixup is not None:
        x, y = run.mixup(x, y)
    autocast = torch.autocast(run.device.type, dtype=run.amp_dtype or torch.bfloat16,
                              enabled=run.amp_dtype is not None)
    with contextlib.nullcontext() if sync_grads else run.model.no_sync():
        with autocast:
            logits = run.model(x)
        loss = run.criterion(logits.float(), y)
        run.scaler.scale(loss / run.args.accum_iter).backward()
    return loss.detach()


@torch.no_grad()
def evaluate(net: nn.Module, dataset, args, device: torch.device, amp_dtype, rank: int = 0, world: int = 1) -> dict:
    """Top-1 / top-5 (k = min(5, classes)) and the mean cross-entropy of `net` on `dataset` ((x, y) items); under
    DDP each rank takes every world-th item and the counts are summed (no padding, so every image counts once)."""
    shard = torch.utils.data.Subset(dataset, range(rank, len(dataset), world))
    loader = torch.utils.data.DataLoader(shard, batch_size=args.batch_size, num_workers=args.num_workers,
                                         generator=torch.Generator())  # leaves the global RNG alone
    was_training = net.training
    net.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # top-1 hits, top-5 hits, loss sum, count
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            logits = net(x).float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        loss = nn.functional.cross_entropy(logits, y, reduction="sum")
        sums += torch.stack([(top[:, 0] == y).sum().double(), (top == y[:, None]).any(1).sum().double(),
                             loss.double(), torch.tensor(float(len(y)), dtype=torch.float64, device=device)])
    if world > 1:
        dist.all_reduce(sums)
    net.train(was_training)
    hit1, hit5, loss, n = sums.tolist()
    return {"top1": hit1 / max(n, 1), "top5": hit5 / max(n, 1), "loss": loss / max(n, 1), "n": int(n)}


def load_finetune_checkpoint(path, flag: str) -> dict:
    """The finetune checkpoint at `path` (torch.load(weights_only=True), tensors memory-mapped): kind "finetune",
    model (the classifier's state dict), args with model, img_size, num_classes, class_names. ArgError naming
    `flag` for anything else: no such file, not a torch file, a weights-only state dict (encoder.pth), a
    pre-training checkpoint, another kind, missing entries."""
    ckpt = read_checkpoint(path, flag, f"expected {WANT}")
    if isinstance(ckpt, dict) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise ArgError(f"{flag}: {path} is a state dict of weights only (such as pretrain's encoder.pth), not a "
                       f"fine-tuned classifier; fine-tune it (python -m mfm_fast.finetune --init {path}) and pass "
                       "the run's best.pth")
    if isinstance(ckpt, dict) and "kind" not in ckpt and {"model", "args", "step"} <= set(ckpt):
        raise ArgError(f"{flag}: {path} is a pre-training checkpoint (python -m mfm_fast.pretrain), not a fine-tuned "
                       f"classifier; fine-tune it (python -m mfm_fast.finetune --init {path}) and pass the run's "
                       f"best.pth, or probe it with python -m mfm_fast.linprobe --checkpoint {path}")
    if not isinstance(ckpt, dict) or ckpt.get("kind") != KIND:
        kind = ckpt.get("kind") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ArgError(f"{flag}: {path} is not a finetune checkpoint (kind {kind!r}); expected {WANT}")
    args = ckpt.get("args")
    need = ("model", "img_size", "num_classes", "class_names")
    absent = ["model"] if "model" not in ckpt else []
    absent += [f"args[{k!r}]" for k in need if not isinstance(args, dict) or args.get(k) is None]
    if absent:
        raise ArgError(f"{flag}: {path} is a finetune checkpoint without {', '.join(absent)}; expected {WANT}")
    names = args["class_names"]
    if not isinstance(names, (list, tuple)) or len(names) != args["num_classes"]:
        raise ArgError(f"{flag}: {path} lists {len(names) if isinstance(names, (list, tuple)) else 'no'} class "
                       f"names for {args['num_classes']} classes; expected {WANT}")
    return ckpt


def state(run: FinetuneRun, step: int, val: Optional[dict], full: bool) -> dict:
    """What checkpoint.pth (full) or best.pth holds: kind, weights, args (with num_classes and class_names)."""
    out = {"kind": KIND, "model": run.net.state_dict(), "args": vars(run.args), "step": step, "epoch": run.epoch,
           "val": val, "format": 1}
    if run.ema is not None:
        out["ema"] = run.ema.module.state_dict()
    if full:
        out.update(optimizer=run.optimizer.state_dict(), schedule=run.sched, batch_in_epoch=run.batch_in_epoch,
                   scaler=run.scaler.state_dict() if run.scaler.is_enabled() else None, best_top1=run.best_top1,
                   world_size=run.world)
    return out


def save(run: FinetuneRun, step: int, val: Optional[dict] = None) -> None:
    """checkpoint.pth at `step` (collective: every rank hands in its random streams; rank 0 writes)."""
    rngs = gather(rng_state(), run.world)
    if run.is_main:
        save_checkpoint({**state(run, step, val, full=True), "rng": rngs}, run.out_dir / CHECKPOINT_NAME)


def plot_curves(log_path: Path, png: Path) -> None:
    """curves.png: the training loss and lr per logged step, val top-1 per epoch (from log.jsonl)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    steps = [r for r in records if "loss" in r and "step" in r and "event" not in r]
    evals = [r for r in records if r.get("event") == "eval"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot([r["step"] for r in steps], [r["loss"] if r["loss"] is not None else math.nan for r in steps])
    axes[0].set(title="training loss", xlabel="step")
    axes[1].plot([r["step"] for r in steps], [r["lr"] for r in steps])
    axes[1].set(title="learning rate (top layer)", xlabel="step")
    axes[2].plot([r["epoch"] for r in evals], [100 * r["top1"] for r in evals], marker="o")
    axes[2].set(title="val top-1 (%)", xlabel="epoch")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=90)
    plt.close(fig)


def end_of_epoch(run: FinetuneRun, step: int, log: RunLog) -> dict:
    """Evaluate (and the EMA), write the eval record, best.pth when val top-1 improved, checkpoint.pth, curves."""
    a = run.args
    val = evaluate(run.net, run.data.val, a, run.device, run.amp_dtype, run.rank, run.world)
    record = {"event": "eval", "step": step, "epoch": round(run.epoch + run.batch_in_epoch / run.per_epoch, 4),
              "top1": val["top1"], "top5": val["top5"], "val_loss": val["loss"], "n_val": val["n"]}
    if run.ema is not None:
        ema = evaluate(run.ema.module, run.data.val, a, run.device, run.amp_dtype, run.rank, run.world)
        record.update(ema_top1=ema["top1"], ema_top5=ema["top5"])
    improved = val["top1"] > run.best_top1
    run.best_top1 = max(run.best_top1, val["top1"])
    record["best_top1"] = run.best_top1
    log.write(record)
    if run.is_main:
        print(f"epoch {record['epoch']} (step {step}): val top-1 {100 * val['top1']:.2f}%  top-5 "
              f"{100 * val['top5']:.2f}%  loss {val['loss']:.4f}"
              + (f"  EMA top-1 {100 * record['ema_top1']:.2f}%" if run.ema is not None else "")
              + ("  (best)" if improved else ""), flush=True)
        if improved and not a.no_checkpoint:
            save_checkpoint(state(run, step, val, full=False), run.out_dir / BEST_NAME)
    if not a.no_checkpoint:
        save(run, step, val)
    if run.is_main:
        plot_curves(run.out_dir / "log.jsonl", run.out_dir / "curves.png")
    return record


def train(run: FinetuneRun, step: int, end_step: int, log: RunLog) -> dict:
    """Optimiser steps step + 1 .. end_step; evaluation after each epoch and at the end. Returns the statistics."""
    from tqdm import tqdm

    a, start_step = run.args, step
    bar = tqdm(total=end_step, initial=step, desc="finetune", dynamic_ncols=True, disable=not run.is_main or
               a.no_progress)
    stream = batches(run)
    loss_sum, good = torch.zeros((), device=run.device), torch.zeros((), device=run.device)
    history, evals, t0, t_step = [], [], time.perf_counter(), step
    run.model.train()
    while step < end_step:
        step_loss = torch.zeros((), device=run.device)
        for micro in range(a.accum_iter):
            x, y = next(stream)
            step_loss += forward_backward(run, x, y, sync_grads=run.world == 1 or micro == a.accum_iter - 1) \
                / a.accum_iter
        run.lr_scheduler.step_update(step)
        lr = max(g["lr"] for g in run.optimizer.param_groups)
        bad, grad_norm = optimizer_step(run.net, run.optimizer, run.scaler, step_loss, a, run.world)
        if run.ema is not None:
            run.ema.update(run.net, step=step)
        loss_sum += torch.where(bad, 0.0, step_loss)
        good += (~bad).float()
        step += 1
        bar.update(1)
        if step % a.log_every == 0 or step == end_step:
            stats = torch.stack([loss_sum, good, grad_norm.float()])
            if run.world > 1:
                dist.all_reduce(stats)
            total, n, gn = stats.tolist()
            if not a.skip_nonfinite and n < (step - t_step) * run.world:
                raise FloatingPointError(f"the loss or gradient became non-finite before step {step}; lower --lr / "
                                         "--blr, or pass --skip-nonfinite")
            now = time.perf_counter()
            record = {"step": step, "epoch": run.epoch, "loss": total / n if n else None, "lr": lr,
                      "grad_norm": gn / run.world, "images_per_s": (step - t_step) * a.batch_size * a.accum_iter *
                      run.world / max(now - t0, 1e-9)}
            t0, t_step = now, step
            loss_sum.zero_()
            good.zero_()
            history.append(record)
            log.write(record)
            bar.set_postfix(loss="none" if record["loss"] is None else f"{record['loss']:.4f}", lr=f"{lr:.2e}")
            if run.is_main and a.no_progress:
                loss = "none" if record["loss"] is None else f"{record['loss']:.4f}"
                print(f"step {step}/{end_step} loss {loss} lr {lr:.3e} grad_norm {record['grad_norm']:.3f}", flush=True)
        if run.epoch_ended:
            run.epoch_ended = False
            evals.append(end_of_epoch(run, step, log))  # saves checkpoint.pth
        elif not a.no_checkpoint and a.save_every and step % a.save_every == 0 and step < end_step:
            save(run, step)
    bar.close()
    if step == run.sched["total"] and (not evals or evals[-1]["step"] != step) and step > start_step:
        evals.append(end_of_epoch(run, step, log))  # the run's end within an epoch (--steps)
    elif not a.no_checkpoint and step > start_step and (not evals or evals[-1]["step"] != step):
        save(run, step)  # --stop-at: stopped as a preempted job would be, to be resumed
    fingerprints = gather(fingerprint(run.net), run.world)
    result = {"start_step": start_step, "final_step": step, "world_size": run.world, "history": history,
              "evals": evals, "best_top1": run.best_top1, "final_top1": evals[-1]["top1"] if evals else None,
              "rank_fingerprints": fingerprints}
    log.write({"event": "end", **{k: v for k, v in result.items() if k not in ("history", "evals")}})
    return result
