"""Quantized weights and the matmuls that use them, in plain jnp.

A float kernel is laid out [*lead, *contraction, *out]: `lead` stacked dimensions (the
`layers` axis, or none inside the layer scan), then the `contract` dimensions its einsum
contracts (the input features: D for QKV and the first MLP matrix, N H for the attention
output, F for the second MLP matrix), then its output dimensions.

Stored kernels are K-minor, [*lead, *out, *contraction]: cuBLASLt's FP8 GEMM needs the
contraction dim minor in both operands (with it major XLA transposes the weight on every
call), the INT8 matrix-vector product reads rows of codes (faster than columns of the float
layout) and the INT4 one reduces each group of codes along a row (faster than a column
reduction or a dequantized bf16 einsum); benchmarks/quant_matmul.py measures each, the
numbers are in docs/benchmarks.md. Scales (float32):

    int8, fp8     [*lead, *out]                 one per output channel
    fp8-tensor    [*lead]                       one per matrix
    int4          the stored kernel's shape with its last (contraction) dim divided by the
                  group size: [*lead, *out, ..., n / g]; that axis keeps the contraction
                  dim's logical name, so a group axis of a row-parallel matrix is sharded
                  like its rows

The matmuls (GPU paths; CPU runs the same programs, upcast by XLA), M = rows of x:

    int8 / fp8 weights,      M == 1: sum(x * q, over the contraction) in float32, a row
    weight-only              reduction XLA fuses with the convert, so the codes travel in 8
                             bits (the batch-1 decode win); where the contraction is at least
                             LONG_ROWS x the output channels (the MLP's second matrix) x as
                             two rows through the GEMM below instead, which splits the long
                             rows over more of the GPU; M > 1: einsum(x, q.astype(x.dtype))
                             * scale, the convert fused into XLA's GEMM fusion
    int4                     M == 1: per group a row reduction of x * codes, times the
                             group scale, summed (the codes travel in 4 bits); M > 1:
                             dequantize the groups (convert, multiply by the group scale)
                             and einsum
    fp8 (with activations)   M > SMALL_M: x is scaled by its static act_scale and cast to
                             float8_e4m3fn; einsum(fp8, fp8, preferred_element_type=x.dtype)
                             on K-minor operands is cuBLASLt's FP8 tensor-core GEMM on Hopper
                             (the prefill win; float32 accumulation, the product written in
                             the run dtype), then * act_scale * kernel scale. M <= SMALL_M
                             (decode) takes the weight-only path: an FP8 GEMM of a few rows
                             is slower than reading the FP8 weights into a bf16 product

Opt-in (RunConfig.quant_kernel="auto"): on a Hopper GPU, int8 and fp8 weight-only products of
at most KERNEL_MAX_ROWS rows take the Mosaic GPU kernel jaxformer.kernels.quant_matmul
instead, when the codes need no padded copy (output channels a
multiple of 64, contraction a multiple of 128) and the call runs on one device: a Pallas call
is not partitioned by XLA, so under a tensor- or data-parallel mesh the XLA path stays
(a shard_map wrapper at the layer, which knows the logical axes, is the way to lift that).
The layer's QuantSpec carries the switch (QuantSpec.kernel): "off" (default) always XLA;
"auto" or "log" as above ("log" also logs once why a call cannot take the kernel);
"interpret" the kernel in the Mosaic GPU interpreter on any device (tests).
The default is XLA because in the model the kernel is slower (docs/benchmarks.md): XLA's
fused row reductions already read the codes near copy bandwidth at the model's shapes, and
the kernel pays split-K partials, a separate merge and x re-reads.

Plain jnp rather than google's qwix / aqt: the three paths are a few lines each over public
jax APIs, run unchanged on jax 0.10 and 0.11, and keep the numerics testable against numpy;
a library would add a dependency (and a wheel for the GPU machines) for the same XLA code.
"""
from __future__ import annotations

import functools
import logging
import math

import jax
import jax.numpy as jnp

from jaxformer.quant.spec import QuantSpec
from jaxformer import sharding
from jaxformer.kernels import attention, quant_matmul

FP8_MAX = 448.0  # largest finite float8_e4m3fn
SMALL_M = 64  # rows up to which FP8 models run weight-only (decode steps)
KERNEL_MAX_ROWS = 16  # rows up to which int8 / fp8 weight-only products take the kernel
LONG_ROWS = 2  # contraction / output channels from which batch 1 runs as a two-row GEMM
log = logging.getLogger(__name__)
_logged: set[str] = set()


def to_stored(a, spec: QuantSpec, lead: int, contract: int):
    """[*lead, *contraction, *out] -> the stored layout (module docstring)."""
    return jnp.transpose(a, _perm(a.ndim, lead, contract))


def from_stored(q, spec: QuantSpec, lead: int, contract: int):
    """The stored layout -> [*lead, *contraction, *out]."""
    perm = _perm(q.ndim, lead, contract)
    inv = [perm.index(i) for i in range(q.ndim)]
    return jnp.transpose(q, inv)


