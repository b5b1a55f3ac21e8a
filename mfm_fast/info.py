"""``python -m mfm_fast.info``: versions, devices, the install, and whether each backend can run here (and why not).

``--require-cuda-ext`` loads the CUDA extension (compiling it just in time if no build exists yet) and exits
0 only when it loaded, 1 otherwise (the reason on stderr).
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import sys

import torch

from .cli import OneLineParser
from . import __version__, cuda_backend
from .dispatch import AUTO_SKIPS, BACKENDS, IMPLEMENTED, OPS, backend_unavailable_reason


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except Exception as exc:  # any import failure is worth reporting, not raising
        return f"not available ({type(exc).__name__}: {exc})"


def install_kind() -> str:
    """How this mfm_fast was installed (pip's direct_url.json, PEP 610, of the distribution that holds this
    package), and where the package is."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        from importlib.metadata import distributions

        for dist in distributions(name="mfm_fast"):
            direct = json.loads(dist.read_text("direct_url.json") or "null")
            if direct is None:
                continue
            url = direct.get("url", "")
            source = url[len("file://"):] if url.startswith("file://") else None
            if direct.get("dir_info", {}).get("editable"):
                if source and here.startswith(os.path.abspath(source) + os.sep):
                    return f"editable (pip install -e) from {url}, package at {here}"
            elif os.path.abspath(str(dist.locate_file("mfm_fast"))) == here:
                kind = "non-editable, from the archive" if "archive_info" in direct else "non-editable (pip install .) from"
                return f"{kind} {url}, package at {here}"
    except Exception:  # a broken metadata folder is worth a line, not a traceback
        pass
    return f"no pip record of this package (setup.py develop, an egg link or a source checkout on sys.path) at {here}"


def report(build: bool = False) -> str:
    """The report; `build`: compile the CUDA extension just in time if it is not built yet."""
    lines = [
        f"mfm_fast     {__version__}",
        f"install      {install_kind()}",
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
    lines.append(f"cuda ext     {cuda_backend.how_built(build)}")
    lines.append("ops per backend: " + "; ".join(f"{name} {', '.join(sorted(IMPLEMENTED[name]))}" for name in BACKENDS))
    lines.append("backends per op (cpu tensors / cuda tensors), from the registry in mfm_fast.dispatch:")
    for op in OPS:
        lines.append(f"  {op}")
        for name in BACKENDS:
            for device_type in ("cpu", "cuda"):
                reason = backend_unavailable_reason(name, device_type, op, build=build)
                skip = AUTO_SKIPS.get((name, op)) if device_type == "cuda" else None
                note = f" ({skip})" if reason is None and skip else ""
                status = "available" + note if reason is None else "unavailable: " + reason
                lines.append(f"    {name:<10} {device_type:<4}  {status}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = OneLineParser(prog="python -m mfm_fast.info", description=__doc__.splitlines()[0])
    parser.add_argument("--require-cuda-ext", action="store_true",
                        help="load the CUDA extension, building it just in time if needed; exit 1 unless it loaded")
    args = parser.parse_args(argv)
    print(report(build=args.require_cuda_ext))
    if args.require_cuda_ext:
        reason = cuda_backend.unavailable_reason(build=True)
        if reason is not None:
            print(f"{parser.prog}: --require-cuda-ext: {reason}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
