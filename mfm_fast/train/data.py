"""Data for pre-training and the linear probe: the MFM augmentation and a built-in photo dataset.

Every random choice of a sample is drawn from its own ``random.Random("seed:epoch:index")``, so
a sample depends only on (seed, epoch, index), never on the worker that loads it or on the global
RNG: a resumed run sees exactly the crops an uninterrupted run would have seen.

Samples are uint8 tensors (3, S, S) (a quarter of the bytes of float32 through the loader and the
host-to-device copy); the trainer converts and normalises them on the device.

Built-in data needing no download: the natural photographs that scikit-image (>= 0.25) ships
inside its wheel under ``skimage/data`` (:data:`SKIMAGE_PHOTOS`), and ``lfw_subset.npy`` (100
faces + 100 non-faces, 25 x 25 grey). Each photo is split once: the first ``train_frac`` of its
longer side is the "train" region, the rest the held-out "val" region, so a probe evaluated on
val crops never sees pixels that pre-training or the probe's training saw.
"""

from __future__ import annotations

import functools
import math
import os
import random
import warnings
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, DistributedSampler

# Natural photographs bundled in scikit-image's wheel (colour first, then grey); the synthetic
# test patterns (chessboard, phantom, logo, text, ...) are left out.
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "hubble_deep_field", "ihc", "motorcycle_left",
                  "motorcycle_right", "retina", "rocket",
                  "brick", "camera", "cell", "clock_motion", "coins", "grass", "gravel", "moon")
_EXTS = (".png", ".jpg")


def skimage_data_dir() -> Path:
    """The folder ``skimage/data`` of the installed scikit-image (no network access)."""
    try:
        import skimage
    except ImportError as exc:
        raise ImportError("the built-in photos need scikit-image >= 0.25 (its wheel bundles them): "
                          "pip install -e '.[train]' (or pip install 'scikit-image>=0.25')") from exc
    return Path(skimage.__file__).parent / "data"


def load_photos(names: Sequence[str] = SKIMAGE_PHOTOS) -> List[Image.Image]:
    """The bundled photos as RGB PIL images (grey ones converted to RGB), in ``names`` order (cached: do not
    modify them in place)."""
    return list(_load_photos(tuple(names)))


@functools.lru_cache(maxsize=4)
def _load_photos(names: Tuple[str, ...]) -> Tuple[Image.Image, ...]:
    folder, photos = skimage_data_dir(), []
    for name in names:
        path = next((folder / (name + ext) for ext in _EXTS if (folder / (name + ext)).exists()), None)
        if path is None:
            raise FileNotFoundError(f"photo {name!r} is not in {folder}; scikit-image >= 0.25 bundles "
                                    f"{', '.join(SKIMAGE_PHOTOS)}")
        with Image.open(path) as img:
            photos.append(img.convert("RGB"))
    return tuple(photos)


def load_faces() -> Tuple[np.ndarray, np.ndarray]:
    """scikit-image's lfw_subset: (200, 25, 25) float images in [0, 1] and labels (1 = face: the first 100)."""
    images = np.load(skimage_data_dir() / "lfw_subset.npy")
    labels = (np.arange(len(images)) < 100).astype(np.int64)
    return images, labels


def split_box(width: int, height: int, split: str, train_frac: float = 0.7) -> Tuple[int, int, int, int]:
    """(left, top, right, bottom) of a photo's "train" (first train_frac of the longer side) or "val" region."""
    if split not in ("train", "val", "all"):
        raise ValueError(f"split: expected 'train', 'val' or 'all', got {split!r}")
    if split == "all":
        return 0, 0, width, height
    if width >= height:
        cut = int(round(width * train_frac))
        return (0, 0, cut, height) if split == "train" else (cut, 0, width, height)
    cut = int(round(height * train_frac))
    return (0, 0, width, cut) if split == "train" else (0, cut, width, height)


def sample_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The private RNG of one sample (string seeds are hashed with SHA-512: the same in every process)."""
    return random.Random(f"{seed}:{epoch}:{index}")


def random_resized_crop_box(width: int, height: int, scale: Tuple[float, float], ratio: Tuple[float, float],
                            rng: random.Random) -> Tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params with an explicit RNG: (left, top, w, h).

    Area fraction ~ U(scale), log aspect ~ U(log ratio); 10 tries, then a centre crop."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def to_uint8_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 tensor (3, H, W)."""
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()


