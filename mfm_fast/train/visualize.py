"""Pictures of what MFM pre-training does: one PNG, one row per sample.

Columns: original | its log-magnitude spectrum with the removed frequencies shaded red |
corrupted input (what the encoder sees) | raw prediction | reconstruction | spectrum of the input |
spectrum of the reconstruction. The loss scores only the removed frequencies, so the raw
prediction's kept band (its mean colour, say) is unconstrained; the reconstruction takes the kept
frequencies from the image and the removed ones from the prediction:
ifft2(F(x) m + F(pred) (1 - m)), the picture of what the model predicted. Restoration tasks (no
mask) have no raw-prediction column: the reconstruction is the prediction. Spectra are
log(1 + |fftshift(fft2(grey image))|), DC in the centre, on the original's grey scale.

    python -m mfm_fast.visualize --checkpoint output/mfm_pretrain/checkpoint.pth
    python -m mfm_fast.visualize --checkpoint ckpt.pth --data-path /imagenet/val --num 6 --output vis.png

``--views folk`` needs no checkpoint: it draws the FOLK image-adaptive masks of one bundled photo, one
row per keep ratio: original | spectrum with the Com (dominant, kept) set in red | its centre zoomed |
Com view | RCom view | the spectrum of each view (:func:`save_mask_views`).

    python -m mfm_fast.visualize --views folk --output docs/folk_views.png --image astronaut \\
        --keep-ratio 0.005 0.01 0.05 --size 224
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from .._common import IMAGENET_MEAN, IMAGENET_STD, from_blocks, to_blocks
from .._optional import NEEDS, require
from .checkpoint import check_checkpoint, load_checkpoint
from .model import build_model, prediction
from .pretrain_data import sample_images
from .runtime import pick_device
from .tasks import Corruptor

PROG = "python -m mfm_fast.visualize"

COLUMNS = ("original", "spectrum, removed shaded", "corrupted input", "raw prediction", "reconstruction",
           "input spectrum", "reconstruction spectrum")


def _spectrum(z: torch.Tensor, patch_factor: int = 1) -> torch.Tensor:
    """fftshift(fft2(.)) of each pf x pf patch, laid out in its patch's place: (..., H, W) complex128."""
    return from_blocks(torch.fft.fftshift(torch.fft.fft2(to_blocks(z.double(), patch_factor)), dim=(-2, -1)),
                       patch_factor)


def log_spectrum(img: torch.Tensor, patch_factor: int = 1) -> np.ndarray:
    """(3, H, W) image -> (H, W) log(1 + |fftshift(fft2(mean over channels))|) (per patch with patch_factor)."""
    return torch.log1p(_spectrum(img.detach().cpu().mean(0), patch_factor).abs()).numpy()


def fill_removed(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, patch_factor: int = 1) -> torch.Tensor:
    """real(ifft2(ifftshift(F(target) m + F(pred) (1 - m)))), F = fftshift o fft2 (per patch with patch_factor,
    the mask then one tile per patch): (N, C, H, W), any space."""
    m = mask.double()[:, None]
    mixed = to_blocks(_spectrum(target, patch_factor) * m + _spectrum(pred, patch_factor) * (1 - m), patch_factor)
    return from_blocks(torch.fft.ifft2(torch.fft.ifftshift(mixed, dim=(-2, -1))).real, patch_factor).float()


