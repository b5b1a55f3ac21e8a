"""Bad-input battery over every CLI: each bad value, file or folder gives exactly one line
``prog: error: --flag: what is wrong`` on stderr, exit status 2, no traceback.

The CLIs run in-process (their main(argv) exits through SystemExit, so a stray exception fails the
case instead of passing it); a few cases also run as real subprocesses to check the exit status and
stderr of the process itself. Two cores in CI: the checks stop before any model is trained.
"""

import os
import subprocess
import sys

import pytest
import torch
from helpers import BENCH_DIR, SUBPROCESS_ENV, TOOLS_DIR, load_bench, load_tool, one_line_error

from mfm_fast.train import linprobe, pretrain, visualize

TINY = ["--device", "cpu", "--model", "test_vit", "--img-size", "32", "--batch-size", "4", "--num-workers", "0",
        "--vis-num", "0", "--no-progress", "--threads", "1", "--steps", "1"]

pytestmark = pytest.mark.usefixtures("restore_threads")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A real 1-step run (checkpoint.pth, encoder.pth) and the bad files derived from it."""
    root = tmp_path_factory.mktemp("cli")
    threads = torch.get_num_threads()
    try:
        pretrain.main(TINY + ["--output-dir", str(root / "run")])
    finally:
        torch.set_num_threads(threads)
    ckpt = root / "run" / "checkpoint.pth"
    (root / "truncated.pth").write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    (root / "notes.txt").write_text("not a checkpoint\n")
    torch.save({"weights": [1, 2, 3]}, root / "plain_dict.pth")
    (root / "empty").mkdir()
    (root / "no_images" / "class_a").mkdir(parents=True)
    (root / "no_images" / "class_a" / "readme.txt").write_text("x")
    for split in ("train", "val"):
        (root / "probe_empty" / split / "a").mkdir(parents=True)
    (root / "a_file").write_text("x")
    (root / "out_dir").mkdir()
    return {"root": root, "ckpt": ckpt, "encoder": root / "run" / "encoder.pth", "run": root / "run"}


def _sub(files, value):
    """'{ckpt}' -> the file's path; other values unchanged."""
    return value.format(**{k: str(v) for k, v in files.items()}) if isinstance(value, str) else str(value)


PRETRAIN = [
    (["--loss-gamma", "-1"], "--loss-gamma"),
    (["--loss-gamma", "nan"], "--loss-gamma"),
    (["--r1", "40"], "--r1"),
    (["--r1", "0"], "--r1"),
    (["--r1", "-2"], "--r1"),
    (["--bands", "30,40"], "--bands"),
    (["--bands", "1"], "--bands"),
    (["--loss-backend", "cuda"], "--loss-backend"),
    (["--corrupt-backend", "cuda"], "--corrupt-backend"),
    (["--loss-backend", "numpy"], "--loss-backend"),
    (["--distance", "magnitude_phase", "--phase-weight", "-1"], "--phase-weight"),
    (["--task", "deblur", "--blur-sigma", "nan"], "--blur-sigma"),
    (["--task", "deblur", "--blur-sizes", "4"], "--blur-sizes"),
    (["--p-low", "1.5"], "--p-low"),
    (["--method", "folk", "--keep-ratio", "0"], "--keep-ratio"),
    (["--method", "folk", "--teacher-temp", "0"], "--teacher-temp"),
    (["--method", "nope"], "--method"),
    (["--batch-size", "0"], "--batch-size"),
    (["--steps", "0"], "--steps"),
    (["--img-size", "33"], "--img-size"),
    (["--img-size", "8"], "--img-size"),
    (["--img-size", "40"], "--img-size"),
    (["--model", "no_such_model"], "--model"),
    (["--lr", "-1"], "--lr"),
    (["--min-crop-scale", "0"], "--min-crop-scale"),
    (["--stop-at", "5"], "--stop-at"),
    (["--radius-jitter", "-1"], "--radius-jitter"),
    (["--mask-patch-factor", "3"], "--mask-patch-factor"),
    (["--threads", "0"], "--threads"),
    (["--betas", "1", "1"], "--betas"),
    (["--pipeline", "fast"], "--pipeline"),
    (["--warmup-lr", "inf"], "--warmup-lr"),
    (["--data-path", "/no/such/folder"], "--data-path"),
    (["--data-path", "{root}/empty"], "--data-path"),
    (["--data-path", "{root}/no_images"], "--data-path"),
    (["--synthetic", "--data-path", "{root}/empty"], "--synthetic"),
    (["--resume", "/no/such/checkpoint.pth"], "--resume"),
    (["--resume", "{encoder}"], "--resume"),
    (["--resume", "{root}/truncated.pth"], "--resume"),
    (["--resume", "{root}/notes.txt"], "--resume"),
    (["--resume", "{root}/plain_dict.pth"], "--resume"),
    (["--resume", "{ckpt}", "--img-size", "64"], "--resume"),
    (["--resume", "{ckpt}", "--method", "folk"], "--resume"),
    (["--resume", "{ckpt}", "--model", "test_resnet"], "--resume"),
    (["--resume", "{ckpt}", "--task", "denoise"], "--resume"),
    (["--resume", "auto", "--overwrite"], "--overwrite"),
    (["--resume", "{ckpt}", "--overwrite"], "--overwrite"),
    (["--output-dir", "{root}/a_file"], "--output-dir"),
    (["--unknown-flag"], "--unknown-flag"),
    (["--steps", "two"], "--steps"),
]


