"""The just-in-time build's cache: damaged builds are rebuilt or refused (never loaded), killed builds' folders
are removed, an unusable cache folder is named in one line, and inputs no build serves are refused before
anything is compiled. The compile is faked (no nvcc run) and torch.ops.load_library records what it is given."""

import errno
import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import textwrap
import types

import pytest
import torch

import mfm_fast
from mfm_fast.backends import _jit_build as jb
from mfm_fast.backends import cuda as cuda_backend
from mfm_fast import dispatch

LIBRARY = b"\x7fELF, what the fake compile writes. " * 100


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache where builds run the fake compile; `compiles` lists them, `loaded` the bytes of each
    library handed to torch.ops.load_library."""
    env = types.SimpleNamespace(root=str(tmp_path / "cache"), compiles=[], loaded=[])
    monkeypatch.setenv("MFM_FAST_CACHE", env.root)
    monkeypatch.delenv("MFM_FAST_SKIP_CUDA_BUILD", raising=False)
    monkeypatch.setattr(jb, "unavailable_reason", lambda: None)

    def fake_compile(src, work, cuda_home, archs, log_path):
        env.compiles.append(work)
        with open(os.path.join(work, jb.LIB_NAME + ".so"), "wb") as f:
            f.write(LIBRARY)
        open(log_path, "w").close()
        return True

    def fake_load_library(path):
        with open(path, "rb") as f:
            env.loaded.append(f.read())

    monkeypatch.setattr(jb, "_compile", fake_compile)
    monkeypatch.setattr(torch.ops, "load_library", fake_load_library)
    return env


@pytest.fixture
def backend(cache, monkeypatch):
    """cuda_backend with no ahead-of-time library and nothing loaded yet: it goes to the just-in-time build."""
    monkeypatch.setattr(cuda_backend, "_ahead_of_time_library", lambda: None)
    monkeypatch.setattr(cuda_backend, "build_info", lambda: {})
    monkeypatch.setattr(cuda_backend, "_register", lambda: None)
    monkeypatch.setattr(cuda_backend, "_state", {})
    return cuda_backend


def truncate(library):
    with open(library, "r+b") as f:
        f.truncate(10)


def flip_a_byte(library):
    with open(library, "r+b") as f:
        f.seek(5)
        f.write(b"X")


def drop_the_check_fields(library):
    path = os.path.join(os.path.dirname(library), jb.RECORD)
    with open(path) as f:
        record = json.load(f)
    del record["library_size"], record["library_sha256"]
    with open(path, "w") as f:
        json.dump(record, f)


DAMAGES = [(truncate, "10 bytes"), (flip_a_byte, "sha256"), (os.remove, "no such file"),
           (drop_the_check_fields, "library_size")]


@pytest.mark.parametrize("damage, what", DAMAGES, ids=[d.__name__ for d, _ in DAMAGES])
def test_a_damaged_build_is_rebuilt_and_never_loaded(cache, caplog, damage, what):
    library = jb.build()["library"]
    damage(library)
    with caplog.at_level(logging.WARNING, logger="mfm_fast"):
        record = jb.load()
    assert cache.loaded == [LIBRARY] and len(cache.compiles) == 2 and record["library"] == library
    warnings = [r.getMessage() for r in caplog.records if "rebuilding" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert warnings[0].startswith(f"mfm_fast: {os.path.dirname(library)}{os.sep}") and what in warnings[0], warnings
    assert jb.cached() is not None


def test_a_damaged_build_is_refused_in_one_line_without_compiling(backend, cache):
    library = jb.build()["library"]
    truncate(library)
    line = backend.how_built(build=False)  # what `python -m mfm_fast.info` says
    assert line.startswith(f"not loaded: {library}: 10 bytes") and "\n" not in line, line
    assert cache.loaded == [] and len(cache.compiles) == 1
    assert backend.unavailable_reason(build=True) is None  # not remembered: the next use that may compile rebuilds
    assert cache.loaded == [LIBRARY] and len(cache.compiles) == 2


INFO_WITH_A_TRUNCATED_LIBRARY = textwrap.dedent("""
    import hashlib, json, os, sys
    from mfm_fast.backends import _jit_build as jb, cuda as cuda_backend
    from mfm_fast import info
    jb.unavailable_reason = lambda: None  # a machine that could build it
    cuda_backend._ahead_of_time_library = lambda: None
    cuda_backend.build_info = lambda: {}
    folder = os.path.join(jb.cache_root(), jb._key(jb.sources_dir()))
    os.makedirs(folder)
    with open(sys.argv[1], "rb") as f:
        data = f.read()
    with open(os.path.join(folder, jb.LIB_NAME + ".so"), "wb") as f:
        f.write(data[:len(data) // 3])
    with open(os.path.join(folder, jb.RECORD), "w") as f:
        json.dump({"library_size": len(data), "library_sha256": hashlib.sha256(data).hexdigest()}, f)
    print(folder)
    sys.exit(info.main([]))
""")


def test_info_with_a_truncated_library_says_so_instead_of_dying(tmp_path):
    """A real shared library cut short (loading it is a bus error) in the cache: `python -m mfm_fast.info`."""
    real = os.path.join(os.path.dirname(torch.__file__), "lib", "libc10.so")
    if jb.sources_dir() is None or not os.path.isfile(real):
        pytest.skip("needs the csrc sources and torch's libc10.so")
    env = dict(os.environ, MFM_FAST_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-c", INFO_WITH_A_TRUNCATED_LIBRARY, real], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])
    folder = proc.stdout.splitlines()[0]
    ext = [line for line in proc.stdout.splitlines() if line.startswith("cuda ext")]
    assert len(ext) == 1 and ext[0].startswith(f"cuda ext     not loaded: {folder}{os.sep}{jb.LIB_NAME}.so: "), ext


def test_partial_folders_of_killed_builds_are_removed(cache):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    os.makedirs(cache.root)
    killed = os.path.join(cache.root, f"a-key.partial-{dead.pid}")
    running = os.path.join(cache.root, f"a-key.partial-{os.getpid()}")
    locked = os.path.join(cache.root, f"b-key.partial-{dead.pid}")  # another machine's build holds the key's lock
    for folder in (killed, running, locked):
        os.makedirs(folder)
        open(os.path.join(folder, "build.log"), "w").close()
    with jb._FileLock(os.path.join(cache.root, "b-key.lock")):
        assert jb.load(build_if_needed=False) is None
    assert not os.path.exists(killed)
    assert os.path.isdir(running) and os.path.isdir(locked)
    jb.build()
    assert not os.path.exists(locked) and os.path.isdir(running)


@pytest.mark.parametrize("op", ["corrupt", "masked_freq_loss"])
def test_cpu_tensors_are_refused_before_anything_is_compiled(backend, cache, monkeypatch, op):
    monkeypatch.setattr(jb, "_compile", lambda *args: pytest.fail("compiled for inputs it cannot run"))
    x, m = torch.rand(1, 3, 112, 112), mfm_fast.make_masks(1, 112, 112, r1=8)
    with pytest.raises(RuntimeError, match=rf"^backend='cuda' for {op} on cpu: the CUDA extension backend runs on "
                                           r"CUDA tensors only"):
        if op == "corrupt":
            mfm_fast.corrupt(x, m, backend="cuda")
        else:
            mfm_fast.masked_freq_loss(torch.randn_like(x), x, m, backend="cuda")
    assert not os.path.exists(cache.root)


def test_sizes_it_is_not_compiled_for_are_refused_before_anything_is_compiled(backend, monkeypatch):
    monkeypatch.setattr(jb, "_compile", lambda *args: pytest.fail("compiled for inputs it cannot run"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert dispatch.backend_unavailable_reason("cuda", "cuda", "corrupt", (3, 64, 64)).startswith("64 x 64 planes: ")
    assert dispatch.backend_unavailable_reason("cuda", "cuda", "corrupt", (9, 112, 112)).startswith("9 channels: ")


def _one_line(reason, start):
    assert reason.startswith(start) and "\n" not in reason, reason


def test_a_cache_path_that_is_a_file_is_named_in_one_line(backend, cache, tmp_path, monkeypatch):
    open(cache.root, "w").close()
    with pytest.raises(RuntimeError) as exc:
        jb.build()
    _one_line(str(exc.value), f"MFM_FAST_CACHE {cache.root}: is a file, not a folder")
    _one_line(backend.unavailable_reason(), f"MFM_FAST_CACHE {cache.root}: is a file, not a folder")
    below = os.path.join(cache.root, "mfm_fast")
    monkeypatch.setenv("MFM_FAST_CACHE", below)
    with pytest.raises(RuntimeError) as exc:
        jb.build()
    _one_line(str(exc.value), f"MFM_FAST_CACHE {below}: {cache.root} is a file, not a folder")
    assert cache.compiles == []


def test_a_read_only_cache_is_named_in_one_line(cache, monkeypatch):
    os.makedirs(cache.root)
    os.chmod(cache.root, 0o555)
    try:
        tempfile.TemporaryFile(dir=cache.root).close()
    except PermissionError:
        cause = os.strerror(errno.EACCES)
    else:  # root writes anyway: a read-only file system is what stops it
        cause = os.strerror(errno.EROFS)

        def read_only(*args, dir=None, **kwargs):
            raise OSError(errno.EROFS, cause, dir)

        monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    try:
        with pytest.raises(RuntimeError) as exc:
            jb.build()
    finally:
        os.chmod(cache.root, 0o755)
    _one_line(str(exc.value), f"MFM_FAST_CACHE {cache.root}: not writable ({cause})")
    assert cache.compiles == []
