"""Just-in-time build of the CUDA extension (csrc/) on first use, for installs that did not build it ahead of time.

An isolated PEP 517 build (pip 26.x always, pip 23.2 without ``wheel``) has no torch, so setup.py cannot
compile ``mfm_fast._C``; the csrc sources ship with the package instead (``mfm_fast/csrc`` in a wheel or a
non-editable install, the checkout's ``csrc/`` otherwise) and :func:`load` compiles them with
``torch.utils.cpp_extension.load`` and ninja the first time the cuda backend is asked for.

The build is cached in ``$MFM_FAST_CACHE`` (default ``$XDG_CACHE_HOME/mfm_fast``, i.e. ``~/.cache/mfm_fast``),
one folder per key ``<python>-torch<version>-cuda<version>-sm<archs>-<sha256 of csrc and flags>``; a build
happens in a private folder ``<key>.partial-<pid>`` renamed into place when it is complete, under an OS file
lock, so concurrent first uses (DDP ranks) compile once and the others wait and load the result. The build
record (build.json) holds the size and sha256 of the library: an entry whose library does not match them is
never loaded (loading a truncated library kills the process with SIGBUS) but rebuilt, and the private folders
of killed builds are removed. Nothing here imports torch at module level: setup.py loads this file by path
(``find_cuda_home``, ``sources_hash``) in build environments without torch.
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
import tempfile
import time
from typing import Optional, Tuple

logger = logging.getLogger("mfm_fast")

SOURCES = ("ops.cpp", "corrupt.cu", "masked_freq_loss.cu", "loss_band.cu", "scale_grad.cu")
CXX_FLAGS = ("-O3",)
NVCC_FLAGS = ("-O3", "-lineinfo")
DEFAULT_ARCH_LIST = "9.0"  # H100 / H200, when no GPU is visible (setup.py uses the same default)
LIB_NAME = "mfm_fast_C"
RECORD = "build.json"
_SOURCE_SUFFIXES = (".cpp", ".cu", ".cuh", ".h")
_PARTIAL = ".partial-"
_checked: dict = {}  # (library, size, mtime) -> what is wrong with it or None: each library is hashed once


class CacheError(RuntimeError):
    """The cache folder cannot hold a build (the message names it and why)."""


class NotBuilt(RuntimeError):
    """The cached build is damaged and compiling was not asked for (the message names it and what is wrong)."""


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
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # mfm_fast/
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
    """The record of an intact finished build for this torch / CUDA / arch list / sources, or None."""
    return _entry()[0]


def _entry() -> Tuple[Optional[dict], Optional[str]]:
    """:func:`_read_record` of the cache folder for this torch / CUDA / arch list / sources."""
    src = sources_dir()
    return (None, None) if src is None else _read_record(os.path.join(cache_root(), _key(src)))


def _read_record(folder: str) -> Tuple[Optional[dict], Optional[str]]:
    """(record, None) for an intact build in `folder`; (None, what is wrong) for a damaged one; (None, None)
    when there is none."""
    if not os.path.isdir(folder):
        return None, None
    path = os.path.join(folder, RECORD)
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except FileNotFoundError:
        return None, f"{path}: missing"
    except (OSError, ValueError) as exc:
        return None, f"{path}: unreadable ({exc})"
    if not isinstance(record, dict) or not isinstance(record.get("library_size"), int) \
            or not isinstance(record.get("library_sha256"), str):
        return None, f"{path}: no library_size / library_sha256 to check the library with (an older record)"
    record["library"] = os.path.join(folder, LIB_NAME + ".so")  # where the folder is now
    problem = _library_problem(record["library"], record["library_size"], record["library_sha256"])
    return (None, problem) if problem else (record, None)


def _library_problem(library: str, size: int, sha256: str) -> Optional[str]:
    """What is wrong with `library` against the size and sha256 its record holds, or None."""
    try:
        st = os.stat(library)
    except OSError as exc:
        return f"{library}: {exc.strerror.lower()}"
    key = (library, st.st_size, st.st_mtime_ns)
    if key not in _checked:
        if st.st_size != size:
            _checked[key] = f"{library}: {st.st_size} bytes, {RECORD} says {size} (a partial copy or a full disk?)"
        else:
            _checked[key] = None if _sha256(library) == sha256 else f"{library}: sha256 differs from {RECORD}'s"
    return _checked[key]


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cache_dir_problem(path: str) -> Optional[str]:
    """Why the folder `path` cannot hold a cache, or None when it can: it is created if missing (with its
    parents) and a temporary file is written in it. The cause, for a message that names the path first:
    "is a file, not a folder", "<parent> is a file, not a folder" or "not writable (<OS error>)". Shared by the
    just-in-time build's cache and tools/kernel_model.py's."""
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as exc:
        blocker = path
        while blocker != os.path.dirname(blocker) and not os.path.lexists(blocker):
            blocker = os.path.dirname(blocker)
        if not os.path.isdir(blocker):
            return "is a file, not a folder" if blocker == path else f"{blocker} is a file, not a folder"
        return f"not writable ({exc.strerror or exc})"
    return None


def _writable_cache() -> str:
    """cache_root(), created if missing; CacheError (one line, the folder and the cause first) when it is not a
    writable folder."""
    root = cache_root()
    problem = cache_dir_problem(root)
    if problem is not None:
        name = f"MFM_FAST_CACHE {root}" if os.environ.get("MFM_FAST_CACHE") else f"the build cache {root}"
        raise CacheError(f"{name}: {problem} (set MFM_FAST_CACHE to a writable folder)")
    return root


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


def _remove_stale_partials(root: str) -> None:
    """Remove the ``<key>.partial-<pid>`` folders of builds that were killed: their process no longer runs and
    nobody holds the key's lock (a process of another machine sharing the cache holds it while it builds)."""
    try:
        names = os.listdir(root)
    except OSError:
        return
    for name in names:
        key, _, pid = name.rpartition(_PARTIAL)
        if not key or not pid.isdigit() or _running(int(pid)):
            continue
        try:
            with _FileLock(os.path.join(root, key + ".lock"), wait=False):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        except OSError:  # the key is being built, or the cache is read-only
            pass