@pytest.mark.parametrize("extra,flag", PRETRAIN, ids=[" ".join(e) for e, _ in PRETRAIN])
def test_pretrain_bad_input(files, tmp_path, capsys, extra, flag):
    argv = TINY + ["--output-dir", str(tmp_path / "out")] + [_sub(files, e) for e in extra]
    one_line_error(lambda: pretrain.main(argv), capsys, "python -m mfm_fast.pretrain", flag)


def test_pretrain_fresh_run_into_a_used_folder_names_resume_and_overwrite(files, capsys):
    err = one_line_error(lambda: pretrain.main(TINY + ["--output-dir", str(files["run"])]), capsys,
                                 "python -m mfm_fast.pretrain", "--output-dir")
    assert "--resume auto" in err and "--overwrite" in err


def test_resume_messages_say_which_file_to_use(files, capsys):
    err = one_line_error(lambda: pretrain.main(TINY + ["--resume", str(files["encoder"])]), capsys,
                                 "python -m mfm_fast.pretrain", "--resume")
    assert str(files["ckpt"]) in err  # the encoder.pth's own run folder's checkpoint.pth
    err = one_line_error(lambda: pretrain.main(TINY + ["--resume", str(files["ckpt"]), "--img-size", "64"]),
                                 capsys, "python -m mfm_fast.pretrain", "--resume")
    assert "--img-size 32" in err


LINPROBE = [
    (["--checkpoint", "/no/such.pth"], "--checkpoint"),
    (["--checkpoint", "{encoder}"], "--checkpoint"),
    (["--checkpoint", "{root}/truncated.pth"], "--checkpoint"),
    (["--checkpoint", "{root}/notes.txt"], "--checkpoint"),
    (["--checkpoint", "{ckpt}", "--model", "test_resnet"], "--checkpoint"),
    (["--checkpoint", "{ckpt}", "--img-size", "64"], "--checkpoint"),
    (["--checkpoint", "{ckpt}", "--teacher"], "--teacher"),
    (["--model", "test_vit", "--img-size", "32", "--iters", "0"], "--iters"),
    (["--model", "test_vit", "--img-size", "32", "--l2", "-1"], "--l2"),
    (["--model", "test_vit", "--img-size", "32", "--num-workers", "-1"], "--num-workers"),
    (["--model", "test_vit", "--img-size", "32", "--threads", "-1"], "--threads"),
    (["--model", "no_such_model"], "--model"),
    (["--model", "test_vit", "--img-size", "33"], "--img-size"),
    (["--model", "test_vit", "--img-size", "32", "--data-path", "/no/such/folder"], "--data-path"),
    (["--model", "test_vit", "--img-size", "32", "--data-path", "{root}/probe_empty"], "--data-path (train/)"),
    (["--probe-data", "mnist"], "--probe-data"),
]


@pytest.mark.parametrize("argv,flag", LINPROBE, ids=[" ".join(a) for a, _ in LINPROBE])
def test_linprobe_bad_input(files, capsys, argv, flag):
    argv = ["--device", "cpu"] + [_sub(files, a) for a in argv]
    one_line_error(lambda: linprobe.main(argv), capsys, "python -m mfm_fast.linprobe", flag)


VISUALIZE = [
    ([], "--checkpoint"),
    (["--checkpoint", "/no/such.pth"], "--checkpoint"),
    (["--checkpoint", "{encoder}"], "--checkpoint"),
    (["--checkpoint", "{root}/truncated.pth"], "--checkpoint"),
    (["--checkpoint", "{root}/plain_dict.pth"], "--checkpoint"),
    (["--checkpoint", "{ckpt}", "--num", "0"], "--num"),
    (["--checkpoint", "{ckpt}", "--output", "{root}/out_dir"], "--output"),
    (["--checkpoint", "{ckpt}", "--data-path", "/no/such/folder"], "--data-path"),
    (["--views", "folk", "--size", "7"], "--size"),
    (["--views", "folk", "--keep-ratio", "1.5"], "--keep-ratio"),
    (["--views", "folk", "--image", "mona_lisa"], "--image"),
    (["--views", "folk", "--checkpoint", "{ckpt}"], "--checkpoint"),
    (["--views", "folk", "--output", "{root}/a_file/x.png"], "--output"),
]


