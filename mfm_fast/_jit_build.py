"""Just-in-time build of the CUDA extension (csrc/) on first use, for installs that did not build it ahead of time.

An isolated PEP 517 build (pip 26.x always, pip 23.2 without ``wheel``) has no torch, so setup.py cannot
compile ``mfm_fast._C``; the csrc sources ship with the package instead (``mfm_fast/csrc`` in a wheel or a
non-editable install, the checkout's ``csrc/`` otherwise) and :func:`load` compiles them with
``torch.utils.cpp_extension.load`` and ninja the first time the cuda backend is asked for.

The build is cached in ``$MFM_FAST_CACHE`` (default ``$XDG_CACHE_HOME/mfm_fast``, i.e. ``~/.cache/mfm_fast``),
one folder per key ``<python>-torch<version>-cuda<version>-sm<archs>-<sha256 of csrc and flags>``; a build
happens in a private folder renamed into place when it is complete, under an OS file lock, so concurrent first
uses (DDP ranks) compile once and the others wait and load the result. Nothing here imports torch at module
level: setup.py loads this file by path (``find_cuda_home``, ``sources_hash``) in build environments without
torch.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from typing import Optional

logger = logging.getLogger("mfm_fast")

SOURCES = ("ops.cpp", "corrupt.cu", "masked_freq_loss.cu", "loss_band.cu", "scale_grad.cu")
CXX_FLAGS = ("-O3",)
NVCC_FLAGS = ("-O3", "-lineinfo")
DEFAULT_ARCH_LIST = "9.0"  # H100 / H200, when no GPU is visible (setup.py uses the same default)
LIB_NAME = "mfm_fast_C"
RECORD = "build.json"
_SOURCE_SUFFIXES = (".cpp", ".cu", ".cuh", ".h")


def flag(name: str) -> bool:
    return os.environ.get(name, "").strip() not in ("", "0", "false", "False")


def find_cuda_home() -> Optional[str]:
    """The CUDA toolkit: $CUDA_HOME / $CUDA_PATH, /usr/local/cuda, /usr/local/cuda-*, or where nvcc resolves to."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for home in candidates:
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return home
    nvcc = shutil.which("nvcc")
    if nvcc:  # /usr/local/bin/nvcc may be a wrapper: the toolkit is where the resolved binary lives
        home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if os.path.exists(os.path.join(home, "include", "cuda_runtime_api.h")):
            return home
    return None


def nvcc_version(cuda_home: str) -> str:
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True,
                             timeout=60).stdout.strip()
        return out.splitlines()[-1] if out else "unknown"
    except Exception as exc:  # a version string is reported, never worth failing over
        return f"unknown ({exc})"


def sources_dir() -> Optional[str]:
    """The folder holding the csrc sources: mfm_fast/csrc (wheel, non-editable install) or the checkout's csrc/."""
    package = os.path.dirname(os.path.abspath(__file__))
    for folder in (os.path.join(package, "csrc"), os.path.join(os.path.dirname(package), "csrc")):
        if all(os.path.isfile(os.path.join(folder, name)) for name in SOURCES):
            return folder
    return None


def sources_hash(folder: str) -> str:
    """sha256 over the names and bytes of every C++ / CUDA file in `folder` and the compile flags."""
    h = hashlib.sha256(repr((CXX_FLAGS, NVCC_FLAGS)).encode())
    for name in sorted(os.listdir(folder)):
        if name.endswith(_SOURCE_SUFFIXES):
            h.update(name.encode() + b"\0")
            with open(os.path.join(folder, name), "rb") as f:
                h.update(f.read() + b"\0")
    return h.hexdigest()


def cache_root() -> str:
    if os.environ.get("MFM_FAST_CACHE"):
        return os.path.abspath(os.path.expanduser(os.environ["MFM_FAST_CACHE"]))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "mfm_fast")


def arch_list() -> str:
    """TORCH_CUDA_ARCH_LIST, else the visible GPUs' compute capabilities, else DEFAULT_ARCH_LIST."""
    import torch

    if os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip():
        return os.environ["TORCH_CUDA_ARCH_LIST"].strip()
    if torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return ";".join(f"{major}.{minor}" for major, minor in caps)
    return DEFAULT_ARCH_LIST


def find_ninja() -> Optional[str]:
    """The ninja executable: on PATH, beside this interpreter, or the one the `ninja` package installed."""
    found = shutil.which("ninja") or shutil.which("ninja", path=os.path.dirname(sys.executable))
    if found:
        return found
    try:
        from importlib.metadata import distribution

        import ninja

        # RECORD paths are relative to the real site-packages (the package may be reached through a link)
        site = os.path.dirname(os.path.dirname(os.path.realpath(ninja.__file__)))
        for f in distribution("ninja").files or ():
            path = os.path.normpath(os.path.join(site, str(f)))
            if f.name == "ninja" and "bin" in f.parts and os.access(path, os.X_OK):
                return path
    except Exception:  # no ninja package, or one without a RECORD
        pass
    return None


def _key(src: str) -> str:
    import torch

    archs = arch_list().replace(";", "_").replace(" ", "_").replace("+", "")
    tag = sys.implementation.cache_tag or f"py{sys.version_info.major}{sys.version_info.minor}"
    torch_version = torch.__version__.replace("+", "_")
    return f"{tag}-torch{torch_version}-cuda{torch.version.cuda}-sm{archs}-{sources_hash(src)[:16]}"


