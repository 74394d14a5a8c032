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
import functools

import jax
import jax.numpy as jnp
from jax import lax

import numpy as np

from jaxformer.kernels import decode_attention as da
from jaxformer.kernels import flash_attention as fa
from jaxformer.kernels.reference import attention_reference

PAGE_SIZES = (16, 32, 64, 128)


@dataclasses.dataclass(frozen=True)
class PagedDecodeConfig:
    block_kv: int = 128   # keys per pipeline step: max(1, block_kv // ps) whole pages
    stages: int = 3       # K/V shared-memory ring depth
    # CTAs per SM: the splits are chosen for it, and above 1 the K/V ring gets only its share
    # of shared memory, so that many CTAs can be resident (one CTA's TMA and softmax latency
    # then overlaps another's streaming)
    ctas_per_sm: int = 1
    semantics: str = "lane"
    # the compute warpgroup's registers per thread (setmaxnreg; the memory warpgroup keeps
    # 40): two resident CTAs of two warpgroups fit the SM's 64K registers only at <= 216
    compute_registers: int = 232
    # batch rows one CTA serves, one after another: the K/V ring streams the next row's pages
    # while this row's last steps compute, so a large batch of short rows does not pay a
    # CTA's start (q load, first TMA round trip) and drain per row
    rows_per_cta: int = 1

    def __post_init__(self):
        if not (24 <= self.compute_registers <= 256 and self.compute_registers % 8 == 0):
            raise ValueError(f"PagedDecodeConfig.compute_registers: must be a multiple of 8 "
                             f"in [24, 256], got {self.compute_registers}")
        if self.rows_per_cta < 1:
            raise ValueError(f"PagedDecodeConfig.rows_per_cta: must be >= 1, got "
                             f"{self.rows_per_cta}")
        if self.ctas_per_sm < 1:
            raise ValueError(f"PagedDecodeConfig.ctas_per_sm: must be >= 1, got "
                             f"{self.ctas_per_sm}")


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


