"""The pre-training script (python -m mfm_fast.pretrain), its pictures, the linear probe and the example.

Everything runs on the CPU with timm's tiny test models at 32-64 px and a handful of steps.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

# timm and scikit-image (the built-in photos) are in requirements.txt: a missing one fails, it does not skip.
from mfm_fast import _official
from mfm_fast.train import data as D, linprobe, pretrain, visualize
from helpers import ROOT, SUBPROCESS_ENV, kill_after, logged_steps

BASE = ["--device", "cpu", "--model", "test_vit", "--img-size", "32", "--batch-size", "4", "--num-workers", "0",
        "--vis-num", "0", "--no-progress", "--log-every", "1", "--threads", "1"]


pytestmark = pytest.mark.usefixtures("restore_threads")  # the runs call torch.set_num_threads


def run(out_dir, *extra):
    return pretrain.main(BASE + ["--output-dir", str(out_dir)] + [str(e) for e in extra])


def losses(stats):
    return [r["loss"] for r in stats["history"]]


def log_records(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "log.jsonl").read_text().splitlines()]


# ---- runs ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model,size,p_low", [("test_vit", 32, 0.5), ("test_resnet", 64, 0.3)])
def test_few_steps_finish_and_write_outputs(tmp_path, model, size, p_low):
    stats = run(tmp_path, "--model", model, "--img-size", size, "--steps", 3)
    assert stats["final_step"] == 3 and len(stats["history"]) == 3
    assert all(np.isfinite(losses(stats)))
    start = log_records(tmp_path)[0]
    assert start["event"] == "start" and start["args"]["p_low"] == p_low  # released recipe per family
    ckpt = pretrain.load_checkpoint(tmp_path / "checkpoint.pth")
    assert ckpt["step"] == 3 and ckpt["args"]["model"] == model
    encoder = pretrain.create_encoder(model, size)
    encoder.load_state_dict(torch.load(tmp_path / "encoder.pth", weights_only=True))  # plain timm weights


def test_loss_decreases_on_a_fixed_batch(tmp_path):
    stats = run(tmp_path, "--overfit-batch", "--steps", 20, "--lr", 1e-3, "--warmup-steps", 0, "--batch-size", 8,
                "--no-checkpoint")
    seq = losses(stats)
    assert len(seq) == 20 and all(np.isfinite(seq))
    assert all(b < a for a, b in zip(seq, seq[1:])), seq
    assert seq[-1] < 0.75 * seq[0], seq


def test_resume_continues_like_an_uninterrupted_run(tmp_path):
    # 6 samples/epoch... 24 crops, batch 4, 2 micro-batches per step: 3 steps per epoch, 2 epochs.
    common = ["--steps", 6, "--accum-iter", 2, "--samples-per-epoch", 24]
    full = run(tmp_path / "full", *common)
    # Interrupted mid-epoch after step 2, resumed; loaded by a worker process this time: the crops
    # depend on (seed, epoch, index) only.
    first = run(tmp_path / "split", *common, "--stop-at", 2)
    assert first["final_step"] == 2
    ckpt = pretrain.load_checkpoint(tmp_path / "split" / "checkpoint.pth")
    assert (ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"]) == (2, 0, 4)
    second = run(tmp_path / "split", *common, "--resume", "auto", "--num-workers", 1)
    assert second["start_step"] == 2 and second["final_step"] == 6
    assert [r["step"] for r in second["history"]] == [3, 4, 5, 6]
    assert losses(second) == losses(full)[2:]  # bit-identical on the CPU
    assert [r["lr"] for r in second["history"]] == [r["lr"] for r in full["history"]][2:]
    assert second["rank_fingerprints"] == full["rank_fingerprints"]
    # and a resume that changed the run would be caught: a different seed gives different losses
    other = run(tmp_path / "other", *common, "--seed", 1)
    assert losses(other) != losses(full)


def test_kill_during_checkpoint_write_keeps_the_previous_one(tmp_path):
    path = tmp_path / "checkpoint.pth"
    script = textwrap.dedent(f"""
        import io, os, signal, torch
        from mfm_fast.train.pretrain import save_checkpoint
        save_checkpoint({{"step": 1, "w": torch.arange(1000.0)}}, {str(path)!r})
        real_save = torch.save
        def half_then_die(obj, f):  # write half of the bytes, then SIGKILL, as a preempted node would
            buf = io.BytesIO(); real_save(obj, buf); data = buf.getvalue()
            f.write(data[: len(data) // 2]); f.flush(); os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = half_then_die
        save_checkpoint({{"step": 2, "w": torch.zeros(10 ** 6)}}, {str(path)!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr  # it really died mid-write
    torn = list(tmp_path.glob(".checkpoint.pth.tmp-*"))
    assert len(torn) == 1 and 0 < torn[0].stat().st_size  # the half-written file exists...
    with pytest.raises(Exception):
        torch.load(torn[0], weights_only=True)  # ...and is unreadable
    ckpt = pretrain.load_checkpoint(path)  # the previous checkpoint is intact
    assert ckpt["step"] == 1 and torch.equal(ckpt["w"], torch.arange(1000.0))
    pretrain.save_checkpoint({"step": 3}, path)  # the next write succeeds and removes the torn file
    assert pretrain.load_checkpoint(path)["step"] == 3 and not list(tmp_path.glob(".checkpoint.pth.tmp-*"))


@pytest.mark.slow
def test_ddp_two_processes_on_cpu_end_with_identical_weights(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "mfm_fast.pretrain"] + BASE + ["--steps", 4, "--log-every", 2, "--output-dir", tmp_path]
    proc = subprocess.run([str(c) for c in cmd], env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    end = log_records(tmp_path)[-1]
    assert end["event"] == "end" and end["world_size"] == 2 and end["total_batch"] == 8
    fps = end["rank_fingerprints"]
    assert len(fps) == 2 and fps[0] == fps[1]
    single = run(tmp_path / "single", "--steps", 4)  # one process differs (other data, other masks)
    assert single["rank_fingerprints"][0] != fps[0]


# ---- non-finite losses ------------------------------------------------------------------------------

def _nan_at_call(monkeypatch, bad_call):
    real = pretrain.Corruptor.loss
    calls = {"n": 0}

    def loss(self, pred, target, mask):
        calls["n"] += 1
        out = real(self, pred, target, mask)
        return out * float("nan") if calls["n"] == bad_call else out
    monkeypatch.setattr(pretrain.Corruptor, "loss", loss)


def test_nonfinite_loss_stops_naming_the_step(tmp_path, monkeypatch, capsys):
    _nan_at_call(monkeypatch, 3)
    with pytest.raises(SystemExit) as exc:
        run(tmp_path, "--steps", 6, "--log-every", 5)  # found at the step-5 log, named as step 3
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "non-finite loss or gradient at step 3" in err and "--skip-nonfinite" in err
    assert not (tmp_path / "checkpoint.pth").exists()


def test_skip_nonfinite_skips_the_step(tmp_path, monkeypatch):
    _nan_at_call(monkeypatch, 3)
    stats = run(tmp_path, "--steps", 5, "--skip-nonfinite")
    assert stats["skipped"] == 1 and stats["final_step"] == 5
    seq = losses(stats)  # --log-every 1: step 3's window holds no finite step, so its loss is null (not 0.0)
    assert seq[2] is None and all(np.isfinite(seq[:2] + seq[3:]))
    assert log_records(tmp_path)[3]["loss"] is None  # records: start, steps 1, 2, 3 (JSON null), ...
    ckpt = pretrain.load_checkpoint(tmp_path / "checkpoint.pth")
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    steps = {float(s["step"]) for s in ckpt["optimizer"]["state"].values()}
    assert steps == {4.0}  # AdamW applied 4 of the 5 steps


# ---- tasks and pipelines ---------------------------------------------------------------------------------

@pytest.mark.parametrize("task", ["sr", "deblur", "denoise"])
def test_restoration_tasks_run(tmp_path, task):
    stats = run(tmp_path, "--task", task, "--steps", 2, "--sr-factor", 4, "--blur-sizes", 3, 5, 7,
                "--no-checkpoint")
    assert stats["final_step"] == 2 and all(np.isfinite(losses(stats)))


def _args(*extra):
    return pretrain.resolve_args(pretrain.get_args_parser().parse_args(BASE + [str(e) for e in extra]))


def test_degradations_follow_the_spec():
    gen = torch.Generator().manual_seed(0)
    flat = torch.full((2, 3, 32, 32), 0.4)
    for task in ("sr", "deblur"):
        out = pretrain.degrade(flat, _args("--task", task, "--sr-factor", 4, "--blur-sizes", 7), gen)
        assert torch.allclose(out, flat, atol=1e-6), task  # both keep a constant image
    x = torch.rand(2, 3, 32, 32, generator=gen)
    noisy = pretrain.degrade(x, _args("--task", "denoise"), gen)
    assert abs(float((noisy - x).std()) - 75 / 255) < 0.02 and (noisy > 1).any()  # no clamp
    blurred = pretrain.degrade(x, _args("--task", "deblur", "--blur-sizes", 7, "--blur-sigma", 5), gen)
    r = torch.arange(-3, 4.0)
    k = torch.exp(-(r[:, None] ** 2 + r[None] ** 2) / 50)
    k = (k / k.sum()).expand(3, 1, 7, 7)
    ref = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (3, 3, 3, 3), mode="reflect"), k, groups=3)
    assert torch.allclose(blurred, ref, atol=1e-6)
    sr = pretrain.degrade(x, _args("--task", "sr", "--sr-factor", 8), gen)
    assert sr.shape == x.shape and sr.min() >= 0 and sr.max() <= 1 and not torch.allclose(sr, x, atol=1e-2)


def test_official_pipeline_computes_the_same_as_mfm_fast():
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    low = torch.tensor([True, False, True, False])
    fast = pretrain.Corruptor(_args("--pipeline", "mfm_fast"), torch.device("cpu"), seed=0)
    slow = pretrain.Corruptor(_args("--pipeline", "official"), torch.device("cpu"), seed=0)
    inp_f, tgt_f, mask_f = fast(x, low=low)
    inp_o, tgt_o, mask_o = slow(x, low=low)
    assert torch.equal(mask_f, mask_o)
    assert torch.allclose(inp_f, inp_o, atol=1e-5)
    pred = torch.randn(4, 3, 32, 32)
    assert torch.allclose(fast.loss(pred, tgt_f, mask_f), slow.loss(pred, tgt_o, mask_o), rtol=1e-5)
    assert torch.allclose(_official.loss(pred, x.float() / 255),
                          fast.criterion.__class__(reduction="mean", normalize_target=True)(pred, x), rtol=1e-5)


def test_throughput_report_for_both_pipelines(tmp_path, capsys):
    stats = run(tmp_path, "--synthetic", "--steps", 4, "--timing-warmup", 1, "--report-throughput",
                "--pipeline", "official,mfm_fast", "--no-checkpoint")
    lines = [json.loads(s) for s in capsys.readouterr().out.splitlines() if s.startswith("{")]
    assert [r["pipeline"] for r in lines] == ["official", "mfm_fast"]
    for r in lines:
        assert r["timed_steps"] == 3 and r["images_per_s"] > 0 and r["model"] == "test_vit"
    assert stats["pipeline"] == "mfm_fast"


# ---- recipe pieces ---------------------------------------------------------------------------------------

def test_schedule_and_weight_decay_groups():
    s = {"lr": 1e-3, "warmup_lr": 1e-6, "min_lr": 1e-5, "warmup": 10, "total": 100}
    assert pretrain.lr_at(0, s) == 1e-6
    warm = [pretrain.lr_at(i, s) for i in range(11)]
    assert all(b > a for a, b in zip(warm, warm[1:]))
    assert pretrain.lr_at(10, s) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + np.cos(np.pi * 0.1)))
    assert pretrain.lr_at(100, s) == pytest.approx(1e-5)
    net = pretrain.build_model(_args())
    decay, no_decay = pretrain.param_groups(net, 0.05)
    names = {id(p): n for n, p in net.named_parameters()}
    no = {names[id(p)] for p in no_decay["params"]}
    yes = {names[id(p)] for p in decay["params"]}
    assert {"encoder.pos_embed", "encoder.cls_token", "encoder.blocks.0.attn.qkv.bias",
            "encoder.blocks.0.norm1.weight", "head.proj.bias"} <= no
    assert {"encoder.blocks.0.attn.qkv.weight", "encoder.patch_embed.proj.weight", "head.proj.weight"} <= yes
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0


def test_lr_scales_with_the_total_batch(tmp_path):
    run(tmp_path, "--steps", 2, "--batch-size", 8, "--accum-iter", 2, "--no-checkpoint")
    sched = log_records(tmp_path)[0]["schedule"]
    assert sched["lr"] == pytest.approx(3e-4 * 16 / 512) and sched["min_lr"] == pytest.approx(2.5e-6 * 16 / 512)


def test_help_documents_every_option():
    parser = pretrain.get_args_parser()
    for action in parser._actions:
        assert action.help, f"{action.option_strings} has no help"
    proc = subprocess.run([sys.executable, "-m", "mfm_fast.pretrain", "--help"], env=SUBPROCESS_ENV, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0
    for flag in ("--data-path", "--synthetic", "--resume", "--accum-iter", "--channels-last", "--compile",
                 "--skip-nonfinite", "--pipeline", "--task", "--report-throughput", "torchrun"):
        assert flag in proc.stdout, flag


@pytest.mark.parametrize("extra,flag", [
    (["--img-size", "33"], "--img-size"),
    (["--model", "test_resnet", "--img-size", "48"], "--img-size"),
    (["--model", "no_such_model"], "--model"),
    (["--data-path", "/no/such/folder"], "--data-path"),
    (["--batch-size", "0"], "--batch-size"),
    (["--pipeline", "fast"], "--pipeline"),
    (["--p-low", "1.5"], "--p-low"),
    (["--task", "sr", "--sr-factor", "5"], "--sr-factor"),
    (["--resume", "/no/such/checkpoint.pth"], "--resume"),
    (["--loss-backend", "numpy"], "--loss-backend"),
])
def test_bad_arguments_name_the_flag(tmp_path, capsys, extra, flag):
    with pytest.raises(SystemExit) as exc:
        run(tmp_path, "--steps", 1, *extra)
    assert exc.value.code == 2
    assert f"error: {flag}" in capsys.readouterr().err


# ---- data ------------------------------------------------------------------------------------------------

def test_builtin_photos_are_bundled_and_crops_are_seeded():
    photos = D.load_photos()
    assert len(photos) == len(D.SKIMAGE_PHOTOS) == 17 and all(p.mode == "RGB" for p in photos)
    ds = D.PhotoCrops(32, length=40, seed=3)
    a, label = ds[21]
    assert a.dtype == torch.uint8 and a.shape == (3, 32, 32) and label == 21 % 17
    assert torch.equal(a, ds[21][0])  # the same (seed, epoch, index) gives the same crop
    ds.set_epoch(1)
    assert not torch.equal(a, ds[21][0])
    for p in photos:  # train and val regions tile the photo without overlap
        tr, va = D.split_box(p.width, p.height, "train"), D.split_box(p.width, p.height, "val")
        assert (tr[2] == va[0] and tr[1] == va[1] == 0) or (tr[3] == va[1] and tr[0] == va[0] == 0)


# ---- pictures and evaluation -----------------------------------------------------------------------------------

def _is_png(path):
    return Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_png_grids_during_training_and_on_demand(tmp_path):
    run(tmp_path, "--steps", 2, "--vis-every", 1, "--vis-num", 2)
    pngs = sorted(p.name for p in (tmp_path / "vis").glob("*.png"))
    assert pngs == ["step_0000001.png", "step_0000002.png"]
    import matplotlib.image
    img = matplotlib.image.imread(tmp_path / "vis" / "step_0000002.png")
    assert img.shape[0] > 150 and img.shape[1] > 3 * img.shape[0] // 2  # 2 rows x 6 columns
    assert img[..., :3].std() > 0.05  # not blank
    out = visualize.main(["--checkpoint", str(tmp_path / "checkpoint.pth"), "--num", "3",
                          "--output", str(tmp_path / "on_demand.png"), "--device", "cpu"])
    assert _is_png(out) and matplotlib.image.imread(out).shape[0] > img.shape[0]  # 3 rows


def test_image_folder_data_for_pretraining_pictures_and_probe(tmp_path):
    root = tmp_path / "data"
    photos = D.load_photos()[:3]
    for split, box in (("train", "train"), ("val", "val")):
        for label, photo in enumerate(photos):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            region = photo.crop(D.split_box(photo.width, photo.height, box))
            for i in range(4):
                region.rotate(90 * i).save(folder / f"{i}.png")
    stats = run(tmp_path / "run", "--data-path", root / "train", "--steps", 3, "--vis-num", 2)
    assert stats["final_step"] == 3 and all(np.isfinite(losses(stats)))
    assert _is_png(tmp_path / "run" / "vis" / "step_0000003.png")
    res = linprobe.main(["--checkpoint", str(tmp_path / "run" / "checkpoint.pth"), "--data-path", str(root),
                         "--device", "cpu", "--iters", "50"])["pretrained"]
    assert res["n_train"] == 12 and res["n_val"] == 12 and res["classes"] == 3


@pytest.mark.parametrize("tool,argv,flag", [
    (visualize, ["--checkpoint", "/no/such.pth"], "--checkpoint"),
    (linprobe, ["--checkpoint", "/no/such.pth"], "--checkpoint"),
    (linprobe, ["--model", "test_vit", "--img-size", "32", "--iters", "0"], "--iters"),
    (linprobe, ["--model", "test_vit", "--img-size", "32", "--data-path", "/no/such/folder"], "--data-path"),
])
def test_visualize_and_linprobe_name_bad_flags(capsys, tool, argv, flag):
    with pytest.raises(SystemExit) as exc:
        tool.main(argv)
    assert exc.value.code == 2 and f"error: {flag}" in capsys.readouterr().err


def test_linprobe_data_path_needs_train_and_val(tmp_path, capsys):
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(SystemExit):
        linprobe.main(["--model", "test_vit", "--img-size", "32", "--data-path", str(tmp_path)])
    assert "error: --data-path (val/)" in capsys.readouterr().err


def test_linear_probe_on_builtin_data(tmp_path):
    run(tmp_path, "--steps", 2)
    res = linprobe.main(["--checkpoint", str(tmp_path / "checkpoint.pth"), "--compare-random", "--device", "cpu",
                         "--train-per-class", "8", "--val-per-class", "4", "--iters", "100"])
    assert set(res) == {"pretrained", "random_init"}
    for r in res.values():
        assert r["n_train"] == 8 * 17 and r["n_val"] == 4 * 17 and r["classes"] == 17
        assert r["top1"] > 3 / 17  # photo identity from features: well above chance (1/17)
    faces = linprobe.main(["--probe-data", "faces", "--model", "test_vit", "--img-size", "32", "--device", "cpu",
                           "--iters", "100"])["random_init"]
    assert faces["n_train"] == 140 and faces["n_val"] == 60 and faces["top1"] > 0.6


@pytest.mark.slow
def test_minimal_example_runs():
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "timm_pretrain_minimal.py"), "--model",
                           "test_vit", "--img-size", "32", "--steps", "3", "--batch-size", "4"],
                          env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 3 loss" in proc.stdout


