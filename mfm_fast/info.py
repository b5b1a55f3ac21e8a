"""``python -m mfm_fast.info``: versions, devices, the install, and whether each backend can run here (and why not).

``--require-cuda-ext`` loads the CUDA extension (compiling it just in time if no build exists yet), ends with a
line "CUDA extension: loaded, <how it was built, where from>" or "CUDA extension: NOT loaded: <why>", and exits
0 only when it loaded, 1 otherwise (the reason on stderr too).
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import sys

import torch

from .cli import OneLineParser
from . import __version__
from . import backends
from .backends import cuda as cuda_backend
from .dispatch import auto_skip_reason, backend_unavailable_reason


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


def backend_table(build: bool = False) -> list:
    """Lines: per op and backend, whether it runs on CPU and on CUDA tensors; each reason printed once, below."""
    gpu = torch.cuda.is_available()
    notes: list = []

    def cell(name: str, op: str, device_type: str) -> str:
        if device_type == "cuda" and not gpu and op in backends.get(name).ops:
            return "no GPU visible"
        reason = backend_unavailable_reason(name, device_type, op, build=build)
        skip = auto_skip_reason(name, op) if device_type == "cuda" else None
        if reason is None and skip is None:
            return "available"
        text = reason if reason is not None else skip
        if text not in notes:
            notes.append(text)
        return f"{'available' if reason is None else 'unavailable'} [{notes.index(text) + 1}]"

    lines = ["backends per op, on CPU / CUDA tensors (from the registry in mfm_fast.backends; notes below):",
             f"  {'op':<18} {'backend':<10} {'cpu':<16} cuda"]
    for op in backends.OPS:
        for i, name in enumerate(backends.names()):
            lines.append(f"  {op if i == 0 else '':<18} {name:<10} {cell(name, op, 'cpu'):<16} {cell(name, op, 'cuda')}")
    lines += [f"  [{i}] {text}" for i, text in enumerate(notes, 1)]
    return lines


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
    lines.append("ops per backend: " + "; ".join(f"{name} {', '.join(sorted(backends.get(name).ops))}"
                                                 for name in backends.names()))
    lines += backend_table(build)
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
            print(f"CUDA extension: NOT loaded: {reason}")
            print(f"{parser.prog}: --require-cuda-ext: {reason}", file=sys.stderr)
            return 1
        print(f"CUDA extension: loaded, {cuda_backend.how_built()}{_library_note()}")
    return 0


def _library_note() -> str:
    """", from <path>" for the ahead-of-time library (the just-in-time one names its cache folder already)."""
    library = cuda_backend._ahead_of_time_library()
    return f", from {library}" if library and cuda_backend.how_built().startswith("built ahead of time") else ""


if __name__ == "__main__":
    sys.exit(main())
