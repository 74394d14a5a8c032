"""Prefill flash attention for Hopper, written in Pallas for the Mosaic GPU backend.

Legend: B batch, T query length, S key length, N query heads, K kv heads (K | N, G = N // K),
H head dim. Query head n reads kv head n // G. Key s is visible to query t of sequence b iff
s < kv_lengths[b] and (not causal or s <= q_positions[b, t]) and, with a sliding window W,
s > q_positions[b, t] - W; scores are soft-capped (C tanh(x / C)) before the mask when asked
-- the contract of reference.py.

Structure (FlashAttention-3 style): one CTA per (head, 128 query rows, batch). Three
warpgroups: two compute warpgroups own 64 query rows each, the third only issues TMA copies
of K/V blocks into a ring of `stages` shared-memory slots. QK^T and PV run on warpgroup
matrix instructions (wgmma; P stays in registers), the softmax is float32 in registers, and a
schedule barrier makes the two compute warpgroups alternate between matmul and softmax.

The mask is data, not shape: outside the kernel, every query row gets `lim` = the last key
it may see (min(kv_len - 1, position) when causal, kv_len - 1 otherwise; -1 = sees none)
and `lo` = the first (position - W + 1 with a window, else 0), and every 64-row tile gets
the kv block range [first, steps) it visits, of which [mid, full) needs no mask. So padding,
causality, windows and arbitrary positions cost nothing on unmasked blocks, and blocks past
the last visible key or before the lowest row's window start are never loaded: a CTA's
producer streams the union of its two tiles' ranges, and a warpgroup releases the blocks
outside its own range unread, in lockstep with the other.

Rows that see no key at all (kv_len 0, or a position < 0) output 0 and lse -inf; the
reference gives the mean of V there. Such rows are padding by definition.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from jaxformer.kernels.masking import (  # noqa: F401  (re-exported: the kernels' API)
    LOG2E,
    ScoreMods,
    check_mods,
    cta_ranges,
    mods_of,
    score_mods,
    soft_cap_log2,
    tile_bounds,
    tile_ranges,
    visible_limit,
    visible_range,
)
from jaxformer.kernels.reference import attention_reference

LN2 = math.log(2.0)
_MASK = -1e30  # finite: a row whose whole block is masked gives 0 weight, never NaN
SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
SUPPORTED_HEAD_DIMS = (64, 128)


@dataclasses.dataclass(frozen=True)
class PrefillConfig:
    block_q: int = 64         # query rows per compute warpgroup (wgmma M)
    block_kv: int = 128       # keys per pipeline step
    stages: int = 2           # K/V shared-memory ring depth
    reverse_q: bool = True    # launch the longest (last) causal tiles first
    semantics: str = "lane"   # Mosaic GPU lowering semantics: "lane" or "warpgroup"


def _plgpu():
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu
    return pl, plgpu


def interpret_params():
    """Mosaic GPU interpret-mode parameters (CPU simulation of TMA, barriers, threads)."""
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    return InterpretGPUParams()


def compiler_params(semantics: str):
    _, plgpu = _plgpu()
    sem = {"lane": plgpu.LoweringSemantics.Lane,
           "warpgroup": plgpu.LoweringSemantics.Warpgroup}[semantics]
    return plgpu.CompilerParams(approx_math=True, lowering_semantics=sem)


SMEM_BYTES = 227 * 1024  # per-block dynamic shared memory on Hopper


def fit_stages(stages: int, fixed_bytes: int, bytes_per_stage: int, max_steps: int,
               smem: int = SMEM_BYTES) -> int:
    """The deepest ring (at most `stages`, at least 1) that fits `smem` bytes of shared
    memory (a CTA's whole budget, or its share where several are to be resident)."""
    fit = (smem - 1024 - fixed_bytes) // bytes_per_stage
    return int(max(1, min(stages, fit, max_steps)))


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def ring_producer(n_steps, stages: int, streams) -> None:
    """The TMA producer of a ring of `stages` shared-memory slots, for n_steps steps.

    streams: [(issue(i, slot), free)], each issuing step i's copy into `slot` and `free` the
    barriers its consumers arrive on when they release a slot. Primes the ring, then for
    step i >= stages waits for slot i % stages to be released before each stream's copy,
    and finally observes the last releases so no barrier phase is left pending at exit.
    """
    pl, plgpu = _plgpu()
    for i in range(stages):
        @pl.when(i < n_steps)
        def _():
            for issue, _free in streams:
                issue(i, i)

    @pl.loop(stages, jnp.maximum(n_steps, stages))
    def _refill(i):
        slot = lax.rem(i, jnp.int32(stages))
        for issue, free in streams:
            plgpu.barrier_wait(free.at[slot])
            issue(i, slot)

    @pl.loop(jnp.maximum(n_steps - stages, 0), n_steps)
    def _tail(i):
        slot = lax.rem(i, jnp.int32(stages))
        for _issue, free in streams:
            plgpu.barrier_wait(free.at[slot])


# ---- matmul helpers: wgmma on the GPU, jnp in the CPU interpreter ------------------------
# The Mosaic GPU interpreter of jax 0.10.2 cannot run wgmma with a transposed B operand, a
# register A operand or a pre-initialised accumulator (run_state), so in interpret mode the
# two matmuls are jnp dots on the same shared-memory tiles and register-layout annotations
# are dropped; everything else (TMA copies, barriers, warp specialisation, masks, bounds,
# stores) is the same code.
def _qk(q_smem, k_smem, shape, interpret: bool, after_issue=None):
    """f32 [bq, bk] = q_smem [bq, H] @ k_smem [bk, H]^T."""
    pl, plgpu = _plgpu()
    if interpret:
        out = jnp.dot(q_smem[...], k_smem[...].T, preferred_element_type=jnp.float32)
        if after_issue is not None:
            after_issue()
        return out

    def body(acc_ref):
        plgpu.wgmma(acc_ref, q_smem, plgpu.transpose_ref(k_smem, (1, 0)))
        if after_issue is not None:
            after_issue()
        return acc_ref[...]
    return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))


