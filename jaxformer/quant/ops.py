"""Quantized weights and the matmuls that use them, in plain jnp.

A kernel is laid out [*lead, *contraction, *out]: `lead` stacked dimensions (the `layers`
axis, or none inside the layer scan), then the `contract` dimensions its einsum contracts
(the input features: D for QKV and the first MLP matrix, N H for the attention output, F for
the second MLP matrix), then its output dimensions. Scales (float32):

    int8, fp8     [*lead, *out]                 one per output channel
    fp8-tensor    [*lead]                       one per matrix
    int4          kernel shape with the last contraction dim divided by its group size:
                  [*lead, ..., n / g, *out]; that axis keeps the contraction dim's logical
                  name, so a group axis of a row-parallel matrix is sharded like its rows

The matmuls (GPU paths; CPU runs the same programs, upcast by XLA):

    int8 / fp8 weight-only   einsum(x, q.astype(x.dtype)) * scale: XLA's GPU compiler fuses the
                             convert into its Triton GEMM fusion, so weights travel from memory
                             in 8 bits and are widened in registers (the decode win)
    int4                     dequantize the groups (convert, multiply by the group scale)
                             and einsum; the same fusion reads the weights in 4 bits
    fp8 (with activations)   x is scaled by its static act_scale and cast to float8_e4m3fn;
                             dot_general(fp8, fp8, preferred_element_type=float32), which
                             XLA's GEMM rewriter sends to cuBLASLt's FP8 tensor-core GEMM on
                             Hopper (the prefill win), then * act_scale * kernel scale

Plain jnp rather than google's qwix / aqt: the three paths are a few lines each over public
jax APIs, run unchanged on jax 0.10 and 0.11, and keep the numerics testable against numpy;
a library would add a dependency (and a wheel for the GPU machines) for the same XLA code.
"""
from __future__ import annotations

import contextlib
import threading

import jax.numpy as jnp

from jaxformer.quant.spec import QuantSpec

FP8_MAX = 448.0  # largest finite float8_e4m3fn


def _nonzero(amax):
    """An all-zero channel or group gets scale 1 / qmax (its codes are 0 either way)."""
    return jnp.where(amax > 0, amax, 1.0)


def _inv(spec: QuantSpec):
    """1 / qmax as a float32 constant: compilers turn division by a constant into this
    multiplication anyway, so writing it keeps CPU, GPU and numpy bit-identical."""
    return jnp.float32(1.0 / spec.qmax)


