"""The pre-training data: an endless, resumable stream of uint8 batches on the device (built-in photo crops,
an ImageFolder, or one synthetic batch), and the fixed images the progress pictures show."""

from __future__ import annotations

from typing import Optional

import torch

from . import data as D
from ..cli import ArgError


def build_dataset(args, seed: int):
    transform = D.MFMTransform(args.img_size, scale=(args.min_crop_scale, 1.0))
    if args.method == "folk":
        transform = D.TwoViews(transform, jitter=args.color_jitter, p_jitter=args.jitter_p, p_grey=args.grey_p)
    if args.data_path is not None:
        return D.FolderImages(args.data_path, transform, seed=seed, count_skips=True)
    return D.PhotoCrops(args.img_size, split="train", length=args.samples_per_epoch, seed=seed, transform=transform)


def sample_images(args, num: int, seed: int = 0, data_path: Optional[str] = None) -> torch.Tensor:
    """`num` fixed uint8 images (N, 3, S, S) for pictures: held-out photo crops, or the first images of data_path."""
    if data_path is None and args.data_path is None and args.synthetic:
        return torch.randint(0, 256, (num, 3, args.img_size, args.img_size), dtype=torch.uint8,
                             generator=torch.Generator().manual_seed(seed))
    path = data_path if data_path is not None else args.data_path
    if path is not None:
        ds = D.FolderImages(D.check_data_path(path), D.CenterCrop(args.img_size), seed=seed)
        idx = torch.linspace(0, len(ds) - 1, num).round().long().tolist()
    else:
        ds = D.PhotoCrops(args.img_size, split="val", length=num, seed=seed, transform=D.SquareCrops(args.img_size))
        idx = list(range(num))
    return torch.stack([ds[i][0] for i in idx])




class Batches:
    """Endless per-process uint8 batches (B, 3, S, S) ((B, 2, 3, S, S) view pairs for --method folk) on the device,
    resumable at (epoch, batch_in_epoch).

    Data: --synthetic (one random batch made on the device), --data-path (ImageFolder) or the built-in
    photo crops; a seeded DistributedSampler shards and shuffles each epoch; batches are counted before
    they are handed out, so a checkpoint taken after a step resumes with the next batch."""

    def __init__(self, args, rank: int, world: int, device: torch.device):
        self.args, self.device, self.epoch, self.batch_in_epoch = args, device, 0, 0
        self.unreadable = 0  # image reads skipped (unreadable files; FolderImages warns per file)
        if args.synthetic:
            views = (2,) if args.method == "folk" else ()
            self.fixed = torch.randint(0, 256, (args.batch_size, *views, 3, args.img_size, args.img_size), dtype=torch.uint8,
                                       generator=torch.Generator(device).manual_seed(args.seed + rank), device=device)
            self.per_epoch = max(1, args.samples_per_epoch // (args.batch_size * world))
            return
        try:
            self.dataset = build_dataset(args, args.seed)
        except ValueError as exc:  # an --data-path without images
            raise ArgError(str(exc)) from None
        self.sampler = D.ResumableSampler(self.dataset, num_replicas=world, rank=rank, shuffle=True, seed=args.seed,
                                          drop_last=True)
        self.loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=args.batch_size, sampler=self.sampler, num_workers=args.num_workers,
            drop_last=True, pin_memory=device.type == "cuda" and not args.no_pin_memory,
            generator=torch.Generator().manual_seed(args.seed))  # keeps the global RNG untouched
        self.per_epoch = len(self.sampler) // args.batch_size
        if self.per_epoch == 0:
            raise ArgError(f"--batch-size: {args.batch_size} x {world} processes is more than the "
                           f"{len(self.dataset)} images of an epoch")

    def __iter__(self):
        while True:
            if self.args.synthetic:
                for _ in range(self.per_epoch - self.batch_in_epoch):
                    self.batch_in_epoch += 1
                    yield self.fixed
            else:
                self.sampler.set_epoch(self.epoch)
                self.dataset.set_epoch(self.epoch)
                self.sampler.start = self.batch_in_epoch * self.args.batch_size
                for x, _, *skips in self.loader:
                    if skips:  # FolderImages(count_skips=True): unreadable files passed over for each item
                        self.unreadable += int(skips[0].sum())
                    self.batch_in_epoch += 1
                    yield x.to(self.device, non_blocking=True)
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