class _FileLock:
    """An exclusive OS lock (flock) on `path`: released by the kernel if the holder dies, so it never goes stale.
    With `wait` False, entering raises BlockingIOError when another holds it."""

    def __init__(self, path: str, wait: bool = True):
        self.path = path
        self.wait = wait

    def __enter__(self):
        import fcntl

        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            if not self.wait:
                self.file.close()
                raise
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
    root = _writable_cache()
    _remove_stale_partials(root)
    key = _key(src)
    final = os.path.join(root, key)
    waited_since = time.time()
    with _FileLock(final + ".lock"):
        record, problem = _read_record(final)
        if record is not None:
            return record
        if problem is not None:
            logger.warning("mfm_fast: %s; rebuilding the cached CUDA extension", problem)
        failure = _recent_failure(final + ".failed.json", waited_since)
        if failure is not None:  # another rank failed while this one waited: same inputs, same failure
            raise RuntimeError(failure)
        cuda_home = find_cuda_home()
        meta = {"how": "just in time", "key": key, "torch_version": torch.__version__, "torch_cuda": torch.version.cuda,
                "cuda_home": cuda_home, "nvcc": nvcc_version(cuda_home), "arch_list": arch_list(),
                "sources": os.path.abspath(src), "sources_sha256": sources_hash(src)}
        work = f"{final}{_PARTIAL}{os.getpid()}"
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
        library = os.path.join(work, LIB_NAME + ".so")
        meta.update(build_seconds=seconds, time_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    library_size=os.path.getsize(library), library_sha256=_sha256(library),
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
    """Load the cached build into this process (compiling it first, or again when damaged, if `build_if_needed`);
    its record, or None when nothing is cached and `build_if_needed` is False. Raises NotBuilt for a damaged
    build without `build_if_needed`, RuntimeError (why) when it cannot be built."""
    import torch

    if flag("MFM_FAST_SKIP_CUDA_BUILD"):
        raise RuntimeError("MFM_FAST_SKIP_CUDA_BUILD=1 is set, so nothing is compiled or loaded just in time")
    _remove_stale_partials(cache_root())
    record, problem = _entry()
    if record is None:
        if not build_if_needed:
            if problem is None:
                return None
            raise NotBuilt(f"{problem}; this damaged CUDA extension build is not loaded: it is rebuilt on first use "
                           "of backend='cuda' (`python -m mfm_fast.info --require-cuda-ext` rebuilds it now)")
        record = build()
    torch.ops.load_library(record["library"])
    return record
