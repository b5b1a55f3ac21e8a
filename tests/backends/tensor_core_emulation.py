"""Emulate the rounding of Hopper tensor cores in tf32 mode inside the Triton interpreter.

The interpreter computes ``tl.dot(..., input_precision="tf32")`` as an fp32 numpy matmul, so the
errors of the GPU's tf32 MMA cannot be seen on a CPU. This model reproduces the two effects that
matter for accuracy (Fasi, Higham, Mikaitis, Pranesh, "Numerical behavior of NVIDIA tensor cores",
PeerJ CS 2021, and the Hopper measurements that followed it):

- operands: an fp32 value fed to a tf32 MMA keeps its top 19 bits (the low 13 mantissa bits are
  ignored, i.e. truncated toward zero);
- accumulation: the products (exact) of each k-step of ``K_STEP`` = 8 and the fp32 accumulator are
  summed and the result is rounded toward zero to fp32; k-steps run in order.

Usage: ``with emulate_tf32_tensor_cores(): kernel[grid](...)`` under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import contextlib

import numpy as np

K_STEP = 8


def truncate_to_tf32(a: np.ndarray) -> np.ndarray:
    """fp32 array with the low 13 mantissa bits cleared (what a tf32 MMA reads)."""
    return (np.ascontiguousarray(a, dtype=np.float32).view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32)


def round_toward_zero_f32(s: np.ndarray) -> np.ndarray:
    """float64 -> float32 rounded toward zero."""
    f = s.astype(np.float32)
    over = np.abs(f.astype(np.float64)) > np.abs(s)
    return np.where(over, np.nextafter(f, np.float32(0)), f).astype(np.float32)


def tf32_mma(a: np.ndarray, b: np.ndarray, acc: np.ndarray) -> np.ndarray:
    """acc + a @ b as the model of a tf32 tensor core computes it: (M, K) @ (K, N) + (M, N), fp32."""
    a64 = truncate_to_tf32(a).astype(np.float64)
    b64 = truncate_to_tf32(b).astype(np.float64)
    out = np.asarray(acc, dtype=np.float32)
    for k0 in range(0, a.shape[-1], K_STEP):
        out = round_toward_zero_f32(out.astype(np.float64) + a64[..., k0:k0 + K_STEP] @ b64[..., k0:k0 + K_STEP, :])
    return out


def round_to_tf32(a: np.ndarray) -> np.ndarray:
    """fp32 rounded to the nearest tf32, ties away from zero (PTX cvt.rna.tf32.f32)."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    return ((bits + np.uint32(0x1000)) & np.uint32(0xFFFFE000)).view(np.float32)


def tf32x3_mma(a: np.ndarray, b: np.ndarray, acc: np.ndarray) -> np.ndarray:
    """Triton's lowering of ``input_precision="tf32x3"`` (F32DotTC): big = cvt.rna(a), small = a - big,
    then small_a big_b, big_a small_b and big_a big_b chained on the tensor core, starting from acc."""
    a_big, b_big = round_to_tf32(a), round_to_tf32(b)
    a_small = (np.asarray(a, np.float32) - a_big).astype(np.float32)
    b_small = (np.asarray(b, np.float32) - b_big).astype(np.float32)
    out = tf32_mma(a_small, b_big, acc)
    out = tf32_mma(a_big, b_small, out)
    return tf32_mma(a_big, b_big, out)


@contextlib.contextmanager
def emulate_tf32_tensor_cores():
    """Patch the Triton interpreter so fp32 ``tl.dot`` with input_precision "tf32" uses :func:`tf32_mma`
    and "tf32x3" uses :func:`tf32x3_mma` (the kernels' calls of the latter start from a zero accumulator,
    where Triton versions agree on the lowering)."""
    from triton._C.libtriton import ir
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    original = builder.create_dot

    def create_dot(a, b, d, input_precision, max_num_imprecise_acc):
        fp32 = a.data.dtype == b.data.dtype == d.data.dtype == np.float32
        if fp32 and input_precision == ir.INPUT_PRECISION.TF32:
            return interpreter.TensorHandle(tf32_mma(a.data, b.data, d.data), d.dtype.scalar)
        if fp32 and input_precision == ir.INPUT_PRECISION.TF32x3:
            return interpreter.TensorHandle(tf32x3_mma(a.data, b.data, d.data), d.dtype.scalar)
        return original(a, b, d, input_precision, max_num_imprecise_acc)

    builder.create_dot = create_dot
    try:
        yield
    finally:
        builder.create_dot = original
