"""The trainer's command lines at their edges: image sizes the encoder cannot take, --overwrite with --resume,
missing optional packages (the train extra), the run header and the linear probe's progress and JSON result.

CPU only, timm's tiny test models at 32 px, a step or two.
"""

import json
import os
import subprocess
import sys

import pytest

from mfm_fast.train import data as D, linprobe, pretrain
from helpers import ROOT, SUBPROCESS_ENV, one_line_error

PROG = "python -m mfm_fast.pretrain"
TINY = ["--device", "cpu", "--model", "test_vit", "--img-size", "32", "--batch-size", "4", "--num-workers", "0",
        "--vis-num", "0", "--no-progress", "--threads", "1", "--steps", "1"]
EXTRA_HINT = "pip install -e '.[train]'"

pytestmark = pytest.mark.usefixtures("restore_threads")



# ---- --img-size against the encoder's patch size / stride ------------------------------------------------

@pytest.mark.parametrize("model,size,unit", [
    ("test_vit", 8, "patch size 16"),  # smaller than a patch: no token grid at all
    ("test_vit", 40, "patch size 16"),
    ("test_resnet", 48, "stride 32"),
])
def test_img_size_the_encoder_cannot_take_stops_before_anything_is_written(tmp_path, capsys, model, size, unit):
    out = tmp_path / "out"
    argv = TINY + ["--model", model, "--img-size", str(size), "--output-dir", str(out)]
    line = one_line_error(lambda: pretrain.main(argv), capsys)
    assert line.startswith(f"{PROG}: error: --img-size: ") and unit in line and str(size) in line, line
    assert not out.exists()


# ---- --overwrite with --resume ----------------------------------------------------------------------------

@pytest.mark.parametrize("resume", ["auto", "{out}/checkpoint.pth"])
def test_overwrite_with_resume_names_both_flags(tmp_path, capsys, resume):
    out = tmp_path / "run"
    pretrain.main(TINY + ["--output-dir", str(out)])
    log = (out / "log.jsonl").read_text()
    argv = TINY + ["--output-dir", str(out), "--overwrite", "--resume", resume.format(out=out)]
    line = one_line_error(lambda: pretrain.main(argv), capsys)
    assert line.startswith(f"{PROG}: error: --overwrite") and "--resume" in line, line
    assert (out / "log.jsonl").read_text() == log


# ---- the optional packages of the train extra --------------------------------------------------------------

HIDE_AND_RUN = """
import runpy, sys
for name in sys.argv[1].split(","):
    sys.modules[name] = None  # as if not installed: import fails and importlib.util.find_spec gives None
if sys.argv[2] == "-m":
    sys.argv = sys.argv[3:]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
else:
    sys.argv = sys.argv[2:]
    runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("hidden,pip_name,cmd", [
    ("matplotlib", "matplotlib", ["-m", "mfm_fast.pretrain"] + TINY + ["--vis-num", "2"]),
    ("timm", "timm", ["-m", "mfm_fast.pretrain"] + TINY),
    ("skimage", "scikit-image", ["-m", "mfm_fast.linprobe", "--model", "test_vit", "--img-size", "32"]),
    ("matplotlib", "matplotlib", ["-m", "mfm_fast.visualize", "--views", "folk"]),
    ("skimage", "scikit-image", [str(ROOT / "examples" / "timm_pretrain_minimal.py"), "--model", "test_vit",
                                 "--img-size", "32", "--steps", "1", "--batch-size", "2"]),
    ("timm", "timm", [str(ROOT / "examples" / "folk_minimal.py")]),
], ids=["pretrain-matplotlib", "pretrain-timm", "linprobe-skimage", "visualize-matplotlib", "example-skimage",
        "folk-example-timm"])
def test_missing_optional_package_stops_at_start_naming_it_and_the_extra(tmp_path, hidden, pip_name, cmd):
    cmd = cmd + (["--output-dir", str(tmp_path / "out")] if "mfm_fast.pretrain" in cmd else [])
    proc = subprocess.run([sys.executable, "-c", HIDE_AND_RUN, hidden] + cmd, env=SUBPROCESS_ENV, capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    assert f"error: needs {pip_name} (not installed)" in lines[0] and EXTRA_HINT in lines[0], lines[0]
    assert "--" not in lines[0].split("error:", 1)[1]  # suggests no flag (the examples have none of the CLIs')
    assert not (tmp_path / "out").exists()  # nothing trained, nothing written


def test_builtin_photos_without_scikit_image_suggest_the_package_not_flags(monkeypatch):
    monkeypatch.setitem(sys.modules, "skimage", None)
    with pytest.raises(ImportError) as exc:
        D.skimage_data_dir()
    assert "scikit-image" in str(exc.value) and "--" not in str(exc.value)


# ---- what a run says before it starts ---------------------------------------------------------------------

def test_header_before_the_first_step_names_the_run(tmp_path, capsys):
    out = tmp_path / "run"
    pretrain.main(TINY + ["--output-dir", str(out), "--steps", "2", "--log-every", "1"])
    stdout = capsys.readouterr().out
    header, first_step = stdout.split("step 1/2", 1)
    for item in ("test_vit", "cpu", "32 px", "batch 4", "steps 1..2", "--method mfm", "--task mfm",
                 "corrupt torch", "masked_freq_loss torch", str(out)):
        assert item in header, (item, header)


# ---- linear probe: progress and the JSON result -------------------------------------------------------------

PROBE = ["--device", "cpu", "--train-per-class", "4", "--val-per-class", "2", "--iters", "20", "--threads", "1"]


def test_linprobe_shows_progress_and_writes_its_result_next_to_the_checkpoint(tmp_path, capsys):
    run_dir = tmp_path / "run"
    pretrain.main(TINY + ["--output-dir", str(run_dir)])
    ckpt = run_dir / "checkpoint.pth"
    capsys.readouterr()
    first = linprobe.main(["--checkpoint", str(ckpt)] + PROBE)
    err = capsys.readouterr().err
    assert "features" in err and "fitting" in err, err
    written = sorted(run_dir.glob("linprobe-*.json"))
    assert len(written) == 1 and "checkpoint" in written[0].name
    record = json.loads(written[0].read_text())
    assert record["results"]["pretrained"]["top1"] == first["pretrained"]["top1"]
    assert record["checkpoint"] == str(ckpt.resolve()) and record["step"] == 1

    second = linprobe.main(["--checkpoint", str(ckpt), "--probe-data", "faces", "--iters", "20", "--device", "cpu"])
    again = linprobe.main(["--checkpoint", str(ckpt)] + PROBE)
    files = sorted(run_dir.glob("linprobe-*.json"))
    assert len(files) == 3 and json.loads(written[0].read_text()) == record  # an earlier result is never replaced
    tops = sorted(json.loads(f.read_text())["results"]["pretrained"]["top1"] for f in files)
    assert tops == sorted(r["pretrained"]["top1"] for r in (first, second, again))

    chosen = tmp_path / "probe" / "result.json"
    res = linprobe.main(["--checkpoint", str(ckpt), "--output", str(chosen), "--no-progress"] + PROBE)
    assert json.loads(chosen.read_text())["results"]["pretrained"]["top1"] == res["pretrained"]["top1"]


def test_linprobe_output_must_be_a_file_path(tmp_path, capsys):
    argv = ["--model", "test_vit", "--img-size", "32", "--output", str(tmp_path)] + PROBE
    line = one_line_error(lambda: linprobe.main(argv), capsys)
    assert line.startswith("python -m mfm_fast.linprobe: error: --output"), line
