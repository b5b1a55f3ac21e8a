"""Smoke tests of bench/fft_mask.py and bench/e2e_step.py: they run on CPU, print their tables, write
their JSON / PNG, report skipped or failing providers and go on, and --check can fail.

No test here asserts a duration (the project's rule): timings are judged from the bench output on a GPU.
"""

import json
import sys

import pytest
from helpers import load_bench as load
TINY = ["--device", "cpu", "--batch", "2", "--size", "16", "--r1", "4", "--reps", "2", "--warmup", "1"]



@pytest.fixture(scope="module")
def bench():
    return load("fft_mask")


def test_bench_runs_checks_and_prints_table(bench, capsys):
    assert bench.main(TINY + ["--check", "--no-json", "--markdown"]) == 0
    out = capsys.readouterr().out
    for name in ("copy", "official", "torch", "reference"):
        assert f" {name} " in out, name
    for title in ("corrupt", "loss fwd", "loss bwd", "loss fwd+bwd", "step", "copy x1.5", "copy x2.5"):
        assert f"{title} " in out, title
    assert "x-floor" in out and "vs official" in out and "vs compile" in out and "peak MiB" in out
    assert "check official      PASS" in out and "check torch         PASS" in out
    assert "FAIL" not in out
    assert "| B | size | pred | work | provider |" in out
    # triton / cuda / torch_compile are either measured or listed as skipped with a reason
    for name in ("triton", "cuda", "torch_compile"):
        assert f"skipped {name}" in out or f" {name} " in out, name


def test_bench_skips_per_work_with_the_backend_reason(bench, monkeypatch, capsys):
    real = bench.mfm_fast.available_backends

    def fake(device_type=None, op=None):
        reasons = real(device_type, op)
        return dict(reasons, torch="no loss here (test)") if op == "masked_freq_loss" else reasons
    monkeypatch.setattr(bench.mfm_fast, "available_backends", fake)
    assert bench.main(TINY + ["--providers", "official,torch", "--no-json"]) == 0
    out = capsys.readouterr().out
    assert "skipped torch (loss fwd, loss bwd, loss fwd+bwd, step): no loss here (test)" in out
    assert "corrupt       torch " in out and "loss fwd+bwd  torch " not in out


