"""Tile-size sweep for the Triton corruption kernels (kernels/corrupt.py) on a GPU.

    python tools/tune_corrupt.py                 # B=256, 3x224x224, r1=16, band and general paths

For every (path, input -> output dtype, block_rows, block_cols, num_warps) it checks the result
against the torch backend (max |err| / max |ref|) and times it (bench/timing.py: the median of
triton.testing.do_bench, L2 cleared before each rep), next to a copy of the same bytes (read x, write
the output) measured in the same run. Prints a table sorted by time per case; use the winners as launch() defaults.
"""

from __future__ import annotations

import argparse
import itertools
import json
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
    p.add_argument("--json", default=None, help="write every measurement here")
    args = p.parse_args(argv)
    check_bench_args(p, args, ints={"batch": 1})
    check_sizes(p, [args.size])
    check_r1(p, args.r1, [args.size])
    if args.json is not None and (Path(args.json).is_dir() or not Path(args.json).resolve().parent.is_dir()):
        p.error(f"--json: cannot write {args.json!r} (expected a file path in an existing folder)")
    if not torch.cuda.is_available():
        print("tune_corrupt.py needs a CUDA device")
        return 0
    from timing import median_ms  # bench/timing.py: the benchmarks' one timer (do_bench on CUDA)
    from mfm_fast.kernels import corrupt as kc

    g = torch.Generator(device="cuda").manual_seed(0)
    b, s = args.batch, args.size
    x32 = torch.rand(b, 3, s, s, device="cuda", generator=g)
    mask = mfm_fast.make_masks(b, s, s, r1=args.r1, generator=g, device="cuda")
    stats = kc.channel_stats(tuple(mfm_fast.IMAGENET_MEAN), tuple(mfm_fast.IMAGENET_STD), x32.device)
    cases = [("fp32->fp32", x32, torch.float32), ("u8->bf16", (x32 * 255).round().to(torch.uint8), torch.bfloat16),
             ("fp32->bf16", x32, torch.bfloat16)]
    rows = []
    for (label, x, out_dtype), band in itertools.product(cases, (args.r1, 0)):
        out = torch.empty(x.shape, dtype=out_dtype, device="cuda")
        copy_ms = median_ms(lambda: out.copy_(x))
        ref = mfm_fast.corrupt(x, mask, out_dtype=torch.float32, backend="torch")
        torch_ms = median_ms(lambda: mfm_fast.corrupt(x, mask, out_dtype=out_dtype, backend="torch"))
        path = "band" if band else "general"
        print(f"\n{path} {label}: copy {copy_ms:.4f} ms, torch backend {torch_ms:.4f} ms ({torch_ms / copy_ms:.1f}x copy)")
        # None: the launcher's defaults (on the band path per phase: kc.band_tiles(precision, R) and
        # kc.BAND_SPLITS row splits); a given tile or stage count applies to both band phases
        if label != "fp32->fp32":  # the full sweep once; other dtypes at the defaults
            grid = [(None, None, None, None, None)]
        elif band:
            grid = [(None, None, None, None, None), (None, None, None, 2, None), (None, None, None, 3, None),
                    (None, None, None, None, 1), (64, 64, 4, None, None), (64, 16, 4, None, None),
                    (128, 32, 8, None, 1), (128, 16, 8, 3, 1)]
        else:
            grid = [(16, 32, 4, None, None), (16, 64, 4, 1, None)]
        results = []
        for bm, bk, warps, stages, splits in grid:
            try:
                kernels = kc.launch(x, mask, stats, out, band, "tf32x3", bm, bk, warps, stages, splits)
                resources = " | ".join(f"regs {getattr(k, 'n_regs', '?')} spills {getattr(k, 'n_spills', '?')} "
                                       f"smem {getattr(getattr(k, 'metadata', None), 'shared', '?')}" for k in kernels)
                err = float((out.float() - ref).abs().max() / ref.abs().max())
                ms = median_ms(lambda: kc.launch(x, mask, stats, out, band, "tf32x3", bm, bk, warps, stages, splits))
            except Exception as exc:  # a config that does not compile (shared memory, registers) is skipped
                print(f"  bm={bm!s:<4} bk={bk!s:<4} warps={warps} stages={stages} splits={splits}: failed ({type(exc).__name__}: {str(exc)[:80]})")
                continue
            results.append(dict(path=path, case=label, bm=bm, bk=bk, warps=warps, stages=stages, splits=splits,
                                resources=resources, ms=ms, x_copy=ms / copy_ms,
                                err=err, copy_ms=copy_ms, torch_ms=torch_ms))
        for r in sorted(results, key=lambda r: r["ms"])[:6]:
            print(f"  bm={r['bm']!s:<4} bk={r['bk']!s:<4} warps={r['warps']} stages={r['stages']} splits={r['splits']}: "
                  f"{r['ms']:.4f} ms  "
                  f"{r['x_copy']:.2f}x copy  err {r['err']:.1e}  {r['resources']}")
        rows += results
    for precision in ("tf32", "bf16", "ieee"):
        x, out = x32, torch.empty_like(x32)
        ref = mfm_fast.corrupt(x, mask, backend="torch")
        for band in (args.r1, 0):
            o = mfm_fast.corrupt(x, mask, backend="triton", mask_band=band or None, precision=precision)
            err = float((o - ref).abs().max() / ref.abs().max())
            ms = median_ms(lambda: mfm_fast.corrupt(x, mask, backend="triton", mask_band=band or None,
                                                    precision=precision))
            print(f"precision {precision:<6} {'band' if band else 'general'}: {ms:.4f} ms, err {err:.1e}")
            rows.append(dict(path="band" if band else "general", case=f"precision {precision}", ms=ms, err=err))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(device=torch.cuda.get_device_name(), rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
