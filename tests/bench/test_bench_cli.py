"""The bench scripts' inputs and output: a provider / backend that cannot run on the device, a bad cache path,
third-party warnings kept out of the results table, and what the fft_mask plot shows.

No test here asserts a duration (the project's rule).
"""

import json
import os
import subprocess
import sys
import warnings

import pytest

import mfm_fast
from helpers import BENCH_DIR, load_bench

TINY = ["--device", "cpu", "--batch", "2", "--size", "16", "--r1", "4", "--reps", "2", "--warmup", "1"]


def one_line_error(call, capsys, prog, flag):
    """call() exits with status 2 and prints one line 'prog: error: flag: ...'; returns that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        call()
    captured = capsys.readouterr()
    assert exc.value.code == 2, captured
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: {flag}: "), captured.err
    return lines[0]


def cpu_reason(backend):
    why = mfm_fast.available_backends("cpu", "corrupt")[backend]
    if why is None:
        pytest.skip(f"the {backend} backend runs on CPU tensors here")
    return why


@pytest.mark.parametrize("providers", ["cuda", "torch,cuda"])
def test_fft_mask_provider_that_cannot_run_on_the_device_is_an_error(capsys, providers):
    why = cpu_reason("cuda")
    bench = load_bench("fft_mask")
    line = one_line_error(lambda: bench.main(TINY + ["--providers", providers]), capsys, "fft_mask.py", "--providers")
    assert "cuda" in line and why in line


def test_e2e_step_backend_that_cannot_run_on_the_device_is_an_error(capsys):
    why = cpu_reason("cuda")
    e2e = load_bench("e2e_step")
    line = one_line_error(lambda: e2e.main(["--device", "cpu", "--backend", "cuda"]), capsys, "e2e_step.py",
                          "--backend")
    assert why in line



def test_cpu_run_writes_nothing_to_stderr(tmp_path):
    """torch.utils.benchmark's import of torch.utils.cpp_extension logs "No CUDA runtime is found" when a
    CUDA_HOME exists without a usable GPU: that line used to land in the middle of the table."""
    env = dict(os.environ, CUDA_HOME=str(tmp_path), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(BENCH_DIR / "fft_mask.py")] + TINY +
                          ["--work", "corrupt", "--providers", "torch", "--no-json"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert " torch " in proc.stdout and proc.stderr == ""


def test_fft_mask_prints_provider_warnings_after_the_table(monkeypatch, capsys):
    bench = load_bench("fft_mask")
    right = bench.PROVIDERS["torch"]["corrupt"]

    def warns(x, mask, band=None):
        warnings.warn("a provider's warning (test)", UserWarning)
        return right(x, mask, band)
    monkeypatch.setitem(bench.PROVIDERS["torch"], "corrupt", warns)
    assert bench.main(TINY + ["--work", "corrupt", "--providers", "torch", "--no-json"]) == 0
    captured = capsys.readouterr()
    assert "a provider's warning (test)" not in captured.err
    lines = captured.out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("work "))
    note = next(i for i, line in enumerate(lines) if "a provider's warning (test)" in line)
    rows = [i for i, line in enumerate(lines) if line.startswith("corrupt ")]
    assert rows and header < min(rows) and max(rows) < note


def test_fft_mask_plot_labels_units_shape_providers_and_x_floor(monkeypatch, tmp_path):
    figure = pytest.importorskip("matplotlib.figure")
    figures = []
    savefig = figure.Figure.savefig
    monkeypatch.setattr(figure.Figure, "savefig",
                        lambda fig, *a, **kw: figures.append(fig) or savefig(fig, *a, **kw))
    bench = load_bench("fft_mask")
    assert bench.main(TINY + ["--batch", "1", "2", "--work", "corrupt", "loss", "--providers", "official,torch",
                              "--plot", "--out-dir", str(tmp_path)]) == 0
    (json_path,) = tmp_path.glob("fft_mask-cpu-*.json")
    assert json_path.with_suffix(".png").exists()
    records = json.loads(json_path.read_text())["samples"]
    (fig,) = figures
    title = fig._suptitle.get_text()
    assert "cpu" in title and "3x16" in title and "fp32" in title
    caption = " ".join(t.get_text() for t in fig.texts)
    assert "official" in caption and "released MFM code" in caption and "x-floor" in caption
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert len(panels) == 2
    for ax in panels:
        assert "ms" in ax.get_ylabel() and "batch" in ax.get_xlabel()
        assert "3x16x16" in ax.get_title() and "fp32" in ax.get_title()
        work = "loss" if "loss" in ax.get_title() else "corrupt"
        ratios = sorted(r["x_floor"] for r in records if r["work"] == work and r["provider"] != "copy")
        labels = sorted(float(t.get_text().rstrip("x")) for t in ax.texts)
        assert len(labels) == len(ratios) == 4
        assert labels == pytest.approx(ratios, rel=0.01)
