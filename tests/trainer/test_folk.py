"""FOLK self-distillation (docs/spec.md §6): the DINO head and loss, the EMA teacher, and `pretrain --method folk`.

Runs on the CPU with timm's test_vit at 32 px, a small projection head and a handful of steps.
"""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch

from mfm_fast import MFMHead

from mfm_fast.train import data as D, linprobe, pretrain, visualize
from mfm_fast.folk import DINOHead, DINOLoss, FOLKModel, teacher_momentum, teacher_temperature
from helpers import ROOT, SUBPROCESS_ENV

BASE = ["--device", "cpu", "--model", "test_vit", "--img-size", "32", "--batch-size", "8", "--num-workers", "0",
        "--vis-num", "0", "--no-progress", "--threads", "1", "--method", "folk",
        "--dino-out-dim", "64", "--dino-hidden-dim", "64", "--dino-bottleneck-dim", "32"]


pytestmark = pytest.mark.usefixtures("restore_threads")  # the runs call torch.set_num_threads


def run(out_dir, *extra):
    return pretrain.main(BASE + ["--output-dir", str(out_dir)] + [str(e) for e in extra])


def first_last(stats, key, k=3):
    values = [r[key] for r in stats["history"]]
    return np.mean(values[:k]), np.mean(values[-k:])


# ---- pieces ---------------------------------------------------------------------------------------------

def test_dino_head_shapes_and_fixed_norm_last_layer():
    head = DINOHead(16, out_dim=40, hidden_dim=24, bottleneck_dim=8)
    out = head(torch.randn(5, 16)).detach()
    assert out.shape == (5, 40)
    weight = head.last_layer.weight
    torch.testing.assert_close(weight.norm(dim=1), torch.ones(40))  # g = 1: unit rows
    scales = head.last_layer.parametrizations.weight.original0
    assert not scales.requires_grad
    assert DINOHead(16, 40, 24, 8, norm_last_layer=False).last_layer.parametrizations.weight.original0.requires_grad
    # the last layer sees the L2-normalised bottleneck: |logit| <= 1
    assert float(out.abs().max()) <= 1 + 1e-6


