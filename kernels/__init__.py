"""Triton kernels for mfm_fast (the ``triton`` backend), one op per file.

- corrupt.py: frequency corruption; one launch for MFM disc masks (the ``mask_band`` promise),
  two for any other mask. ``torch.ops.mfm_fast.corrupt_triton``.
- masked_freq_loss.py: the masked spectral loss with its gradient computed in the forward
  launches. ``torch.ops.mfm_fast.masked_freq_loss_triton``.
- _dft.py: the cached DFT tables both use (DFT-as-GEMM on ``tl.dot``).

Installed as the subpackage ``mfm_fast.kernels`` (never a bare top-level ``kernels``, which is PyPI's kernel hub
loader). Selected through mfm_fast.dispatch; on CPU tensors they run only under TRITON_INTERPRET=1.
"""
