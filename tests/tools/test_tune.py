"""tools/tune_corrupt.py and tools/tune_loss.py without a GPU: the timer they import once a GPU is found.

Both sweeps stop before timing anything on a machine without a GPU, so their GPU-only import of the benchmarks'
timer (bench/timing.py) is checked here on its own: the path each script sets up at import must resolve it."""

import subprocess
import sys

import pytest

from helpers import BENCH_DIR, ROOT

PROBE = ("import runpy, sys; runpy.run_path(sys.argv[1], run_name='probe'); "  # the script's imports, not its main()
         "import timing; print(timing.__file__); print(timing.median_ms.__name__)")


@pytest.mark.parametrize("tool", ["tune_corrupt", "tune_loss"])
def test_tune_scripts_find_the_benchmarks_timer(tool):
    proc = subprocess.run([sys.executable, "-c", PROBE, str(ROOT / "tools" / f"{tool}.py")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[:2] == [str(BENCH_DIR / "timing.py"), "median_ms"], proc.stdout
