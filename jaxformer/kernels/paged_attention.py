"""Paged attention: attention over a KV pool of fixed-size pages, read through page tables.

Legend: B batch rows, T query tokens, N query heads, K kv heads (G = N // K), H head dim,
L layers, P pages in the pool, ps tokens per page, M pages per row (the page table's width).

Layout (the paged cache's): the pool of every layer is k, v [L, P, ps, K, H]; a quantized
pool holds int8 / float8_e4m3fn codes with k_scale, v_scale [L, P, ps, K] float32 (one scale
per token and kv head, as cache.quantize()). Row b owns pages `pages[b, :]` ([B, M] int32,
padded with page 0): its token at position p lives at pool[layer, pages[b, p // ps], p % ps].
kv_lengths [B] int32 = valid tokens of each row (after this step's writes); q [B, T, N, H]
at q_positions [B, T]: key j is visible to a query at position p iff j <= p and
j < kv_length (causal always). Query head n reads kv head n // G.

`paged_attention_reference` gathers each row's pages into a contiguous [B, M*ps, K, H] cache
and runs reference.attention_reference: the CPU path and what the kernel is tested against.

`paged_prefill_attention` (T > 1) gathers the rows' pages and runs flash_attention.py's
prefill kernel on them (a paged prefill kernel that reads the pages itself is future work).

`paged_decode_attention` (T == 1) is decode_attention.py's flash-decoding kernel reading the
pool through the page table: one CTA per (row, kv head, split); all G query heads of the kv
head are the rows of one wgmma, so each page is read once; each pipeline step streams
`block_kv // ps` whole pages (one TMA copy per page, page ids read from the table in global
memory by the producer warpgroup) into one shared-memory slot, so the matmuls and softmax
run on the same [block_kv, H] tiles as the contiguous kernel whatever the page size. Pages
past a row's visible length are never loaded (a step's tail pages past the row's last page
re-read that last page, an L2 hit, and are masked). The split over the sequence
(flash-decoding) and the merge are the contiguous kernel's (decode_attention.combine).
With PagedDecodeConfig.rows_per_cta > 1 a CTA serves several rows one after another through
one ring, the next row's pages streaming in while this row's last steps compute.
Quantized pools stream codes and scales; the codes are converted to bf16 / f16 tiles in
shared memory and the scales fold into score / probability columns, as decode_attention.py.

Score modifiers, as the contiguous kernels (kernels/masking.py): a sliding window W (the
query at position p sees keys p - W < s; the kernel's splits share the blocks from the
window's start, so pages wholly before it are never loaded), a logit soft cap C and ALiBi
slopes [N] (scores += slope * (s - p), s the key's position in its sequence).

Keys past kv_length inside a row's last page are read and masked; like the contiguous
kernel's cache padding they must hold finite values (a NaN there times probability 0 is NaN).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

import numpy as np

from jaxformer.kernels import decode_attention as da
from jaxformer.kernels import flash_attention as fa
from jaxformer.kernels.paged_decode import PagedDecodeConfig, decode_pallas
from jaxformer.kernels.reference import attention_reference

PAGE_SIZES = (16, 32, 64, 128)


# ---- shapes and the reference --------------------------------------------------------------
def _with_layer(k_pool, v_pool, k_scale, v_scale, layer):
    """Pools as [L, P, ps, K, H] (scales [L, P, ps, K]) and the layer as int32 [1]."""
    if layer is None:
        k_pool, v_pool = k_pool[None], v_pool[None]
        if k_scale is not None:
            k_scale, v_scale = k_scale[None], v_scale[None]
        layer = 0
    return k_pool, v_pool, k_scale, v_scale, jnp.reshape(jnp.asarray(layer, jnp.int32), (1,))


def check_paged(q, k_pool, v_pool, pages, q_positions, kv_lengths, k_scale=None,
                v_scale=None, layered: bool = True):
    """Raise ValueError naming the operand whose shape breaks the paged layout."""
    name = "paged attention"
    rank = 5 if layered else 4
    if q.ndim != 4:
        raise ValueError(f"{name}: q must be [B, T, N, H], got shape {q.shape}")
    if k_pool.ndim != rank or k_pool.shape != v_pool.shape:
        raise ValueError(f"{name}: k_pool, v_pool must both be {'[L, ' if layered else '['}"
                         f"P, ps, K, H], got {k_pool.shape}, {v_pool.shape}")
    B, T, N, H = q.shape
    K = k_pool.shape[-2]
    if k_pool.shape[-1] != H or N % K:
        raise ValueError(f"{name}: k_pool {k_pool.shape} does not fit q {q.shape} (head_dim "
                         f"must match and kv heads {K} divide query heads {N})")
    if pages.ndim != 2 or pages.shape[0] != B:
        raise ValueError(f"{name}: pages must be [B={B}, M] int32, got {pages.shape}")
    if q_positions.shape != (B, T) or kv_lengths.shape != (B,):
        raise ValueError(f"{name}: q_positions must be [{B}, {T}] and kv_lengths [{B}], got "
                         f"{q_positions.shape}, {kv_lengths.shape}")
    if (k_scale is None) != (v_scale is None):
        raise ValueError(f"{name}: k_scale and v_scale go together")
    if k_scale is not None and not (k_scale.shape == v_scale.shape == k_pool.shape[:-1]):
        raise ValueError(f"{name}: k_scale, v_scale {k_scale.shape}, {v_scale.shape} must be "
                         f"the pool's shape {k_pool.shape} without head_dim")


def gather_pages(pool, pages, layer):
    """pool [L, P, ps, ...], pages [B, M], layer int32 [1] -> [B, M*ps, ...] (a copy)."""
    one = lax.dynamic_index_in_dim(pool, layer[0], 0, keepdims=False)
    g = one[pages]  # [B, M, ps, ...]
    return g.reshape((g.shape[0], g.shape[1] * g.shape[2]) + g.shape[3:])


def paged_attention_reference(q, k_pool, v_pool, pages, q_positions, kv_lengths, *,
                              scale: float, layer=None, k_scale=None, v_scale=None,
                              softcap: float | None = None, window: int | None = None,
                              alibi_slopes=None, return_lse: bool = False):
    """Causal attention of q [B, T, N, H] over each row's pages (layout: module docstring).

    With `layer` the pools are [L, P, ps, K, H] (scales [L, P, ps, K]), else one layer's
    [P, ps, K, H]. Gathers the row's pages into [B, M*ps, K, H] and runs
    reference.attention_reference (float32 softmax; quantized codes with their scales folded
    into the scores and probabilities). window, softcap, alibi_slopes [N]: as
    reference.attention_reference, over the keys' positions in their sequence.
    Returns [B, T, N, H] in q's dtype (and lse [B, T, N]).
    """
    check_paged(q, k_pool, v_pool, pages, q_positions, kv_lengths, k_scale, v_scale,
                layered=layer is not None)
    bad = fa.check_mods(window, softcap, alibi_slopes, q.shape[2])
    if bad is not None:
        raise ValueError(f"paged attention: {bad}")
    k_pool, v_pool, k_scale, v_scale, layer = _with_layer(k_pool, v_pool, k_scale, v_scale,
                                                          layer)
    pages = pages.astype(jnp.int32)
    k, v = gather_pages(k_pool, pages, layer), gather_pages(v_pool, pages, layer)
    if k_scale is not None:
        k_scale, v_scale = gather_pages(k_scale, pages, layer), gather_pages(v_scale, pages,
                                                                              layer)
    return attention_reference(q, k, v, q_positions.astype(jnp.int32),
                               kv_lengths.astype(jnp.int32), causal=True, scale=scale,
                               return_lse=return_lse, k_scale=k_scale, v_scale=v_scale,
                               softcap=softcap, window=window, alibi_slopes=alibi_slopes)


def check_supported(q, k_pool, v_pool, quantized: bool = False):
    """None if the paged decode kernel takes these operands (pools [L, P, ps, K, H] or one
    layer's [P, ps, K, H]), else the reason."""
    ps = k_pool.shape[-3]
    if ps not in PAGE_SIZES:
        return f"page size {ps} (supported: {PAGE_SIZES})"
    if quantized and (ps * 4) % 128:
        # a page's float32 scales fill less than a 128-byte shared-memory slot, so each
        # step streams one page, and a 16-row code tile has no upcast register layout
        return (f"a quantized pool needs pages of at least 32 tokens, got {ps} (the page's "
                f"scales must fill 128 bytes)")
    # the contiguous kernel's checks, on one page of every row seen as a cache [B, ps, K, H]
    B = q.shape[0]
    one = jax.ShapeDtypeStruct((B,) + tuple(k_pool.shape[-3:]), k_pool.dtype)
    return da.check_supported(q, one, jax.ShapeDtypeStruct(one.shape, v_pool.dtype), quantized)


def paged_decode_attention(q, k_pool, v_pool, pages, q_positions, kv_lengths, *,
                           scale: float, layer=None, k_scale=None, v_scale=None,
                           return_lse: bool = False, splits: int | None = None,
                           config: PagedDecodeConfig | None = None, interpret: bool = False,
                           window=None, softcap: float | None = None, alibi_slopes=None):
    """One query token per row against its pages, with the Mosaic GPU kernel (Hopper).

    q [B, 1, N, H] bf16 / f16; k_pool, v_pool [L, P, ps, K, H] with `layer` (int32 scalar),
    else [P, ps, K, H], in q's dtype, or int8 / float8_e4m3fn codes with k_scale, v_scale
    (the pools' shape without H, float32); pages [B, M] int32; q_positions [B, 1] int32;
    kv_lengths [B] int32. window (a Python int, or an int32 scalar), softcap, alibi_slopes
    [N] f32: as decode_attention.decode_attention (pages wholly before the window are never
    loaded). Returns out [B, 1, N, H] in q.dtype (and lse [B, 1, N] f32).
    """
    check_paged(q, k_pool, v_pool, pages, q_positions, kv_lengths, k_scale, v_scale,
                layered=layer is not None)
    quant = k_scale is not None
    reason = check_supported(q, k_pool, v_pool, quant) or fa.check_mods(
        window, softcap, alibi_slopes, q.shape[2])
    if reason is not None:
        raise ValueError(f"paged_decode_attention: unsupported {reason}")
    k_pool, v_pool, k_scale, v_scale, layer = _with_layer(k_pool, v_pool, k_scale, v_scale,
                                                          layer)
    cfg = config or PagedDecodeConfig()
    B, _, N, H = q.shape
    ps, K = k_pool.shape[2], k_pool.shape[3]
    G = N // K
    pages = pages.astype(jnp.int32)
    M = pages.shape[1]
    pps = max(1, cfg.block_kv // ps)
    scales = None
    if quant:  # the rows' scales as [2, B, M, K, ps]: a page's scales of one head contiguous
        scales = jnp.stack([gather_pages(a, pages, layer).reshape(B, M, ps, K)
                            for a in (k_scale, v_scale)]).astype(jnp.float32)
        scales = scales.transpose(0, 1, 2, 4, 3)
    # a static window bounds the keys any split reads: split those blocks, not the table's
    span = M * ps
    if isinstance(window, (int, np.integer)):
        span = min(span, int(window) + pps * ps)
    rows = min(cfg.rows_per_cta, B)
    cfg = dataclasses.replace(cfg, rows_per_cta=rows)
    Bp = -(-B // rows) * rows  # rows past B: length 0, nothing loaded, sliced off
    P = splits or da.choose_splits(Bp // rows, K, span, pps * ps, cfg.ctas_per_sm)
    R = da._o_rows(G)
    qg = q.reshape(B, K, G, H)
    if R != G:
        qg = jnp.pad(qg, ((0, 0), (0, 0), (0, R - G), (0, 0)))
    mods, pos, lo, slopes = da.modifier_inputs(window, softcap, alibi_slopes, q_positions,
                                               K, G)
    kv_lengths = kv_lengths.astype(jnp.int32)
    if Bp != B:
        pad = lambda a, axis=0: jnp.pad(a, [(0, Bp - B) if i == axis else (0, 0)  # noqa
                                           for i in range(a.ndim)])
        qg, pages, kv_lengths, pos = pad(qg), pad(pages), pad(kv_lengths), pad(pos)
        lo = None if lo is None else pad(lo)
        scales = None if scales is None else pad(scales, 1)
    o, lse2 = decode_pallas(qg, k_pool, v_pool, pages, kv_lengths, pos, layer,
                                   scale=scale, o_rows=R, cfg=cfg, pps=pps, splits=P,
                                   interpret=interpret, scales=scales, lo=lo, mods=mods,
                                   slopes=slopes)
    out, lse = da.combine(o[:B], lse2[:B], G)
    out = out.reshape(B, 1, N, H).astype(q.dtype)
    if return_lse:
        return out, lse.reshape(B, 1, N)
    return out


def paged_prefill_attention(q, k_pool, v_pool, pages, q_positions, kv_lengths, *,
                            scale: float, layer=None, return_lse: bool = False,
                            config: fa.PrefillConfig | None = None, interpret: bool = False,
                            window=None, softcap: float | None = None, alibi_slopes=None):
    """A prefill chunk (T > 1, its own tokens already written to the pool) against its rows'
    pages: the pages are gathered into a contiguous [B, M*ps, K, H] cache (one XLA copy of
    the rows' pages, small next to the chunk's matmuls) and flash_attention.py's kernel runs
    on it, causal, with the window / softcap / ALiBi slopes of flash_attention (key s of
    the gathered cache is at position s of its sequence). Float pools only (the prefill
    kernel reads no codes). Not yet a kernel that reads the pages itself.
    """
    check_paged(q, k_pool, v_pool, pages, q_positions, kv_lengths, layered=layer is not None)
    k_pool, v_pool, _, _, layer = _with_layer(k_pool, v_pool, None, None, layer)
    pages = pages.astype(jnp.int32)
    k, v = gather_pages(k_pool, pages, layer), gather_pages(v_pool, pages, layer)
    return fa.flash_attention(q, k, v, q_positions.astype(jnp.int32),
                              kv_lengths.astype(jnp.int32), causal=True, scale=scale,
                              return_lse=return_lse, config=config, interpret=interpret,
                              window=window, softcap=softcap, alibi_slopes=alibi_slopes)
