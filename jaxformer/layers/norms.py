"""LayerNorm and RMSNorm, computed in float32 whatever the activation dtype."""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jaxformer.layers.base import param


class Norm(nnx.Module):
    """LayerNorm (scale, bias) or RMSNorm (scale) over the last axis D."""

    def __init__(self, dim: int, kind: str, eps: float, rngs: nnx.Rngs):
        self.kind, self.eps = kind, eps
        self.scale = param(rngs, (dim,), ("embed",), "ones")
        if kind == "layernorm":
            self.bias = param(rngs, (dim,), ("embed",), "zeros")

    def __call__(self, x):  # x [..., D]
        xf = x.astype(jnp.float32)
        if self.kind == "layernorm":
            xf = xf - xf.mean(-1, keepdims=True)
        var = jnp.mean(xf * xf, axis=-1, keepdims=True)
        y = xf * jnp.reciprocal(jnp.sqrt(var + self.eps)) * self.scale[...].astype(jnp.float32)
        if self.kind == "layernorm":
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)