def stored_axes(axes, spec: QuantSpec, lead: int, contract: int) -> tuple:
    """A kernel's logical axis names in its stored layout."""
    return tuple(tuple(axes)[i] for i in _perm(len(axes), lead, contract))


def _perm(ndim: int, lead: int, contract: int) -> list[int]:
    return (list(range(lead)) + list(range(lead + contract, ndim))
            + list(range(lead, lead + contract)))


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
        q = q.astype(spec.weight_dtype).reshape(w.shape)
        return to_stored(q, spec, lead, contract), to_stored(scale, spec, lead, contract)
    axes = tuple(range(lead, w.ndim)) if spec.per_tensor else tuple(range(lead, lead + contract))
    scale = _nonzero(jnp.max(jnp.abs(w), axis=axes)) * _inv(spec)
    ws = w / jnp.expand_dims(scale, axes)
    if spec.mode == "int8":
        q = jnp.clip(jnp.round(ws), -spec.qmax, spec.qmax)
    else:
        q = jnp.clip(ws, -FP8_MAX, FP8_MAX)
    return to_stored(q.astype(spec.weight_dtype), spec, lead, contract), scale


def dequantize(q, scale, spec: QuantSpec, lead: int, contract: int, dtype=jnp.float32):
    """(q, scale) -> w [*lead, *contraction, *out] in `dtype` (computed in float32)."""
    if spec.mode == "int4":
        return from_stored(_dequantize_stored(q, scale, spec, dtype), spec, lead, contract)
    q = from_stored(q, spec, lead, contract)
    axes = tuple(range(lead, q.ndim)) if spec.per_tensor else tuple(range(lead, lead + contract))
    return (q.astype(jnp.float32) * jnp.expand_dims(scale, axes)).astype(dtype)


def scale_axes(kernel_axes, spec: QuantSpec, lead: int, contract: int) -> tuple:
    """Logical axes of the scale of a kernel with logical axes `kernel_axes`."""
    kernel_axes = tuple(kernel_axes)
    if spec.mode == "int4":
        return stored_axes(kernel_axes, spec, lead, contract)
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
    inputs, out = eq.replace(" ", "").split("->")
    xs, ks = inputs.split(",")
    eq_stored = f"{xs},{ks[contract:]}{ks[:contract]}->{out}"  # q is K-minor
    rows = math.prod(x.shape[: x.ndim - contract])
    if spec.mode == "int4":
        if rows == 1:
            return _int4_vector_product(x, q, scale, spec, contract)
        w = _dequantize_stored(q, scale, spec, x.dtype)
        return jnp.einsum(eq_stored, x, w, preferred_element_type=f32).astype(x.dtype)
    if spec.mode == "fp8" and act_scale is not None and rows > SMALL_M:
        # cuBLASLt accumulates in float32 and writes the run dtype: an f32 product would be
        # written and re-read by the scale multiply (6.7B prefill, 1920 tokens: ~0.7 GB a
        # layer); in the run dtype the multiply fuses into the bias / activation consumer
        y = jnp.einsum(eq_stored, quantize_activation(x, act_scale), q,
                       preferred_element_type=x.dtype)
        return (y.astype(f32) * (act_scale * scale)).astype(x.dtype)
    # the kernel takes x [rows, K] row-major: batch dims kept in order, contraction last
    plain = xs == out[: len(out) - len(ks) + contract] + ks[:contract]
    if rows <= KERNEL_MAX_ROWS and plain:
        mode = spec.kernel
        reason = kernel_unsupported(x, q, scale, spec, contract, mode)
        if reason is None:
            return _kernel_einsum(x, q, scale, spec, contract, interpret=mode == "interpret")
        if mode == "log" and reason not in _logged:
            _logged.add(reason)
            log.info(f"RunConfig.quant_kernel='log': quantized matmul uses XLA: {reason}")
    if rows == 1:  # a matrix-vector product over the K-minor codes
        n_out = q.ndim - contract
        n_k = math.prod(q.shape[n_out:])
        if n_k >= LONG_ROWS * math.prod(q.shape[:n_out]):
            y = _two_row_product(x, q, contract)
        else:  # a row reduction XLA fuses with the convert
            xv = x.reshape(x.shape[x.ndim - contract:]).astype(f32)  # [*contraction]
            y = jnp.sum(q.astype(f32) * xv, axis=tuple(range(n_out, q.ndim)))  # [*out]
        return (y * scale).reshape(x.shape[: x.ndim - contract] + y.shape).astype(x.dtype)
    # int8 and fp8 codes are exact in bfloat16 / float16 / float32
    y = jnp.einsum(eq_stored, x, q.astype(x.dtype), preferred_element_type=f32)
    return (y * scale).astype(x.dtype)


