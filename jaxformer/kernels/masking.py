"""Masks as data and score modifiers, shared by the prefill and decode kernels.

Legend: B batch, T queries, S keys. A query row sees keys lo <= s <= lim (visible_range);
a 64-row query tile visits the kv blocks [first, steps) and needs no mask on [mid, full)
(tile_ranges); a prefill CTA streams the union of its two tiles' ranges (cta_ranges).
Scores in the kernels are in log2 units (x log2 e, for exp2): score_mods adds ALiBi and
soft-caps there, in reference.py's order.
"""
from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np
from jax import lax

LOG2E = math.log2(math.e)


def visible_limit(q_positions, kv_lengths, kv_len: int, causal: bool):
    """[B, T] int32: the last key index each query may see (-1: none)."""
    last = jnp.minimum(kv_lengths.astype(jnp.int32), kv_len)[:, None] - 1
    lim = jnp.minimum(q_positions.astype(jnp.int32), last) if causal else \
        jnp.broadcast_to(last, q_positions.shape)
    return jnp.maximum(lim, -1)


def visible_range(q_positions, kv_lengths, kv_len: int, causal: bool,
                  window: int | None, spans=None):
    """(lo, lim) [B, T] int32: query t sees keys lo <= s <= lim (lim -1: none, and then
    lo is 0). lo is 0 without a window, else max(position - W + 1, 0); spans (lo, lim)
    [B, T] (packed rows: each query's own sequence) narrow both further."""
    lim = visible_limit(q_positions, kv_lengths, kv_len, causal)
    if window is None and spans is None:
        return jnp.zeros_like(lim), lim
    lo = jnp.zeros_like(lim)
    if window is not None:
        lo = jnp.maximum(q_positions.astype(jnp.int32) - (window - 1), 0)
    if spans is not None:
        lo = jnp.maximum(lo, spans[0].astype(jnp.int32))
        lim = jnp.minimum(lim, spans[1].astype(jnp.int32))
    sees = (lo <= lim) & (lim >= 0)
    return jnp.where(sees, lo, 0), jnp.where(sees, lim, -1)


_NO_KEY = 2 ** 30  # a window start above every key: rows that see nothing


def tile_ranges(lo, lim, block_q: int, block_kv: int):
    """Per query tile, [B, T // block_q, 4] int32 (first, mid, full, steps): the tile visits
    kv blocks [first, steps), and blocks [mid, full) are entirely visible to all its rows
    (no mask). Rows that see nothing (lim -1) bound nothing but force full = mid (they
    must be masked wherever the tile goes)."""
    B, T = lim.shape
    lim_t = lim.reshape(B, T // block_q, block_q)
    lo_t = lo.reshape(B, T // block_q, block_q)
    sees = lim_t >= 0
    steps = (lim_t.max(-1) + block_kv) // block_kv      # cdiv(max + 1, block_kv)
    first = jnp.minimum(jnp.where(sees, lo_t, _NO_KEY).min(-1) // block_kv, steps)
    mid = jnp.clip(-(-jnp.where(sees, lo_t, 0).max(-1) // block_kv), first, steps)
    full = jnp.clip((lim_t.min(-1) + 1) // block_kv, mid, steps)
    return jnp.stack([first, mid, full, steps], -1).astype(jnp.int32)


def tile_bounds(lim, block_q: int, block_kv: int):
    """Per query tile: (steps, full) int32 [B, T // block_q] from lim [B, T] (no window)."""
    r = tile_ranges(jnp.zeros_like(lim), lim, block_q, block_kv)
    return r[..., 3], r[..., 2]


def cta_ranges(ranges):
    """ranges [B, n_tiles, 4] -> the same with each empty tile's range set to the empty
    range at its CTA partner's first block, so that a CTA's stream (from the smaller first
    to the larger steps of its two tiles) starts where the work does."""
    B, nt, _ = ranges.shape
    pair = ranges.reshape(B, nt // 2, 2, 4)
    empty = pair[..., 3] <= pair[..., 0]
    start = jnp.where(empty, _NO_KEY, pair[..., 0]).min(-1, keepdims=True)
    start = jnp.where(start == _NO_KEY, 0, start)
    pair = jnp.where(empty[..., None], start[..., None], pair)
    return pair.reshape(B, nt, 4)


def soft_cap_log2(s, softcap: float | None):
    """C tanh(x / C) on scores s = x log2(e) in log2 units, in log2 units.

    tanh(y) = 1 - 2 / (1 + 2^(2 y log2 e)) with exp2 and a division, not the tanh
    instruction: approx_math lowers tanh to tanh.approx.f32 (relative error ~2^-11, up to
    0.02 in a logit capped at 50), while ex2.approx's is ~2^-22. The form is exact at both
    ends (2^+inf -> 1, 2^-inf -> -1) and its absolute error near 0 is ~C * 1e-7.
    """
    if softcap is None:
        return s
    c = float(softcap)
    return (c * LOG2E) * (1.0 - 2.0 / (1.0 + jnp.exp2(s * (2.0 / c))))


@dataclasses.dataclass(frozen=True)
class ScoreMods:
    """What changes the scores besides scale and mask (static: each is another kernel).
    window: a sliding window (the kernels then read per-row window starts `lo`); softcap:
    C of C tanh(x / C); alibi: per-head slopes are an operand, scores get
    slope * (key - position) (the kernels then read per-row positions)."""
    window: bool = False
    softcap: float | None = None
    alibi: bool = False

    @property
    def aux_rows(self) -> int:  # int32 rows per query besides lim: lo, then position
        return (1 if self.window else 0) + (1 if self.alibi else 0)


def score_mods(s, kv_ids, pos_rows, slope, mods: ScoreMods):
    """ALiBi, then soft-capping (reference.py's order), on scores s [R, bk] in log2 units.
    kv_ids [R, bk] int32 key indices; pos_rows [R] int32 query positions, or one scalar;
    slope: scalar or [R] rows, in log2 units (slope * log2 e)."""
    if mods.alibi:
        R, bk = s.shape
        if jnp.ndim(pos_rows):
            pos_rows = lax.broadcast_in_dim(pos_rows, (R, bk), [0])
        rel = kv_ids - pos_rows  # exact in int32; (s - p) * slope, not s*slope - p*slope
        if jnp.ndim(slope):
            slope = lax.broadcast_in_dim(slope, (R, bk), [0])
        s = s + rel.astype(jnp.float32) * slope
    return soft_cap_log2(s, mods.softcap)


def check_mods(window, softcap, alibi_slopes, num_heads: int):
    """None if the score modifiers are well formed, else the reason (names the field)."""
    if window is not None:
        if isinstance(window, (int, np.integer)) and not isinstance(window, bool):
            if window < 1:
                return f"window must be a positive int, got {window}"
        elif not (hasattr(window, "dtype") and jnp.ndim(window) == 0
                  and jnp.issubdtype(window.dtype, jnp.integer)):
            return f"window must be a positive int or an int32 scalar, got {window!r}"
    if softcap is not None and not (isinstance(softcap, (int, float, np.number))
                                    and not isinstance(softcap, bool) and softcap > 0):
        return f"softcap must be a positive float or None, got {softcap!r}"
    if alibi_slopes is not None and tuple(alibi_slopes.shape) != (num_heads,):
        return (f"alibi_slopes must have shape [N] = ({num_heads},), got "
                f"{tuple(alibi_slopes.shape)}")
    return None


def mods_of(window, softcap, alibi_slopes) -> ScoreMods:
    return ScoreMods(window=window is not None,
                     softcap=None if softcap is None else float(softcap),
                     alibi=alibi_slopes is not None)
