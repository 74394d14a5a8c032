"""Decode attention (flash-decoding) for Hopper, written in Pallas for the Mosaic GPU backend.

One new query token per sequence against the KV cache, which stays in the model's layout
[B, S, K, H]. Legend: B batch, S cache length, N query heads, K kv heads, G = N // K, H head
dim, P splits.

Each CTA owns (sequence b, kv head, split p): it reads its share of that sequence's valid keys
once, for all G query heads of the kv head together (the G rows, zero-padded to the 64 rows
of one wgmma, are the M dimension of QK^T and PV), and writes a normalised partial output and
its log-sum-exp. Splitting the sequence over P CTAs lets a batch of 1 fill the GPU; a small
XLA combine step merges the P partials. The split is over each sequence's own valid length
(kv_lengths is ragged), so padding in the cache is never read; with a sliding window W, the
split is over the blocks from the window's start (position - W + 1), so the blocks before it
are never read either. Soft-capping and ALiBi change the scores in registers.

Two warpgroups: one issues TMA copies of K/V blocks into a ring of shared-memory slots, the
other runs wgmma + a float32 online softmax.

A quantized cache (int8 / float8_e4m3fn codes, one float32 scale per key and kv head) streams
its codes and scales instead, half the bytes of a bf16 cache. The compute warpgroup converts
each [block_kv, H] code tile to a float tile in shared memory (exact: the codes are bf16 /
f16 values) and runs the same wgmmas on it; a scale is constant over H, so the key scales
multiply the score columns and the value scales the probability columns, as in
reference.py. No float copy of the cache is ever written to HBM.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxformer.kernels import decode_step as ds
from jaxformer.kernels import flash_attention as fa
from jaxformer.kernels.reference import attention_reference

ROWS = 64  # wgmma M: the G query heads of one kv head, zero-padded
MIN_SPLIT_BLOCKS = 2  # caches of at most this many key blocks are never split


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    block_kv: int = 128     # keys per pipeline step
    stages: int = 3         # K/V shared-memory ring depth
    ctas_per_sm: int = 1    # occupancy assumed when choosing the number of splits
    semantics: str = "lane"
    # Load only the G query rows (rounded up to 8) into the 64-row wgmma tile; rows past
    # them hold whatever shared memory held and only produce rows that are never written
    # back (every wgmma output row depends on its own A row alone). False: pad q to 64
    # rows in XLA first (one more small kernel and 8x the query bytes).
    q_rows_only: bool = True


def num_sms() -> int:
    try:
        return int(getattr(jax.devices()[0], "core_count", 0)) or 132
    except Exception:  # noqa: BLE001 - any backend without the attribute
        return 132


def choose_splits(B: int, K: int, S: int, block_kv: int, ctas_per_sm: int = 1,
                  sms: int | None = None) -> int:
    """Splits per (sequence, kv head): enough CTAs for one full wave, never more blocks,
    and none for caches of at most MIN_SPLIT_BLOCKS blocks: there the merge step costs more
    than the CTA saves streaming half of so few blocks (profiled)."""
    sms = sms or num_sms()
    blocks = -(-S // block_kv)
    if blocks <= MIN_SPLIT_BLOCKS:
        return 1
    return max(1, min(blocks, (ctas_per_sm * sms) // (B * K)))


def _decode_pallas(qg, k, v, kv_lengths, last_pos, layer, *, scale: float, causal: bool,
                   kv_len: int, o_rows: int, cfg: DecodeConfig, splits: int,
                   interpret: bool, scales=None, lo=None,
                   mods: fa.ScoreMods = fa.ScoreMods(), slopes=None):
    """qg [B, K, R, H] query rows of each kv head (R = G rounded up to 8, or 64);
    k, v [L, B, S, K, H] a stacked cache (S % block_kv == 0); kv_lengths [B] int32;
    last_pos [B] int32 the query positions; layer [1] int32 the cache layer to read;
    kv_len: the unpadded cache length; o_rows: rows written back (G rounded up to 8);
    scales: None, or for a quantized cache (k, v int8 / float8 codes) the k and v scales of
    the layer read, [2, B, K, S] float32. lo: with mods.window, [B] int32 each sequence's
    first visible key (position - W + 1, at least 0);
    slopes: with mods.alibi, [K, 64] f32 each kv head's query rows' ALiBi slopes (log2
    units, zero-padded).
    Returns o [B, K, P, o_rows, H] f32 (normalised partials) and lse2 [B, K, P, 64] f32
    (log2 units).
    """
    pl, plgpu = fa._plgpu()
    B, K, R, H = qg.shape
    M = ROWS
    S = k.shape[2]
    bk = cfg.block_kv
    isz = jnp.dtype(qg.dtype).itemsize
    quant = scales is not None
    if quant:  # per stage: K and V codes and their scales; fixed: the two bf16 tiles
        csz = jnp.dtype(k.dtype).itemsize
        stages = fa.fit_stages(cfg.stages, M * H * (isz + 4) + 4 * M + 2 * bk * H * isz,
                               2 * bk * (H * csz + 4), S // bk)
    else:
        stages = fa.fit_stages(cfg.stages, M * H * (isz + 4) + 8 * M, 2 * bk * H * isz,
                               S // bk)
    P = splits
    dtype = qg.dtype
    qk_scale = float(scale) * fa.LOG2E

    spec = ds.StepSpec(stages=stages, rows=M, block=bk, dtype=dtype, qk_scale=qk_scale,
                       mods=mods, interpret=interpret)

    def kernel(q_ref, k_ref, v_ref, len_ref, pos_ref, lo_ref, layer_ref, sc_ref, sl_ref, o_ref,
               lse_ref, q_smem, o_smem, lse_smem, sl_smem, k_smem, v_smem, q_bar, k_bar, v_bar,
               k_free, v_free, ks_smem=None, vs_smem=None, kt_smem=None, vt_smem=None):
        p = lax.axis_index("split")
        h = lax.axis_index("kvh")
        b = lax.axis_index("batch")
        wg = lax.axis_index("wg")
        lyr = layer_ref[0]
        # Keys visible to this sequence's query: min(kv_len, position + 1), clipped to [0, S].
        length = jnp.minimum(len_ref[b], jnp.int32(kv_len))
        if causal:
            length = jnp.minimum(length, pos_ref[b] + 1)
        length = jnp.maximum(length, 0)
        end_block = lax.div(length + (bk - 1), jnp.int32(bk))
        # With a window, keys before lo = position - W + 1 are invisible: the blocks wholly
        # before it are never loaded (the splits share [lo // bk, end_block) only).
        lo = lo_ref[b] if mods.window else jnp.int32(0)
        start_block = jnp.minimum(lax.div(lo, jnp.int32(bk)), end_block)
        n_blocks = end_block - start_block
        per = lax.div(n_blocks + (P - 1), jnp.int32(P))
        first = start_block + jnp.minimum(p * per, n_blocks)
        last = jnp.minimum(first + per, end_block)
        n_steps = last - first
        # Only the sequence's final block can hold keys past its length, and only the window's
        # first block keys before lo: steps [0, n_head) and [n_full, n_steps) are masked.
        n_full = jnp.where(last * bk > length, n_steps - 1, n_steps)
        n_full = jnp.maximum(n_full, 0)
        if mods.window:
            n_head = jnp.where(first * bk < lo, jnp.minimum(n_steps, 1), 0)
            n_full = jnp.maximum(n_full, n_head)
        else:
            n_head = jnp.int32(0)

        @pl.when(wg == 0)
        def _compute():
            if not interpret:
                plgpu.set_max_registers(232, action="increase")
            dst = q_smem if R == M else q_smem.at[pl.ds(0, R)]
            plgpu.copy_gmem_to_smem(q_ref.at[b, h], dst, q_bar)
            if mods.alibi:  # q_bar expects two arrivals then
                plgpu.copy_gmem_to_smem(sl_ref.at[h], sl_smem, q_bar)
            plgpu.barrier_wait(q_bar)
            slope_rows = fa._load_rows(sl_smem, interpret) if mods.alibi else None
            carry = ds.empty_carry(spec, H)

            @pl.when(n_steps > 0)
            def _():
                plgpu.barrier_wait(k_bar.at[0])

            ring = ds.Ring(k_smem, v_smem, k_bar, v_bar, k_free, v_free, ks_smem, vs_smem,
                           kt_smem, vt_smem)
            step = ds.make_step(spec, ring, q_smem, slope_rows, first=first, length=length,
                                lo=lo, position=lambda: pos_ref[b], ring_index=lambda i: i,
                                total=n_steps)
            acc, m_i, l_i = ds.run_steps(step, n_head, n_full, n_steps, carry)
            l_safe = jnp.where(l_i == 0.0, 1.0, l_i)
            o_smem[...] = acc * lax.broadcast_in_dim(1.0 / l_safe, acc.shape, [0])
            lse_smem[...] = m_i + jnp.log(l_safe) * fa.LOG2E
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(0, o_rows)], o_ref.at[b, h, p])
            plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, h, p])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 1)
        def _memory():
            if not interpret:
                plgpu.set_max_registers(40, action="decrease")

            def issue_k(i, slot):
                keys = pl.ds((first + i) * bk, bk)
                plgpu.copy_gmem_to_smem(k_ref.at[lyr, b, keys, h], k_smem.at[slot],
                                        k_bar.at[slot])
                if quant:  # the slot's barrier expects two arrivals: codes and scales
                    plgpu.copy_gmem_to_smem(sc_ref.at[0, b, h, keys], ks_smem.at[slot],
                                            k_bar.at[slot])

            def issue_v(i, slot):
                keys = pl.ds((first + i) * bk, bk)
                plgpu.copy_gmem_to_smem(v_ref.at[lyr, b, keys, h], v_smem.at[slot],
                                        v_bar.at[slot])
                if quant:
                    plgpu.copy_gmem_to_smem(sc_ref.at[1, b, h, keys], vs_smem.at[slot],
                                            v_bar.at[slot])

            fa.ring_producer(n_steps, stages, [(issue_k, k_free), (issue_v, v_free)])

    tiled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    # 8-bit codes: 128-byte rows of 128 codes, the layout WGMMA_UPCAST_2X loads from
    codes_tiled = (plgpu.TilingTransform((8, 128)), plgpu.SwizzleTransform(128))
    ring_dtype, ring_tiled = (k.dtype, codes_tiled) if quant else (dtype, tiled)
    arrivals = 2 if quant else 1
    scratch = [
        plgpu.SMEM((M, H), dtype, transforms=tiled),           # q rows
        plgpu.SMEM((M, H), jnp.float32),                       # normalised partial out
        plgpu.SMEM((M,), jnp.float32),                         # partial lse
        plgpu.SMEM((M,), jnp.float32) if mods.alibi else None,  # ALiBi slope rows
        plgpu.SMEM((stages, bk, H), ring_dtype, transforms=ring_tiled),  # K ring
        plgpu.SMEM((stages, bk, H), ring_dtype, transforms=ring_tiled),  # V ring
        plgpu.Barrier(num_arrivals=2 if mods.alibi else 1, num_barriers=1),
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
        scales = jnp.zeros((2, 1, 1, 1), jnp.float32)
    kwargs = {"interpret": fa.interpret_params()} if interpret else {}

    if not mods.alibi:  # placeholder operands, never read
        slopes = jnp.zeros((1, M), jnp.float32)
    if not mods.window:
        lo = jnp.zeros((1,), jnp.int32)

    def entry(q_ref, k_ref, v_ref, len_ref, pos_ref, lo_ref, layer_ref, sc_ref, sl_ref, o_ref,
              lse_ref, q_smem, o_smem, lse_smem, sl_smem, k_smem, v_smem, q_bar, k_bar, v_bar,
              k_free, v_free, *quant_smem):
        kernel(q_ref, k_ref, v_ref, len_ref, pos_ref, lo_ref, layer_ref, sc_ref, sl_ref, o_ref,
               lse_ref,
               q_smem, o_smem, lse_smem, sl_smem, k_smem, v_smem, q_bar.at[0], k_bar, v_bar,
               k_free, v_free, *quant_smem)

    return plgpu.kernel(
        entry,
        out_type=[jax.ShapeDtypeStruct((B, K, P, o_rows, H), jnp.float32),
                  jax.ShapeDtypeStruct((B, K, P, M), jnp.float32)],
        scratch_types=scratch,
        grid=(P, K, B),
        grid_names=("split", "kvh", "batch"),
        num_threads=2,
        thread_name="wg",
        compiler_params=fa.compiler_params(cfg.semantics),
        **kwargs,
    )(qg, k, v, kv_lengths, last_pos, lo, layer, scales, slopes)


def _o_rows(G: int) -> int:
    return min(ROWS, -(-G // 8) * 8)


def combine(o, lse2, G: int):
    """Merge split partials. o [B, K, P, Gp, H] f32, lse2 [B, K, P, >=G] f32 (log2 units).

    Returns out [B, K, G, H] f32 and lse [B, K, G] f32 (natural log).

    One variadic reduction over P carrying (max, weight sum, weighted output) with the
    online-softmax merge as its combiner: XLA emits one reduction kernel plus the division
    fused with the cast, where max, then exp-and-sum, then the weighted sum take three.
    """
    o = o[:, :, :, :G]
    lse2 = lse2[:, :, :, :G]
    if o.shape[2] == 1:  # one split: its partial is already normalised
        return o[:, :, 0], lse2[:, :, 0] * fa.LN2
    m = jnp.broadcast_to(lse2[..., None], o.shape)

    def merge(a, b):
        (ma, la, oa), (mb, lb, ob) = a, b
        mx = jnp.maximum(ma, mb)
        ref = jnp.where(mx == -jnp.inf, 0.0, mx)  # both empty: weights 0, never NaN
        wa, wb = jnp.exp2(ma - ref), jnp.exp2(mb - ref)
        return mx, la * wa + lb * wb, oa * wa + ob * wb

    f32 = jnp.float32
    mx, den, acc = lax.reduce((m, jnp.ones_like(o), o),
                              (f32(-jnp.inf), f32(0.0), f32(0.0)), merge, (2,))
    den_safe = jnp.where(den == 0, 1.0, den)
    out = acc / den_safe
    lse = jnp.where(den[..., 0] == 0, -jnp.inf,
                    (jnp.log2(den_safe[..., 0]) + mx[..., 0]) * fa.LN2)
    return out, lse


CODE_DTYPES = (jnp.dtype(jnp.int8), jnp.dtype(jnp.float8_e4m3fn))


def check_supported(q, k, v, quantized: bool = False):
    """None if the kernel takes these operands, else the reason. quantized: k and v are the
    int8 / float8_e4m3fn codes of a quantized cache (their scales are checked by the
    caller's shapes)."""
    if quantized:
        if jnp.dtype(k.dtype) not in CODE_DTYPES or k.dtype != v.dtype:
            return (f"quantized cache codes must be int8 or float8_e4m3fn, got "
                    f"{jnp.dtype(k.dtype).name}, {jnp.dtype(v.dtype).name}")
        if q.shape[-1] % 128 or q.shape[-1] > 256:
            return f"a quantized cache needs head_dim 128 or 256, got {q.shape[-1]}"
        # the float checks below, with the codes' dequantized dtype
        k = jax.ShapeDtypeStruct(k.shape, q.dtype)
        v = jax.ShapeDtypeStruct(v.shape, q.dtype)
    reason = fa.check_supported(q, k, v)
    if reason is not None:
        return reason
    if q.shape[1] != 1:
        return f"decode needs one query token per sequence, got T = {q.shape[1]}"
    G = q.shape[2] // k.shape[2]
    if G > ROWS:
        return f"{G} query heads per kv head (at most {ROWS})"
    return None


def decode_attention(q, k, v, q_positions, kv_lengths, *, causal: bool, scale: float,
                     return_lse: bool = False, splits: int | None = None,
                     config: DecodeConfig | None = None, interpret: bool = False,
                     layer=None, k_scale=None, v_scale=None, window: int | None = None,
                     softcap: float | None = None, alibi_slopes=None):
    """Single-token attention against the cache with the Mosaic GPU flash-decoding kernel.

    q            [B, 1, N, H] bf16 or f16
    k, v         [B, S, K, H] the cache, same dtype, K divides N; or, with `layer`, the
                 stacked cache [L, B, S, K, H], read in place at layer `layer`
    q_positions  [B, 1] int32 (decode: kv_lengths - 1)
    kv_lengths   [B] int32 valid cache entries per sequence
    layer        None or an int32 scalar
    k_scale, v_scale  None, or for a quantized cache (k, v int8 / float8_e4m3fn codes) one
                 float32 scale per key and kv head, [B, S, K] ([L, B, S, K] with `layer`):
                 key s of head j is k[b, s, j] * k_scale[b, s, j]. Each CTA converts
                 the code tiles it streams to float tiles in shared memory and folds the
                 scales into the score and probability columns.
    window, softcap, alibi_slopes  as in flash_attention: the query at position p
                 sees keys p - W < s only, and the blocks wholly before p - W + 1 are never
                 loaded; scores are soft-capped / ALiBi-biased before the mask.
    Returns out [B, 1, N, H] in q.dtype (and lse [B, 1, N] f32 if return_lse).
    """
    quant = k_scale is not None
    if quant != (v_scale is not None):
        raise ValueError("decode_attention: k_scale and v_scale go together")
    if layer is None:
        k, v, layer = k[None], v[None], 0
        if quant:
            k_scale, v_scale = k_scale[None], v_scale[None]
    one = jax.ShapeDtypeStruct(k.shape[1:], k.dtype)  # the support check sees one layer
    reason = check_supported(q, one, jax.ShapeDtypeStruct(v.shape[1:], v.dtype), quant)
    reason = reason or fa.check_mods(window, softcap, alibi_slopes, q.shape[2])
    if reason is None and quant and not (k_scale.shape == v_scale.shape == k.shape[:-1]):
        reason = (f"scales {k_scale.shape}, {v_scale.shape} must be the codes' shape "
                  f"{k.shape} without head_dim")
    if reason is not None:
        raise ValueError(f"decode_attention: unsupported {reason}")
    cfg = config or DecodeConfig()
    B, _, N, H = q.shape
    S, K = k.shape[2], k.shape[3]
    G = N // K
    bk = cfg.block_kv
    while bk > 64 and S % bk:
        bk //= 2
    layer = jnp.reshape(jnp.asarray(layer, jnp.int32), (1,))
    scales = None
    if quant:  # the layer's scales as [2, B, K, S]: each CTA's keys are contiguous (one TMA)
        scales = jnp.stack([lax.dynamic_index_in_dim(a, layer[0], 0, keepdims=False)
                            for a in (k_scale, v_scale)]).astype(jnp.float32)
        scales = scales.transpose(0, 1, 3, 2)
    if S % bk:  # rare: a cache length that is not a multiple of 64 -> pad one layer (a copy)
        S_pad = -(-S // bk) * bk
        pad = ((0, 0), (0, 0), (0, S_pad - S), (0, 0), (0, 0))
        k = jnp.pad(lax.dynamic_index_in_dim(k, layer[0], 0), pad)
        v = jnp.pad(lax.dynamic_index_in_dim(v, layer[0], 0), pad)
        layer = jnp.zeros((1,), jnp.int32)
        if quant:
            scales = jnp.pad(scales, ((0, 0), (0, 0), (0, 0), (0, S_pad - S)))
    cfg = dataclasses.replace(cfg, block_kv=bk)
    # a window bounds the keys any split reads: split those blocks, not the cache's
    static_w = isinstance(window, (int, np.integer))  # a traced window: the whole cache
    span = min(k.shape[2], int(window) + bk) if static_w else k.shape[2]
    P = splits or choose_splits(B, K, span, bk, cfg.ctas_per_sm)
    R = _o_rows(G) if cfg.q_rows_only else ROWS
    qg = q.reshape(B, K, G, H)
    if R != G:  # for G a multiple of 8 (and q_rows_only) this is a free reshape
        qg = jnp.pad(qg, ((0, 0), (0, 0), (0, R - G), (0, 0)))
    mods, pos, lo, slopes = modifier_inputs(window, softcap, alibi_slopes, q_positions, K, G)
    o, lse2 = _decode_pallas(qg, k, v, kv_lengths.astype(jnp.int32),
                             pos, layer, scale=scale,
                             causal=causal, kv_len=S, o_rows=_o_rows(G), cfg=cfg, splits=P,
                             interpret=interpret, scales=scales, lo=lo,
                             mods=mods, slopes=slopes)
    out, lse = combine(o, lse2, G)
    out = out.reshape(B, 1, N, H).astype(q.dtype)
    if return_lse:
        return out, lse.reshape(B, 1, N)
    return out


def decode_attention_reference(q, k, v, q_positions, kv_lengths, *, causal: bool,
                               scale: float, return_lse: bool = False, k_scale=None,
                               v_scale=None, window: int | None = None,
                               softcap: float | None = None, alibi_slopes=None):
    """The pure-jnp twin of decode_attention (same signature, same outputs)."""
    return attention_reference(q, k, v, q_positions, kv_lengths, causal=causal, scale=scale,
                               return_lse=return_lse, k_scale=k_scale, v_scale=v_scale,
                               window=window, softcap=softcap,
                               alibi_slopes=alibi_slopes)


def modifier_inputs(window, softcap, alibi_slopes, q_positions, K: int, G: int):
    """(mods, positions [B] int32, window starts [B] or None, ALiBi slopes [K, ROWS] or None)
    for a decode kernel over K kv heads of G query rows each: the slopes pre-scaled by
    log2(e) and zero-padded like the rows."""
    mods = fa.mods_of(window, softcap, alibi_slopes)
    pos = q_positions.reshape(-1).astype(jnp.int32)
    lo = None if window is None else jnp.maximum(pos - (jnp.asarray(window, jnp.int32) - 1), 0)
    slopes = None
    if mods.alibi:
        slopes = alibi_slopes.astype(jnp.float32).reshape(K, G) * fa.LOG2E
        slopes = jnp.pad(slopes, ((0, 0), (0, ROWS - G)))
    return mods, pos, lo, slopes
