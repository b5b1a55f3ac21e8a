"""One MFM pre-training step of a timm backbone + MFMHead: the official pipeline versus mfm_fast.

    python bench/e2e_step.py                                  # defaults for the device found
    python bench/e2e_step.py --models vit_s16 --batch 128     # one model on a GPU

A step: draw masks, corrupt the batch, forward backbone + head under bf16 autocast, the masked
spectral loss, backward, gradient clipping at 3.0, AdamW step (docs/spec.md §4). Pipelines:
  official   masks from mfm_fast.make_masks, then the eager replica of the released code's
             corruption and loss (bench/fft_mask.py: fft2 + fftshift + complex64)
  mfm_fast   mfm_fast.FrequencyCorruption + mfm_fast.MaskedFreqLoss with backend --backend
             ("auto": the best one available per op; the table says which ran)
Models: vit_t16, vit_s16, vit_b16 (timm ViT-*/16 at 224) and resnet50 (channels_last), or any
timm name; on CPU the default is timm's tiny test models (test_vit, test_resnet at 160).
p_low is 0.5 for ViTs and 0.3 for CNNs, r1 = min(16, size // 8).
The two pipelines' steps are timed in --rounds interleaved rounds (who goes first alternates), each
round about --steps steps of each (bench/timing.py: triton.testing.do_bench on CUDA, torch.utils.benchmark
on CPU). Reported: ms per step (median, p20, p80 of all rounds' samples), images/s, the MFM frequency
work (corrupt + loss forward + backward on the step's shapes, timed alone as in bench/fft_mask.py) and
its share of the step, the peak memory of one step (CUDA), and the speed-up of mfm_fast over official:
the median of the paired per-round ratios (official's round median / mfm_fast's), with their min..max.
JSON goes to bench/results/e2e_step-<device>-<stamp>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fft_mask  # noqa: E402  (bench/fft_mask.py: the official replica, versions, device names)
from timing import interleaved, summary, time_ms, timer_name  # noqa: E402  (bench/timing.py)

import mfm_fast  # noqa: E402
from mfm_fast.cli import OneLineParser, check_bench_args, library_check  # noqa: E402

MODELS = {"vit_t16": "vit_tiny_patch16_224", "vit_s16": "vit_small_patch16_224",
          "vit_b16": "vit_base_patch16_224", "resnet50": "resnet50"}
PIPELINES = ("official", "mfm_fast")


def build(name, device):
    """(model, head, optimizer, image side, is_cnn) for a timm model name, in training mode."""
    import timm
    model = timm.create_model(name, num_classes=0)
    head = mfm_fast.MFMHead.for_timm_model(model)
    cnn = getattr(model, "patch_embed", None) is None
    fmt = torch.channels_last if cnn else torch.contiguous_format
    model.to(device, memory_format=fmt).train()
    head.to(device, memory_format=fmt).train()
    params = [p for p in list(model.parameters()) + list(head.parameters()) if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1.5e-4, betas=(0.9, 0.95))
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
    return model, head, opt, size, cnn


def pipeline_fns(pipeline, r1, p_low, backend):
    """(corrupt(x) -> (inp, mask), loss(pred, x, mask) -> scalar) for one pipeline."""
    if pipeline == "official":
        def corrupt(x):
            mask = mfm_fast.make_masks(x.shape[0], x.shape[-2], x.shape[-1], r1=r1, p_low=p_low, device=x.device)
            return fft_mask.official_corrupt(x, mask), mask
        return corrupt, fft_mask.official_loss
    corruption = mfm_fast.FrequencyCorruption(r1=r1, p_low=p_low, backend=backend)
    criterion = mfm_fast.MaskedFreqLoss(normalize_target=True, backend=backend)
    return corruption, criterion


def backends_used(backend, device):
    """Which mfm_fast backend runs each op (what backend='auto' resolves to here)."""
    from mfm_fast.dispatch import choose_backend
    return {op: choose_backend(backend, op, device) for op in ("corrupt", "masked_freq_loss")}


def make_step(model, head, opt, corrupt, loss_fn, x, cnn):
    params = [p for g in opt.param_groups for p in g["params"]]

    def step():
        inp, mask = corrupt(x)
        if cnn:
            inp = inp.contiguous(memory_format=torch.channels_last)
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            pred = head(model.forward_features(inp))
            loss = loss_fn(pred, x, mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 3.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def mfm_work(corrupt, loss_fn, x):
    """The MFM frequency work of a step alone: corrupt + loss fwd + bwd with a bf16 pred."""
    pred = torch.randn(x.shape, device=x.device).to(torch.bfloat16).requires_grad_()

    def work():
        _, mask = corrupt(x)
        pred.grad = None
        loss_fn(pred, x, mask).backward()
    return work


def peak_step_mib(step, device):
    """MiB allocated at the peak of one step (model, optimiser state and activations; CUDA only, else None)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2 ** 20


