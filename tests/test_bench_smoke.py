"""Smoke tests of bench/fft_mask.py: it runs, prints its table, writes its JSON, and --check can fail.

No test here asserts a duration (GUIDE.md §4): timings are judged from the bench output on a GPU.
"""

import importlib.util
import json
from pathlib import Path

import pytest

BENCH_PATH = Path(__file__).resolve().parents[1] / "bench" / "fft_mask.py"
TINY = ["--device", "cpu", "--batch", "2", "--size", "16", "--r1", "4", "--reps", "2", "--warmup", "1"]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_fft_mask", BENCH_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_runs_checks_and_prints_table(bench, capsys):
    assert bench.main(TINY + ["--check", "--no-json"]) == 0
    out = capsys.readouterr().out
    for name in ("copy", "official", "torch", "reference"):
        assert f" {name} " in out, name
    assert "x-floor" in out and "vs official" in out
    assert "corrupt" in out and "loss fwd+bwd" in out
    assert "check official   PASS" in out and "check torch      PASS" in out
    assert "FAIL" not in out
    # triton / cuda are either measured or listed as skipped with the reason from available_backends
    reasons = bench.mfm_fast.available_backends("cpu")
    for name in ("triton", "cuda"):
        if reasons[name] is not None:
            assert f"skipped {name}: {reasons[name]}" in out


def test_bench_writes_json(bench, tmp_path, capsys):
    assert bench.main(TINY + ["--work", "corrupt", "--out-dir", str(tmp_path)]) == 0
    files = list(tmp_path.glob("fft_mask-cpu-*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    assert {"device", "config", "samples", "torch", "python", "git_sha"} <= set(data)
    assert data["config"]["size"] == 16 and data["config"]["batch"] == [2]
    providers = {rec["provider"] for rec in data["samples"]}
    assert {"copy", "official", "reference", "torch"} <= providers
    for rec in data["samples"]:
        assert rec["work"] == "corrupt"
        assert 1 <= len(rec["samples_ms"]) <= 2 and all(t > 0 for t in rec["samples_ms"])
        assert rec["p20_ms"] <= rec["median_ms"] <= rec["p80_ms"]
    assert str(files[0]) in capsys.readouterr().out


def test_bench_check_fails_on_wrong_corrupt(bench, monkeypatch, capsys):
    right = bench.PROVIDERS["torch"]["corrupt"]
    monkeypatch.setitem(bench.PROVIDERS["torch"], "corrupt", lambda x, mask: right(x, mask) + 1)
    assert bench.main(TINY + ["--check", "--no-json"]) != 0
    out = capsys.readouterr().out
    assert "check torch      FAIL" in out
    assert "check official   PASS" in out


def test_bench_check_fails_on_wrong_loss_grad(bench, monkeypatch, capsys):
    right = bench.PROVIDERS["torch"]["loss"]
    monkeypatch.setitem(bench.PROVIDERS["torch"], "loss", lambda pred, x, mask: right(pred, x, mask) * 1.01)
    assert bench.main(TINY + ["--work", "loss", "--check", "--no-json"]) != 0
    assert "check torch      FAIL" in capsys.readouterr().out