def _pv(acc, p, v_smem, interpret: bool, after_issue=None):
    """acc [bq, H] f32 += p [bq, bk] (registers) @ v_smem [bk, H]."""
    pl, plgpu = _plgpu()
    if interpret:
        out = acc + jnp.dot(p, v_smem[...], preferred_element_type=jnp.float32)
        if after_issue is not None:
            after_issue()
        return out

    def body(acc_ref):
        plgpu.wgmma(acc_ref, p, v_smem)
        if after_issue is not None:
            after_issue()
    return pl.run_state(body)(plgpu.ACC.init(acc))


def _row_layout(x, interpret):
    if interpret:
        return x
    _, plgpu = _plgpu()
    return plgpu.layout_cast(x, plgpu.Layout.WGMMA.reduce(1))


def _tile_layout(x, interpret):
    if interpret:
        return x
    _, plgpu = _plgpu()
    return plgpu.layout_cast(x, plgpu.Layout.WGMMA)


def _col_iota(shape, interpret):
    if interpret:
        return lax.broadcasted_iota(jnp.int32, shape, 1)
    _, plgpu = _plgpu()
    return plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA)


def _load_rows(smem, interpret):
    if interpret:
        return smem[...]
    _, plgpu = _plgpu()
    return plgpu.load(smem, (), layout=plgpu.Layout.WGMMA.reduce(1))


