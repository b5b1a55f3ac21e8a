"""Installing mfm_fast as a new user would, in fresh virtual environments, and `python -m mfm_fast.info`.

Each venv is a real `python -m venv` (its own pip 23.2 and setuptools, no `wheel`) that sees the running
interpreter's other packages (torch, triton, numpy, ...) through a .pth file pointing at a folder of links,
so it costs seconds; pip itself, setuptools, wheel, mfm_fast and PyPI's `kernels` are left out of that folder.
Every install works on a copy of the repository (the working tree is never modified) and every venv shares
one just-in-time build cache: the suite compiles the CUDA extension once, the other installs load that build.
pip reaches PyPI for its isolated build environments, a newer pip and PyPI's `kernels`; every one of those
installs is pinned by constraints.txt (PIP_CONSTRAINT, and PIP_BUILD_CONSTRAINT for pips that no longer pass
constraints into build environments), so a new release on PyPI changes nothing here until `make lock` is run.
"""

import glob
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONSTRAINTS = os.path.join(ROOT, "constraints.txt")


def pinned(name: str) -> str:
    """`name==version` as constraints.txt pins it (the one place registry versions are chosen)."""
    with open(CONSTRAINTS, encoding="utf-8") as f:
        for line in f:
            if line.split("==")[0].strip().lower().replace("_", "-") == name:
                return line.strip()
    raise AssertionError(f"constraints.txt pins no {name}: run `make lock`")
LEFT_OUT = ("pip", "setuptools", "pkg_resources", "_distutils_hack", "wheel", "mfm_fast", "__editable__", "kernels",
            "__pycache__")

# The extension's host (CPU) kernels against the torch backend, run inside a venv; prints the errors as JSON.
KERNEL_CHECK = textwrap.dedent("""
    import json, torch, mfm_fast
    from mfm_fast.backends import cuda as cuda_backend
    assert cuda_backend.unavailable_reason() is None, cuda_backend.unavailable_reason()
    ops = torch.ops.mfm_fast
    torch.manual_seed(0)
    x = torch.rand(2, 3, 112, 112)
    m = mfm_fast.make_masks(2, 112, 112, r1=8, low=torch.tensor([True, False]))
    mean, std = list(mfm_fast.IMAGENET_MEAN), list(mfm_fast.IMAGENET_STD)
    got = ops.corrupt_cuda(x, m, mean, std, torch.float32)
    want = mfm_fast.corrupt(x, m, backend="torch")
    pred = torch.randn(2, 3, 112, 112)
    loss, grad = ops.masked_freq_loss_cuda(pred, x, m, 1.0, "masked", 1.0, mean, std, True)
    p = pred.clone().requires_grad_(True)
    ref = mfm_fast.masked_freq_loss(p, x, m, normalize_target=True, backend="torch")
    ref.backward()
    rel = lambda a, b: float((a.double() - b.double()).abs().max() / b.double().abs().max())
    print(json.dumps({"corrupt": rel(got, want), "loss": rel(loss, ref.detach()), "grad": rel(grad, p.grad),
                      "package": mfm_fast.__file__}))
""")

# PyPI's kernels and mfm_fast.kernels, each from its own files and working.
BOTH_KERNELS_CHECK = textwrap.dedent("""
    import importlib.metadata as md, json, os, torch, mfm_fast
    out = {}
    try:
        import kernels
        out["kernels"] = kernels.__file__
        # public behaviour only: every entry point it declares loads, and its documented loader is there
        loaded = [e.load() for e in md.distribution("kernels").entry_points]
        assert all(obj is not None for obj in loaded) and callable(kernels.get_kernel)
    except ModuleNotFoundError:
        out["kernels"] = None
    import mfm_fast.kernels
    out["mfm_fast.kernels"] = mfm_fast.kernels.__file__
    x, m = torch.rand(1, 3, 16, 16), mfm_fast.make_masks(1, 16, 16, r1=3)
    err = (mfm_fast.corrupt(x, m, backend="triton") - mfm_fast.corrupt(x, m, backend="torch")).abs().max()
    out["triton_err"] = float(err)
    print(json.dumps(out))
""")


def _run(cmd, cwd, env, timeout=900):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} (in {cwd}) exited {proc.returncode}\n"
                             f"--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="session")
