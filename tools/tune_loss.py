"""Variant sweep for the Triton masked spectral loss (kernels/masked_freq_loss.py) on a GPU.

    python tools/tune_loss.py            # B=256, 3x224x224, r1=16, fp32 pred, normalize_target

Times loss forward + backward (bench/timing.py: median of triton.testing.do_bench, L2 cleared per rep)
for the torch backend, the Triton backend with the transforms along H and W factored (7 x 2^k sizes) or
direct, with and without the mask_band promise, in each precision mode, and a few block configurations
of the full path, next to 1.5 copies of the batch (read pred, read x, write grad) measured in the same
run. Every variant's loss and gradient are compared with the torch backend.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # bench/timing.py
import mfm_fast  # noqa: E402
from mfm_fast.cli import OneLineParser, check_bench_args, check_r1, check_sizes  # noqa: E402


def main(argv=None) -> int:
    p = OneLineParser(prog=os.path.basename(__file__), description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--r1", type=int, default=16)
    p.add_argument("--quick", action="store_true",
                   help="only torch and tf32x3 with the transforms factored / direct (each variant compiles kernels)")
    args = p.parse_args(argv)
    check_bench_args(p, args, ints={"batch": 1})
    check_sizes(p, [args.size])
    check_r1(p, args.r1, [args.size])
    if not torch.cuda.is_available():
        print("tune_loss.py needs a CUDA device")
        return 0
    from timing import median_ms  # bench/timing.py: the benchmarks' one timer (do_bench on CUDA)
    import mfm_fast.kernels.masked_freq_loss as K

    g = torch.Generator(device="cuda").manual_seed(0)
    n, s = args.batch, args.size
    x = torch.rand(n, 3, s, s, device="cuda", generator=g)
    pred = torch.randn(n, 3, s, s, device="cuda", generator=g).requires_grad_(True)
    mask = mfm_fast.make_masks(n, s, s, r1=args.r1, generator=g, device="cuda")
    floor = 1.5 * median_ms(lambda: x.clone())
    print(f"1.5-copy floor {floor:.4f} ms  ({torch.cuda.get_device_name()}, B={n}, 3x{s}x{s}, fp32)")

    def run(**kw):
        pred.grad = None
        loss = mfm_fast.masked_freq_loss(pred, x, mask, normalize_target=True, **kw)
        loss.backward()
        return loss.detach(), pred.grad.detach().clone()

    ref_loss, ref_grad = run(backend="torch")

    def bench(label, **kw):
        try:
            loss, grad = run(**kw)
            err = max(float((loss - ref_loss).abs() / ref_loss.abs()),
                      float((grad - ref_grad).abs().max() / ref_grad.abs().max()))
            ms = median_ms(lambda: run(**kw))
            print(f"{label:<56} {ms:8.4f} ms  {ms / floor:6.2f}x floor  max rel err vs torch {err:.1e}")
        except Exception as exc:  # report and go on: one failing variant must not hide the others
            print(f"{label:<56} failed: {type(exc).__name__}: {str(exc)[:100]}")

    bench("torch", backend="torch")
    base, factors = K._config, (K.FACTOR_H, K.FACTOR_W)
    try:
        combos = ((True, True), (False, False)) if args.quick else ((True, True), (True, False), (False, True),
                                                                    (False, False))
        for fact_h, fact_w in combos:  # the 7 x 2^k transforms factored (the default) or direct
            K.FACTOR_H, K.FACTOR_W = fact_h, fact_w
            for band in (args.r1, None):
                for prec in ("tf32x3", "tf32", "bf16") if fact_h == fact_w and not args.quick else ("tf32x3",):
                    bench(f"triton H={'fact' if fact_h else 'direct'} W={'fact' if fact_w else 'direct'} "
                          f"mask_band={band} precision={prec}", backend="triton", mask_band=band, precision=prec)
        K.FACTOR_H, K.FACTOR_W = factors
        for bkx, warps, stages in [] if args.quick else [(16, 4, 2), (32, 4, 2), (32, 8, 1), (32, 8, 3), (16, 8, 2), (16, 4, 3)]:
            K._config = lambda h, w, b=bkx, nw=warps, ns=stages: {**base(h, w), "BKX": b, "fwd_warps": nw,
                                                                 "num_stages": ns}
            bench(f"triton full path BKX={bkx} warps={warps} stages={stages}", backend="triton")
    finally:
        K._config, (K.FACTOR_H, K.FACTOR_W) = base, factors
    return 0


if __name__ == "__main__":
    sys.exit(main())
