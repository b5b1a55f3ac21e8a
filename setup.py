"""Build script for mfm_fast.

There is deliberately no pyproject.toml: with pip 23.2 any pyproject.toml switches `pip install -e .`
to an isolated build environment without torch, which the CUDA extension needs at build time. Test
settings live in pytest.ini.

`pip install -e .` also builds the CUDA extension `mfm_fast._C` (csrc/) when nvcc is found; no GPU is
needed to build it. Environment:
  MFM_FAST_SKIP_CUDA_BUILD=1   pure-Python install (backend="cuda" then reports "not built").
  MFM_FAST_FORCE_CUDA=1        fail the install if the extension cannot be built (default: install
                               pure Python and record why in mfm_fast/_build_info.json).
  TORCH_CUDA_ARCH_LIST         GPU architectures; default "9.0" (H100/H200) when no GPU is visible,
                               else the visible GPU's. More: TORCH_CUDA_ARCH_LIST="8.0;9.0;10.0" (A100,
                               H100, B200; each arch adds about 10 s of compile time on 2 cores;
                               the 224 x 224 kernels need ~225 KB of shared memory: not on A100).
  CUDA_HOME                    the toolkit; default /usr/local/cuda when it has bin/nvcc.
  MAX_JOBS                     parallel compile jobs (default 2).
`python -m mfm_fast.info` reports what was built and why not.
"""

import glob
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
# setuptools loads other packages' entry points (e.g. PyPI kernels' `kernels.locking`) while it runs; with this
# folder first on sys.path they would resolve into our top-level kernels/ folder. Nothing here imports from it.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]

from setuptools import find_packages, setup  # noqa: E402
INFO_PATH = os.path.join(HERE, "mfm_fast", "_build_info.json")
SOURCES = ["csrc/ops.cpp", "csrc/corrupt.cu", "csrc/masked_freq_loss.cu"]


def _flag(name):
    return os.environ.get(name, "").strip() not in ("", "0", "false", "False")


def _write_info(status, reason=None, **extra):
    info = {"status": status, "reason": reason, "sources": SOURCES, "mathdx": None,
            "python": sys.version.split()[0], "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    info.update(extra)
    with open(INFO_PATH, "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2)
        f.write("\n")
    if status != "built":
        print(f"mfm_fast: CUDA extension {status}: {reason}", file=sys.stderr)


def _find_cuda_home():
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


def _nvcc_version(cuda_home):
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True,
                             timeout=60).stdout
        return out.strip().splitlines()[-1] if out.strip() else "unknown"
    except Exception as exc:  # report, do not fail the build over a version string
        return f"unknown ({exc})"


def _extension_setup():
    """{ext_modules, cmdclass} for setup(), or {} for a pure-Python install (the reason is recorded)."""
    if _flag("MFM_FAST_SKIP_CUDA_BUILD"):
        _write_info("skipped", "MFM_FAST_SKIP_CUDA_BUILD=1 was set at install time")
        return {}
    force = _flag("MFM_FAST_FORCE_CUDA")
    try:
        import torch
    except ImportError:
        msg = ("torch is not importable in the build environment, so the CUDA extension cannot be built: install "
               "torch first (pip install -r requirements.txt), then run `pip install --no-build-isolation -e .`")
        if force:
            sys.exit(f"mfm_fast: MFM_FAST_FORCE_CUDA=1: {msg}")
        _write_info("failed", msg)
        return {}
    cuda_home = _find_cuda_home()
    if cuda_home is None or torch.version.cuda is None:
        msg = ("nvcc not found (set CUDA_HOME)" if cuda_home is None
               else f"torch {torch.__version__} is a CPU-only build")
        if force:
            sys.exit(f"mfm_fast: MFM_FAST_FORCE_CUDA=1 but the CUDA extension cannot be built: {msg}")
        _write_info("failed", msg, torch_version=torch.__version__)
        return {}
    # Both must be set before torch.utils.cpp_extension is imported (it reads them at import time).
    os.environ["CUDA_HOME"] = cuda_home
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
    os.environ.setdefault("MAX_JOBS", "2")
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    meta = {"torch_version": torch.__version__, "torch_cuda": torch.version.cuda, "cuda_home": cuda_home,
            "nvcc": _nvcc_version(cuda_home), "arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST") or "visible GPU",
            "max_jobs": os.environ["MAX_JOBS"]}

    class Build(BuildExtension):
        def run(self):
            start = time.time()
            try:
                super().run()
            except BaseException as exc:  # noqa: BLE001 (a compiler failure can surface as SystemExit)
                if force or isinstance(exc, KeyboardInterrupt):
                    raise
                _write_info("failed", f"compilation failed: {type(exc).__name__}: {exc}"[:2000], **meta,
                            build_seconds=round(time.time() - start, 1))
                return
            _write_info("built", None, **meta, build_seconds=round(time.time() - start, 1))

    ext = CUDAExtension(
        "mfm_fast._C", SOURCES,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
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
    version="0.1.0",
    description="Fast, exact Masked Frequency Modeling (MFM) losses and frequency corruption for PyTorch",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The Triton kernels live in the top-level folder kernels/ but install as mfm_fast.kernels: a bare
    # top-level `kernels` would collide with PyPI's `kernels` (Hugging Face's kernel hub loader).
    packages=find_packages(include=["mfm_fast", "mfm_fast.*"]) + ["mfm_fast.kernels"],
    package_dir={"mfm_fast.kernels": "kernels"},
    install_requires=["torch>=2.11", "numpy"],
    extras_require={
        "train": ["timm", "torchvision", "tqdm", "matplotlib", "scikit-image>=0.25"],
        "test": ["pytest", "pytest-benchmark"],
    },
    license="MIT",
    **_ext,
)
