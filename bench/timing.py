"""The one timer of the benchmarks: triton.testing.do_bench on CUDA, torch.utils.benchmark.Timer on CPU.

    samples = time_ms(fn, device, reps=50, warmup=5, budget_s=0.5)      # ms per call of fn()
    med, p20, p80 = summary(samples)
    ms = median_ms(fn)                                                   # a sweep's one figure (CUDA)
    rounds = interleaved({"a": fa, "b": fb}, device, rounds=5, reps=20)  # {name: [samples of each round]}

CUDA: do_bench(fn, return_mode="all") times every call between CUDA events and clears the L2 cache
(a write of a buffer bigger than L2) before each one. CPU: Timer.blocked_autorange runs fn() in blocks
long enough that the timer's own overhead is under 1e-4 of a block; a sample is one block's time / its
calls (one call per block for anything slower than about 10 ms).
The run is sized from one first timed call: about `reps` calls, fewer (at least 3) when they would take
over `budget_s`; on CPU at least CPU_MIN_RUN_S (budget permitting), so a fast fn runs one or a few
blocks of many calls. At most `reps` samples come back. `warmup` untimed calls run first (the timers
run a few of their own).
"""

from __future__ import annotations

import logging
import math

import torch


# Timer sizes a block so that its own overhead is under 1e-4 of it (>= ~10 ms for a fast fn), or longer
# than the run asked for: a CPU run lasts at least this long, so a fast fn is timed over many calls.
CPU_MIN_RUN_S = 0.05


def _kind(device) -> str:
    return device if isinstance(device, str) else device.type


def _run_ms(first_ms: float, reps: int, budget_s: float) -> float:
    """Timed run length for about `reps` calls of first_ms each, fewer (at least 3) past budget_s."""
    first_ms = max(first_ms, 1e-6)
    return first_ms * min(reps, max(3, budget_s * 1e3 / first_ms))


def _cuda_ms(fn, reps, warmup, budget_s):
    from triton.testing import do_bench

    first = do_bench(fn, warmup=0, rep=0, return_mode="min")
    return do_bench(fn, warmup=warmup * first, rep=_run_ms(first, reps, budget_s), return_mode="all")[:reps]


def _cpu_timer():
    """torch.utils.benchmark.Timer, imported with torch.utils.cpp_extension's logger (which it imports) held
    at ERROR: on a machine without a CUDA runtime that import logs "No CUDA runtime is found, using
    CUDA_HOME=..." once, into the middle of a results table; the Python timer used here needs no CUDA."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils.benchmark import Timer
    finally:
        logger.setLevel(level)
    return Timer


def _cpu_ms(fn, reps, warmup, budget_s):
    Timer = _cpu_timer()
    for _ in range(warmup):
        fn()
    timer = Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    first = timer.blocked_autorange(min_run_time=0).median * 1e3  # one block of one call
    run_s = min(budget_s, max(_run_ms(first, reps, budget_s) / 1e3, CPU_MIN_RUN_S))
    measured = timer.blocked_autorange(min_run_time=run_s)
    return [t * 1e3 for t in measured.times][:reps]


def time_ms(fn, device, reps: int, warmup: int = 0, budget_s: float = math.inf) -> list[float]:
    """Milliseconds per call of fn() on `device` (a torch.device or its type): at most `reps` samples."""
    return (_cuda_ms if _kind(device) == "cuda" else _cpu_ms)(fn, reps, warmup, budget_s)


def median_ms(fn, device="cuda", reps: int = 100, warmup: int = 10, budget_s: float = 0.1) -> float:
    """The median of time_ms(fn, ...): one figure per configuration, for the tuning sweeps (on a GPU)."""
    return summary(time_ms(fn, device, reps, warmup, budget_s))[0]


def summary(samples) -> tuple[float, float, float]:
    """(median, p20, p80) of the samples (linear interpolation between the closest ranks)."""
    q = torch.quantile(torch.tensor(samples, dtype=torch.float64), torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
    return tuple(q.tolist())


def interleaved(fns: dict, device, rounds: int, reps: int, warmup: int = 0, budget_s: float = math.inf) -> dict:
    """{name: [[ms samples] of each round]}: every round times each fn in turn (time_ms), the first to go
    rotating from round to round, so a drift of the machine (clocks, other load) reaches all of them
    and round r of one fn pairs with round r of another."""
    names, per_round = list(fns), {name: [] for name in fns}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            per_round[name].append(time_ms(fns[name], device, reps, warmup if r == 0 else 0, budget_s))
    return per_round


def timer_name(device) -> str:
    """What time_ms uses on `device`, for the bench headers and JSON."""
    return ("triton.testing.do_bench (CUDA events, L2 cleared per call)" if _kind(device) == "cuda"
            else "torch.utils.benchmark.Timer.blocked_autorange")
