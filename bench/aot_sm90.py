"""Compile the Triton kernels for a GPU without one: shared memory, MMA counts, 3xTF32 structure.

    python bench/aot_sm90.py [--size 224] [--precision tf32x3] [--arch 90] [--ops loss corrupt] [--dump DIR]

Runs triton.compile on the kernels of kernels/masked_freq_loss.py and kernels/corrupt.py with their
launchers' default block sizes for CUDA compute capability ``--arch`` (Hopper: 90), so a CPU-only
machine can see whether a change still fits shared memory and what Triton made of the GEMMs. For
each kernel it prints:

- the shared memory and the tensor-core instructions in the PTX;
- registers and spills from Triton's bundled ptxas -v on the PTX: close to, not exactly, the launch
  build, and only for the installed Triton (the corruption band kernel at R = 16 shows 232 spilled
  bytes here with Triton 3.8, 2 on the H200 with 3.6);
- in the TTGIR, how many dots start from a zero accumulator: for the loss with precision tf32x3 every
  group of three tf32 products must (a third of all dots), so that the MMA's round-toward-zero never
  sees the running sum (see tests/tensor_core_emulation.py).

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

DOT = re.compile(r"(?:tt\.dot|ttng\.warp_group_dot) (%[\w#]+), (%[\w#]+), (%[\w#]+)")
ZERO = re.compile(r"(%[\w]+) = arith\.constant dense<0\.000000e\+00>")


def corrupt_specs(size: int, precision: str, band: int = cor.BAND_MAX) -> dict:
    """name -> (jit function, constexprs, num_warps) as kernels/corrupt.launch launches them (default tiles;
    the band path at its widest band, the most shared memory)."""
    hp = wp = next_pow2(size)
    common = dict(WP=wp, HP=hp, BK=min(32, wp), IS_BYTE=False, PRECISION=precision, INTERPRETED=False)
    general_rows = min(cor.GENERAL_BLOCK_ROWS, hp)
    return {
        "corrupt_band": (cor._corrupt_spectrum_kernel, dict(KP=next_pow2(2 * band - 1), BKX=next_pow2(band),
                                                            BM=min(64, hp), BAND=True, FUSED=True, **common), 4),
        "corrupt_general": (cor._corrupt_spectrum_kernel, dict(KP=hp, BKX=cor.GENERAL_BLOCK_KX, BM=general_rows,
                                                               BAND=False, FUSED=False, **common), 4),
        "corrupt_rows": (cor._corrupt_inverse_rows_kernel, dict(WP=wp, HP=hp, BKX=cor.GENERAL_BLOCK_KX, BM=general_rows,
                                                                BK=min(32, wp), PRECISION=precision,
                                                                INTERPRETED=False), 4),
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
        specs += [(name, *spec, stages) for name, spec in loss.items()]
    if "corrupt" in ops:
        specs += [(name, *spec, None) for name, spec in corrupt_specs(size, precision).items()]
    return specs


def _signature(fn, constexprs: dict) -> dict:
    def kind(name):
        if name in constexprs:
            return "constexpr"
        if name.endswith("_ptr"):
            return "*fp32"
        return "fp32" if name in ("inv_sqrt", "gamma") else "i32"
    return {name: kind(name) for name in fn.arg_names}


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
    for name, fn, constexprs, warps, stages in kernel_specs(size, precision, ops):
        options = dict(num_warps=warps, **({} if stages is None else {"num_stages": stages}))
        compiled = triton.compile(ASTSource(fn, _signature(fn, constexprs), constexprs=constexprs),
                                  target=GPUTarget("cuda", arch, 32), options=options)
        ttgir, ptx = compiled.asm["ttgir"], compiled.asm["ptx"]
        dots, zero_started = dot_structure(ttgir)
        regs, spills = ptxas_usage(ptx, arch)
        out[name] = dict(shared=compiled.metadata.shared, wgmma=ptx.count("wgmma.mma_async"),
                         mma_sync=ptx.count("mma.sync"), dots=dots, zero_started=zero_started, registers=regs,
                         spill_bytes=spills, ttgir=ttgir)
    return out


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line "prog: error: --flag: what is wrong" (exit status 2), no usage dump."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


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
