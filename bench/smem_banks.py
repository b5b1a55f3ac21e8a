"""Shared-memory bank-conflict model of the CUDA extension's plane pipeline (csrc/fft.cuh).

A model, not a measurement: it re-states the index maps of each phase of `plane_pipeline` (which thread
touches which complex element of the plane buffer) and counts, for every 64-bit access of every half
warp (16 consecutive threads; 32 banks of 4 bytes hold 16 complex values), the wavefronts that shared
memory needs: the most distinct elements that fall on one bank pair. 1.0 is conflict-free. The figures
say where the passes lose shared-memory bandwidth; Nsight Compute's l1tex__data_bank_conflicts counters
on a GPU are the real thing.

    python bench/smem_banks.py            # 224 and 112, the mappings in csrc/fft.cuh now
    python bench/smem_banks.py --compare  # also the mappings they replaced
"""

import argparse
import os
from collections import Counter


def freq_pos(k, n):
    r = 7 if n % 7 == 0 else 1
    m = n // r
    bits = m.bit_length() - 1
    q = k // r
    return m * (k % r) + int(format(q, f"0{bits}b")[::-1], 2) if bits else m * (k % r)


def radix2_schedule(n):
    """(inverse, K, h_low) of each fused radix-2 pass, as radix2_passes in fft.cuh."""
    m = n // (7 if n % 7 == 0 else 1)
    log2m = m.bit_length() - 1
    out = []
    for inverse in (False, True):
        done = 0
        while done < log2m:
            k = min(3, log2m - done)
            out.append((inverse, k, (1 << done) if inverse else (m >> (done + k))))
            done += k
    return out


def wavefronts(items, slots, index):
    """Mean wavefronts per half-warp access: index(item, slot) -> complex element, or None (no access)."""
    total = count = 0
    for first in range(0, items, 16):
        for slot in range(slots):
            idx = {index(i, slot) for i in range(first, min(first + 16, items))} - {None}
            if idx:
                total += max(Counter(i % 16 for i in idx).values())
                count += 1
    return total / count


def phases(s, threads, old):
    """(phase, mean data wavefronts, plane passes its data is worth, mean twiddle wavefronts or None, plane
    passes its twiddle reads are worth) for one s x s plane. A plane pass = every element read and written
    once; twiddle reads count at their number relative to that (radix-2 with K stages: K / 4 of a pass)."""
    wh, pairs = s // 2 + 1, s // 2
    r = 7 if s % 7 == 0 else 1
    m = s // r
    shapes = {"rows": (pairs, 2 * wh, 1), "cols": (wh, 1, wh)}  # lines, line stride, element stride
    out = [("load", wavefronts(pairs * s, 1, lambda i, _: 2 * (i // s) * wh + i % s), 1.0, None, 0.0)]
    tw0 = s * wh  # the twiddles follow the half spectrum in shared memory
    for name, (lines, ls, st) in shapes.items():
        if r > 1:
            def where7(i):  # (line, j) of radix-7 item i: j fastest. Line-fastest columns would make the
                return i // m, i % m  # tw[j q] reads broadcasts (1.83 -> 1.0) but spilled the 112 loss kernel

            def idx7(i, q, ls=ls, st=st):
                line, j = where7(i)
                return line * ls + (j + m * q) * st

            def tw7(i, q):  # forward: out[q] *= tw[j q], q = 1..6 (inverse: the same loads)
                return tw0 + where7(i)[1] * (q + 1)
            out.append((f"{name} radix-7 (fwd and inv)", wavefronts(lines * m, r, idx7), 2.0,
                        wavefronts(lines * m, r - 1, tw7), 2.0 * (r - 1) / (2 * r)))
        for inverse, k, h in radix2_schedule(s):
            t_count, per_line = 1 << k, s >> k

            def where2(i, lines=lines, ls=ls, h=h, per_line=per_line):  # (line, b) of radix-2 item i
                if old:
                    return i // per_line, i % per_line
                if ls % 2 == 0 and h >= 2:  # row pairs: b's low bit fastest, then the line
                    return (i >> 1) % lines, ((i >> 1) // lines) * 2 + (i & 1)
                return i % lines, i // lines

            def idx2(i, t, ls=ls, st=st, h=h, t_count=t_count, where2=where2):
                line, b = where2(i)
                return line * ls + ((b // h) * (t_count * h) + b % h + t * h) * st

            def tw2(i, slot, k=k, h=h, t_count=t_count, inverse=inverse, where2=where2):
                # stage s of the K (slot // (T/2)), butterfly t (the slot-th t with t & d == 0), as fft.cuh
                stage, which = divmod(slot, t_count // 2)
                d = (1 << stage) if inverse else (t_count >> (stage + 1))
                t = [u for u in range(t_count) if not u & d][which]
                span = d * h
                j = where2(i)[1] % h
                return tw0 + ((j + t * h) % (2 * span)) * (s // (2 * span))
            out.append((f"{name} radix-2 {'inv' if inverse else 'fwd'} K={k} h={h}",
                        wavefronts(lines * per_line, t_count, idx2), 1.0,
                        wavefronts(lines * per_line, k * t_count // 2, tw2), k / 4))
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
    out.append(("spectral", wavefronts(s * wh, 1, lambda i, _: i), 1.0, None, 0.0))
    out.append(("store", out[0][1], 1.0, None, 0.0))
    return out


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line "prog: error: --flag: what is wrong" (exit status 2), no usage dump."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv=None):
    ap = OneLineParser(prog=os.path.basename(__file__), description=__doc__.splitlines()[0])
    ap.add_argument("--compare", action="store_true", help="also show the mappings fft.cuh used before")
    args = ap.parse_args(argv)
    for s, threads in ((224, 512), (112, 256)):
        rows = phases(s, threads, old=False)
        before = phases(s, threads, old=True) if args.compare else None
        print(f"\n{s} x {s}, {threads} threads: mean wavefronts per half-warp 64-bit access (1.0 = no conflict)")
        print(f"  {'phase':32s} {'data':>5s} {'twiddles':>9s}")
        for i, (name, w, _, tw, _) in enumerate(rows):
            text = f"  {name:32s} {w:5.2f} {tw:9.2f}" if tw is not None else f"  {name:32s} {w:5.2f} {'':9s}"
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
