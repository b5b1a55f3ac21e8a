"""The backends: each runs the library's ops on its own kind of code.

- ``reference/``: the fp64 full-grid oracle, a readable transcription of the maths (never picked by ``auto``);
- ``torch_backend/``: plain torch on the rfft2 half spectrum (CPU and CUDA);
- ``mfm_fast.kernels`` (the checkout's kernels/ folder): fused Triton kernels;
- ``cuda.py`` (+ ``_jit_build.py``): the CUDA extension ``mfm_fast._C`` built from csrc/.
"""