def test_bench_writes_json_and_plot(bench, tmp_path, capsys):
    assert bench.main(TINY + ["--work", "corrupt", "loss", "--batch", "1", "2", "--out-dir", str(tmp_path),
                              "--plot"]) == 0
    files = list(tmp_path.glob("fft_mask-cpu-*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    assert {"device", "config", "samples", "torch", "triton", "python", "git_sha", "date", "skipped"} <= set(data)
    assert data["config"]["size"] == [16] and data["config"]["batch"] == [1, 2] and data["all_ok"]
    providers = {rec["provider"] for rec in data["samples"]}
    assert {"copy", "official", "reference", "torch"} <= providers
    for rec in data["samples"]:
        assert rec["work"] in ("corrupt", "loss") and rec["batch"] in (1, 2)
        assert 1 <= len(rec["samples_ms"]) <= 2 and all(t > 0 for t in rec["samples_ms"])
        assert rec["p20_ms"] <= rec["median_ms"] <= rec["p80_ms"]
        assert rec["x_floor"] > 0 and rec["speedup_vs_official"] > 0
    png = files[0].with_suffix(".png")
    pytest.importorskip("matplotlib")
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(files[0]) in capsys.readouterr().out


def test_bench_plot_without_matplotlib_says_so(bench, monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert bench.main(TINY + ["--work", "corrupt", "--providers", "torch", "--out-dir", str(tmp_path), "--plot"]) == 0
    assert "--plot: matplotlib cannot be imported" in capsys.readouterr().out
    assert list(tmp_path.glob("*.json")) and not list(tmp_path.glob("*.png"))


def test_bench_goes_on_when_a_provider_raises(bench, monkeypatch, tmp_path, capsys):
    def broken(x, mask, band=None):
        raise RuntimeError("boom")
    monkeypatch.setitem(bench.PROVIDERS["official"], "corrupt", broken)
    assert bench.main(TINY + ["--out-dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "official corrupt: raised RuntimeError: boom" in out
    assert "corrupt       torch " in out and "step          official " not in out
    assert "loss fwd+bwd  official " in out  # its loss still runs
    assert json.loads(next(tmp_path.glob("*.json")).read_text())["all_ok"] is False


def test_bench_check_fails_on_wrong_corrupt(bench, monkeypatch, capsys):
    right = bench.PROVIDERS["torch"]["corrupt"]
    monkeypatch.setitem(bench.PROVIDERS["torch"], "corrupt", lambda x, mask, band=None: right(x, mask, band) + 1)
    assert bench.main(TINY + ["--check", "--no-json"]) != 0
    out = capsys.readouterr().out
    assert "check torch         FAIL" in out
    assert "check official      PASS" in out
    assert "torch corrupt: not timed (failed --check)" in out and "torch step: not timed (failed --check)" in out
    assert "loss fwd+bwd  torch " in out  # its loss passed and is timed


def test_bench_check_fails_on_wrong_loss_grad(bench, monkeypatch, capsys):
    right = bench.PROVIDERS["torch"]["loss"]
    monkeypatch.setitem(bench.PROVIDERS["torch"], "loss", lambda pred, x, mask, band=None: right(pred, x, mask, band) * 1.01)
    assert bench.main(TINY + ["--work", "loss", "--check", "--no-json"]) != 0
    assert "check torch         FAIL" in capsys.readouterr().out


def test_bench_passes_the_mask_band_promise(bench, monkeypatch):
    if not bench.HAS_MASK_BAND:
        pytest.skip("this mfm_fast.corrupt has no mask_band")
    seen = []
    real = bench.mfm_fast.corrupt
    monkeypatch.setattr(bench.mfm_fast, "corrupt", lambda *a, **kw: seen.append(kw.get("mask_band")) or real(*a, **kw))
    assert bench.main(TINY + ["--work", "corrupt", "--providers", "torch", "--no-json"]) == 0
    assert seen and set(seen) == {bench.disc_band(16, 16, 4, 999)} == {4}


def test_bench_torch_compile_provider_passes_check(bench, capsys):
    assert bench.main(TINY + ["--providers", "torch_compile", "--work", "corrupt", "loss", "--check", "--no-json"]) == 0
    out = capsys.readouterr().out
    assert "check torch_compile PASS" in out and "corrupt       torch_compile " in out


@pytest.mark.slow
def test_e2e_step_runs_on_cpu_with_tiny_models(tmp_path, capsys):
    e2e = load("e2e_step")
    args = ["--device", "cpu", "--batch", "2", "--steps", "1", "--rounds", "3", "--warmup", "0", "--out-dir",
            str(tmp_path)]
    assert e2e.main(args) == 0
    out = capsys.readouterr().out
    for model in ("test_vit", "test_resnet"):
        assert f"{model} " in out
    assert "ms/step" in out and "MFM share" in out
    data = json.loads(next(tmp_path.glob("e2e_step-cpu-*.json")).read_text())
    assert {(r["model"], r["pipeline"]) for r in data["samples"]} == {
        (m, p) for m in ("test_vit", "test_resnet") for p in ("official", "mfm_fast")}
    for rec in data["samples"]:
        assert rec["median_ms"] > 0 and rec["images_per_s"] > 0 and 0 < rec["mfm_ms"]
    assert data["samples"][1]["backends"]["corrupt"] in ("torch", "triton", "cuda")
    assert data["config"]["rounds"] == 3 and data["timer"]
    by = {(r["model"], r["pipeline"]): r for r in data["samples"]}
    for model in ("test_vit", "test_resnet"):  # the speed-up pairs round r of official with round r of mfm_fast
        off, mfm = by[model, "official"], by[model, "mfm_fast"]
        ratios = [o / m for o, m in zip(off["round_median_ms"], mfm["round_median_ms"])]
        assert len(ratios) == 3 and mfm["speedup_rounds"] == pytest.approx(ratios)
        assert mfm["speedup_vs_official"] == pytest.approx(sorted(ratios)[1])
        assert mfm["speedup_min"] == min(ratios) and mfm["speedup_max"] == max(ratios)


def test_folk_ops_bench_checks_and_prints_every_work(capsys, tmp_path):
    folk = load("folk_ops")
    assert folk.main(["--device", "cpu", "--batch", "2", "--size", "16", "--reps", "2", "--warmup", "1", "--check",
                      "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for work in ("masks", "folk_corrupt", "mp_loss", "loss"):
        for provider in ("copy", "reference", "torch"):
            assert any(line.split()[:2] == [work, provider] for line in out.splitlines()), (work, provider)
    checks = {line.split(":")[0].strip(): float(line.split(":")[1]) for line in out.splitlines()
              if line.strip().startswith("check ")}
    assert checks["check masks (fraction differing)"] < 0.01 and checks["check mp_loss grad"] < 1e-4
    payload = json.loads(next(tmp_path.glob("folk_ops-*.json")).read_text())
    assert {r["work"] for r in payload["samples"]} == {"masks", "folk_corrupt", "mp_loss", "loss"}
    assert folk.main(["--device", "cpu", "--providers", "numpy"]) == 2



def test_timing_summary_and_the_cpu_timer():
    """bench/timing.py: median / p20 / p80 by linear interpolation; the CPU timer returns at most `reps`
    positive samples; interleaved rounds rotate who goes first."""
    timing = load("timing")
    assert timing.summary([5.0, 1.0, 3.0, 2.0, 4.0]) == pytest.approx((3.0, 1.8, 4.2))  # ranks 2, 0.8, 3.2
    assert timing.summary([7.0]) == (7.0, 7.0, 7.0)
    assert timing._run_ms(2.0, reps=50, budget_s=0.004) == pytest.approx(6.0)  # 2 calls in budget: 3
    assert timing._run_ms(2.0, reps=50, budget_s=0.01) == pytest.approx(10.0)  # 5 calls fit the budget
    assert timing._run_ms(2.0, reps=10, budget_s=1.0) == pytest.approx(20.0)
    calls = []
    samples = timing.time_ms(lambda: calls.append(1), "cpu", reps=4, warmup=2)
    assert 1 <= len(samples) <= 4 and all(t > 0 for t in samples) and len(calls) >= 2 + len(samples)
    order = []
    rounds = timing.interleaved({n: (lambda n=n: order.append(n)) for n in "abc"}, "cpu", rounds=3, reps=2)
    assert set(rounds) == set("abc") and all(len(r) == 3 and all(r) for r in rounds.values())
    firsts = [order[0]] + [b for a, b in zip(order, order[1:]) if a != b]  # who ran, run after run
    assert firsts == list("abc" "bca" "cab")


def test_timing_cuda_path_sizes_do_bench_from_a_first_call(monkeypatch):
    """time_ms on CUDA: one do_bench call of one timed rep sizes the run (warm-up and rep in ms, as do_bench
    takes them), then do_bench(return_mode="all") with its L2 clear; at most `reps` samples come back."""
    triton_testing = pytest.importorskip("triton.testing")
    timing = load("timing")
    calls = []

    def fake_do_bench(fn, warmup=25, rep=100, grad_to_none=None, quantiles=None, return_mode="mean"):
        calls.append(dict(warmup=warmup, rep=rep, return_mode=return_mode))
        return 2.0 if return_mode == "min" else [2.0] * 9
    monkeypatch.setattr(triton_testing, "do_bench", fake_do_bench)
    assert timing.time_ms(lambda: None, "cuda", reps=4, warmup=5, budget_s=1.0) == [2.0] * 4
    assert calls == [dict(warmup=0, rep=0, return_mode="min"), dict(warmup=10.0, rep=8.0, return_mode="all")]
    calls.clear()
    timing.time_ms(lambda: None, "cuda", reps=50, warmup=0, budget_s=0.01)  # 5 calls of 2 ms fit 10 ms
    assert calls[1]["rep"] == pytest.approx(10.0)