def softmax_step(s, carry, lim_rows, kv_start, masked: bool, interpret: bool, lo_rows=None):
    """One online-softmax update. s: [bq, bk] f32 scores already in log2 units.
    Masked: keys kv_start + j outside [lo_rows, lim_rows] (per row; lo None: 0) get _MASK.

    Returns (p, alpha, m_new, l_new); acc must be scaled by alpha before adding p @ V.
    """
    m_i, l_i = carry
    bq, bk = s.shape
    if masked:
        kv_ids = _col_iota((bq, bk), interpret) + kv_start
        s = jnp.where(kv_ids <= lax.broadcast_in_dim(lim_rows, (bq, bk), [0]), s, _MASK)
        if lo_rows is not None:
            s = jnp.where(kv_ids >= lax.broadcast_in_dim(lo_rows, (bq, bk), [0]), s, _MASK)
    m_new = jnp.maximum(m_i, s.max(axis=1))
    alpha = jnp.exp2(m_i - m_new)
    p = jnp.exp2(s - lax.broadcast_in_dim(m_new, (bq, bk), [0]))
    l_new = l_i * alpha + p.sum(axis=1)
    return p, alpha, m_new, l_new


# ---- the kernel ------------------------------------------------------------------------
def _prefill_pallas(q, k, v, lim, aux, ranges, slopes, *, scale: float, cfg: PrefillConfig,
                    mods: ScoreMods, return_lse: bool, interpret: bool):
    """q [B, T, N, H] (T % (2 block_q) == 0); k, v [B, S, K, H] (S % block_kv == 0);
    lim [B, T] int32; aux [B, mods.aux_rows, T] int32 (lo, then positions); ranges
    [B, T // block_q, 4] int32 (cta_ranges(tile_ranges(...))); slopes [N] f32 (log2 units).
    Returns out [B, T, N, H] in q.dtype and, if return_lse, lse2 [B, N, T] f32 (log2 units).
    """
    pl, plgpu = _plgpu()
    B, T, N, H = q.shape
    _, S, K, _ = k.shape
    G = N // K
    A = mods.aux_rows
    bq, bk = cfg.block_q, cfg.block_kv
    isz = jnp.dtype(q.dtype).itemsize
    stages = fit_stages(cfg.stages, 2 * bq * H * isz + 2 * bq * (8 + 4 * A), 2 * bk * H * isz,
                        S // bk)
    n_ctas_q = T // (2 * bq)
    dtype = q.dtype
    qk_scale = float(scale) * LOG2E

    def kernel(q_ref, k_ref, v_ref, lim_ref, aux_ref, rng_ref, slope_ref, out_ref, lse_ref,
               q_smem2, lim_smem2, lo_smem2, pos_smem2, lse_smem2, k_smem, v_smem,
               q_bar, lim_bar, k_bar, v_bar, k_free, v_free, sched):
        b = lax.axis_index("batch")
        n = lax.axis_index("heads")
        ci = lax.axis_index("q_seq")
        if cfg.reverse_q:
            ci = (n_ctas_q - 1) - ci
        wg = lax.axis_index("wg")
        t0 = 2 * ci
        # The CTA streams kv blocks [cta_first, cta_steps): the union of its tiles' ranges.
        cta_first = jnp.minimum(rng_ref[b, t0, 0], rng_ref[b, t0 + 1, 0])
        cta_steps = jnp.maximum(rng_ref[b, t0, 3], rng_ref[b, t0 + 1, 3])

        def slot_of(i):
            return lax.rem(i - cta_first, jnp.int32(stages))

        def sched_sync():
            plgpu.barrier_arrive(sched)
            plgpu.barrier_wait(sched)

        @pl.when(wg < 2)
        def _compute():
            if not interpret:
                plgpu.set_max_registers(232, action="increase")
            tile = t0 + wg
            q0 = tile * bq
            first, mid, n_full, n_steps = (rng_ref[b, tile, j] for j in range(4))
            q_smem = q_smem2.at[wg]
            lim_smem = lim_smem2.at[wg]
            plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(q0, bq), n], q_smem, q_bar.at[wg])
            plgpu.copy_gmem_to_smem(lim_ref.at[b, pl.ds(q0, bq)], lim_smem, lim_bar.at[wg])
            # lo rides on lim's barrier, positions on q's: each then expects two arrivals
            aux_smem = [a.at[wg] for a in (lo_smem2, pos_smem2) if a is not None]
            aux_bar = ([lim_bar] if mods.window else []) + ([q_bar] if mods.alibi else [])
            for j in range(A):
                plgpu.copy_gmem_to_smem(aux_ref.at[b, j, pl.ds(q0, bq)], aux_smem[j],
                                        aux_bar[j].at[wg])
            plgpu.barrier_wait(q_bar.at[wg])
            plgpu.barrier_wait(lim_bar.at[wg])
            lim_rows = _load_rows(lim_smem, interpret)
            lo_rows = _load_rows(aux_smem[0], interpret) if mods.window else None
            pos_rows = _load_rows(aux_smem[-1], interpret) if mods.alibi else None
            slope = slope_ref[n] if mods.alibi else None

            m_i = _row_layout(jnp.full((bq,), -jnp.inf, jnp.float32), interpret)
            l_i = _row_layout(jnp.full((bq,), 0.0, jnp.float32), interpret)
            acc = _tile_layout(jnp.full((bq, H), 0.0, jnp.float32), interpret)

            def skip(i):
                """Release block i unread (outside this tile's range), in lockstep with the
                other warpgroup. Waiting before releasing keeps every barrier phase observed
                exactly once."""
                slot = slot_of(i)
                plgpu.barrier_wait(k_bar.at[slot])
                plgpu.barrier_wait(v_bar.at[slot])
                plgpu.barrier_arrive(k_free.at[slot])
                plgpu.barrier_arrive(v_free.at[slot])
                sched_sync()
                sched_sync()

            pl.loop(cta_first, first)(skip)

            @pl.when(n_steps > first)
            def _():
                plgpu.barrier_wait(k_bar.at[slot_of(first)])

            pl.when(wg == 1)(sched_sync)

            def step(i, carry, masked):
                acc, m_i, l_i = carry
                slot = slot_of(i)
                s = _qk(q_smem, k_smem.at[slot], (bq, bk), interpret, after_issue=sched_sync)
                plgpu.barrier_arrive(k_free.at[slot])
                s = s * qk_scale
                if mods.softcap is not None or mods.alibi:
                    kv_ids = _col_iota((bq, bk), interpret) + i * bk if mods.alibi else None
                    s = score_mods(s, kv_ids, pos_rows, slope, mods)
                p, alpha, m_i, l_i = softmax_step(s, (m_i, l_i), lim_rows, i * bk, masked,
                                                  interpret, lo_rows)
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                p16 = p.astype(dtype)
                if not interpret:
                    acc, m_i, l_i, p16 = lax.optimization_barrier((acc, m_i, l_i, p16))
                plgpu.barrier_arrive(sched)
                plgpu.barrier_wait(v_bar.at[slot])
                plgpu.barrier_wait(sched)

                def wait_next_k():
                    nxt = i + 1

                    @pl.when(nxt < n_steps)
                    def _():
                        plgpu.barrier_wait(k_bar.at[slot_of(nxt)])
                acc = _pv(acc, p16, v_smem.at[slot], interpret, after_issue=wait_next_k)
                plgpu.barrier_arrive(v_free.at[slot])
                return acc, m_i, l_i

            # [first, mid) and [full, steps) hold keys some row may not see; [mid, full) none.
            carry = (acc, m_i, l_i)
            carry = lax.fori_loop(first, mid, functools.partial(step, masked=True), carry)
            carry = lax.fori_loop(mid, n_full, functools.partial(step, masked=False), carry)
            acc, m_i, l_i = lax.fori_loop(n_full, n_steps, functools.partial(step, masked=True),
                                          carry)
            pl.loop(n_steps, cta_steps)(skip)

            pl.when(wg == 0)(sched_sync)

            l_safe = jnp.where(l_i == 0.0, 1.0, l_i)
            inv = 1.0 / l_safe
            out = acc * lax.broadcast_in_dim(inv, acc.shape, [0])
            q_smem[...] = out.astype(dtype)
            if return_lse:
                lse_smem2.at[wg][...] = m_i + jnp.log(l_safe) * LOG2E
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_smem, out_ref.at[b, pl.ds(q0, bq), n])
            if return_lse:
                plgpu.copy_smem_to_gmem(lse_smem2.at[wg], lse_ref.at[b, n, pl.ds(q0, bq)])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _memory():
            if not interpret:
                plgpu.set_max_registers(40, action="decrease")
            kvh = lax.div(n, jnp.int32(G))

            def issue_k(j, slot):
                keys = pl.ds((cta_first + j) * bk, bk)
                plgpu.copy_gmem_to_smem(k_ref.at[b, keys, kvh], k_smem.at[slot], k_bar.at[slot])

            def issue_v(j, slot):
                keys = pl.ds((cta_first + j) * bk, bk)
                plgpu.copy_gmem_to_smem(v_ref.at[b, keys, kvh], v_smem.at[slot], v_bar.at[slot])

            ring_producer(cta_steps - cta_first, stages,
                          [(issue_k, k_free), (issue_v, v_free)])

    tiled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    scratch = [
        plgpu.SMEM((2, bq, H), dtype, transforms=tiled),            # q, then out
        plgpu.SMEM((2, bq), jnp.int32),                             # lim rows
        plgpu.SMEM((2, bq), jnp.int32) if mods.window else None,    # window start rows
        plgpu.SMEM((2, bq), jnp.int32) if mods.alibi else None,     # position rows
        plgpu.SMEM((2, bq), jnp.float32) if return_lse else None,   # lse rows
        plgpu.SMEM((stages, bk, H), dtype, transforms=tiled),       # K ring
        plgpu.SMEM((stages, bk, H), dtype, transforms=tiled),       # V ring
        plgpu.Barrier(num_arrivals=1 + mods.alibi, num_barriers=2),   # q (positions) loaded
        plgpu.Barrier(num_arrivals=1 + mods.window, num_barriers=2),  # lim (lo) loaded
        plgpu.Barrier(num_barriers=stages),                         # K slot loaded
        plgpu.Barrier(num_barriers=stages),                         # V slot loaded
        plgpu.Barrier(num_arrivals=2, num_barriers=stages),         # K slot free
        plgpu.Barrier(num_arrivals=2, num_barriers=stages),         # V slot free
        plgpu.Barrier(num_arrivals=2),                              # ping-pong schedule
    ]
    out_type = [jax.ShapeDtypeStruct((B, T, N, H), dtype),
                jax.ShapeDtypeStruct((B, N, T), jnp.float32) if return_lse else None]
    kwargs = {}
    if interpret:
        kwargs["interpret"] = interpret_params()
    out, lse = plgpu.kernel(
        kernel,
        out_type=out_type,
        scratch_types=scratch,
        grid=(N, n_ctas_q, B),
        grid_names=("heads", "q_seq", "batch"),
        num_threads=3,
        thread_name="wg",
        compiler_params=compiler_params(cfg.semantics),
        **kwargs,
    )(q, k, v, lim, aux, ranges, slopes)
    return out, lse


