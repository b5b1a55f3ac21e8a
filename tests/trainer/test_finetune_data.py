"""mfm_fast.train.finetune_data: few-shot / fraction subsets, one-line errors, the seeded augmentation (bit-identical
whatever the global RNGs, workers or order), timm's transforms, the built-in photos and faces."""

import argparse
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from mfm_fast.train import finetune_data as fd
from mfm_fast.train.data import load_faces, load_photos

MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
TRAIN_COUNTS = {"ant": 12, "bee": 7, "cat": 9}  # ImageFolder order: ant 0-11, bee 12-18, cat 19-27
RANGES = {"ant": range(0, 12), "bee": range(12, 19), "cat": range(19, 28)}


def make_tree(root, train=TRAIN_COUNTS, val=None):
    """root/train/<class>/<i>.png (8 x 8, a distinct flat colour each) and root/val/ (2 per class by default)."""
    val = {c: 2 for c in train} if val is None else val
    for split, counts in (("train", train), ("val", val)):
        for c, n in counts.items():
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.new("RGB", (8, 8), (10 * i, len(c) * 20, 7 * i)).save(root / split / c / f"{i:02d}.png")
    return root


def make_args(**kw):
    a = dict(data_path=None, dataset="faces", img_size=32, seed=0, shots=None, train_fraction=None,
             auto_augment="rand-m9-mstd0.5-inc1", reprob=0.25, color_jitter=0.0, train_per_class=4, val_per_class=2)
    a.update(kw)
    a["data_path"] = None if a["data_path"] is None else str(a["data_path"])
    return argparse.Namespace(**a)


def chosen_per_class(data):
    """{class: indices into the train folder} from the Subset's indices and the known folder layout."""
    idx = data.train.dataset.indices
    return {c: [i for i in idx if i in r] for c, r in RANGES.items()}


@pytest.fixture
def tree(tmp_path):
    return make_tree(tmp_path / "data")


# ---- subsets ------------------------------------------------------------------------------------------------

def test_shots_gives_k_per_class_seeded(tree):
    data = fd.build_finetune_data(make_args(data_path=tree, shots=3))
    per = chosen_per_class(data)
    assert {c: len(v) for c, v in per.items()} == {"ant": 3, "bee": 3, "cat": 3}
    assert len(data.train) == 9 and len(set(data.train.dataset.indices)) == 9
    assert data.subset["kind"] == "shots" and data.subset["k"] == 3 and data.subset["n_train"] == 9
    assert data.subset["indices_per_class"] == per
    assert data.class_names == ["ant", "bee", "cat"] and data.num_classes == 3 and len(data.val) == 6
    for j, i in enumerate(data.train.dataset.indices):  # the items carry their folder's label
        assert data.train.dataset[j][1] == next(k for k, c in enumerate(RANGES) if i in RANGES[c])
    again = fd.build_finetune_data(make_args(data_path=tree, shots=3))
    assert again.train.dataset.indices == data.train.dataset.indices
    other = fd.build_finetune_data(make_args(data_path=tree, shots=3, seed=1))
    assert other.train.dataset.indices != data.train.dataset.indices
    assert {c: len(v) for c, v in chosen_per_class(other).items()} == {"ant": 3, "bee": 3, "cat": 3}


@pytest.mark.parametrize("fraction, want", [(0.5, {"ant": 6, "bee": 4, "cat": 5}),  # 3.5 -> 4, 4.5 -> 5
                                            (0.01, {"ant": 1, "bee": 1, "cat": 1}),  # at least one
                                            (1.0, TRAIN_COUNTS)])
def test_train_fraction_counts_per_class(tree, fraction, want):
    data = fd.build_finetune_data(make_args(data_path=tree, train_fraction=fraction))
    assert {c: len(v) for c, v in chosen_per_class(data).items()} == want
    assert data.subset["kind"] == "fraction" and data.subset["n_train"] == sum(want.values()) == len(data.train)


def test_all_images_without_a_subset(tree):
    data = fd.build_finetune_data(make_args(data_path=tree))
    assert len(data.train) == 28 and data.subset == {"kind": "all", "n_train": 28}
    assert "3 classes" in data.description and "\n" not in data.description


def _error(tmp_path_or_tree, **kw):
    with pytest.raises(ValueError) as exc:
        fd.build_finetune_data(make_args(**kw))
    msg = str(exc.value)
    assert "\n" not in msg, msg
    return msg


def test_subset_errors_are_one_line_and_start_with_the_flag(tree):
    msg = _error(tree, data_path=tree, shots=8)
    assert msg.startswith("--shots: 8 ") and "'bee'" in msg and "7" in msg, msg
    assert _error(tree, data_path=tree, shots=0).startswith("--shots: "), "K < 1"
    for bad in (0.0, 1.5, -0.2, math.nan):
        assert _error(tree, data_path=tree, train_fraction=bad).startswith("--train-fraction: ")
    msg = _error(tree, data_path=tree, shots=2, train_fraction=0.5)
    assert msg.startswith("--shots: ") and "--train-fraction" in msg, msg
    assert _error(tree, dataset="faces", shots=71).startswith("--shots: 71 ")


