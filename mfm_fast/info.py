"""``python -m mfm_fast.info``: versions, devices, and whether each backend can run here (and why not)."""

from __future__ import annotations

import importlib
import platform
import sys

import torch

from . import __version__
from .dispatch import AUTO_SKIPS, BACKENDS, IMPLEMENTED, backend_unavailable_reason


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except Exception as exc:  # any import failure is worth reporting, not raising
        return f"not available ({type(exc).__name__}: {exc})"


def report() -> str:
    lines = [
        f"mfm_fast     {__version__}",
        f"python       {platform.python_version()} ({sys.executable})",
        f"torch        {torch.__version__} (CUDA build {torch.version.cuda or 'none'})",
    ]
    lines += [f"{name:<12} {_version(name)}" for name in ("triton", "timm", "numpy", "torchvision")]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"GPU {i}        {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB")
    else:
        lines.append("GPU          none visible (torch.cuda.is_available() is False)")
    from .cuda_backend import build_info

    info = build_info()
    if info:
        lines.append(f"cuda ext     {info.get('status')}" + (f": {info['reason']}" if info.get("reason") else "")
                     + "".join(f", {k} {info[k]}" for k in ("arch_list", "nvcc", "torch_version", "build_seconds")
                               if info.get(k) is not None))
    else:
        lines.append("cuda ext     no build record (mfm_fast/_build_info.json): not installed with `pip install -e .`")
    lines.append("ops per backend: " + "; ".join(f"{name} {', '.join(sorted(IMPLEMENTED[name]))}" for name in BACKENDS))
    lines.append("backends (cpu tensors / cuda tensors):")
    for name in BACKENDS:
        for device_type in ("cpu", "cuda"):
            reason = backend_unavailable_reason(name, device_type)
            skips = sorted({why for (b, _), why in AUTO_SKIPS.items() if b == name}) if device_type == "cuda" else []
            note = f" ({'; '.join(skips)})" if reason is None and skips else ""
            lines.append(f"  {name:<10} {device_type:<4}  {'available' + note if reason is None else 'unavailable: ' + reason}")
    return "\n".join(lines)


def main() -> int:
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