# ---- the kernel --------------------------------------------------------------------------
def _paged_decode_pallas(qg, k, v, pages, kv_lengths, last_pos, layer, *, scale: float,
                         o_rows: int,
                         cfg: PagedDecodeConfig, pps: int, splits: int, interpret: bool,
                         scales=None, lo=None, mods: fa.ScoreMods = fa.ScoreMods(),
                         slopes=None):
    """qg [B, K, R, H] query rows of each kv head (R = G rounded up to 8); k, v the pools
    [L, P, ps, K, H]; pages [B, M] int32; kv_lengths [B] int32; last_pos [B] int32 the query
    positions; layer [1] int32; pps pages per pipeline step; scales None or, for code
    pools, the layer's scales gathered per row [2, B, M, K, ps] float32 (a page's scales of
    one kv head contiguous: one TMA copy); lo: with mods.window, [B] int32 each row's first
    visible key; slopes: with mods.alibi, [K, 64] f32 each kv head's query rows' slopes
    (log2 units, zero-padded), as decode_attention._decode_pallas. B is a multiple of
    cfg.rows_per_cta: CTA c serves rows c * rows_per_cta onwards, one after another, through
    one K/V ring (global step g of the CTA uses slot g % stages).
    Returns o [B, K, splits, o_rows, H] f32 (normalised partials), lse2 [B, K, splits, 64]
    f32 (log2 units), as decode_attention._decode_pallas.
    """
    pl, plgpu = fa._plgpu()
    B, K, R, H = qg.shape
    M = da.ROWS
    ps = k.shape[2]
    bk = pps * ps
    rows = cfg.rows_per_cta
    qbufs = 2 if rows > 1 else 1  # the next row's queries load while this row computes
    max_blocks = -(-pages.shape[1] // pps) * rows
    isz = jnp.dtype(qg.dtype).itemsize
    quant = scales is not None
    smem = fa.SMEM_BYTES // cfg.ctas_per_sm
    if quant:
        csz = jnp.dtype(k.dtype).itemsize
        stages = fa.fit_stages(cfg.stages, M * H * (qbufs * isz + 4) + 4 * M + 2 * bk * H * isz,
                               2 * bk * (H * csz + 4), max_blocks, smem)
    else:
        stages = fa.fit_stages(cfg.stages, M * H * (qbufs * isz + 4) + 8 * M, 2 * bk * H * isz,
                               max_blocks, smem)
    P = splits
    dtype = qg.dtype
    qk_scale = float(scale) * fa.LOG2E

    def float_tile(codes_smem, tile_smem):
        if interpret:
            tile_smem[...] = codes_smem[...].astype(tile_smem.dtype)
            return
        codes = plgpu.load(codes_smem, (), layout=plgpu.Layout.WGMMA_UPCAST_2X)
        codes = plgpu.layout_cast(codes, plgpu.Layout.WGMMA)
        if jnp.dtype(codes.dtype) == jnp.dtype(jnp.float8_e4m3fn):
            codes = codes.astype(jnp.float16)
        tile_smem[...] = codes.astype(tile_smem.dtype)

    def per_key(scale_smem):
        if interpret:
            cols = scale_smem[...]
        else:
            cols = plgpu.load(scale_smem, (), layout=plgpu.Layout.WGMMA.reduce(0))
        return lax.broadcast_in_dim(cols, (M, bk), [1])

    def kernel(q_ref, k_ref, v_ref, pages_ref, len_ref, pos_ref, lo_ref, layer_ref, sc_ref,
               sl_ref, o_ref, lse_ref, q_smem, o_smem, lse_smem, sl_smem, k_smem, v_smem,
               q_bar, sl_bar, k_bar, v_bar, k_free, v_free, ks_smem=None, vs_smem=None,
               kt_smem=None, vt_smem=None):
        p = lax.axis_index("split")
        h = lax.axis_index("kvh")
        b0 = lax.axis_index("batch") * rows
        wg = lax.axis_index("wg")
        lyr = layer_ref[0]

        def plan(b):
            """Row b's steps in this split: (first block, steps, masked head steps, end of
            the unmasked steps, visible length, pages, window start)."""
            # keys the query sees: valid (kv_length) and causal (position + 1), within the
            # table (computed here, not in XLA: a separate tiny kernel costs microseconds)
            length = jnp.minimum(len_ref[b], pos_ref[b] + 1)
            length = jnp.maximum(jnp.minimum(length, jnp.int32(pages.shape[1] * ps)), 0)
            n_pages = lax.div(length + (ps - 1), jnp.int32(ps))
            end_block = lax.div(n_pages + (pps - 1), jnp.int32(pps))
            # With a window, keys before lo = position - W + 1 are invisible: the blocks
            # wholly before it are never loaded (the splits share [lo // bk, end_block)).
            lo = lo_ref[b] if mods.window else jnp.int32(0)
            start_block = jnp.minimum(lax.div(lo, jnp.int32(bk)), end_block)
            n_blocks = end_block - start_block
            per = lax.div(n_blocks + (P - 1), jnp.int32(P))
            first = start_block + jnp.minimum(p * per, n_blocks)
            last = jnp.minimum(first + per, end_block)
            n_steps = last - first
            # Only the row's final block can hold keys past its length, and only the
            # window's first block keys before lo: steps [0, n_head) and [n_full, n_steps)
            # are masked.
            n_full = jnp.maximum(jnp.where(last * bk > length, n_steps - 1, n_steps), 0)
            if mods.window:
                n_head = jnp.where(first * bk < lo, jnp.minimum(n_steps, 1), 0)
                n_full = jnp.maximum(n_full, n_head)
            else:
                n_head = jnp.int32(0)
            return first, n_steps, n_head, n_full, length, n_pages, lo

        @pl.when(wg == 0)
        def _compute():
            if not interpret:
                plgpu.set_max_registers(cfg.compute_registers, action="increase")
            # every step of this CTA's rows, for the wait on the step after a row's last
            total = sum(plan(b0 + j)[1] for j in range(rows))

            def load_q(j):
                buf = lax.rem(j, jnp.int32(qbufs))
                dst = q_smem.at[buf] if R == M else q_smem.at[buf, pl.ds(0, R)]
                plgpu.copy_gmem_to_smem(q_ref.at[b0 + j, h], dst, q_bar.at[buf])

            load_q(jnp.int32(0))
            slope_rows = None
            if mods.alibi:
                plgpu.copy_gmem_to_smem(sl_ref.at[h], sl_smem, sl_bar.at[0])
                plgpu.barrier_wait(sl_bar.at[0])
                slope_rows = fa._load_rows(sl_smem, interpret)

            @pl.when(total > 0)
            def _():
                plgpu.barrier_wait(k_bar.at[0])

            def row(j, g0):
                first, n_steps, n_head, n_full, length, _, lo = plan(b0 + j)
                buf = lax.rem(j, jnp.int32(qbufs))
                plgpu.barrier_wait(q_bar.at[buf])
                if rows > 1:
                    @pl.when(j + 1 < rows)
                    def _():  # its buffer's last reader, the row before, is done
                        load_q(j + 1)
                q_row = q_smem.at[buf]
                m_i = fa._row_layout(jnp.full((M,), -jnp.inf, jnp.float32), interpret)
                l_i = fa._row_layout(jnp.full((M,), 0.0, jnp.float32), interpret)
                acc = fa._tile_layout(jnp.full((M, H), 0.0, jnp.float32), interpret)

                def step(i, carry, masked):
                    acc, m_i, l_i = carry
                    g = g0 + i
                    slot = lax.rem(g, jnp.int32(stages))
                    if quant:  # the last step's wgmmas are complete: the float tile is free
                        float_tile(k_smem.at[slot], kt_smem)
                        k_cols = per_key(ks_smem.at[slot])
                        plgpu.barrier_arrive(k_free.at[slot])
                        plgpu.commit_smem()
                        s = fa._qk(q_row, kt_smem, (M, bk), interpret) * (k_cols * qk_scale)
                    else:
                        s = fa._qk(q_row, k_smem.at[slot], (M, bk), interpret)
                        plgpu.barrier_arrive(k_free.at[slot])
                        s = s * qk_scale
                    if masked or mods.alibi:  # key positions in the row's sequence
                        kv_ids = fa._col_iota((M, bk), interpret) + (first + i) * bk
                    if mods.softcap is not None or mods.alibi:
                        s = fa.score_mods(s, kv_ids if mods.alibi else None, pos_ref[b0 + j],
                                          slope_rows, mods)
                    if masked:
                        s = jnp.where(kv_ids < length, s, fa._MASK)
                        if mods.window:
                            s = jnp.where(kv_ids >= lo, s, fa._MASK)
                    m_new = jnp.maximum(m_i, s.max(axis=1))
                    alpha = jnp.exp2(m_i - m_new)
                    pr = jnp.exp2(s - lax.broadcast_in_dim(m_new, (M, bk), [0]))
                    l_i = l_i * alpha + pr.sum(axis=1)
                    acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                    plgpu.barrier_wait(v_bar.at[slot])

                    def wait_next_k():  # the CTA's next step, maybe the next row's first
                        @pl.when(g + 1 < total)
                        def _():
                            plgpu.barrier_wait(k_bar.at[lax.rem(g + 1, jnp.int32(stages))])
                    if quant:  # value scales weight the probabilities (l_i sums them plain)
                        float_tile(v_smem.at[slot], vt_smem)
                        pv = (pr * per_key(vs_smem.at[slot])).astype(dtype)
                        plgpu.barrier_arrive(v_free.at[slot])
                        plgpu.commit_smem()
                        acc = fa._pv(acc, pv, vt_smem, interpret, after_issue=wait_next_k)
                    else:
                        acc = fa._pv(acc, pr.astype(dtype), v_smem.at[slot], interpret,
                                     after_issue=wait_next_k)
                        plgpu.barrier_arrive(v_free.at[slot])
                    return acc, m_new, l_i

                carry = lax.fori_loop(0, n_head, functools.partial(step, masked=True),
                                      (acc, m_i, l_i))
                carry = lax.fori_loop(n_head, n_full, functools.partial(step, masked=False),
                                      carry)
                acc, m_i, l_i = lax.fori_loop(n_full, n_steps,
                                              functools.partial(step, masked=True), carry)
                l_safe = jnp.where(l_i == 0.0, 1.0, l_i)
                if rows > 1:  # the row before's copy-out has read o_smem and lse_smem
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                o_smem[...] = acc * lax.broadcast_in_dim(1.0 / l_safe, acc.shape, [0])
                lse_smem[...] = m_i + jnp.log(l_safe) * fa.LOG2E
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(0, o_rows)], o_ref.at[b0 + j, h, p])
                plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b0 + j, h, p])
                return g0 + n_steps

            lax.fori_loop(0, rows, row, jnp.int32(0))
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 1)
        def _memory():
            if not interpret:
                plgpu.set_max_registers(40, action="decrease")

            def issue(pool_ref, ring, scale_ring, which, bar, b, first, n_pages, i, slot):
                for j in range(pps):  # one TMA copy per page; the slot holds pps pages
                    idx = jnp.minimum((first + i) * pps + j, n_pages - 1)
                    page = pages_ref[b, idx]
                    rows_ = pl.ds(j * ps, ps)
                    dst = ring.at[slot] if pps == 1 else ring.at[slot, rows_]
                    plgpu.copy_gmem_to_smem(pool_ref.at[lyr, page, pl.ds(0, ps), h], dst,
                                            bar.at[slot])
                    if quant:  # the slot's barrier counts codes and scales per page
                        sdst = scale_ring.at[slot] if pps == 1 else scale_ring.at[slot, rows_]
                        plgpu.copy_gmem_to_smem(sc_ref.at[which, b, idx, h], sdst,
                                                bar.at[slot])

            streams = [(k_ref, k_smem, ks_smem, 0, k_bar, k_free),
                       (v_ref, v_smem, vs_smem, 1, v_bar, v_free)]

            # the ring over every step of the CTA's rows (fa.ring_producer's order: the
            # first `stages` steps fill it, each later one waits for its slot's release)
            def row(j, g0):
                b = b0 + j
                first, n_steps, _, _, _, n_pages, _ = plan(b)

                def one(i, g):
                    slot = lax.rem(g, jnp.int32(stages))
                    for pool_ref, ring, scale_ring, which, bar, free in streams:
                        @pl.when(g >= stages)
                        def _():
                            plgpu.barrier_wait(free.at[slot])
                        issue(pool_ref, ring, scale_ring, which, bar, b, first, n_pages, i,
                              slot)
                    return g + 1
                return lax.fori_loop(0, n_steps, one, g0)

            total = lax.fori_loop(0, rows, row, jnp.int32(0))

            @pl.loop(jnp.maximum(total - stages, 0), total)
            def _tail(g):  # observe the last releases: no barrier phase left pending
                for *_, free in streams:
                    plgpu.barrier_wait(free.at[lax.rem(g, jnp.int32(stages))])

    tiled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    codes_tiled = (plgpu.TilingTransform((8, 128)), plgpu.SwizzleTransform(128))
    ring_dtype, ring_tiled = (k.dtype, codes_tiled) if quant else (dtype, tiled)
    arrivals = pps * (2 if quant else 1)
    scratch = [
        plgpu.SMEM((qbufs, M, H), dtype, transforms=tiled),    # q rows
        plgpu.SMEM((M, H), jnp.float32),                       # normalised partial out
        plgpu.SMEM((M,), jnp.float32),                         # partial lse
        plgpu.SMEM((M,), jnp.float32) if mods.alibi else None,  # ALiBi slope rows
        plgpu.SMEM((stages, bk, H), ring_dtype, transforms=ring_tiled),  # K ring
        plgpu.SMEM((stages, bk, H), ring_dtype, transforms=ring_tiled),  # V ring
        plgpu.Barrier(num_barriers=qbufs),
        plgpu.Barrier(num_barriers=1),
        plgpu.Barrier(num_arrivals=arrivals, num_barriers=stages),
        plgpu.Barrier(num_arrivals=arrivals, num_barriers=stages),
        plgpu.Barrier(num_barriers=stages),
        plgpu.Barrier(num_barriers=stages),
    ]
    if quant:
        scratch += [
            plgpu.SMEM((stages, bk), jnp.float32),             # K scales ring
            plgpu.SMEM((stages, bk), jnp.float32),             # V scales ring
            plgpu.SMEM((bk, H), dtype, transforms=tiled),      # K tile, converted
            plgpu.SMEM((bk, H), dtype, transforms=tiled),      # V tile, converted
        ]
    else:  # a placeholder operand for the scales, never read
        scales = jnp.zeros((2, 1, 1, 1, 1), jnp.float32)
    if not mods.alibi:  # placeholder operands, never read
        slopes = jnp.zeros((1, M), jnp.float32)
    if not mods.window:
        lo = jnp.zeros((1,), jnp.int32)
    kwargs = {"interpret": fa.interpret_params()} if interpret else {}

    return plgpu.kernel(
        kernel,
        out_type=[jax.ShapeDtypeStruct((B, K, P, o_rows, H), jnp.float32),
                  jax.ShapeDtypeStruct((B, K, P, M), jnp.float32)],
        scratch_types=scratch,
        grid=(P, K, B // rows),
        grid_names=("split", "kvh", "batch"),
        num_threads=2,
        thread_name="wg",
        compiler_params=fa.compiler_params(cfg.semantics),
        **kwargs,
    )(qg, k, v, pages, kv_lengths, last_pos, lo, layer, scales, slopes)


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
    o, lse2 = _paged_decode_pallas(qg, k_pool, v_pool, pages, kv_lengths, pos, layer,
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
