"""The KV cache: an explicit pytree, described once by abstract shapes plus logical axes.

k and v are [L, B, S, K, H] (layers, cache_batch, cache_length, kv_heads, head_dim): layers
map to `pipe` (each stage holds its layers' cache), kv heads to `tensor`, batch to `data`.
Sequences are right-padded: sequence b's tokens occupy slots [0, length_b); a step writes its
new keys at slot `start[b]` of its own row, so rows of different lengths share one cache.

Quantized caches (RunConfig.kv_cache "int8" or "fp8"): k and v hold int8 / float8_e4m3fn
codes and k_scale, v_scale [L, B, S, K] float32 one scale per token and kv head (max |x| over
the head dim / 127 or / 448), written with their entries. Half the bytes of a bf16 cache plus
4 bytes per head and token (3% at head_dim 128), so about twice the batch x context fits.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxformer.config import ModelConfig

CACHE_AXES = ("layers", "cache_batch", "cache_length", "kv_heads", "head_dim")
SCALE_AXES = CACHE_AXES[:-1]
KV_MODES = {"int8": (jnp.int8, 127.0), "fp8": (jnp.float8_e4m3fn, 448.0)}


class KVCache(NamedTuple):
    k: jax.Array  # [L, B, S, K, H]
    v: jax.Array  # [L, B, S, K, H]
    k_scale: jax.Array | None = None  # [L, B, S, K] float32 (quantized caches)
    v_scale: jax.Array | None = None

    @property
    def max_length(self) -> int:
        return self.k.shape[2]


class PrefillRows(NamedTuple):
    """A `start` for the trunk: a prefill (attending within its tokens, written from slot
    0, as with start None) of cache rows [offset, offset + B) of a larger cache, so a batch
    prefilled in chunks of rows writes each chunk straight into the batch's cache."""
    offset: jax.Array  # int32 scalar


def is_decode(start) -> bool:
    """Whether a trunk `start` means decode (new keys at per-row slots, queries attend over
    the cache) rather than a prefill (None or PrefillRows)."""
    return start is not None and not isinstance(start, PrefillRows)


def as_tuple(cache) -> tuple:
    """(k, v) or, quantized, (k, v, k_scale, v_scale): what the layers take."""
    t = tuple(cache)
    return t[:2] if len(t) == 2 or t[2] is None else t


def quantize(x, mode: str):
    """x [..., H] -> (codes [..., H] int8 / float8_e4m3fn, scale [...] float32)."""
    dtype, qmax = KV_MODES[mode]
    x = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x), axis=-1)
    scale = jnp.where(amax > 0, amax, 1.0) * jnp.float32(1.0 / qmax)
    y = x / scale[..., None]
    y = jnp.round(y) if mode == "int8" else y
    return jnp.clip(y, -qmax, qmax).astype(dtype), scale


def dequantize(q, scale, dtype):
    """codes [..., H], scale [...] -> [..., H] in `dtype`."""
    return (q.astype(jnp.float32) * scale[..., None]).astype(dtype)


def mode_of(cache) -> str | None:
    """The quantization of a cache tuple, from its code dtype (None: a float cache)."""
    t = as_tuple(cache)
    if len(t) == 2:
        return None
    return "int8" if t[0].dtype == jnp.int8 else "fp8"