def denormalize(z: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN,
                std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """Normalised (N, 3, H, W) -> pixels clamped to [0, 1]."""
    m = torch.tensor(mean, dtype=torch.float32, device=z.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=z.device).view(1, -1, 1, 1)
    return (z.float() * s + m).clamp(0, 1)


def save_grid(path, x: torch.Tensor, inp: torch.Tensor, pred: torch.Tensor, mask: Optional[torch.Tensor] = None,
              title: Optional[str] = None, mean=IMAGENET_MEAN, std=IMAGENET_STD,
              row_labels: Optional[Sequence[str]] = None, patch_factor: int = 1) -> Path:
    """Write the PNG grid; returns its path.

    Args:
        x: (N, 3, H, W) clean pixels in [0, 1] (or uint8).
        inp, pred: (N, 3, H, W) encoder input and prediction, in normalised space.
        mask: (N, H, W) fftshift-ed keep mask (1 = kept) or None (restoration tasks).
        row_labels: N row names (default with a mask: "low-pass" when DC is kept, else "high-pass").
        patch_factor: the masks are per-patch tiles of a pf x pf grid: spectra and the reconstruction are per patch.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = x.detach().float().cpu() / (255.0 if x.dtype == torch.uint8 else 1.0)
    pred = pred.detach().float().cpu()
    inp_px, pred_px = denormalize(inp.detach().cpu(), mean, std), denormalize(pred, mean, std)
    if mask is not None:
        m, s = (torch.tensor(v).view(1, -1, 1, 1) for v in (mean, std))
        rec_px = denormalize(fill_removed(pred, (x - m) / s, mask.detach().cpu(), patch_factor), mean, std)
        columns = COLUMNS
    else:
        rec_px, columns = pred_px, tuple(c for c in COLUMNS if c != "raw prediction")
    n = x.shape[0]
    fig, axes = plt.subplots(n, len(columns), figsize=(2.2 * len(columns), 2.3 * n + (0.4 if title else 0)),
                             squeeze=False)
    for i in range(n):
        spec = log_spectrum(x[i], patch_factor)
        lo, hi = float(spec.min()), float(spec.max())
        panels = [(x[i], None), (spec, "spec"), (inp_px[i], None)] + \
            ([(pred_px[i], None)] if mask is not None else []) + \
            [(rec_px[i], None), (log_spectrum(inp_px[i], patch_factor), "spec"),
             (log_spectrum(rec_px[i], patch_factor), "spec")]
        for j, (im, kind) in enumerate(panels):
            ax = axes[i][j]
            if kind == "spec":
                ax.imshow(im, cmap="gray", vmin=lo, vmax=hi)
            else:
                ax.imshow(im.permute(1, 2, 0).numpy())
            if j == 1 and mask is not None:
                removed = (1 - mask[i].detach().float().cpu()).numpy()
                overlay = np.zeros(removed.shape + (4,))
                overlay[..., 0], overlay[..., 3] = 1.0, 0.35 * removed
                ax.imshow(overlay)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(columns[j], fontsize=8)
        if row_labels is not None:
            axes[i][0].set_ylabel(row_labels[i], fontsize=8)
        elif mask is not None:
            kind = "low-pass" if float(mask[i][mask.shape[1] // 2, mask.shape[2] // 2]) == 1 else "high-pass"
            axes[i][0].set_ylabel(kind, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def _save(fig, path, dpi: int = 90, rect=(0, 0, 1, 1)) -> Path:
    """Lay the figure out within rect, write it atomically (a temporary file, then a rename), close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout(rect=rect)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path


VIEW_COLUMNS = ("original", "spectrum, Com set in red", "zoom: centre {zh} x {zw}", "Com view (keeps the set)",
                "RCom view (removes it)", "Com view spectrum", "RCom view spectrum")


def save_mask_views(path, x: torch.Tensor, keep_ratios: Sequence[float] = (0.01,), title: Optional[str] = None,
                    magnitude: str = "mean") -> Path:
    """Write the FOLK views of one image, one row per keep ratio; returns the PNG path.

    Columns: original | its log-magnitude spectrum with the Com (kept, dominant) set in red | the same,
    centre quarter zoomed | Com view | RCom view (``mfm_fast.corrupt`` inputs, de-normalised to pixels)
    | the spectrum of each view.
    x: (3, H, W) or (1, 3, H, W) pixels in [0, 1] (or uint8), H and W even.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .._validate import PIXEL_DTYPES, check_images
    from ..adaptive_masks import make_adaptive_masks
    from ..corruption import corrupt

    x = x[None] if isinstance(x, torch.Tensor) and x.dim() == 3 else x
    check_images("x", x, PIXEL_DTYPES)
    if x.shape[0] != 1 or x.shape[1] != 3:
        raise ValueError(f"x: expected one RGB image (3, H, W) or (1, 3, H, W), got shape {tuple(x.shape)}")
    if len(keep_ratios) == 0:
        raise ValueError("keep_ratios: expected at least one keep ratio (one row each)")
    x = x.detach().cpu()
    px = x[0].float() / (255.0 if x.dtype == torch.uint8 else 1.0)
    spec = log_spectrum(px)
    lo, hi = float(spec.min()), float(spec.max())
    height, width = px.shape[-2:]
    zoom = (slice(height // 2 - height // 8, height // 2 + height // 8 + 1),
            slice(width // 2 - width // 8, width // 2 + width // 8 + 1))
    columns = [c.format(zh=zoom[0].stop - zoom[0].start, zw=zoom[1].stop - zoom[1].start) for c in VIEW_COLUMNS]
    fig, axes = plt.subplots(len(keep_ratios), len(VIEW_COLUMNS), squeeze=False,
                             figsize=(2.6 * len(VIEW_COLUMNS), 2.75 * len(keep_ratios) + (0.4 if title else 0)))
    for i, ratio in enumerate(keep_ratios):
        masks = torch.cat([make_adaptive_masks(x, mode, ratio, magnitude=magnitude, backend="torch")
                           for mode in ("com", "rcom")])
        views = denormalize(corrupt(torch.cat([x, x]), masks, backend="torch"))
        kept = masks[0].numpy()
        marked = np.zeros(kept.shape + (4,))
        marked[..., 0], marked[..., 1], marked[..., 3] = 1.0, 0.1, kept
        panels = [(px, None), (spec, marked), (spec[zoom], marked[zoom]), (views[0], None), (views[1], None),
                  (log_spectrum(views[0]), None), (log_spectrum(views[1]), None)]
        for j, (im, overlay) in enumerate(panels):
            ax = axes[i][j]
            if im.ndim == 2:
                ax.imshow(im, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
            else:
                ax.imshow(im.permute(1, 2, 0).numpy())
            if overlay is not None:
                ax.imshow(overlay, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(columns[j], fontsize=9)
        axes[i][0].set_ylabel(f"keep_ratio {ratio:g}\nCom keeps {int(kept.sum())} of {height * width}", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.text(0.5, 0.005, "Views are the encoder inputs of mfm_fast.corrupt (real part, clamped to [0, 1]). DC is the "
             "largest frequency, so RCom removes the mean: its negative values clamp to 0 (dark).",
             ha="center", va="bottom", fontsize=8)
    return _save(fig, path, rect=(0, 0.03, 1, 1))


@torch.no_grad()
def render(net: torch.nn.Module, corruptor: Corruptor, x: torch.Tensor, path, title: Optional[str] = None,
           amp_dtype: Optional[torch.dtype] = None) -> Path:
    """Corrupt x (uint8 (N, 3, S, S); masks alternate low / high-pass, or Com / RCom), reconstruct with net,
    write the PNG grid (save_grid); returns its path. The corruptor's random stream is left where it was."""
    low = torch.arange(x.shape[0], device=x.device) % 2 == 0
    state = corruptor.gen.get_state()
    inp, _, mask = corruptor(x, low=low)
    corruptor.gen.set_state(state)  # pictures must not shift the training's random stream
    was_training = net.training
    net.eval()
    with torch.autocast(x.device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
        pred = prediction(net(inp))
    net.train(was_training)
    return save_grid(path, x, inp, pred.float(), mask, title=title, row_labels=corruptor.labels(low),
                     patch_factor=corruptor.pf)


def get_args_parser() -> argparse.ArgumentParser:
    from ..cli import OneLineParser
    p = OneLineParser(PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None,
                   help="a checkpoint written by python -m mfm_fast.pretrain (required unless --views)")
    p.add_argument("--data-path", default=None,
                   help="ImageFolder root to draw images from (default: the held-out 'val' regions of the "
                        "built-in scikit-image photos)")
    p.add_argument("--num", type=int, default=4, help="number of samples (rows); masks alternate low/high-pass")
    p.add_argument("--output", default=None,
                   help="PNG path (default: <checkpoint folder>/vis/checkpoint.png; folk_views.png with --views)")
    p.add_argument("--seed", type=int, default=0, help="seed of the crops and masks")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to run the model")
    views = p.add_argument_group("mask views (no checkpoint)")
    views.add_argument("--views", choices=("folk",), default=None,
                       help="draw the FOLK Com / RCom views of one photo instead of reconstructions")
    views.add_argument("--image", default="astronaut",
                       help="a scikit-image photo bundled offline (mfm_fast.train.data.SKIMAGE_PHOTOS); default astronaut")
    views.add_argument("--keep-ratio", type=float, nargs="+", default=[0.005, 0.01, 0.05],
                       help="Com's kept fractions in (0, 1), one row each (default 0.005 0.01 0.05)")
    views.add_argument("--size", type=int, default=224, help="side of the centre square crop (even; default 224)")
    views.add_argument("--magnitude", choices=("mean", "luminance"), default="mean",
                       help="the grey image whose spectrum picks the frequencies (default: channel mean)")
    return p


def check_output(parser: argparse.ArgumentParser, output: Optional[str]) -> None:
    """--output: a file path (its folder is created), not an existing folder."""
    if output is not None and (Path(output).is_dir() or not Path(output).name):
        parser.error(f"--output: {output!r} is a folder (expected a .png file path)")
    parent = Path(output).parent if output is not None else None
    while parent is not None and not parent.exists():
        parent = parent.parent
    if parent is not None and not parent.is_dir():
        parser.error(f"--output: {str(parent)!r} is a file, so {output!r} cannot be created (expected a .png path)")


def views_main(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Path:
    """--views folk: the centre square of a bundled photo, resized to --size, through save_mask_views."""
    from PIL import Image

    from . import data

    if args.checkpoint is not None:
        parser.error("--checkpoint: not used with --views (the views need no model)")
    if args.size < 2 or args.size % 2:
        parser.error(f"--size: must be even and >= 2, got {args.size}")
    for r in args.keep_ratio:
        if not 0 < r < 1:
            parser.error(f"--keep-ratio: each value must lie in (0, 1), got {r:g}")
    check_output(parser, args.output)
    if args.image not in data.SKIMAGE_PHOTOS:
        parser.error(f"--image: expected one of {', '.join(data.SKIMAGE_PHOTOS)}, got {args.image!r}")
    photo = data.load_photos([args.image])[0]
    side = min(photo.size)
    left, top = (photo.width - side) // 2, (photo.height - side) // 2
    img = photo.resize((args.size, args.size), Image.BICUBIC, box=(left, top, left + side, top + side))
    path = save_mask_views(args.output or "folk_views.png", data.to_uint8_tensor(img), args.keep_ratio,
                           title=f"FOLK image-adaptive masks of '{args.image}' ({args.size} x {args.size}): "
                                 f"Com keeps the dominant frequencies (|F| >= k-th largest), RCom removes them",
                           magnitude=args.magnitude)
    print(f"wrote {path}")
    return path


def main(argv=None) -> Path:
    require(PROG, *NEEDS["visualize"])
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.views is not None:
        return views_main(parser, args)
    if args.checkpoint is None:
        parser.error("--checkpoint: required (a checkpoint written by python -m mfm_fast.pretrain), "
                     "unless --views folk draws the adaptive-mask views")
    if args.num < 1:
        parser.error(f"--num: must be >= 1, got {args.num}")
    check_output(parser, args.output)
    try:
        train_args = argparse.Namespace(**check_checkpoint(args.checkpoint, "--checkpoint"))
        device = pick_device(args.device)
        x = sample_images(train_args, args.num, seed=args.seed, data_path=args.data_path).to(device)
    except ValueError as exc:  # a bad --checkpoint, --device or --data-path (the message names it)
        parser.error(str(exc))
    ckpt = load_checkpoint(args.checkpoint)
    net = build_model(train_args).to(device)
    net.load_state_dict(ckpt["model"])
    corruptor = Corruptor(train_args, device, seed=args.seed)
    out = args.output or str(Path(args.checkpoint).resolve().parent / "vis" / (Path(args.checkpoint).stem + ".png"))
    what = "method folk" if getattr(train_args, "method", "mfm") == "folk" else f"task {train_args.task}"
    path = render(net, corruptor, x, out, title=f"{train_args.model}, step {ckpt['step']}, {what}")
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main(sys.argv[1:])