def site_links(tmp_path_factory):
    """A folder of links to the running interpreter's installed packages, less pip / setuptools / wheel /
    mfm_fast / kernels (the first of a name on sys.path wins, as imports would)."""
    folder = tmp_path_factory.mktemp("site-links")
    seen = set()
    for d in [p for p in sys.path if p.rstrip("/").endswith("site-packages") and os.path.isdir(p)]:
        for name in sorted(os.listdir(d)):
            base = name.split("-")[0].split(".")[0]
            if name in seen or base in LEFT_OUT or name.endswith((".pth", ".egg-link")):
                continue
            seen.add(name)
            os.symlink(os.path.join(d, name), folder / name)
    return str(folder)


@pytest.fixture(scope="session")
def jit_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("jit-cache"))


@pytest.fixture
def env(jit_cache):
    e = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "MFM_FAST_SKIP_CUDA_BUILD",
                                                          "MFM_FAST_FORCE_CUDA", "MFM_FAST_DEFER_CUDA_BUILD", "PIP_REQUIRE_VIRTUALENV")}
    e.update(MFM_FAST_CACHE=jit_cache, PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONNOUSERSITE="1",
             PIP_CONSTRAINT=CONSTRAINTS, PIP_BUILD_CONSTRAINT=CONSTRAINTS)
    e.setdefault("MAX_JOBS", "2")
    return e


def _venv(path, site_links, env):
    """A fresh venv (pip 23.2 and setuptools as Python ships them, no wheel) seeing `site_links`; its python."""
    _run([sys.executable, "-m", "venv", str(path)], cwd=os.path.dirname(path), env=env)
    python = os.path.join(path, "bin", "python")
    site = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], path, env).stdout.strip()
    with open(os.path.join(site, "zz_site_links.pth"), "w") as f:
        f.write(site_links + "\n")
    return python


def _copy_repo(dst):
    shutil.copytree(ROOT, dst, ignore=shutil.ignore_patterns(
        ".venv*", ".git", "build", "dist", "*.egg-info", "__pycache__", "*.so", "_build_info.json", ".pytest_cache",
        ".benchmarks", "output"))
    return str(dst)


def _record(package_dir):
    with open(os.path.join(package_dir, "_build_info.json"), encoding="utf-8") as f:
        return json.load(f)


def _check_kernels_after_install(python, where, env, jit_cache, install_line):
    """info --require-cuda-ext exits 0 (building just in time, or loading the suite's one build), says how it
    was built, and the extension's host kernels match the torch backend."""
    info = _run([python, "-m", "mfm_fast.info", "--require-cuda-ext"], where, env)
    assert install_line in info.stdout, info.stdout
    assert "cuda ext     built just in time" in info.stdout and f"cached in {jit_cache}" in info.stdout, info.stdout
    assert len(glob.glob(os.path.join(jit_cache, "*", "build.json"))) == 1  # one real compile, then the cache
    errors = json.loads(_run([python, "-c", KERNEL_CHECK], where, env).stdout.strip().splitlines()[-1])
    assert errors["corrupt"] <= 1e-5 and errors["loss"] <= 1e-5 and errors["grad"] <= 1e-5, errors
    return errors["package"]


def _check_deferred_record(record):
    assert record["status"] == "deferred", record
    assert "just in time on first use" in record["reason"] and "isolated" in record["reason"], record
    assert "install torch" not in record["reason"]


# ---------------------------------------------------------------- literal `pip install -e .` / `pip install .`
@pytest.mark.slow
def test_editable_install_with_pip_23_2_without_wheel(tmp_path, site_links, env, jit_cache):
    python = _venv(tmp_path / "venv", site_links, env)
    version = _run([python, "-m", "pip", "--version"], tmp_path, env).stdout
    assert version.startswith("pip 23.2"), version
    assert subprocess.run([python, "-c", "import wheel"], env=env, capture_output=True).returncode != 0
    repo = _copy_repo(tmp_path / "repo")
    _run([python, "-m", "pip", "install", "-e", "."], repo, env)
    _check_deferred_record(_record(os.path.join(repo, "mfm_fast")))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    package = _check_kernels_after_install(python, elsewhere, env, jit_cache, "install      editable (pip install -e)")
    assert package == os.path.join(repo, "mfm_fast", "__init__.py")


