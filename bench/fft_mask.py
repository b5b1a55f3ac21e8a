"""Benchmark of MFM frequency corruption and the masked spectral loss (fwd + bwd), per provider.

    python bench/fft_mask.py                        # defaults for the device found (see below)
    python bench/fft_mask.py --check                # first verify every provider against the reference
    python bench/fft_mask.py --batch 64 256 --work loss --providers official,torch --dtype bf16

Defaults: on CUDA B=256, 3x224x224, r1=16; on CPU B=8, 3x64x64, r1=8 (r1 defaults to
min(16, size // 8), so the low band keeps a similar share of a small image). p_low=0.5, pred fp32.

Work items: ``corrupt`` (mfm_fast.corrupt) and ``loss`` (mfm_fast.masked_freq_loss, then
.backward()). Providers:
  copy       the floor: ``out.copy_(x)`` into a preallocated tensor (read + write the batch once).
             The loss floor is that copy time x bytes(read pred + read x + write grad) / bytes(copy),
             i.e. 1.5 x copy for fp32 pred.
  official   an eager replica of the released MFM code's op sequence (fft2 + fftshift + complex64,
             two ortho transforms and torch.stack in the loss), written below from MFM_SPEC.md.
  reference, torch, triton, cuda
             mfm_fast with that backend; triton / cuda are listed as skipped, with the reason from
             mfm_fast.available_backends(), when they cannot run on the device.
Timing: CUDA events with an L2 flush before every rep on CUDA, time.perf_counter on CPU; warm-up
runs, then up to --reps reps (stopping early, after at least 3, once --budget seconds are spent).
Every figure is also given as a ratio to the copy floor measured in the same run (x-floor).
On CPU the run uses 1 thread unless --threads says otherwise: on a small box shared with other
jobs, OpenMP's spinning worker threads made CPU timings 10-100x slower and far noisier.
Results (every sample) go to bench/results/fft_mask-<device>-<timestamp>.json unless --no-json.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

import mfm_fast
from mfm_fast import IMAGENET_MEAN, IMAGENET_STD

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
WORKS = ("corrupt", "loss")
WORK_TITLES = {"corrupt": "corrupt", "loss": "loss fwd+bwd"}


# ---- the "official" peer: the released MFM code's op sequence, eager -------------------------

@functools.lru_cache(maxsize=8)
def _imagenet_stats(device: torch.device):
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    return mean, std


def official_normalize(x):
    mean, std = _imagenet_stats(x.device)
    return (x - mean) / std


def official_corrupt(x, mask):
    """fft2 -> fftshift -> * mask -> ifftshift -> ifft2 -> real -> clamp(0, 1) -> normalise."""
    freq = torch.fft.fftshift(torch.fft.fft2(x), dim=(-2, -1))
    freq = freq * mask[:, None]
    img = torch.fft.ifft2(torch.fft.ifftshift(freq, dim=(-2, -1))).real
    return official_normalize(img.clamp(0, 1))


def official_spectrum(z):
    freq = torch.fft.fftshift(torch.fft.fft2(z.float(), norm="ortho"), dim=(-2, -1))
    return torch.stack([freq.real, freq.imag], -1)


def official_loss(pred, x, mask, gamma=1.0):
    """Two ortho spectra, squared difference of (re, im), sqrt, masked mean over the batch."""
    target = official_normalize(x)
    dist = (official_spectrum(pred) - official_spectrum(target)) ** 2
    loss = torch.sqrt(dist.sum(-1) + 1e-12) ** gamma
    return (loss * (1 - mask)[:, None]).sum() / (1 - mask).sum() / pred.shape[1]


def _mfm_provider(backend):
    return {
        "corrupt": lambda x, mask: mfm_fast.corrupt(x, mask, backend=backend),
        "loss": lambda pred, x, mask: mfm_fast.masked_freq_loss(pred, x, mask, normalize_target=True,
                                                                backend=backend),
    }


# Every provider but "copy" (the floor, measured separately). Tests monkeypatch entries here.
PROVIDERS = {"official": {"corrupt": official_corrupt, "loss": official_loss},
             **{name: _mfm_provider(name) for name in mfm_fast.BACKENDS}}


# ---- timing -----------------------------------------------------------------------------------

def time_fn(fn, device, warmup, reps, budget_s):
    """Milliseconds per call of fn(): `warmup` untimed calls, then up to `reps` timed ones."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        flush = torch.empty(256 * 2 ** 20, dtype=torch.int8, device=device)  # bigger than any L2
        pairs, start = [], time.perf_counter()
        for i in range(reps):
            flush.zero_()
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            pairs.append((begin, end))
            if i >= 2 and time.perf_counter() - start > budget_s:
                break
        torch.cuda.synchronize(device)
        return [b.elapsed_time(e) for b, e in pairs]
    samples, start = [], time.perf_counter()
    for i in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
        if i >= 2 and time.perf_counter() - start > budget_s:
            break
    return samples


