"""Compile the Triton kernels for a GPU without one: shared memory, MMA counts, 3xTF32 structure.

    python tools/aot_sm90.py [--size 224] [--precision tf32x3] [--arch 90] [--ops loss corrupt] [--dump DIR]

Runs triton.compile on the kernels of kernels/masked_freq_loss.py and kernels/corrupt.py with their
launchers' default block sizes for CUDA compute capability ``--arch`` (Hopper: 90), so a CPU-only
machine can see whether a change still fits shared memory and what Triton made of the GEMMs. For
each kernel it prints:

- the shared memory and the tensor-core instructions in the PTX;
- registers and spills from Triton's bundled ptxas -v on the PTX: close to, not exactly, the launch
  build, and only for the installed Triton. The corruption kernels are specialised as Triton's
  launcher specialises a contiguous fp32 batch at this size (corrupt_launch_values: unit strides
  constant, pointers and 16-divisible integers hinted); the loss kernels are compiled unspecialised;
- in the TTGIR, how many dots start from a zero accumulator: for the loss with precision tf32x3 every
  group of three tf32 products must (a third of all dots), so that the MMA's round-toward-zero never
  sees the running sum (see tests/backends/tensor_core_emulation.py).

TRITON_INTERPRET must be unset (the script unsets it before importing triton).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from mfm_fast.kernels import corrupt as cor  # noqa: E402
from mfm_fast.kernels import masked_freq_loss as mfl  # noqa: E402
from mfm_fast.kernels._dft import next_pow2  # noqa: E402
from mfm_fast.cli import OneLineParser  # noqa: E402

DOT = re.compile(r"(?:tt\.dot|ttng\.warp_group_dot) (%[\w#]+), (%[\w#]+), (%[\w#]+)")
ZERO = re.compile(r"(%[\w]+) = arith\.constant dense<0\.000000e\+00>")


def corrupt_specs(size: int, precision: str, band: int = 16, coef_tiles=None, out_tiles=None) -> dict:
    """name -> (jit function, constexprs, num_warps, num_stages) as kernels/corrupt.launch launches them (default tiles;
    the band path's two phases at R = `band` and at the widest band, the most shared memory)."""
    hp = wp = next_pow2(size)
    common = dict(IS_BYTE=False, PRECISION=precision, INTERPRETED=False)
    general_rows = min(cor.GENERAL_BLOCK_ROWS, hp)
    specs = {}
    for suffix, r in (("", band), (f"_r{cor.BAND_MAX}", cor.BAND_MAX)):
        coef, out = cor.band_tiles(precision, r)
        for phase, fn, (rows, cols, warps, stages) in (("coef", cor._band_coefficients_kernel, coef_tiles or coef),
                                                       ("out", cor._band_lowpass_kernel, out_tiles or out)):
            specs[f"corrupt_band_{phase}{suffix}"] = (fn, dict(WP=wp, HP=hp, KP=next_pow2(2 * r - 1), BKX=next_pow2(r),
                                                              BM=min(rows, hp), BK=min(cols, wp), **common), warps,
                                                      stages)
    return {
        **specs,
        "corrupt_general": (cor._corrupt_spectrum_kernel, dict(WP=wp, HP=hp, BK=min(32, wp), KP=hp,
                                                               BKX=cor.GENERAL_BLOCK_KX, BM=general_rows,
                                                               FUSED=False, **common), 4, None),
        "corrupt_rows": (cor._corrupt_inverse_rows_kernel, dict(WP=wp, HP=hp, BKX=cor.GENERAL_BLOCK_KX, BM=general_rows,
                                                                BK=min(32, wp), PRECISION=precision,
                                                                INTERPRETED=False), 4, None),
    }


def loss_specs(size: int, precision: str, band: int = mfl.BAND_MAX) -> dict:
    """name -> (jit function, constexprs, num_warps) as kernels/masked_freq_loss._forward launches them (the
    band kernel at its widest band)."""
    cfg = mfl._config(size, size)
    common = dict(NORM=True, T_U8=False, NEED_GRAD=True, GAMMA_MODE=0, PREC=precision)
    shape = dict(HP=cfg["HP"], KXP=cfg["KXP"], WP=cfg["WP"])
    factored, q = {}, size // mfl.FACTOR
    if mfl._factored(size):  # the square planes here: H and W both factored
        factored["fact_fwd"] = (mfl._mfl_fact_fwd_kernel, dict(P=mfl.FACTOR, PP=8, Q=q, KXP=cfg["KXP"], WP=cfg["WP"],
                                                               BKX=cfg["BKX"], BW=cfg["BW"], HAS_MASK=True, BAND=True,
                                                               **common), cfg["fwd_warps"])
        factored["fact_inv"] = (mfl._mfl_fact_inv_kernel, dict(P=mfl.FACTOR, PP=8, Q=q, K2=cfg["KXP"] // q,
                                                               BY=cfg["BYV"], BAND=True, PREC=precision), cfg["warps"])
    return {
        **factored,
        "full_fwd": (mfl._mfl_full_fwd_kernel, dict(**shape, BKX=cfg["BKX"], BY=cfg["BY"], BW=cfg["BW"],
                                                    BKC=cfg["BKC"], HAS_MASK=True, BAND=True, **common),
                     cfg["fwd_warps"]),
        "full_inv": (mfl._mfl_full_inv_kernel, dict(KXP=cfg["KXP"], WP=cfg["WP"], BY=cfg["BYV"], BX=cfg["BX"],
                                                    BAND=True, PREC=precision), cfg["warps"]),
        "band": (mfl._mfl_band_kernel, dict(**shape, RYP=next_pow2(2 * band - 1), RXP=next_pow2(band),
                                            BY=cfg["BYV"], BW=cfg["BW"], **common), cfg["warps"]),
    }, cfg["num_stages"]


def kernel_specs(size: int, precision: str, ops=("loss", "corrupt")) -> list:
    """[(name, jit function, constexprs, num_warps, num_stages or None)] for the chosen ops."""
    specs = []
    if "loss" in ops:
        loss, stages = loss_specs(size, precision)
        specs += [(name, *spec, stages, None) for name, spec in loss.items()]
    if "corrupt" in ops:
        values = corrupt_launch_values(size)
        specs += [(name, *spec, values) for name, spec in corrupt_specs(size, precision).items()]
    return specs


def corrupt_launch_values(size: int, batch: int = 256, channels: int = 3, band: int = 16) -> dict:
    """The corruption kernels' integer arguments at a contiguous (batch, channels, size, size) launch
    (a bool mask (batch, size, size), the default row splits), for the specialisation Triton's launcher applies."""
    plane = size * size
    rows = cor.band_rows_per_split(size, min(cor.BAND_COEF_TILES[0], next_pow2(size)), cor.BAND_SPLITS)
    return dict(mask_ptr="*u8", C=channels, H=size, W=size, s_xn=channels * plane, s_xc=plane, s_xh=size, s_xw=1,
                s_mn=plane, s_mh=size, s_mw=1, R=band, SPLITS=triton.cdiv(size, rows), ROWS_PER_SPLIT=rows,  # band path
                KY0=0, NUM_KY=size, NUM_KX=size // 2 + 1,  # general path
                NUM_BLOCKS=triton.cdiv(size // 2 + 1, cor.GENERAL_BLOCK_KX))


def _signature(fn, constexprs: dict, values=None) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) for triton.compile. With `values` (argument name -> the integer
    a launch passes) it specialises as Triton's launcher does: integers equal to 1 become constants,
    pointers (torch allocations) and integers divisible by 16 get tt.divisibility = 16."""
    constexprs = dict(constexprs)
    if values is not None:
        constexprs.update({name: 1 for name in fn.arg_names if values.get(name) == 1 and name not in constexprs})

    def kind(name):
        if name in constexprs:
            return "constexpr"
        if name.endswith("_ptr"):
            return (values or {}).get(name, "*fp32")
        return "fp32" if name in ("inv_sqrt", "gamma") else "i32"
    signature = {name: kind(name) for name in fn.arg_names}
    attrs = {}
    if values is not None:
        attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
                 if signature[name] != "constexpr"
                 and (name.endswith("_ptr") or isinstance(values.get(name), int) and values[name] % 16 == 0)}
    return signature, constexprs, attrs


def dot_structure(ttgir: str) -> tuple[int, int]:
    """(number of dots, number whose accumulator operand is a zero constant) in a TTGIR listing."""
    zeros = set(ZERO.findall(ttgir))
    dots = DOT.findall(ttgir)
    return len(dots), sum(acc in zeros for _, _, acc in dots)


def ptxas_usage(ptx: str, arch: int) -> tuple:
    """(registers, spill store bytes) that Triton's bundled ptxas reports for the PTX, or (None, None)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        suffix = "a" if arch >= 90 else ""
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(ptx)
        out = subprocess.run([get_ptxas(arch).path, f"-arch=sm_{arch}{suffix}", "-v", f.name, "-o", os.devnull],
                             capture_output=True, text=True, timeout=300).stderr
        os.unlink(f.name)
        regs, spills = re.search(r"Used (\d+) registers", out), re.search(r"(\d+) bytes spill stores", out)
        return int(regs.group(1)), int(spills.group(1)) if spills else 0
    except Exception:  # ptxas missing or a different Triton layout: the columns stay empty
        return None, None


def compile_all(size: int = 224, precision: str = "tf32x3", arch: int = 90, ops=("loss", "corrupt")) -> dict:
    """name -> dict(shared, wgmma, mma_sync, dots, zero_started, registers, spill_bytes, ttgir) per kernel."""
    out = {}
    for name, fn, constexprs, warps, stages, values in kernel_specs(size, precision, ops):
        options = dict(num_warps=warps, **({} if stages is None else {"num_stages": stages}))
        signature, constexprs, attrs = _signature(fn, constexprs, values)
        compiled = triton.compile(ASTSource(fn, signature, constexprs=constexprs, attrs=attrs),
                                  target=GPUTarget("cuda", arch, 32), options=options)
        ttgir, ptx = compiled.asm["ttgir"], compiled.asm["ptx"]
        dots, zero_started = dot_structure(ttgir)
        regs, spills = ptxas_usage(ptx, arch)
        out[name] = dict(shared=compiled.metadata.shared, wgmma=ptx.count("wgmma.mma_async"),
                         mma_sync=ptx.count("mma.sync"), dots=dots, zero_started=zero_started, registers=regs,
                         spill_bytes=spills, ttgir=ttgir)
    return out


def main(argv=None) -> None:
    ap = OneLineParser(prog=os.path.basename(__file__), description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=224, help="plane side (default 224)")
    ap.add_argument("--precision", default="tf32x3", choices=["tf32x3", "tf32", "ieee"])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90, Hopper)")
    ap.add_argument("--ops", nargs="+", default=["loss", "corrupt"], choices=["loss", "corrupt"])
    ap.add_argument("--dump", help="write each kernel's TTGIR into this folder")
    args = ap.parse_args(argv)
    if args.size < 16 or args.size % 2:
        ap.error(f"--size: must be even and >= 16 (tl.dot blocks), got {args.size}")
    if args.arch < 70:
        ap.error(f"--arch: compute capability x 10 must be >= 70 (Triton's oldest NVIDIA target), got {args.arch}")
    if args.dump is not None and os.path.exists(args.dump) and not os.path.isdir(args.dump):
        ap.error(f"--dump: {args.dump!r} is a file (expected a folder)")
    results = compile_all(args.size, args.precision, args.arch, args.ops)
    print(f"sm_{args.arch}, {args.size} x {args.size}, precision={args.precision}")
    print(f"{'kernel':16s} {'shared KiB':>10s} {'wgmma':>6s} {'mma.sync':>8s} {'dots':>5s} {'zero-started':>12s} "
          f"{'registers':>9s} {'spill B':>7s}")
    for name, r in results.items():
        print(f"{name:16s} {r['shared'] / 1024:10.1f} {r['wgmma']:6d} {r['mma_sync']:8d} {r['dots']:5d} "
              f"{r['zero_started']:12d} {r['registers'] or '-':>9} {r['spill_bytes'] if r['registers'] else '-':>7}")
        if args.dump:
            os.makedirs(args.dump, exist_ok=True)
            with open(os.path.join(args.dump, f"{name}.ttgir"), "w", encoding="utf-8") as f:
                f.write(r["ttgir"])


if __name__ == "__main__":
    main()
