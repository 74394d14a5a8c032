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

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from jaxformer.config import ModelConfig

CACHE_AXES = ("layers", "cache_batch", "cache_length", "kv_heads", "head_dim")
SCALE_AXES = CACHE_AXES[:-1]
PAGE_AXES = ("layers", "cache_pages", "page_slots", "kv_heads", "head_dim")
KV_MODES = {"int8": (jnp.int8, 127.0), "fp8": (jnp.float8_e4m3fn, 448.0)}


@dataclasses.dataclass(frozen=True)
class KVCache:
    """The stacked KV cache of every layer, a pytree whose metadata (the quantization) is
    static: code that holds a cache never guesses its kind from a dtype.

    k, v [L, B, S, K, H] in the run dtype, or int8 / float8_e4m3fn codes when `quant` is
    "int8" / "fp8", with k_scale, v_scale [L, B, S, K] float32 beside them.
    """
    k: jax.Array
    v: jax.Array
    k_scale: jax.Array | None = None
    v_scale: jax.Array | None = None
    quant: str | None = None  # static: None, "int8" or "fp8" (KV_MODES)

    # ---- description ---------------------------------------------------------------
    @staticmethod
    def abstract(cfg: ModelConfig, batch: int, max_length: int, dtype,
                 quant: str | None = None) -> "KVCache":
        """Shapes and dtypes of a cache of `batch` rows x `max_length` slots; nothing is
        allocated. The memory plan sums these."""
        return _abstract(KVCache, cache_shape(cfg, batch, max_length), dtype, quant)

    @staticmethod
    def axes(quant: str | None = None) -> "KVCache":
        """The logical axes of each field (a KVCache of tuples)."""
        if quant is None:
            return KVCache(CACHE_AXES, CACHE_AXES)
        return KVCache(CACHE_AXES, CACHE_AXES, SCALE_AXES, SCALE_AXES, quant)

    @property
    def max_length(self) -> int:
        return self.k.shape[2]

    @property
    def rows(self) -> int:
        return self.k.shape[1]

    def scales(self) -> dict:
        """{k_scale, v_scale} for attention over a quantized cache, else {}."""
        return {} if self.quant is None else dict(k_scale=self.k_scale, v_scale=self.v_scale)

    def map(self, fn) -> "KVCache":
        """fn applied to every array (codes and scales alike), the metadata kept."""
        return jax.tree.map(fn, self)

    # ---- the operations layers need ------------------------------------------------
    def write(self, layer, k, v, at: "Write") -> "KVCache":
        """Write k, v [B, T, K, H] (quantized first for a quantized cache) into layer
        `layer` (an int32 scalar) at the slots `at` names; only the new entries move."""
        if self.quant is None:
            new = dict(k=k, v=v)
        else:
            (kq, ks), (vq, vs) = quantize(k, self.quant), quantize(v, self.quant)
            new = dict(k=kq, v=vq, k_scale=ks, v_scale=vs)
        return dataclasses.replace(self, **{
            f: write_layer(getattr(self, f), x, layer, at) for f, x in new.items()})

    def read(self, layer) -> "KVCache":
        """Layer `layer` of every field: k, v [B, S, K, H] (scales [B, S, K])."""
        return self.map(lambda a: read_layer(a, layer))

    def put_rows(self, src: "KVCache", slots) -> "KVCache":
        """Rows of `src` (b rows of S' <= S slots) written into rows `slots` [b] int32 of
        this cache, slots [0, S') of each (the rest of a row keeps what it held, which its
        length masks). The request-insert of the Engine."""
        S = src.max_length
        slots = jnp.asarray(slots, jnp.int32)
        put = lambda dst, new: dst.at[:, slots, :S].set(new.astype(dst.dtype))  # noqa: E731
        return jax.tree.map(put, self, src)


jax.tree_util.register_dataclass(KVCache, data_fields=["k", "v", "k_scale", "v_scale"],
                                 meta_fields=["quant"])