def quantize_kernel(w, spec: QuantSpec, lead: int, contract: int):
    """w [*lead, *contraction, *out] -> (q, scale float32); layouts in the module docstring.

    Symmetric, round to nearest even: int8 codes -127..127, int4 -7..7, fp8 e4m3 saturated
    at +-448. scale = max|w| * float32(1 / qmax) over each channel (group, matrix).
    """
    w = jnp.asarray(w).astype(jnp.float32)
    if spec.mode == "int4":
        gd = lead + contract - 1  # groups along the last contraction dim
        n = w.shape[gd]
        g = spec.group(n)
        if n % g:
            raise ValueError(f"int4: group size {g} does not divide the contraction dimension "
                             f"{n} of a kernel of shape {w.shape}; choose int4-g<N> with N "
                             f"dividing {n}")
        wg = w.reshape(w.shape[:gd] + (n // g, g) + w.shape[gd + 1:])
        scale = _nonzero(jnp.max(jnp.abs(wg), axis=gd + 1)) * _inv(spec)
        q = jnp.clip(jnp.round(wg / jnp.expand_dims(scale, gd + 1)), -spec.qmax, spec.qmax)
        return q.astype(spec.weight_dtype).reshape(w.shape), scale
    axes = tuple(range(lead, w.ndim)) if spec.per_tensor else tuple(range(lead, lead + contract))
    scale = _nonzero(jnp.max(jnp.abs(w), axis=axes)) * _inv(spec)
    ws = w / jnp.expand_dims(scale, axes)
    if spec.mode == "int8":
        q = jnp.clip(jnp.round(ws), -spec.qmax, spec.qmax)
    else:
        q = jnp.clip(ws, -FP8_MAX, FP8_MAX)
    return q.astype(spec.weight_dtype), scale


def dequantize(q, scale, spec: QuantSpec, lead: int, contract: int, dtype=jnp.float32):
    """(q, scale) -> w [*lead, *contraction, *out] in `dtype` (computed in float32)."""
    if spec.mode == "int4":
        gd = lead + contract - 1
        n = q.shape[gd]
        g = spec.group(n)
        qg = q.reshape(q.shape[:gd] + (n // g, g) + q.shape[gd + 1:]).astype(jnp.float32)
        return (qg * jnp.expand_dims(scale, gd + 1)).reshape(q.shape).astype(dtype)
    axes = tuple(range(lead, q.ndim)) if spec.per_tensor else tuple(range(lead, lead + contract))
    return (q.astype(jnp.float32) * jnp.expand_dims(scale, axes)).astype(dtype)


def scale_axes(kernel_axes, spec: QuantSpec, lead: int, contract: int) -> tuple:
    """Logical axes of the scale of a kernel with logical axes `kernel_axes`."""
    kernel_axes = tuple(kernel_axes)
    if spec.mode == "int4":
        return kernel_axes
    if spec.per_tensor:
        return kernel_axes[:lead]
    return kernel_axes[:lead] + kernel_axes[lead + contract:]


def quantize_activation(x, act_scale):
    """x [..] (any float dtype), act_scale [] float32 -> float8_e4m3fn, saturated at +-448."""
    return jnp.clip(x.astype(jnp.float32) / act_scale, -FP8_MAX, FP8_MAX).astype(
        jnp.float8_e4m3fn)


def check_equation(eq: str, contract: int) -> None:
    """The einsum must contract exactly the kernel's first `contract` dims and keep the rest
    in order at the end of its output, so scales [*out] broadcast against it."""
    try:
        inputs, out = eq.replace(" ", "").split("->")
        _, rhs = inputs.split(",")
    except ValueError:
        raise ValueError(f"quantized einsum: {eq!r} is not of the form 'x,kernel->out'") from None
    contracted = "".join(c for c in rhs if c not in out)
    if contracted != rhs[:contract] or not out.endswith(rhs[contract:]):
        raise ValueError(f"quantized einsum {eq!r}: the kernel {rhs!r} was quantized with its "
                         f"first {contract} dim(s) {rhs[:contract]!r} as the contraction and "
                         f"{rhs[contract:]!r} as trailing outputs")


def einsum(eq: str, x, q, scale, spec: QuantSpec, contract: int, act_scale=None):
    """einsum(eq, x, dequantized kernel) through the low-precision path of `spec`.

    x [*batch, *contraction] in the run dtype; q, scale as quantize_kernel made them (no lead
    dims); act_scale [] float32 (fp8) quantizes x, None keeps x as it is (weight-only).
    Returns x.dtype, accumulated in float32.
    """
    check_equation(eq, contract)
    f32 = jnp.float32
    if spec.mode == "int4":
        w = dequantize(q, scale, spec, 0, contract, x.dtype)
        return jnp.einsum(eq, x, w, preferred_element_type=f32).astype(x.dtype)
    if spec.mode == "fp8" and act_scale is not None:
        y = jnp.einsum(eq, quantize_activation(x, act_scale), q, preferred_element_type=f32)
        return (y * (act_scale * scale)).astype(x.dtype)
    # int8 and fp8 codes are exact in bfloat16 / float16 / float32
    y = jnp.einsum(eq, x, q.astype(x.dtype), preferred_element_type=f32)
    return (y * scale).astype(x.dtype)


# ---- calibration: max |x| at each quantized linear's input ---------------------------------
_local = threading.local()


class Recorder:
    """Collects max |x| over the valid tokens of a [B, T] mask, per linear layer (by name).

    Active only while calibration traces one layer (jaxformer.quant.calibrate); the values
    are tracers of that trace, returned as its outputs.
    """

    def __init__(self, mask):
        self.mask = mask  # [B, T] bool
        self.amax: dict = {}

    def observe(self, key: str, x) -> None:
        m = self.mask.reshape(self.mask.shape + (1,) * (x.ndim - 2))
        v = jnp.max(jnp.where(m, jnp.abs(x.astype(jnp.float32)), 0.0))
        self.amax[key] = v if key not in self.amax else jnp.maximum(self.amax[key], v)


@contextlib.contextmanager
def recording(mask):
    prev = getattr(_local, "recorder", None)
    _local.recorder = rec = Recorder(mask)
    try:
        yield rec
    finally:
        _local.recorder = prev


def recorder() -> Recorder | None:
    return getattr(_local, "recorder", None)
