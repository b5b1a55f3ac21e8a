"""The training application: ``python -m mfm_fast.pretrain`` (MFM / FOLK pre-training of a timm backbone),
``linprobe``, ``visualize``, ``finetune`` and ``evaluate``, built on the library (mfm_fast's masks, corruption,
loss, heads and FOLK).

- pretrain.py, pretrain_args.py: the command and its arguments; engine.py: the step loop; tasks.py: what a step
  computes for each method; pretrain_data.py: the batches; data.py: the datasets (built-in photos and faces,
  ImageFolder); model.py: encoder + head; optim.py: optimiser and schedule; checkpoint.py: kill-safe save and
  bit-exact resume; runtime.py: device, DDP and threads;
- linprobe.py: frozen features + a linear classifier; visualize.py: the pictures;
- finetune.py: the fine-tuning command; finetune_engine.py: its loop, evaluation and checkpoints; finetune_data.py:
  its transforms, datasets and few-shot subsets; released.py: the released ViT on timm and --init's checkpoint
  loading; evaluate.py + robustness.py: top-1 / top-5, ImageNet-R / -A / -C.

The library never imports this package (tests/package/test_imports.py checks it).
"""

import importlib
import sys

from .._optional import NEEDS, require


def run_command(command: str) -> None:
    """``python -m mfm_fast.<command>``: check the command's optional packages (one line and exit 2 when one is
    missing, before anything is imported), then run ``mfm_fast.train.<command>.main`` on the command line."""
    require(f"python -m mfm_fast.{command}", *NEEDS[command])
    importlib.import_module(f"{__name__}.{command}").main(sys.argv[1:])
