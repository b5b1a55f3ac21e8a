"""The fine-tuning data: timm's train and eval transforms, ImageFolder and built-in sets, few-shot subsets.

Datasets give (PIL RGB image, label) and carry ``classes`` (names, in label order) and ``targets`` (the label of
each item); :class:`SeededTransform` turns them into (float tensor (3, S, S), label) items. timm's transforms draw
from Python's ``random``, NumPy's and torch's global generators: :class:`SeededTransform` seeds all three from
(seed, epoch, index) around each call and puts the caller's states back, so an item depends only on
(seed, epoch, index), never on the worker, the order or the main process's RNG (bit-identical ``--resume``, DDP
ranks independent of their workers).

Built-in data needing no download (see :mod:`mfm_fast.train.data`):

- "photos": scikit-image's 17 bundled photos, one class each; ``per_class`` fixed square crops of each photo's
  "train" region (:func:`data.split_box`: the first 70 % of its longer side) for training and of its held-out
  "val" region for validation. The crops are the same in every run (they depend on neither the seed nor the
  epoch); the train transform adds the augmentation.
- "faces": lfw_subset, 100 faces + 100 non-faces (25 x 25 grey, as RGB): the first 70 of each for training,
  the last 30 for validation.
"""

from __future__ import annotations

import contextlib
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset

from ..cli import ArgError
from .data import SKIMAGE_PHOTOS, FolderImages, load_faces, load_photos, sample_rng, split_box

RECIPE_AUTO_AUGMENT = "rand-m9-mstd0.5-inc1"
FACE_CLASSES = ("non-face", "face")  # load_faces: label 1 = face


# ---- transforms -------------------------------------------------------------------------------------------

def train_transform(img_size: int, auto_augment: Optional[str] = RECIPE_AUTO_AUGMENT, reprob: float = 0.25,
                    color_jitter: float = 0.0, interpolation: str = "bicubic",
                    scale: Tuple[float, float] = (0.08, 1.0)):
    """PIL image -> normalised float tensor (3, S, S): timm's training transform (the released MFM recipe):
    RandomResizedCrop(S, scale, bicubic) + horizontal flip, RandAugment ``auto_augment`` (None: none), ImageNet
    mean / std, random erasing with probability ``reprob`` ("pixel" mode: N(0, 1) noise, one box). Colour jitter
    applies only without RandAugment (timm's rule); 0 adds none. Draws from the global RNGs: wrap it in
    :class:`SeededTransform`."""
    from timm.data import create_transform
    transform = create_transform(img_size, is_training=True, auto_augment=auto_augment or None, re_prob=reprob,
                                 re_mode="pixel", re_count=1, color_jitter=color_jitter or None,
                                 interpolation=interpolation, scale=tuple(scale))
    for t in getattr(transform, "transforms", ()):
        for op in getattr(t, "ops", ()):  # timm's RandAugment
            if getattr(op, "name", "").startswith("Posterize"):
                op.aug_fn = posterize
    return transform


def posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's RandAugment posterize, also for 0 bits: "inc1" at the top magnitude (m9 + 0.5 noise reaches the
    clip at 10 about once in 45 draws) keeps 0 bits, which Pillow < 10 turned into a black image (the released
    code's behaviour) and Pillow >= 10 refuses with a ValueError that stops the run."""
    from PIL import ImageOps
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point([0] * 256 * len(img.getbands()))
    return ImageOps.posterize(img, bits_to_keep)


def eval_transform(img_size: int):
    """PIL image -> normalised float tensor (3, S, S): resize the short side to S / 0.875 (256 for 224, bicubic),
    centre crop S, ImageNet mean / std (timm.data.create_transform, is_training=False)."""
    from timm.data import create_transform
    return create_transform(img_size, is_training=False, interpolation="bicubic", crop_pct=0.875)


@contextlib.contextmanager
def seeded_globals(seed: int, epoch: int, index: int):
    """Python's random, NumPy's and torch's CPU global generators seeded from (seed, epoch, index) inside the
    block; the caller's states are put back afterwards (CUDA generators are not touched)."""
    rng = sample_rng(seed, epoch, index)
    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        random.seed(rng.getrandbits(64))
        np.random.seed(rng.getrandbits(32))
        torch.default_generator.manual_seed(rng.getrandbits(63))
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])


class SeededTransform(Dataset):
    """(image, label) items -> (transform(image), label); item i of epoch e is computed inside
    :func:`seeded_globals` (seed, e, i). Call ``set_epoch(e)`` before each epoch's DataLoader iterator (with
    ``persistent_workers`` the workers keep the epoch they started with)."""

    def __init__(self, dataset: Dataset, transform: Callable, seed: int = 0,
                 classes: Optional[Sequence[str]] = None):
        self.dataset, self.transform, self.seed, self.epoch = dataset, transform, int(seed), 0
        base = dataset.dataset if isinstance(dataset, Subset) else dataset
        self.classes = list(classes if classes is not None else base.classes)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        img, label = self.dataset[index]
        with seeded_globals(self.seed, self.epoch, int(index)):
            return self.transform(img), label

    def __repr__(self) -> str:
        return f"SeededTransform({len(self)} items, seed={self.seed}, epoch={self.epoch}, {self.transform!r})"