def _two_row_product(x, q, contract: int):
    """One row of x through K-minor codes as a two-row GEMM (the second row zero, dropped):
    x [*batch (size 1), *contraction], q [*out, *contraction] -> float32 [*out], unscaled.

    For long rows (LONG_ROWS) XLA's row reduction leaves the GPU under-filled, while a
    GEMM fusion with the convert inside splits the contraction, and beats both the
    two-stage row reduction and XLA's GEMM of the single row
    (`benchmarks/quant_matmul.py --batch1`; docs/benchmarks.md). The zero row costs a
    small pad where XLA does not fuse it into the producer of x.
    """
    n_out = q.ndim - contract
    out_shape, n_k = q.shape[:n_out], math.prod(q.shape[n_out:])
    x2 = jnp.pad(x.reshape(1, n_k), ((0, 1), (0, 0)))                   # [2, K]
    w = q.reshape(-1, n_k).astype(x.dtype)  # codes are exact in bf16, f16 and f32
    y = jnp.einsum("mk,nk->mn", x2, w, preferred_element_type=jnp.float32)
    return y[0].reshape(out_shape)


def _dequantize_stored(q, scale, spec: QuantSpec, dtype):
    """int4 codes and group scales, both K-minor ([*lead, *out, *contraction]) -> the
    weights in `dtype` (computed in float32), still K-minor (no transpose before an
    einsum)."""
    n = q.shape[-1]
    g = spec.group(n)
    qg = q.reshape(q.shape[:-1] + (n // g, g)).astype(jnp.float32)
    return (qg * scale[..., None]).reshape(q.shape).astype(dtype)


def _int4_vector_product(x, q, scale, spec: QuantSpec, contract: int):
    """One row of x through K-minor int4 codes: x [*batch (size 1), *contraction], q [*out,
    *contraction], scale [*out, *contraction with the last / g] -> [*batch, *out].

    y[o] = sum over groups of scale[o, grp] * sum_(k in grp) x[k] q[o, k]: the inner sum is
    a row reduction over g consecutive codes that XLA fuses with the int4 convert, so the
    codes are read once in 4 bits; the group scales apply to the [*out, groups] partials.
    """
    f32 = jnp.float32
    n_out = q.ndim - contract
    n = q.shape[-1]
    g = spec.group(n)
    xv = x.reshape(x.shape[x.ndim - contract:]).astype(f32)            # [*contraction]
    xg = xv.reshape(xv.shape[:-1] + (n // g, g))
    qg = q.reshape(q.shape[:-1] + (n // g, g)).astype(f32)               # [*out, ..., n/g, g]
    part = jnp.sum(qg * xg, axis=-1)                                    # [*out, ..., n/g]
    y = jnp.sum(part * scale, axis=tuple(range(n_out, q.ndim)))         # [*out]
    return y.reshape(x.shape[: x.ndim - contract] + y.shape).astype(x.dtype)


# ---- the Mosaic GPU kernel for few rows ----------------------------------------------------
def kernel_unsupported(x, q, scale, spec: QuantSpec, contract: int, mode: str) -> str | None:
    """Why the weight-only product einsum is about to run cannot take the kernel (None: it
    can). x [*batch, *contraction]; q [*out, *contraction] (stored layout)."""
    if mode == "off":
        return "RunConfig.quant_kernel='off'"
    if spec.mode not in ("int8", "fp8"):
        return f"mode {spec.mode}"
    if mode != "interpret":
        dev = attention._devices()[0]
        if not attention.is_hopper(dev):
            return (f"the kernel needs a Hopper GPU (sm_90); this is {dev.platform} "
                    f"{getattr(dev, 'device_kind', '')}").rstrip()
    mesh = sharding.abstract_mesh()
    if mesh is not None:
        manual = set(mesh.manual_axes)
        split = {a: n for a, n in dict(mesh.shape).items() if n > 1 and a not in manual}
        if split:
            return f"the call is partitioned over mesh axes {split} (no shard_map wrapper)"
    N, K = math.prod(q.shape[: q.ndim - contract]), math.prod(q.shape[q.ndim - contract:])
    if quant_matmul.needs_padding(N, K):
        return f"{N} output channels / contraction {K} would need a padded copy of the codes"
    xm = jax.ShapeDtypeStruct((1, K), x.dtype)
    return quant_matmul.check_supported(xm, jax.ShapeDtypeStruct((N, K), q.dtype),
                                        jax.ShapeDtypeStruct((N,), jnp.float32))


@functools.partial(jax.jit, static_argnames=("interpret",))
def _int8_matmul_jit(x, w, s, interpret: bool):
    """jit-wrapped so the equal calls of every layer trace to one jaxpr and the Mosaic GPU
    kernel is built once, not once per layer (as kernels.attention does)."""
    return quant_matmul.int8_matmul(x, w, s, interpret=interpret)


def _kernel_einsum(x, q, scale, spec: QuantSpec, contract: int, interpret: bool):
    """The weight-only product on flattened operands: [rows, K] x [N, K] -> [rows, N]."""
    out_shape = q.shape[: q.ndim - contract]
    batch = x.shape[: x.ndim - contract]
    K = math.prod(q.shape[q.ndim - contract:])
    w = q.reshape(-1, K)                                                    # [N, K]
    s = jnp.broadcast_to(scale.astype(jnp.float32), out_shape).reshape(-1)  # fp8-tensor: []
    y = _int8_matmul_jit(x.reshape(-1, K), w, s, interpret=interpret)
    return y.reshape(batch + out_shape)
