"""Megatron tensor-parallel MLP: column-parallel `wi` (fused gate/up), row-parallel `wo`."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from jaxformer.config import ModelConfig
from jaxformer.layers.base import Dense
from jaxformer.sharding import shard


def activation(name: str, x):
    if name == "gelu":
        return gelu_erf(x)
    if name == "gelu_tanh":
        return jax.nn.gelu(x, approximate=True)
    if name == "relu":
        return jax.nn.relu(x)
    if name == "squared_relu":
        return jnp.square(jax.nn.relu(x))
    if name == "silu":
        return jax.nn.silu(x)
    raise ValueError(f"unknown activation {name!r}")


def gelu_erf(x):
    """Exact GELU, x * (1 + erf(x / sqrt 2)) / 2, in float32 whatever x's dtype: the formula
    torch and Megatron evaluate. jax.nn.gelu(approximate=False) goes through erfc, whose
    two-branch float32 expansion (about 80 operations a value) makes a prefill's GELU
    compute-bound instead of memory-bound (docs/benchmarks.md); it also rounds sqrt(1/2) to
    x's dtype (0.707 in bfloat16)."""
    xf = x.astype(jnp.float32)
    return (0.5 * xf * (1.0 + lax.erf(xf * np.float32(np.sqrt(0.5))))).astype(x.dtype)


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        D, F = cfg.hidden_size, cfg.mlp_size
        glu = ((2,), ("glu",)) if cfg.gated_mlp else ((), ())
        bias = cfg.linear_bias
        self.wi = Dense(rngs, (D, *glu[0], F), ("embed", *glu[1], "mlp"),
                        (*glu[0], F) if bias else None, (*glu[1], "mlp"))
        self.wo = Dense(rngs, (F, D), ("mlp", "embed"), (D,) if bias else None, ("embed",))

    def __call__(self, x):
        """x [B, T, D] -> [B, T, D]."""
        cfg = self.cfg
        if cfg.gated_mlp:
            h = self.wi.add_bias(self.wi.einsum("btd,dcf->btcf", x))  # c: gate, up
            h = shard(h, ("batch", "length", "glu", "act_mlp"))
            h = activation(cfg.activation, h[:, :, 0]) * h[:, :, 1]
        else:
            h = self.wi.add_bias(self.wi.einsum("btd,df->btf", x))
            h = activation(cfg.activation, shard(h, ("batch", "length", "act_mlp")))
        out = self.wo.add_bias(self.wo.einsum("btf,fd->btd", h))
        return shard(out, ("batch", "length", "embed"))