def cache_rows(batch: int, data: int) -> int:
    """Rows generate() allocates for `batch` prompts: a power of two (so compiles stay few)
    rounded up to a multiple of the data-parallel size; no floor, since every padded row costs a
    huge model a whole row of cache."""
    return -(-(1 << (batch - 1).bit_length()) // data) * data


def prefill_rows(rows: int, tokens: int, budget: int, data: int = 1, pipe: int = 1) -> int:
    """Rows one prefill pass computes: all `rows` when rows x tokens (the padded prompt)
    is within `budget` (RunConfig.prefill_tokens), else the largest power of two dividing
    `rows` whose tokens are (at least 1). Meshes with data or pipe > 1 prefill all rows at
    once: their rows are split over devices or microbatches already."""
    if rows * tokens <= budget or data > 1 or pipe > 1:
        return rows
    r = 1
    while rows % (2 * r) == 0 and 2 * r * tokens <= budget:
        r *= 2
    return r


def cache_slots(prompt_bucket: int, longest_prompt: int, max_new: int, limit: int) -> int:
    """Cache length generate() allocates: the padded prompt plus the new tokens, rounded up to
    a multiple of 128 and capped at the position limit, but never fewer slots than the
    longest prompt plus its new tokens, nor than the padded prompt itself."""
    rounded = min(-(-(prompt_bucket + max_new) // 128) * 128, max(limit, prompt_bucket))
    return max(rounded, longest_prompt + max_new, prompt_bucket)


def cache_shape(cfg: ModelConfig, batch: int, max_length: int) -> tuple[int, ...]:
    return (cfg.num_layers, batch, max_length, cfg.kv_heads, cfg.dims_per_head)


def abstract_cache(cfg: ModelConfig, batch: int, max_length: int, dtype,
                   kv_cache: str | None = None) -> KVCache:
    shape = cache_shape(cfg, batch, max_length)
    if kv_cache is None:
        s = jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))
        return KVCache(s, s)
    q = jax.ShapeDtypeStruct(shape, jnp.dtype(KV_MODES[kv_cache][0]))
    sc = jax.ShapeDtypeStruct(shape[:-1], jnp.float32)
    return KVCache(q, q, sc, sc)


def cache_axes(kv_cache: str | None = None) -> KVCache:
    if kv_cache is None:
        return KVCache(CACHE_AXES, CACHE_AXES)
    return KVCache(CACHE_AXES, CACHE_AXES, SCALE_AXES, SCALE_AXES)


def init_cache(cfg: ModelConfig, batch: int, max_length: int, dtype, shardings=None,
               kv_cache: str | None = None) -> KVCache:
    """Zeros (codes and scales when quantized), created directly in `shardings` (a KVCache
    of shardings) when given."""
    abstract = abstract_cache(cfg, batch, max_length, dtype, kv_cache)

    def make():
        return KVCache(*(None if a is None else jnp.zeros(a.shape, a.dtype) for a in abstract))
    if shardings is None:
        return make()
    return jax.jit(make, out_shardings=shardings)()


def store(cache: tuple, k, v, layer, start) -> tuple:
    """Write this step's k, v [B, T, K, H] (quantizing them for a quantized cache) into
    layer `layer` of the stacked cache (k, v[, k_scale, v_scale]); start as in
    `write_layer` (None: slot 0)."""
    mode = mode_of(cache)
    if mode is None:
        new = (k, v)
    else:
        (kq, ks), (vq, vs) = quantize(k, mode), quantize(v, mode)
        new = (kq, vq, ks, vs)
    return tuple(write_layer(c, n, layer, start) for c, n in zip(cache, new))


def write_layer(cache: jax.Array, new: jax.Array, layer, start: jax.Array | None) -> jax.Array:
    """Write new [B, T, K, H] into layer `layer` of the stacked cache [L, B, S, K, H].

    start [B]: row b's keys go to slots [start[b], start[b] + T); None: every row at slot 0;
    PrefillRows(offset): slot 0 of cache rows [offset, offset + B).
    Only the new entries are written: inside the layer loop the stacked cache is a loop
    carry, so XLA updates it in place instead of rebuilding a layer's [B, S, K, H] (or the
    whole stack) per step, which made decode copy the cache every token.
    """
    new = new.astype(cache.dtype)[None]  # [1, B, T, K, H] (scales: [1, B, T, K])
    zero = jnp.int32(0)
    rest = (zero,) * (cache.ndim - 3)
    layer = jnp.asarray(layer, jnp.int32)
    if not is_decode(start):
        row = zero if start is None else jnp.asarray(start.offset, jnp.int32)
        return lax.dynamic_update_slice(cache, new, (layer, row, zero) + rest)
    if new.shape[1] == 1:
        # one row: a plain update (the vmapped one below becomes a scatter, which XLA lowers
        # as a read, a bounds select and a write: three kernels instead of one per layer)
        return lax.dynamic_update_slice(cache, new, (layer, zero, start[0].astype(jnp.int32))
                                        + rest)
    return jax.vmap(
        lambda c, x, s: lax.dynamic_update_slice(c, x, (layer, s) + rest),
        in_axes=(1, 1, 0), out_axes=1)(cache, new, start.astype(jnp.int32))


def read_layer(cache: jax.Array, layer) -> jax.Array:
    """Layer `layer` [B, S, K, H] of the stacked cache [L, B, S, K, H]."""
    return lax.dynamic_index_in_dim(cache, jnp.asarray(layer, jnp.int32), 0, keepdims=False)
