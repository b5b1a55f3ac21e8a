"""python -m mfm_fast.finetune on the CPU with timm's tiny test_vit at 32 px: learning, bit-exact resume, DDP,
the released layer-decay grouping, Mixup targets, one-line errors."""

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mfm_fast.train import finetune
from mfm_fast.train.optim import make_lr_scheduler
from mfm_fast.train.released import create_classifier
from helpers import SUBPROCESS_ENV, kill_after, one_line_error

BASE = ["--device", "cpu", "--model", "test_vit", "--img-size", "32", "--num-workers", "0", "--no-progress",
        "--threads", "1", "--log-every", "1", "--dataset", "faces"]
PROG = "python -m mfm_fast.finetune"

pytestmark = pytest.mark.usefixtures("restore_threads")  # the runs call torch.set_num_threads


def run(out_dir, *extra):
    return finetune.main(BASE + ["--output-dir", str(out_dir)] + [str(e) for e in extra])


def records(out_dir, drop=("images_per_s",)):
    """log.jsonl without the wall-clock fields and the start / resume / end records."""
    out = []
    for line in (Path(out_dir) / "log.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("event") in ("start", "resume", "end"):
            continue
        out.append({k: v for k, v in r.items() if k not in drop})
    return out


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_loss_falls_on_a_learnable_split(tmp_path):
    """Faces vs non-faces, no augmentation or mixing: the training loss falls and val beats chance."""
    stats = run(tmp_path, "--batch-size", 20, "--epochs", 6, "--lr", 2e-3, "--warmup-epochs", 0, "--mixup", 0,
                "--cutmix", 0, "--smoothing", 0, "--reprob", 0, "--auto-augment", "none", "--drop-path", 0,
                "--layer-decay", 1)
    losses = [r["loss"] for r in stats["history"]]
    assert len(losses) == 6 * 7
    assert np.mean(losses[-7:]) < 0.8 * np.mean(losses[:7]), losses
    assert stats["evals"][-1]["top1"] > 0.6  # 30 faces + 30 non-faces held out
    assert [e["epoch"] for e in stats["evals"]] == [1, 2, 3, 4, 5, 6]
    assert (tmp_path / "best.pth").exists() and (tmp_path / "curves.png").stat().st_size > 0
    best = torch.load(tmp_path / "best.pth", weights_only=True)
    assert best["kind"] == "finetune" and best["val"]["top1"] == max(e["top1"] for e in stats["evals"])
    assert best["args"]["num_classes"] == 2 and best["args"]["class_names"]


@pytest.mark.parametrize("stop", [3, 7])  # inside an epoch; at the end of the first (7 steps per epoch)
def test_resume_after_a_stop_is_bit_identical(tmp_path, stop):
    """Recipe defaults (Mixup / CutMix, RandAugment, erasing, drop path): stop, resume auto, same weights and log."""
    common = ("--batch-size", 20, "--steps", 9, "--save-every", 2)
    whole = run(tmp_path / "whole", *common)
    run(tmp_path / "parts", *common, "--stop-at", stop)
    parts = run(tmp_path / "parts", *common, "--resume", "auto")
    assert parts["start_step"] == stop and parts["final_step"] == whole["final_step"] == 9
    a, b = weights(tmp_path / "whole" / "checkpoint.pth"), weights(tmp_path / "parts" / "checkpoint.pth")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert records(tmp_path / "whole") == records(tmp_path / "parts")
    assert parts["rank_fingerprints"] == whole["rank_fingerprints"]
    other = run(tmp_path / "other", *common, "--seed", 1)  # the comparison can fail
    assert other["rank_fingerprints"] != whole["rank_fingerprints"]


@pytest.mark.slow
def test_two_process_gloo_run_ends_with_equal_weights(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "mfm_fast.finetune"] + BASE + ["--batch-size", 10, "--steps", 4, "--output-dir", tmp_path]
    proc = subprocess.run([str(c) for c in cmd], env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    end = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()][-1]
    assert end["event"] == "end" and end["world_size"] == 2 and end["final_step"] == 4
    assert len(end["rank_fingerprints"]) == 2 and end["rank_fingerprints"][0] == end["rank_fingerprints"][1]
    start = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[0])
    assert start["total_batch"] == 20


