"""Benchmark of MFM frequency corruption, the masked spectral loss and the whole MFM step, per provider.

    python bench/fft_mask.py                        # defaults for the device found (see below)
    python bench/fft_mask.py --check --plot         # verify every provider first; write a PNG too
    python bench/fft_mask.py --batch 64 256 --size 112 224 --dtype fp32 bf16 --work corrupt loss

Defaults: on CUDA B = 1 16 64 256, 3x224x224; on CPU B = 8, 3x64x64 (1 thread). r1 defaults to
min(16, size // 8), so the low band keeps a similar share of a small image; p_low = 0.5;
pixels are fp32, pred is --dtype (fp32 by default).

Work items:
  corrupt    the encoder input from clean pixels and masks
  loss_fwd   the loss forward (pred requires grad, as in training)
  loss_bwd   loss.backward() alone (the forward runs untimed before every rep)
  loss       loss forward + backward
  step       the whole MFM step: corrupt + loss forward + backward
Providers:
  copy           the floor: ``out.copy_(x)`` (read + write the batch once, fp32). Each work's floor is
                 that time scaled by the bytes it must move at least (corrupt 1x; loss fwd+bwd 1.5x
                 for fp32 pred: read pred + read x + write grad; see floor_factor).
  official       an eager replica of the released MFM code's op sequence (fft2 + fftshift + complex64,
                 two ortho transforms and torch.stack in the loss), written below from docs/spec.md.
  torch_compile  torch.compile of the torch backend's math (rfft2 half spectrum, symmetrised half
                 mask), written below in plain differentiable torch ops: the backend's own custom ops
                 are opaque to the compiler. One compile per shape (dynamic=False); --compile-mode;
                 AOTAutograd's donated buffers off (loss bwd repeats backward(retain_graph=True)).
  reference, torch, triton, cuda
                 mfm_fast with that backend. A backend that cannot run an op on the device is listed
                 as skipped with the reason from mfm_fast.available_backends(device, op).
On CPU, torch_compile (slow to compile) and triton (only under TRITON_INTERPRET=1) are left out
unless named in --providers.
Timing (bench/timing.py): triton.testing.do_bench on CUDA (CUDA events, L2 cleared before every call),
torch.utils.benchmark.Timer.blocked_autorange on CPU (a sample is the mean call of one of its blocks);
--warmup untimed runs, then about --reps timed calls, fewer (at least 3) when the first timed call says
they would take over --budget seconds: median, p20, p80. loss bwd times backward(retain_graph=True)
of one untimed forward. Peak memory
(CUDA): the most one call allocates beyond what was allocated before it. Every figure is also a
ratio to the floor measured in the same run (x-floor) and a speed-up over official and torch_compile.
A provider that raises or fails --check is reported and left out; the others still run (exit 1).
Results (every sample) go to bench/results/fft_mask-<device>-<timestamp>.json unless --no-json;
--plot writes a PNG beside it (bars of median ms per provider and batch, each labelled with its x-floor;
needs matplotlib).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import inspect
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without `pip install -e .`
import mfm_fast  # noqa: E402
from mfm_fast import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from mfm_fast import _official, backends  # noqa: E402
from mfm_fast.cli import OneLineParser, check_bench_args, check_r1, check_sizes, library_check  # noqa: E402
from mfm_fast.dispatch import triton_interpreted  # noqa: E402
from mfm_fast.masks import disc_band  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import summary, time_ms, timer_name  # noqa: E402  (bench/timing.py: the benchmarks' one timer)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
WORKS = ("corrupt", "loss_fwd", "loss_bwd", "loss", "step")
WORK_TITLES = {"corrupt": "corrupt", "loss_fwd": "loss fwd", "loss_bwd": "loss bwd", "loss": "loss fwd+bwd",
               "step": "step"}
WORK_OPS = {"corrupt": ("corrupt",), "loss_fwd": ("masked_freq_loss",), "loss_bwd": ("masked_freq_loss",),
            "loss": ("masked_freq_loss",), "step": ("corrupt", "masked_freq_loss")}


def floor_factor(work: str, pred_bytes: int) -> float:
    """Bytes per element `work` must move at least, in units of one fp32 copy (8 bytes per element).

    corrupt: read x + write the input; loss fwd: read pred + read x; loss bwd: write grad."""
    fwd, bwd = pred_bytes + 4, pred_bytes
    return {"corrupt": 8, "loss_fwd": fwd, "loss_bwd": bwd, "loss": fwd + bwd, "step": 8 + fwd + bwd}[work] / 8


# ---- the "official" peer: the released MFM code's op sequence, eager -------------------------

def official_corrupt(x, mask, band=None):
    """mfm_fast._official.corrupt (fft2 -> fftshift -> * mask -> ifftshift -> ifft2 -> real -> clamp ->
    normalise); `band` is ignored: the released code has no such promise."""
    return _official.corrupt(x, mask)


official_loss = _official.loss  # two ortho spectra, squared (re, im) difference, sqrt, masked batch mean


# ---- the torch backend's math in plain torch ops, for torch.compile ---------------------------

def _symmetric_half(m):
    """(N, H, W) fftshift-ed map -> (N, H, W//2 + 1) unshifted half of (m(k) + m(-k)) / 2."""
    pos = torch.fft.ifftshift(m, dim=(-2, -1))
    neg = torch.roll(torch.flip(pos, (-2, -1)), (1, 1), (-2, -1))  # neg[k] = pos[-k mod S]
    return ((pos + neg) * 0.5)[..., : m.shape[-1] // 2 + 1]


def _normalize_inline(x):
    """_official.normalize with its constants built in the graph (torch.compile does not trace lru_cache)."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def careful_corrupt(x, mask):
    """irfft2(rfft2(x) * symmetrised half mask), clamp, normalise; complex values as (re, im) pairs for Inductor."""
    spec = torch.view_as_real(torch.fft.rfft2(x)) * _symmetric_half(mask)[:, None, :, :, None]
    out = torch.fft.irfft2(torch.view_as_complex(spec), s=x.shape[-2:])
    return _normalize_inline(out.clamp(0, 1))


def careful_loss(pred, x, mask):
    """One ortho rfft2 of pred - normalise(x); columns 1 .. W/2 - 1 stand for two full-grid columns."""
    spec = torch.view_as_real(torch.fft.rfft2(pred.float() - _normalize_inline(x), norm="ortho"))
    dist = torch.sqrt(spec.square().sum(-1) + 1e-12)
    half = dist.shape[-1]
    colw = torch.cat([dist.new_ones(1), dist.new_full((half - 2,), 2.0), dist.new_ones(1)])
    weight = _symmetric_half(1 - mask) * colw
    return (dist * weight[:, None]).sum() / ((1 - mask).sum() * pred.shape[1])


_compile_mode = None  # set by run() from --compile-mode


@functools.lru_cache(maxsize=None)
def _compiled(name: str, mode):
    """torch.compile of careful_corrupt / careful_loss. AOTAutograd's donated buffers (a backward that reuses
    its saved tensors' memory) are off: they forbid the backward(retain_graph=True) that loss bwd repeats."""
    import torch._functorch.config as aot_config
    if hasattr(aot_config, "donated_buffer"):
        aot_config.donated_buffer = False
    return torch.compile({"corrupt": careful_corrupt, "loss": careful_loss}[name], mode=mode, dynamic=False)


def _raise_recompile_limit(limit=64):
    """Every (batch, size, dtype) is one more graph of the same two functions; the default limit is 8."""
    for attr in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, attr):
            setattr(torch._dynamo.config, attr, max(getattr(torch._dynamo.config, attr), limit))


# ---- mfm_fast providers -----------------------------------------------------------------------

# mfm_fast.corrupt's `mask_band` promise (the mask is constant outside the box |ky|, |kx| < band),
# passed when this version of mfm_fast has it.
HAS_MASK_BAND = "mask_band" in inspect.signature(mfm_fast.corrupt).parameters


def _mfm_provider(backend):
    def corrupt(x, mask, band=None):
        extra = {"mask_band": band} if band is not None else {}
        return mfm_fast.corrupt(x, mask, backend=backend, **extra)

    def loss(pred, x, mask, band=None):
        extra = {"mask_band": band} if band is not None else {}
        return mfm_fast.masked_freq_loss(pred, x, mask, normalize_target=True, backend=backend, **extra)
    return {"corrupt": corrupt, "loss": loss}


# Every provider but "copy" (the floor, measured separately): {"corrupt": f(x, mask, band=None),
# "loss": f(pred, x, mask, band=None) -> scalar with autograd}. Tests monkeypatch entries here.
PROVIDERS = {
    "official": {"corrupt": official_corrupt, "loss": lambda pred, x, mask, band=None: official_loss(pred, x, mask)},
    "torch_compile": {"corrupt": lambda x, mask, band=None: _compiled("corrupt", _compile_mode)(x, mask),
                      "loss": lambda pred, x, mask, band=None: _compiled("loss", _compile_mode)(pred, x, mask)},
    **{name: _mfm_provider(name) for name in backends.names()},
}
PROVIDER_ORDER = tuple(PROVIDERS)  # the released code's ops, torch.compile, then mfm_fast with each backend


def unavailable(provider: str, work: str, device_type: str):
    """None if `provider` can run `work` on `device_type` tensors, else the reason."""
    if provider not in backends.names():
        return None
    for op in WORK_OPS[work]:
        reason = mfm_fast.available_backends(device_type, op)[provider]
        if reason is not None:
            return reason
    return None


# ---- inputs and work items ------------------------------------------------------------

def make_inputs(batch, size, r1, p_low, dtype, device):
    gen = torch.Generator(device).manual_seed(0)
    mask = mfm_fast.make_masks(batch, size, size, r1=r1, p_low=p_low, generator=gen, device=device)
    x = torch.rand(batch, 3, size, size, generator=gen, device=device)  # clean pixels in [0, 1]
    pred = torch.randn(batch, 3, size, size, generator=gen, device=device).to(dtype).requires_grad_()
    return x, mask, pred


def mask_band(r1, size):
    """The mask_band promise of the bench's masks (r2 = 999: the disc of radius r1 is the only feature)."""
    return disc_band(size, size, r1, 999) if HAS_MASK_BAND else None


def work_fn(provider, work, x, mask, pred, band):
    """The timed call of `work` (it sets pred.grad = None before a backward). loss_bwd runs the forward
    once, here, and times loss.backward(retain_graph=True) of that one graph."""
    corrupt, loss_fn = PROVIDERS[provider]["corrupt"], PROVIDERS[provider]["loss"]
    if work == "corrupt":
        return lambda: corrupt(x, mask, band=band)
    if work == "loss_fwd":
        return lambda: loss_fn(pred, x, mask, band=band)
    if work == "loss_bwd":
        loss = loss_fn(pred, x, mask, band=band)

        def backward():
            pred.grad = None
            loss.backward(retain_graph=True)
        return backward

    def step():
        if work == "step":
            corrupt(x, mask, band=band)
        pred.grad = None
        loss_fn(pred, x, mask, band=band).backward()
    return step


def peak_mib(fn, device, pred):
    """MiB one call of fn() allocates beyond what was allocated before it (CUDA only, else None)."""
    if device.type != "cuda":
        return None
    pred.grad = None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20


# ---- --check: every provider against the reference backend ----------------------------------

def _rel(a, ref):
    return float((a.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30))


def _loss_and_grad(provider, pred, x, mask, band=None):
    pred.grad = None
    loss = PROVIDERS[provider]["loss"](pred, x, mask, band=band)
    loss.backward()
    grad, pred.grad = pred.grad.detach().clone(), None
    return loss.detach().clone(), grad


def run_checks(providers, device, x, mask, pred, band, tol):
    """Print PASS / FAIL per provider; return {provider: set of the ops (as in WORK_OPS) that failed}."""
    ref_out = PROVIDERS["reference"]["corrupt"](x, mask, band=band)
    ref_loss, ref_grad = _loss_and_grad("reference", pred, x, mask, band)
    failed = {}
    for name in providers:
        if name == "reference":
            continue
        errs, bad = {}, set()
        for op, work in (("corrupt", "corrupt"), ("masked_freq_loss", "loss")):
            if unavailable(name, work, device.type) is not None:
                continue
            try:
                if work == "corrupt":
                    out = PROVIDERS[name]["corrupt"](x, mask, band=band)
                    got = {"corrupt": _rel(out, ref_out) if out.shape == ref_out.shape else math.inf}
                else:
                    loss, grad = _loss_and_grad(name, pred, x, mask, band)
                    got = {"loss": _rel(loss, ref_loss), "grad": _rel(grad, ref_grad)}
                errs.update(got)
                if not all(v <= tol for v in got.values()):  # NaN fails too
                    bad.add(op)
            except Exception as exc:  # a provider that raises fails its check; the others still run
                errs[work] = f"raised {type(exc).__name__}: {exc}"
                bad.add(op)
        if not errs:
            continue  # it runs none of the checked ops here (listed as skipped)
        if bad:
            failed[name] = bad
        detail = "  ".join(f"{k} {v:.1e}" if not isinstance(v, str) else f"{k} {v}" for k, v in errs.items())
        print(f"  check {name:<13} {'FAIL' if bad else 'PASS'}  (max |err| / max |ref|, tol {tol:.0e})  {detail}")
    return failed


# ---- one block of the table: every (work, provider) on one set of inputs ----------------------

def bench_block(providers, works, inputs, device, opts, failed, meta):
    """Time every runnable (work, provider); print the table; return (records, no provider raised)."""
    x, mask, pred, band = inputs
    out = torch.empty_like(x)
    copy_ms = time_ms(lambda: out.copy_(x), device, opts.reps, opts.warmup, opts.budget)
    del out
    print(f"{'work':<13} {'provider':<14} {'median ms':>10} {'p20 ms':>9} {'p80 ms':>9} {'x-floor':>8} "
          f"{'vs official':>12} {'vs compile':>11} {'peak MiB':>9}")
    records, ok = [], True
    for work in works:
        factor = floor_factor(work, pred.element_size())
        rows = {"copy": ([t * factor for t in copy_ms], None)}
        for name in providers:
            if unavailable(name, work, device.type) is not None:
                continue
            if failed.get(name, set()) & set(WORK_OPS[work]):
                print(f"  {name} {WORK_TITLES[work]}: not timed (failed --check)")
                continue
            try:
                pred.grad = None
                fn = work_fn(name, work, x, mask, pred, band)
                samples = time_ms(fn, device, opts.reps, opts.warmup, opts.budget)
                rows[name] = (samples, peak_mib(fn, device, pred))
            except Exception as exc:  # report and go on with the other providers
                print(f"  {name} {WORK_TITLES[work]}: raised {type(exc).__name__}: {exc}")
                ok = False
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            pred.grad = None
        stats = {name: summary(s) for name, (s, _) in rows.items()}
        med = {name: m for name, (m, _, _) in stats.items()}
        for name, (samples, peak) in rows.items():
            rec = dict(meta, work=work, provider=name, median_ms=med[name], p20_ms=stats[name][1],
                       p80_ms=stats[name][2], x_floor=med[name] / med["copy"],
                       speedup_vs_official=med["official"] / med[name] if "official" in med else None,
                       speedup_vs_torch_compile=med["torch_compile"] / med[name] if "torch_compile" in med else None,
                       peak_mib=peak, samples_ms=samples)
            label = name if name != "copy" else (f"copy x{factor:g}" if factor != 1 else "copy")
            if name == "copy":
                rec["note"] = f"floor = {factor:g} x the measured fp32 copy time"
            records.append(rec)
            print(f"{WORK_TITLES[work]:<13} {label:<14} {med[name]:>10.3f} {rec['p20_ms']:>9.3f} "
                  f"{rec['p80_ms']:>9.3f} {rec['x_floor']:>8.2f} {_ratio(rec['speedup_vs_official']):>12} "
                  f"{_ratio(rec['speedup_vs_torch_compile']):>11} {'-' if peak is None else f'{peak:.1f}':>9}")
    return records, ok


def _ratio(v):
    return "-" if v is None else f"{v:.3g}x"


# ---- output: markdown, plot, JSON -------------------------------------------------------------

def markdown_table(records):
    """The records as a markdown table (for docs/benchmarks.md)."""
    lines = ["| B | size | pred | work | provider | median ms | x-floor | vs official | vs torch_compile |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['batch']} | {r['size']} | {r['dtype']} | {WORK_TITLES[r['work']]} | {r['provider']} | "
                     f"{r['median_ms']:.3f} | {r['x_floor']:.1f} | {_ratio(r['speedup_vs_official'])} | "
                     f"{_ratio(r['speedup_vs_torch_compile'])} |")
    return "\n".join(lines)


PROVIDER_NOTES = {  # the plot's caption, for the providers in it
    "official": "official = an eager replica of the released MFM code's ops (fft2 + fftshift, complex64)",
    "torch_compile": "torch_compile = torch.compile of the torch backend's rfft2 math (plain torch ops)",
    "reference": "reference = mfm_fast's fp64 reference backend",
}


def plot(records, path, title):
    """Bars of median ms per call (p20-p80 whiskers, log scale) per batch and provider, one panel per (work,
    size, pred dtype); the copy floor dashed over each batch; each bar labelled with its x-floor ratio."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        print(f"--plot: matplotlib cannot be imported ({exc}); pip install matplotlib. No plot written.")
        return None
    works = [w for w in WORKS if any(r["work"] == w for r in records)]
    configs = sorted({(r["size"], r["dtype"]) for r in records})
    names = [p for p in PROVIDER_ORDER if any(r["provider"] == p for r in records)]
    batches = sorted({r["batch"] for r in records})
    caption = ["bar label: x-floor = median / copy floor (1x: as fast as moving the bytes the work must move); "
               "whiskers: p20 - p80",
               "copy floor (dashed): out.copy_(x) of the fp32 batch, scaled to the bytes each work must move at least"]
    caption += [PROVIDER_NOTES[n] for n in names if n in PROVIDER_NOTES]
    used = [n for n in backends.names() if n in names]
    caption += [f"{', '.join(used)} = mfm_fast with that backend"] if used else []
    panel_w = max(3.6, 1.0 + 0.3 * len(batches) * (len(names) + 1))
    head, foot = 0.6, 0.15 + 0.16 * len(caption)  # inches of title + legend, of caption
    height = 3.4 * len(configs) + head + foot
    fig, axes = plt.subplots(len(configs), len(works), figsize=(panel_w * len(works), height), squeeze=False)
    bar = 1 / (len(names) + 1)
    upright = panel_w * 0.75 * bar / len(batches) < 0.4  # bars narrower than ~0.4 inch: labels turned 90 degrees
    for i, (size, dtype) in enumerate(configs):
        for j, work in enumerate(works):
            ax = axes[i][j]
            rows = {(r["provider"], r["batch"]): r for r in records
                    if (r["size"], r["dtype"], r["work"]) == (size, dtype, work)}
            for g, b in enumerate(batches):
                if ("copy", b) in rows:
                    ax.hlines(rows["copy", b]["median_ms"], g - 0.5 + bar / 2, g + 0.5 - bar / 2, colors="black",
                              linestyles="--", label="copy floor")
            for k, name in enumerate(names):
                rs = [(g, rows[name, b]) for g, b in enumerate(batches) if (name, b) in rows]
                if not rs:
                    continue
                xs = [g + (k - (len(names) - 1) / 2) * bar for g, _ in rs]
                med = [r["median_ms"] for _, r in rs]
                err = [[r["median_ms"] - r["p20_ms"] for _, r in rs], [r["p80_ms"] - r["median_ms"] for _, r in rs]]
                ax.bar(xs, med, bar * 0.9, yerr=err, color=f"C{PROVIDER_ORDER.index(name)}", label=name,
                       error_kw=dict(lw=0.8, capsize=2))
                for x, (_, r) in zip(xs, rs):
                    ax.annotate(f"{r['x_floor']:.3g}x" if r["x_floor"] < 100 else f"{r['x_floor']:.0f}x",
                                (x, r["p80_ms"]), xytext=(0, 3), textcoords="offset points", ha="center",
                                va="bottom", rotation=90 if upright else 0, fontsize=7)
            ax.set_yscale("log")
            lo = min(r["median_ms"] for r in rows.values())
            hi = max(r["p80_ms"] for r in rows.values())
            ax.set_ylim(lo / 2, hi * 10)  # room above the tallest bar for its label
            ax.set_xticks(range(len(batches)), [str(b) for b in batches])
            ax.set_xlim(-0.5, len(batches) - 0.5)
            ax.set_title(f"{WORK_TITLES[work]} | 3x{size}x{size} | pred {dtype}", fontsize=9)
            ax.set_xlabel("batch (images per call)")
            ax.set_ylabel("median time per call (ms, log)")
            ax.grid(True, axis="y", alpha=0.3)
    handles = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.suptitle(title, fontsize=10, y=1 - 0.1 / height, va="top")
    fig.legend(list(handles.values()), list(handles), loc="upper center", bbox_to_anchor=(0.5, 1 - 0.3 / height),
               ncol=len(handles), fontsize=9, frameon=False)
    fig.text(0.01, 0.1 / height, "\n".join(caption), fontsize=8, ha="left", va="bottom")
    fig.tight_layout(rect=(0, foot / height, 1, 1 - head / height))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")
    return path


def versions():
    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "mfm_fast": mfm_fast.__version__}
    try:
        import triton
        out["triton"] = triton.__version__
    except Exception:
        out["triton"] = None
    return out


def git_sha():
    """HEAD's sha, with "+dirty" when the working tree has changes; None outside git."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except Exception:
        return None


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    n = torch.get_num_threads()
    return f"cpu {platform.machine()} ({n} thread{'s' if n != 1 else ''})"


# ---- the run ----------------------------------------------------------------------------------

def parse_args(argv):
    p = OneLineParser(prog=os.path.basename(__file__), description=__doc__.split("\n")[0],
                      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--batch", type=int, nargs="+", help="batch sizes (default 1 16 64 256 on CUDA, 8 on CPU)")
    p.add_argument("--size", type=int, nargs="+", help="image sides (default 224 on CUDA, 64 on CPU)")
    p.add_argument("--r1", type=float, help="low-band radius (default min(16, size // 8))")
    p.add_argument("--p-low", type=float, default=0.5)
    p.add_argument("--providers", default="auto",
                   help="comma list of " + ", ".join(PROVIDER_ORDER) + " (default: all on CUDA; on CPU all but "
                   "torch_compile and triton); the copy floor is always measured")
    p.add_argument("--work", nargs="+", choices=WORKS + ("all",), default=["all"])
    p.add_argument("--dtype", nargs="+", choices=tuple(DTYPES), default=["fp32"], help="dtype(s) of pred")
    p.add_argument("--compile-mode", default=None,
                   help="torch.compile mode for torch_compile (e.g. max-autotune-no-cudagraphs; default: default)")
    p.add_argument("--reps", type=int, help="timed reps (default 50 on CUDA, 30 on CPU)")
    p.add_argument("--warmup", type=int, help="untimed runs (default 5 on CUDA, 3 on CPU)")
    p.add_argument("--budget", type=float, help="seconds of timed reps per measurement (fewer reps if over) "
                   "(default 0.5 on CUDA, 2 on CPU)")
    p.add_argument("--quick", action="store_true", help="fewer reps (20), 3 warm-up runs, a 0.25 s budget per "
                   "measurement")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads during a CPU run (default 1)")
    p.add_argument("--check", action="store_true", help="verify providers against the reference first")
    p.add_argument("--plot", action="store_true", help="also write a PNG beside the JSON (in --out-dir): bars of "
                   "median ms per provider and batch, labelled with x-floor (needs matplotlib)")
    p.add_argument("--markdown", action="store_true", help="also print the results as a markdown table")
    p.add_argument("--no-json", action="store_true")
    p.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    check_bench_args(p, args, ints={"batch": 1, "reps": 1, "warmup": 0, "threads": 1}, positive=("budget",),
                     out_dirs=("out_dir",))
    check_sizes(p, args.size)
    device = bench_device(args.device, p)
    from mfm_fast import _validate as V
    library_check(p, "--p-low", V.check_number, "p_low", args.p_low, low=0.0, high=1.0)
    if args.r1 is not None:
        check_r1(p, args.r1, args.size or ([224] if torch.cuda.is_available() and args.device != "cpu" else [64]))
    if args.providers != "auto":
        names = [s.strip() for s in args.providers.split(",") if s.strip()]
        unknown = [n for n in names if n not in PROVIDERS and n != "copy"]
        if not names or unknown:
            p.error(f"--providers: expected a comma list of {', '.join(PROVIDER_ORDER)} (or auto), got "
                    f"{args.providers!r}")
        works = WORKS if "all" in args.work else args.work
        for name in names:
            reasons = [unavailable(name, w, device.type) for w in works] if name != "copy" else [None]
            if None not in reasons:
                p.error(f"--providers: {name} cannot run on {device.type} here: {reasons[0]}")
    return args


def bench_device(name: str, parser=None) -> torch.device:
    """The device of --device: auto is cuda when torch sees a GPU, else cpu. With the `parser`, cuda without a GPU
    is a one-line --device error."""
    if parser is not None and name == "cuda" and not torch.cuda.is_available():
        parser.error("--device: cuda asked for, but torch sees no CUDA device here (torch.cuda.is_available() is False)")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def run_restoring_threads(run_fn, args):
    """run_fn(args), then torch's CPU thread count back as the caller had it (a CPU run sets --threads)."""
    threads = torch.get_num_threads()
    try:
        return run_fn(args)
    finally:
        torch.set_num_threads(threads)


def main(argv=None):
    return run_restoring_threads(run, parse_args(argv))


def choose_providers(spec, device):
    """(providers to run, {provider: reason it is left out entirely}) for --providers."""
    interpreted = triton_interpreted()
    if spec != "auto":
        return [p.strip() for p in spec.split(",") if p.strip() and p.strip() != "copy"], {}
    if device.type == "cuda":
        return list(PROVIDER_ORDER), {}
    left_out = {"torch_compile": "not in the CPU default (compiling takes long on a small CPU); "
                                 "ask with --providers"}
    if interpreted:
        left_out["triton"] = "on CPU it runs under TRITON_INTERPRET=1 (far too slow to time); ask with --providers"
    return [p for p in PROVIDER_ORDER if p not in left_out], left_out


def run(args):
    """The bench: its settings and providers, a header, one table per (size, pred dtype, batch), the files.
    Returns the exit status (0, 1 when a provider failed or raised, 2 for bad settings)."""
    global _compile_mode
    started = time.perf_counter()
    device = bench_device(args.device)
    settings = resolve_settings(args, device)
    if settings is None:
        return 2
    batches, sizes, works = settings
    _compile_mode = args.compile_mode
    _raise_recompile_limit()
    plan = plan_providers(args, works, device)
    if plan is None:
        return 2
    providers, skipped = plan
    vers = versions()
    print_header(args, device, batches, sizes, skipped, vers)

    records, all_ok = [], True
    for size in sizes:
        r1 = args.r1 if args.r1 is not None else min(16, size // 8)
        band = mask_band(r1, size)
        for dtype_name in args.dtype:
            for batch in batches:
                block, ok = bench_batch(args, providers, works, device, batch, size, r1, band, dtype_name)
                records += block
                all_ok &= ok
    print("\nfloor = the fp32 copy out.copy_(x) (read + write the batch once) times the bytes each work must move "
          "(corrupt 1x; loss fwd: read pred + x; loss bwd: write grad; step: all). x-floor = median / floor; "
          "vs official / vs compile = their median / this median.")
    if args.markdown:
        print("\n" + markdown_table(records))
    config = {"batch": batches, "size": sizes, "works": list(works), "providers": ["copy"] + providers}
    write_results(args, device, vers, config, skipped, all_ok, records)
    print(f"done in {time.perf_counter() - started:.1f} s")
    if not all_ok:
        print("FAILED: a provider failed its check or raised (see above)", file=sys.stderr)
        return 1
    return 0


def resolve_settings(args, device):
    """(batches, sizes, works) of this run, with --reps / --warmup / --budget filled in on `args` for the device;
    None (after a one-line message) for sizes or batches that cannot run."""
    gpu = device.type == "cuda"
    if not gpu:
        torch.set_num_threads(max(1, args.threads))
    batches = args.batch or ([1, 16, 64, 256] if gpu else [8])
    sizes = args.size or ([224] if gpu else [64])
    if any(s <= 0 or s % 2 for s in sizes) or any(b <= 0 for b in batches):
        print("--size: image sides must be even and positive; --batch: positive", file=sys.stderr)
        return None
    args.reps = args.reps or (20 if args.quick else 50 if gpu else 30)
    args.warmup = args.warmup if args.warmup is not None else (3 if args.quick or not gpu else 5)
    args.budget = args.budget or (0.25 if args.quick else 0.5 if gpu else 2.0)
    works = WORKS if "all" in args.work else tuple(w for w in WORKS if w in args.work)
    return batches, sizes, works


def plan_providers(args, works, device):
    """(providers to time, in PROVIDER_ORDER, {provider or "provider (works)": why it is skipped}); None (after a
    one-line message) for an unknown provider. --check adds the reference, its oracle."""
    providers, left_out = choose_providers(args.providers, device)
    unknown = [p for p in providers if p not in PROVIDERS]
    if unknown:
        print(f"--providers: unknown {unknown}; choose from copy, {', '.join(PROVIDER_ORDER)}", file=sys.stderr)
        return None
    skipped = dict(left_out)
    for name in providers:  # one line per provider and reason, naming the works it covers
        by_reason = {}
        for work in works:
            reason = unavailable(name, work, device.type)
            if reason is not None:
                by_reason.setdefault(reason, []).append(WORK_TITLES[work])
        for reason, ws in by_reason.items():
            key = name if len(ws) == len(works) else f"{name} ({', '.join(ws)})"
            skipped[key] = reason
    if args.check and "reference" not in providers:
        providers.append("reference")  # the oracle of --check must exist; it is also timed
    providers = sorted((p for p in providers if any(unavailable(p, w, device.type) is None for w in works)),
                       key=PROVIDER_ORDER.index)
    return providers, skipped


def print_header(args, device, batches, sizes, skipped, vers):
    """The versions, the configuration and the skipped providers."""
    print(f"fft_mask bench | {device_name(device)} | torch {vers['torch']} | triton {vers['triton']} | "
          f"python {vers['python']} | mfm_fast {vers['mfm_fast']} | git {git_sha()}")
    print(f"config: B {' '.join(map(str, batches))} | 3x{'/'.join(map(str, sizes))} | pred "
          f"{'/'.join(args.dtype)} | p_low={args.p_low:g} | {timer_name(device)}, warm-up {args.warmup}, reps <= "
          f"{args.reps} (<= {args.budget:g} s each) | mask_band promise "
          f"{'passed' if HAS_MASK_BAND else 'not in this mfm_fast'}")
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")


def bench_batch(args, providers, works, device, batch, size, r1, band, dtype_name):
    """One block: make the inputs, --check the providers, time every (work, provider) and print the table, then
    the warnings the providers raised. Returns (records, no provider failed or raised)."""
    dtype = DTYPES[dtype_name]
    try:
        x, mask, pred = make_inputs(batch, size, r1, args.p_low, dtype, device)
    except Exception as exc:  # e.g. out of memory for a big batch: go on with the next
        print(f"\nB={batch} 3x{size}x{size}: cannot make the inputs ({type(exc).__name__}: {exc})")
        return [], False
    n_low = int((mask.flatten(1)[:, 0] == 0).sum()) if size // 2 > r1 else None  # low-pass drops corners
    masks = f"; {n_low} low-pass, {batch - n_low} high-pass masks" if n_low is not None else ""
    print(f"\nB={batch} (3x{size}x{size}, r1={r1:g}, pred {dtype_name}{masks})")
    failed, checks_ok = {}, True
    with warnings.catch_warnings(record=True) as caught:  # printed after the table, not inside it
        if args.check:
            failed = check_block(providers, device, (x, mask, pred, band), dtype)
            checks_ok = not failed
        meta = {"batch": batch, "size": size, "r1": r1, "dtype": dtype_name}
        block, ok = bench_block(providers, works, (x, mask, pred, band), device, args, failed, meta)
    for note in dict.fromkeys(f"{w.category.__name__}: {w.message} ({Path(w.filename).name}:{w.lineno})"
                              for w in caught):
        print(f"  warned while running the providers: {note}")
    return block, ok and checks_ok


def check_block(providers, device, inputs, dtype):
    """--check on one set of inputs: {provider: ops that failed} (every provider's, when the reference raises)."""
    x, mask, pred, band = inputs
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    try:
        return run_checks(providers, device, x, mask, pred, band, tol)
    except Exception as exc:  # the reference itself failed: nothing can be checked
        print(f"  check: the reference raised {type(exc).__name__}: {exc}")
        return {name: {"corrupt", "masked_freq_loss"} for name in providers}


def write_results(args, device, vers, config, skipped, all_ok, records):
    """The JSON of every sample (unless --no-json) and the --plot PNG beside it, in --out-dir."""
    gpu = device.type == "cuda"
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    dev_tag = re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name(device) if gpu else "cpu").strip("-")
    stem = Path(args.out_dir) / f"fft_mask-{dev_tag}-{stamp}"
    if not args.no_json or args.plot:
        stem.parent.mkdir(parents=True, exist_ok=True)
    if not args.no_json:
        payload = {"device": device_name(device), "device_type": device.type, **vers, "git_sha": git_sha(),
                   "date": datetime.datetime.now().isoformat(timespec="seconds"), "command": sys.argv,
                   "timer": timer_name(device),
                   "config": {"batch": config["batch"], "size": config["size"], "channels": 3, "r1": args.r1,
                              "p_low": args.p_low, "dtype": args.dtype, "works": config["works"],
                              "providers": config["providers"], "reps": args.reps, "warmup": args.warmup,
                              "budget_s": args.budget, "check": args.check, "compile_mode": args.compile_mode,
                              "mask_band_passed": HAS_MASK_BAND},
                   "skipped": skipped, "all_ok": all_ok, "samples": records}
        stem.with_suffix(".json").write_text(json.dumps(payload, indent=1))
        print(f"wrote {stem.with_suffix('.json')}")
    if args.plot:
        plot(records, stem.with_suffix(".png"), f"fft_mask: median time per call | {device_name(device)} | "
             f"3x{'/'.join(map(str, config['size']))} | pred {'/'.join(args.dtype)} | torch {vers['torch']} | "
             f"{datetime.date.today()}")


if __name__ == "__main__":
    sys.exit(main())
