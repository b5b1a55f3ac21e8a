"""Shared-memory bank-conflict model of the CUDA extension's plane pipeline (csrc/fft.cuh).

A model, not a measurement: it re-states the index maps of each phase of `plane_pipeline` (which thread
touches which complex element of the plane buffer) and counts, for every 64-bit access of every half
warp (16 consecutive threads; 32 banks of 4 bytes hold 16 complex values) and every 128-bit access of
every quarter warp, the wavefronts that shared memory needs: the most distinct 4-byte words that fall on
one bank. 1.0 is conflict-free. The figures
say where the passes lose shared-memory bandwidth; Nsight Compute's l1tex__data_bank_conflicts counters
on a GPU are the real thing.

    python tools/smem_banks.py            # 224 and 112, the mappings in csrc/fft.cuh
    python tools/smem_banks.py --compare  # also the k-fastest per_pair_entry mapping the pair groups replaced
"""

import os
import sys
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # runs from a checkout too
from mfm_fast.cli import OneLineParser  # noqa: E402


def freq_pos(k, n):
    r = 7 if n % 7 == 0 else 1
    m = n // r
    bits = m.bit_length() - 1
    q = k // r
    return m * (k % r) + int(format(q, f"0{bits}b")[::-1], 2) if bits else m * (k % r)


def wavefronts(items, slots, index, width=1):
    """Mean wavefronts per access: index(item, slot) -> first complex element, or None (no access); width 1:
    64-bit accesses, served per half warp (16 threads); width 2: 128-bit accesses (two neighbouring complex),
    served per quarter warp (8 threads). Wavefronts = the most distinct 4-byte words on one of the 32 banks."""
    group = 16 if width == 1 else 8
    total = count = 0
    for first in range(0, items, group):
        for slot in range(slots):
            starts = {index(i, slot) for i in range(first, min(first + group, items))} - {None}
            if starts:
                words = {2 * e + w for e in starts for w in range(2 * width)}
                total += max(Counter(w % 32 for w in words).values())
                count += 1
    return total / count


