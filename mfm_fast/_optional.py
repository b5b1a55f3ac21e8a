"""The optional packages of the command-line tools and examples (the ``train`` extra), checked before any work."""

from __future__ import annotations

import importlib.util
import sys

TRAIN = ("timm", "torchvision", "tqdm", "matplotlib", "skimage")  # setup.py's extras_require["train"]
PIP_NAMES = {"skimage": "scikit-image"}  # import name -> pip name, where they differ
# What each command of the trainer (python -m mfm_fast.<command>, mfm_fast/train/<command>.py) imports.
NEEDS = {"pretrain": TRAIN, "linprobe": ("timm", "torchvision", "tqdm", "skimage"),
         "visualize": ("timm", "matplotlib", "skimage"), "finetune": TRAIN,
         "evaluate": ("timm", "torchvision", "tqdm")}


def missing(*modules: str) -> list:
    """The pip names of the modules that cannot be imported (without importing any of them)."""
    out = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a blocked or half-installed package
            found = False
        if not found:
            out.append(PIP_NAMES.get(name, name))
    return out


def require(prog: str, *modules: str) -> None:
    """Exit with status 2 and one line "prog: error: needs X (not installed): pip install ..." when any of the
    modules (import names) is missing."""
    absent = missing(*modules)
    if absent:
        sys.stderr.write(f"{prog}: error: needs {', '.join(absent)} (not installed): pip install -e '.[train]' "
                         "(or pip install 'mfm_fast[train]')\n")
        raise SystemExit(2)
