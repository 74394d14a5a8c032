"""Pure-jnp attention: the reference every kernel is tested against, and the CPU path.

Shapes: q [B, T, N, H], k and v [B, S, K, H] with K dividing N (query head n reads kv head
n // (N // K)); q_positions [B, T] int32 absolute positions of the queries; kv_lengths [B]
int32 number of valid keys per sequence (keys s >= kv_lengths[b] are padding).
A key s is visible to query t of sequence b iff s < kv_lengths[b] and, when causal,
s <= q_positions[b, t], and, with a sliding window W, s > q_positions[b, t] - W (the query
and the W - 1 keys before it, Mistral's / Gemma's local attention). Scores and softmax are
float32; the output has q's dtype.

Score of query t (position p) and key s, in order: q.k * scale; with alibi_slopes [N],
+ slopes[n] * (s - p) (BLOOM adds slopes[n] * s: the same up to a per-row constant, which
softmax ignores); with softcap C, C * tanh(score / C) (Gemma 2); then the mask. window: a
Python int or an int32 scalar (per layer, traced). spans (lo, lim) [B, T] int32 each
(packed rows, cache.Write.packed): query t also sees only keys lo[b, t] <= s <= lim[b, t].
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

MASK_VALUE = -1e30  # finite, so a fully masked row (a padding query) gives no NaN


def attention_mask(q_positions, kv_lengths, kv_len: int, causal: bool,
                   window: int | None = None, spans=None):
    """[B, T, S] bool: which keys each query sees."""
    s = jnp.arange(kv_len, dtype=jnp.int32)
    mask = s[None, None, :] < kv_lengths[:, None, None]
    if spans is not None:
        lo, lim = spans
        mask = mask & (s[None, None, :] >= lo[:, :, None]) & (s[None, None, :] <= lim[:, :, None])
    if causal:
        mask = mask & (s[None, None, :] <= q_positions[:, :, None])
    if window is not None:
        mask = mask & (s[None, None, :] > q_positions[:, :, None] - window)
    return mask


def soft_cap(scores, softcap: float | None):
    """softcap * tanh(scores / softcap) (identity for None): Gemma 2's logit soft-capping."""
    if softcap is None:
        return scores
    return jnp.float32(softcap) * jnp.tanh(scores / jnp.float32(softcap))


def attention_reference(q, k, v, q_positions, kv_lengths, *, causal: bool, scale: float,
                        return_lse: bool = False, k_scale=None, v_scale=None,
                        window: int | None = None, softcap: float | None = None,
                        alibi_slopes=None, spans=None):
    """Masked softmax attention in float32. Returns [B, T, N, H] (and lse [B, T, N]).

    With k_scale and v_scale ([B, S, K] float32), k and v are a quantized cache's codes
    (int8 / float8, exact in q's dtype) and key s of head j is k[b, s, j] * k_scale[b, s, j].
    A scale is constant over H, so it multiplies score column s (and, for v, probability
    column s) instead of the codes: the codes are only converted, which XLA fuses into the
    dot that reads them, and no float copy of the cache is ever written.
    """
    B, T, N, H = q.shape
    K = k.shape[2]
    G = N // K
    qg = q.reshape(B, T, K, G, H)
    if k_scale is not None:
        k, v = k.astype(q.dtype), v.astype(q.dtype)
    scores = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = scores * jnp.float32(scale)
    if k_scale is not None:
        scores = scores * _per_key(k_scale)
    if alibi_slopes is not None:  # slopes [N] -> [1, K, G, 1, 1] times (s - p) [B, 1, 1, T, S]
        rel = jnp.arange(k.shape[1], dtype=jnp.int32)[None, None, :] - q_positions[:, :, None]
        slopes = alibi_slopes.astype(jnp.float32).reshape(1, K, G, 1, 1)
        scores = scores + slopes * rel[:, None, None].astype(jnp.float32)
    scores = soft_cap(scores, softcap)
    mask = attention_mask(q_positions, kv_lengths, k.shape[1], causal,
                          window, spans)  # [B, T, S]
    scores = jnp.where(mask[:, None, None], scores, MASK_VALUE)
    lse = jax.nn.logsumexp(scores, axis=-1)  # [B, K, G, T]
    probs = jnp.exp(scores - lse[..., None])
    if v_scale is not None:
        probs = probs * _per_key(v_scale)
    out = jnp.einsum("bkgts,bskh->btkgh", probs.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    out = out.reshape(B, T, N, H).astype(q.dtype)
    if return_lse:
        return out, lse.transpose(0, 3, 1, 2).reshape(B, T, N)
    return out


def _per_key(scale):
    """[B, S, K] per-key scales -> [B, K, 1, 1, S], broadcasting over scores [B, K, G, T, S]."""
    return scale.astype(jnp.float32).transpose(0, 2, 1)[:, :, None, None, :]