@dataclasses.dataclass(frozen=True)
class PagedKVCache:
    """A pool of pages shared by every sequence: k, v [L, P, ps, K, H] (P pages of ps
    tokens; codes when `quant`, with k_scale, v_scale [L, P, ps, K]). A sequence's token at
    position p lives at page pages[b, p // ps], slot p % ps of its page-table row (Write);
    page 0 is the null page that padding and free rows write to (serving/pages.py never
    hands it out). Layers see the same write / scales operations as KVCache's."""
    k: jax.Array
    v: jax.Array
    k_scale: jax.Array | None = None
    v_scale: jax.Array | None = None
    quant: str | None = None

    @staticmethod
    def abstract(cfg: ModelConfig, num_pages: int, page_size: int, dtype,
                 quant: str | None = None) -> "PagedKVCache":
        shape = (cfg.num_layers, num_pages, page_size, cfg.kv_heads, cfg.dims_per_head)
        return _abstract(PagedKVCache, shape, dtype, quant)

    @staticmethod
    def axes(quant: str | None = None) -> "PagedKVCache":
        if quant is None:
            return PagedKVCache(PAGE_AXES, PAGE_AXES)
        return PagedKVCache(PAGE_AXES, PAGE_AXES, PAGE_AXES[:-1], PAGE_AXES[:-1], quant)

    @property
    def page_size(self) -> int:
        return self.k.shape[2]

    def scales(self) -> dict:
        return {} if self.quant is None else dict(k_scale=self.k_scale, v_scale=self.v_scale)

    def map(self, fn) -> "PagedKVCache":
        return jax.tree.map(fn, self)

    def write(self, layer, k, v, at: "Write") -> "PagedKVCache":
        """k, v [B, T, K, H] of positions at.start[b] + t into the rows' pages (at.pages);
        positions past a row's page table go to the null page."""
        if self.quant is None:
            new = dict(k=k, v=v)
        else:
            (kq, ks), (vq, vs) = quantize(k, self.quant), quantize(v, self.quant)
            new = dict(k=kq, v=vq, k_scale=ks, v_scale=vs)
        B, T = k.shape[:2]
        ps, M = self.page_size, at.pages.shape[1]
        pos = at.start[:, None] + jnp.arange(T, dtype=jnp.int32)[None]  # [B, T]
        col = pos // ps
        page = jnp.where(col < M, jnp.take_along_axis(at.pages, jnp.minimum(col, M - 1), 1),
                         0)
        layer = jnp.asarray(layer, jnp.int32)
        return dataclasses.replace(self, **{
            f: getattr(self, f).at[layer, page, pos % ps].set(x.astype(getattr(self, f).dtype))
            for f, x in new.items()})


jax.tree_util.register_dataclass(PagedKVCache, data_fields=["k", "v", "k_scale", "v_scale"],
                                 meta_fields=["quant"])


@dataclasses.dataclass(frozen=True)
class Write:
    """Where a forward pass writes its keys and values, and what its queries attend over.

    Prefill (`Write.prefill()`): T new keys per row at slots [0, T) of rows
    [row, row + B) of the cache (row 0 unless a batch is prefilled in chunks of rows), the
    queries attending within the T tokens. Decode (`Write.at(start)`): row b's keys at
    slots [start[b], start[b] + T), the queries attending over the whole cache row; with
    `pages` [B, M] (a PagedKVCache), positions map to the rows' pages. Packed
    (`Write.packed(lo, lim)`, no cache): each row holds several sequences back to back and
    query t of row b sees keys lo[b, t] <= s <= lim[b, t] only, its own sequence's.
    """
    start: jax.Array | None = None  # [B] int32 (decode)
    row: jax.Array | None = None  # [] int32 first cache row (prefill)
    pages: jax.Array | None = None  # [B, M] int32 page tables (paged caches)
    seg_lo: jax.Array | None = None  # [B, T] int32 first key each query sees (packed)
    seg_lim: jax.Array | None = None  # [B, T] int32 last key each query sees, -1: none
    decode: bool = False  # static

    @staticmethod
    def prefill(row=None) -> "Write":
        return Write(row=None if row is None else jnp.asarray(row, jnp.int32))

    @staticmethod
    def at(start, pages=None) -> "Write":
        """Decode: new keys at per-row positions start [B] (through page tables pages
        [B, M] for a paged cache), queries over the cache."""
        return Write(start=jnp.asarray(start, jnp.int32), decode=True,
                     pages=None if pages is None else jnp.asarray(pages, jnp.int32))

    @staticmethod
    def packed(seg_lo, seg_lim) -> "Write":
        """Packed rows (varseqlen): query t of row b attends over keys seg_lo[b, t] <=
        s <= seg_lim[b, t] of its own row ([B, T] int32; seg_lim -1 for padding)."""
        return Write(seg_lo=jnp.asarray(seg_lo, jnp.int32),
                     seg_lim=jnp.asarray(seg_lim, jnp.int32))

    @property
    def spans(self):
        """(seg_lo, seg_lim) of a packed pass, else None (attention's `spans`)."""
        return None if self.seg_lo is None else (self.seg_lo, self.seg_lim)