def percentile(values, q):
    """Linear-interpolation percentile, q in [0, 100]."""
    v = sorted(values)
    pos = (len(v) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def make_inputs(batch, size, r1, p_low, dtype, device):
    gen = torch.Generator(device).manual_seed(0)
    mask = mfm_fast.make_masks(batch, size, size, r1=r1, p_low=p_low, generator=gen, device=device)
    x = torch.rand(batch, 3, size, size, generator=gen, device=device)  # clean pixels in [0, 1]
    pred = torch.randn(batch, 3, size, size, generator=gen, device=device).to(dtype).requires_grad_()
    return x, mask, pred


def work_fn(provider, work, x, mask, pred):
    if work == "corrupt":
        corrupt = PROVIDERS[provider]["corrupt"]
        return lambda: corrupt(x, mask)
    loss_fn = PROVIDERS[provider]["loss"]

    def step():
        pred.grad = None
        loss_fn(pred, x, mask).backward()
    return step


# ---- --check: every provider against the reference backend ----------------------------------

def _rel(a, ref):
    return float((a.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30))


def _loss_and_grad(provider, pred, x, mask):
    pred.grad = None
    loss = PROVIDERS[provider]["loss"](pred, x, mask)
    loss.backward()
    grad, pred.grad = pred.grad.detach().clone(), None
    return loss.detach(), grad


def run_checks(providers, x, mask, pred, tol):
    """Print PASS / FAIL per provider; return True when all pass."""
    ref_out = PROVIDERS["reference"]["corrupt"](x, mask)
    ref_loss, ref_grad = _loss_and_grad("reference", pred, x, mask)
    all_ok = True
    for name in providers:
        if name == "reference":
            continue
        try:
            out = PROVIDERS[name]["corrupt"](x, mask)
            loss, grad = _loss_and_grad(name, pred, x, mask)
            errs = {"corrupt": _rel(out, ref_out), "loss": _rel(loss, ref_loss), "grad": _rel(grad, ref_grad)}
            ok = out.shape == ref_out.shape and all(e <= tol for e in errs.values())  # NaN fails too
            detail = "  ".join(f"{k} {v:.1e}" for k, v in errs.items())
        except Exception as exc:  # a provider that raises fails its check; the others still run
            ok, detail = False, f"raised {type(exc).__name__}: {exc}"
        all_ok &= ok
        print(f"  check {name:<10} {'PASS' if ok else 'FAIL'}  (max |err| / max |ref|, tol {tol:.0e})  {detail}")
    return all_ok


def bench_batch(providers, works, x, mask, pred, device, warmup, reps, budget, loss_floor_factor):
    """Time every (work, provider) on one batch and print its table; return (records, no provider raised)."""
    out = torch.empty_like(x)
    copy_ms = time_fn(lambda: out.copy_(x), device, warmup, reps, budget)
    print(f"{'work':<13} {'provider':<10} {'median ms':>10} {'p20 ms':>9} {'p80 ms':>9} {'x-floor':>8} "
          f"{'vs official':>12}")
    records, ok = [], True
    for work in works:
        factor = 1.0 if work == "corrupt" else loss_floor_factor
        rows = {"copy": [t * factor for t in copy_ms]}
        for name in providers:
            try:
                rows[name] = time_fn(work_fn(name, work, x, mask, pred), device, warmup, reps, budget)
            except Exception as exc:  # report and go on with the other providers
                print(f"  {name} {work}: raised {type(exc).__name__}: {exc}")
                ok = False
        floor = percentile(rows["copy"], 50)
        official = percentile(rows["official"], 50) if "official" in rows else None
        for name, samples in rows.items():
            med = percentile(samples, 50)
            rec = {"batch": x.shape[0], "work": work, "provider": name, "median_ms": med,
                   "p20_ms": percentile(samples, 20), "p80_ms": percentile(samples, 80),
                   "x_floor": med / floor, "speedup_vs_official": official / med if official else None,
                   "samples_ms": samples}
            label = name
            if name == "copy" and work == "loss":
                rec["note"] = f"loss floor = {factor:g} x the measured copy time"
                label = f"copy x{factor:g}"
            records.append(rec)
            vs = f"{rec['speedup_vs_official']:.2f}x" if official else "-"
            print(f"{WORK_TITLES[work]:<13} {label:<10} {med:>10.3f} {rec['p20_ms']:>9.3f} "
                  f"{rec['p80_ms']:>9.3f} {rec['x_floor']:>8.2f} {vs:>12}")
    return records, ok


# ---- the run ----------------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--batch", type=int, nargs="+", help="batch sizes (default 256 on CUDA, 8 on CPU)")
    p.add_argument("--size", type=int, help="image side (default 224 on CUDA, 64 on CPU)")
    p.add_argument("--r1", type=float, help="low-band radius (default min(16, size // 8))")
    p.add_argument("--p-low", type=float, default=0.5)
    p.add_argument("--providers", default="official,reference,torch,triton,cuda",
                   help="comma list; the copy floor is always measured")
    p.add_argument("--work", choices=("corrupt", "loss", "all"), default="all")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="dtype of pred")
    p.add_argument("--reps", type=int, help="timed reps (default 50 on CUDA, 10 on CPU)")
    p.add_argument("--warmup", type=int, help="untimed runs (default 5 on CUDA, 3 on CPU)")
    p.add_argument("--budget", type=float, help="seconds per measurement before stopping early "
                   "(default 20 on CUDA, 2 on CPU)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads during a CPU run (default 1)")
    p.add_argument("--check", action="store_true", help="verify providers against the reference first")
    p.add_argument("--no-json", action="store_true")
    p.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    return p.parse_args(argv)


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    n = torch.get_num_threads()
    return f"cpu {platform.machine()} ({n} thread{'s' if n != 1 else ''})"


