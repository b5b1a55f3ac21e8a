"""Command-line plumbing shared by the package's CLIs and the bench scripts."""

import argparse
import math
from pathlib import Path


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line "prog: error: --flag: what is wrong" (exit status 2), no usage dump."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def check_bench_args(p, args, ints=None, positive=(), out_dirs=()):
    """Bad values stop at parse time as one line "prog: error: --flag: ..." (exit status 2).

    ints: {dest: smallest allowed} for int options (lists checked per value); positive: float options that must
    be finite and > 0; out_dirs: options naming a folder (it may not exist yet, but must not be a file)."""
    try:
        check_ranges(args, ints)
    except ArgError as exc:
        p.error(str(exc))
    for name in positive:
        v = getattr(args, name)
        if v is not None and not (math.isfinite(v) and v > 0):
            p.error(f"--{name.replace('_', '-')}: must be a finite value > 0, got {v}")
    for name in out_dirs:
        v = getattr(args, name)
        if v is not None and Path(v).exists() and not Path(v).is_dir():
            p.error(f"--{name.replace('_', '-')}: {v!r} is a file (expected a folder)")


def check_ranges(args, least=None, nonneg=()) -> None:
    """ArgError "--flag: must be >= low, got x" for an option below its least value (least: {dest: low}; None:
    unset; a list: each value), and "--flag: must be a finite value >= 0, got x" for a `nonneg` option that is
    negative, infinite or NaN."""
    for name, low in (least or {}).items():
        v = getattr(args, name)
        for x in (v if isinstance(v, list) else [v]):
            if x is not None and x < low:
                raise ArgError(f"{flag_of(name)}: must be >= {low}, got {x}")
    for name in nonneg:
        v = getattr(args, name)
        if v is not None and not (math.isfinite(v) and v >= 0):
            raise ArgError(f"{flag_of(name)}: must be a finite value >= 0, got {v}")


def check_sizes(p, sizes, flag="--size"):
    for s in sizes or ():
        if s < 2 or s % 2:
            p.error(f"{flag}: image sides must be even and >= 2, got {s}")


def library_check(p, flag, fn, *a, **kw):
    """Run an mfm_fast validator; its ValueError / TypeError ("name: what is wrong") becomes "flag: what is wrong"."""
    try:
        return fn(*a, **kw)
    except (ValueError, TypeError) as exc:
        msg = str(exc)
        p.error(f"{flag}: {msg.split(': ', 1)[1] if ': ' in msg else msg}")


def check_r1(p, r1, sizes, flag="--r1"):
    """--r1: a disc radius the library accepts (masks.check_rings) that fits an S x S grid for every S in `sizes`
    (masks.check_rings_on_grid); p.error "flag: what is wrong" otherwise."""
    from .masks import check_rings, check_rings_on_grid
    rings = library_check(p, flag, check_rings, r1, 999, None)
    for s in sizes:
        library_check(p, flag, check_rings_on_grid, rings, s, s)


class ArgError(ValueError):
    """A bad command-line value; the message starts with the flag ("--img-size: must be even, got 33")."""


def flag_of(name: str) -> str:
    """The command-line flag of an argparse destination: warmup_steps -> --warmup-steps."""
    return "--" + name.replace("_", "-")