class MFMTransform:
    """The MFM augmentation: RandomResizedCrop(size, scale, bicubic) + horizontal flip -> uint8 (3, S, S).

    ``transform(img, rng, box=None)``: ``box`` (left, top, right, bottom) restricts the crop to a region.
    """

    def __init__(self, size: int, scale: Tuple[float, float] = (0.2, 1.0),
                 ratio: Tuple[float, float] = (3 / 4, 4 / 3), flip: bool = True):
        self.size, self.scale, self.ratio, self.flip = size, tuple(scale), tuple(ratio), flip

    def crop(self, img: Image.Image, rng: random.Random, box=None) -> Image.Image:
        """The cropped, resized, maybe flipped PIL image."""
        x0, y0, x1, y1 = box if box is not None else (0, 0, img.width, img.height)
        left, top, w, h = random_resized_crop_box(x1 - x0, y1 - y0, self.scale, self.ratio, rng)
        left, top = left + x0, top + y0
        out = img.resize((self.size, self.size), Image.BICUBIC, box=(left, top, left + w, top + h))
        if self.flip and rng.random() < 0.5:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        return out

    def __call__(self, img: Image.Image, rng: random.Random, box=None) -> torch.Tensor:
        return to_uint8_tensor(self.crop(img, rng, box))

    def __repr__(self) -> str:
        return f"MFMTransform(size={self.size}, scale={self.scale}, bicubic, flip={self.flip})"


class TwoViews:
    """FOLK's two augmented views of one image -> uint8 (2, 3, S, S).

    Each view: its own :class:`MFMTransform` crop and flip, then with probability ``p_jitter`` a colour
    jitter in random order (DINO's ColorJitter(0.4, 0.4, 0.2, 0.1) for ``jitter`` = 0.4: brightness and
    contrast factors in 1 +- jitter, saturation in 1 +- jitter / 2, hue shift in +- jitter / 4), then with
    probability ``p_grey`` conversion to grey (3 equal channels). ``jitter`` = 0 turns colour jitter off.
    All draws come from the sample's own RNG (see :func:`sample_rng`).
    """

    def __init__(self, base: MFMTransform, jitter: float = 0.4, p_jitter: float = 0.8, p_grey: float = 0.2):
        self.base, self.jitter, self.p_jitter, self.p_grey = base, float(jitter), float(p_jitter), float(p_grey)

    def view(self, img: Image.Image, rng: random.Random, box=None) -> torch.Tensor:
        import torchvision.transforms.functional as TF

        out = self.base.crop(img, rng, box)
        if self.jitter > 0 and rng.random() < self.p_jitter:
            j = self.jitter
            ops = [(TF.adjust_brightness, rng.uniform(max(0.0, 1 - j), 1 + j)),
                   (TF.adjust_contrast, rng.uniform(max(0.0, 1 - j), 1 + j)),
                   (TF.adjust_saturation, rng.uniform(max(0.0, 1 - j / 2), 1 + j / 2)),
                   (TF.adjust_hue, rng.uniform(-min(j / 4, 0.5), min(j / 4, 0.5)))]
            rng.shuffle(ops)
            for op, factor in ops:
                out = op(out, factor)
        if rng.random() < self.p_grey:
            out = out.convert("L").convert("RGB")
        return to_uint8_tensor(out)

    def __call__(self, img: Image.Image, rng: random.Random, box=None) -> torch.Tensor:
        return torch.stack([self.view(img, rng, box), self.view(img, rng, box)])

    def __repr__(self) -> str:
        return f"TwoViews({self.base!r}, jitter={self.jitter}, p_jitter={self.p_jitter}, p_grey={self.p_grey})"


class _Seeded(Dataset):
    """Base: per-sample RNG from (seed, epoch, index); call set_epoch(e) before each epoch's DataLoader iterator."""

    seed, epoch = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)


class PhotoCrops(_Seeded):
    """Crops of scikit-image's bundled photos; item i is a crop of photo i % P, its label.

    Args:
        split: "train" / "val" (regions of :func:`split_box`) or "all".
        length: number of items per epoch (a virtual length: crops are random).
        transform: called as transform(img, rng, box); default :class:`MFMTransform` (size).
    """

    def __init__(self, size: int, split: str = "train", length: int = 4096, seed: int = 0,
                 transform: Optional[Callable] = None, train_frac: float = 0.7,
                 names: Sequence[str] = SKIMAGE_PHOTOS):
        self.photos = load_photos(names)
        self.names = tuple(names)
        self.boxes = [split_box(p.width, p.height, split, train_frac) for p in self.photos]
        self.length, self.seed = int(length), int(seed)
        self.transform = transform if transform is not None else MFMTransform(size)

    @property
    def num_classes(self) -> int:
        return len(self.photos)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        label = index % len(self.photos)
        rng = sample_rng(self.seed, self.epoch, index)
        return self.transform(self.photos[label], rng, self.boxes[label]), label


