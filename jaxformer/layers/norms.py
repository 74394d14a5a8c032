"""LayerNorm and RMSNorm, computed in float32 whatever the activation dtype."""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx
from jax import lax

from jaxformer.layers.base import param


# Rows up to which LayerNorm takes its statistics in one Welford pass. In a decode step the
# norm is launch-bound and one kernel beats two; over a prefill's thousands of rows the
# per-element division of the Welford merge costs more than the second pass.
WELFORD_MAX_ROWS = 64


class Norm(nnx.Module):
    """LayerNorm (scale, bias) or RMSNorm (scale) over the last axis (D, or H for QK-norm).

    offset: the norm multiplies by (offset + scale): Gemma stores w and scales by 1 + w.
    """

    def __init__(self, dim: int, kind: str, eps: float, rngs: nnx.Rngs, *,
                 offset: float = 0.0, axis: str = "embed"):
        self.kind, self.eps, self.offset = kind, eps, offset
        self.scale = param(rngs, (dim,), (axis,), "zeros" if offset else "ones")
        if kind == "layernorm":
            self.bias = param(rngs, (dim,), (axis,), "zeros")

    def __call__(self, x):  # x [..., D]
        xf = x.astype(jnp.float32)
        if self.kind == "layernorm" and xf.size <= WELFORD_MAX_ROWS * xf.shape[-1]:
            mean, var = mean_and_variance(xf)  # a decode step: one kernel, not two
            xf = xf - mean
        elif self.kind == "layernorm":  # prefill: two passes, no division per element
            xf = xf - xf.mean(-1, keepdims=True)
            var = jnp.mean(xf * xf, axis=-1, keepdims=True)
        else:
            var = jnp.mean(xf * xf, axis=-1, keepdims=True)
        scale = self.scale[...].astype(jnp.float32)
        if self.offset:
            scale = scale + jnp.float32(self.offset)
        y = xf * jnp.reciprocal(jnp.sqrt(var + self.eps)) * scale
        if self.kind == "layernorm":
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


def mean_and_variance(x):
    """Mean and (biased) variance of float32 x [..., D] over D, both [..., 1], in one pass.

    A variadic reduction carrying (count, mean, sum of squared deviations) with Welford's
    pairwise merge: XLA emits one kernel, where mean-then-variance is two dependent
    reductions (two kernels per norm in a decode step), and unlike E[x^2] - E[x]^2 it does
    not cancel when the mean is large against the spread.
    """
    def merge(a, b):
        (na, ma, sa), (nb, mb, sb) = a, b
        n = na + nb
        wb = nb / jnp.where(n == 0, 1.0, n)
        delta = mb - ma
        return n, ma + delta * wb, sa + sb + delta * delta * na * wb

    f32 = jnp.float32
    n, mean, m2 = lax.reduce((jnp.ones_like(x), x, jnp.zeros_like(x)),
                             (f32(0.0), f32(0.0), f32(0.0)), merge, (x.ndim - 1,))
    return mean[..., None], (m2 / x.shape[-1])[..., None]
