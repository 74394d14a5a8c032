"""The KV cache: an explicit pytree, described once by abstract shapes plus logical axes.

k and v are [L, B, S, K, H] (layers, cache_batch, cache_length, kv_heads, head_dim): layers
map to `pipe` (each stage holds its layers' cache), kv heads to `tensor`, batch to `data`.
Sequences are right-padded: sequence b's tokens occupy slots [0, length_b); a step writes its
new keys at slot `start[b]` of its own row, so rows of different lengths share one cache.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxformer.config import ModelConfig

CACHE_AXES = ("layers", "cache_batch", "cache_length", "kv_heads", "head_dim")


class KVCache(NamedTuple):
    k: jax.Array  # [L, B, S, K, H]
    v: jax.Array  # [L, B, S, K, H]

    @property
    def max_length(self) -> int:
        return self.k.shape[2]


def cache_rows(batch: int, data: int) -> int:
    """Rows generate() allocates for `batch` prompts: a power of two (so compiles stay few)
    rounded up to a multiple of the data-parallel size; no floor, since every padded row costs a
    huge model a whole row of cache."""
    return -(-(1 << (batch - 1).bit_length()) // data) * data


def cache_slots(prompt_bucket: int, longest_prompt: int, max_new: int, limit: int) -> int:
    """Cache length generate() allocates: the padded prompt plus the new tokens, rounded up to
    a multiple of 128 and capped at the position limit, but never fewer slots than the
    longest prompt plus its new tokens, nor than the padded prompt itself."""
    rounded = min(-(-(prompt_bucket + max_new) // 128) * 128, max(limit, prompt_bucket))
    return max(rounded, longest_prompt + max_new, prompt_bucket)


def cache_shape(cfg: ModelConfig, batch: int, max_length: int) -> tuple[int, ...]:
    return (cfg.num_layers, batch, max_length, cfg.kv_heads, cfg.dims_per_head)


def abstract_cache(cfg: ModelConfig, batch: int, max_length: int, dtype) -> KVCache:
    s = jax.ShapeDtypeStruct(cache_shape(cfg, batch, max_length), jnp.dtype(dtype))
    return KVCache(s, s)


def cache_axes() -> KVCache:
    return KVCache(CACHE_AXES, CACHE_AXES)


def init_cache(cfg: ModelConfig, batch: int, max_length: int, dtype, shardings=None) -> KVCache:
    """Zeros, created directly in `shardings` (a KVCache of shardings) when given."""
    shape = cache_shape(cfg, batch, max_length)
    make = lambda s: jnp.zeros(shape, dtype)  # noqa: E731
    if shardings is None:
        return KVCache(make(None), make(None))
    return jax.jit(lambda: KVCache(make(None), make(None)), out_shardings=shardings)()


def write(layer_cache: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """Write new [B, T, K, H] into one layer's cache [B, S, K, H] at slot start[b] of row b."""
    return jax.vmap(lambda c, x, s: lax.dynamic_update_slice(c, x.astype(c.dtype), (s, 0, 0)))(
        layer_cache, new, start)


def write_layer(cache: jax.Array, new: jax.Array, layer, start: jax.Array | None) -> jax.Array:
    """Write new [B, T, K, H] into layer `layer` of the stacked cache [L, B, S, K, H].

    start [B]: row b's keys go to slots [start[b], start[b] + T); None: every row at slot 0.
    Only the new entries are written: inside the layer loop the stacked cache is a loop
    carry, so XLA updates it in place instead of rebuilding a layer's [B, S, K, H] (or the
    whole stack) per step, which made decode copy the cache every token.
    """
    new = new.astype(cache.dtype)[None]  # [1, B, T, K, H]
    zero = jnp.int32(0)
    layer = jnp.asarray(layer, jnp.int32)
    if start is None:
        return lax.dynamic_update_slice(cache, new, (layer, zero, zero, zero, zero))
    return jax.vmap(
        lambda c, x, s: lax.dynamic_update_slice(c, x, (layer, s, zero, zero)),
        in_axes=(1, 1, 0), out_axes=1)(cache, new, start.astype(jnp.int32))


def read_layer(cache: jax.Array, layer) -> jax.Array:
    """Layer `layer` [B, S, K, H] of the stacked cache [L, B, S, K, H]."""
    return lax.dynamic_index_in_dim(cache, jnp.asarray(layer, jnp.int32), 0, keepdims=False)