# ---- datasets ---------------------------------------------------------------------------------------------

def _as_is(img, rng=None):
    return img


class FolderSplit(FolderImages):
    """One ImageFolder split (root/class/img.jpg) as (PIL RGB image, label) items. Unreadable images are skipped
    as in :class:`data.FolderImages`: a warning names the file once and the next readable image of the split
    (in file order; maybe of another class, maybe outside a few-shot subset) stands in for it, the same one every
    epoch. No class folders, an empty class folder or no images: ValueError naming ``flag``."""

    def __init__(self, root, flag: str = "--data-path"):
        super().__init__(root, _as_is, flag=flag)

    @property
    def classes(self) -> List[str]:
        return self.folder.classes

    @property
    def targets(self) -> List[int]:
        return self.folder.targets


def square_box(region: Tuple[int, int, int, int], rng: random.Random, min_frac: float = 0.5):
    """A random square (left, top, right, bottom) inside ``region``: side U(min_frac, 1) x its short side
    (:class:`data.SquareCrops`' draw)."""
    x0, y0, x1, y1 = region
    side = max(1, int(round(min(x1 - x0, y1 - y0) * rng.uniform(min_frac, 1.0))))
    left, top = x0 + rng.randint(0, x1 - x0 - side), y0 + rng.randint(0, y1 - y0 - side)
    return left, top, left + side, top + side


class PhotoSquares(Dataset):
    """Fixed square crops of the built-in photos, one class per photo: item label x per_class + k is crop k of
    photo ``label``'s ``split`` region; items are (PIL RGB image, label).

    Crop k of a photo comes from its own RNG ("photos:split:label:k"), so the crops depend on neither seed nor
    epoch, and a larger ``per_class`` extends the list. ``side`` (optional) caps the stored side: larger crops
    are resized (bicubic) to ``side`` px when read, which keeps loading cheap at small image sizes.
    ``boxes[i]`` = (label, (left, top, right, bottom)) in the photo's pixels.
    """

    def __init__(self, split: str, per_class: int, side: Optional[int] = None, min_frac: float = 0.5,
                 train_frac: float = 0.7, names: Sequence[str] = SKIMAGE_PHOTOS):
        self.photos, self.classes, self.side = load_photos(names), list(names), side
        self.boxes = []
        for label, photo in enumerate(self.photos):
            region = split_box(photo.width, photo.height, split, train_frac)
            self.boxes += [(label, square_box(region, random.Random(f"photos:{split}:{label}:{k}"), min_frac))
                           for k in range(per_class)]
        self.targets = [label for label, _ in self.boxes]

    def __len__(self) -> int:
        return len(self.boxes)

    def __getitem__(self, index: int):
        label, box = self.boxes[index]
        photo = self.photos[label]
        if self.side is not None and box[2] - box[0] > self.side:
            return photo.resize((self.side, self.side), Image.BICUBIC, box=box), label
        return photo.crop(box), label


class FaceImages(Dataset):
    """lfw_subset's 25 x 25 grey images as RGB PIL images: "train" = faces 0-69 and non-faces 100-169, "val" =
    faces 70-99 and non-faces 170-199; labels 0 = non-face, 1 = face."""

    def __init__(self, split: str):
        if split not in ("train", "val"):
            raise ValueError(f"split: expected 'train' or 'val', got {split!r}")
        images, labels = load_faces()
        keep = [i for i in range(len(images)) if (i % 100 < 70) == (split == "train")]
        pixels = np.clip(np.round(images[keep] * 255), 0, 255).astype(np.uint8)
        self.images = [Image.fromarray(p).convert("RGB") for p in pixels]
        self.targets = [int(labels[i]) for i in keep]
        self.classes = list(FACE_CLASSES)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.images[index], self.targets[index]


def folder_splits(data_path) -> Tuple[FolderSplit, FolderSplit]:
    """The train/ and val/ ImageFolders under ``data_path``, with the same classes; ArgError naming --data-path."""
    root = Path(str(data_path)).expanduser()
    if not root.is_dir():
        raise ArgError(f"--data-path: {str(data_path)!r} is not a directory (expected a root with train/ and val/ "
                       "ImageFolders)")
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise ArgError(f"--data-path: {root} has no {split}/ folder (expected train/ and val/ ImageFolders)")
    train, val = FolderSplit(root / "train"), FolderSplit(root / "val")
    if val.classes != train.classes:
        extra = [c for c in val.classes if c not in train.classes]
        missing = [c for c in train.classes if c not in val.classes]
        what = "; ".join(part for part in (
            extra and f"val/ has classes that train/ lacks: {', '.join(map(repr, extra))}",
            missing and f"val/ lacks the train/ classes {', '.join(map(repr, missing))}") if part)
        raise ArgError(f"--data-path: the class folders of {root}/val differ from those of train/ ({what})")
    return train, val


# ---- few-shot and fraction subsets ------------------------------------------------------------------------