@pytest.mark.slow
def test_editable_install_with_the_newest_pip(tmp_path, site_links, env, jit_cache):
    python = _venv(tmp_path / "venv", site_links, env)
    _run([python, "-m", "pip", "install", pinned("pip")], tmp_path, env)
    version = _run([python, "-m", "pip", "--version"], tmp_path, env).stdout
    assert int(version.split()[1].split(".")[0]) >= 24, version  # a pip that always isolates editable builds
    repo = _copy_repo(tmp_path / "repo")
    _run([python, "-m", "pip", "install", "-e", "."], repo, env)
    _check_deferred_record(_record(os.path.join(repo, "mfm_fast")))
    _check_kernels_after_install(python, repo, env, jit_cache, "install      editable (pip install -e)")


@pytest.mark.slow
def test_non_editable_install_and_wheel_checked_from_another_directory(tmp_path, site_links, env, jit_cache):
    python = _venv(tmp_path / "venv", site_links, env)
    repo = _copy_repo(tmp_path / "repo")
    _run([python, "-m", "pip", "install", "."], repo, env)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    site = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], elsewhere, env).stdout.strip()
    assert os.path.isfile(os.path.join(site, "mfm_fast", "csrc", "masked_freq_loss.cu"))  # shipped for the JIT
    assert os.path.isfile(os.path.join(site, "mfm_fast", "kernels", "corrupt.py"))
    assert not os.path.exists(os.path.join(site, "kernels"))  # no bare top-level `kernels`
    _check_deferred_record(_record(os.path.join(site, "mfm_fast")))
    package = _check_kernels_after_install(python, elsewhere, env, jit_cache, "install      non-editable (pip install .)")
    assert package == os.path.join(site, "mfm_fast", "__init__.py")

    _run([python, "-m", "pip", "wheel", ".", "--no-deps", "-w", str(tmp_path / "dist")], repo, env)
    (wheel,) = glob.glob(str(tmp_path / "dist" / "mfm_fast-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert {"mfm_fast/csrc/ops.cpp", "mfm_fast/csrc/fft.cuh", "mfm_fast/_build_info.json", "mfm_fast/backends/_jit_build.py",
            "mfm_fast/kernels/__init__.py", "mfm_fast/py.typed", "mfm_fast/backends/__init__.py",
            "mfm_fast/train/__init__.py", "mfm_fast/train/pretrain.py"} <= set(names)
    assert not [n for n in names if n.startswith("kernels/")]
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    mathdx = [line for line in metadata.splitlines() if line.startswith("Requires-Dist: nvidia-mathdx")]
    assert mathdx and all('extra == "tools"' in line for line in mathdx), metadata  # the kernel tools' extra only
    _run([python, "-m", "pip", "install", "--force-reinstall", "--no-deps", wheel], elsewhere, env)
    _check_kernels_after_install(python, elsewhere, env, jit_cache, "install      non-editable, from the archive")


# ---------------------------------------------------------------- PyPI's `kernels` beside mfm_fast
def _both(python, where, env):
    return json.loads(_run([python, "-c", BOTH_KERNELS_CHECK], where, env).stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_pypi_kernels_installed_first(tmp_path, site_links, env):
    python = _venv(tmp_path / "venv", site_links, env)
    _run([python, "-m", "pip", "install", pinned("kernels")], tmp_path, env)
    repo = _copy_repo(tmp_path / "repo")
    site = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], repo, env).stdout.strip()
    pypi_kernels = os.path.join(site, "kernels", "__init__.py")
    env_try = dict(env, TRITON_INTERPRET="1")
    _run([python, "-m", "pip", "install", "-e", "."], repo, env)
    # with torch visible this would build the extension ahead of time: skip that compile, the metadata step is
    # is what PyPI's kernels could break (its egg_info entry point resolving into our kernels/ folder)
    _run([python, "-m", "pip", "install", "-e", ".", "--no-build-isolation"], repo,
         dict(env, MFM_FAST_SKIP_CUDA_BUILD="1"))
    both = _both(python, tmp_path, env_try)
    assert both["kernels"] == pypi_kernels and both["mfm_fast.kernels"] == os.path.join(repo, "kernels", "__init__.py")
    assert both["triton_err"] <= 1e-5
    _run([python, "-m", "pip", "uninstall", "-y", "mfm_fast"], tmp_path, env)
    check = "import kernels, importlib.metadata as md; [e.load() for e in md.distribution('kernels').entry_points]"
    _run([python, "-c", check + "; print(kernels.__file__)"], tmp_path, env)
    assert os.path.isfile(pypi_kernels)
    _run([python, "-m", "pip", "install", "."], repo, env)
    _run([python, "-m", "pip", "uninstall", "-y", "kernels"], tmp_path, env)
    both = _both(python, tmp_path, env_try)
    assert both["kernels"] is None and both["mfm_fast.kernels"] == os.path.join(site, "mfm_fast", "kernels",
                                                                                 "__init__.py")
    assert both["triton_err"] <= 1e-5


