"""Build script for mfm_fast.

There is deliberately no pyproject.toml: with pip 23.2 (with `wheel`) and no pyproject.toml, `pip install -e .`
runs in this environment, where torch is, and builds the CUDA extension ahead of time. Test settings live in
pytest.ini.

The CUDA extension `mfm_fast._C` (csrc/) is built ahead of time when this script runs with torch importable and
nvcc found (no GPU needed): `pip install -e . --no-build-isolation`, `pip install . --no-build-isolation`, or a
plain `pip install -e .` with pip 23.2 and `wheel` installed. An isolated build (pip 26.x always, pip 23.2 without
`wheel`) has no torch: the extension is then built just in time on first use from the csrc sources that ship
with the package (mfm_fast/backends/_jit_build.py; cached in ~/.cache/mfm_fast or $MFM_FAST_CACHE). Environment:
  MFM_FAST_SKIP_CUDA_BUILD=1   pure Python: nothing is compiled, at install or at first use.
  MFM_FAST_DEFER_CUDA_BUILD=1  compile nothing now: leave the extension to the just-in-time build on first use
                               (`make` sets it where no GPU is visible, so a CPU-only machine compiles nothing
                               it does not use).
  MFM_FAST_FORCE_CUDA=1        fail the install unless the extension is built ahead of time.
  TORCH_CUDA_ARCH_LIST         GPU architectures; default "9.0" (H100/H200) when no GPU is visible,
                               else the visible GPU's. More: TORCH_CUDA_ARCH_LIST="8.0;9.0;10.0" (A100,
                               H100, B200; each arch adds about 10 s of compile time on 2 cores;
                               the 224 x 224 kernels need ~225 KB of shared memory: not on A100).
  CUDA_HOME                    the toolkit; default /usr/local/cuda when it has bin/nvcc.
  MAX_JOBS                     parallel compile jobs (default 2).
`python -m mfm_fast.info` reports how the loaded extension was built, or why none is loaded.
"""

import glob
import importlib.util
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
# setuptools loads other packages' entry points (e.g. PyPI kernels' egg_info hook) while it runs; with this
# folder first on sys.path they would resolve into our top-level kernels/ folder. Nothing here imports from it.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]

from setuptools import find_packages, setup  # noqa: E402