@pytest.mark.slow
def test_sigkill_twice_then_resume_auto_is_bit_identical(tmp_path):
    """Killed at a random moment of steps 2-4 and of 6-9 (7 steps per epoch: across an epoch end and its
    evaluation), then run to the end with the same command: the uninterrupted run's weights and log."""
    import random
    rng = random.Random(7)
    common = ["--batch-size", 20, "--steps", 12, "--save-every", 1]
    whole = run(tmp_path / "whole", *common)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "mfm_fast.finetune"] + [str(a) for a in BASE + common] + [
        "--output-dir", str(out), "--resume", "auto"]
    assert kill_after(cmd, out, rng.randint(2, 4), rng.uniform(0, 0.05)) == -9
    assert kill_after(cmd, out, rng.randint(6, 9), rng.uniform(0, 0.05)) == -9
    proc = subprocess.run(cmd, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = weights(tmp_path / "whole" / "checkpoint.pth"), weights(out / "checkpoint.pth")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert records(out) == records(tmp_path / "whole")
    assert [r["step"] for r in records(out) if "loss" in r] == list(range(1, 13))
    assert weights(out / "best.pth").keys() == a.keys()
    assert whole["final_step"] == 12


def released_group(name: str, depth: int) -> int:
    """The released optimizer.py grouping: cls_token, pos_embed, patch_embed -> 0; blocks.i -> i + 1; else depth + 1."""
    if name.startswith(("cls_token", "pos_embed", "patch_embed")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def test_layer_decay_follows_the_released_grouping_and_the_scheduler_applies_it_once():
    net = create_classifier("test_vit", 5, 32)
    depth = len(net.blocks)
    groups = finetune.param_groups(net, 0.05, 0.8)
    names = {id(p): n for n, p in net.named_parameters()}
    seen = set()
    for g in groups:
        for p in g["params"]:
            name = names[id(p)]
            seen.add(name)
            assert g["lr_scale"] == pytest.approx(0.8 ** (depth + 1 - released_group(name, depth)), rel=1e-12), name
            no_decay = p.ndim <= 1 or name in ("pos_embed", "cls_token")
            assert g["weight_decay"] == (0.0 if no_decay else 0.05), name
    assert seen == set(names.values())
    assert {released_group(n, depth) for n in seen} == set(range(depth + 2))
    opt = torch.optim.AdamW(groups, lr=0.0)
    sched = {"lr": 1e-3, "warmup_lr": 0.0, "min_lr": 0.0, "warmup": 0, "total": 10}
    make_lr_scheduler(opt, sched).step_update(5)
    peak = 1e-3 * (1 + math.cos(math.pi * 5 / 10)) / 2
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(peak * g["lr_scale"], rel=1e-12)


def test_mixup_and_cutmix_targets_sum_to_one():
    args = argparse.Namespace(mixup=0.8, cutmix=1.0, smoothing=0.1)
    mix = finetune.make_mixup(args, 7)
    np.random.seed(0)
    kinds = set()
    for _ in range(20):
        x = torch.rand(8, 3, 32, 32)
        y = torch.randint(0, 7, (8,))
        x_mixed, t = mix(x.clone(), y)
        assert t.shape == (8, 7) and torch.allclose(t.sum(1), torch.ones(8), atol=1e-6)
        assert (t >= 0).all() and not torch.equal(x_mixed, x)
        changed = (x_mixed != x).flatten(1).float().mean(1)
        kinds.add("cutmix" if bool((changed < 1).all()) else "mixup")  # CutMix pastes a box; Mixup blends all
        assert t.max() < 1  # smoothed and mixed: never one-hot
    assert kinds == {"mixup", "cutmix"}
    assert finetune.make_mixup(argparse.Namespace(mixup=0, cutmix=0, smoothing=0.1), 7) is None


def test_eval_only_reports_the_resumed_checkpoint(tmp_path, capsys):
    run(tmp_path, "--batch-size", 20, "--steps", 2)
    capsys.readouterr()
    run(tmp_path, "--batch-size", 20, "--resume", str(tmp_path / "checkpoint.pth"), "--eval-only")
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    saved = torch.load(tmp_path / "checkpoint.pth", weights_only=True)["val"]
    assert line["eval_only"] and line["top1"] == saved["top1"] and line["n"] == 60


def _image_folder(root, splits=("train", "val"), classes=("a", "b"), per_class=3):
    from PIL import Image
    rng = np.random.default_rng(0)
    for split in splits:
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root


def test_bad_input_is_one_line_naming_the_flag(tmp_path, capsys):
    def fails(flag, *extra):
        one_line_error(lambda: run(tmp_path / "out", "--batch-size", 4, "--steps", 1, *extra), capsys, PROG, flag)

    fails("--data-path", "--data-path", _image_folder(tmp_path / "noval", splits=("train",)))
    fails("--shots", "--shots", 500)
    (tmp_path / "notes.json").write_text("{}")
    fails("--init", "--init", tmp_path / "notes.json")
    fails("--init", "--init", tmp_path / "missing.pth")
    fails("--batch-size", "--batch-size", 3)  # Mixup pairs images
    fails("--model", "--model", "no_such_net")
    fails("--layer-decay", "--layer-decay", 0)
    # a finetune checkpoint of 2 classes cannot be resumed on 3
    run(tmp_path / "two", "--batch-size", 4, "--steps", 1)
    three = _image_folder(tmp_path / "three", classes=("a", "b", "c"), per_class=4)
    fails("--resume", "--data-path", three, "--resume", tmp_path / "two" / "checkpoint.pth")
    one_line_error(lambda: run(tmp_path / "two", "--batch-size", 4, "--steps", 1), capsys, PROG,
                   "--output-dir")  # a fresh run into a folder that holds a run
    run(tmp_path / "other", "--batch-size", 4, "--steps", 1)  # ... or another run's checkpoint resumed into it
    one_line_error(lambda: run(tmp_path / "two", "--batch-size", 4, "--steps", 2, "--resume",
                               tmp_path / "other" / "checkpoint.pth"), capsys, PROG, "--output-dir")


def test_image_folder_few_shot_run_and_evaluate_agree_on_val(tmp_path, capsys):
    """--data-path with --shots: the chosen indices are logged, and python -m mfm_fast.evaluate on val/ counts
    the same top-1 as the run's own evaluation (two separate code paths)."""
    from mfm_fast.train import evaluate
    data = _image_folder(tmp_path / "data", classes=("a", "b", "c"), per_class=5)
    run(tmp_path / "out", "--data-path", data, "--shots", 2, "--batch-size", 6, "--steps", 3, "--mixup", 0,
        "--cutmix", 0)
    start = json.loads((tmp_path / "out" / "log.jsonl").read_text().splitlines()[0])
    chosen = start["subset"]["indices_per_class"]
    assert start["subset"]["kind"] == "shots" and sorted(chosen) == ["a", "b", "c"]
    assert all(len(v) == 2 for v in chosen.values())
    best = torch.load(tmp_path / "out" / "best.pth", weights_only=True)
    assert best["args"]["class_names"] == ["a", "b", "c"]
    result = tmp_path / "eval.json"
    evaluate.main(["--checkpoint", str(tmp_path / "out" / "best.pth"), "--data-path", str(data / "val"),
                   "--device", "cpu", "--num-workers", "0", "--no-progress", "--output", str(result)])
    report = json.loads(result.read_text())
    assert report["top1"] == pytest.approx(best["val"]["top1"], abs=1e-12) and best["val"]["n"] == 15


def test_presets_are_the_released_configs_and_flags_override_them():
    parse = finetune.get_args_parser().parse_args
    base = finetune.resolve_args(parse(["--preset", "vit_base"]))
    assert (base.model, base.epochs, base.blr, base.warmup_epochs, base.warmup_lr, base.min_lr) == \
        ("vit_base_patch16_224", 100, 2e-3, 5, 2.5e-7, 2.5e-7)
    assert (base.weight_decay, base.layer_decay, base.drop_path, base.betas, base.clip_grad, base.opt) == \
        (0.05, 0.8, 0.1, [0.9, 0.999], 0.0, "adamw")
    assert (base.mixup, base.cutmix, base.smoothing, base.auto_augment, base.reprob, base.color_jitter) == \
        (0.8, 1.0, 0.1, "rand-m9-mstd0.5-inc1", 0.25, 0.0)
    small = finetune.resolve_args(parse(["--preset", "vit_small", "--epochs", "3", "--layer-decay", "0.65"]))
    assert (small.model, small.epochs, small.layer_decay) == ("vit_small_patch16_224", 3, 0.65)
    resnet = finetune.resolve_args(parse(["--preset", "resnet50"]))
    assert (resnet.model, resnet.opt, resnet.bce, resnet.layer_decay) == ("resnet50", "lamb", True, 1.0)


def test_ema_and_accumulation_run_and_evaluate_reads_the_ema(tmp_path):
    from mfm_fast.train import evaluate
    stats = run(tmp_path, "--batch-size", 10, "--accum-iter", 2, "--steps", 3, "--ema", 0.5)
    assert stats["final_step"] == 3 and "ema_top1" in stats["evals"][-1]
    start = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[0])
    assert start["total_batch"] == 20
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert ckpt["ema"].keys() == ckpt["model"].keys()
    assert any(not torch.equal(ckpt["ema"][k], ckpt["model"][k]) for k in ckpt["model"])
    net = evaluate.build_classifier(ckpt, tmp_path / "checkpoint.pth", ema=True)
    assert all(torch.equal(v, ckpt["ema"][k]) for k, v in net.state_dict().items())
