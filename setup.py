"""Build script for mfm_fast.

There is deliberately no pyproject.toml: with pip 23.2 any pyproject.toml switches `pip install -e .`
to an isolated build environment without torch, which the CUDA extension (csrc/, a later
version) needs at build time. Tool settings live in setup.cfg and pytest.ini.
"""

from setuptools import find_packages, setup

setup(
    name="mfm_fast",
    version="0.1.0",
    description="Fast, exact Masked Frequency Modeling (MFM) losses and frequency corruption for PyTorch",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["mfm_fast", "mfm_fast.*", "kernels", "kernels.*"]),
    install_requires=["torch>=2.11", "numpy"],
    extras_require={
        "train": ["timm", "torchvision", "tqdm", "matplotlib", "scikit-image>=0.25"],
        "test": ["pytest", "pytest-benchmark"],
    },
    license="MIT",
)