def _load_jit_build():
    """mfm_fast/backends/_jit_build.py by path (stdlib only at import; mfm_fast itself needs torch): one definition of
    the toolkit search and of the csrc hash for setup.py and for the just-in-time build."""
    spec = importlib.util.spec_from_file_location("_mfm_fast_jit_build", os.path.join(HERE, "mfm_fast", "backends", "_jit_build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _version():
    """__version__ from mfm_fast/_version.py, the one place the version is written."""
    scope = {}
    with open(os.path.join(HERE, "mfm_fast", "_version.py"), encoding="utf-8") as f:
        exec(f.read(), scope)
    return scope["__version__"]


_jit = _load_jit_build()
INFO_PATH = os.path.join(HERE, "mfm_fast", "_build_info.json")
SOURCES = [f"csrc/{name}" for name in _jit.SOURCES]
JIT_NOTE = ("it will be built just in time on first use of backend='cuda' (about 1-3 minutes once, then cached; "
            "`python -m mfm_fast.info --require-cuda-ext` builds it now)")


def _previous_build():
    """The record of the ahead-of-time library an editable checkout still holds (mfm_fast/_C*.so), if any."""
    if not glob.glob(os.path.join(HERE, "mfm_fast", "_C*.so")):
        return None
    try:
        with open(INFO_PATH, encoding="utf-8") as f:
            old = json.load(f)
    except (OSError, ValueError):
        return None
    return old if old.get("status") == "built" else old.get("previous_build")


def _record(status, reason=None, **extra):
    info = {"status": status, "reason": reason, "sources": SOURCES, "sources_sha256": _jit.sources_hash(
        os.path.join(HERE, "csrc")), "python": sys.version.split()[0],
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    info.update(extra)
    if status != "built":
        info["previous_build"] = _previous_build()
    return info


def _write_info(info, build_lib=None):
    """Write the record into the checkout and, for wheels / non-editable installs, into the build folder."""
    for root in [HERE] + ([build_lib] if build_lib and os.path.isdir(os.path.join(build_lib, "mfm_fast")) else []):
        with open(os.path.join(root, "mfm_fast", "_build_info.json"), "w", encoding="utf-8") as f:
            json.dump(info, f, indent=2)
            f.write("\n")
    if info["status"] != "built":
        print(f"mfm_fast: CUDA extension not built ahead of time ({info['status']}): {info['reason']}", file=sys.stderr)


def _defer(reason, force, force_hint):
    """No ahead-of-time build; the just-in-time build on first use takes over (MFM_FAST_FORCE_CUDA=1: fail)."""
    if force:
        sys.exit(f"mfm_fast: MFM_FAST_FORCE_CUDA=1 but the CUDA extension cannot be built now: {reason}; {force_hint}")
    _write_info(_record("deferred", f"{reason}; {JIT_NOTE}"))
    return {}


def _extension_setup():
    """{ext_modules, cmdclass} for setup(), or {} for a pure-Python install (the reason is recorded)."""
    if _jit.flag("MFM_FAST_SKIP_CUDA_BUILD"):
        _write_info(_record("skipped", "MFM_FAST_SKIP_CUDA_BUILD=1 was set at install time: pure Python, "
                                       "nothing is compiled (neither now nor just in time)"))
        return {}
    force = _jit.flag("MFM_FAST_FORCE_CUDA")
    if _jit.flag("MFM_FAST_DEFER_CUDA_BUILD"):
        return _defer("MFM_FAST_DEFER_CUDA_BUILD=1 was set at install time", force,
                      "unset MFM_FAST_DEFER_CUDA_BUILD")
    try:
        import torch
    except ImportError:
        return _defer("pip builds in an isolated environment without torch (the default of pip >= 23.1 without "
                      "`wheel`, and of every pip 26)", force,
                      "to build it ahead of time: pip install -e . --no-build-isolation")
    cuda_home = _jit.find_cuda_home()
    if cuda_home is None:
        return _defer("nvcc not found (install the CUDA toolkit or set CUDA_HOME)", force, "set CUDA_HOME")
    if torch.version.cuda is None:
        return _defer(f"torch {torch.__version__} is a CPU-only build", force, "install a CUDA build of torch")
    # Both must be set before torch.utils.cpp_extension is imported (it reads them at import time).
    os.environ["CUDA_HOME"] = cuda_home
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = _jit.DEFAULT_ARCH_LIST
    os.environ.setdefault("MAX_JOBS", "2")
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    meta = {"how": "ahead of time", "torch_version": torch.__version__, "torch_cuda": torch.version.cuda,
            "cuda_home": cuda_home, "nvcc": _jit.nvcc_version(cuda_home),
            "arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST") or "visible GPU", "max_jobs": os.environ["MAX_JOBS"]}

    class Build(BuildExtension):
        def run(self):
            start = time.time()
            try:
                super().run()
            except BaseException as exc:  # noqa: BLE001 (a compiler failure can surface as SystemExit)
                if force or isinstance(exc, KeyboardInterrupt):
                    raise
                _write_info(_record("failed", f"compilation failed: {type(exc).__name__}: {exc}"[:2000]
                                    + "; the just-in-time build on first use tries again", **meta,
                                    build_seconds=round(time.time() - start, 1)), self.build_lib)
                return
            _write_info(_record("built", None, **meta, build_seconds=round(time.time() - start, 1)), self.build_lib)

    ext = CUDAExtension(
        "mfm_fast._C", SOURCES,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": list(_jit.CXX_FLAGS), "nvcc": list(_jit.NVCC_FLAGS)},
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": Build}}


def _develop_cmdclass():
    """setuptools >= 80 turns `setup.py develop` (what pip 23.2 runs for `pip install -e .` here) into an
    isolated `pip install -e . --use-pep517` without torch; keep the build in this environment instead."""
    import setuptools
    from setuptools.command.develop import develop

    if int(setuptools.__version__.split(".")[0]) < 80:
        return {}

    class Develop(develop):
        def run(self):
            cmd = [sys.executable, "-m", "pip", "install", "-e", HERE, "--use-pep517", "--no-build-isolation"]
            cmd += ["--no-deps"] * bool(self.no_deps) + ["--user"] * bool(self.user)
            cmd += ["--prefix", self.prefix] * bool(self.prefix) + ["--target", self.install_dir] * bool(self.install_dir)
            subprocess.check_call(cmd)

    return {"develop": Develop}


_ext = _extension_setup()
_ext["cmdclass"] = {**_develop_cmdclass(), **_ext.get("cmdclass", {})}

setup(
    name="mfm_fast",
    version=_version(),
    description="Fast, exact Masked Frequency Modeling (MFM) losses and frequency corruption for PyTorch",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The Triton kernels live in the top-level folder kernels/ but install as mfm_fast.kernels: a bare
    # top-level `kernels` would collide with PyPI's `kernels` (Hugging Face's kernel hub loader).
    # The csrc sources ship too (mfm_fast/csrc in wheels and non-editable installs) for the just-in-time build.
    packages=find_packages(include=["mfm_fast", "mfm_fast.*"]) + ["mfm_fast.kernels", "mfm_fast.csrc"],
    package_dir={"mfm_fast.kernels": "kernels", "mfm_fast.csrc": "csrc"},
    package_data={"mfm_fast": ["_build_info.json", "py.typed"], "mfm_fast.csrc": ["*.cpp", "*.cu", "*.cuh", "*.h", "README.md"]},
    install_requires=["torch>=2.11", "numpy", "ninja"],
    extras_require={
        "train": ["timm", "torchvision", "tqdm", "matplotlib", "scikit-image>=0.25"],
        "test": ["pytest", "pytest-benchmark"],
        # the kernel tools' own requirements (tools/requirements.txt): cuFFTDx headers for tools/cufftdx_plane.py
        "tools": ["nvidia-mathdx>=25.6"],
    },
    license="MIT",
    **_ext,
)
