"""Kernel model of mfm_fast's plane kernels on an H200, computed on a machine without a GPU.

    python tools/kernel_model.py [--json] [--batch 256] [--no-cache]

For each kernel path (CUDA corruption, CUDA loss with and without the gradient, the CUDA loss's band kernel
for the high-pass half under mask_band, Triton corruption band and general paths, Triton loss) at 224 x 224,
fp32, C = 3 and B = 256 it builds the sm_90 code (nvcc for csrc/, triton.compile for kernels/, specialised as
Triton's launcher specialises the captured launch), reads registers and spills from ptxas, walks one CTA
(program) of each kernel through its SASS with tools/sass_model.py (dynamic warp instructions: loop bodies x
the trip counts the code itself computes) and models the time on an H200 (132 SMs, 1.98 GHz, 4 schedulers per
SM, the copy of the 154 MB batch read + written as measured there: COPY_MS_B256) as the largest of four bounds:

- issue:  waves x CTAs per SM x warp instructions per CTA / (4 schedulers x clock x efficiency), the
          efficiency min(1, resident warps per scheduler / LATENCY_WARPS) (latency hiding; one constant,
          calibrated below);
- shared memory: waves x CTAs per SM x wavefronts per CTA / clock (one 128-byte wavefront per clock; the
          CUDA kernels' bank conflicts from tools/smem_banks.py);
- tensor cores: waves x CTAs per SM x MMA FLOPs per CTA (counted from the walked HGMMA / HMMA
          instructions) / (dense tf32 FLOPs per SM per clock: 2048 for wgmma, 1024 assumed for mma.sync);
- HBM:    bytes read + written / the measured copy bandwidth.

Calibration rows: the two kernels measured on the H200 (bench/results/fft_mask-NVIDIA-H200-*.log, B = 256,
fp32, 224; their times in MEASURED): the one-launch Triton corruption band path and the first Triton loss
fwd+bwd, both compiled from kernels/ as it was when measured (git show of MEASURED_BAND_COMMIT and
MEASURED_LOSS_COMMIT). It is a model: ncu's executed-instruction counts (smsp__inst_executed) and times on a
GPU are the check. What it models and its current figures: docs/kernel_model.md.
"""

from __future__ import annotations

import glob
import hashlib
import importlib
import json
import math
import os
import pickle
import re
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import sass_model  # noqa: E402
from mfm_fast.backends._jit_build import cache_dir_problem  # noqa: E402

# H200 (SXM, 141 GB): the figures the model uses
SMS, CLOCK_HZ, SCHEDULERS = 132, 1.98e9, 4
REGS_PER_SM, SMEM_PER_SM, SMEM_PER_CTA_RESERVED = 65536, 233472, 1024
MAX_WARPS_PER_SM, MAX_CTAS_PER_SM = 64, 32
WAVEFRONT_BYTES = 128
TF32_FLOP_PER_CLK = {"wgmma": 2048, "mma.sync": 1024}  # per SM, dense tf32 (mma.sync: half the wgmma rate)
COPY_MS_B256 = 0.077  # measured on the H200: read + write of the B = 256 fp32 batch
LATENCY_WARPS = 9.0   # resident warps per scheduler that hide latency fully (fitted to the two calibration rows:
#                       docs/kernel_model.md)
CHANNELS, SIDE = 3, 224
BAND, P_LOW = 16, 0.5  # the MFM batch: r1 = 16 disc masks (mask_band 16: csrc's 16-wide band), half low-pass
MEASURED = {"triton corrupt band (measured version)": 0.345, "triton loss (measured version)": 3.43}
MEASURED_LOSS_COMMIT = "53230c4"  # the H200 results commit: kernels/ as the measured Triton loss had it
MEASURED_BAND_COMMIT = "44206ff"  # kernels/corrupt.py's last commit before the two-phase band path: the band
#                                   kernel's jit code as measured (unchanged from 53230c4 to there)
CACHE = os.environ.get("MFM_FAST_MODEL_CACHE", os.path.join(tempfile.gettempdir(), "mfm_fast_kernel_model"))


class ModelError(RuntimeError):
    """A kernel the model cannot analyse; the message says which and why."""


def loss_glue_ms(batch: int) -> float:
    """Torch work of the Triton loss fwd+bwd outside its kernels, HBM-bound: the backward's grad * grad_output
    (one read + write of the batch, one copy) and the masked denominator's mask.sum (a read of the B masks)."""
    return copy_ms(batch) + hbm_ms(batch * SIDE * SIDE * 4, batch)


def cuda_loss_glue(batch: int, band: int = 0) -> dict:
    """The CUDA loss's launches around its plane kernel: removed_kernel<224, band> (the masked denominator: one
    CTA per image reads its mask, or under the mask_band promise (band = RB > 0) only the mask's (2 RB - 1)^2
    box, walked like the plane kernels) and the backward's scale_grad_kernel in the
    loss.backward() case (grad_output == 1: every CTA reads the scale and exits, no HBM traffic; a launch,
    whose overhead is not modelled, counted as 0). {"ms", "removed_ms", "scale_ms", "removed_insns_per_cta"}."""
    cubin, table = build_cuda("masked_freq_loss.cu")
    kernel = find_kernel(table, rf"removed_kernelILi224ELi{band}E")
    threads = _constexpr_int("masked_freq_loss.cu", "kRedThreads")
    info = table[kernel]
    occ = occupancy(threads, info["registers"], 8 * threads)  # its static reduction buffer: a double per thread
    params = pack_params([(8, 8, {0: ("Q", _ptr(3))}), (8, 8, {0: ("Q", _ptr(5))})], kparam_info(cubin, kernel))
    walk = walk_kernel(cubin, kernel, threads, params)
    box = 2 * band - 1  # the box's rows: 32-byte sectors of (2 RB - 1) floats each (one more for alignment)
    nbytes = batch * (box * (math.ceil(box * 4 / 32) + 1) * 32 + 32) if band else batch * SIDE * SIDE * 4
    b = bounds(batch, threads, occ, walk["insns"], walk["smem_wavefronts"], nbytes, batch)
    removed = max(b["issue_ms"], b["smem_ms"], b["hbm_ms"])
    return dict(ms=removed, removed_ms=round(removed, 4), scale_ms=0.0, removed_insns_per_cta=walk["insns"],
                removed_bound=max(("issue", "smem", "hbm"), key=lambda k: b[f"{k}_ms"]))


def _constexpr_int(source: str, name: str) -> int:
    """The value of `constexpr int name = <int>;` in csrc/<source>."""
    with open(os.path.join(ROOT, "csrc", source)) as f:
        m = re.search(rf"constexpr int {name} = (\d+);", f.read())
    if m is None:
        raise ModelError(f"csrc/{source} has no `constexpr int {name} = <int>;`")
    return int(m.group(1))