def test_dino_loss_matches_an_independent_formula_and_moves_the_centre():
    torch.manual_seed(0)
    b, k, ts, tt, cm = 3, 7, 0.1, 0.04, 0.9
    student, teacher = torch.randn(2 * b, k), torch.randn(2 * b, k)
    loss_fn = DINOLoss(k, student_temp=ts, center_momentum=cm)
    centre = torch.randn(1, k) * 0.1
    loss_fn.center.copy_(centre)
    got = float(loss_fn(student, teacher, tt))

    s, t, c = student.double().numpy(), teacher.double().numpy(), centre.double().numpy()

    def softmax(z):
        z = z - z.max(1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(1, keepdims=True)

    p_t = softmax((t - c) / tt)
    log_p_s = np.log(softmax(s / ts))
    # teacher of view u (rows :b) against the student of view v (rows b:), and the reverse
    expected = 0.5 * (-(p_t[:b] * log_p_s[b:]).sum(1).mean() - (p_t[b:] * log_p_s[:b]).sum(1).mean())
    assert got == pytest.approx(expected, rel=1e-5)
    np.testing.assert_allclose(loss_fn.center.numpy(), cm * c + (1 - cm) * t.mean(0, keepdims=True), rtol=1e-5)
    loss_fn.eval()
    before = loss_fn.center.clone()
    loss_fn(student, teacher, tt)
    assert torch.equal(loss_fn.center, before)  # eval: no centre update
    with pytest.raises(ValueError, match="student, teacher"):
        loss_fn(student[:5], teacher[:5], tt)


def test_schedules_follow_dino():
    assert teacher_momentum(0, 100, 0.996) == pytest.approx(0.996)
    assert teacher_momentum(100, 100, 0.996) == pytest.approx(1.0)
    assert teacher_momentum(50, 100, 0.996) == pytest.approx(0.998)
    ms = [teacher_momentum(i, 100) for i in range(101)]
    assert all(a <= b for a, b in zip(ms, ms[1:]))
    assert teacher_temperature(0, 10, 0.04, 0.07) == pytest.approx(0.04)
    assert teacher_temperature(5, 10, 0.04, 0.07) == pytest.approx(0.055)
    assert teacher_temperature(10, 10, 0.04, 0.07) == pytest.approx(0.07)
    assert teacher_temperature(3, 0, 0.04, 0.07) == pytest.approx(0.07)


def test_folk_model_feeds_both_heads_from_one_encoder_pass():
    encoder = timm.create_model("test_vit", pretrained=False, num_classes=0, img_size=32)
    net = FOLKModel(encoder, MFMHead.for_timm_model(encoder), DINOHead(encoder.num_features, 32, 16, 8))
    pred, logits = net(torch.randn(2, 3, 32, 32))
    assert pred.shape == (2, 3, 32, 32) and logits.shape == (2, 32)


def test_two_views_are_seeded_and_differ():
    t = D.TwoViews(D.MFMTransform(32))
    photo = D.load_photos(["astronaut"])[0]
    a = t(photo, D.sample_rng(0, 0, 5))
    b = t(photo, D.sample_rng(0, 0, 5))
    assert a.shape == (2, 3, 32, 32) and a.dtype == torch.uint8
    assert torch.equal(a, b)  # a sample depends only on (seed, epoch, index)
    assert not torch.equal(a[0], a[1])
    # no jitter, no grey: each view is the plain MFM crop drawn next from the same RNG
    plain = D.TwoViews(D.MFMTransform(32), jitter=0.0, p_grey=0.0)(photo, D.sample_rng(0, 0, 5))
    rng = D.sample_rng(0, 0, 5)
    base = D.MFMTransform(32)
    first = base(photo, rng)
    rng.random()  # the grey draw
    assert torch.equal(plain[0], first) and torch.equal(plain[1], base(photo, rng))


# ---- pretrain --method folk ------------------------------------------------------------------------------

def test_folk_run_is_finite_and_both_losses_improve(tmp_path):
    # DINO defaults (centring on). On a fixed batch the reconstruction falls, and so does the part of the
    # distillation loss the student can remove, KL(teacher || student): the cross-entropy itself rises at
    # first because the centre flattens the teacher (its entropy grows; DINO's guard against collapse).
    stats = run(tmp_path, "--steps", 60, "--log-every", 1, "--overfit-batch", "--lr", 1e-3, "--warmup-steps", 0)
    assert stats["method"] == "folk" and stats["views_per_image"] == 2
    for key in ("loss", "loss_rec", "loss_distill", "distill_kl"):
        assert all(math.isfinite(r[key]) for r in stats["history"]), key
    rec_first, rec_last = first_last(stats, "loss_rec")
    assert rec_last < 0.8 * rec_first
    kl_first, kl_last = first_last(stats, "distill_kl", k=5)
    assert kl_last < 0.7 * kl_first
    assert all(0 <= r["distill_kl"] <= r["loss_distill"] + 1e-6 for r in stats["history"])
    r = stats["history"][-1]
    assert r["loss"] == pytest.approx(r["loss_rec"] + r["loss_distill"], rel=1e-5)  # weights 1, 1
    ckpt = pretrain.load_checkpoint(tmp_path / "checkpoint.pth")
    assert ckpt["args"]["method"] == "folk" and "teacher.module.encoder.pos_embed" in ckpt["distiller"]
    # the teacher's encoder can be probed (DINO evaluates the teacher), and the pictures work for FOLK checkpoints
    res = linprobe.main(["--checkpoint", str(tmp_path / "checkpoint.pth"), "--teacher", "--device", "cpu",
                         "--train-per-class", "4", "--val-per-class", "2", "--iters", "20"])
    assert res["pretrained"]["n_val"] == 2 * 17
    png = visualize.main(["--checkpoint", str(tmp_path / "checkpoint.pth"), "--num", "2", "--device", "cpu",
                          "--output", str(tmp_path / "v.png")])
    assert png.stat().st_size > 1000


def test_folk_total_loss_decreases_when_the_student_can_follow_the_teacher(tmp_path):
    # With DINO's centring the distillation term first rises (the centre removes the teacher's common mode,
    # its anti-collapse mechanism); without centring (momentum 1 keeps the centre at 0) the student learns to
    # predict the teacher and the total loss falls: the distillation path carries gradient to the student.
    stats = run(tmp_path, "--steps", 60, "--log-every", 1, "--overfit-batch", "--lr", 1e-3, "--warmup-steps", 0,
                "--center-momentum", 1, "--freeze-last-layer", 0, "--no-checkpoint")
    first, last = first_last(stats, "loss", k=5)
    assert last < 0.6 * first
    d_first, d_last = first_last(stats, "loss_distill", k=5)
    assert d_last < d_first


def test_teacher_changes_by_ema_only(tmp_path):
    common = ["--steps", 3, "--log-every", 1, "--lr", 1e-3, "--warmup-steps", 0, "--momentum-teacher", 0.9]
    run(tmp_path, *common, "--stop-at", 2)
    at2 = pretrain.load_checkpoint(tmp_path / "checkpoint.pth")
    run(tmp_path, *common, "--resume", "auto")
    at3 = pretrain.load_checkpoint(tmp_path / "checkpoint.pth")
    assert at2["step"] == 2 and at3["step"] == 3
    m = teacher_momentum(2, 3, 0.9)  # the update after optimiser step index 2
    checked = 0
    for key, t3 in at3["distiller"].items():
        if not key.startswith("teacher.module.") or not t3.is_floating_point():
            continue
        name = key[len("teacher.module."):]
        student3 = at3["model"][name]
        expected = at2["distiller"][key] * m + student3 * (1 - m)
        torch.testing.assert_close(t3, expected, rtol=1e-5, atol=1e-6)
        checked += 1
    assert checked > 10
    # the teacher differs from the student: it is an average, not a copy
    assert not torch.equal(at3["distiller"]["teacher.module.dino_head.mlp.0.weight"], at3["model"]["dino_head.mlp.0.weight"])


def test_teacher_parameters_are_not_trained():
    args = pretrain.resolve_args(pretrain.get_args_parser().parse_args(BASE + ["--steps", "2"]))
    net = pretrain.build_model(args)
    distiller = pretrain.make_distiller(net, args, {"total": 2}, batches_per_epoch=4)
    teacher = list(distiller.teacher.parameters())
    assert teacher and not any(p.requires_grad for p in teacher)
    optimizer = pretrain.make_optimizer(net, args)
    trained = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not trained & {id(p) for p in teacher}
    assert not any(n.startswith("_student") for n, _ in distiller.named_parameters())


@pytest.mark.parametrize("extra,flag", [
    (["--task", "sr"], "--method"),
    (["--keep-ratio", "1.5"], "--keep-ratio"),
    (["--pipeline", "official"], "--pipeline"),
    (["--student-temp", "0"], "--student-temp"),
    (["--momentum-teacher", "1.5"], "--momentum-teacher"),
    (["--dino-out-dim", "0"], "--dino-out-dim"),
    (["--method", "mfm,dino"], "--method"),
    (["--mask-patch-factor", "2"], "--mask"),
])
def test_bad_folk_arguments_name_the_flag(tmp_path, capsys, extra, flag):
    with pytest.raises(SystemExit) as exc:
        run(tmp_path, "--steps", 1, *extra)
    assert exc.value.code == 2
    assert f"error: {flag}" in capsys.readouterr().err


# ---- the seed ideas as pretrain options (--method mfm) ----------------------------------------------------

@pytest.mark.parametrize("extra", [
    ["--mask", "adaptive", "--adaptive-mode", "mixed", "--keep-ratio", "0.05"],
    ["--mask", "adaptive", "--adaptive-mode", "rcom"],
    ["--bands", "2,4", "8,999", "--radius-jitter", "0.5"],
    ["--mask-patch-factor", "2"],
    ["--distance", "magnitude_phase", "--phase-weight", "0.5"],
])
def test_mask_and_distance_options_train(tmp_path, extra):
    mfm = [a for a in BASE if a not in ("--method", "folk")]
    stats = pretrain.main(mfm + ["--output-dir", str(tmp_path), "--steps", "3", "--log-every", "1", "--vis-num", "2"]
                          + extra)
    assert stats["method"] == "mfm" and all(math.isfinite(r["loss"]) for r in stats["history"])
    assert any((tmp_path / "vis").glob("*.png"))
    args = pretrain.load_checkpoint(tmp_path / "checkpoint.pth")["args"]
    assert args["mask"] == ("adaptive" if "adaptive" in extra else "disc")


@pytest.mark.parametrize("extra,flag", [
    (["--bands", "4"], "--bands"),
    (["--bands", "4,8", "--r1", "3"], "--bands"),
    (["--radius-jitter", "-1"], "--radius-jitter"),
    (["--mask-patch-factor", "3"], "--mask-patch-factor"),
    (["--mask", "adaptive", "--pipeline", "official"], "--pipeline"),
    (["--distance", "magnitude_phase", "--pipeline", "official"], "--pipeline"),
    (["--phase-weight", "-0.5"], "--phase-weight"),
])
def test_bad_mask_options_name_the_flag(tmp_path, capsys, extra, flag):
    mfm = [a for a in BASE if a not in ("--method", "folk")]
    with pytest.raises(SystemExit) as exc:
        pretrain.main(mfm + ["--output-dir", str(tmp_path), "--steps", "1"] + extra)
    assert exc.value.code == 2
    assert f"error: {flag}" in capsys.readouterr().err


@pytest.mark.slow
def test_folk_ddp_two_processes_keep_student_and_teacher_identical(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "mfm_fast.pretrain"] + BASE + ["--steps", "3", "--log-every", "1", "--output-dir", str(tmp_path)]
    proc = subprocess.run(cmd, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    end = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()][-1]
    assert end["event"] == "end" and end["world_size"] == 2
    assert end["rank_fingerprints"][0] == end["rank_fingerprints"][1]
    assert end["teacher_fingerprints"][0] == end["teacher_fingerprints"][1]  # the centre is all-reduced too


def test_throughput_report_compares_mfm_and_folk(tmp_path, capsys):
    mfm = [a for a in BASE if a not in ("--method", "folk")]
    stats = pretrain.main(mfm + ["--output-dir", str(tmp_path), "--method", "mfm,folk", "--synthetic", "--steps", "3",
                                 "--timing-warmup", "1", "--report-throughput", "--no-checkpoint"])
    lines = [json.loads(s) for s in capsys.readouterr().out.splitlines() if s.startswith("{")]
    assert [(r["method"], r["views_per_image"]) for r in lines] == [("mfm", 1), ("folk", 2)]
    assert all(r["images_per_s"] > 0 and r["timed_steps"] == 2 for r in lines)
    assert stats["method"] == "folk"
    assert (tmp_path / "mfm" / "log.jsonl").exists() and (tmp_path / "folk" / "log.jsonl").exists()


@pytest.mark.slow
def test_folk_example_runs():
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "folk_minimal.py"), "--model", "test_vit",
                           "--img-size", "32", "--steps", "3", "--batch-size", "4", "--out-dim", "256"],
                          env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 3 loss" in proc.stdout and "distill" in proc.stdout


def test_folk_resume_continues_like_an_uninterrupted_run(tmp_path):
    common = ["--steps", 4, "--log-every", 1, "--lr", 1e-3, "--warmup-steps", 1, "--momentum-teacher", 0.9]
    whole = run(tmp_path / "whole", *common)
    run(tmp_path / "parts", *common, "--stop-at", 2)
    resumed = run(tmp_path / "parts", *common, "--resume", "auto")
    assert resumed["start_step"] == 2
    for key in ("loss", "loss_rec", "loss_distill"):
        assert [r[key] for r in resumed["history"]] == [r[key] for r in whole["history"][2:]], key
    assert resumed["teacher_fingerprints"] == whole["teacher_fingerprints"]