def test_data_path_errors(tmp_path):
    msg = _error(tmp_path, data_path=tmp_path / "nowhere")
    assert msg.startswith("--data-path: ") and "nowhere" in msg, msg
    root = make_tree(tmp_path / "noval", val={})  # train/ only
    msg = _error(root, data_path=root)
    assert msg.startswith("--data-path: ") and "no val/" in msg and str(root) in msg, msg
    root = make_tree(tmp_path / "notrain", train={}, val={"ant": 1})
    msg = _error(root, data_path=root)
    assert msg.startswith("--data-path: ") and "no train/" in msg, msg
    root = make_tree(tmp_path / "extra", val={"ant": 1, "bee": 1, "cat": 1, "dog": 1})
    msg = _error(root, data_path=root)
    assert msg.startswith("--data-path: ") and "'dog'" in msg, msg
    root = make_tree(tmp_path / "fewer", val={"ant": 1, "bee": 1})
    msg = _error(root, data_path=root)
    assert msg.startswith("--data-path: ") and "'cat'" in msg, msg
    root = make_tree(tmp_path / "empty", val={"ant": 0, "bee": 0, "cat": 0})  # class folders, no images
    msg = _error(root, data_path=root)
    assert msg.startswith("--data-path: ") and "val" in msg, msg


def test_unreadable_image_is_skipped_with_a_warning(tree):
    (tree / "train" / "ant" / "03.png").write_bytes(b"not a png")
    data = fd.build_finetune_data(make_args(data_path=tree))
    with pytest.warns(RuntimeWarning, match="03.png"):
        x, y = data.train[3]
    assert x.shape == (3, 32, 32) and y == 0
    assert torch.equal(data.train[3][0], x)  # the same substitute again


# ---- the seeded augmentation ---------------------------------------------------------------------------------

class Pictures(torch.utils.data.Dataset):
    """n random 40 x 48 RGB pictures, labels i % 3."""

    classes = ["a", "b", "c"]

    def __init__(self, n=8):
        g = np.random.default_rng(5)
        self.images = [Image.fromarray(g.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(n)]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], i % 3


def seeded(n=8, seed=3, **kw):
    return fd.SeededTransform(Pictures(n), fd.train_transform(32, **kw), seed=seed)


def test_item_depends_only_on_seed_epoch_index():
    ds = seeded()
    first = [ds[i][0] for i in range(len(ds))]
    random.random(), np.random.rand(3), torch.rand(5)  # whatever the caller drew before
    random.seed(123), np.random.seed(7), torch.manual_seed(99)
    assert all(torch.equal(ds[i][0], first[i]) for i in reversed(range(len(ds))))
    assert all(torch.equal(seeded()[i][0], first[i]) for i in (0, 5))  # a fresh wrapper, the same items
    assert not torch.equal(seeded(seed=4)[0][0], first[0])
    ds.set_epoch(1)
    assert all(not torch.equal(ds[i][0], first[i]) for i in range(len(ds)))
    ds.set_epoch(0)
    assert torch.equal(ds[2][0], first[2])


def test_global_rng_states_are_left_alone():
    ds = seeded()
    random.seed(11), np.random.seed(12), torch.manual_seed(13)
    py, npy, pt = random.getstate(), np.random.get_state(), torch.get_rng_state()
    ds[1], ds[4]
    assert random.getstate() == py and torch.equal(torch.get_rng_state(), pt)
    now = np.random.get_state()
    assert now[0] == npy[0] and np.array_equal(now[1], npy[1]) and now[2:] == npy[2:]
    assert random.random() == random.Random(11).random()  # the next draws are the caller's own
    assert np.random.rand() == np.random.RandomState(12).rand()


@pytest.mark.parametrize("workers", [0, 2])
def test_dataloader_workers_and_order_give_the_same_items(workers):
    ds = seeded()
    ds.set_epoch(2)
    want = torch.stack([ds[i][0] for i in range(len(ds))])
    order = [5, 0, 7, 2, 6, 1, 4, 3]
    loader = torch.utils.data.DataLoader(ds, batch_size=3, sampler=order, num_workers=workers)
    got = torch.cat([x for x, _ in loader])
    assert torch.equal(got, want[order])


# ---- timm's transforms ---------------------------------------------------------------------------------------

def test_randaugment_changes_the_images():
    plain, aug = seeded(reprob=0.0, auto_augment=None), seeded(reprob=0.0)
    changed = sum(not torch.equal(plain[i][0], aug[i][0]) for i in range(8))
    assert changed >= 4, changed  # each of RandAugment's 2 ops fires with p = 0.5
    a = [aug[i][0] for i in range(8)]
    aug.set_epoch(1)
    assert all(not torch.equal(aug[i][0], a[i]) for i in range(8))