def batch_bytes(batch: int) -> int:
    return batch * CHANNELS * SIDE * SIDE * 4


def copy_ms(batch: int) -> float:
    return COPY_MS_B256 * batch / 256


def hbm_ms(nbytes: float, batch: int) -> float:
    return nbytes / (2 * batch_bytes(256)) * COPY_MS_B256


def _cached(key: str, build, force: bool = False):
    """build()'s value, kept under CACHE by key; rebuilt when NO_CACHE or `force`."""
    os.makedirs(CACHE, exist_ok=True)
    path = os.path.join(CACHE, hashlib.sha256(key.encode()).hexdigest()[:24] + ".pkl")
    if os.path.exists(path) and not (NO_CACHE or force):
        with open(path, "rb") as f:
            return pickle.load(f)
    value = build()
    with open(path, "wb") as f:
        pickle.dump(value, f)
    return value


NO_CACHE = False


# ------------------------------------------------------------------ occupancy and time
def occupancy(threads: int, regs: int, smem: int) -> int:
    """CTAs per SM from warps, registers (allocated per warp in 256-register units) and shared memory."""
    warps = math.ceil(threads / 32)
    regs_per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    by_regs = REGS_PER_SM // (regs_per_warp * warps)
    by_smem = SMEM_PER_SM // (smem + SMEM_PER_CTA_RESERVED) if smem else MAX_CTAS_PER_SM
    return max(0, min(MAX_CTAS_PER_SM, MAX_WARPS_PER_SM // warps, by_regs, by_smem))


def bounds(grid: int, threads: int, occ: int, insns: float, wavefronts: float, nbytes: float, batch: int,
           mma: dict | None = None) -> dict:
    """The bounds (ms) of one launch of `grid` CTAs, each with `insns` warp instructions, `wavefronts`
    shared-memory wavefronts and `mma` tensor-core FLOPs ({"wgmma" | "mma.sync": FLOPs}); nbytes of HBM
    traffic."""
    if occ < 1:
        raise ModelError(f"a CTA of {threads} threads does not fit an SM")
    waves = math.ceil(grid / (SMS * occ))
    per_sm = min(occ, math.ceil(grid / SMS))  # CTAs an SM holds at once
    warps_per_sched = per_sm * math.ceil(threads / 32) / SCHEDULERS
    eff = min(1.0, warps_per_sched / LATENCY_WARPS)
    issue = waves * per_sm * insns / (SCHEDULERS * CLOCK_HZ * eff) * 1e3
    smem = waves * per_sm * wavefronts / CLOCK_HZ * 1e3
    tensor = waves * per_sm * sum(f / TF32_FLOP_PER_CLK[k] for k, f in (mma or {}).items()) / CLOCK_HZ * 1e3
    return dict(issue_ms=issue, smem_ms=smem, tensor_ms=tensor, hbm_ms=hbm_ms(nbytes, batch), waves=waves,
                issue_efficiency=round(eff, 3))


# ------------------------------------------------------------------ CUDA (csrc/)
def _torch_includes() -> list:
    from torch.utils.cpp_extension import include_paths
    return [f"-I{p}" for p in include_paths()]


def _csrc_hash() -> str:
    h = hashlib.sha256()
    for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "*"))):
        with open(p, "rb") as f:
            h.update(os.path.basename(p).encode() + f.read())
    return h.hexdigest()