@pytest.mark.parametrize("argv,flag", VISUALIZE, ids=[" ".join(a) or "no-args" for a, _ in VISUALIZE])
def test_visualize_bad_input(files, capsys, argv, flag):
    argv = ["--device", "cpu"] + [_sub(files, a) for a in argv]
    one_line_error(lambda: visualize.main(argv), capsys, "python -m mfm_fast.visualize", flag)


BENCH_CASES = [
    ("fft_mask", ["--r1", "-1"], "--r1"),
    ("fft_mask", ["--r1", "100", "--size", "16"], "--r1"),
    ("fft_mask", ["--reps", "-3"], "--reps"),
    ("fft_mask", ["--reps", "0"], "--reps"),
    ("fft_mask", ["--warmup", "-1"], "--warmup"),
    ("fft_mask", ["--providers", ",,"], "--providers"),
    ("fft_mask", ["--providers", "numpy"], "--providers"),
    ("fft_mask", ["--size", "15"], "--size"),
    ("fft_mask", ["--batch", "0"], "--batch"),
    ("fft_mask", ["--budget", "nan"], "--budget"),
    ("fft_mask", ["--p-low", "2"], "--p-low"),
    ("fft_mask", ["--threads", "0"], "--threads"),
    ("fft_mask", ["--out-dir", "{root}/a_file"], "--out-dir"),
    ("e2e_step", ["--models", "no_such_model"], "--models"),
    ("e2e_step", ["--backend", "numpy"], "--backend"),
    ("e2e_step", ["--steps", "0"], "--steps"),
    ("e2e_step", ["--rounds", "0"], "--rounds"),
    ("e2e_step", ["--warmup", "-1"], "--warmup"),
    ("folk_ops", ["--keep-ratio", "2"], "--keep-ratio"),
    ("folk_ops", ["--size", "7"], "--size"),
    ("folk_ops", ["--reps", "0"], "--reps"),
    ("folk_ops", ["--budget", "-1"], "--budget"),
    ("tune_corrupt", ["--size", "7"], "--size"),
    ("tune_corrupt", ["--batch", "0"], "--batch"),
    ("tune_corrupt", ["--r1", "-1"], "--r1"),
    ("tune_corrupt", ["--json", "{root}/out_dir"], "--json"),
    ("tune_loss", ["--r1", "500", "--size", "32"], "--r1"),
    ("tune_loss", ["--batch", "-1"], "--batch"),
    ("aot_sm90", ["--arch", "5"], "--arch"),
    ("aot_sm90", ["--size", "7"], "--size"),
    ("aot_sm90", ["--dump", "{root}/a_file"], "--dump"),
    ("smem_banks", ["--bogus"], "--bogus"),
]



def _script(stem):
    """A bench/ benchmark or a tools/ kernel tool, by name."""
    return load_bench(stem) if (BENCH_DIR / f"{stem}.py").exists() else load_tool(stem)


@pytest.mark.parametrize("stem,argv,flag", BENCH_CASES, ids=[f"{s} {' '.join(a)}" for s, a, _ in BENCH_CASES])
def test_bench_bad_input(files, capsys, stem, argv, flag):
    argv = [_sub(files, a) for a in argv]
    if stem in ("fft_mask", "folk_ops", "e2e_step"):
        argv = ["--device", "cpu"] + argv
    if stem == "aot_sm90":  # it unsets TRITON_INTERPRET and imports the kernels for a GPU target: not in-process
        proc = subprocess.run([sys.executable, str(TOOLS_DIR / "aot_sm90.py")] + argv, env=SUBPROCESS_ENV, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and f"error: {flag}" in proc.stderr
        return
    one_line_error(lambda: _script(stem).main(argv), capsys, f"{stem}.py", flag)


def test_battery_has_at_least_60_cases():
    assert len(PRETRAIN) + len(LINPROBE) + len(VISUALIZE) + len(BENCH_CASES) >= 60



# ---- the same as real processes: exit status and stderr of the process itself ------------------------

@pytest.mark.parametrize("cmd,flag", [
    (["-m", "mfm_fast.pretrain"] + TINY + ["--loss-gamma", "-1"], "--loss-gamma"),
    (["-m", "mfm_fast.linprobe", "--checkpoint", "{root}/truncated.pth"], "--checkpoint"),
    (["-m", "mfm_fast.finetune", "--device", "cpu", "--model", "test_vit", "--img-size", "32", "--layer-decay", "2"],
     "--layer-decay"),
    (["-m", "mfm_fast.evaluate", "--checkpoint", "{root}/truncated.pth", "--data-path", "{root}"], "--checkpoint"),
    ([str(BENCH_DIR / "fft_mask.py"), "--device", "cpu", "--reps", "-3"], "--reps"),
])
def test_as_a_process(files, cmd, flag):
    proc = subprocess.run([sys.executable] + [_sub(files, c) for c in cmd], env=SUBPROCESS_ENV, capture_output=True,
                          text=True, timeout=300, cwd=files["root"])
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "error: " + flag in lines[0], proc.stderr
