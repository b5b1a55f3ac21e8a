"""Benchmark of the FOLK / seed-idea ops: adaptive masks, FOLK corruption, the magnitude/phase loss.

    python bench/folk_ops.py                         # CUDA: B = 64 256 at 3x224x224; CPU: B = 8 at 3x64x64
    python bench/folk_ops.py --batch 256 --check     # verify torch against the fp64 reference first

Work items (per provider: reference = fp64 oracle, torch = the torch backend; copy = the floor):
  masks        make_adaptive_masks(x, "mixed", keep_ratio) (spectrum of the channel mean, top-k threshold)
  folk_corrupt masks + mfm_fast.corrupt with them (what the FOLK student's input costs)
  mp_loss      MaskedFreqLoss(distance="magnitude_phase") forward + backward
  loss         the default complex MaskedFreqLoss forward + backward, for comparison with mp_loss
Each median is also a ratio to a copy of the same bytes measured in the same run (x-floor: the fp32 copy
out.copy_(x) times 1 for masks / folk_corrupt and 1.5 for the losses: read pred + x, write the grad).
Timing as bench/fft_mask.py (bench/timing.py: triton.testing.do_bench on CUDA, torch.utils.benchmark on
CPU). Results go to
bench/results/folk_ops-<device>-<timestamp>.json unless --no-json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without `pip install -e .`
sys.path.insert(0, str(Path(__file__).resolve().parent))
import fft_mask  # noqa: E402  (versions, device names, relative errors)
from timing import summary, time_ms, timer_name  # noqa: E402  (bench/timing.py: the benchmarks' one timer)
import mfm_fast  # noqa: E402
from mfm_fast import backends  # noqa: E402
from mfm_fast.cli import OneLineParser, check_bench_args, check_sizes, library_check  # noqa: E402

WORKS = ("masks", "folk_corrupt", "mp_loss", "loss")
FLOOR = {"masks": 1.0, "folk_corrupt": 1.0, "mp_loss": 1.5, "loss": 1.5}
PROVIDERS = tuple(n for n in backends.names() if "adaptive_masks" in backends.get(n).ops)  # FOLK's masks run there


def work_fn(work, backend, x, pred, keep_ratio):
    gen = torch.Generator(x.device)

    def masks():
        gen.manual_seed(0)
        return mfm_fast.make_adaptive_masks(x, "mixed", keep_ratio, generator=gen, backend=backend)

    fixed = masks()
    if work == "masks":
        return masks
    if work == "folk_corrupt":
        return lambda: mfm_fast.corrupt(x, masks(), backend=backend)
    distance = "magnitude_phase" if work == "mp_loss" else "complex"

    def loss():
        pred.grad = None
        mfm_fast.masked_freq_loss(pred, x, fixed, normalize_target=True, distance=distance, phase_weight=0.5,
                                  backend=backend).backward()
    return loss


def check(x, pred, keep_ratio):
    """max |torch - reference| / max |reference| for the masks, the FOLK input, the mp loss and its grad."""
    out = {}
    m = {b: work_fn("masks", b, x, pred, keep_ratio)() for b in ("reference", "torch")}
    out["masks (fraction differing)"] = float((m["torch"] != m["reference"]).double().mean())
    c = {b: mfm_fast.corrupt(x, m["reference"], backend=b) for b in ("reference", "torch")}
    out["folk_corrupt"] = fft_mask._rel(c["torch"], c["reference"])
    res = {}
    for b in ("reference", "torch"):
        pred.grad = None
        loss = mfm_fast.masked_freq_loss(pred, x, m["reference"], normalize_target=True, distance="magnitude_phase",
                                         phase_weight=0.5, backend=b)
        loss.backward()
        res[b] = (loss.detach(), pred.grad.detach().clone())
    pred.grad = None
    out["mp_loss"] = fft_mask._rel(res["torch"][0], res["reference"][0])
    out["mp_loss grad"] = fft_mask._rel(res["torch"][1], res["reference"][1])
    return out


def main(argv=None) -> int:
    p = OneLineParser(prog=os.path.basename(__file__), description=__doc__.split("\n")[0], epilog=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--batch", type=int, nargs="+", help="batch sizes (default 64 256 on CUDA, 8 on CPU)")
    p.add_argument("--size", type=int, help="image side (default 224 on CUDA, 64 on CPU)")
    p.add_argument("--keep-ratio", type=float, default=0.01, help="FOLK keep ratio")
    p.add_argument("--providers", default="reference,torch", help="comma list of reference, torch")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--budget", type=float, default=0.5, help="seconds of timed reps per measurement")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads during a CPU run")
    p.add_argument("--check", action="store_true", help="compare torch with the fp64 reference first")
    p.add_argument("--no-json", action="store_true")
    p.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    check_bench_args(p, args, ints={"batch": 1, "reps": 1, "warmup": 0, "threads": 1}, positive=("budget",),
                     out_dirs=("out_dir",))
    check_sizes(p, [args.size] if args.size is not None else [])
    from mfm_fast import _validate as V
    library_check(p, "--keep-ratio", V.check_number, "keep_ratio", args.keep_ratio, low=0.0, high=1.0,
                  low_open=True, high_open=True)
    return fft_mask.run_restoring_threads(run, args)


def run(args) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available here", file=sys.stderr)
        return 2
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    providers = [s.strip() for s in args.providers.split(",") if s.strip()]
    if not providers or any(s not in PROVIDERS for s in providers):
        print(f"folk_ops.py: error: --providers: expected a comma list of {', '.join(PROVIDERS)}, got {args.providers!r}",
              file=sys.stderr)
        return 2
    batches, size = args.batch or ([64, 256] if gpu else [8]), args.size or (224 if gpu else 64)
    if size <= 0 or size % 2 or any(b <= 0 for b in batches) or not 0 < args.keep_ratio < 1:
        print("--size: even and positive; --batch: positive; --keep-ratio: in (0, 1)", file=sys.stderr)
        return 2
    if not gpu:
        torch.set_num_threads(max(1, args.threads))
    vers = fft_mask.versions()
    print(f"folk_ops bench | {fft_mask.device_name(device)} | torch {vers['torch']} | git {fft_mask.git_sha()} | "
          f"3x{size}x{size}, keep_ratio {args.keep_ratio:g}, fp32 | {timer_name(device)}")
    records = []
    for batch in batches:
        gen = torch.Generator(device).manual_seed(0)
        x = torch.rand(batch, 3, size, size, generator=gen, device=device)
        pred = torch.randn(batch, 3, size, size, generator=gen, device=device).requires_grad_()
        print(f"\nB={batch}")
        if args.check:
            for name, err in check(x, pred, args.keep_ratio).items():
                print(f"  check {name}: {err:.2e}")
        out = torch.empty_like(x)
        copy = summary(time_ms(lambda: out.copy_(x), device, args.reps, args.warmup, args.budget))[0]
        print(f"{'work':<13} {'provider':<10} {'median ms':>10} {'p20 ms':>9} {'p80 ms':>9} {'x-floor':>8}")
        for work in WORKS:
            floor = copy * FLOOR[work]
            print(f"{work:<13} {'copy':<10} {floor:>10.3f} {'':>9} {'':>9} {1.0:>8.2f}")
            for backend in providers:
                samples = time_ms(work_fn(work, backend, x, pred, args.keep_ratio), device, args.reps, args.warmup,
                                  args.budget)
                med, p20, p80 = summary(samples)
                rec = {"batch": batch, "size": size, "work": work, "provider": backend, "median_ms": med,
                       "p20_ms": p20, "p80_ms": p80,
                       "floor_ms": floor, "x_floor": med / floor, "samples_ms": samples}
                records.append(rec)
                print(f"{work:<13} {backend:<10} {med:>10.3f} {rec['p20_ms']:>9.3f} {rec['p80_ms']:>9.3f} "
                      f"{rec['x_floor']:>8.2f}")
        del x, pred, out
    if not args.no_json:
        dev_tag = re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name(device) if gpu else "cpu").strip("-")
        path = Path(args.out_dir) / f"folk_ops-{dev_tag}-{datetime.datetime.now():%Y%m%d-%H%M%S}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"device": fft_mask.device_name(device), **vers, "git_sha": fft_mask.git_sha(),
                                    "command": sys.argv, "timer": timer_name(device), "keep_ratio": args.keep_ratio,
                                    "samples": records},
                                   indent=1))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
