"""The compute warpgroup's pipeline step that the two decode kernels share: decode_attention.py's
(one contiguous cache row per CTA) and paged_decode.py's (rows read through page tables,
several rows a CTA through one ring).

Legend: M = decode_attention.ROWS query rows (a kv head's G query heads, zero-padded to one
wgmma's 64), bk keys per step, H head dim. A step reads the K/V tiles of one ring slot: QK^T
(on a float tile converted from the slot's codes for a quantized cache, the key scales on the
score columns), the score modifiers, the masks, the float32 online-softmax update in log2
units, then PV (the value scales on the probability columns), releasing each slot as soon as
it is read. The kernels differ only in where the step's operands come from, which
make_step takes as arguments: the query tile, the ring index of a row's step i (the paged
kernel's ring runs on over a CTA's rows), the step count that bounds the next step's wait,
and the row's query position.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax.numpy as jnp
from jax import lax

from jaxformer.kernels import flash_attention as fa


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """What every step of one kernel shares (static)."""
    stages: int          # ring depth: step g reads slot g % stages
    rows: int            # M, the wgmma rows
    block: int           # bk, keys per step
    dtype: Any           # q's dtype: the float tiles' and the probabilities' for PV
    qk_scale: float      # softmax scale * log2(e): the scores come out in log2 units
    mods: fa.ScoreMods
    interpret: bool


class Ring(NamedTuple):
    """The compute side of a K/V ring of `stages` slots [stages, bk, H] and its barriers
    (loaded: k_bar, v_bar; released: k_free, v_free). A quantized cache adds the slots'
    per-key scales [stages, bk] (ks, vs) and the float tiles [bk, H] its codes are converted
    into (kt, vt); None for a float cache."""
    k: Any
    v: Any
    k_bar: Any
    v_bar: Any
    k_free: Any
    v_free: Any
    ks: Any = None
    vs: Any = None
    kt: Any = None
    vt: Any = None


def float_tile(codes_smem, tile_smem, interpret: bool):
    """tile_smem [bk, H] (q's dtype) = the codes [bk, H], converted (exactly: int8 and e4m3
    values are bf16 / f16 values); the kernel's wgmmas then read a float tile."""
    _, plgpu = fa._plgpu()
    if interpret:
        tile_smem[...] = codes_smem[...].astype(tile_smem.dtype)
        return
    codes = plgpu.load(codes_smem, (), layout=plgpu.Layout.WGMMA_UPCAST_2X)
    codes = plgpu.layout_cast(codes, plgpu.Layout.WGMMA)
    if jnp.dtype(codes.dtype) == jnp.dtype(jnp.float8_e4m3fn):
        codes = codes.astype(jnp.float16)  # one hardware convert per pair
    tile_smem[...] = codes.astype(tile_smem.dtype)


def per_key(scale_smem, shape, interpret: bool):
    """[M, bk] float32: the slot's per-key scales [bk] broadcast over the query rows (a scale
    is constant over H, so it scales score / probability column j)."""
    _, plgpu = fa._plgpu()
    if interpret:
        cols = scale_smem[...]
    else:
        cols = plgpu.load(scale_smem, (), layout=plgpu.Layout.WGMMA.reduce(0))
    return lax.broadcast_in_dim(cols, shape, [1])


def empty_carry(spec: StepSpec, H: int):
    """(acc [M, H], running max [M], running sum [M]) before a row's first step."""
    m_i = fa._row_layout(jnp.full((spec.rows,), -jnp.inf, jnp.float32), spec.interpret)
    l_i = fa._row_layout(jnp.full((spec.rows,), 0.0, jnp.float32), spec.interpret)
    acc = fa._tile_layout(jnp.full((spec.rows, H), 0.0, jnp.float32), spec.interpret)
    return acc, m_i, l_i


