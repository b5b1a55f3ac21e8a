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
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ._common import IMAGENET_MEAN, IMAGENET_STD

COLUMNS = ("original", "spectrum, removed shaded", "corrupted input", "raw prediction", "reconstruction",
           "input spectrum", "reconstruction spectrum")


def log_spectrum(img: torch.Tensor) -> np.ndarray:
    """(3, H, W) image -> (H, W) log(1 + |fftshift(fft2(mean over channels))|)."""
    grey = img.detach().double().cpu().mean(0)
    return torch.log1p(torch.fft.fftshift(torch.fft.fft2(grey)).abs()).numpy()


def fill_removed(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """real(ifft2(ifftshift(F(target) m + F(pred) (1 - m)))), F = fftshift o fft2: (N, C, H, W), any space."""
    spec = lambda z: torch.fft.fftshift(torch.fft.fft2(z.double()), dim=(-2, -1))  # noqa: E731
    m = mask.double()[:, None]
    mixed = spec(target) * m + spec(pred) * (1 - m)
    return torch.fft.ifft2(torch.fft.ifftshift(mixed, dim=(-2, -1))).real.float()


def denormalize(z: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN,
                std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """Normalised (N, 3, H, W) -> pixels clamped to [0, 1]."""
    m = torch.tensor(mean, dtype=torch.float32, device=z.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=z.device).view(1, -1, 1, 1)
    return (z.float() * s + m).clamp(0, 1)


def save_grid(path, x: torch.Tensor, inp: torch.Tensor, pred: torch.Tensor, mask: Optional[torch.Tensor] = None,
              title: Optional[str] = None, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> Path:
    """Write the PNG grid; returns its path.

    Args:
        x: (N, 3, H, W) clean pixels in [0, 1] (or uint8).
        inp, pred: (N, 3, H, W) encoder input and prediction, in normalised space.
        mask: (N, H, W) fftshift-ed keep mask (1 = kept) or None (restoration tasks).
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = x.detach().float().cpu() / (255.0 if x.dtype == torch.uint8 else 1.0)
    pred = pred.detach().float().cpu()
    inp_px, pred_px = denormalize(inp.detach().cpu(), mean, std), denormalize(pred, mean, std)
    if mask is not None:
        m, s = (torch.tensor(v).view(1, -1, 1, 1) for v in (mean, std))
        rec_px = denormalize(fill_removed(pred, (x - m) / s, mask.detach().cpu()), mean, std)
        columns = COLUMNS
    else:
        rec_px, columns = pred_px, tuple(c for c in COLUMNS if c != "raw prediction")
    n = x.shape[0]
    fig, axes = plt.subplots(n, len(columns), figsize=(2.2 * len(columns), 2.3 * n + (0.4 if title else 0)),
                             squeeze=False)
    for i in range(n):
        spec = log_spectrum(x[i])
        lo, hi = float(spec.min()), float(spec.max())
        panels = [(x[i], None), (spec, "spec"), (inp_px[i], None)] + \
            ([(pred_px[i], None)] if mask is not None else []) + \
            [(rec_px[i], None), (log_spectrum(inp_px[i]), "spec"), (log_spectrum(rec_px[i]), "spec")]
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
        if mask is not None:
            kind = "low-pass" if float(mask[i][mask.shape[1] // 2, mask.shape[2] // 2]) == 1 else "high-pass"
            axes[i][0].set_ylabel(kind, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("python -m mfm_fast.visualize", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by python -m mfm_fast.pretrain")
    p.add_argument("--data-path", default=None,
                   help="ImageFolder root to draw images from (default: the held-out 'val' regions of the "
                        "built-in scikit-image photos)")
    p.add_argument("--num", type=int, default=4, help="number of samples (rows); masks alternate low/high-pass")
    p.add_argument("--output", default=None, help="PNG path (default: <checkpoint folder>/vis/checkpoint.png)")
    p.add_argument("--seed", type=int, default=0, help="seed of the crops and masks")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to run the model")
    return p


def main(argv=None) -> Path:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    from . import pretrain
    if args.num < 1:
        parser.error(f"--num: must be >= 1, got {args.num}")
    if not Path(args.checkpoint).is_file():
        parser.error(f"--checkpoint: no such file {args.checkpoint!r}")
    ckpt = pretrain.load_checkpoint(args.checkpoint)
    train_args = argparse.Namespace(**ckpt["args"])
    try:
        device = pretrain.pick_device(args.device)
        x = pretrain.sample_images(train_args, args.num, seed=args.seed, data_path=args.data_path).to(device)
    except ValueError as exc:  # a bad --device or --data-path
        parser.error(str(exc))
    net = pretrain.build_model(train_args).to(device)
    net.load_state_dict(ckpt["model"])
    corruptor = pretrain.Corruptor(train_args, device, seed=args.seed)
    out = args.output or str(Path(args.checkpoint).resolve().parent / "vis" / (Path(args.checkpoint).stem + ".png"))
    path = pretrain.render(net, corruptor, x, out, title=f"{train_args.model}, step {ckpt['step']}, "
                                                         f"task {train_args.task}")
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main(sys.argv[1:])