def git_sha():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                              capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except Exception:
        return None


def main(argv=None):
    args = parse_args(argv)
    threads = torch.get_num_threads()
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)  # run() may change it; leave the caller's process as it was


def run(args):
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available here (torch.cuda.is_available() is False)",
              file=sys.stderr)
        return 2
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    gpu = device.type == "cuda"
    if not gpu:
        torch.set_num_threads(max(1, args.threads))
    batches = args.batch or ([256] if gpu else [8])
    size = args.size or (224 if gpu else 64)
    r1 = args.r1 if args.r1 is not None else min(16, size // 8)
    reps = args.reps or (50 if gpu else 10)
    warmup = args.warmup if args.warmup is not None else (5 if gpu else 3)
    budget = args.budget or (20.0 if gpu else 2.0)
    dtype = DTYPES[args.dtype]
    works = WORKS if args.work == "all" else (args.work,)

    requested = [p.strip() for p in args.providers.split(",") if p.strip() and p.strip() != "copy"]
    unknown = [p for p in requested if p not in PROVIDERS]
    if unknown:
        print(f"--providers: unknown {unknown}; choose from copy, {', '.join(PROVIDERS)}", file=sys.stderr)
        return 2
    reasons = mfm_fast.available_backends(device.type)
    skipped = {p: reasons[p] for p in requested if reasons.get(p) is not None}
    providers = [p for p in requested if p not in skipped]

    timer = "CUDA events, L2 flushed per rep" if gpu else "time.perf_counter"
    print(f"fft_mask bench | {device_name(device)} | torch {torch.__version__} | python {platform.python_version()}"
          f" | mfm_fast {mfm_fast.__version__}")
    print(f"config: 3x{size}x{size}, r1={r1:g}, p_low={args.p_low:g}, pred {args.dtype} | {timer}, "
          f"warm-up {warmup}, reps <= {reps} (<= {budget:g} s each)")
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")

    # The loss floor: read pred + read x + write grad (pred's dtype), in units of one fp32 copy (read + write x).
    elem = torch.tensor([], dtype=dtype).element_size()
    loss_floor_factor = (2 * elem + 4) / 8
    records, all_ok = [], True
    for batch in batches:
        x, mask, pred = make_inputs(batch, size, r1, args.p_low, dtype, device)
        n_low = int((mask.flatten(1)[:, 0] == 0).sum()) if size // 2 > r1 else None  # low-pass drops the corner
        print(f"\nB={batch}" + (f" ({n_low} low-pass, {batch - n_low} high-pass masks)" if n_low is not None else ""))
        if args.check:
            all_ok &= run_checks(providers, x, mask, pred, tol=1e-4 if dtype == torch.float32 else 1e-2)
        batch_records, ok = bench_batch(providers, works, x, mask, pred, device, warmup, reps, budget,
                                        loss_floor_factor)
        records += batch_records
        all_ok &= ok
    print(f"\ncopy = out.copy_(x) (read + write the batch once), the floor of corrupt; the floor of loss fwd+bwd "
          f"is {loss_floor_factor:g} x that copy (read pred + read x + write grad). x-floor = median / floor.")

    if not args.no_json:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        dev_tag = re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name(device) if gpu else "cpu").strip("-")
        path = Path(args.out_dir) / f"fft_mask-{dev_tag}-{stamp}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"device": device_name(device), "device_type": device.type, "torch": torch.__version__,
                   "python": platform.python_version(), "mfm_fast": mfm_fast.__version__, "git_sha": git_sha(),
                   "timer": timer, "config": {"batch": batches, "size": size, "channels": 3, "r1": r1,
                                              "p_low": args.p_low, "dtype": args.dtype, "works": list(works),
                                              "providers": ["copy"] + providers, "reps": reps, "warmup": warmup,
                                              "budget_s": budget, "check": args.check},
                   "skipped": skipped, "all_ok": all_ok, "samples": records}
        path.write_text(json.dumps(payload, indent=1))
        print(f"wrote {path}")
    if not all_ok:
        print("FAILED: a provider failed its check or raised (see above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