def parse_args(argv):
    p = OneLineParser(prog=os.path.basename(__file__), description=__doc__.split("\n")[0],
                      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--models", nargs="+", help="aliases " + ", ".join(MODELS) + " or timm names "
                   "(default: all four on CUDA; test_vit test_resnet on CPU)")
    p.add_argument("--batch", type=int, help="images per step (default 128 on CUDA, 2 on CPU)")
    p.add_argument("--backend", default="auto", help="mfm_fast backend for the mfm_fast pipeline (default auto)")
    p.add_argument("--steps", type=int, help="timed steps per pipeline per round (default 20 on CUDA, 3 on CPU)")
    p.add_argument("--rounds", type=int, help="interleaved rounds of official / mfm_fast steps (default 5 on CUDA, "
                   "2 on CPU)")
    p.add_argument("--warmup", type=int, help="untimed steps (default 5 on CUDA, 1 on CPU)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads during a CPU run (default 1)")
    p.add_argument("--no-json", action="store_true")
    p.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    check_bench_args(p, args, ints={"batch": 1, "steps": 1, "rounds": 1, "warmup": 0, "threads": 1},
                     out_dirs=("out_dir",))
    library_check(p, "--backend", mfm_fast.dispatch.check_backend_name, args.backend, "backend")
    device = fft_mask.bench_device(args.device, p).type
    for op in ("corrupt", "masked_freq_loss"):
        why = mfm_fast.available_backends(device, op).get(args.backend)
        if why is not None:
            p.error(f"--backend: {args.backend} cannot run {op} on {device} here: {why}")
    import timm
    for m in args.models or ():
        if m not in MODELS and not timm.is_model(m):
            p.error(f"--models: {m!r} is neither an alias ({', '.join(MODELS)}) nor a timm model")
    return args


def main(argv=None):
    return fft_mask.run_restoring_threads(run, parse_args(argv))


def run(args):
    """The bench: settings, a header, one block of rows per model, the JSON. Returns the exit status (0, 1 when a
    model or pipeline raised, 2 for a bad --backend or without timm)."""
    device = fft_mask.bench_device(args.device)
    gpu = device.type == "cuda"
    if gpu:
        torch.backends.cudnn.benchmark = True
    else:
        torch.set_num_threads(max(1, args.threads))
    try:
        mfm_fast.dispatch.check_backend_name(args.backend, "--backend")
        import timm
    except (ValueError, ImportError) as exc:
        print(exc, file=sys.stderr)
        return 2
    config = resolve_config(args, gpu)
    vers = dict(fft_mask.versions(), timm=timm.__version__)
    print_header(args, device, config, vers)
    records, ok = [], True
    for name in config["models"]:
        rows, model_ok = bench_model(name, args, device, config)
        records += rows
        ok &= model_ok
    print("MFM ms: corrupt + loss fwd + bwd alone on the step's shapes (bf16 pred); share = MFM ms / ms per step; "
          f"speed-up = median over {config['rounds']} interleaved rounds of official's round median / this "
          "pipeline's (min..max of the rounds).")
    if not args.no_json:
        write_json(args, device, vers, config, ok, records)
    if not ok:
        print("FAILED: a model or pipeline raised (see above)", file=sys.stderr)
        return 1
    return 0


def resolve_config(args, gpu):
    """{models (timm names), batch, steps, rounds, warmup}: the arguments, or the device's defaults."""
    names = args.models or (list(MODELS) if gpu else ["test_vit", "test_resnet"])
    return {"models": [MODELS.get(m, m) for m in names],
            "batch": args.batch or (128 if gpu else 2),
            "steps": args.steps or (20 if gpu else 3),
            "rounds": args.rounds or (5 if gpu else 2),
            "warmup": args.warmup if args.warmup is not None else (5 if gpu else 1)}


def print_header(args, device, config, vers):
    """The versions, the configuration and the table's column titles."""
    print(f"e2e_step bench | {fft_mask.device_name(device)} | torch {vers['torch']} | timm {vers['timm']} | "
          f"triton {vers['triton']} | mfm_fast {vers['mfm_fast']} | git {fft_mask.git_sha()}")
    print(f"config: B={config['batch']}, bf16 autocast, AdamW + clip 3.0, warm-up {config['warmup']}, "
          f"{config['rounds']} interleaved rounds of about {config['steps']} timed steps per pipeline "
          f"({timer_name(device)}); mfm_fast --backend {args.backend}")
    print(f"{'model':<22} {'pipeline':<9} {'backends':<16} {'ms/step':>9} {'p20':>8} {'p80':>8} {'img/s':>8} "
          f"{'MFM ms':>8} {'MFM share':>9} {'peak MiB':>9} {'speed-up (rounds)':>20}")