# ---- faults: kill -9 and resume, used output folders, unreadable images ---------------------------------------

KILL_RUN = ["--steps", 12, "--save-every", 3, "--samples-per-epoch", 24]  # 6 batches per epoch: 2 epochs
KILL_DURING_SAVE = textwrap.dedent("""
    import io, os, runpy, signal, sys, torch
    real_save = torch.save
    def half_then_die(obj, f):  # the trainer's next checkpoint write stops half-way: SIGKILL, as a preempted node
        buf = io.BytesIO(); real_save(obj, buf); data = buf.getvalue()
        f.write(data[: len(data) // 2]); f.flush(); os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    torch.save = half_then_die
    sys.argv = ["mfm_fast.pretrain"] + sys.argv[1:]
    runpy.run_module("mfm_fast.pretrain", run_name="__main__")
""")


@pytest.mark.slow
def test_sigkill_at_three_moments_then_resume_auto_is_bit_identical(tmp_path):
    import random
    rng = random.Random(19)
    full = run(tmp_path / "full", *KILL_RUN)
    out = tmp_path / "killed"
    args = [str(a) for a in BASE + KILL_RUN] + ["--output-dir", str(out), "--resume", "auto"]
    trainer = [sys.executable, "-m", "mfm_fast.pretrain"] + args
    # 1: a random moment of steps 2-4 (maybe before the first checkpoint: then a fresh start)
    assert kill_after(trainer, out, rng.randint(2, 4), rng.uniform(0, 0.05)) == -9
    # 2: a random moment of steps 5-7
    assert kill_after(trainer, out, rng.randint(5, 7), rng.uniform(0, 0.05)) == -9
    # 3: during the next checkpoint write (torn temporary file; checkpoint.pth must stay the previous one)
    before = pretrain.load_checkpoint(out / "checkpoint.pth")["step"] if (out / "checkpoint.pth").exists() else 0
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE] + args, env=SUBPROCESS_ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert list(out.glob(".checkpoint.pth.tmp-*")), "the kill did not come during a checkpoint write"
    assert pretrain.load_checkpoint(out / "checkpoint.pth")["step"] == before
    assert max(logged_steps(out)) > before  # records past the checkpoint exist now...
    # 4: to the end
    proc = subprocess.run(trainer, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = log_records(out)  # ...and are gone: each step exactly once, in order
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 13))
    assert [r["loss"] for r in records if "loss" in r] == losses(full)
    assert records[0]["event"] == "start" and records[-1]["event"] == "end"
    assert [r["event"] for r in records if "event" in r].count("end") == 1
    a, b = (pretrain.load_checkpoint(d / "checkpoint.pth")["model"] for d in (tmp_path / "full", out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-identical final weights
    assert records[-1]["rank_fingerprints"] == full["rank_fingerprints"]


def test_resume_trims_the_log_atomically_and_drops_a_torn_line(tmp_path):
    run(tmp_path, "--steps", 4, "--save-every", 2, "--stop-at", 2)
    with open(tmp_path / "log.jsonl", "a") as f:  # a later step that the checkpoint does not hold, then a torn line
        f.write(json.dumps({"step": 3, "loss": 1.0}) + "\n" + '{"step": 4, "lo')
    stats = run(tmp_path, "--steps", 4, "--save-every", 2, "--resume", "auto")
    assert stats["start_step"] == 2
    records = log_records(tmp_path)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert [r.get("event") for r in records if "event" in r] == ["start", "resume", "end"]
    assert not list(tmp_path.glob(".log.jsonl.tmp-*"))


def test_fresh_run_into_a_used_folder_stops_and_overwrite_starts_afresh(tmp_path, capsys):
    run(tmp_path, "--steps", 2)
    first = (tmp_path / "log.jsonl").read_text()
    with pytest.raises(SystemExit) as exc:
        run(tmp_path, "--steps", 2)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--resume auto" in err and "--overwrite" in err
    assert (tmp_path / "log.jsonl").read_text() == first  # untouched
    stats = run(tmp_path, "--steps", 3, "--overwrite")
    assert stats["start_step"] == 0
    assert [r["step"] for r in log_records(tmp_path) if "loss" in r] == [1, 2, 3]  # one run's log, not two
    assert pretrain.load_checkpoint(tmp_path / "checkpoint.pth")["step"] == 3


def test_all_skipped_window_logs_null_not_zero(tmp_path, monkeypatch):
    # every step non-finite: the one log window has no finite step
    monkeypatch.setattr(pretrain.Corruptor, "loss", lambda self, p, t, m: p.float().sum() * float("nan"))
    stats = run(tmp_path / "all_bad", "--steps", 2, "--skip-nonfinite", "--log-every", 2)
    assert losses(stats) == [None] and stats["final_loss"] is None and stats["skipped"] == 2
    end = log_records(tmp_path / "all_bad")[-1]
    assert end["event"] == "end" and end["final_loss"] is None
    assert '"final_loss": null' in (tmp_path / "all_bad" / "log.jsonl").read_text()


def test_unreadable_images_are_skipped_with_a_warning_and_a_count(tmp_path):
    root = tmp_path / "data"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    photo = D.load_photos()[0]
    for i in range(4):
        photo.rotate(90 * i).resize((48, 48)).save(root / ("a" if i % 2 else "b") / f"{i}.jpg")
    good = (root / "a" / "1.jpg").read_bytes()
    (root / "a" / "broken.jpg").write_bytes(good[: len(good) // 3])  # a truncated JPEG
    (root / "b" / "text.png").write_text("not an image")
    with pytest.warns(RuntimeWarning, match=r"skipping unreadable image .*(broken\.jpg|text\.png)"):
        stats = run(tmp_path / "run", "--data-path", root, "--steps", 3, "--batch-size", 2)
    assert stats["final_step"] == 3 and all(np.isfinite(losses(stats)))
    assert stats["unreadable_skipped"] > 0
    assert log_records(tmp_path / "run")[-1]["unreadable_skipped"] == stats["unreadable_skipped"]
    ds = D.FolderImages(root, D.CenterCrop(32))
    with pytest.warns(RuntimeWarning):
        items = [ds[i] for i in range(len(ds))]  # every item is an image; the substitutes are deterministic
    assert all(x.shape == (3, 32, 32) for x, _ in items)
    assert torch.equal(ds[ds.folder.samples.index((str(root / "a" / "broken.jpg"), 0))][0],
                       ds[ds.folder.samples.index((str(root / "a" / "broken.jpg"), 0)) + 1][0])