def _nvcc() -> str:
    for cand in (os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"):
        p = os.path.join(cand, "bin", "nvcc")
        if cand and os.path.exists(p):
            return p
    import shutil
    p = shutil.which("nvcc")
    if p is None:
        raise ModelError("nvcc not found: the CUDA rows need the toolkit's nvcc (set CUDA_HOME)")
    return p


def build_cuda(source: str) -> tuple:
    """(cubin path, ptxas table) of csrc/<source> for sm_90, as setup.py builds it (-O3 -lineinfo)."""
    key = f"cuda {source} {_csrc_hash()}"
    cubin = os.path.join(CACHE, hashlib.sha256(key.encode()).hexdigest()[:24] + ".cubin")

    def build():
        cmd = [_nvcc(), "-std=c++17", "-O3", "-lineinfo", *_torch_includes(), "-arch=sm_90", "-cubin",
               "-Xptxas", "-v", os.path.join(ROOT, "csrc", source), "-o", cubin]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise ModelError(f"nvcc failed on csrc/{source}: {proc.stderr.strip()[-800:]}")
        return sass_model.parse_ptxas(proc.stderr)
    table = _cached(key, build, force=not os.path.exists(cubin))  # the table is kept, the cubin may be gone
    return cubin, table


LAYOUT_PROBE = r"""
#include <cstddef>
#include <cstdio>
#include "planes.cuh"
#include "loss_band.cuh"
#define F(T, f) std::printf(#T " " #f " %zu %zu %zu\n", offsetof(mfm::T, f), sizeof(((mfm::T*)0)->f), \
                           alignof(decltype(((mfm::T*)0)->f)));
int main() {
  std::printf("CorruptArgs size %zu %zu 0\n", sizeof(mfm::CorruptArgs), alignof(mfm::CorruptArgs));
  std::printf("LossArgs size %zu %zu 0\n", sizeof(mfm::LossArgs), alignof(mfm::LossArgs));
  std::printf("PlaneSmem224 bytes0 %zu 0 0\n", mfm::PlaneSmem<224>::bytes(0));
  std::printf("BandSmem224 bytes0 %zu 0 0\n", mfm::BandSmem<224, BAND>::bytes(0));
  F(CorruptArgs, x) F(CorruptArgs, x_dt) F(CorruptArgs, mask) F(CorruptArgs, out) F(CorruptArgs, out_dt)
  F(CorruptArgs, channels) F(CorruptArgs, vec) F(CorruptArgs, stats)
  F(LossArgs, pred) F(LossArgs, pred_dt) F(LossArgs, target) F(LossArgs, target_dt) F(LossArgs, mask)
  F(LossArgs, grad) F(LossArgs, grad_dt) F(LossArgs, channels) F(LossArgs, gamma) F(LossArgs, band) F(LossArgs, normalize_target)
  F(LossArgs, vec) F(LossArgs, stats)
  return 0;
}
"""


def arg_layouts() -> dict:
    """{struct: {"size": n, "align": a, field: (offset, size)}} of the kernels' argument structs, from a host
    build of csrc/planes.cuh (so a change of the structs moves the parameters with it)."""
    def build():
        d = tempfile.mkdtemp()
        src, exe = os.path.join(d, "probe.cpp"), os.path.join(d, "probe")
        with open(src, "w") as f:
            f.write(LAYOUT_PROBE)
        proc = subprocess.run(["g++", "-std=c++17", "-O0", f"-DBAND={BAND}", f"-I{os.path.join(ROOT, 'csrc')}",
                               *_torch_includes(),
                               src, "-o", exe], capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise ModelError("cannot read the CUDA kernels' argument structs (CorruptArgs / LossArgs fields "
                             f"changed?): {proc.stderr.strip()[-600:]}")
        out = {}
        for line in subprocess.run([exe], capture_output=True, text=True, check=True).stdout.splitlines():
            struct, field, a, b, c = line.split()
            out.setdefault(struct, {})[field] = (int(a), int(b), int(c))
            if field == "size":
                out[struct]["size"], out[struct]["align"] = int(a), int(b)
        for struct in ("CorruptArgs", "LossArgs"):
            _check_fields_cover(struct, out[struct])
        return out
    return _cached(f"layout {_csrc_hash()} {BAND} {hashlib.sha256(LAYOUT_PROBE.encode()).hexdigest()}", build)


def _check_fields_cover(struct: str, fields: dict) -> None:
    """The fields the model sets must tile the struct (only padding between them): a field added to
    CorruptArgs / LossArgs that the model does not know of is an error, not a walk with it left zero.
    (A bool or char added inside existing padding is not seen.)"""
    end = 0
    for name, (off, size, align) in sorted(((k, v) for k, v in fields.items() if k not in ("size", "align")),
                                           key=lambda kv: kv[1][0]):
        if off != (end + align - 1) // align * align:
            raise ModelError(f"csrc/planes.cuh: {struct} has bytes [{end}, {off}) before {name!r} that the model "
                             f"does not know (a new field?): teach cuda_params and LAYOUT_PROBE")
        end = off + size
    if (end + fields["align"] - 1) // fields["align"] * fields["align"] != fields["size"]:
        raise ModelError(f"csrc/planes.cuh: {struct} is {fields['size']} bytes, its known fields end at {end} "
                         f"(a new field?): teach cuda_params and LAYOUT_PROBE")


PARAM_BASE = 0x210  # sm_90: kernel parameters start at c[0x0][0x210]


def kparam_info(cubin: str, kernel: str) -> list:
    """[(offset, size)] of the kernel's parameters in ordinal order, from the cubin's EIATTR_KPARAM_INFO."""
    tool = os.path.join(os.path.dirname(sass_model.nvdisasm_path()), "cuobjdump")
    out = subprocess.run([tool, "-elf", cubin], capture_output=True, text=True, timeout=300).stdout
    section = re.split(r"\n(?=\.nv\.info\.)", out)
    body = next((sec for sec in section if sec.startswith(f".nv.info.{kernel}\n") or
                 sec.startswith(f".nv.info.{kernel} ")), None)
    if body is None:
        raise ModelError(f"no .nv.info section for {kernel} in {os.path.basename(cubin)}")
    found = re.findall(r"Ordinal : 0x([0-9a-f]+)\s+Offset\s*: 0x([0-9a-f]+)\s+Size\s*: 0x([0-9a-f]+)", body)
    return [(int(o, 16), int(z, 16)) for _, o, z in sorted(found, key=lambda t: int(t[0], 16))]


def pack_params(items: list, layout: list | None = None) -> dict:
    """items: (size, align, {byte offset inside: (fmt, value)}) in parameter order -> {(0, word offset): u32}.
    layout: the kernel's own [(offset, size)] (kparam_info); the items must match it in number and size."""
    import struct as st
    if layout is not None and [size for size, _, _ in items] != [size for _, size in layout]:
        raise ModelError(f"the kernel's parameters are {[z for _, z in layout]} bytes, the model packs "
                         f"{[z for z, _, _ in items]}: its signature changed (update cuda_params)")
    buf = bytearray(4096)
    off = 0
    for i, (size, align, fields) in enumerate(items):
        off = (off + align - 1) // align * align if layout is None else layout[i][0]
        for inner, (fmt, value) in fields.items():
            st.pack_into("<" + fmt, buf, off + inner, value)
        off += size
    return {(0, PARAM_BASE + i): int.from_bytes(buf[i:i + 4], "little") for i in range(0, off + 4, 4)}


def _ptr(i):
    return 0x7F0000000000 + i * 0x1000000000


def cuda_params(kind: str, planes: int, lookahead: int, layout: list | None = None, grad: bool = True,
                band: int = 0) -> dict:
    """Parameter words of corrupt_kernel / loss_kernel / loss_band_kernel ("band") for an fp32 batch of `planes`
    planes (16-byte aligned buffers, so vec = true as ops.cpp sets it; masked loss, gamma 1, normalised target;
    grad: a gradient buffer, else nullptr as for the forward-only kernel; band: LossArgs.band, the mask_band
    promise's compiled width or 0); layout: the cubin's parameter offsets and sizes."""
    lay = arg_layouts()
    if kind == "corrupt":
        L = lay["CorruptArgs"]
        f = {L["x"][0]: ("Q", _ptr(1)), L["x_dt"][0]: ("i", 0), L["mask"][0]: ("Q", _ptr(2)),
             L["out"][0]: ("Q", _ptr(3)), L["out_dt"][0]: ("i", 0), L["channels"][0]: ("i", CHANNELS),
             L["vec"][0]: ("B", 1)}
        return pack_params([(L["size"], L["align"], f), (4, 4, {0: ("i", planes)}), (4, 4, {0: ("i", lookahead)})],
                           layout)
    L = lay["LossArgs"]
    f = {L["pred"][0]: ("Q", _ptr(1)), L["pred_dt"][0]: ("i", 0), L["target"][0]: ("Q", _ptr(2)),
         L["target_dt"][0]: ("i", 0), L["mask"][0]: ("Q", _ptr(3)), L["grad"][0]: ("Q", _ptr(4) if grad else 0),
         L["grad_dt"][0]: ("i", 0), L["channels"][0]: ("i", CHANNELS), L["gamma"][0]: ("f", 1.0),
         L["normalize_target"][0]: ("B", 1), L["vec"][0]: ("B", 1), L["band"][0]: ("i", band)}
    images = planes // CHANNELS
    if kind == "band":  # loss_band_kernel(args, images, reduction, loss_weight, removed, partials)
        return pack_params([(L["size"], L["align"], f), (4, 4, {0: ("i", images)}), (4, 4, {0: ("i", 0)}),
                            (4, 4, {0: ("f", 1.0)}), (8, 8, {0: ("Q", _ptr(5))}), (8, 8, {0: ("Q", _ptr(6))})],
                           layout)
    return pack_params([(L["size"], L["align"], f), (4, 4, {0: ("i", images)}), (4, 4, {0: ("i", 0)}),
                        (4, 4, {0: ("f", 1.0)}), (8, 8, {0: ("Q", _ptr(5))}), (8, 8, {0: ("Q", _ptr(6))}),
                        (4, 4, {0: ("i", lookahead)})], layout)


def smem_conflict_factor() -> float:
    """Mean wavefronts per conflict-free wavefront of the CUDA plane pipeline (tools/smem_banks.py)."""
    import smem_banks
    rows = smem_banks.phases(SIDE, 512, old=False)
    cost = sum(w * p + (tw or 0.0) * tp for _, w, p, tw, tp in rows)
    ideal = sum(p + tp for _, _, p, _, tp in rows)
    return cost / ideal


def walk_kernel(cubin: str, kernel: str, threads: int, params: dict, ctaid: int = 0, key: str = "") -> dict:
    """Walk one CTA: dict(insns, smem_wavefronts, unknown_branches, by_class)."""
    def build():
        prog = sass_model.Program(cubin)
        if kernel not in prog.funcs:
            raise ModelError(f"kernel {kernel} not in {os.path.basename(cubin)} (kernels: {prog.kernels()})")
        try:
            s = sass_model.walk_cta(prog, kernel, threads, ctaid, params)
        except sass_model.WalkError as exc:
            raise ModelError(f"cannot analyse {kernel}: {exc}") from exc
        return dict(insns=s.steps, smem_wavefronts=s.smem_wavefronts, unknown_branches=s.unknown_branches,
                    mma_flops=dict(s.mma_flops),
                    by_class=dict(s.by_class), barriers=s.bar)
    with open(cubin, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    with open(sass_model.__file__, "rb") as f:  # a change of the walker rewalks
        digest += hashlib.sha256(f.read()).hexdigest()
    return _cached(f"walk {digest} {kernel} {threads} {ctaid} {sorted(params.items())} {key}", build)


def find_kernel(table: dict, pattern: str) -> str:
    """The one kernel of the sm_90 build matching pattern; of dtype instantiations, the fp32 one (no Half,
    BFloat16 or uint8 template argument)."""
    names = [n for n in table if re.search(pattern, n)]
    if len(names) > 1:
        names = [n for n in names if not re.search(r"Half|BFloat16|Ih|hE", n[re.search(pattern, n).end():])]
    if len(names) != 1:
        raise ModelError(f"expected one fp32 kernel matching {pattern!r} in the sm_90 build, found {names}: "
                         f"teach cuda_rows the new kernels")
    return names[0]


CUDA_KERNELS = (  # row name, source, kernel (fp32 224 instantiation), params kind, gradient, floor, LossArgs.band,
    #                share of the planes that work (the others exit at once)
    ("cuda corrupt", "corrupt.cu", r"corrupt_kernelILi224E", "corrupt", True, "copy", 0, 1.0),
    ("cuda loss fwd+bwd (full planes)", "masked_freq_loss.cu", r"loss_kernelILi224ELb1E", "loss", True, "loss", 0,
     1.0),
    ("cuda loss forward only (full planes)", "masked_freq_loss.cu", r"loss_kernelILi224ELb0E", "loss", False,
     "copy", 0, 1.0),
    ("cuda loss fwd+bwd (full planes, low-pass half)", "masked_freq_loss.cu", r"loss_kernelILi224ELb1E", "loss",
     True, "loss", BAND, P_LOW),
    ("cuda loss (band planes)", "loss_band.cu", rf"loss_band_kernelILi224ELi{BAND}ELb1E", "band", True, "loss",
     BAND, 1 - P_LOW))
EXIT_LATENCY_S = 0.8e-6  # one dependent global read (the mask corner) per wave of early-exiting CTAs


def exit_path_insns(cubin: str, kernel: str) -> int:
    """Warp instructions of a CTA that exits at once: the kernel's code from its entry, in address order, up to
    the first EXIT after its first global load (the mask-corner read of the band test)."""
    def build():
        prog = sass_model.Program(cubin)
        i, n, loaded = prog.entry[kernel], 0, False
        while i < len(prog.insns) and prog.owner[i] == kernel:
            ins = prog.insns[i]
            n += 1
            loaded |= ins.op.startswith("LDG")
            if ins.op == "EXIT" and loaded:
                return n
            i += 1
        raise ModelError(f"{kernel}: no EXIT after a global load at its start (the early exit of the band test)")
    with open(cubin, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    return _cached(f"exit path {digest} {kernel}", build)


def cuda_rows(batch: int) -> list:
    planes = batch * CHANNELS
    rows = []
    factor = smem_conflict_factor()
    masks = batch * SIDE * SIDE * 4
    for name, source, pattern, kind, grad, floor, band, share in CUDA_KERNELS:
        # HBM: corruption reads x and the masks, writes out; the loss reads pred, target and the masks and
        # (with the gradient) writes it; the band kernel reads only its (2 BAND - 1) x BAND mask entries (both
        # k and -k), every exiting CTA one 32-byte sector (the mask corner)
        working = round(planes * share)
        if kind == "band":
            nbytes = 3 * batch_bytes(batch) * share + batch * share * 2 * (2 * BAND - 1) * BAND * 4
        else:
            nbytes = (2 * batch_bytes(batch) + masks if kind == "corrupt" or not grad
                      else 3 * batch_bytes(batch) + masks) * share
        nbytes += 32 * (planes - working)
        cubin, table = build_cuda(source)
        kernel = find_kernel(table, pattern)
        launched = "loss_band_kernel" if kind == "band" else None
        threads = _launch_threads(source, launched)
        info = table[kernel]
        smem = _cuda_smem(source, threads, launched)
        occ = occupancy(threads, info["registers"], smem)
        params = cuda_params(kind, planes, SMS * max(occ, 1), kparam_info(cubin, kernel), grad=grad, band=band)
        walk = walk_kernel(cubin, kernel, threads, params)
        wavefronts = walk["smem_wavefronts"] * factor
        b = bounds(working, threads, occ, walk["insns"], wavefronts, nbytes, batch, walk["mma_flops"])
        note = (f"smem bank-conflict factor {factor:.2f} (tools/smem_banks.py); ptxas stack frame "
                f"{info['stack']} B" + ("" if grad else "; floor: its reads, one copy"))
        exit_ms, exit_insns = 0.0, 0
        if working < planes:  # the other planes' CTAs exit at once: their instructions and one read per wave
            exit_insns = exit_path_insns(cubin, kernel)
            warps = math.ceil(threads / 32)
            exit_ms = ((planes - working) * warps * exit_insns / (SCHEDULERS * SMS * CLOCK_HZ * b["issue_efficiency"])
                       + math.ceil((planes - working) / (SMS * occ)) * EXIT_LATENCY_S) * 1e3
            note += (f"; {working} of {planes} CTAs work, {planes - working} exit after {exit_insns} warp "
                     f"instructions per warp (+{exit_ms:.4f} ms)")
        rows.append(_row(name, kernel, threads, info["registers"], info["spill_stores"], smem, occ, working,
                         walk, wavefronts, nbytes, b, batch, floor=floor, note=note))
        rows[-1]["modelled_ms"] = round(rows[-1]["modelled_ms"] + exit_ms, 4)
        rows[-1].update(stack_bytes=info["stack"], warp_insns_per_plane=walk["insns"],  # one CTA per plane
                        exit_ms=round(exit_ms, 4), exit_warp_insns_per_warp=exit_insns, launched_ctas=planes)
    around, plain = cuda_loss_glue(batch, BAND), cuda_loss_glue(batch)
    glue = around["ms"]
    full = next(r for r in rows if r["name"] == "cuda loss fwd+bwd (full planes)")
    low = next(r for r in rows if r["name"] == "cuda loss fwd+bwd (full planes, low-pass half)")
    band = next(r for r in rows if r["name"] == "cuda loss (band planes)")
    total = low["modelled_ms"] + band["modelled_ms"] + glue
    rows.insert(rows.index(full) + 1, dict(
        name="cuda loss fwd+bwd", modelled_ms=round(total, 4), hbm_bytes=low["hbm_bytes"] + band["hbm_bytes"],
        hbm_ms=round(low["hbm_ms"] + band["hbm_ms"], 4), glue_ms=round(glue, 4), floor="loss",
        floor_ms=full["floor_ms"], x_floor=round(total / full["floor_ms"], 2),
        launches=["removed_kernel", low["name"], band["name"], "scale_grad_kernel (grad_output == 1)"],
        removed_kernel_ms=around["removed_ms"], scale_grad_ms=around["scale_ms"],
        without_mask_band_ms=round(full["modelled_ms"] + plain["ms"], 4),
        note=f"mask_band = {BAND}, p_low = {P_LOW}: the full-plane kernel on the low-pass half + the band kernel on "
             f"the high-pass half + removed_kernel (the scale kernel exits at once for grad_output == 1); without mask_band (every plane full): "
             f"{full['modelled_ms'] + plain['ms']:.3f} ms"))
    return rows


def _launch(source: str, kernel: str | None = None) -> tuple:
    """(source text, threads expression, shared-memory expression) of the plane kernel's <<<planes, T, M,
    stream>>> launch in csrc/<source> (kernel: corrupt_kernel / loss_kernel by the source, or the one named).
    The text returned is the source's followed by csrc's headers (where the `*_threads<S>()` may live)."""
    kernel = kernel or ("corrupt_kernel" if source == "corrupt.cu" else "loss_kernel")
    with open(os.path.join(ROOT, "csrc", source)) as f:
        text = f.read()
    for header in sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cuh"))):
        with open(header) as f:
            text += "\n" + f.read()
    m = re.search(kernel + r"<S[^>]*><<<\s*planes,\s*([^,]+),\s*([^,]+),", text)
    if m is None:
        raise ModelError(f"csrc/{source}: cannot find the {kernel}<S...><<<planes, threads, smem, ...>>> launch")
    return text, m.group(1).strip(), m.group(2).strip()


def _constexpr(text: str, name: str) -> str:
    """The initialiser of `constexpr <type> name = ...;` in text, or name itself when it is no such variable."""
    m = re.search(r"constexpr\s+[\w:]+\s+" + re.escape(name) + r"\s*=\s*([^;]+);", text)
    return m.group(1).strip() if m else name


def _launch_threads(source: str, kernel: str | None = None) -> int:
    """Threads per CTA of the 224 kernel's launch: its <<<>>> threads expression, a `*_threads<S>()` whose
    body is `return S >= 224 ? a : b;`."""
    text, threads, _ = _launch(source, kernel)
    expr = _constexpr(text, threads)
    m = re.fullmatch(r"(\w+_threads)<S>\(\)", expr)
    body = m and re.search(re.escape(m.group(1)) + r"\(\)\s*\{\s*return S >= 224 \? (\d+) : (\d+);", text)
    if not body:
        raise ModelError(f"csrc/{source}: cannot read the CTA size of the 224 kernel (launch threads {expr!r}, "
                         "expected an `X_threads<S>()` returning `S >= 224 ? a : b`)")
    return int(body.group(1))


def _cuda_smem(source: str, threads: int, kernel: str | None = None) -> int:
    """Dynamic shared memory of the 224 plane kernel's launch: PlaneSmem<224>::bytes(extra) (or the band
    kernel's BandSmem<224, BAND>::bytes(extra)) from the host probe, extra = sizeof(double) * threads where the
    launcher asks for it (the loss's reduction buffer)."""
    text, _, smem = _launch(source, kernel)
    expr = _constexpr(text, smem)
    m = re.fullmatch(r"(PlaneSmem<S>|BandSmem<S, RB>)::bytes\((.*)\)", expr)
    if m is None:
        raise ModelError(f"csrc/{source}: the launch's shared memory is {expr!r}, not PlaneSmem<S>::bytes(...) "
                         "or BandSmem<S, RB>::bytes(...) (teach _cuda_smem)")
    probe = "PlaneSmem224" if m.group(1).startswith("Plane") else "BandSmem224"
    base = arg_layouts().get(probe, {}).get("bytes0")
    if base is None:
        raise ModelError(f"cannot read {probe} bytes(0) from csrc/ (the plane layout changed?)")
    extra = m.group(2).strip()
    if extra in ("0", ""):
        return base[0]
    if re.fullmatch(r"sizeof\(double\) \* threads", extra) and _constexpr(text, "threads") != "threads":
        return base[0] + 8 * threads
    raise ModelError(f"csrc/{source}: unknown extra shared memory {extra!r} (teach _cuda_smem)")


def _row(name, kernel, threads, regs, spills, smem, occ, grid, walk, wavefronts, nbytes, b, batch, floor, note=""):
    modelled = max(b["issue_ms"], b["smem_ms"], b["tensor_ms"], b["hbm_ms"])
    floor_ms = copy_ms(batch) if floor == "copy" else 1.5 * copy_ms(batch)
    bound = max(("issue", b["issue_ms"]), ("shared memory", b["smem_ms"]), ("tensor cores", b["tensor_ms"]),
                ("HBM", b["hbm_ms"]), key=lambda t: t[1])
    return dict(name=name, kernel=kernel, threads=threads, registers=regs, spill_bytes=spills, shared_bytes=smem,
                ctas_per_sm=occ, grid=grid, waves=b["waves"], warp_insns_per_cta=walk["insns"],
                smem_wavefronts_per_cta=round(wavefronts), hbm_bytes=int(nbytes), issue_ms=round(b["issue_ms"], 4),
                smem_ms=round(b["smem_ms"], 4), tensor_ms=round(b["tensor_ms"], 4), hbm_ms=round(b["hbm_ms"], 4),
                mma_flops_per_cta={k: int(v) for k, v in walk["mma_flops"].items()},
                issue_efficiency=b["issue_efficiency"],
                modelled_ms=round(modelled, 4), bound=bound[0], floor=floor, floor_ms=round(floor_ms, 4),
                x_floor=round(modelled / floor_ms, 2), unknown_branches=walk["unknown_branches"], note=note)


# ------------------------------------------------------------------ Triton (kernels/)
class _Capture:
    """Records every JITFunction launch (function, grid, args, kwargs) instead of running it."""

    def __init__(self):
        self.launches = []

    def __enter__(self):
        from triton.runtime.jit import JITFunction
        self._orig = JITFunction.run
        cap = self

        def run(fn, *args, grid, warmup, **kwargs):
            cap.launches.append((fn, grid, args, kwargs))
        JITFunction.run = run
        return self

    def __exit__(self, *exc):
        from triton.runtime.jit import JITFunction
        JITFunction.run = self._orig


LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


def triton_compile(fn, args, kwargs) -> tuple:
    """(compiled kernel, param words) of one captured launch for sm_90, specialised as Triton's own launcher
    specialises it (its binder on the captured arguments: integers equal to 1 become constants, pointers and
    integers divisible by 16 get tt.divisibility 16), so the build is the one a GPU run compiles."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    items = []
    for name, value in bound.items():
        kind = signature[name]
        if kind == "constexpr":
            continue
        if kind.startswith("*"):
            items.append((8, 8, {0: ("Q", _ptr(len(items) + 1))}))
        elif kind == "fp32":
            items.append((4, 4, {0: ("f", float(value))}))
        elif kind in ("i32", "u32"):
            items.append((4, 4, {0: ("i" if kind == "i32" else "I", int(value))}))
        elif kind in ("i64", "u64"):
            items.append((8, 8, {0: ("q" if kind == "i64" else "Q", int(value))}))
        else:
            raise ModelError(f"{fn.__name__}: argument {name} of type {kind}: teach triton_compile to pack it")
    compiled = triton.compile(ASTSource(fn, signature, constexprs=constexprs, attrs=attrs), target=target,
                              options={k: kwargs[k] for k in LAUNCH_OPTIONS if k in kwargs})
    return compiled, pack_params(items)


def capture_launches(run) -> list:
    with _Capture() as cap:
        run()
    return cap.launches


def triton_kernel_rows(label: str, launches: list, batch_small: int, batch: int, nbytes: float,
                       floor: str, source_key: str, plane_share=None, launch_bytes=None) -> list:
    """One row per launch (grid scaled from batch_small to batch) and a summed row for the op. launch_bytes:
    fn_name, {argument name: value} at batch_small -> that launch's HBM bytes at batch (then the op's HBM
    is their sum, and each launch is at least its own traffic); else the op's nbytes only."""
    rows = []
    total = dict(issue_ms=0.0, smem_ms=0.0, tensor_ms=0.0, hbm_ms=0.0)
    for i, (fn, grid, args, kwargs) in enumerate(launches):
        key = f"triton launcher-specialised {source_key} {fn.__name__} {i}"

        def build(fn=fn, args=args, kwargs=kwargs):
            compiled, params = triton_compile(fn, args, kwargs)
            path = os.path.join(CACHE, hashlib.sha256((key + _hash_args(args, kwargs)).encode()).hexdigest()[:24]
                                + ".cubin")
            with open(path, "wb") as f:
                f.write(compiled.asm["cubin"])
            import aot_sm90  # registers and spills from Triton's ptxas -v on the PTX, as aot_sm90 reports them
            regs, spills = aot_sm90.ptxas_usage(compiled.asm["ptx"], 90)
            if regs is None:
                raise ModelError(f"Triton's ptxas gave no register count for {fn.__name__}")
            return dict(cubin=path, name=compiled.metadata.name, params=params, regs=regs,
                        spills=spills, shared=compiled.metadata.shared,
                        warps=compiled.metadata.num_warps)
        c = _cached(key + " " + _hash_args(args, kwargs), build)
        if not os.path.exists(c["cubin"]):
            raise ModelError(f"cached cubin {c['cubin']} is gone: rerun with --no-cache")
        g = tuple(grid(kwargs) if callable(grid) else grid) + (1, 1)
        programs_small = g[0] * g[1] * g[2]
        programs = programs_small * batch // batch_small
        threads = 32 * c["warps"]
        occ = occupancy(threads, c["regs"], c["shared"])
        walk = walk_kernel(c["cubin"], c["name"], threads, c["params"])
        share = 1.0 if plane_share is None else plane_share(fn.__name__)
        lbytes = 0 if launch_bytes is None else launch_bytes(fn.__name__, dict(zip(fn.arg_names, args)))
        b = bounds(programs, threads, occ, walk["insns"] * share, walk["smem_wavefronts"] * share, lbytes, batch,
                   {k: f * share for k, f in walk["mma_flops"].items()})
        rows.append(_row(f"{label}: {fn.__name__}", c["name"], threads, c["regs"], c["spills"], c["shared"], occ,
                         programs, walk, walk["smem_wavefronts"], lbytes, b, batch, floor,
                         note="" if share == 1.0 else f"programs doing work: {share:.2f} of the grid"))
        rows[-1]["warp_insns_per_plane"] = int(walk["insns"] * share * programs / (batch * CHANNELS))
        for k in total:
            total[k] += b[k]
    if launch_bytes is not None:
        nbytes = sum(r["hbm_bytes"] for r in rows)
    total["hbm_ms"] = hbm_ms(nbytes, batch)
    # launches run one after another: the op is the sum of each launch's largest bound, at least its HBM
    # traffic, plus the torch work around the loss kernels (loss_glue_ms)
    glue = loss_glue_ms(batch) if floor == "loss" else 0.0
    modelled = max(sum(r["modelled_ms"] for r in rows), total["hbm_ms"]) + glue
    floor_ms = copy_ms(batch) if floor == "copy" else 1.5 * copy_ms(batch)
    op = dict(name=label, modelled_ms=round(modelled, 4), hbm_bytes=int(nbytes), hbm_ms=round(total["hbm_ms"], 4),
              glue_ms=round(glue, 4), floor=floor, floor_ms=round(floor_ms, 4), x_floor=round(modelled / floor_ms, 2),
              launches=[r["name"] for r in rows])
    return rows + [op]


def _hash_args(args, kwargs) -> str:
    import torch
    desc = [(tuple(a.shape), str(a.dtype)) if isinstance(a, torch.Tensor) else a for a in args]
    return hashlib.sha256(repr((desc, sorted(kwargs.items()))).encode()).hexdigest()[:16]


def _mfm_inputs(batch: int):
    """A B-image fp32 batch with MFM disc masks, r1 = 16 and half the images low-pass (as bench/fft_mask.py)."""
    import torch
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, CHANNELS, SIDE, SIDE, generator=g)
    ky = torch.fft.fftshift(torch.fft.fftfreq(SIDE, 1 / SIDE))
    d2 = ky[:, None] ** 2 + ky[None, :] ** 2
    low = (d2 < 16 ** 2).float()
    mask = torch.stack([low if i % 2 == 0 else 1 - low for i in range(batch)])
    return x, mask, 16


def _source_key(package_dir: str) -> str:
    h = hashlib.sha256()
    for p in sorted(glob.glob(os.path.join(package_dir, "*.py"))):
        with open(p, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


SECTOR_BYTES = 32  # the unit of a DRAM read


def band_mask_bytes(args: dict, batch: int) -> int:
    """HBM bytes of the mask entries the band path's phase 2 gathers at B = batch: for each image the
    32-byte sectors that hold its band, m(ky, kx) and m(-ky, -kx) for |ky| < R, 0 <= kx < R of the
    fftshift-ed mask, and m[0, 0] (the value c outside the band). Each image's sectors count once (the
    C x row-block programs of one image share them), like every other input of the model."""
    mask, r, h, w = args["mask_ptr"], args["R"], args["H"], args["W"]
    size, s_h, s_w = mask.element_size(), args["s_mh"], args["s_mw"]
    sectors = {0}
    for ky in range(-(r - 1), r):
        for kx in range(r):
            for row, col in (((ky + h // 2) % h, (kx + w // 2) % w), ((h // 2 - ky) % h, (w // 2 - kx) % w)):
                sectors.add((row * s_h + col * s_w) * size // SECTOR_BYTES)
    return batch * len(sectors) * SECTOR_BYTES


def band_launch_bytes(batch: int, small: int, high_pass_share: float):
    """HBM bytes of each band-path launch at B = batch (fp32): phase 1 (_band_coefficients_kernel) reads x and
    writes the band sums uv; phase 2 (_band_lowpass_kernel) reads uv and the masks' band entries
    (band_mask_bytes), writes out, and reads x again for the high-pass images only (c != 0). A one-launch
    band kernel (older code): x, masks, out."""
    def nbytes(fn_name: str, args: dict) -> float:
        uv = args.get("uv_ptr")
        uv_bytes = 0 if uv is None else uv.numel() * uv.element_size() * batch / small
        masks = batch * SIDE * SIDE * 4
        if fn_name == "_band_coefficients_kernel":
            return batch_bytes(batch) + uv_bytes
        if fn_name == "_band_lowpass_kernel":
            return uv_bytes + band_mask_bytes(args, batch) + batch_bytes(batch) * (1 + high_pass_share)
        if fn_name == "_corrupt_spectrum_kernel":
            return 2 * batch_bytes(batch) + masks
        raise ModelError(f"kernels/corrupt.py's band path launches {fn_name}: teach band_launch_bytes its traffic")
    return nbytes


def triton_rows(batch: int) -> list:
    from mfm_fast.kernels import corrupt as cor
    from mfm_fast.kernels import masked_freq_loss as mfl
    key = _source_key(os.path.dirname(cor.__file__))
    rows = corrupt_rows(cor, "triton corrupt band", batch, key, general=True)
    small = batch  # captured at the batch itself: the launcher specialises on the integers it passes
    x, mask, band = _mfm_inputs(small)
    rows += loss_rows(mfl, "triton loss fwd+bwd", x, mask, band, small, batch, key)
    return rows


def corrupt_rows(cor, label: str, batch: int, key: str, general: bool = False) -> list:
    """The band path's launches as kernels/corrupt.py's launch() (of `cor`) makes them for MFM disc masks,
    and with general: the general path's."""
    import torch
    small = batch  # captured at the batch itself: the launcher specialises on the integers it passes
    x, mask, band = _mfm_inputs(small)
    stats = torch.tensor([[0.485, 0.456, 0.406], [0.229, 0.224, 0.225]], dtype=torch.float32)
    out = torch.empty_like(x)
    corrupt_bytes = 2 * batch_bytes(batch) + batch * SIDE * SIDE * 4
    high_pass = sum(1 for i in range(small) if i % 2 == 1) / small  # _mfm_inputs: odd images high-pass
    rows = triton_kernel_rows(label, capture_launches(
        lambda: cor.launch(x, mask, stats, out, band, "tf32x3")), small, batch, corrupt_bytes, "copy", key,
        launch_bytes=band_launch_bytes(batch, small, high_pass))
    if general:
        rows += triton_kernel_rows("triton corrupt general", capture_launches(
            lambda: cor.launch(x, mask, stats, out, 0, "tf32x3")), small, batch, corrupt_bytes, "copy", key)
    return rows


def loss_rows(mfl, label, x, mask, band, small, batch, key) -> list:
    import torch
    pred = torch.randn_like(x)
    launches = capture_launches(lambda: mfl._forward(pred, x, mask, 1.0, "masked", 1, 1.0, [0.485, 0.456, 0.406],
                                                     [0.229, 0.224, 0.225], band, "tf32x3", True))
    nbytes = 3 * batch_bytes(batch) + batch * SIDE * SIDE * 4

    def share(fn_name):  # p_low = 0.5: full-plane kernels work on the low-pass half, the band kernel the rest
        return 0.5
    return triton_kernel_rows(label, launches, small, batch, nbytes, "loss", key, share)


# Imports of mfm_fast in the measured versions of kernels/ whose modules have moved since: old -> where it is now.
MOVED_IMPORTS = {"from mfm_fast.torch_backend.": "from mfm_fast.backends.torch_backend.",
                 "from mfm_fast.dispatch import triton_interpreted": "from mfm_fast._common import triton_interpreted"}


def _measured_package(commit: str, modules: tuple, name: str, namespace: str):
    """kernels/ of `commit` (git show) as a temporary package `name` (its torch custom ops moved to
    `namespace` so that they do not clash with the current ones, its imports of moved mfm_fast modules
    redirected by MOVED_IMPORTS); returns (its modules, its source key)."""
    d = os.path.join(CACHE, f"kernels_{commit}")
    pkg = os.path.join(d, name)
    os.makedirs(pkg, exist_ok=True)
    for mod in ("__init__.py", "_dft.py") + modules:
        proc = subprocess.run(["git", "-C", ROOT, "show", f"{commit}:kernels/{mod}"], capture_output=True, text=True)
        if proc.returncode != 0:
            raise ModelError(f"git show {commit}:kernels/{mod} failed: {proc.stderr.strip()}")
        text = proc.stdout if mod != "__init__.py" else ""
        text = text.replace('custom_op("mfm_fast::', f'custom_op("{namespace}::')
        text = text.replace('register_fake("mfm_fast::', f'register_fake("{namespace}::')
        for was, now in MOVED_IMPORTS.items():
            text = text.replace(was, now)
        with open(os.path.join(pkg, mod), "w") as f:
            f.write(text)
    if d not in sys.path:
        sys.path.insert(0, d)
    try:
        mods = [importlib.import_module(f"{name}.{m[:-3]}") for m in modules]
    except Exception as exc:
        raise ModelError(f"cannot import kernels/ of {commit} ({', '.join(modules)}): {exc}") from exc
    return mods, _source_key(pkg) + commit


def measured_loss_rows(batch: int) -> list:
    """The Triton loss as measured on the H200: kernels/ of MEASURED_LOSS_COMMIT in a temporary package."""
    (mfl,), key = _measured_package(MEASURED_LOSS_COMMIT, ("masked_freq_loss.py",), "mfm_measured_kernels",
                                  "mfm_measured")
    small = batch
    x, mask, band = _mfm_inputs(small)
    return loss_rows(mfl, "triton loss (measured version)", x, mask, band, small, batch, key)


def measured_band_rows(batch: int) -> list:
    """The Triton corruption band path as measured on the H200 (one launch, _corrupt_spectrum_kernel BAND,
    FUSED): kernels/corrupt.py of MEASURED_BAND_COMMIT, the last before the two-phase band path."""
    (cor,), key = _measured_package(MEASURED_BAND_COMMIT, ("corrupt.py",), "mfm_measured_band",
                                  "mfm_measured_band")
    return corrupt_rows(cor, "triton corrupt band (measured version)", batch, key)


# ------------------------------------------------------------------ report
def model(batch: int = 256) -> dict:
    kernels = []
    kernels += cuda_rows(batch)
    kernels += triton_rows(batch)
    # calibration: always at B = 256, where the H200 figures were measured
    calib_rows = [r for r in measured_band_rows(256) if r["name"] == "triton corrupt band (measured version)"] + \
        [r for r in measured_loss_rows(256) if r["name"] == "triton loss (measured version)"]
    calibration = [dict(name=r["name"], batch=256, modelled_ms=r["modelled_ms"], measured_ms=MEASURED[r["name"]],
                        ratio=round(r["modelled_ms"] / MEASURED[r["name"]], 3)) for r in calib_rows]
    floors = [dict(name="copy (corruption floor)", modelled_ms=round(copy_ms(batch), 4)),
              dict(name="loss floor (1.5 copies)", modelled_ms=round(1.5 * copy_ms(batch), 4))]
    return dict(device="H200 (modelled)", batch=batch, side=SIDE, channels=CHANNELS, kernels=kernels,
                calibration=calibration, floors=floors,
                constants=dict(sms=SMS, clock_hz=CLOCK_HZ, schedulers=SCHEDULERS, latency_warps=LATENCY_WARPS,
                               copy_ms_b256=COPY_MS_B256))


def print_table(res: dict) -> None:
    print(f"kernel model, H200 (modelled), B = {res['batch']}, fp32, {res['channels']} x {res['side']} x "
          f"{res['side']} (a model: ncu on a GPU is the check)")
    hdr = (f"{'kernel':52s} {'regs':>4s} {'spill':>5s} {'CTA/SM':>6s} {'insn/CTA':>9s} {'insn/plane':>10s} "
           f"{'wavefr':>7s} "
           f"{'HBM MB':>7s} {'issue':>7s} {'smem':>7s} {'tensor':>7s} {'hbm':>6s} {'model ms':>8s} {'x floor':>7s}")
    print(hdr)
    for r in res["kernels"]:
        if r.get("modelled_ms") is None:
            print(f"{r['name']:52s} {r['note']}")
            continue
        if "registers" not in r:
            print(f"{r['name'] + ' (op total)':52s} {'':4s} {'':5s} {'':6s} {'':9s} {'':10s} {'':7s} "
                  f"{r['hbm_bytes'] / 1e6:7.0f} {'':7s} {'':7s} {'':7s} {r['hbm_ms']:6.3f} {r['modelled_ms']:8.3f} "
                  f"{r['x_floor']:7.2f}")
            continue
        print(f"{r['name'][:52]:52s} {r['registers']:4d} {r['spill_bytes']:5d} {r['ctas_per_sm']:6d} "
              f"{r['warp_insns_per_cta']:9d} {r['warp_insns_per_plane']:10d} {r['smem_wavefronts_per_cta']:7d} "
              f"{r['hbm_bytes'] / 1e6:7.0f} "
              f"{r['issue_ms']:7.3f} {r['smem_ms']:7.3f} {r['tensor_ms']:7.3f} {r['hbm_ms']:6.3f} "
              f"{r['modelled_ms']:8.3f} "
              f"{r['x_floor']:7.2f}")
    print("\ncalibration (H200 measured, B = 256):")
    for c in res["calibration"]:
        print(f"  {c['name']:40s} modelled {c['modelled_ms']:.3f} ms  measured {c['measured_ms']:.3f} ms  "
              f"ratio {c['ratio']:.2f}")
    print("floors: " + ", ".join(f"{f['name']} {f['modelled_ms']:.3f} ms" for f in res["floors"]))
    cuda_total = next((r for r in res["kernels"] if r["name"] == "cuda loss fwd+bwd"), {})
    print("op totals: sum of their launches' largest bounds, at least their HBM traffic; the Triton loss total adds "
          "the torch work around its kernels (grad * grad_output and mask.sum: "
          f"{loss_glue_ms(res['batch']):.3f} ms), the CUDA loss total its removed_kernel "
          f"({cuda_total.get('removed_kernel_ms', 0.0):.3f} ms) and scale_grad_kernel at grad_output == 1 "
          f"({cuda_total.get('scale_grad_ms', 0.0):.3f} ms: its CTAs exit; launch overheads are not modelled). "
          "Rows with 'programs doing work' count the half of the grid that does not return early (p_low = 0.5).")


def main(argv=None) -> int:
    global NO_CACHE
    from mfm_fast.cli import OneLineParser

    ap = OneLineParser(prog="kernel_model.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--batch", type=int, default=256, help="images per batch (default 256)")
    ap.add_argument("--no-cache", action="store_true", help="rebuild and rewalk everything")
    args = ap.parse_args(argv)
    if args.batch < 1:
        ap.error(f"--batch: must be >= 1, got {args.batch}")
    NO_CACHE = args.no_cache
    problem = cache_dir_problem(CACHE)
    if problem is not None:
        where = "" if "MFM_FAST_MODEL_CACHE" in os.environ else " (the default: the variable is unset)"
        ap.error(f"MFM_FAST_MODEL_CACHE: the cache path {CACHE!r}{where}: {problem}; point the variable at a "
                 "writable folder")
    start = time.time()
    try:
        res = model(args.batch)
    except ModelError as exc:
        print(f"kernel_model.py: error: {exc}", file=sys.stderr)
        return 1
    res["seconds"] = round(time.time() - start, 1)
    if args.json:
        print(json.dumps(res))
    else:
        print_table(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