def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def choose_subset(targets: Sequence[int], class_names: Sequence[str], seed: int, shots: Optional[int] = None,
                  fraction: Optional[float] = None) -> Tuple[List[int], dict]:
    """The training items to keep: ``shots`` per class, or round(fraction x n_c) (half up, at least 1) of each
    class c, drawn without replacement (one torch.Generator seeded with ``seed``, classes in label order), or all.

    Returns (sorted indices into ``targets``, the log's record: {"kind": "shots" | "fraction" | "all", "k" or
    "fraction", "indices_per_class": {name: sorted indices}, "n_train"}). Bad values: ArgError naming the flag."""
    if shots is not None and fraction is not None:
        raise ArgError(f"--shots: give --shots or --train-fraction, not both (got --shots {shots} and "
                       f"--train-fraction {fraction})")
    per_class = [[] for _ in class_names]
    for i, t in enumerate(targets):
        per_class[t].append(i)
    if shots is None and fraction is None:
        return list(range(len(targets))), {"kind": "all", "n_train": len(targets)}
    if shots is not None:
        if shots < 1:
            raise ArgError(f"--shots: must be >= 1, got {shots}")
        smallest = min(range(len(class_names)), key=lambda c: len(per_class[c]))
        n = len(per_class[smallest])
        if shots > n:
            raise ArgError(f"--shots: {shots} is more than the {n} images of the smallest class "
                           f"{class_names[smallest]!r}; use at most {n}")
        counts, record = [shots] * len(class_names), {"kind": "shots", "k": int(shots)}
    else:
        if not 0 < fraction <= 1:
            raise ArgError(f"--train-fraction: must be in (0, 1], got {fraction}")
        counts = [max(1, _round_half_up(fraction * len(idx))) for idx in per_class]
        record = {"kind": "fraction", "fraction": float(fraction)}
    g = torch.Generator().manual_seed(int(seed))
    chosen = {}
    for name, idx, k in zip(class_names, per_class, counts):
        order = torch.randperm(len(idx), generator=g)[:k].tolist()
        chosen[name] = sorted(idx[j] for j in order)
    indices = sorted(i for idx in chosen.values() for i in idx)
    return indices, {**record, "indices_per_class": chosen, "n_train": len(indices)}


# ---- the entry point --------------------------------------------------------------------------------------

@dataclass
class FinetuneData:
    """What ``python -m mfm_fast.finetune`` trains and evaluates on."""

    train: SeededTransform  # (float (3, S, S), label) items of the chosen subset, augmented
    val: SeededTransform  # (float (3, S, S), label), eval_transform
    num_classes: int
    class_names: List[str]
    subset: Dict = field(default_factory=dict)  # choose_subset's record, for log.jsonl
    description: str = ""  # one line for the run header


def build_finetune_data(args) -> FinetuneData:
    """The train and val sets of a fine-tuning run.

    Reads ``args``: data_path (None: the built-in ``dataset``, "photos" or "faces"), img_size, seed (subset and
    augmentation), shots, train_fraction, auto_augment, reprob, color_jitter, and for the photos train_per_class
    and val_per_class; missing optional attributes take the defaults of the command. Bad values: ArgError
    (a ValueError) whose message starts with the flag."""
    size, seed = int(args.img_size), int(args.seed)
    data_path = getattr(args, "data_path", None)
    if data_path is not None:
        train, val = folder_splits(data_path)
        what = f"ImageFolder {data_path}"
    else:
        dataset = getattr(args, "dataset", "photos")
        if dataset == "photos":
            n_train, n_val = int(getattr(args, "train_per_class", 64)), int(getattr(args, "val_per_class", 16))
            train, val = PhotoSquares("train", n_train, side=2 * size), PhotoSquares("val", n_val, side=2 * size)
            what = "built-in photos (scikit-image, one class per photo, square crops of held-out regions for val)"
        elif dataset == "faces":
            train, val = FaceImages("train"), FaceImages("val")
            what = "built-in faces (scikit-image lfw_subset, 25 px grey, face / non-face)"
        else:
            raise ArgError(f"--dataset: expected 'photos' or 'faces', got {dataset!r}")
    names = list(train.classes)
    indices, subset = choose_subset(train.targets, names, seed, getattr(args, "shots", None),
                                    getattr(args, "train_fraction", None))
    chosen = train if subset["kind"] == "all" else Subset(train, indices)
    augment = train_transform(size, getattr(args, "auto_augment", RECIPE_AUTO_AUGMENT),
                              getattr(args, "reprob", 0.25), getattr(args, "color_jitter", 0.0))
    taken = {"all": "", "shots": f" ({subset.get('k')} shots per class)",
             "fraction": f" ({subset.get('fraction')} of each class)"}[subset["kind"]]
    description = (f"{what}: {len(names)} classes, {len(indices)} train images{taken}, {len(val)} val images, "
                   f"{size} px")
    return FinetuneData(train=SeededTransform(chosen, augment, seed, classes=names),
                        val=SeededTransform(val, eval_transform(size), seed, classes=names),
                        num_classes=len(names), class_names=names, subset=subset, description=description)