def unavailable_reason() -> Optional[str]:
    """None if a just-in-time build can run here, else why not."""
    import torch

    if flag("MFM_FAST_SKIP_CUDA_BUILD"):
        return "MFM_FAST_SKIP_CUDA_BUILD=1 is set, so nothing is compiled"
    if sources_dir() is None:
        return "the csrc sources are not installed with the package (mfm_fast/csrc), so it cannot be built just in time"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if find_cuda_home() is None:
        return "nvcc not found (install the CUDA toolkit or set CUDA_HOME)"
    if find_ninja() is None:
        return "ninja not found (pip install ninja)"
    return None


def cached() -> Optional[dict]:
    """The record of a finished build for this torch / CUDA / arch list / sources, or None."""
    src = sources_dir()
    if src is None:
        return None
    folder = os.path.join(cache_root(), _key(src))
    return _read_record(folder)


def _read_record(folder: str) -> Optional[dict]:
    try:
        with open(os.path.join(folder, RECORD), encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    record["library"] = os.path.join(folder, LIB_NAME + ".so")  # where the folder is now
    return record if os.path.isfile(record["library"]) else None


class _FileLock:
    """An exclusive OS lock (flock) on `path`: released by the kernel if the holder dies, so it never goes stale."""

    def __init__(self, path: str):
        self.path = path

    def __enter__(self):
        import fcntl

        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            logger.warning("mfm_fast: waiting for another process that is compiling the CUDA extension (%s)",
                           self.path)
            fcntl.flock(self.file, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        self.file.close()  # closing the file releases the lock


def build() -> dict:
    """Compile the extension into the cache (or take what another process compiled meanwhile); its record."""
    import torch

    why = unavailable_reason()
    if why is not None:
        raise RuntimeError(why)
    src = sources_dir()
    root = cache_root()
    os.makedirs(root, exist_ok=True)
    key = _key(src)
    final = os.path.join(root, key)
    waited_since = time.time()
    with _FileLock(final + ".lock"):
        record = _read_record(final)
        if record is not None:
            return record
        failure = _recent_failure(final + ".failed.json", waited_since)
        if failure is not None:  # another rank failed while this one waited: same inputs, same failure
            raise RuntimeError(failure)
        cuda_home = find_cuda_home()
        meta = {"how": "just in time", "key": key, "torch_version": torch.__version__, "torch_cuda": torch.version.cuda,
                "cuda_home": cuda_home, "nvcc": nvcc_version(cuda_home), "arch_list": arch_list(),
                "sources": os.path.abspath(src), "sources_sha256": sources_hash(src)}
        work = f"{final}.partial-{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        os.makedirs(work)
        logger.warning("mfm_fast: compiling the CUDA extension just in time (first use with torch %s, CUDA %s, "
                       "arch %s; 1-3 minutes on a few cores), cached in %s", meta["torch_version"], meta["torch_cuda"],
                       meta["arch_list"], final)
        start = time.time()
        log_path = os.path.join(work, "build.log")
        ok = _compile(src, work, cuda_home, meta["arch_list"], log_path)
        seconds = round(time.time() - start, 1)
        if not ok:
            with open(log_path, encoding="utf-8", errors="replace") as f:
                tail = f.read()[-1500:]
            message = f"the just-in-time build of the CUDA extension failed after {seconds} s (log: {log_path}): {tail}"
            with open(final + ".failed.json", "w", encoding="utf-8") as f:
                json.dump({"error": message}, f)
            raise RuntimeError(message)
        meta.update(build_seconds=seconds, time_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    library=os.path.join(final, LIB_NAME + ".so"))
        with open(os.path.join(work, RECORD), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(work, final)  # atomic: the folder either holds a complete build or does not exist
        logger.warning("mfm_fast: compiled the CUDA extension in %.1f s (%s)", seconds, final)
        return meta


def _recent_failure(path: str, since: float) -> Optional[str]:
    try:
        if os.path.getmtime(path) < since:
            return None
        with open(path, encoding="utf-8") as f:
            return json.load(f)["error"]
    except (OSError, ValueError, KeyError):
        return None


def _compile(src: str, work: str, cuda_home: str, archs: str, log_path: str) -> bool:
    """torch.utils.cpp_extension.load in a child process (its environment, its output into the log)."""
    env = dict(os.environ, CUDA_HOME=cuda_home, TORCH_CUDA_ARCH_LIST=archs)
    env.setdefault("MAX_JOBS", "2")
    env["PATH"] = os.pathsep.join([os.path.dirname(find_ninja()), os.path.join(cuda_home, "bin"), env.get("PATH", "")])
    script = (
        "import sys\n"
        "from torch.utils.cpp_extension import load\n"
        "src, work = sys.argv[1], sys.argv[2]\n"
        f"load(name={LIB_NAME!r}, sources=[src + '/' + s for s in {list(SOURCES)!r}], build_directory=work,\n"
        f"     extra_include_paths=[src], extra_cflags={list(CXX_FLAGS)!r}, extra_cuda_cflags={list(NVCC_FLAGS)!r},\n"
        "     is_python_module=False, verbose=True)\n"
    )
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.run([sys.executable, "-c", script, src, work], stdout=log, stderr=subprocess.STDOUT, env=env)
    return proc.returncode == 0 and os.path.isfile(os.path.join(work, LIB_NAME + ".so"))


def load(build_if_needed: bool = True) -> Optional[dict]:
    """Load the cached build into this process (compiling it first if `build_if_needed`); its record, or None
    when nothing is cached and `build_if_needed` is False. Raises RuntimeError (why) when it cannot be built."""
    import torch

    if flag("MFM_FAST_SKIP_CUDA_BUILD"):
        raise RuntimeError("MFM_FAST_SKIP_CUDA_BUILD=1 is set, so nothing is compiled or loaded just in time")
    record = cached()
    if record is None:
        if not build_if_needed:
            return None
        record = build()
    torch.ops.load_library(record["library"])
    return record