def check_supported(q, k, v):
    """None if the kernel supports these operands, else the reason."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        return f"q, k, v must be 4-D, got {q.ndim}, {k.ndim}, {v.ndim}"
    if k.shape != v.shape:
        return f"k {k.shape} and v {v.shape} differ"
    B, _, N, H = q.shape
    if k.shape[0] != B or k.shape[3] != H:
        return f"q {q.shape} and k {k.shape} disagree on batch or head_dim"
    if N % k.shape[2]:
        return f"kv heads {k.shape[2]} must divide query heads {N}"
    if not (q.dtype == k.dtype == v.dtype):
        return f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})"
    if jnp.dtype(q.dtype) not in SUPPORTED_DTYPES:
        return f"dtype {jnp.dtype(q.dtype).name} (supported: bfloat16, float16)"
    if H not in SUPPORTED_HEAD_DIMS:
        return f"head_dim {H} (supported: {SUPPORTED_HEAD_DIMS})"
    return None


def flash_attention(q, k, v, q_positions, kv_lengths, *, causal: bool, scale: float,
                    return_lse: bool = False, config: PrefillConfig | None = None,
                    interpret: bool = False, window: int | None = None,
                    softcap: float | None = None, alibi_slopes=None, spans=None):
    """Masked attention with the Mosaic GPU prefill kernel.

    q            [B, T, N, H] bf16 or f16
    k, v         [B, S, K, H] same dtype, K divides N
    q_positions  [B, T] int32 absolute query positions
    kv_lengths   [B] int32 valid keys per sequence
    window  None or W: query at position p sees keys p - W < s (<= p when causal);
                 kv blocks before the lowest window start of a CTA are never loaded
    softcap      None or C: scores -> C tanh(scores / C) after scaling, before the mask
    alibi_slopes None or [N] f32: scores += slopes[n] * (s - p)
    spans        None or (lo, lim) [B, T] int32: query t sees only keys lo <= s <= lim
                 (packed rows, cache.Write.packed); read as the window's per-row starts,
                 so a tile never loads the kv blocks outside its rows' sequences
    Returns out [B, T, N, H] in q.dtype and, if return_lse, lse [B, T, N] f32 (natural log).
    """
    reason = check_supported(q, k, v) or check_mods(window, softcap, alibi_slopes,
                                                    q.shape[2])
    if reason is not None:
        raise ValueError(f"flash_attention: unsupported {reason}")
    cfg = config or PrefillConfig()
    mods = mods_of(window, softcap, alibi_slopes)
    if spans is not None:  # per-row starts: the window's operand and masking
        mods = dataclasses.replace(mods, window=True)
    T, S = q.shape[1], k.shape[1]
    lo, lim = visible_range(q_positions, kv_lengths, S, causal, window, spans)
    aux = [lo] if mods.window else []
    if mods.alibi:
        aux.append(q_positions.astype(jnp.int32))
    T_pad = _round_up(T, 2 * cfg.block_q)
    S_pad = _round_up(S, cfg.block_kv)
    if T_pad != T:
        q = jnp.pad(q, ((0, 0), (0, T_pad - T), (0, 0), (0, 0)))
        lim = jnp.pad(lim, ((0, 0), (0, T_pad - T)), constant_values=-1)
        lo = jnp.pad(lo, ((0, 0), (0, T_pad - T)))
        aux = [jnp.pad(a, ((0, 0), (0, T_pad - T))) for a in aux]
    if S_pad != S:
        k = jnp.pad(k, ((0, 0), (0, S_pad - S), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, S_pad - S), (0, 0), (0, 0)))
    ranges = cta_ranges(tile_ranges(lo, lim, cfg.block_q, cfg.block_kv))
    # placeholders for operands a kernel without those modifiers never reads
    aux = jnp.stack(aux, 1) if aux else jnp.zeros((1, 1, 1), jnp.int32)
    slopes = (alibi_slopes.astype(jnp.float32) * LOG2E if mods.alibi
              else jnp.zeros((1,), jnp.float32))
    out, lse2 = _prefill_pallas(q, k, v, lim, aux, ranges, slopes, scale=scale, cfg=cfg,
                                mods=mods, return_lse=return_lse, interpret=interpret)
    out = out[:, :T]
    if return_lse:
        return out, (lse2[:, :, :T] * LN2).transpose(0, 2, 1)
    return out


def flash_attention_reference(q, k, v, q_positions, kv_lengths, *, causal: bool, scale: float,
                              return_lse: bool = False, window: int | None = None,
                              softcap: float | None = None, alibi_slopes=None,
                              spans=None):
    """The pure-jnp twin of flash_attention (same signature, same outputs)."""
    return attention_reference(q, k, v, q_positions, kv_lengths, causal=causal, scale=scale,
                               return_lse=return_lse, window=window,
                               softcap=softcap, alibi_slopes=alibi_slopes, spans=spans)
