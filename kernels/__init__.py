"""Triton kernels for mfm_fast (the ``triton`` backend).

Not implemented in this version: ``backend="triton"`` raises NotImplementedError and
``backend="auto"`` uses the torch backend. See mfm_fast.dispatch.
"""