@pytest.mark.slow
def test_pypi_kernels_installed_after(tmp_path, site_links, env):
    python = _venv(tmp_path / "venv", site_links, env)
    repo = _copy_repo(tmp_path / "repo")
    site = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], repo, env).stdout.strip()
    env_try = dict(env, TRITON_INTERPRET="1")
    _run([python, "-m", "pip", "install", "."], repo, env)
    assert not os.path.exists(os.path.join(site, "kernels"))
    _run([python, "-m", "pip", "install", pinned("kernels")], tmp_path, env)
    both = _both(python, tmp_path, env_try)
    assert both["kernels"] == os.path.join(site, "kernels", "__init__.py")
    assert both["mfm_fast.kernels"] == os.path.join(site, "mfm_fast", "kernels", "__init__.py")
    assert both["triton_err"] <= 1e-5
    _run([python, "-m", "pip", "uninstall", "-y", "kernels"], tmp_path, env)
    assert _both(python, tmp_path, env_try)["kernels"] is None and not os.path.exists(os.path.join(site, "kernels"))
    _run([python, "-m", "pip", "install", pinned("kernels")], tmp_path, env)
    _run([python, "-m", "pip", "uninstall", "-y", "mfm_fast"], tmp_path, env)
    check = "import kernels, importlib.metadata as md; [e.load() for e in md.distribution('kernels').entry_points]"
    _run([python, "-c", check], tmp_path, env)
    assert not os.path.exists(os.path.join(site, "mfm_fast"))


# ---------------------------------------------------------------- the just-in-time build's cache and lock
FAKE_COMPILE = textwrap.dedent("""
    import os, sys, time
    from mfm_fast.backends import _jit_build as jb
    calls = sys.argv[1]

    def fake_compile(src, work, cuda_home, archs, log_path):
        with open(calls, "a") as f:
            f.write(f"{os.getpid()}\\n")
        time.sleep(3)  # long enough for the other process to arrive and wait on the lock
        open(os.path.join(work, jb.LIB_NAME + ".so"), "w").close()
        open(log_path, "w").close()
        return True

    jb._compile = fake_compile
    jb.unavailable_reason = lambda: None
    print(jb.build()["library"])
""")