jax.tree_util.register_dataclass(Write, data_fields=["start", "row", "pages", "seg_lo",
                                                     "seg_lim"],
                                 meta_fields=["decode"])


def _abstract(cls, shape, dtype, quant):
    """cls's fields as ShapeDtypeStructs: k, v of `shape` in dtype, or codes with float32
    scales of shape[:-1] for a quantized cache."""
    if quant is None:
        s = jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))
        return cls(s, s)
    check_quant(quant)
    q = jax.ShapeDtypeStruct(shape, jnp.dtype(KV_MODES[quant][0]))
    sc = jax.ShapeDtypeStruct(shape[:-1], jnp.float32)
    return cls(q, q, sc, sc, quant)


def check_quant(quant: str | None) -> None:
    if quant is not None and quant not in KV_MODES:
        raise ValueError(f"kv_cache: must be None, 'int8' or 'fp8', got {quant!r}")


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


MIN_BUCKET = 16


def bucket(n: int, limit: int | None = None) -> int:
    """Round a length up to a power of two (>= MIN_BUCKET) so compiles stay few."""
    b = max(MIN_BUCKET, 1 << max(0, int(n) - 1).bit_length())
    return min(b, limit) if limit is not None and limit >= n else b


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


def init_cache(cfg: ModelConfig, batch: int, max_length: int, dtype, shardings=None,
               kv_cache: str | None = None) -> KVCache:
    """Zeros (codes and scales when quantized), created directly in `shardings` (a KVCache
    of shardings) when given."""
    abstract = KVCache.abstract(cfg, batch, max_length, dtype, kv_cache)

    def make():
        return abstract.map(lambda a: jnp.zeros(a.shape, a.dtype))
    if shardings is None:
        return make()
    return jax.jit(make, out_shardings=shardings)()


def write_layer(cache: jax.Array, new: jax.Array, layer, at: Write) -> jax.Array:
    """Write new [B, T, K, H] (scales [B, T, K]) into layer `layer` of the stacked cache
    [L, B, S, K, H] at the slots `at` names (Write).

    Only the new entries are written: inside the layer loop the stacked cache is a loop
    carry, so XLA updates it in place instead of rebuilding a layer's [B, S, K, H] (or the
    whole stack) per step, which made decode copy the cache every token.
    """
    new = new.astype(cache.dtype)[None]  # [1, B, T, K, H] (scales: [1, B, T, K])
    zero = jnp.int32(0)
    rest = (zero,) * (cache.ndim - 3)
    layer = jnp.asarray(layer, jnp.int32)
    if not at.decode:
        row = zero if at.row is None else at.row
        return lax.dynamic_update_slice(cache, new, (layer, row, zero) + rest)
    if new.shape[1] == 1:
        # one row: a plain update (the vmapped one below becomes a scatter, which XLA lowers
        # as a read, a bounds select and a write: three kernels instead of one per layer)
        return lax.dynamic_update_slice(cache, new, (layer, zero, at.start[0]) + rest)
    return jax.vmap(
        lambda c, x, s: lax.dynamic_update_slice(c, x, (layer, s) + rest),
        in_axes=(1, 1, 0), out_axes=1)(cache, new, at.start)


def read_layer(cache: jax.Array, layer) -> jax.Array:
    """Layer `layer` [B, S, K, H] of the stacked cache [L, B, S, K, H]."""
    return lax.dynamic_index_in_dim(cache, jnp.asarray(layer, jnp.int32), 0, keepdims=False)