def make_step(spec: StepSpec, ring: Ring, q_smem, slope_rows, *, first, length, lo,
              position: Callable, ring_index: Callable, total):
    """step(i, carry, masked) of one row, for lax.fori_loop over its steps i.

    q_smem [M, H] the row's queries; slope_rows [M] ALiBi slopes (log2 units) or None;
    first: the row's first key block (step i reads keys (first + i) * bk onwards); length,
    lo: its visible keys [lo, length) (masked steps only; lo with mods.window);
    position(): the row's query position, read only where the score modifiers need it;
    ring_index(i): the ring step of step i (slot ring_index(i) % stages); total: the ring
    steps, so the step after ring step g waits on slot (g + 1) % stages only if g + 1 < total.
    carry: (acc [M, H] f32, running max [M], running sum [M]), as empty_carry.
    """
    pl, plgpu = fa._plgpu()
    M, bk, stages = spec.rows, spec.block, spec.stages
    mods, interpret = spec.mods, spec.interpret
    quant = ring.kt is not None

    def step(i, carry, masked):
        acc, m_i, l_i = carry
        g = ring_index(i)
        slot = lax.rem(g, jnp.int32(stages))
        if quant:
            # The wgmmas of the last step are complete (their results were read), so the
            # tile can be overwritten; the slot is free once read.
            float_tile(ring.k.at[slot], ring.kt, interpret)
            k_cols = per_key(ring.ks.at[slot], (M, bk), interpret)
            plgpu.barrier_arrive(ring.k_free.at[slot])
            plgpu.commit_smem()
            s = fa._qk(q_smem, ring.kt, (M, bk), interpret) * (k_cols * spec.qk_scale)
        else:
            s = fa._qk(q_smem, ring.k.at[slot], (M, bk), interpret)
            plgpu.barrier_arrive(ring.k_free.at[slot])
            s = s * spec.qk_scale
        if masked or mods.alibi:  # key positions in the row's sequence
            kv_ids = fa._col_iota((M, bk), interpret) + (first + i) * bk
        if mods.softcap is not None or mods.alibi:
            s = fa.score_mods(s, kv_ids if mods.alibi else None, position(), slope_rows,
                              mods)
        if masked:
            s = jnp.where(kv_ids < length, s, fa._MASK)
            if mods.window:
                s = jnp.where(kv_ids >= lo, s, fa._MASK)
        m_new = jnp.maximum(m_i, s.max(axis=1))
        alpha = jnp.exp2(m_i - m_new)
        pr = jnp.exp2(s - lax.broadcast_in_dim(m_new, (M, bk), [0]))
        l_i = l_i * alpha + pr.sum(axis=1)
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
        plgpu.barrier_wait(ring.v_bar.at[slot])

        def wait_next_k():  # the ring's next step (the paged kernel's: maybe the next row's)
            @pl.when(g + 1 < total)
            def _():
                plgpu.barrier_wait(ring.k_bar.at[lax.rem(g + 1, jnp.int32(stages))])
        if quant:  # value scales weight the probabilities (l_i sums them unweighted)
            float_tile(ring.v.at[slot], ring.vt, interpret)
            pv = (pr * per_key(ring.vs.at[slot], (M, bk), interpret)).astype(spec.dtype)
            plgpu.barrier_arrive(ring.v_free.at[slot])
            plgpu.commit_smem()
            acc = fa._pv(acc, pv, ring.vt, interpret, after_issue=wait_next_k)
        else:
            acc = fa._pv(acc, pr.astype(spec.dtype), ring.v.at[slot], interpret,
                         after_issue=wait_next_k)
            plgpu.barrier_arrive(ring.v_free.at[slot])
        return acc, m_new, l_i
    return step


def run_steps(step, n_head, n_full, n_steps, carry):
    """A row's steps: [0, n_head) and [n_full, n_steps) masked (the window's first block, the
    row's last), [n_head, n_full) not. Returns the final carry."""
    carry = lax.fori_loop(0, n_head, functools.partial(step, masked=True), carry)
    carry = lax.fori_loop(n_head, n_full, functools.partial(step, masked=False), carry)
    return lax.fori_loop(n_full, n_steps, functools.partial(step, masked=True), carry)