def phases(s, threads, old):
    """(phase, mean data wavefronts, plane passes its data is worth, mean twiddle wavefronts or None, plane
    passes its twiddle reads are worth) for one s x s plane. A plane pass = every element read and written
    once. Items are line fastest (for_items in fft.cuh: item = line + lines * b). old: the per_pair_entry
    mapping the pair groups replaced (k fastest), for --compare."""
    wh, pairs = s // 2 + 1, s // 2
    m = s // 7
    tw0 = s * wh  # the radix-7 twiddles tw[q - 1][j] follow the half spectrum in shared memory
    out = []

    def io(i, half):  # load / store item (chunk of 4 columns, row pair), chunks fastest: two 16-byte halves
        return 2 * (i // (s // 4)) * wh + 4 * (i % (s // 4)) + 2 * half
    out.append(("load", wavefronts(pairs * s // 4, 2, io, 2), 1.0, None, 0.0))

    def r7row(i, q):  # rows: pair line l at 2 l wh, unit stride; radix-7 item (l, b) takes j = 2b, 2b + 1
        return 2 * (i % pairs) * wh + 2 * (i // pairs) + m * q

    def r7row_tw(i, q):
        return tw0 + q * m + 2 * (i // pairs)
    out.append(("rows radix-7 (fwd and inv)", wavefronts(pairs * m // 2, 7, r7row, 2), 2.0,
                wavefronts(pairs * m // 2, 6, r7row_tw, 2), 2.0 * 6 / 14))

    def rmrow(i, t):  # M-point item (l, block): M neighbours in registers, 16 bytes at a time
        return 2 * (i % pairs) * wh + (i // pairs) * m + 2 * t
    out.append((f"rows {m}-point (fwd and inv)", wavefronts(pairs * 7, m // 2, rmrow, 2), 2.0, None, 0.0))

    def r7col(i, q):  # columns: line kx at kx, stride wh, 64-bit accesses
        return (i % wh) + ((i // wh) + m * q) * wh

    def r7col_tw(i, q):
        return tw0 + q * m + i // wh
    out.append(("cols radix-7 (fwd and inv)", wavefronts(wh * m, 7, r7col), 2.0,
                wavefronts(wh * m, 6, r7col_tw), 2.0 * 6 / 14))

    def rmcol(i, t):
        return (i % wh) + ((i // wh) * m + t) * wh
    out.append((f"cols {m}-point + spectral + inverse", wavefronts(wh * 7, m, rmcol), 1.0, None, 0.0))
    cap, group = 6, 8  # CtaSched::kEntryCap, kPairGroup
    per_round = group * max(1, threads * cap // (group * wh)) if not old else threads * 8 // wh

    def entries(fn):  # per_pair_entry: round by round, entry e = tid + j * nth
        total = count = 0.0
        for p0 in range(0, pairs, per_round):
            n_p = min(pairs - p0, per_round)
            n_e = n_p * wh
            for j in range(8 if old else cap):
                es = [tid + j * threads for tid in range(threads) if tid + j * threads < n_e]
                if es:  # entry e -> (pair, k): k fastest before, 8 pairs fastest now
                    where = ((lambda e: (p0 + e // wh, e % wh)) if old else
                             (lambda e: (p0 + group * (e // (group * wh)) + e % group, (e // group) % wh)))
                    w = wavefronts(len(es), 2, lambda i, slot: fn(*where(es[i]), slot))
                    total += w * len(es)
                    count += len(es)
        return total / count
    out.append(("unpack gather", entries(lambda p, k, slot: 2 * p * wh + freq_pos(k if slot == 0 else (s - k) % s, s)),
                0.5, None, 0.0))
    out.append(("unpack scatter", entries(lambda p, k, slot: 2 * p * wh + slot * wh + k), 0.5, None, 0.0))
    out.append(("pack gather", entries(lambda p, k, slot: 2 * p * wh + slot * wh + k), 0.5, None, 0.0))
    out.append(("pack scatter", entries(lambda p, k, slot: 2 * p * wh + freq_pos(k, s) if slot == 0 else
                                         (2 * p * wh + freq_pos(s - k, s) if 0 < k < s // 2 else None)), 0.5, None, 0.0))
    out.append(("store", out[0][1], 1.0, None, 0.0))
    return out



def main(argv=None):
    ap = OneLineParser(prog=os.path.basename(__file__), description=__doc__.splitlines()[0])
    ap.add_argument("--compare", action="store_true", help="also show the per_pair_entry mapping fft.cuh used before")
    args = ap.parse_args(argv)
    for s, threads in ((224, 512), (112, 256)):
        rows = phases(s, threads, old=False)
        before = phases(s, threads, old=True) if args.compare else None
        print(f"\n{s} x {s}, {threads} threads: mean wavefronts per shared-memory access (1.0 = no conflict)")
        print(f"  {'phase':36s} {'data':>5s} {'twiddles':>9s}")
        for i, (name, w, _, tw, _) in enumerate(rows):
            text = f"  {name:36s} {w:5.2f} {tw:9.2f}" if tw is not None else f"  {name:36s} {w:5.2f} {'':9s}"
            if before and (abs(before[i][1] - w) > 1e-9 or (tw is not None and abs(before[i][3] - tw) > 1e-9)):
                text += f"   (before: {before[i][1]:.2f}" + (f" / {before[i][3]:.2f})" if tw is not None else ")")
            print(text)
        def cost(rs):
            return sum(w * p + (tw or 0.0) * tp for _, w, p, tw, tp in rs)
        ideal = sum(p + tp for _, _, p, _, tp in rows)
        line = f"  all phases, in plane passes (data and twiddles): {cost(rows):.1f}, conflict-free {ideal:.1f}"
        if before:
            line += f"; before: {cost(before):.1f}"
        print(line)


if __name__ == "__main__":
    main()