class SquareCrops:
    """Probe transform: a random square of side U(min_frac, 1) x the region's short side, bicubic to size."""

    def __init__(self, size: int, min_frac: float = 0.5):
        self.size, self.min_frac = size, min_frac

    def __call__(self, img: Image.Image, rng: random.Random, box=None) -> torch.Tensor:
        x0, y0, x1, y1 = box if box is not None else (0, 0, img.width, img.height)
        side = max(1, int(round(min(x1 - x0, y1 - y0) * rng.uniform(self.min_frac, 1.0))))
        left, top = x0 + rng.randint(0, x1 - x0 - side), y0 + rng.randint(0, y1 - y0 - side)
        return to_uint8_tensor(img.resize((self.size, self.size), Image.BICUBIC,
                                          box=(left, top, left + side, top + side)))


class FolderImages(_Seeded):
    """An ImageFolder tree (root/class/xxx.jpg) with a seeded transform: items (uint8 (3, S, S), class index).

    A folder without class folders or images raises ValueError naming ``flag`` and the folder (at
    construction), and so does reading an item when no image of the folder can be decoded.
    Unreadable images (truncated or corrupt files, anything PIL cannot decode) are skipped: a warning names
    each file once per process and the next readable image of the list stands in for it (the same
    substitute every epoch and on every resume, so runs stay deterministic). With ``count_skips`` items are
    (image, label, number of files skipped for this item), for the trainer's log.
    """

    def __init__(self, root, transform: Callable, seed: int = 0, *, count_skips: bool = False,
                 flag: str = "--data-path"):
        from torchvision.datasets import ImageFolder
        try:
            self.folder = ImageFolder(str(root))
        except (FileNotFoundError, RuntimeError) as exc:  # no class folders / no image files
            raise ValueError(f"{flag}: {str(root)!r} holds no images ({exc}); expected an ImageFolder tree "
                             "root/class/img.jpg") from None
        self.transform, self.seed, self.count_skips, self.flag = transform, int(seed), count_skips, flag
        self._warned = set()

    @property
    def num_classes(self) -> int:
        return len(self.folder.classes)

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int):
        for skipped in range(len(self)):
            path, label = self.folder.samples[(index + skipped) % len(self)]
            try:
                img = self.folder.loader(path)  # decodes the whole file (convert("RGB")): truncation shows here
            except OSError as exc:  # PIL.UnidentifiedImageError, "image file is truncated", unreadable file
                if path not in self._warned:
                    self._warned.add(path)
                    warnings.warn(f"skipping unreadable image {path} ({type(exc).__name__}: {exc}); the next "
                                  "image stands in for it", RuntimeWarning, stacklevel=2)
                continue
            x = self.transform(img, sample_rng(self.seed, self.epoch, index))
            return (x, label, skipped) if self.count_skips else (x, label)
        raise ValueError(f"{self.flag}: none of the {len(self)} images under {self.folder.root} can be read")


class CenterCrop:
    """Evaluation transform: resize the shorter side to size / 0.875 (bicubic), centre crop size."""

    def __init__(self, size: int, crop_pct: float = 0.875):
        self.size, self.crop_pct = size, crop_pct

    def __call__(self, img: Image.Image, rng=None, box=None) -> torch.Tensor:
        img = img.convert("RGB")
        short = int(round(self.size / self.crop_pct))
        scale = short / min(img.width, img.height)
        img = img.resize((max(self.size, round(img.width * scale)), max(self.size, round(img.height * scale))),
                         Image.BICUBIC)
        left, top = (img.width - self.size) // 2, (img.height - self.size) // 2
        return to_uint8_tensor(img.crop((left, top, left + self.size, top + self.size)))


class ResumableSampler(DistributedSampler):
    """DistributedSampler (seeded shuffle, drop_last) that can start part-way into an epoch: ``start`` items."""

    start = 0

    def __iter__(self):
        indices = list(super().__iter__())
        return iter(indices[self.start:])

    def __len__(self) -> int:
        return super().__len__() - self.start


def check_data_path(path, flag: str = "--data-path") -> Path:
    """The folder, or a ValueError naming the flag."""
    p = Path(os.path.expanduser(str(path)))
    if not p.is_dir():
        raise ValueError(f"{flag}: {str(path)!r} is not a directory (expected an ImageFolder tree root/class/img.jpg)")
    return p
