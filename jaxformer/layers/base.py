"""Parameter helper and initialisers shared by the layers.

Every parameter carries its logical axis names as metadata; sharding is decided elsewhere
(jaxformer/sharding.py) from those names and a rules table.
"""
from __future__ import annotations

import math
import os
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer import sharding as shd
from jaxformer.quant import ops

INIT_STD = 0.02


def param(rngs: nnx.Rngs | None, shape: Sequence[int], axes: Sequence[str | None],
          init: str = "normal", dtype=jnp.float32) -> nnx.Param:
    """An nnx.Param of `shape` whose dimensions are named `axes` (logical names)."""
    if len(axes) != len(shape):
        raise ValueError(f"param: {len(axes)} axis names {tuple(axes)} for shape {tuple(shape)}")
    if init == "normal":
        value = INIT_STD * jax.random.normal(rngs.params(), shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    elif init == "ones":
        value = jnp.ones(shape, dtype)
    else:
        raise ValueError(f"unknown init {init!r}")
    # Logical names only: the rules table turns them into a mesh sharding at load time, so
    # the variable must not try to shard itself eagerly.
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


class Observed(nnx.Variable):
    """A Dense's input statistics recorded during calibration: max |x| per token [B, T]."""


class Dense(nnx.Module):
    """A weight holder: `kernel` (+ `bias`). The caller writes the einsum, with its shapes,
    and applies it with `einsum(eq, x)`.

    The kernel's first `contract` dimensions are the ones every einsum over it contracts (its
    input features), the rest its outputs: quantization (jaxformer.quant) puts its scales on
    the outputs, or on groups along the last contraction dimension, accordingly.
    """

    # FP8 quantization leaves its input in the run dtype (no act_scale): the experts of a
    # mixture (layers/moe.py), whose products are not Dense.einsum
    weight_only = False

    def __init__(self, rngs: nnx.Rngs, kernel_shape, kernel_axes, bias_shape=None,
                 bias_axes=None, *, contract: int = 1):
        self.kernel = param(rngs, kernel_shape, kernel_axes)
        if bias_shape is not None:
            self.bias = param(rngs, bias_shape, bias_axes, "zeros")
        self.contract = contract
        self.kernel_ndim = len(kernel_shape)  # without the stacked `layers` axis
        self.quant = None  # the quantize name once jaxformer.quant has quantized the kernel
        self.qname = None  # its name in calibration records, e.g. "attn/qkv"
        # Calibration (jaxformer.quant.calibrate) turns `observe` on in the copy of a block
        # it traces: einsum then records its input in `observed` (an Observed variable the
        # caller reads back) and leaves the activations unquantized.
        self.observe = False
        self.observed = nnx.data(None)  # data, not static: it holds an Observed once set

    def einsum(self, eq: str, x):
        """einsum(eq, x, kernel), eq e.g. "btd,df->btf"; a quantized kernel runs its
        low-precision matmul (jaxformer.quant.ops.einsum) instead."""
        if self.quant is None:
            return _einsum_not_strength_reduced(eq, x, self.kernel[...])
        q = self.quant
        if self.observe:  # calibration: record the input, keep it unquantized
            self.record_input(x)
            return ops.einsum(eq, x, self.kernel[...], self.kernel_scale[...], q,
                              self.contract, None)
        act_scale = self.act_scale[...] if q.activations else None
        return ops.einsum(eq, x, self.kernel[...], self.kernel_scale[...], q, self.contract,
                          act_scale)

    def record_input(self, x):
        """observed = max |x| over the features of each token of x [B, T, ...] -> [B, T]
        float32 (the elementwise max with an earlier call's record: a shared layer)."""
        amax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=tuple(range(2, x.ndim)))
        if self.observed is not None:
            amax = jnp.maximum(self.observed[...], amax)
        self.observed = Observed(amax)

    def add_bias(self, y):
        return y + self.bias[...] if hasattr(self, "bias") else y


# XLA:GPU rewrites a vector x matrix dot whose operands hold fewer than this many elements
# into a broadcast multiply plus a column reduction (GpuAlgebraicSimplifier's
# IsMatrixMultiplicationTooSmallForRewriting threshold; no flag turns it off in jax 0.11),
# which writes the whole product out and then reduces it, several times slower at batch 1
# than a GEMM that reads the weight once (docs/benchmarks.md).
XLA_GPU_DOT_REDUCE_BELOW = 10_000_000


def _einsum_not_strength_reduced(eq: str, x, kernel):
    """einsum(eq, x, kernel); a single-row x against a small kernel runs as two rows (the
    second zero, dropped after), which XLA keeps as a GEMM (see XLA_GPU_DOT_REDUCE_BELOW).

    "Small" is judged on one device's shard: XLA partitions the dot before it simplifies
    it, so on a tensor=T mesh a kernel of T * 10M elements is already a 10M-element dot per
    device. Every linear kernel shards one dimension over `tensor` (a replicated one, e.g.
    K/V at fewer kv heads than T, is merely padded when it need not be: one small pad).
    """
    inputs, out = eq.replace(" ", "").split("->")
    xs, ks = inputs.split(",")
    lead = os.path.commonprefix([xs, out])  # x's row dims, carried to the output
    n = next((i for i, c in enumerate(lead) if c in ks), len(lead))
    if n == 0 or math.prod(x.shape[:n]) != 1 or \
            kernel.size // shd.active_axis_size("tensor") >= XLA_GPU_DOT_REDUCE_BELOW:
        return jnp.einsum(eq, x, kernel)
    r = next(c for c in "ZYXWV" if c not in eq)
    x2 = jnp.pad(x.reshape(x.shape[n:])[None], [(0, 1)] + [(0, 0)] * (x.ndim - n))
    y2 = jnp.einsum(f"{r}{xs[n:]},{ks}->{r}{out[n:]}", x2, kernel)
    return y2[0].reshape(x.shape[:n] + y2.shape[1:])