def bench_model(name, args, device, config):
    """One model: build it, prepare both pipelines, time their steps in interleaved rounds, print a row per
    pipeline. Returns (records, nothing raised)."""
    try:
        torch.manual_seed(0)
        model, head, opt, size, cnn = build(name, device)
        x = torch.rand(config["batch"], 3, size, size, device=device)
    except Exception as exc:
        print(f"{name:<22} cannot build: {type(exc).__name__}: {exc}")
        return [], False
    r1, p_low = min(16, size // 8), (0.3 if cnn else 0.5)
    prepared, ok = prepare_pipelines(name, args, device, config, (model, head, opt, x, cnn), r1, p_low)
    try:
        rounds_of = interleaved({p: step for p, (step, _, _, _) in prepared.items()}, device, config["rounds"],
                                config["steps"])
    except Exception as exc:
        print(f"{name:<22} timing the steps raised {type(exc).__name__}: {exc}")
        ok, rounds_of = False, {}
    round_med = {p: [summary(r)[0] for r in rounds] for p, rounds in rounds_of.items()}
    meta = {"model": name, "batch": config["batch"], "size": size, "r1": r1, "p_low": p_low}
    records = [pipeline_record(meta, pipeline, rounds_ms, prepared[pipeline][1:], round_med)
               for pipeline, rounds_ms in rounds_of.items()]
    del model, head, opt, x, prepared
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return records, ok


def prepare_pipelines(name, args, device, config, setup, r1, p_low):
    """Per pipeline: build it, warm its step up, the peak memory of one step and the MFM work alone. Returns
    ({pipeline: (step, backends used, peak MiB, MFM ms samples)} for those that ran, nothing raised)."""
    model, head, opt, x, cnn = setup
    prepared, ok = {}, True
    for pipeline in PIPELINES:
        try:
            corrupt, loss_fn = pipeline_fns(pipeline, r1, p_low, args.backend)
            used = backends_used(args.backend, device) if pipeline == "mfm_fast" else {}
            step = make_step(model, head, opt, corrupt, loss_fn, x, cnn)
            for _ in range(config["warmup"]):
                step()
            peak = peak_step_mib(step, device)
            mfm = time_ms(mfm_work(corrupt, loss_fn, x), device, max(config["steps"], 5), 2, budget_s=5.0)
            prepared[pipeline] = (step, used, peak, mfm)
        except Exception as exc:  # report and go on with the other pipelines and models
            print(f"{name:<22} {pipeline:<9} raised {type(exc).__name__}: {exc}")
            ok = False
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return prepared, ok


def pipeline_record(meta, pipeline, rounds_ms, measured, round_med):
    """The record of one pipeline's timed rounds (and its printed row): ms per step, images/s, MFM share, peak
    memory, the paired per-round speed-up over official."""
    used, peak, mfm = measured
    samples = [t for r in rounds_ms for t in r]
    med, p20, p80 = summary(samples)
    mfm_med = summary(mfm)[0]
    paired = ([o / m for o, m in zip(round_med["official"], round_med[pipeline])]
              if "official" in round_med else None)  # round r of official over round r of this
    speedup = summary(paired)[0] if paired else None
    label = "/".join(dict.fromkeys(used.values())) if used else "eager"
    batch = meta["batch"]
    rec = {"model": meta["model"], "pipeline": pipeline, "backends": used, "batch": batch, "size": meta["size"],
           "r1": meta["r1"], "p_low": meta["p_low"], "median_ms": med, "p20_ms": p20, "p80_ms": p80,
           "images_per_s": batch / med * 1e3, "mfm_ms": mfm_med, "mfm_share": mfm_med / med, "peak_mib": peak,
           "speedup_vs_official": speedup, "speedup_rounds": paired,
           "speedup_min": min(paired) if paired else None, "speedup_max": max(paired) if paired else None,
           "round_median_ms": round_med[pipeline], "samples_ms": samples, "mfm_samples_ms": mfm}
    spread = (f"{fft_mask._ratio(speedup)} ({min(paired):.3g}..{max(paired):.3g})" if paired else "-")
    print(f"{meta['model']:<22} {pipeline:<9} {label:<16} {med:>9.2f} {p20:>8.2f} {p80:>8.2f} "
          f"{rec['images_per_s']:>8.1f} {mfm_med:>8.2f} {rec['mfm_share']:>8.1%} "
          f"{'-' if peak is None else f'{peak:.0f}':>9} {spread:>20}")
    return rec


def write_json(args, device, vers, config, ok, records):
    """bench/results/e2e_step-<device>-<stamp>.json (in --out-dir): versions, configuration, every record."""
    gpu = device.type == "cuda"
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    dev_tag = re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name(device) if gpu else "cpu").strip("-")
    path = Path(args.out_dir) / f"e2e_step-{dev_tag}-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"device": fft_mask.device_name(device), "device_type": device.type, **vers,
                                "git_sha": fft_mask.git_sha(), "date": datetime.datetime.now().isoformat(
                                    timespec="seconds"), "command": sys.argv,
                                "timer": timer_name(device),
                                "config": {**config, "backend": args.backend, "autocast": "bf16"},
                                "all_ok": ok, "samples": records}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
