"""Linear probe: frozen encoder features + a linear classifier, top-1 on held-out images.

    python -m mfm_fast.linprobe --checkpoint output/mfm_pretrain/checkpoint.pth --compare-random
    python -m mfm_fast.linprobe --checkpoint ckpt.pth --probe-data faces
    python -m mfm_fast.linprobe --checkpoint ckpt.pth --data-path /data/imagenet     # root/train, root/val
    python -m mfm_fast.linprobe --model vit_small_patch16_224 --img-size 224          # random init only

Built-in labelled data (no download, scikit-image's wheel):
  photos  which of the 17 bundled photos a crop comes from; training crops from each photo's
          "train" region (the part pre-training sees), test crops from its held-out "val" region.
  faces   lfw_subset: 100 faces vs 100 non-faces (25 x 25 grey, resized); 70 + 70 train, 30 + 30 test.
Features: the encoder's forward_features, mean over patch tokens (ViT, prefix tokens dropped) or
over positions (CNN); ``--pool cls`` takes the CLS token. They are standardised with the training
set's mean / std (MAE's BatchNorm without affine) and fed to a multinomial logistic regression
fitted by full-batch L-BFGS with an L2 penalty (the features are held in memory).
Progress goes to stderr; the result is printed and, with --checkpoint (or --output), written as JSON:
<checkpoint folder>/linprobe-<checkpoint name>-step<step>-<data>.json (-2, -3, ... added when taken).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from .._common import imagenet_normalize
from .._optional import NEEDS, require
from ..cli import ArgError, OneLineParser, check_bench_args
from . import data as D
from .checkpoint import check_checkpoint, load_checkpoint
from .model import create_encoder
from .runtime import pick_device

PROG = "python -m mfm_fast.linprobe"


def get_args_parser() -> argparse.ArgumentParser:
    p = OneLineParser(PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None,
                   help="pretrain checkpoint.pth (its --model / --img-size are used); omit for a random-init encoder")
    p.add_argument("--model", default=None, help="timm model (default: the checkpoint's, else vit_small_patch16_224)")
    p.add_argument("--img-size", type=int, default=None, help="input side (default: the checkpoint's, else 224)")
    p.add_argument("--compare-random", action="store_true",
                   help="also probe a randomly initialised encoder of the same architecture")
    p.add_argument("--probe-data", choices=("photos", "faces"), default="photos",
                   help="built-in labelled data when --data-path is not given")
    p.add_argument("--data-path", default=None, help="root with ImageFolder trees train/ and val/")
    p.add_argument("--train-per-class", type=int, default=64, help="photos: training crops per photo")
    p.add_argument("--val-per-class", type=int, default=32, help="photos: test crops per photo")
    p.add_argument("--pool", choices=("avg", "cls"), default="avg", help="feature pooling")
    p.add_argument("--l2", type=float, default=1e-3, help="L2 penalty of the classifier weights")
    p.add_argument("--iters", type=int, default=300, help="L-BFGS iterations")
    p.add_argument("--batch-size", type=int, default=128, help="feature-extraction batch")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (--data-path)")
    p.add_argument("--seed", type=int, default=0, help="seed of crops, random init and the classifier")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to run the encoder")
    p.add_argument("--teacher", action="store_true",
                   help="probe the EMA teacher's encoder of a --method folk checkpoint instead of the student's")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--output", default=None,
                   help="JSON file of the result (replaced if it exists); default with --checkpoint: "
                        "<checkpoint folder>/linprobe-<checkpoint name>-step<step>-<data>.json, never replacing "
                        "an earlier probe's file (-2, -3, ... added)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    return p


# ---- data -------------------------------------------------------------------------------------------

def _stack(ds, n: int) -> Tuple[torch.Tensor, torch.Tensor]:
    items = [ds[i] for i in range(n)]
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


def _faces(img_size: int):
    images, labels = D.load_faces()
    x = torch.from_numpy(images).float()[:, None].expand(-1, 3, -1, -1)
    x = F.interpolate(x, size=(img_size, img_size), mode="bicubic", align_corners=False).clamp(0, 1)
    x = (x * 255).round().to(torch.uint8)
    y = torch.from_numpy(labels)
    within = torch.cat([torch.arange(100), torch.arange(100)])  # index within its class
    train = within < 70
    return (x[train], y[train]), (x[~train], y[~train])


def probe_data(args, img_size: int):
    """((x_train uint8 (N, 3, S, S), y_train), (x_val, y_val)) or, for --data-path, two datasets."""
    if args.data_path is not None:
        root = D.check_data_path(args.data_path)
        for split in ("train", "val"):
            D.check_data_path(root / split, flag=f"--data-path ({split}/)")
        return tuple(D.FolderImages(root / s, D.CenterCrop(img_size), seed=args.seed, flag=f"--data-path ({s}/)")
                     for s in ("train", "val"))
    if args.probe_data == "faces":
        return _faces(img_size)
    out = []
    for split, per_class, seed in (("train", args.train_per_class, args.seed), ("val", args.val_per_class,
                                                                                  args.seed + 1)):
        ds = D.PhotoCrops(img_size, split=split, length=per_class * len(D.SKIMAGE_PHOTOS), seed=seed,
                          transform=D.SquareCrops(img_size))
        out.append(_stack(ds, len(ds)))
    return tuple(out)


# ---- features and classifier -----------------------------------------------------------------------------

@torch.no_grad()
def features(encoder, data, device, pool: str = "avg", batch_size: int = 128, num_workers: int = 0,
             progress: Optional[str] = None):
    """Frozen features (N, D) float32 and labels (N,) of (x uint8, y) tensors or a dataset; `progress`: the
    label of a tqdm bar over the batches (None: no bar)."""
    from tqdm import tqdm

    encoder.eval()
    if isinstance(data, tuple):
        x_all, y_all = data
        batches = [(x_all[i:i + batch_size], y_all[i:i + batch_size]) for i in range(0, len(x_all), batch_size)]
    else:
        batches = torch.utils.data.DataLoader(data, batch_size=batch_size, num_workers=num_workers)
    feats, labels = [], []
    for x, y in tqdm(batches, desc=progress, unit="batch", disable=progress is None, leave=False):
        inp = imagenet_normalize(x.to(device).float() / 255)
        f = encoder.forward_features(inp)
        if f.dim() == 3:  # ViT tokens (N, L, D)
            prefix = getattr(encoder, "num_prefix_tokens", 1)
            f = f[:, 0] if pool == "cls" else f[:, prefix:].mean(1)
        elif f.dim() == 4:  # CNN map (N, D, h, w)
            f = f.mean((2, 3))
        feats.append(f.float().cpu())
        labels.append(torch.as_tensor(y))
    return torch.cat(feats), torch.cat(labels)


def fit_linear(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float = 1e-3, iters: int = 300,
               progress: Optional[str] = None):
    """Multinomial logistic regression on standardised features: min CE(x W + b, y) + l2 |W|^2 (L-BFGS).

    Returns predict(x) -> class indices. `progress`: the label of a tqdm counter of loss evaluations."""
    from tqdm import tqdm

    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = ((x - mean) / std).double()
    w = torch.zeros(z.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=iters, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)

    bar = tqdm(desc=progress, unit="eval", disable=progress is None, leave=False)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z @ w + b, y) + l2 * (w * w).sum()
        loss.backward()
        bar.update(1)
        return loss
    opt.step(closure)
    bar.close()
    w, b = w.detach(), b.detach()
    return lambda q: (((q - mean) / std).double() @ w + b).argmax(1)


def probe(encoder, train, val, device, args, name: str = "probe") -> Dict[str, float]:
    """{'top1': held-out accuracy, 'train_top1': fit accuracy, 'n_train', 'n_val', 'dim'}; progress bars
    labelled `name` unless args.no_progress."""
    show = not getattr(args, "no_progress", False)
    xf, yf = features(encoder, train, device, args.pool, args.batch_size, args.num_workers,
                      progress=f"{name}: features of the training images" if show else None)
    vf, vy = features(encoder, val, device, args.pool, args.batch_size, args.num_workers,
                      progress=f"{name}: features of the held-out images" if show else None)
    num_classes = int(max(yf.max(), vy.max())) + 1
    predict = fit_linear(xf, yf, num_classes, args.l2, args.iters,
                         progress=f"{name}: fitting the classifier (L-BFGS, {args.iters} iterations)" if show else None)
    return {"top1": float((predict(vf) == vy).double().mean()), "train_top1": float((predict(xf) == yf).double().mean()),
            "n_train": len(yf), "n_val": len(vy), "classes": num_classes, "dim": xf.shape[1]}


def check_encoder(model: str, img_size: int) -> None:
    """--model / --img-size: a timm model that takes img_size px images (ValueError naming the flag)."""
    import timm
    if not timm.is_model(model):
        raise ValueError(f"--model: {model!r} is not a timm model (see timm.list_models())")
    if img_size < 2 or img_size % 2:
        raise ValueError(f"--img-size: must be even and >= 2, got {img_size}")
    encoder = create_encoder(model, img_size).eval()
    try:
        with torch.no_grad():
            encoder.forward_features(torch.zeros(1, 3, img_size, img_size))
    except Exception as exc:
        raise ValueError(f"--img-size: {model} cannot take {img_size} px images ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})") from None


def result_path(args, saved: Optional[dict]) -> Optional[Path]:
    """Where the result JSON goes: --output, else next to --checkpoint under a name that no earlier probe's file
    has; None without either."""
    if args.output is not None:
        return Path(args.output)
    if args.checkpoint is None:
        return None
    ckpt = Path(args.checkpoint)
    data = Path(args.data_path).resolve().name if args.data_path else args.probe_data
    stem = f"linprobe-{ckpt.stem}{'-teacher' if args.teacher else ''}-step{saved['step']}-{data}"
    path, n = ckpt.parent / f"{stem}.json", 1
    while path.exists():
        n += 1
        path = ckpt.parent / f"{stem}-{n}.json"
    return path


def log(message: str) -> None:
    print(f"linprobe: {message}", file=sys.stderr, flush=True)


def main(argv=None) -> Dict[str, dict]:
    require(PROG, *NEEDS["linprobe"])
    parser = get_args_parser()
    args = parser.parse_args(argv)
    check_bench_args(parser, args, ints={"train_per_class": 1, "val_per_class": 1, "iters": 1, "batch_size": 1,
                                         "num_workers": 0, "threads": 1})
    if not (args.l2 >= 0 and args.l2 < float("inf")):
        parser.error(f"--l2: must be a finite value >= 0, got {args.l2}")
    out = Path(args.output) if args.output is not None else None
    if out is not None and (out.is_dir() or not out.name or (out.parent.exists() and not out.parent.is_dir())):
        parser.error(f"--output: {args.output!r} cannot be written (expected a .json file path)")
    if args.threads:
        torch.set_num_threads(args.threads)
    ckpt = None
    try:
        saved = None
        if args.checkpoint is not None:  # kind, model and size checked before the weights are read
            saved = check_checkpoint(args.checkpoint, "--checkpoint", model=args.model, img_size=args.img_size)
        model = args.model or (saved["model"] if saved else "vit_small_patch16_224")
        img_size = args.img_size or (saved["img_size"] if saved else 224)
        if args.teacher and (saved is None or not saved["has_distiller"]):
            raise ArgError("--teacher: needs a --method folk checkpoint (it holds the EMA teacher)")
        check_encoder(model, img_size)
        device = pick_device(args.device)
        json_path = result_path(args, saved)
        data_name = args.data_path or args.probe_data
        if args.data_path is None:  # the built-in sets take a while to crop; an ImageFolder is only listed here
            log(f"preparing the probe images ({args.probe_data}) at {img_size} px")
        train, val = probe_data(args, img_size)
        if args.checkpoint is not None:
            ckpt = load_checkpoint(args.checkpoint)
    except ValueError as exc:  # ArgError, or a library / data error that names its flag
        parser.error(str(exc))

    results = {}
    runs = ([("pretrained", ckpt)] if ckpt else []) + ([("random_init", None)] if args.compare_random or not ckpt
                                                      else [])
    for name, state in runs:
        torch.manual_seed(args.seed)
        encoder = create_encoder(model, img_size).to(device)
        if state is not None:
            weights, prefix = state["model"], "encoder."
            if args.teacher:  # --method folk checkpoints: the EMA teacher's encoder
                weights, prefix = state["distiller"], "teacher.module.encoder."
            encoder.load_state_dict({k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)})
        results[name] = probe(encoder, train, val, device, args, name)
        r = results[name]
        print(f"{name:<12} {model} @ {img_size}px: linear-probe top-1 {100 * r['top1']:.1f}% on {r['n_val']} "
              f"held-out images ({r['classes']} classes, train top-1 {100 * r['train_top1']:.1f}%, "
              f"{r['n_train']} training images, {r['dim']}-d features)")
    summary = {"data": str(data_name), "model": model, "img_size": img_size, "step": ckpt["step"] if ckpt else 0,
               **{k: v["top1"] for k, v in results.items()}}
    print(json.dumps(summary))
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        record = {**summary, "checkpoint": str(Path(args.checkpoint).resolve()) if args.checkpoint else None,
                  "teacher": args.teacher, "pool": args.pool, "l2": args.l2, "iters": args.iters, "seed": args.seed,
                  "results": results}
        json_path.write_text(json.dumps(record, indent=2) + "\n")
        log(f"wrote {json_path}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
