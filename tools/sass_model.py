"""Warp-level SASS walker: dynamic warp-instruction counts of a kernel from its sm_90 cubin, without a GPU.

    python tools/sass_model.py CUBIN KERNEL --threads 512 [--param OFF=VALUE ...]

The cubin is disassembled with nvdisasm (Triton's wheel ships one). Each warp of one CTA is then walked
through the SASS, 32 lanes at a time, with the integer, predicate, uniform and float arithmetic the
control flow needs (thread / CTA ids, kernel parameters from constant bank 0, local-memory stack copies):

- SIMT: the lanes at the lowest program counter issue next (min-PC reconvergence; exact for structured
  code), lanes inside a call first (callees sit out of line, after the caller). Every issued step is one
  warp instruction, whatever its guard predicate says, as the hardware counts issue slots.
- Values the walk does not model (global / shared loads, tensor-core results, special registers other
  than the ids) are *unknown*. A forward branch on an unknown predicate is counted in
  ``unknown_branches`` and resolved toward the path that works fast: it jumps when that skips a
  slow-path CALL or an early EXIT, else falls through. A backward branch (a loop) on one stops the walk
  with a clear error, because the trip count would be a guess. FCHK (the division slow-path test) is
  taken as "fast path"; an EXIT on an unknown predicate (a program that returns early for some planes)
  is taken as not exiting: the walk counts the program that does the work, and the caller says which
  share of the grid that is.

So loop trip counts come from the code itself (bounds, strides, blockDim), not from a table. It is a
model: ncu's executed-instruction counts (smsp__inst_executed) on a GPU are the check.
"""

from __future__ import annotations

import collections
import importlib.util
import os
import re
import subprocess
import sys

import numpy as np



def _triton_bin_dirs() -> list:
    spec = importlib.util.find_spec("triton")
    return [os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin")] if spec else []

LANES = 32
M32 = 0xFFFFFFFF


class WalkError(RuntimeError):
    """The walk cannot count this kernel (unmodelled control flow); the message says where."""


def nvdisasm_path() -> str:
    for d in _triton_bin_dirs() + os.environ.get("PATH", "").split(os.pathsep):
        p = os.path.join(d, "nvdisasm")
        if os.path.exists(p):
            return p
    raise WalkError("nvdisasm not found (Triton's wheel ships one under triton/backends/nvidia/bin)")


# ------------------------------------------------------------------ parsing
def parse_ptxas(text: str) -> dict:
    """{function (mangled): {"registers", "stack", "spill_stores", "spill_loads"}} from `nvcc -Xptxas -v` output."""
    out, name = {}, None
    for line in text.splitlines():
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            name = m.group(1)
            out[name] = {}
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and name:
            out[name].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m and name:
            out[name]["registers"] = int(m.group(1))
    return out


INSN = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(.*?)\s*;")
LABEL = re.compile(r"^\s*(\.L_x_\d+|\$[^:\s]+):")
LINE = re.compile(r'^\s*//## File "(.*)", line (\d+)')
SECTION = re.compile(r"^//-+ \.text\.(\S+)\s+-+")


class Insn:
    __slots__ = ("pc", "guard", "neg_guard", "op", "mods", "head", "args", "text", "src", "target")

    def __init__(self, pc, text, src):
        self.pc, self.text, self.src, self.target = pc, text, src, None
        self.guard, self.neg_guard = None, False
        m = re.match(r"@(!?)(U?P\w+)\s+(.*)", text)
        if m:
            self.neg_guard, self.guard, text = m.group(1) == "!", m.group(2), m.group(3)
        head, _, rest = text.partition(" ")
        self.head = head
        parts = head.split(".")
        self.op, self.mods = parts[0], set(parts[1:])
        self.args = split_operands(rest)


def split_operands(s: str) -> list:
    out, depth, cur = [], 0, ""
    for ch in s:
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur.strip())
    return out


def disassemble(cubin: str) -> dict:
    """function name -> (list of Insn in order, {label: index}) for every .text section of the cubin."""
    txt = subprocess.run([nvdisasm_path(), "-g", "-c", cubin], capture_output=True, text=True, timeout=600)
    if txt.returncode != 0:
        raise WalkError(f"nvdisasm failed on {cubin}: {txt.stderr.strip()[:500]}")
    funcs, name, src = {}, None, None
    for line in txt.stdout.splitlines():
        m = SECTION.match(line)
        if m:
            name = m.group(1)
            funcs[name] = ([], {})
            continue
        if name is None:
            continue
        m = LINE.match(line)
        if m:
            src = (os.path.basename(m.group(1)), int(m.group(2)))
            continue
        m = LABEL.match(line)
        if m:
            funcs[name][1][m.group(1)] = len(funcs[name][0])
            continue
        m = INSN.match(line)
        if m:
            funcs[name][0].append(Insn(int(m.group(1), 16), m.group(2), src))
    return funcs


class Program:
    """All functions of one cubin laid end to end, branch / call targets resolved to indices."""

    def __init__(self, cubin: str):
        self.funcs = disassemble(cubin)
        self.insns, self.entry, labels = [], {}, {}
        for name, (insns, labs) in self.funcs.items():
            base = len(self.insns)
            self.entry[name] = base
            labels[name] = {k: base + v for k, v in labs.items()}
            labels[name][name] = base
            self.insns += insns
        global_labels = {k: v for labs in labels.values() for k, v in labs.items() if k.startswith("$")}
        for name, (insns, _) in self.funcs.items():
            for ins in insns:
                for a in ins.args:
                    m = re.search(r"`\(([^)]+)\)", a)
                    if m and ins.op in ("BRA", "CALL", "BSSY", "BREAK", "SSY", "PBK", "JMP"):
                        key = m.group(1)
                        tgt = labels[name].get(key, global_labels.get(key, self.entry.get(key.lstrip("$"))))
                        if tgt is None and key.startswith("$"):
                            tgt = self.entry.get(key[1:])
                        ins.target = tgt

        # jump tables (BRX): each function's constant bank 2 from the cubin, and code addresses -> indices
        self.const2 = constant_bank2(cubin)
        self.owner, self.at_pc = [], {}
        for name, (insns, _) in self.funcs.items():
            for i, ins in enumerate(insns):
                self.owner.append(name)
                self.at_pc[(name, ins.pc)] = self.entry[name] + i

    def kernels(self) -> list:
        return [n for n in self.funcs if not n.startswith("$")]


