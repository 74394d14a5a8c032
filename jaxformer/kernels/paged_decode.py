"""The paged decode kernel (Mosaic GPU, Hopper) that paged_attention.paged_decode_attention
runs: one CTA per (rows, kv head, split) reads each row's pages through its page table
(layout and design: paged_attention.py's module docstring), and its configuration.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from jaxformer.kernels import decode_attention as da
from jaxformer.kernels import decode_step as ds
from jaxformer.kernels import flash_attention as fa


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


def decode_pallas(qg, k, v, pages, kv_lengths, last_pos, layer, *, scale: float,
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

    spec = ds.StepSpec(stages=stages, rows=M, block=bk, dtype=dtype, qk_scale=qk_scale,
                       mods=mods, interpret=interpret)

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
                carry = ds.empty_carry(spec, H)
                ring = ds.Ring(k_smem, v_smem, k_bar, v_bar, k_free, v_free, ks_smem, vs_smem,
                               kt_smem, vt_smem)
                # the ring runs on over the CTA's rows: this row's step i is its step g0 + i
                step = ds.make_step(spec, ring, q_row, slope_rows, first=first, length=length,
                                    lo=lo, position=lambda: pos_ref[b0 + j],
                                    ring_index=lambda i: g0 + i, total=total)
                acc, m_i, l_i = ds.run_steps(step, n_head, n_full, n_steps, carry)
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
            # first `stages` steps fill it, each later one waits for its slot's release).
            # Not fa.ring_producer itself: its steps are one loop whose first `stages` are
            # unrolled, while here they run row by row and a row's steps start at a traced
            # ring step g0, so the fill is a per-step `g >= stages` test instead
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
