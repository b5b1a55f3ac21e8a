"""Evaluate a fine-tuned classifier (best.pth / checkpoint.pth of python -m mfm_fast.finetune) on held-out images.

    python -m mfm_fast.evaluate --checkpoint output/mfm_finetune/best.pth --data-path /data/imagenet/val
    python -m mfm_fast.evaluate --checkpoint best.pth --benchmark imagenet-r --data-path /data/imagenet-r
    python -m mfm_fast.evaluate --checkpoint best.pth --benchmark imagenet-a --data-path /data/imagenet-a
    python -m mfm_fast.evaluate --checkpoint best.pth --benchmark imagenet-c --data-path /data/imagenet-c

Every image goes through the fine-tuning's validation transform (finetune_data.eval_transform: short side to
S / 0.875 bicubic, centre crop S, ImageNet mean / std) and the classifier's logits (N, K).
  folder      an ImageFolder root/<class>/<img>. Its class folders are matched to the checkpoint's class names by
              name; a subset of the checkpoint's classes is fine, and the logits are NOT restricted to it (the
              prediction is the argmax over all K outputs). Top-1, top-k (k = min(5, K)) and per-class accuracy.
  imagenet-r  the released ImageNet-R / ImageNet-A folders (200 wnid class folders). The model must be an
  imagenet-a  ImageNet-1k classifier (K = 1000, class names the sorted wnids); its logits are restricted to the
              subset's 200 classes, logits[:, idx] (N, 200), and the argmax / top-5 is taken among them.
  imagenet-c  root/<corruption>/<severity 1-5>/<class>/<img>, class folders matched by name as for folder. Error
              E_{s,c} = 1 - top-1 per corruption and severity; CE_c = mean_s E_{s,c} / AlexNet's error on c
              averaged over the 5 severities (= sum_s E / sum_s E^AlexNet), mCE = mean of CE_c over the 15
              standard corruptions present (the extra ones are reported, not in mCE); see robustness.py.
              ImageNet-C's images are 224 px already: at --img-size 224 they are resized to 256 and centre
              cropped (as AugMix's imagenet.py; hendrycks/robustness's test.py crops without resizing).
Unreadable images are skipped (a warning names each) and counted as "skipped", not in the accuracy.
Progress goes to stderr; a summary is printed and the result written as JSON: --output, or next to the checkpoint
evaluate-<checkpoint name>-<benchmark>-<data folder>.json (-2, -3, ... added rather than replacing a file).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .._optional import NEEDS, require
from ..cli import ArgError, OneLineParser, check_bench_args
from . import robustness as RB
from .finetune_engine import load_finetune_checkpoint
from .runtime import pick_device

PROG = "python -m mfm_fast.evaluate"
BENCHMARKS = ("folder", "imagenet-r", "imagenet-a", "imagenet-c")
_LAYOUT = {"imagenet-c": "root/<corruption>/<severity 1-5>/<class>/img.jpg"}
_TREE = "an ImageFolder tree root/<class>/img.jpg"


def get_args_parser() -> argparse.ArgumentParser:
    p = OneLineParser(PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="best.pth or checkpoint.pth of python -m mfm_fast.finetune")
    p.add_argument("--data-path", required=True, help="the images (layout: see --benchmark)")
    p.add_argument("--benchmark", choices=BENCHMARKS, default="folder", help="what --data-path holds (see above)")
    p.add_argument("--ema", action="store_true", help="evaluate the checkpoint's EMA weights (finetune --ema)")
    p.add_argument("--batch-size", type=int, default=128, help="images per forward pass")
    p.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1), help="DataLoader workers")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA when available")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--output", default=None,
                   help="JSON file of the result (replaced if it exists); default: <checkpoint folder>/evaluate-"
                        "<checkpoint name>-<benchmark>-<data folder>.json, never replacing an earlier file "
                        "(-2, -3, ... added)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


def log(message: str) -> None:
    print(f"evaluate: {message}", file=sys.stderr, flush=True)


def _few(names: Sequence[str], n: int = 4) -> str:
    names = list(names)
    return ", ".join(map(repr, names[:n])) + (f", ... ({len(names)} in all)" if len(names) > n else "")


# ---- the checkpoint --------------------------------------------------------------------------------------------

def build_classifier(ckpt: dict, path, ema: bool = False) -> torch.nn.Module:
    """The checkpoint's classifier (released.create_classifier of its model, num_classes, img_size) with its
    weights (the EMA's with `ema`), in eval mode; ArgError naming --checkpoint / --ema when they do not fit."""
    import timm

    from .released import create_classifier

    a = ckpt["args"]
    if ema and not isinstance(ckpt.get("ema"), dict):
        raise ArgError(f"--ema: {path} holds no EMA weights (it was fine-tuned without --ema); leave out --ema")
    if not timm.is_model(a["model"]):
        raise ArgError(f"--checkpoint: {path} is a checkpoint of {a['model']!r}, which this timm "
                       f"({timm.__version__}) does not have")
    net = create_classifier(a["model"], a["num_classes"], a["img_size"], global_pool=a.get("global_pool", "avg"))
    try:
        net.load_state_dict(ckpt["ema"] if ema else ckpt["model"])
    except RuntimeError as exc:
        why = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ArgError(f"--checkpoint: {path}'s weights do not fit {a['model']} with {a['num_classes']} classes at "
                       f"{a['img_size']} px ({why})") from None
    return net.eval()


# ---- the images ------------------------------------------------------------------------------------------------

def scan_image_folder(root: Path, flag: str = "--data-path") -> Tuple[List[str], List[Tuple[str, int]]]:
    """(class folder names sorted, [(image path, class folder index)]) of an ImageFolder tree: torchvision's
    find_classes / make_dataset (its image extensions, links followed; empty class folders allowed); ArgError
    naming `flag` when the folder has no class folders or no images."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    try:
        classes, class_to_idx = find_classes(root)
    except FileNotFoundError:
        raise ArgError(f"{flag}: {root} holds no class folders (expected {_TREE})") from None
    samples = make_dataset(root, class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    if not samples:
        raise ArgError(f"{flag}: {root} holds no images in its {len(classes)} class folders ({_few(classes)}; "
                       f"image files end in {', '.join(IMG_EXTENSIONS)})")
    return classes, samples


def match_classes(folder_classes: Sequence[str], class_names: Sequence[str], root, flag: str = "--data-path",
                  what: str = "classes of the checkpoint") -> List[int]:
    """The index among `class_names` of each folder class (matched by name); ArgError naming `flag` and a few of
    the folder classes that are not there."""
    index = {str(n): i for i, n in enumerate(class_names)}
    unknown = [c for c in folder_classes if c not in index]
    if unknown:
        raise ArgError(f"{flag}: {len(unknown)} of the {len(folder_classes)} class folders of {root} are not "
                       f"{what} ({_few(unknown)}; those are {_few(class_names)})")
    return [index[c] for c in folder_classes]


class Plan:
    """What to evaluate: samples [(path, target, group)] (target: an index among the K outputs), the names of the
    groups counts are kept for (classes, or (corruption, severity)), and the logit columns the prediction is
    restricted to (None: all K)."""

    def __init__(self, samples, groups, columns=None):
        self.samples, self.groups, self.columns = samples, groups, columns


def folder_plan(root: Path, class_names: Sequence[str]) -> Plan:
    """--benchmark folder: groups are the folder's classes; no restriction."""
    classes, found = scan_image_folder(root)
    to_model = match_classes(classes, class_names, root)
    return Plan([(p, to_model[c], c) for p, c in found], classes)


def check_imagenet_1k(benchmark: str, args: dict, path) -> None:
    """ImageNet-R / -A need an ImageNet-1k classifier: 1000 outputs whose class names are the sorted 1000 wnids;
    ArgError naming --benchmark otherwise."""
    names = list(args["class_names"])
    if args["num_classes"] != len(RB.IMAGENET_WNIDS):
        raise ArgError(f"--benchmark: {benchmark} needs an ImageNet-1k classifier (1000 outputs); {path} has "
                       f"{args['num_classes']} classes ({_few(names)}); use --benchmark folder")
    if not all(RB.is_wnid(str(n)) for n in names):
        raise ArgError(f"--benchmark: {benchmark} needs the ImageNet-1k classes (wnids in sorted order); the class "
                       f"names of {path} are not wnids ({_few([n for n in names if not RB.is_wnid(str(n))])})")
    if tuple(names) != RB.IMAGENET_WNIDS:
        odd = [f"{i}: {n}" for i, (n, w) in enumerate(zip(names, RB.IMAGENET_WNIDS)) if n != w]
        raise ArgError(f"--benchmark: {benchmark} needs the 1000 ImageNet-1k wnids in sorted order; the class names "
                       f"of {path} differ ({_few(odd, 3)})")


def subset_plan(root: Path, benchmark: str) -> Plan:
    """--benchmark imagenet-r / imagenet-a: the folder's wnid classes, targets their ImageNet-1k index, the
    prediction restricted to the subset's 200 classes."""
    classes, found = scan_image_folder(root)
    subset = RB.SUBSETS[benchmark]
    match_classes(classes, subset, root, what=f"among {benchmark}'s {len(subset)} classes")
    to_model = match_classes(classes, RB.IMAGENET_WNIDS, root)
    return Plan([(p, to_model[c], c) for p, c in found], classes, RB.subset_indices(subset))


def corruption_plan(root: Path, class_names: Sequence[str]) -> Plan:
    """--benchmark imagenet-c: groups are (corruption, severity), ordered as robustness.order_corruptions."""
    layout = _LAYOUT["imagenet-c"]
    corruptions = RB.order_corruptions(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not corruptions:
        raise ArgError(f"--data-path: {root} holds no corruption folders (expected {layout})")
    samples, groups = [], []
    for c in corruptions:
        names = sorted(e.name for e in os.scandir(root / c) if e.is_dir() and not e.name.startswith("."))
        severities = []
        for name in names:
            try:
                severities.append(RB.parse_severity(name))
            except ValueError as exc:
                raise ArgError(f"--data-path: {root / c / name}: {exc} (expected {layout})") from None
        if not severities:
            raise ArgError(f"--data-path: {root / c} holds no severity folders 1-5 (expected {layout})")
        for s in sorted(severities):
            folder = root / c / str(s)
            classes, found = scan_image_folder(folder)
            to_model = match_classes(classes, class_names, folder)
            samples += [(p, to_model[i], len(groups)) for p, i in found]
            groups.append((c, s))
    return Plan(samples, groups)


class Images(Dataset):
    """(image (3, S, S) float, target, group, readable) of a Plan's samples through `transform`; an unreadable
    file gives zeros and readable False (a warning names it). The samples are held as NumPy arrays (paths as
    bytes), not a list of Python objects, so that DataLoader workers do not copy them page by page (ImageNet-C
    has 4.75 million)."""

    def __init__(self, samples, transform, img_size: int):
        self.paths = np.array([os.fsencode(p) for p, _, _ in samples])
        self.targets = np.array([t for _, t, _ in samples], dtype=np.int64)
        self.groups = np.array([g for _, _, g in samples], dtype=np.int64)
        self.transform, self.img_size = transform, img_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        from PIL import Image

        path, target, group = os.fsdecode(self.paths[index]), int(self.targets[index]), int(self.groups[index])
        try:
            with open(path, "rb") as f, Image.open(f) as img:
                return self.transform(img.convert("RGB")), target, group, True
        except OSError as exc:  # PIL.UnidentifiedImageError, truncated or unreadable files
            warnings.warn(f"skipping unreadable image {path} ({type(exc).__name__}: {exc})", RuntimeWarning,
                          stacklevel=2)
            return torch.zeros(3, self.img_size, self.img_size), target, group, False


# ---- counting ---------------------------------------------------------------------------------------------------

@torch.no_grad()
def count_hits(model, batches, n_groups: int, device: torch.device, k: int = 5,
               columns: Optional[Sequence[int]] = None, progress: Optional[str] = None) -> Dict[str, List[int]]:
    """Per-group counts over batches of (x (N, 3, S, S), target (N,), group (N,), readable (N,)): top1 (the
    argmax of the logits (N, K), or of logits[:, columns], is the target), topk (the target is among the k
    largest), n (readable images), skipped. Counts accumulate on the device and are read once at the end."""
    from tqdm import tqdm

    sums = torch.zeros(4, n_groups, dtype=torch.long, device=device)
    cols = torch.as_tensor(columns, dtype=torch.long, device=device) if columns is not None else None
    for x, y, g, ok in tqdm(batches, desc=progress, unit="batch", disable=progress is None, leave=False,
                            file=sys.stderr):
        y, g, ok = (t.to(device, non_blocking=True) for t in (y, g, ok))
        top = RB.restricted_topk(model(x.to(device, non_blocking=True)), cols, k)  # (N, k) class indices
        hit = (top == y[:, None]) & ok[:, None]
        for row, v in enumerate((hit[:, 0], hit.any(1), ok, ~ok)):
            sums[row].index_add_(0, g, v.long())
    top1, topk, n, skipped = sums.tolist()
    return {"top1": top1, "topk": topk, "n": n, "skipped": skipped}


def _ratio(a: int, b: int) -> Optional[float]:
    return a / b if b else None


def class_report(classes: Sequence[str], counts: Dict[str, List[int]], k: int) -> dict:
    """top-1 / top-k over all images and per class ({name: {correct, total, accuracy}}) of count_hits' counts."""
    n, c1, ck = sum(counts["n"]), sum(counts["top1"]), sum(counts["topk"])
    per_class = {name: {"correct": counts["top1"][i], "total": counts["n"][i],
                        "accuracy": _ratio(counts["top1"][i], counts["n"][i])} for i, name in enumerate(classes)}
    return {"n": n, "correct": c1, f"correct_top{k}": ck, "top1": _ratio(c1, n), f"top{k}": _ratio(ck, n),
            "top_k": k, "skipped": sum(counts["skipped"]), "classes": len(classes), "per_class": per_class}


def corruption_report(groups: Sequence[Tuple[str, int]], counts: Dict[str, List[int]]) -> dict:
    """Per corruption and severity {correct, total, error}, and robustness.mce_summary of the errors."""
    table: Dict[str, Dict[int, dict]] = {}
    for i, (c, s) in enumerate(groups):
        n, hit = counts["n"][i], counts["top1"][i]
        table.setdefault(c, {})[s] = {"correct": hit, "total": n, "error": RB.error_rate(hit, n) if n else None}
    errors = {c: {s: v["error"] for s, v in sev.items() if v["error"] is not None} for c, sev in table.items()}
    summary = RB.mce_summary({c: e for c, e in errors.items() if e})
    return {"n": sum(counts["n"]), "skipped": sum(counts["skipped"]), **summary,
            "alexnet_error": {c: RB.ALEXNET_ERR[c] for c in summary["ce"]},
            "corruptions": {c: {str(s): table[c][s] for s in sorted(table[c])} for c in RB.order_corruptions(table)}}


# ---- output -----------------------------------------------------------------------------------------------------

def result_path(args) -> Path:
    """--output, else next to --checkpoint under a name no earlier file has."""
    if args.output is not None:
        return Path(args.output)
    ckpt = Path(args.checkpoint)
    data = Path(args.data_path).expanduser().resolve().name
    stem = f"evaluate-{ckpt.stem}{'-ema' if args.ema else ''}-{args.benchmark}-{data}"
    path, n = ckpt.parent / f"{stem}.json", 1
    while path.exists():
        n += 1
        path = ckpt.parent / f"{stem}-{n}.json"
    return path


def _pct(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def print_summary(head: str, report: dict, benchmark: str) -> None:
    """A few lines on stdout: the headline figures, then per class (up to 10; else the 5 lowest) or per corruption."""
    if benchmark != "imagenet-c":
        k = report["top_k"]
        print(f"{head}: top-1 {_pct(report['top1'])}  top-{k} {_pct(report[f'top{k}'])}  on {report['n']} images "
              f"of {report['classes']} classes" + (f" ({report['skipped']} unreadable skipped)" if report["skipped"]
                                                   else ""))
        rows = [(v["accuracy"], name, v) for name, v in report["per_class"].items()]
        if len(rows) > 10:  # classes without images (accuracy None) last
            rows = sorted(rows, key=lambda r: 2.0 if r[0] is None else r[0])[:5]
            print("  the 5 classes of lowest top-1:")
        for _, name, v in rows:
            print(f"  {name:<24} {v['correct']}/{v['total']}  {_pct(v['accuracy'])}")
        return
    print(f"{head}: {report['n']} images" + (f" ({report['skipped']} unreadable skipped)" if report["skipped"] else ""))
    for c, sev in report["corruptions"].items():
        errs = "  ".join(f"s{s} {_pct(v['error'])}" for s, v in sev.items())
        ce = f"  CE {_pct(report['ce'][c])}" if c in report["ce"] else "  (not in mCE)"
        mean = report["mean_error"].get(c)
        print(f"  {c:<18} error {errs}  mean {_pct(mean)}{ce}")
    n, of = report["mce_corruptions"], report["standard_corruptions"]
    part = "" if n == of else f" over {n} of {of} corruptions"
    inc = [c for c in report["incomplete"] if c in report["ce"]]
    note = f" ({len(inc)} of them with fewer than 5 severities)" if inc else ""
    print(f"  mCE{part} {_pct(report['mce'])}{note}  mean error{part} {_pct(report['mean_error_standard'])}  "
          f"mean error over all {len(report['mean_error'])} corruptions {_pct(report['mean_error_all'])}")


# ---- main -------------------------------------------------------------------------------------------------------

def main(argv=None) -> dict:
    require(PROG, *NEEDS["evaluate"])
    parser = get_args_parser()
    args = parser.parse_args(argv)
    check_bench_args(parser, args, ints={"batch_size": 1, "num_workers": 0, "threads": 1})
    out = Path(args.output) if args.output is not None else None
    if out is not None and (out.is_dir() or not out.name or (out.parent.exists() and not out.parent.is_dir())):
        parser.error(f"--output: {args.output!r} cannot be written (expected a .json file path)")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:  # everything checked before any image is read or any file written
        ckpt = load_finetune_checkpoint(args.checkpoint, "--checkpoint")
        saved = ckpt["args"]
        if args.benchmark in RB.SUBSETS:
            check_imagenet_1k(args.benchmark, saved, args.checkpoint)
        root = Path(os.path.expanduser(args.data_path))
        if not root.is_dir():
            raise ArgError(f"--data-path: {args.data_path!r} is not a directory (expected "
                           f"{_LAYOUT.get(args.benchmark, _TREE)})")
        if args.benchmark == "imagenet-c":
            plan = corruption_plan(root, saved["class_names"])
        elif args.benchmark in RB.SUBSETS:
            plan = subset_plan(root, args.benchmark)
        else:
            plan = folder_plan(root, saved["class_names"])
        device = pick_device(args.device)
        net = build_classifier(ckpt, args.checkpoint, args.ema).to(device)
        json_path = result_path(args)
    except ValueError as exc:  # ArgError, or a library / data error that names its flag
        parser.error(str(exc))

    from .finetune_data import eval_transform

    img_size, candidates = saved["img_size"], len(plan.columns) if plan.columns is not None else saved["num_classes"]
    k = min(5, candidates)
    log(f"{len(plan.samples)} images of {args.data_path} ({args.benchmark}), {saved['model']} @ {img_size}px on "
        f"{device}" + (f", predictions among {candidates} of the {saved['num_classes']} classes"
                       if plan.columns is not None else ""))
    loader = DataLoader(Images(plan.samples, eval_transform(img_size), img_size), batch_size=args.batch_size,
                        num_workers=args.num_workers, pin_memory=device.type == "cuda")
    counts = count_hits(net, loader, len(plan.groups), device, k, plan.columns,
                        progress=None if args.no_progress else f"evaluate ({args.benchmark})")
    if args.benchmark == "imagenet-c":
        report = corruption_report(plan.groups, counts)
        report["imagenet_1k"] = tuple(saved["class_names"]) == RB.IMAGENET_WNIDS
    else:
        report = class_report(plan.groups, counts, k)
        report["restricted_to"] = candidates if plan.columns is not None else None
    record = {"benchmark": args.benchmark, "checkpoint": str(Path(args.checkpoint).resolve()),
              "data_path": str(root.resolve()), "model": saved["model"], "img_size": img_size,
              "num_classes": saved["num_classes"], "weights": "ema" if args.ema else "model",
              "epoch": ckpt.get("epoch"), "step": ckpt.get("step"), **report}
    head = f"{saved['model']} @ {img_size}px ({Path(args.checkpoint).name}{', EMA' if args.ema else ''}) on " \
           f"{args.benchmark} {root}"
    print_summary(head, record, args.benchmark)
    if args.benchmark == "imagenet-c" and not record["imagenet_1k"]:
        print("  (not an ImageNet-1k classifier: AlexNet's errors, the denominators of CE, are for ImageNet-1k)")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(record, indent=2) + "\n")
    log(f"wrote {json_path}")
    return record


if __name__ == "__main__":
    main(sys.argv[1:])
