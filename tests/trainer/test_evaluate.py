"""python -m mfm_fast.evaluate on the CPU with timm's tiny test_vit at 32 px: top-1 / top-k / per-class figures
against a hand count, the ImageNet-R / -A class lists and restricted argmax, the ImageNet-C mCE arithmetic and
folder layout, one-line errors. Expected values are computed here independently of mfm_fast.train.evaluate."""

import ast
import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mfm_fast.train import evaluate as E
from mfm_fast.train import robustness as R
from helpers import one_line_error

torch.set_num_threads(1)
PROG = "python -m mfm_fast.evaluate"
BASE = ["--device", "cpu", "--num-workers", "0", "--no-progress", "--threads", "1", "--batch-size", "4"]
MIRRORS = Path("/work/.mirror")

pytestmark = pytest.mark.usefixtures("restore_threads")  # main() calls torch.set_num_threads


# ---- helpers ----------------------------------------------------------------------------------------------------

def make_checkpoint(path, class_names, seed=0, **extra):
    """A finetune-style checkpoint of test_vit at 32 px with seeded random weights (every parameter redrawn, so
    that the logits differ clearly from image to image)."""
    from mfm_fast.train.released import create_classifier

    net = create_classifier("test_vit", len(class_names), 32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    state = {"kind": "finetune", "model": net.state_dict(), "args": {"model": "test_vit", "img_size": 32,
             "num_classes": len(class_names), "class_names": list(class_names)}, "epoch": 3, "step": 12, **extra}
    torch.save(state, path)
    return path


def write_images(folder, classes, per_class=3, seed=0):
    """folder/<class>/<i>.png of random pixels (sizes vary); returns [(path, class name)]."""
    rng = np.random.default_rng(seed)
    out = []
    for name in classes:
        (Path(folder) / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = int(rng.integers(32, 56)), int(rng.integers(32, 56))
            path = Path(folder) / name / f"{i}.png"
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
            out.append((path, name))
    return out


def hand_logits(ckpt_path, files):
    """Each file's logits (K,), one image at a time: PIL -> eval_transform -> the checkpoint's classifier."""
    from mfm_fast.train.finetune_data import eval_transform
    from mfm_fast.train.released import create_classifier

    saved = torch.load(ckpt_path, weights_only=True)
    net = create_classifier("test_vit", saved["args"]["num_classes"], 32)
    net.load_state_dict(saved["model"])
    net.eval()
    out = []
    with torch.no_grad():
        for path, _ in files:
            x = eval_transform(32)(Image.open(path).convert("RGB"))
            out.append(net(x[None])[0].tolist())
    return out


def hand_count(logits, targets, candidates, k):
    """(top-1 hits, top-k hits) per image in plain Python: rank the candidate classes by logit."""
    top1, topk = [], []
    for row, t in zip(logits, targets):
        ranked = sorted(candidates, key=lambda c: -row[c])
        top1.append(ranked[0] == t)
        topk.append(t in ranked[:k])
    return top1, topk


def run(*argv):
    return E.main(BASE + [str(a) for a in argv])


# ---- folder ------------------------------------------------------------------------------------------------------

def test_folder_matches_a_hand_count(tmp_path, capsys):
    """3 classes named in an order other than the folders' sorted one: top-1, top-3 and per class as counted by hand."""
    names = ["zebra", "apple", "mango"]
    ckpt = make_checkpoint(tmp_path / "best.pth", names)
    files = write_images(tmp_path / "val", names, per_class=4)
    rec = run("--checkpoint", ckpt, "--data-path", tmp_path / "val")
    logits = hand_logits(ckpt, files)
    targets = [names.index(n) for _, n in files]
    top1, top3 = hand_count(logits, targets, range(3), 3)
    assert rec["n"] == 12 and rec["correct"] == sum(top1)
    assert rec["top1"] == pytest.approx(sum(top1) / 12) and rec["top_k"] == 3 and rec["top3"] == 1.0
    for name in names:
        hits = [h for h, (_, n) in zip(top1, files) if n == name]
        assert rec["per_class"][name] == {"correct": sum(hits), "total": 4, "accuracy": pytest.approx(sum(hits) / 4)}
    assert 0 < sum(top1) < 12, "the random model should get some right and some wrong"
    written = json.loads((tmp_path / "evaluate-best-folder-val.json").read_text())
    assert written["top1"] == rec["top1"] and written["per_class"] == rec["per_class"]
    assert written["epoch"] == 3 and written["step"] == 12 and written["benchmark"] == "folder"
    assert "top-1" in capsys.readouterr().out
    run("--checkpoint", ckpt, "--data-path", tmp_path / "val")  # a second run never replaces the first file
    assert (tmp_path / "evaluate-best-folder-val-2.json").exists()


def test_folder_subset_of_classes_is_not_restricted(tmp_path):
    """7-class model, a folder with 3 of its classes: argmax and top-5 over all 7 outputs (a prediction of a class
    the folder lacks counts as wrong)."""
    names = [f"c{i}" for i in range(7)]
    ckpt = make_checkpoint(tmp_path / "checkpoint.pth", names, seed=1)
    files = write_images(tmp_path / "few", ["c1", "c4", "c6"], per_class=4, seed=1)
    rec = run("--checkpoint", ckpt, "--data-path", tmp_path / "few", "--output", tmp_path / "r.json")
    logits = hand_logits(ckpt, files)
    targets = [names.index(n) for _, n in files]
    top1, top5 = hand_count(logits, targets, range(7), 5)
    assert rec["correct"] == sum(top1) and rec["correct_top5"] == sum(top5) and rec["top_k"] == 5
    assert rec["top5"] == pytest.approx(sum(top5) / 12) and rec["restricted_to"] is None
    assert set(rec["per_class"]) == {"c1", "c4", "c6"} and (tmp_path / "r.json").exists()
    outside = sum(max(range(7), key=lambda c: row[c]) not in (1, 4, 6) for row in logits)
    assert outside > 0, "some argmax should fall on a class the folder does not have"


# ---- ImageNet-R / -A ----------------------------------------------------------------------------------------------

def test_class_lists():
    assert len(R.IMAGENET_WNIDS) == len(set(R.IMAGENET_WNIDS)) == 1000
    assert list(R.IMAGENET_WNIDS) == sorted(R.IMAGENET_WNIDS) and all(R.is_wnid(w) for w in R.IMAGENET_WNIDS)
    for subset in (R.IMAGENET_R_WNIDS, R.IMAGENET_A_WNIDS):
        assert len(subset) == len(set(subset)) == 200 and set(subset) <= set(R.IMAGENET_WNIDS)
        assert list(subset) == sorted(subset)
    assert set(R.IMAGENET_R_WNIDS) != set(R.IMAGENET_A_WNIDS)
    # first ImageNet-1k indices, copied by hand from imagenet-r's eval.py comment and natural-adv-examples'
    # thousand_k_to_200 (the keys whose value is not -1)
    assert R.subset_indices(R.IMAGENET_R_WNIDS)[:10] == [1, 2, 4, 6, 8, 9, 11, 13, 22, 23]
    assert R.subset_indices(R.IMAGENET_A_WNIDS)[:10] == [6, 11, 13, 15, 17, 22, 23, 27, 30, 37]
    assert R.IMAGENET_WNIDS[0] == "n01440764" and R.IMAGENET_WNIDS[-1] == "n15075141"


def _published(repo, names):
    git = MIRRORS / repo / "repo"
    if not git.exists():
        pytest.skip(f"no mirror of {repo}")
    src = subprocess.run(["git", "--git-dir", str(git), "show", "HEAD:eval.py"], capture_output=True, text=True,
                         check=True).stdout
    return {n.targets[0].id: ast.literal_eval(n.value) for n in ast.parse(src).body
            if isinstance(n, ast.Assign) and isinstance(n.targets[0], ast.Name) and n.targets[0].id in names}


def test_class_lists_equal_the_published_scripts():
    r = _published("hendrycks+imagenet-r", {"all_wnids", "imagenet_r_wnids"})
    a = _published("hendrycks+natural-adv-examples", {"thousand_k_to_200"})["thousand_k_to_200"]
    assert list(R.IMAGENET_WNIDS) == r["all_wnids"] and set(R.IMAGENET_R_WNIDS) == r["imagenet_r_wnids"]
    assert list(R.IMAGENET_A_WNIDS) == [r["all_wnids"][k] for k in sorted(a) if a[k] != -1]


def test_restricted_topk_picks_inside_the_subset():
    columns = torch.tensor([1, 2, 4, 6])  # a subset of 4 of 10 classes
    logits = torch.tensor([[9.0, 1, 2, 0, 0, 0, 3, 0, 0, 8],    # unrestricted argmax 0, in the subset: 6
                           [0.0, 5, 0, 0, 6, 0, 0, 7, 0, 0]])   # unrestricted 7, in the subset: 4 then 1
    assert R.restricted_topk(logits, None, 1)[:, 0].tolist() == [0, 7]
    assert R.restricted_topk(logits, columns, 1)[:, 0].tolist() == [6, 4]
    assert R.restricted_topk(logits, columns, 2).tolist() == [[6, 2], [4, 1]]


class FixedLogits(torch.nn.Module):
    """A fake 1000-class model: image i (its pixel [0, 0, 0] holds i) gets row i of a fixed logit table."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def forward(self, x):
        return self.table[x[:, 0, 0, 0].long()]


def test_count_hits_restricts_imagenet_r_and_a():
    """Three images; per row the unrestricted argmax is a class outside the subset."""
    table = torch.zeros(3, 1000)
    table[:, 0] = 10.0  # n01440764 (tench): in neither ImageNet-R nor ImageNet-A
    table[0, 1], table[0, 6] = 5.0, 4.0   # R: 1 (goldfish) wins; A: 6 wins (1 is not in A)
    table[1, 2], table[1, 11] = 3.0, 2.0  # R: 2; A: 11
    table[2, 4], table[2, 13] = 1.0, 6.0  # R: 4 (13 is also in R, and larger): 13; A: 13
    x = torch.arange(3.0)[:, None, None, None].expand(3, 3, 2, 2)
    targets = torch.tensor([1, 11, 4])
    batch = [(x, targets, torch.tensor([0, 1, 0]), torch.tensor([True, True, True]))]
    model = FixedLogits(table)
    r = E.count_hits(model, batch, 2, torch.device("cpu"), 1, R.subset_indices(R.IMAGENET_R_WNIDS))
    a = E.count_hits(model, batch, 2, torch.device("cpu"), 1, R.subset_indices(R.IMAGENET_A_WNIDS))
    full = E.count_hits(model, batch, 2, torch.device("cpu"), 1)
    assert r == {"top1": [1, 0], "topk": [1, 0], "n": [2, 1], "skipped": [0, 0]}  # preds 1, 2, 13
    assert a == {"top1": [0, 1], "topk": [0, 1], "n": [2, 1], "skipped": [0, 0]}  # preds 6, 11, 13
    assert full["top1"] == [0, 0]  # all 0
    r2 = E.count_hits(model, batch, 2, torch.device("cpu"), 2, R.subset_indices(R.IMAGENET_R_WNIDS))
    assert r2["topk"] == [2, 1]  # top-2 in R: image 0: 1, 6; image 1: 2, 11; image 2: 13, 4


def test_imagenet_r_end_to_end(tmp_path):
    """A 1000-class test_vit with the ImageNet-1k wnids; an imagenet-r folder of 3 of R's classes; the restricted
    argmax counted by hand over the 200 R columns."""
    ckpt = make_checkpoint(tmp_path / "best.pth", R.IMAGENET_WNIDS, seed=2)
    wnids = [R.IMAGENET_R_WNIDS[0], R.IMAGENET_R_WNIDS[50], R.IMAGENET_R_WNIDS[199]]
    files = write_images(tmp_path / "imagenet-r", wnids, per_class=3, seed=2)
    rec = run("--checkpoint", ckpt, "--data-path", tmp_path / "imagenet-r", "--benchmark", "imagenet-r")
    logits = hand_logits(ckpt, files)
    index = {w: i for i, w in enumerate(R.IMAGENET_WNIDS)}
    cols = [index[w] for w in R.IMAGENET_R_WNIDS]
    top1, top5 = hand_count(logits, [index[w] for _, w in files], cols, 5)
    assert rec["n"] == 9 and rec["correct"] == sum(top1) and rec["correct_top5"] == sum(top5)
    assert rec["restricted_to"] == 200
    assert all(max(cols, key=lambda c: row[c]) in cols for row in logits)
    assert sum(max(range(1000), key=lambda c: row[c]) not in cols for row in logits) > 0
    assert (tmp_path / "evaluate-best-imagenet-r-imagenet-r.json").exists()


# ---- ImageNet-C ---------------------------------------------------------------------------------------------------

ALEXNET = {"gaussian_noise": 0.886428, "fog": 0.819324, "brightness": 0.564592, "jpeg_compression": 0.606500}


def test_alexnet_errors():
    assert len(R.CORRUPTIONS) == 15 and len(R.EXTRA_CORRUPTIONS) == 4 and set(R.ALEXNET_ERR) == set(R.CORRUPTIONS)
    for c, v in ALEXNET.items():
        assert R.ALEXNET_ERR[c] == v
    assert not set(R.CORRUPTIONS) & set(R.EXTRA_CORRUPTIONS)


def test_mce_equal_to_alexnet_is_one():
    errors = {c: {s: v for s in range(1, 6)} for c, v in R.ALEXNET_ERR.items()}
    out = R.mce_summary(errors)
    assert out["mce"] == pytest.approx(1.0) and out["mce_corruptions"] == 15 and out["missing"] == []
    assert out["excluded"] == [] and out["incomplete"] == []
    doubled = {c: {s: 2 * v for s, v in e.items()} for c, e in errors.items()}
    assert R.mce_summary(doubled)["mce"] == pytest.approx(2.0)


def test_mce_by_hand():
    """Three standard corruptions, one extra; the numbers and AlexNet's errors typed in here."""
    errors = {"gaussian_noise": {1: 0.2, 2: 0.4, 3: 0.6, 4: 0.8, 5: 0.9},
              "fog": {1: 0.1, 2: 0.1, 3: 0.2, 4: 0.3, 5: 0.5},
              "brightness": {1: 0.05, 2: 0.1, 3: 0.1, 4: 0.15, 5: 0.2},
              "spatter": {1: 0.7, 2: 0.7, 3: 0.7, 4: 0.7, 5: 0.7}}
    # CE_c = sum_s E_{s,c} / (5 x AlexNet's mean error)
    ce = {"gaussian_noise": 2.9 / (5 * 0.886428), "fog": 1.2 / (5 * 0.819324), "brightness": 0.6 / (5 * 0.564592)}
    out = R.mce_summary(errors)
    assert out["ce"] == pytest.approx(ce)
    assert out["mce"] == pytest.approx((ce["gaussian_noise"] + ce["fog"] + ce["brightness"]) / 3)
    assert out["mce_corruptions"] == 3 and out["standard_corruptions"] == 15 and len(out["missing"]) == 12
    assert "spatter" not in out["ce"] and out["excluded"] == ["spatter"]
    assert out["mean_error"]["spatter"] == pytest.approx(0.7)
    assert out["mean_error_standard"] == pytest.approx((0.58 + 0.24 + 0.12) / 3)
    assert out["mean_error_all"] == pytest.approx((0.58 + 0.24 + 0.12 + 0.7) / 4)
    assert out["mean_error_by_severity"][1] == pytest.approx((0.2 + 0.1 + 0.05) / 3)
    assert list(out["mean_error"]) == ["gaussian_noise", "fog", "brightness", "spatter"]  # the published order
    assert R.corruption_error({1: 0.3, 3: 0.5}, 0.8) == pytest.approx(0.4 / 0.8)
    assert R.error_rate(3, 4) == pytest.approx(0.25)
    only_extra = R.mce_summary({"saturate": {1: 0.5}})
    assert only_extra["mce"] is None and only_extra["mce_corruptions"] == 0 and len(only_extra["missing"]) == 15


def test_parse_severity():
    assert [R.parse_severity(str(s)) for s in range(1, 6)] == [1, 2, 3, 4, 5]
    for bad in ("0", "6", "01", "s1", "", "1.0"):
        with pytest.raises(ValueError):
            R.parse_severity(bad)


def test_imagenet_c_end_to_end(tmp_path, capsys):
    """2 corruptions (one standard, one extra) x 2 severities x 3 classes, errors counted by hand."""
    names = ["cat", "dog", "fox"]
    ckpt = make_checkpoint(tmp_path / "best.pth", names, seed=3)
    files = {}
    for ci, c in enumerate(("gaussian_noise", "spatter")):
        for s in (1, 2):
            files[c, s] = write_images(tmp_path / "c" / c / str(s), names, per_class=3, seed=10 * ci + s)
    rec = run("--checkpoint", ckpt, "--data-path", tmp_path / "c", "--benchmark", "imagenet-c")
    err = {}
    for (c, s), fs in files.items():
        top1, _ = hand_count(hand_logits(ckpt, fs), [names.index(n) for _, n in fs], range(3), 1)
        err[c, s] = 1 - sum(top1) / 9
        assert rec["corruptions"][c][str(s)]["total"] == 9
        assert rec["corruptions"][c][str(s)]["error"] == pytest.approx(err[c, s])
    ce = (err["gaussian_noise", 1] + err["gaussian_noise", 2]) / 2 / 0.886428
    assert rec["ce"] == {"gaussian_noise": pytest.approx(ce)} and rec["mce"] == pytest.approx(ce)
    assert rec["mce_corruptions"] == 1 and rec["excluded"] == ["spatter"] and len(rec["missing"]) == 14
    assert rec["mean_error"]["spatter"] == pytest.approx((err["spatter", 1] + err["spatter", 2]) / 2)
    assert rec["n"] == 36 and rec["imagenet_1k"] is False
    assert "mCE over 1 of 15 corruptions" in capsys.readouterr().out
    on_disk = json.loads((tmp_path / "evaluate-best-imagenet-c-c.json").read_text())
    assert on_disk["mce"] == pytest.approx(ce)


# ---- bad input ----------------------------------------------------------------------------------------------------

@pytest.fixture
def tiny(tmp_path):
    (tmp_path / "ck").mkdir()
    ckpt = make_checkpoint(tmp_path / "ck" / "best.pth", ["cat", "dog", "fox"])
    write_images(tmp_path / "val", ["cat", "dog"], per_class=1)
    return tmp_path, ckpt


def _fails(capsys, flag, *argv):
    line = one_line_error(lambda: run(*argv), capsys, PROG, flag)
    return line


def test_bad_checkpoints(tiny, capsys):
    tmp_path, ckpt = tiny
    val = ["--data-path", tmp_path / "val"]
    torch.save({"model": {}, "args": {"model": "test_vit"}, "step": 5}, tmp_path / "checkpoint.pth")
    torch.save({"w": torch.zeros(2)}, tmp_path / "encoder.pth")
    torch.save({"kind": "pretrain-export", "model": {}}, tmp_path / "other.pth")
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    assert "pre-training checkpoint" in _fails(capsys, "--checkpoint", "--checkpoint", tmp_path / "checkpoint.pth",
                                               *val)
    assert "state dict of weights only" in _fails(capsys, "--checkpoint", "--checkpoint", tmp_path / "encoder.pth",
                                                  *val)
    assert "not a finetune checkpoint" in _fails(capsys, "--checkpoint", "--checkpoint", tmp_path / "other.pth", *val)
    assert "not a torch checkpoint" in _fails(capsys, "--checkpoint", "--checkpoint", tmp_path / "notes.txt", *val)
    assert "no such checkpoint" in _fails(capsys, "--checkpoint", "--checkpoint", tmp_path / "absent.pth", *val)
    _fails(capsys, "--ema", "--checkpoint", ckpt, "--ema", *val)
    _fails(capsys, "--checkpoint", *val)  # required
    assert not list(tmp_path.rglob("evaluate-*.json"))


def test_bad_data(tiny, capsys):
    tmp_path, ckpt = tiny
    c = ["--checkpoint", ckpt]
    _fails(capsys, "--data-path", *c, "--data-path", tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    assert "no class folders" in _fails(capsys, "--data-path", *c, "--data-path", tmp_path / "empty")
    (tmp_path / "noimg" / "cat").mkdir(parents=True)
    (tmp_path / "noimg" / "cat" / "readme.txt").write_text("x")
    assert "no images" in _fails(capsys, "--data-path", *c, "--data-path", tmp_path / "noimg")
    write_images(tmp_path / "more", ["cat", "wolf"], per_class=1)
    assert "'wolf'" in _fails(capsys, "--data-path", *c, "--data-path", tmp_path / "more")
    write_images(tmp_path / "ic" / "fog" / "1", ["cat"], per_class=1)
    write_images(tmp_path / "ic" / "fog" / "7", ["cat"], per_class=1)
    assert "'7'" in _fails(capsys, "--data-path", *c, "--data-path", tmp_path / "ic", "--benchmark", "imagenet-c")
    (tmp_path / "ic2" / "fog").mkdir(parents=True)
    _fails(capsys, "--data-path", *c, "--data-path", tmp_path / "ic2", "--benchmark", "imagenet-c")
    write_images(tmp_path / "ic3" / "fog" / "2", ["cat", "wolf"], per_class=1)
    _fails(capsys, "--data-path", *c, "--data-path", tmp_path / "ic3", "--benchmark", "imagenet-c")
    _fails(capsys, "--data-path", *c)  # required
    _fails(capsys, "--batch-size", *c, "--data-path", tmp_path / "val", "--batch-size", "0")
    _fails(capsys, "--output", *c, "--data-path", tmp_path / "val", "--output", tmp_path)
    assert not list(tmp_path.rglob("evaluate-*.json"))


def test_benchmark_needs_an_imagenet_classifier(tiny, capsys):
    tmp_path, ckpt = tiny
    write_images(tmp_path / "r", [R.IMAGENET_R_WNIDS[0]], per_class=1)
    for bench in ("imagenet-r", "imagenet-a"):
        line = _fails(capsys, "--benchmark", "--checkpoint", ckpt, "--data-path", tmp_path / "r", "--benchmark", bench)
        assert "1000" in line
    names = [f"class{i}" for i in range(1000)]
    named = make_checkpoint(tmp_path / "named.pth", names)
    assert "not wnids" in _fails(capsys, "--benchmark", "--checkpoint", named, "--data-path", tmp_path / "r",
                                 "--benchmark", "imagenet-r")
    shuffled = make_checkpoint(tmp_path / "shuffled.pth", list(reversed(R.IMAGENET_WNIDS)))
    _fails(capsys, "--benchmark", "--checkpoint", shuffled, "--data-path", tmp_path / "r", "--benchmark", "imagenet-a")
    good = make_checkpoint(tmp_path / "good.pth", R.IMAGENET_WNIDS)
    a_only = sorted(set(R.IMAGENET_A_WNIDS) - set(R.IMAGENET_R_WNIDS))[0]
    write_images(tmp_path / "r2", [a_only], per_class=1)
    assert "imagenet-r" in _fails(capsys, "--data-path", "--checkpoint", good, "--data-path", tmp_path / "r2",
                                  "--benchmark", "imagenet-r")
    assert not list(tmp_path.rglob("evaluate-*.json"))


def test_unreadable_image_is_skipped(tiny):
    tmp_path, ckpt = tiny
    (tmp_path / "val" / "dog" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.warns(RuntimeWarning, match="broken.png"):
        rec = run("--checkpoint", ckpt, "--data-path", tmp_path / "val")
    assert rec["n"] == 2 and rec["skipped"] == 1 and rec["per_class"]["dog"]["total"] == 1
    assert math.isclose(rec["top1"], rec["correct"] / 2)
