"""First contact of the CUDA kernels with a GPU: launch each one, compare with the torch backend, capture graphs.

    python tools/gpu_smoke.py                   # smoke: every kernel launched, error vs the torch backend printed
    python tools/gpu_smoke.py --graph           # CUDA graph capture + replay of corrupt + loss (fwd + bwd), bit for bit
    python tools/gpu_smoke.py --one-launch      # each kernel once on small inputs (under compute-sanitizer / ncu)
    python tools/gpu_smoke.py --device cpu --backend torch --against reference   # the harness on the CPU

Smoke (default): at 224 and 112, N = 1 and a batch whose planes (3 per image) outnumber the CTAs resident at
once (N = 50 at 224, one CTA per SM; N = 200 at 112), so that the L2 prefetch of the next plane runs past
the first wave: corrupt, the loss with need_grad on (forward + backward) and off (under no_grad), each with
and without the mask_band promise of the MFM disc masks. One line per case: the max error of --backend
against --against (relative to the max magnitude; loss and gradient separately), PASS at <= 1e-4. It sets
CUDA_LAUNCH_BLOCKING=1 (unless set) before CUDA starts, so a faulting kernel is named at its launch.
--graph: captures corrupt + loss forward + backward (--backend) in one torch.cuda.CUDAGraph, refills the
inputs in place with new values, replays, and compares with the same calls run eagerly: torch.equal.
--one-launch: no comparisons, only the launches (N = --n, default 1), so a sanitizer or profiler sees each
kernel once; --with-cufftdx also launches tools/cufftdx_plane.py's kernels if that library is built.
Exit status: 0 when every case passes (or nothing could run: no CUDA device), 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a checkout without `pip install -e .`

TOL = 1e-4
BIG_BATCH = {224: 50, 112: 200}  # 150 / 600 planes: more than one wave of resident CTAs on an H100 / H200


def parse_args(argv):
    from mfm_fast.cli import OneLineParser

    p = OneLineParser(description=__doc__.split("\n")[0], epilog=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--graph", action="store_true", help="CUDA graph capture + replay vs eager")
    mode.add_argument("--one-launch", action="store_true", help="launch each kernel once, no comparisons")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--backend", default="cuda", help="backend under test (default cuda)")
    p.add_argument("--against", default="torch", help="backend compared with (default torch)")
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 112], help="image sides (default 224 112)")
    p.add_argument("--n", type=int, nargs="+", help="batch sizes (default: 1 and 50 at 224, 1 and 200 at 112; "
                   "--one-launch: 1; --graph: 8)")
    p.add_argument("--with-cufftdx", action="store_true", help="--one-launch: also the cuFFTDx reference kernels")
    args = p.parse_args(argv)
    if any(s <= 0 or s % 2 for s in args.sizes):
        p.error("--sizes: image sides must be even and positive")
    if args.n and any(n < 1 for n in args.n):
        p.error("--n: batch sizes must be at least 1")
    return args


def batches(args, side):
    if args.n:
        return args.n
    return [1] if args.one_launch else [8] if args.graph else [1, BIG_BATCH.get(side, 50)]


def make_inputs(n, side, device, seed=0):
    """x in [0, 1), pred ~ N(0, 1), MFM disc masks (r1 = side / 14, half low-pass) and their mask_band."""
    import torch
    import mfm_fast
    from mfm_fast.masks import disc_band

    g = torch.Generator(device=device).manual_seed(seed)
    r1 = side // 14
    x = torch.rand(n, 3, side, side, generator=g, device=device)
    pred = torch.randn(n, 3, side, side, generator=g, device=device)
    mask = mfm_fast.make_masks(n, side, side, r1=r1, p_low=0.5, generator=g, device=device)
    return x, pred, mask, disc_band(side, side, r1, 999)


def rel_err(actual, expected):
    """max |actual - expected| / max |expected| (float64); inf when actual holds a NaN / inf."""
    import torch

    a, e = actual.detach().double(), expected.detach().double()
    if not bool(torch.isfinite(a).all()):
        return float("inf")
    return float((a - e).abs().max() / e.abs().max().clamp_min(1e-300))


def loss_and_grad(backend, x, pred, mask, band, need_grad):
    """(loss, dloss/dpred or None) of the MFM loss (normalize_target=True) on `backend`."""
    import torch
    import mfm_fast

    if not need_grad:
        with torch.no_grad():
            return mfm_fast.masked_freq_loss(pred, x, mask, normalize_target=True, backend=backend,
                                             mask_band=band), None
    p = pred.detach().clone().requires_grad_(True)
    loss = mfm_fast.masked_freq_loss(p, x, mask, normalize_target=True, backend=backend, mask_band=band)
    loss.backward()
    return loss.detach(), p.grad


def smoke(args, device):
    """One line per case; returns the number of failed cases."""
    import torch
    import mfm_fast

    failed = 0
    for side in args.sizes:
        for n in batches(args, side):
            x, pred, mask, band_r = make_inputs(n, side, device, seed=side + n)
            for band in (None, band_r):
                tag = f"{side:3d} N={n:<3d} planes={3 * n:<3d} band={band if band else '-':<2}"
                cases = [("corrupt", None)] + [("loss", ng) for ng in (True, False)]
                for op, need_grad in cases:
                    name = f"{op:7s}{'' if op == 'corrupt' else f' need_grad={int(need_grad)}':12s} {tag}"
                    t0 = time.perf_counter()
                    try:
                        if op == "corrupt":
                            got = mfm_fast.corrupt(x, mask, backend=args.backend, mask_band=band)
                            want = mfm_fast.corrupt(x, mask, backend=args.against, mask_band=band)
                            errs = {"out": rel_err(got, want)}
                        else:
                            got, got_g = loss_and_grad(args.backend, x, pred, mask, band, need_grad)
                            want, want_g = loss_and_grad(args.against, x, pred, mask, band, need_grad)
                            errs = {"loss": rel_err(got, want)}
                            if need_grad:
                                errs["grad"] = rel_err(got_g, want_g)
                        if device.type == "cuda":
                            torch.cuda.synchronize()
                        ok = all(e <= TOL for e in errs.values())
                        detail = ", ".join(f"{k} {v:.1e}" for k, v in errs.items())
                    except Exception as exc:  # report and go on (after a device fault the next cases fail too)
                        ok, detail = False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                    failed += not ok
                    print(f"{'PASS' if ok else 'FAIL'} {name} {args.backend} vs {args.against}: {detail} "
                          f"({time.perf_counter() - t0:.2f} s)", flush=True)
    return failed


def graph_check(args, device):
    """CUDA graph replay vs eager for each size; returns the number of failed sizes."""
    import torch
    import mfm_fast

    failed = 0
    for side in args.sizes:
        for n in batches(args, side):
            try:
                x, pred, mask, _ = make_inputs(n, side, device, seed=7)
                p = pred.clone().requires_grad_(True)

                def step():
                    inp = mfm_fast.corrupt(x, mask, backend=args.backend)
                    loss = mfm_fast.masked_freq_loss(p, x, mask, normalize_target=True, backend=args.backend)
                    loss.backward()
                    return inp, loss.detach(), p.grad

                side_stream = torch.cuda.Stream()
                side_stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side_stream):  # warm-up off the capture stream (caches, lazy loads)
                    for _ in range(3):
                        p.grad = None
                        step()
                torch.cuda.current_stream().wait_stream(side_stream)
                graph = torch.cuda.CUDAGraph()
                p.grad = None
                with torch.cuda.graph(graph):
                    static = step()
                graph.replay()
                torch.cuda.synchronize()
                first = static[0].clone()
                x2, pred2, mask2, _ = make_inputs(n, side, device, seed=8)  # new values into the same tensors
                x.copy_(x2)
                mask.copy_(mask2)
                with torch.no_grad():
                    p.copy_(pred2)
                graph.replay()
                torch.cuda.synchronize()
                replayed = [t.clone() for t in static]
                p.grad = None
                eager = [t.clone() for t in step()]
                same = [torch.equal(a, b) for a, b in zip(replayed, eager)]
                moved = not torch.equal(first, replayed[0])
                ok = all(same) and moved
                detail = (f"corrupt {'==' if same[0] else '!='}, loss {'==' if same[1] else '!='}, "
                          f"grad {'==' if same[2] else '!='} eager; replay read the new inputs: {moved}")
            except Exception as exc:
                ok, detail = False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            failed += not ok
            print(f"{'PASS' if ok else 'FAIL'} graph {side} N={n} {args.backend}: {detail}", flush=True)
    return failed


def one_launch(args, device):
    """Each op once per size (corrupt; loss with and without need_grad), optionally the cuFFTDx kernels."""
    import torch
    import mfm_fast

    impl = None
    if args.with_cufftdx and device.type != "cuda":
        print("cuFFTDx kernels not launched: they run on CUDA tensors only")
    elif args.with_cufftdx:
        import cufftdx_plane

        lib = cufftdx_plane.library_path("sm_90")
        if lib.is_file():
            impl = cufftdx_plane.CufftdxPlanes(lib)
        else:
            print(f"cuFFTDx kernels not launched: {lib} is not built (python tools/cufftdx_plane.py --compile-only)")
    for side in args.sizes:
        for n in batches(args, side):
            x, pred, mask, _ = make_inputs(n, side, device)
            mfm_fast.corrupt(x, mask, backend=args.backend)
            loss_and_grad(args.backend, x, pred, mask, None, True)
            loss_and_grad(args.backend, x, pred, mask, None, False)
            if impl is not None:
                impl.roundtrip(x, mask, list(mfm_fast.IMAGENET_MEAN), list(mfm_fast.IMAGENET_STD))
            if device.type == "cuda":
                torch.cuda.synchronize()
            print(f"launched {side} N={n} ({3 * n} planes): corrupt, loss need_grad=1, loss need_grad=0"
                  + (", cuFFTDx round trip" if impl is not None else ""), flush=True)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not (args.graph or args.one_launch):
        os.environ.setdefault("CUDA_LAUNCH_BLOCKING", "1")  # read when CUDA starts, i.e. after this line
    import torch
    import mfm_fast

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device (torch.cuda.is_available() is False): nothing launched "
              "(--device cpu --backend torch --against reference runs the harness on the CPU)")
        return 0
    if args.graph and args.device != "cuda":
        print("gpu_smoke --graph: CUDA graphs need a CUDA device")
        return 0
    device = torch.device(args.device)
    for b in {args.backend, args.against}:
        why = {op: mfm_fast.available_backends(device.type, op).get(b, f"unknown backend {b!r}")
               for op in ("corrupt", "masked_freq_loss")}
        if any(why.values()):
            print(f"gpu_smoke: backend {b!r} cannot run here: " + "; ".join(f"{k}: {v}" for k, v in why.items() if v))
            return 1
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    mode = "graph" if args.graph else "one-launch" if args.one_launch else "smoke"
    print(f"gpu_smoke {mode} | {where} | torch {torch.__version__} | CUDA_LAUNCH_BLOCKING="
          f"{os.environ.get('CUDA_LAUNCH_BLOCKING', '')} | {args.backend} vs {args.against}", flush=True)
    run = graph_check if args.graph else one_launch if args.one_launch else smoke
    failed = run(args, device)
    print(f"gpu_smoke {mode}: {'all passed' if not failed else f'{failed} FAILED'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/cufftdx_plane.py for --with-cufftdx
    sys.exit(main())