def test_concurrent_first_uses_compile_once(tmp_path):
    """Two processes (DDP ranks) asking for the build at once: one compiles, the other waits and takes it."""
    calls = tmp_path / "calls"
    env = dict(os.environ, MFM_FAST_CACHE=str(tmp_path / "cache"))
    procs = [subprocess.Popen([sys.executable, "-c", FAKE_COMPILE, str(calls)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert len(calls.read_text().split()) == 1  # compiled once
    libraries = {out.strip().splitlines()[-1] for out, _ in outs}
    assert len(libraries) == 1 and os.path.isfile(libraries.pop())
    assert "waiting for another process that is compiling the CUDA extension" in "".join(err for _, err in outs)
    assert sorted(os.listdir(tmp_path / "cache")) == [n for n in sorted(os.listdir(tmp_path / "cache"))
                                                      if ".partial-" not in n]  # no half-built folder left


def test_failed_build_is_reported_and_not_cached(tmp_path, monkeypatch):
    from mfm_fast.backends import _jit_build as jb

    monkeypatch.setenv("MFM_FAST_CACHE", str(tmp_path))
    monkeypatch.setattr(jb, "unavailable_reason", lambda: None)

    def failing(src, work, cuda_home, archs, log_path):
        with open(log_path, "w") as f:
            f.write("ops.cpp:1: error: the compiler said no\n")
        return False

    monkeypatch.setattr(jb, "_compile", failing)
    with pytest.raises(RuntimeError, match=r"^the just-in-time build of the CUDA extension failed .*the compiler said no"):
        jb.build()
    assert jb.cached() is None  # the next process tries again


def test_cache_key_follows_the_sources(tmp_path, monkeypatch):
    from mfm_fast.backends import _jit_build as jb

    src = shutil.copytree(os.path.join(ROOT, "csrc"), tmp_path / "csrc")
    before = jb.sources_hash(str(src))
    assert before == jb.sources_hash(os.path.join(ROOT, "csrc"))
    with open(src / "README.md", "a") as f:
        f.write("docs only\n")
    assert jb.sources_hash(str(src)) == before  # not a source
    with open(src / "planes.cuh", "a") as f:
        f.write("// a change\n")
    assert jb.sources_hash(str(src)) != before
    monkeypatch.setenv("MFM_FAST_CACHE", str(tmp_path / "c"))
    assert jb.cache_root() == str(tmp_path / "c")


def test_skip_flag_means_nothing_is_compiled(monkeypatch):
    from mfm_fast.backends import _jit_build as jb

    monkeypatch.setenv("MFM_FAST_SKIP_CUDA_BUILD", "1")
    assert "MFM_FAST_SKIP_CUDA_BUILD=1" in jb.unavailable_reason()
    with pytest.raises(RuntimeError, match="MFM_FAST_SKIP_CUDA_BUILD=1"):
        jb.load()


# ---------------------------------------------------------------- python -m mfm_fast.info
def test_info_bad_flag_is_an_argparse_error():
    proc = subprocess.run([sys.executable, "-m", "mfm_fast.info", "--no-such-flag"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "python -m mfm_fast.info: error: unrecognized arguments: --no-such-flag" in proc.stderr


def test_info_says_an_older_library_was_not_rebuilt_by_the_last_install(monkeypatch):
    """An editable checkout holding an earlier ahead-of-time _C after an isolated reinstall: info says both."""
    from mfm_fast.backends import cuda as cuda_backend

    library = cuda_backend._ahead_of_time_library()
    if library is None:
        pytest.skip("no ahead-of-time mfm_fast._C in this checkout")
    built = {"status": "built", "time_utc": "2026-01-01T00:00:00Z", "arch_list": "9.0", "torch_version": "2.14.1",
             "sources_sha256": None}
    record = {"status": "deferred", "reason": "pip builds in an isolated environment without torch",
              "previous_build": built}
    monkeypatch.setattr(cuda_backend, "build_info", lambda: record)
    monkeypatch.setattr(cuda_backend, "_register", lambda: None)  # the ops are registered once per process
    monkeypatch.setattr(cuda_backend, "_state", {})
    line = cuda_backend.how_built()
    assert line.startswith("built ahead of time by setup.py (2026-01-01T00:00:00Z): arch_list 9.0"), line
    assert "the last install did not rebuild it (the install recorded deferred: pip builds in an isolated" in line
    assert "failed" not in line


def test_an_ahead_of_time_library_from_other_sources_gives_way_to_the_just_in_time_build(monkeypatch):
    from mfm_fast.backends import _jit_build, cuda as cuda_backend

    if cuda_backend._ahead_of_time_library() is None:
        pytest.skip("no ahead-of-time mfm_fast._C in this checkout")
    stale = {"status": "built", "time_utc": "2026-01-01T00:00:00Z", "arch_list": "9.0", "sources_sha256": "0" * 64}
    jit = {"time_utc": "2026-01-02T00:00:00Z", "arch_list": "9.0", "build_seconds": 40.0,
           "library": "/cache/key/mfm_fast_C.so"}
    monkeypatch.setattr(cuda_backend, "build_info", lambda: stale)
    monkeypatch.setattr(cuda_backend, "_register", lambda: None)
    monkeypatch.setattr(cuda_backend, "_state", {})
    monkeypatch.setattr(_jit_build, "unavailable_reason", lambda: None)
    monkeypatch.setattr(_jit_build, "load", lambda build_if_needed=True: jit)
    assert cuda_backend.how_built(build=True) == ("built just in time (2026-01-02T00:00:00Z): arch_list 9.0, "
                                                  "build_seconds 40.0, cached in /cache/key")
    # without a way to build it, the older library still loads, and info says what it is
    monkeypatch.setattr(cuda_backend, "_state", {})
    monkeypatch.setattr(_jit_build, "unavailable_reason", lambda: "nvcc not found")
    line = cuda_backend.how_built()
    assert line.startswith("built ahead of time by setup.py (2026-01-01T00:00:00Z)")
    assert line.endswith("WARNING: from other csrc sources than the installed ones (nvcc not found)")


def test_ninja_is_found_off_path(monkeypatch):
    from mfm_fast.backends import _jit_build

    monkeypatch.setenv("PATH", "/nonexistent")
    found = _jit_build.find_ninja()
    assert found is not None and os.path.basename(found) == "ninja" and os.access(found, os.X_OK)