def constant_bank2(cubin: str) -> dict:
    """{function: {(2, byte offset): u32}} from the cubin's .nv.constant2.<function> sections (the compiler's
    constants, among them switch jump tables), read straight from the ELF64 section headers."""
    import struct as st
    with open(cubin, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        return {}
    shoff, = st.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = st.unpack_from("<HHH", data, 0x3A)
    heads = [st.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    strtab = heads[shstrndx]
    out = {}
    for name_off, kind, _, _, off, size, *_ in heads:
        end = data.index(b"\0", strtab[4] + name_off)
        name = data[strtab[4] + name_off:end].decode()
        if name.startswith(".nv.constant2.") and kind != 8:  # 8: SHT_NOBITS
            words = data[off:off + size]
            out[name[len(".nv.constant2."):]] = {(2, i): int.from_bytes(words[i:i + 4], "little")
                                                 for i in range(0, len(words) - 3, 4)}
    return out


# ------------------------------------------------------------------ values
class Lanes:
    """32 lanes of one 32-bit register: uint64 values (low 32 bits used) and a known mask."""
    __slots__ = ("v", "k")

    def __init__(self, v=None, k=None):
        self.v = np.zeros(LANES, np.uint64) if v is None else v
        self.k = np.ones(LANES, bool) if k is None else k


def _u(x):
    return np.asarray(x, np.uint64) & np.uint64(M32)


def _s(v):  # uint64 (32-bit payload) -> signed int64
    v = v.astype(np.int64)
    return np.where(v >= 2 ** 31, v - 2 ** 32, v)


def _f(v):
    return (v & np.uint64(M32)).astype(np.uint32).view(np.float32)


def _from_f(x):
    return np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)


def _d(lo, hi):
    return ((hi << np.uint64(32)) | lo).view(np.float64)


def _from_d(x):
    bits = np.asarray(x, np.float64).view(np.uint64)
    return bits & np.uint64(M32), bits >> np.uint64(32)


class Warp:
    """Register file of one warp: R0..R255, UR0..UR63, P0..P6, UP0..UP6; local memory per lane."""

    def __init__(self, warp_id: int, ntid: int, ctaid: int, params: dict):
        self.r, self.p, self.local = {}, {}, [dict() for _ in range(LANES)]
        self.tid = np.arange(LANES, dtype=np.uint64) + np.uint64(32 * warp_id)
        self.live = self.tid < np.uint64(ntid)
        self.ntid, self.ctaid, self.params = ntid, ctaid, params
        self.carry = {}
        self.bits = {}  # register -> per-lane known-bit masks of a partly known value (flag words, LOP3)

    def known_bits(self, name: str) -> tuple:
        """(value, known-bit mask) per lane of a register: all bits of a known value, op_lop3's record of a
        partly known one (bits set or cleared by LOP3 with constant masks), else none."""
        val = self.get(name)
        kb = np.where(val.k, np.uint64(M32), np.uint64(0))
        if name in self.bits:
            pv, pk = self.bits[name]
            val, kb = Lanes(np.where(val.k, val.v, pv), val.k), np.where(val.k, kb, pk)
        return val.v, kb

    # register access
    def get(self, name: str) -> Lanes:
        if name in ("RZ", "URZ"):
            return Lanes()
        if name not in self.r:
            return Lanes(k=np.zeros(LANES, bool))
        return self.r[name]

    def set(self, name: str, val: Lanes, mask):
        if name in ("RZ", "URZ"):
            return
        self.bits.pop(name, None)  # any write ends a partly known value (op_lop3 records its own)
        if mask.all():
            self.r[name] = Lanes(val.v & np.uint64(M32), val.k)
            return
        old = self.get(name)
        self.r[name] = Lanes(np.where(mask, val.v & np.uint64(M32), old.v), np.where(mask, val.k, old.k))

    def pred(self, name: str):
        neg = name.startswith("!")
        name = name.lstrip("!")
        if name in ("PT", "UPT"):
            v, k = np.ones(LANES, bool), np.ones(LANES, bool)
        else:
            v, k = self.p.get(name, (np.zeros(LANES, bool), np.zeros(LANES, bool)))
        return (~v if neg else v), k

    def set_pred(self, name: str, v, k, mask):
        if name in ("PT", "UPT"):
            return
        ov, ok = self.pred(name)
        self.p[name] = (np.where(mask, v, ov), np.where(mask, k, ok))

    def const(self, bank: int, off):
        """c[bank][off] per lane (off: uint64 array)."""
        vals = np.zeros(LANES, np.uint64)
        known = np.zeros(LANES, bool)
        for i in range(LANES):
            o = int(off[i])
            val = self.params.get((bank, o))
            if val is None and bank == 0:
                val = {0x0: self.ntid, 0x4: 1, 0x8: 1, 0xc: 1 << 20, 0x10: 1, 0x14: 1, 0x28: 1 << 24}.get(o)
            if val is not None:
                vals[i], known[i] = val & M32, True
        return Lanes(vals, known)


IMM = re.compile(r"^-?(0x[0-9a-f]+|\d+)$")
FLOATIMM = re.compile(r"^-?(\d+\.\d*(e[-+]?\d+)?|\d+e[-+]?\d+|\+?INF|-?QNAN|INF)$", re.I)
CONST = re.compile(r"^(-|~|!)?\|?c\[(0x[0-9a-f]+)\]\[([^\]]+)\]\|?$")


_PARSED = {}
UNKNOWN_K = np.zeros(LANES, bool)


def read_operand(w: Warp, a: str, float_ctx=False) -> Lanes:
    """The value of operand text a (register, immediate, c[bank][offset], with - ~ |.| modifiers)."""
    kind = _PARSED.get(a)
    if kind is None:
        core = a.replace(".reuse", "")
        if re.match(r"^U?R(\d+|Z)$", core):
            kind = ("reg", core)
        elif IMM.match(core) and not float_ctx:
            kind = ("imm", int(core, 0) & M32)
        else:
            kind = ("slow",)
        _PARSED[a] = kind
    if kind[0] == "reg":
        return w.get(kind[1])
    if kind[0] == "imm" and not float_ctx:
        return Lanes(np.full(LANES, kind[1], np.uint64))
    return _read_operand_slow(w, a, float_ctx)


def _read_operand_slow(w: Warp, a: str, float_ctx=False) -> Lanes:
    a = a.replace(".reuse", "")
    neg = a.startswith("-")
    inv = a.startswith("~")
    absv = "|" in a
    core = a.lstrip("-~").strip("|")
    for suf in (".H0_H0", ".H1_H1", ".F32", ".H1", ".H0", ".B1", ".B0", ".B2", ".B3", ".X4", ".64"):
        core = core.replace(suf, "")
    m = CONST.match(core)
    if m:
        bank = int(m.group(2), 16)
        base, offs = _addr(w, m.group(3))
        off = _u(base.v + np.uint64(offs))
        val = w.const(bank, off)
        val.k &= base.k
    elif re.match(r"^U?R(\d+|Z)$", core):
        val = w.get(core)
    elif IMM.match(core) and not (float_ctx and not core.startswith("0x")):
        n = int(core, 0)
        val = Lanes(np.full(LANES, n & M32, np.uint64))
    elif FLOATIMM.match(core) or IMM.match(core):  # a float instruction's "1" / "-126" is 1.0f / -126.0f
        val = Lanes(_from_f(np.full(LANES, float(core), np.float32)))
    elif core in ("PT", "!PT"):
        val = Lanes(np.full(LANES, 1, np.uint64))
    else:
        val = Lanes(k=np.zeros(LANES, bool))
    if neg or absv:
        read, write = (_f, _from_f) if float_ctx else (_s, _u)  # float32 or signed-integer view of the lanes
        x = read(val.v)
        if absv:
            x = np.abs(x)
        if neg:
            x = -x
        val = Lanes(write(x), val.k)
    if inv:
        val = Lanes(_u(~val.v), val.k)
    return val


def reg_pair(name: str, i: int) -> str:
    name = name.replace(".reuse", "").lstrip("-~|").rstrip("|").split(".")[0]
    if name in ("RZ", "URZ"):
        return name
    pre = "UR" if name.startswith("UR") else "R"
    return f"{pre}{int(name[len(pre):]) + i}"


def is_pred(a: str) -> bool:
    return bool(re.match(r"^!?U?P(\d|T)", a))


CMP = {"LT": np.less, "LE": np.less_equal, "GT": np.greater, "GE": np.greater_equal, "EQ": np.equal,
       "NE": np.not_equal, "LTU": np.less, "LEU": np.less_equal, "GTU": np.greater, "GEU": np.greater_equal,
       "EQU": np.equal, "NEU": np.not_equal}
BOOL = {"AND": np.logical_and, "OR": np.logical_or, "XOR": np.logical_xor}


def lut3(a, b, c, lut):
    out = np.zeros_like(a)
    for bit in range(8):
        if lut >> bit & 1:
            ta = a if bit & 4 else ~a
            tb = b if bit & 2 else ~b
            tc = c if bit & 1 else ~c
            out |= ta & tb & tc
    return out & np.uint64(M32)


# ------------------------------------------------------------------ the walk
NOOPS = {"BSSY", "BSYNC", "BAR", "WARPSYNC", "NOP", "DEPBAR", "MEMBAR", "FENCE", "ERRBAR", "CCTL", "YIELD",
         "NANOSLEEP", "BMOV", "BREAK", "STS", "STG", "ST", "RED", "REDG", "UBLKPF", "CCTLL", "BPT",
         "SYNCS", "UTMAPF", "UTMALDG", "UTMASTG", "UBLKCP", "ELECT", "ACQBULK", "WARPGROUP", "ARRIVES",
         "STSM", "UCGABAR_ARV", "UCGABAR_WAIT", "REDUX", "UTMACCTL", "UTMACMDFLUSH", "FENCE.VIEW"}
LOADS = {"LDS", "LDG", "LD", "LDSM", "ATOM", "ATOMS", "ATOMG", "LDGSTS", "SHFL", "MATCH", "HGMMA", "HMMA",
         "IMMA", "DMMA", "QGMMA", "LDGDEPBAR", "TLD", "TEX", "SUATOM"}


class Stats:
    def __init__(self):
        self.steps = 0
        self.by_class = collections.Counter()
        self.by_src = collections.Counter()
        self.unknown_branches = 0
        self.unknown_at = collections.Counter()
        self.smem_insns = 0
        self.smem_wavefronts = 0
        self.mma_flops = collections.Counter()  # "wgmma" / "mma.sync" -> FLOPs
        self.bar = 0


def smem_wavefronts(ins: Insn) -> int:
    """Conflict-free 128-byte wavefronts of one warp-wide shared-memory access (LDSM / STSM: matrices)."""
    if ins.op in ("LDSM", "STSM"):
        return 4 if "4" in ins.mods else (2 if "2" in ins.mods else 1)
    return 4 if "128" in ins.mods else (2 if "64" in ins.mods else 1)


def mma_flops(ins: Insn) -> tuple:
    """("wgmma" or "mma.sync", FLOPs this warp's issue contributes): HGMMA.MxNxK is one warpgroup (4 warps)
    operation of 2 M N K FLOPs; HMMA.MNK (e.g. 1688: 16 x 8 x 8) is one warp's."""
    for m in ins.mods:
        g = re.fullmatch(r"(\d+)x(\d+)x(\d+)", m)
        if g:
            a, b, c = map(int, g.groups())
            return "wgmma", 2 * a * b * c // 4
        g = re.fullmatch(r"(16)(8)(\d+)", m)
        if g:
            return "mma.sync", 2 * 16 * 8 * int(g.group(3))
    return "mma.sync", 0


def classify(op: str) -> str:
    if op in ("LDS", "STS", "LDSM", "STSM", "ATOMS"):
        return "shared"
    if op in ("LDG", "STG", "LD", "ST", "LDGSTS", "RED", "ATOM", "ATOMG", "UTMALDG", "UTMASTG"):
        return "global"
    if op in ("HGMMA", "HMMA", "IMMA", "DMMA", "QGMMA"):
        return "mma"
    if op in ("BRA", "BSSY", "BSYNC", "EXIT", "CALL", "RET", "BAR", "WARPSYNC", "BREAK", "BMOV"):
        return "control"
    if op.startswith("F") or op.startswith("D") or op.startswith("H") or op == "MUFU":
        return "float"
    return "integer"


def walk_warp(prog: Program, kernel: str, warp_id: int, ntid: int, ctaid: int, params: dict, stats: Stats,
              max_steps: int = 5_000_000):
    """Walk one warp of a CTA from the kernel's entry until every lane has exited, adding what it issues to
    `stats`. Each step: the lanes that issue next, the instruction they issue (counted), its guard, then the
    instruction's effect on the lanes' program counters (control flow) or registers (everything else)."""
    walk = _WarpWalk(prog, kernel, Warp(warp_id, ntid, ctaid, params), stats, max_steps)
    while walk.alive.any():
        pc, mask = walk.issuing_lanes()
        ins = walk.fetch(pc)
        walk.count(ins)
        exec_mask, known = walk.guard(ins, mask)
        nxt = np.where(mask, pc + 1, walk.pcs)
        step = _WarpWalk.CONTROL.get(ins.op, _WarpWalk.compute)
        walk.pcs = step(walk, ins, pc, mask, exec_mask, known, nxt)


class _WarpWalk:
    """The state of walk_warp: the warp's registers, each lane's program counter, whether it is still alive, its
    return addresses and call depth. The step methods take the issuing lanes (`mask`), those whose guard holds
    (`exec_mask`), where the guard's value is known (`known`) and the fall-through PCs (`nxt`), and return the
    lanes' next PCs."""

    def __init__(self, prog: Program, kernel: str, w: Warp, stats: Stats, max_steps: int):
        self.prog, self.kernel, self.w, self.stats, self.max_steps = prog, kernel, w, stats, max_steps
        self.pcs = np.full(LANES, prog.entry[kernel], np.int64)
        self.alive = w.live.copy()
        self.callstack = [[] for _ in range(LANES)]
        self.depth = np.zeros(LANES, np.int64)  # call depth: lanes inside a call issue first (calls sit out of line)

    def issuing_lanes(self) -> tuple:
        """(pc, mask): the live lanes at the lowest PC issue next (min-PC reconvergence), lanes inside a call
        first."""
        key = self.pcs - self.depth * (1 << 40)
        mask = self.alive & (key == key[self.alive].min())
        return int(self.pcs[mask][0]), mask

    def fetch(self, pc: int) -> Insn:
        """The instruction at pc, as one more issued step (WalkError past the code's end or max_steps)."""
        if pc >= len(self.prog.insns):
            raise WalkError(f"{self.kernel}: walked off the end of the code")
        ins = self.prog.insns[pc]
        self.stats.steps += 1
        if self.stats.steps > self.max_steps:
            raise WalkError(f"{self.kernel}: more than {self.max_steps} warp instructions in one warp (a loop the "
                            f"walk cannot bound, last at {ins.src}: {ins.text})")
        return ins

    def count(self, ins: Insn) -> None:
        self.stats.by_class[classify(ins.op)] += 1
        self.stats.by_src[ins.src] += 1
        if ins.op in ("BAR",):
            self.stats.bar += 1

    def guard(self, ins: Insn, mask) -> tuple:
        """(exec_mask, known): the issuing lanes whose guard predicate holds, and the lanes where it is known."""
        if not ins.guard:
            return mask, np.ones(LANES, bool)
        gv, gk = self.w.pred(("!" if ins.neg_guard else "") + ins.guard)
        return mask & gv, gk

    def unknown_branch(self, ins: Insn) -> None:
        self.stats.unknown_branches += 1
        self.stats.unknown_at[(ins.src, ins.text)] += 1

    def exit(self, ins, pc, mask, exec_mask, known, nxt):
        if (mask & ~known).any():  # a data-dependent early exit: the lanes go on (the path that works)
            self.unknown_branch(ins)
        self.alive &= ~(exec_mask & known)
        return nxt

    def branch(self, ins, pc, mask, exec_mask, known, nxt):
        """BRA [Pc,] target (.ANY: every issuing lane jumps if one would). A loop branch on an unknown value is an
        error; a forward one goes toward the path that works fast (see resolve_unknown)."""
        tgt = ins.target
        if tgt is None:
            raise WalkError(f"{self.kernel}: indirect branch at {ins.src}: {ins.text}")
        take = exec_mask.copy()
        unknown = mask & ~known
        if ins.args and is_pred(ins.args[0]):  # BRA Pc, target: also needs Pc
            cv, ck = self.w.pred(ins.args[0])
            take &= cv
            unknown |= mask & known & ~ck
        if "ANY" in ins.mods:
            take = mask & (exec_mask & known).any()
        if unknown.any():
            take = self.resolve_unknown(ins, pc, take, unknown)
        return np.where(take, tgt, nxt)

    def resolve_unknown(self, ins, pc, take, unknown):
        """The lanes that take a branch whose condition is unknown for `unknown`: toward the path that works
        fast, jumping over a slow-path CALL or an early EXIT, else falling through. Backward (a loop): WalkError."""
        tgt = ins.target
        if tgt <= pc:
            raise WalkError(f"{self.kernel}: loop branch at {ins.src} ({ins.text}) depends on a value the "
                            f"walk does not model (global / shared memory or an unmodelled opcode)")
        self.unknown_branch(ins)
        insns = self.prog.insns
        skips_call = any(insns[j].op == "CALL" or (insns[j].op == "EXIT" and insns[j].guard is None)
                         for j in range(pc + 1, tgt))
        return (take | unknown) if skips_call else (take & ~unknown)

    def call(self, ins, pc, mask, exec_mask, known, nxt):
        for i in np.nonzero(exec_mask)[0]:
            self.callstack[i].append(pc + 1)
        self.depth = self.depth + exec_mask
        return np.where(exec_mask, ins.target, nxt)

    def ret(self, ins, pc, mask, exec_mask, known, nxt):
        for i in np.nonzero(exec_mask)[0]:
            if not self.callstack[i]:
                raise WalkError(f"{self.kernel}: RET without CALL at {ins.src}")
            nxt[i] = self.callstack[i].pop()
        self.depth = self.depth - exec_mask
        return nxt

    def jump_table(self, ins, pc, mask, exec_mask, known, nxt):
        """BRX Ra imm: to the function-relative address Ra + imm + (address of the next instruction); Ra comes
        from the jump table in constant bank 2. The target must be one of nvdisasm's BRANCH_TARGETS, and every
        lane's index known."""
        if not exec_mask.any():
            return nxt
        kernel, prog = self.kernel, self.prog
        m = re.match(r"BRX\s+(R\d+)\s+(-?0x[0-9a-f]+|-?\d+)", ins.text)
        if m is None:
            raise WalkError(f"{kernel}: cannot read the BRX at {ins.src}: {ins.text[:60]}")
        reg = read_operand(self.w, m.group(1))
        if not (reg.k[exec_mask] & known[exec_mask]).all():
            raise WalkError(f"{kernel}: jump table index at {ins.src} ({ins.text[:40]}) depends on a "
                            f"value the walk does not model")
        func = prog.owner[pc]
        imm = int(m.group(2), 0)
        allowed = {prog.funcs[func][1].get(t.strip()) for t in
                   re.search(r'BRANCH_TARGETS ([^"]*)"', ins.text).group(1).split(",")} \
            if "BRANCH_TARGETS" in ins.text else None
        for i in np.nonzero(exec_mask)[0]:
            addr = (int(_s(reg.v[i:i + 1])[0]) + imm + ins.pc + 16) & M32
            tgt = prog.at_pc.get((func, addr))
            if tgt is None or (allowed is not None and tgt - prog.entry[func] not in allowed):
                raise WalkError(f"{kernel}: jump table at {ins.src} goes to 0x{addr:x}, not one of its "
                                f"branch targets")
            nxt[i] = tgt
        return nxt

    def indirect(self, ins, pc, mask, exec_mask, known, nxt):
        raise WalkError(f"{self.kernel}: indirect branch (jump table) at {ins.src}: {ins.text}")

    def compute(self, ins, pc, mask, exec_mask, known, nxt):
        """Any other instruction: its tensor-core FLOPs and shared-memory wavefronts counted, its arithmetic done
        on the lanes whose guard is known to hold; where the guard is unknown its destinations become unknown."""
        if not exec_mask.any():
            return nxt
        if ins.op in ("HGMMA", "HMMA"):
            kind, flops = mma_flops(ins)
            self.stats.mma_flops[kind] += flops
        if ins.op in ("LDS", "STS", "LDSM", "STSM", "ATOMS"):
            self.stats.smem_insns += 1
            self.stats.smem_wavefronts += smem_wavefronts(ins)
        execute(self.w, ins, exec_mask & known, pc)
        unknown_guard = mask & ~known
        if unknown_guard.any():
            for d in dests(ins):
                if is_pred(d):
                    self.w.set_pred(d, np.zeros(LANES, bool), np.zeros(LANES, bool), unknown_guard)
                else:
                    self.w.set(d, Lanes(k=np.zeros(LANES, bool)), unknown_guard)
        return nxt

    CONTROL = {"EXIT": exit, "BRA": branch, "CALL": call, "RET": ret, "BRX": jump_table, "JMX": indirect}


def dests(ins: Insn) -> list:
    if not ins.args or ins.op in ("STS", "STG", "ST", "STL", "BAR", "RED", "BRA", "BSSY", "BSYNC"):
        return []
    out = [ins.args[0]]
    if ins.args[0].startswith("R") or ins.args[0].startswith("UR"):
        wide = 4 if "128" in ins.mods else (2 if "64" in ins.mods or "WIDE" in ins.mods else 1)
        out = [reg_pair(ins.args[0], i) for i in range(wide)]
    if ins.op in ("ISETP", "FSETP", "DSETP", "PLOP3", "UISETP", "UPLOP3") and len(ins.args) > 1:
        out.append(ins.args[1])
    return out


DATA_FLOAT = {"FADD", "FMUL", "FFMA", "FMNMX", "HADD2", "HMUL2", "FSWZADD", "F2FP", "HFMA2_DATA"}
UNKNOWN = None


def execute(w: Warp, ins: Insn, m, pc):
    op, mods, a = ins.op, ins.mods, ins.args
    if op in DATA_FLOAT:
        # plane data (an operand unknown): skip the arithmetic, the result is unknown
        for x in a[1:]:
            core = x.replace(".reuse", "").lstrip("-|").strip("|")
            if core.startswith("R") and core != "RZ" and not w.get(core).k.all():
                w.r[a[0]] = Lanes(np.zeros(LANES, np.uint64), UNKNOWN_K)
                return
    if op.startswith("U") and op not in ("UBLKPF",) and op[1:] in OPS:
        op = op[1:]
    fn = OPS.get(op)
    if fn is None:
        if op in NOOPS:
            return
        for d in dests(ins):  # loads and unmodelled ops: results unknown
            if is_pred(d):
                w.set_pred(d, np.zeros(LANES, bool), np.zeros(LANES, bool), m)
            elif re.match(r"^U?R", d):
                w.set(d, Lanes(k=np.zeros(LANES, bool)), m)
        return
    fn(w, ins, mods, a, m)


def rd(w, x, f=False):
    return read_operand(w, x, f)


def op_mov(w, ins, mods, a, m):
    w.set(a[0], rd(w, a[1]), m)


def _carry_in(w, a, n):
    """carry-in predicates of an .X op: the trailing predicate operands."""
    total = np.zeros(LANES, np.uint64)
    k = np.ones(LANES, bool)
    for x in a[n:]:
        if is_pred(x):
            v, kk = w.pred(x)
            total += v.astype(np.uint64)
            k &= kk
    return total, k


def op_iadd3(w, ins, mods, a, m):
    """IADD3 d, [Pc0, [Pc1,]] a, b, c: three-input add, carries into the predicates; .X adds carry-ins."""
    vals = [x for x in a[1:] if not is_pred(x)]
    src = [rd(w, x) for x in vals[:3]]
    total = sum(s.v for s in src)
    k = np.logical_and.reduce([s.k for s in src])
    if "X" in mods:  # IADD3.X d, [Pout,] a, b, c, Pin, Pin2
        pre = [x for x in a[1:4] if is_pred(x)] if is_pred(a[1]) else []
        cin_preds = [x for x in a[1:] if is_pred(x)][len(pre):]
        for x in cin_preds:
            v, kk = w.pred(x)
            total = total + v.astype(np.uint64)
            k &= kk
        outs = pre
    else:
        outs = [x for x in a[1:3] if is_pred(x)]
    carry = total >> np.uint64(32)
    for i, p in enumerate(outs[:2]):
        w.set_pred(p, carry > np.uint64(i), k, m)
    w.set(a[0], Lanes(_u(total), k), m)


def op_imad(w, ins, mods, a, m):
    if "WIDE" in mods:
        x, y, z_lo = rd(w, a[1]), rd(w, a[2]), rd(w, a[3])
        if re.match(r"^U?R", a[3]):
            z_hi = rd(w, reg_pair(a[3], 1))
        else:  # an immediate addend: sign-extended
            z_hi = Lanes(np.where(_s(z_lo.v) < 0, M32, 0).astype(np.uint64))
        if "U32" in mods:
            prod = x.v.astype(object) * y.v.astype(object)
        else:
            prod = _s(x.v).astype(object) * _s(y.v).astype(object)
        z = (z_hi.v.astype(object) << 32) | z_lo.v.astype(object)
        tot = (prod + z) & ((1 << 64) - 1)
        k = x.k & y.k & z_lo.k & z_hi.k
        lo = np.array([int(t) & M32 for t in tot], np.uint64)
        hi = np.array([int(t) >> 32 for t in tot], np.uint64)
        w.set(a[0], Lanes(lo, k), m)
        w.set(reg_pair(a[0], 1), Lanes(hi, k), m)
        return
    x, y, z = rd(w, a[1]), rd(w, a[2]), rd(w, a[3])
    k = x.k & y.k & z.k
    if "HI" in mods:
        if "U32" in mods:
            hi = (x.v * y.v) >> np.uint64(32)
        else:
            hi = _u((_s(x.v) * _s(y.v)) >> 32)
        v = hi + z.v
    else:
        v = x.v * y.v + z.v
    if "X" in mods:
        cin, kk = _carry_in(w, a, 4)
        v = v + cin
        k &= kk
    w.set(a[0], Lanes(_u(v), k), m)


def op_lea(w, ins, mods, a, m):
    """LEA d, [Pcarry,] a, b, [hi,] shift, [Pcarry_in]: (a << shift) + b; .HI: high word of (hi:a) << shift."""
    args = list(a)
    outs = []
    if len(args) > 1 and is_pred(args[1]):
        outs, args = [args[1]], [args[0]] + args[2:]
    vals = [x for x in args[1:] if not is_pred(x)]
    x, y, sh = rd(w, vals[0]), rd(w, vals[1]), int(vals[-1], 0)
    k = x.k & y.k
    if "HI" in mods:
        if "SX32" in mods:
            hi = np.where(_s(x.v) < 0, M32, 0).astype(np.uint64)
        elif len(vals) == 4:
            h = rd(w, vals[2])
            hi, k = h.v, k & h.k
        else:
            hi = np.zeros(LANES, np.uint64)
        wide = [(int(hv) << 32 | int(xv)) for hv, xv in zip(hi, x.v)]
        part = np.array([((t << sh) >> 32) & M32 for t in wide], np.uint64)
    else:
        part = (x.v << np.uint64(sh)) & np.uint64(M32)
    tot = part + y.v
    if "X" in mods:
        for p in [q for q in args[1:] if is_pred(q)]:
            pv, pk = w.pred(p)
            tot, k = tot + pv.astype(np.uint64), k & pk
    for p in outs:
        w.set_pred(p, (tot >> np.uint64(32)) > 0, k, m)
    w.set(a[0], Lanes(_u(tot), k), m)


def op_shf(w, ins, mods, a, m):
    """SHF.L / .R funnel shift of (hi:lo); .HI takes the high word; .W wraps the shift mod 32, else it clamps."""
    lo, s, hi = rd(w, a[1]), rd(w, a[2]), rd(w, a[3])
    wide64 = "U64" in mods or "S64" in mods
    sh = s.v & np.uint64(31) if "W" in mods else np.minimum(s.v, np.uint64(63 if wide64 else 32))
    k = lo.k & s.k & hi.k
    wide = (hi.v << np.uint64(32)) | lo.v
    if "L" in mods:
        r = [(int(wv) << int(sv)) & ((1 << 64) - 1) for wv, sv in zip(wide, sh)]
    else:
        if "S32" in mods or "S64" in mods:
            sw = [int(wv) - (1 << 64) if int(wv) >> 63 else int(wv) for wv in wide]
            r = [(x >> int(sv)) & ((1 << 64) - 1) for x, sv in zip(sw, sh)]
        else:
            r = [int(wv) >> int(sv) for wv, sv in zip(wide, sh)]
    r = np.array([x & ((1 << 64) - 1) for x in r], dtype=object)
    out = np.array([int(x) >> 32 if "HI" in mods else int(x) & M32 for x in r], np.uint64)
    w.set(a[0], Lanes(out & np.uint64(M32), k), m)


def op_lop3(w, ins, mods, a, m):
    args = list(a)
    pout = None
    if is_pred(args[0]):
        pout, args = args[0], args[1:]
    x, y, z = rd(w, args[1]), rd(w, args[2]), rd(w, args[3])
    lut = int(args[4], 0)
    v = lut3(x.v, y.v, z.v, lut)
    k = x.k & y.k & z.k
    if k[m].all() or not m.any():
        if pout:
            w.set_pred(pout, v != 0, k, m)
        w.set(args[0], Lanes(v, k), m)
        return
    # bit by bit: a result bit is known when the LUT gives it whatever the operands' unknown bits are (flag
    # words built with LOP3 from an uninitialised register: only the bits that are set or cleared count)
    ops = []
    for t in args[1:4]:
        core = t.replace(".reuse", "")
        if re.match(r"^U?R(\d+|Z)$", core):
            ops.append(w.known_bits(core))
        else:
            val = rd(w, t)
            ops.append((val.v, np.where(val.k, np.uint64(M32), np.uint64(0))))
    full = np.uint64(M32)
    outs = []
    for c in range(8):
        sub = [(ov & uk) | ((full & ~uk) if (c >> i) & 1 else np.uint64(0)) for i, (ov, uk) in enumerate(ops)]
        outs.append(lut3(sub[0], sub[1], sub[2], lut) & full)
    diff = np.zeros(LANES, np.uint64)
    for o in outs[1:]:
        diff |= o ^ outs[0]
    kb = ~diff & full
    v = outs[0]
    k = kb == full
    if pout:
        w.set_pred(pout, v != 0, k | ((v & kb) != 0), m)
    prev = w.known_bits(args[0]) if args[0] not in ("RZ", "URZ") else None
    w.set(args[0], Lanes(v, k), m)
    if prev is not None and not k[m].all():
        pv, pk = prev
        w.bits[args[0]] = (np.where(m, v, pv), np.where(m, kb, pk))


def op_lop(w, ins, mods, a, m):
    x, y = rd(w, a[1]), rd(w, a[2])
    f = {"AND": np.bitwise_and, "OR": np.bitwise_or, "XOR": np.bitwise_xor}
    for key, fn in f.items():
        if key in mods:
            w.set(a[0], Lanes(fn(x.v, y.v), x.k & y.k), m)
            return
    w.set(a[0], Lanes(k=np.zeros(LANES, bool)), m)


def _cmp_mode(mods):
    for c in CMP:
        if c in mods:
            return c
    raise WalkError(f"no comparison in {mods}")


def _combine(w, mods, r, rk, pc_name, m, a):
    bop = next(b for b in BOOL if b in mods)
    pv, pk = w.pred(pc_name)
    v = BOOL[bop](r, pv)
    k = rk & pk
    w.set_pred(a[0], v, k, m)
    w.set_pred(a[1], BOOL[bop](~r, pv), k, m)


def op_isetp(w, ins, mods, a, m):
    x, y = rd(w, a[2]), rd(w, a[3])
    c = _cmp_mode(mods)
    k = x.k & y.k
    if "U32" in mods:
        xs, ys = x.v.astype(np.int64), y.v.astype(np.int64)
    else:
        xs, ys = _s(x.v), _s(y.v)
    r = CMP[c](xs, ys)
    if "EX" in mods:
        chain, ck = w.pred(a[5])
        eq = xs == ys
        if c in ("EQ",):
            r = eq & chain
        elif c == "NE":
            r = (~eq) | chain
        else:
            strict = {"LT": np.less, "LE": np.less, "GT": np.greater, "GE": np.greater}[c](xs, ys)
            r = strict | (eq & chain)
        k = k & ck
    _combine(w, mods, r, k, a[4], m, a)


def op_sel(w, ins, mods, a, m):
    x, y = rd(w, a[1]), rd(w, a[2])
    pv, pk = w.pred(a[3])
    v = np.where(pv, x.v, y.v)
    k = np.where(pv, x.k, y.k) & pk
    w.set(a[0], Lanes(v, k), m)


def op_imnmx(w, ins, mods, a, m):
    x, y = rd(w, a[1]), rd(w, a[2])
    pv, pk = w.pred(a[3])
    xs, ys = (x.v.astype(np.int64), y.v.astype(np.int64)) if "U32" in mods else (_s(x.v), _s(y.v))
    v = np.where(pv, np.minimum(xs, ys), np.maximum(xs, ys))
    w.set(a[0], Lanes(_u(v), x.k & y.k & pk), m)


def op_viadd(w, ins, mods, a, m):
    x, y = rd(w, a[1]), rd(w, a[2])
    w.set(a[0], Lanes(_u(x.v + y.v), x.k & y.k), m)


def op_viaddmnmx(w, ins, mods, a, m):
    x, y, z = rd(w, a[1]), rd(w, a[2]), rd(w, a[3])
    pv, pk = w.pred(a[4])
    s = _s(_u(x.v + y.v))
    zs = _s(z.v)
    if "U32" in mods:
        s, zs = _u(x.v + y.v).astype(np.int64), z.v.astype(np.int64)
    v = np.where(pv, np.minimum(s, zs), np.maximum(s, zs))
    w.set(a[0], Lanes(_u(v), x.k & y.k & z.k & pk), m)


def op_iabs(w, ins, mods, a, m):
    x = rd(w, a[1])
    w.set(a[0], Lanes(_u(np.abs(_s(x.v))), x.k), m)


def op_brev(w, ins, mods, a, m):
    x = rd(w, a[1])
    v = np.array([int(f"{int(t):032b}"[::-1], 2) for t in x.v], np.uint64)
    w.set(a[0], Lanes(v, x.k), m)


def op_flo(w, ins, mods, a, m):
    x = rd(w, a[1])
    v = np.array([(int(t).bit_length() - 1) & M32 for t in x.v], np.uint64)
    w.set(a[0], Lanes(v, x.k), m)


def op_popc(w, ins, mods, a, m):
    x = rd(w, a[1])
    w.set(a[0], Lanes(np.array([bin(int(t)).count("1") for t in x.v], np.uint64), x.k), m)


def op_s2r(w, ins, mods, a, m):
    src = a[1]
    if src == "SR_TID.X":
        v = Lanes(w.tid.copy())
    elif src in ("SR_TID.Y", "SR_TID.Z", "SR_CTAID.Y", "SR_CTAID.Z"):
        v = Lanes()
    elif src == "SR_CTAID.X":
        v = Lanes(np.full(LANES, w.ctaid, np.uint64))
    elif src == "SR_LANEID":
        v = Lanes(np.arange(LANES, dtype=np.uint64))
    elif src == "SRZ":
        v = Lanes()
    else:
        v = Lanes(k=np.zeros(LANES, bool))
    w.set(a[0], v, m)
    if ins.op == "CS2R" and "64" in ins.mods:
        w.set(reg_pair(a[0], 1), v, m)


def op_ldc(w, ins, mods, a, m):
    wide = 2 if "64" in mods else 1
    mm = CONST.match(a[1].replace(".reuse", ""))
    bank = int(mm.group(2), 16)
    base, offs = _addr(w, mm.group(3))
    sub = next(((bits, t[0] == "S") for t, bits in (("U8", 8), ("S8", 8), ("U16", 16), ("S16", 16)) if t in mods),
               None)
    if sub is not None:  # a byte / half-word: from its 32-bit word, shifted down, zero- or sign-extended
        bits, signed = sub
        addr = _u(base.v + np.uint64(offs))
        word = w.const(bank, addr & np.uint64(~3 & M32))
        v = (word.v >> ((addr & np.uint64(3)) * np.uint64(8))) & np.uint64((1 << bits) - 1)
        if signed:
            v = np.where(v >= np.uint64(1 << (bits - 1)), v | np.uint64(M32 ^ ((1 << bits) - 1)), v)
        w.set(a[0], Lanes(v, word.k & base.k), m)
        return
    for i in range(wide):
        val = w.const(bank, _u(base.v + np.uint64(offs + 4 * i)))
        val.k &= base.k
        w.set(reg_pair(a[0], i), val, m)


def _addr(w, s):
    """(base lanes, byte offset) of an address: "[R1+0x10]", or a constant operand's inner "R2+0x210"."""
    inner = s.strip("[]")
    base, off = Lanes(), 0
    for term in inner.split("+"):
        term = term.strip()
        if IMM.match(term):
            off += int(term, 0)
        elif term:
            base = w.get(term.replace(".64", ""))
    return base, off


def op_stl(w, ins, mods, a, m):
    base, off = _addr(w, a[0])
    wide = 4 if "128" in mods else (2 if "64" in mods else 1)
    for i in range(wide):
        v = rd(w, reg_pair(a[1], i))
        for lane in np.nonzero(m)[0]:
            if base.k[lane]:
                w.local[lane][int(base.v[lane]) + off + 4 * i] = (int(v.v[lane]), bool(v.k[lane]))


def op_ldl(w, ins, mods, a, m):
    base, off = _addr(w, a[1])
    wide = 4 if "128" in mods else (2 if "64" in mods else 1)
    for i in range(wide):
        vals, known = np.zeros(LANES, np.uint64), np.zeros(LANES, bool)
        for lane in range(LANES):
            if base.k[lane]:
                got = w.local[lane].get(int(base.v[lane]) + off + 4 * i)
                if got:
                    vals[lane], known[lane] = got
        w.set(reg_pair(a[0], i), Lanes(vals, known), m)


def op_plop3(w, ins, mods, a, m):
    x, xk = w.pred(a[2])
    y, yk = w.pred(a[3])
    z, zk = w.pred(a[4])
    lut = int(a[5], 0)
    toint = lambda b: b.astype(np.uint64) * np.uint64(M32)  # noqa: E731
    v = lut3(toint(x), toint(y), toint(z), lut) != 0
    k = xk & yk & zk
    w.set_pred(a[0], v, k, m)
    lut2 = int(a[6], 0) if len(a) > 6 else 0
    w.set_pred(a[1], lut3(toint(x), toint(y), toint(z), lut2) != 0, k, m)


def op_r2ur(w, ins, mods, a, m):
    """R2UR [Pd,] URd, Rs: URd = Rs of the first active lane; Pd (.OR: Pd |=) = lane's Rs differs from it
    (the lanes still to serve in the compiler's loop over distinct values)."""
    args = list(a)
    pout = None
    if is_pred(args[0]):
        pout, args = args[0], args[1:]
    x = rd(w, args[1])
    first = np.nonzero(m)[0]
    if not len(first):
        return
    i = first[0]
    w.set(args[0], Lanes(np.full(LANES, x.v[i], np.uint64), np.full(LANES, x.k[i], bool)), np.ones(LANES, bool))
    if pout:
        diff = x.v != x.v[i]
        k = x.k & x.k[i]
        if "OR" in mods:
            pv, pk = w.pred(pout)
            diff, k = diff | pv, k & pk
        w.set_pred(pout, diff, k, m)


def op_vote(w, ins, mods, a, m):
    pv, pk = w.pred(a[-1])
    ballot = sum(1 << i for i in range(LANES) if m[i] and pv[i])
    d = a[0]
    if is_pred(d):
        w.set_pred(d, np.full(LANES, ballot != 0), np.full(LANES, bool(pk[m].all())), np.ones(LANES, bool))
    else:
        w.set(d, Lanes(np.full(LANES, ballot, np.uint64), np.full(LANES, bool(pk[m].all()))), m)


def op_prmt(w, ins, mods, a, m):
    x, s, y = rd(w, a[1]), rd(w, a[2]), rd(w, a[3])
    out = np.zeros(LANES, np.uint64)
    for i in range(LANES):
        bytes_ = int(x.v[i]).to_bytes(4, "little") + int(y.v[i]).to_bytes(4, "little")
        sel, r = int(s.v[i]), 0
        for j in range(4):
            nib = (sel >> (4 * j)) & 0xF
            b = bytes_[nib & 7]
            if nib & 8:
                b = 0xFF if b & 0x80 else 0
            r |= b << (8 * j)
        out[i] = r
    w.set(a[0], Lanes(out, x.k & s.k & y.k), m)


def op_p2r(w, ins, mods, a, m):
    w.set(a[0], Lanes(k=np.zeros(LANES, bool)), m)


# float ops (values matter only where they reach a branch: gamma == 1, division checks)
def op_fbin(fn):
    def run(w, ins, mods, a, m):
        x, y = rd(w, a[1], True), rd(w, a[2], True)
        with np.errstate(all="ignore"):
            v = fn(_f(x.v), _f(y.v))
        w.set(a[0], Lanes(_from_f(v), x.k & y.k), m)
    return run


def op_ffma(w, ins, mods, a, m):
    x, y, z = rd(w, a[1], True), rd(w, a[2], True), rd(w, a[3], True)
    with np.errstate(all="ignore"):
        v = _f(x.v) * _f(y.v) + _f(z.v)
    w.set(a[0], Lanes(_from_f(v), x.k & y.k & z.k), m)


def op_fsetp(w, ins, mods, a, m):
    x, y = rd(w, a[2], True), rd(w, a[3], True)
    fx, fy = _f(x.v), _f(y.v)
    if "NAN" in mods or "NUM" in mods:
        r = np.isnan(fx) | np.isnan(fy)
        if "NUM" in mods:
            r = ~r
        _combine(w, mods, r, x.k & y.k, a[4], m, a)
        return
    c = _cmp_mode(mods)
    with np.errstate(all="ignore"):
        r = CMP[c](fx, fy)
    if c.endswith("U"):
        r |= np.isnan(fx) | np.isnan(fy)
    _combine(w, mods, r, x.k & y.k, a[4], m, a)


def op_fsel(w, ins, mods, a, m):
    op_sel(w, ins, mods, a, m)


def op_mufu(w, ins, mods, a, m):
    if "RCP64H" in mods or "RSQ64H" in mods:  # high word of the double reciprocal (root) of (src, 0)
        if re.match(r"^-?\|?U?R", a[1]):
            hi = rd(w, a[1])
            d, k = _d(np.zeros(LANES, np.uint64), hi.v), hi.k
        else:
            d, k = _dval(w, a[1])
        with np.errstate(all="ignore"):
            r = 1.0 / d if "RCP64H" in mods else 1.0 / np.sqrt(d)
        w.set(a[0], Lanes(_from_d(r)[1], k), m)
        return
    x = rd(w, a[1], True)
    f = _f(x.v)
    with np.errstate(all="ignore"):
        fn = {"RCP": lambda t: 1 / t, "RSQ": lambda t: 1 / np.sqrt(t), "SQRT": np.sqrt, "EX2": np.exp2,
              "LG2": np.log2, "SIN": np.sin, "COS": np.cos}
        key = next((k for k in fn if k in mods), None)
        if key is None:
            w.set(a[0], Lanes(k=np.zeros(LANES, bool)), m)
            return
        v = fn[key](f.astype(np.float32))
    w.set(a[0], Lanes(_from_f(v), x.k), m)


def op_i2f(w, ins, mods, a, m):
    x = rd(w, a[1])
    if "F64" in mods:
        src = x.v.astype(np.float64) if "U32" in mods else _s(x.v).astype(np.float64)
        lo, hi = _from_d(src)
        w.set(a[0], Lanes(lo, x.k), m)
        w.set(reg_pair(a[0], 1), Lanes(hi, x.k), m)
        return
    src = x.v.astype(np.float64) if "U32" in mods else _s(x.v).astype(np.float64)
    w.set(a[0], Lanes(_from_f(src.astype(np.float32)), x.k), m)


def op_f2i(w, ins, mods, a, m):
    if "F64" in mods:
        lo, hi = rd(w, a[1]), rd(w, reg_pair(a[1], 1))
        f = _d(lo.v, hi.v)
        k = lo.k & hi.k
    else:
        x = rd(w, a[1], True)
        f, k = _f(x.v).astype(np.float64), x.k
    with np.errstate(all="ignore"):
        t = np.trunc(f) if ("TRUNC" in mods or "F64" in mods) else np.floor(f)
        t = np.nan_to_num(t, nan=0.0, posinf=2 ** 31 - 1, neginf=-2 ** 31)
        if "U32" in mods:
            v = np.clip(t, 0, M32).astype(np.int64)
        else:
            v = np.clip(t, -2 ** 31, 2 ** 31 - 1).astype(np.int64)
    w.set(a[0], Lanes(_u(v), k), m)


def _dval(w, x):
    """a double operand: register pair (with - and |.|) or an immediate."""
    if re.match(r"^-?\|?U?R", x):
        core = x.replace(".reuse", "").lstrip("-|").strip("|")
        lo, hi = w.get(core), w.get(reg_pair(core, 1))
        d = _d(lo.v, hi.v)
        if "|" in x:
            d = np.abs(d)
        if x.startswith("-"):
            d = -d
        return d, lo.k & hi.k
    try:
        return np.full(LANES, float(x), np.float64), np.ones(LANES, bool)
    except ValueError:
        return np.zeros(LANES), np.zeros(LANES, bool)


def op_dbin(fn):
    def run(w, ins, mods, a, m):
        vals, k = [], np.ones(LANES, bool)
        for x in a[1:]:
            d, dk = _dval(w, x)
            vals.append(d)
            k &= dk
        with np.errstate(all="ignore"):
            v = fn(*vals)
        lo, hi = _from_d(v)
        w.set(a[0], Lanes(lo, k), m)
        w.set(reg_pair(a[0], 1), Lanes(hi, k), m)
    return run


def op_dsetp(w, ins, mods, a, m):
    (x, xk), (y, yk) = _dval(w, a[2]), _dval(w, a[3])
    if "NAN" in mods:
        r = np.isnan(x) | np.isnan(y)
    elif "MAX" in mods or "MIN" in mods:  # DSETP.MAX / .MIN: P = the first operand is the max (min)
        with np.errstate(all="ignore"):
            r = (x >= y) if "MAX" in mods else (x <= y)
    else:
        c = _cmp_mode(mods)
        with np.errstate(all="ignore"):
            r = CMP[c](x, y)
        if c.endswith("U"):
            r |= np.isnan(x) | np.isnan(y)
    _combine(w, mods, r, xk & yk, a[4], m, a)


def op_f2f(w, ins, mods, a, m):
    """F2F.F32.F64 / F2F.F64.F32 (destination type first); other conversions: unknown."""
    if ins.head.endswith("F32.F64"):
        lo, hi = rd(w, a[1]), rd(w, reg_pair(a[1], 1))
        w.set(a[0], Lanes(_from_f(_d(lo.v, hi.v).astype(np.float32)), lo.k & hi.k), m)
    elif ins.head.endswith("F64.F32"):
        x = rd(w, a[1], True)
        lo, hi = _from_d(_f(x.v).astype(np.float64))
        w.set(a[0], Lanes(lo, x.k), m)
        w.set(reg_pair(a[0], 1), Lanes(hi, x.k), m)
    else:
        w.set(a[0], Lanes(k=np.zeros(LANES, bool)), m)


def op_fchk(w, ins, mods, a, m):  # division slow-path check: normal operands take the fast path
    w.set_pred(a[0], np.zeros(LANES, bool), np.ones(LANES, bool), m)


def op_hfma2(w, ins, mods, a, m):
    """HFMA2 d, -RZ, RZ, hi, lo: the compiler's way to move a 32-bit constant (two halves); else unknown."""
    if len(a) == 5 and a[1].lstrip("-") == "RZ" and a[2] == "RZ":
        try:
            hi, lo = (int(np.float16(float(x)).view(np.uint16)) for x in (a[3], a[4]))
            w.set(a[0], Lanes(np.full(LANES, (hi << 16) | lo, np.uint64)), m)
            return
        except ValueError:
            pass
    w.set(a[0], Lanes(k=np.zeros(LANES, bool)), m)


OPS = {
    "HFMA2": op_hfma2,
    "MOV": op_mov, "IADD3": op_iadd3, "IMAD": op_imad, "LEA": op_lea, "SHF": op_shf, "LOP3": op_lop3,
    "LOP": op_lop, "ISETP": op_isetp, "SEL": op_sel, "IMNMX": op_imnmx, "VIMNMX": op_imnmx, "VIADD": op_viadd,
    "VIADDMNMX": op_viaddmnmx, "IABS": op_iabs, "BREV": op_brev, "FLO": op_flo, "POPC": op_popc,
    "S2R": op_s2r, "CS2R": op_s2r, "S2UR": op_s2r, "LDC": op_ldc, "LDCU": op_ldc, "STL": op_stl, "LDL": op_ldl,
    "PLOP3": op_plop3, "R2UR": op_r2ur, "VOTE": op_vote, "VOTEU": op_vote, "PRMT": op_prmt, "P2R": op_p2r,
    "FADD": op_fbin(np.add), "FMUL": op_fbin(np.multiply), "FMNMX": op_fbin(np.minimum), "FFMA": op_ffma,
    "FSETP": op_fsetp, "FSEL": op_fsel, "MUFU": op_mufu, "I2F": op_i2f, "I2FP": op_i2f, "F2I": op_f2i,
    "DADD": op_dbin(np.add), "DMUL": op_dbin(np.multiply), "DFMA": op_dbin(lambda x, y, z: x * y + z),
    "DSETP": op_dsetp, "F2F": op_f2f, "FCHK": op_fchk, "IMUL": op_imad,
}


def walk_cta(prog: Program, kernel: str, ntid: int, ctaid: int = 0, params: dict | None = None,
             warps: list | None = None) -> Stats:
    """Walk every warp (or the listed ones) of one CTA; the summed Stats."""
    stats = Stats()
    n_warps = (ntid + LANES - 1) // LANES
    params = {**prog.const2.get(kernel, {}), **(params or {})}  # bank 2: the kernel's own jump tables
    for wid in (range(n_warps) if warps is None else warps):
        walk_warp(prog, kernel, wid, ntid, ctaid, params, stats)
    return stats


def main(argv=None):
    from mfm_fast.cli import OneLineParser

    ap = OneLineParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cubin")
    ap.add_argument("kernel", help="mangled kernel name (see --list)")
    ap.add_argument("--threads", type=int, default=128, help="threads per CTA (default 128)")
    ap.add_argument("--ctaid", type=int, default=0)
    ap.add_argument("--param", action="append", default=[], help="OFFSET=VALUE in constant bank 0 (hex ok)")
    args = ap.parse_args(argv)
    prog = Program(args.cubin)
    params = {}
    for p in args.param:
        off, _, val = p.partition("=")
        try:
            params[(0, int(off, 0))] = int(val, 0) & M32
        except ValueError:
            ap.error(f"--param: expected OFFSET=VALUE, got {p!r}")
    if args.kernel not in prog.funcs:
        ap.error(f"kernel: not in the cubin; kernels: {', '.join(prog.kernels())}")
    s = walk_cta(prog, args.kernel, args.threads, args.ctaid, params)
    print(f"warp instructions {s.steps}  unknown forward branches {s.unknown_branches}  by class "
          f"{dict(s.by_class)}")


if __name__ == "__main__":
    sys.exit(main())