def test_random_erasing_puts_a_box_of_unit_normal_noise():
    kept, erased = seeded(reprob=0.0), seeded(reprob=1.0)
    noise = []
    for i in range(8):
        a, b = kept[i][0], erased[i][0]
        diff = a != b
        assert torch.equal(diff[0], diff[1]) and torch.equal(diff[0], diff[2])  # the same box in all channels
        rows, cols = diff[0].any(1).nonzero().flatten(), diff[0].any(0).nonzero().flatten()
        assert len(rows) and len(cols), i
        box = diff[0, rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        assert box.all() and box.sum() == diff[0].sum(), i  # one filled rectangle, nothing outside it
        assert 0.015 * 32 * 32 <= box.numel() <= 32 * 32 / 3 + 40  # timm: 2 % to 1/3 of the area
        noise.append(b[diff])
    noise = torch.cat(noise)
    assert abs(noise.mean()) < 0.1 and 0.9 < noise.std() < 1.1, (noise.mean(), noise.std())


def test_eval_transform_is_a_centre_crop_of_a_resize():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8))
    # short side 40 -> floor(32 / 0.875) = 36, long 60 -> 54; centre 32: left (54 - 32) / 2 = 11, top 2
    small = np.asarray(img.resize((54, 36), Image.BICUBIC), dtype=np.float64)[2:34, 11:43] / 255
    want = torch.from_numpy(((small - MEAN) / STD).transpose(2, 0, 1)).float()
    got = fd.eval_transform(32)(img)
    assert got.shape == (3, 32, 32) and torch.allclose(got, want, atol=1e-5)


# ---- built-in data -------------------------------------------------------------------------------------------

def _overlap(a, b):
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def test_photo_crops_come_from_disjoint_regions_and_are_fixed():
    train, val = fd.PhotoSquares("train", 5), fd.PhotoSquares("val", 3)
    photos = load_photos()
    assert len(train.classes) == len(val.classes) == len(photos) == 17
    assert train.targets == [c for c in range(17) for _ in range(5)] and len(val) == 51
    for c, photo in enumerate(photos):
        w, h = photo.size
        tb = [b for label, b in train.boxes if label == c]
        vb = [b for label, b in val.boxes if label == c]
        cut = round(0.7 * max(w, h))
        for b in tb + vb:
            assert 0 <= b[0] < b[2] <= w and 0 <= b[1] < b[3] <= h and b[2] - b[0] == b[3] - b[1]
        axis = 0 if w >= h else 1  # the train region is the first 70 % of the longer side
        assert all(b[axis + 2] <= cut for b in tb) and all(b[axis] >= cut for b in vb)
        assert not any(_overlap(t, v) for t in tb for v in vb)
    label, (l, t, r, b) = train.boxes[7]
    img, y = train[7]
    assert y == label == 1 and np.array_equal(np.asarray(img), np.asarray(photos[1])[t:b, l:r])
    assert fd.PhotoSquares("train", 5).boxes == train.boxes  # the same crops in every run


def test_builtin_photos_data():
    data = fd.build_finetune_data(make_args(dataset="photos", train_per_class=2, val_per_class=1, shots=1))
    assert data.num_classes == 17 and len(data.train) == 17 and len(data.val) == 17
    base = data.train.dataset.dataset
    assert all(base[i][0].size[0] <= 64 for i in range(0, len(base), 5))  # stored at most 2 x 32 px
    x0 = data.train[4][0]
    data.train.set_epoch(1)
    assert data.train[4][1] == 4 and x0.shape == (3, 32, 32) and not torch.equal(data.train[4][0], x0)
    v = data.val[3][0]
    data.val.set_epoch(5)
    assert torch.equal(data.val[3][0], v)


def test_builtin_faces_140_train_60_val():
    data = fd.build_finetune_data(make_args(dataset="faces"))
    assert data.num_classes == 2 and len(data.train) == 140 and len(data.val) == 60
    train, val = data.train.dataset, data.val.dataset
    assert sorted(train.targets) == [0] * 70 + [1] * 70 and sorted(val.targets) == [0] * 30 + [1] * 30
    images, labels = load_faces()
    img, y = val[0]  # the first held-out face: lfw index 70
    assert y == labels[70] == 1 and img.mode == "RGB" and img.size == (25, 25)
    assert np.array_equal(np.asarray(img)[..., 1], np.round(images[70] * 255).astype(np.uint8))
    x, y = data.train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32


def test_randaugment_posterize_at_the_top_magnitude_gives_a_black_image_instead_of_an_error():
    """"inc1" posterize at magnitude 10 keeps 0 bits: the released code's Pillow made the image black; a newer
    Pillow raises, which stopped fine-tuning runs about once in 45 posterize draws."""
    ops = [op for t in fd.train_transform(32).transforms for op in getattr(t, "ops", ())
           if op.name.startswith("Posterize")]
    assert ops
    img = Image.fromarray(np.random.default_rng(0).integers(1, 256, (32, 32, 3), dtype=np.uint8))
    for op in ops:
        op.prob, op.magnitude, op.magnitude_std = 1.0, 10.0, 0.0
        assert not np.asarray(op(img)).any()
        op.magnitude = 5.0  # 4 - int(5 / 10 * 4) = 2 bits kept: the low 6 bits are cleared
        out = np.asarray(op(img))
        assert out.any() and not (out & 0b111111).any()
