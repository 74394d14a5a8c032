"""Rotary position embeddings (NeoX/LLaMA halves or GPT-J interleaved pairs) and the rope
scalings of transformers' modeling_rope_utils: linear, dynamic (NTK), yarn, llama3, longrope.

Static scalings (linear, yarn, llama3) change the inverse frequencies once. Two depend on the
call, as in transformers: dynamic NTK raises the base once the longest position of the call
passes the pre-training context, longrope switches from its short to its long factors there.
"The call" is one forward: the keys a cache already holds keep the rotation they were written
with, exactly as transformers' generate does (its cache also stores rotated keys); under the
pipeline a call is one microbatch.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from jaxformer.config import ModelConfig


def _base_inv_freq(theta, dim: int):
    """[dim / 2] float32: 1 / theta^(2i / dim), the exponent computed as transformers does."""
    return 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))


def _yarn(cfg: ModelConfig, dim: int) -> tuple[np.ndarray, float]:
    base, factor = cfg.rope_theta, cfg.rope_factor
    orig = cfg.rope_original_max_positions

    def correction_dim(rotations):
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(cfg.rope_beta_fast), correction_dim(cfg.rope_beta_slow)
    if cfg.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: no zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    pos = np.float32(base) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    inv = (1.0 / (factor * pos)) * (1 - extrapolation) + (1.0 / pos) * extrapolation
    att = cfg.rope_attention_factor
    if att is None:
        att = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    return inv.astype(np.float32), float(att)


def _llama3(cfg: ModelConfig, dim: int) -> np.ndarray:
    inv = 1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    orig, factor = cfg.rope_original_max_positions, cfg.rope_factor
    lo, hi = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > orig / lo, inv / factor, inv)
    smooth = (orig / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < orig / hi) & ~(wavelen > orig / lo)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def frequencies(cfg: ModelConfig, positions, kv_lengths, *, local: bool = False):
    """(inv_freq [rotary_dim / 2] float32, cos/sin scale) for this call: positions [B, T],
    kv_lengths [B] (valid keys per row: positions of bucket padding past them do not count
    towards the call's longest sequence).

    local: the sliding layers of Gemma 3, which use plain rope of theta rope_local_theta.
    """
    dim = cfg.rotary_dim
    kind = cfg.rope_scaling
    if local:
        return _base_inv_freq(cfg.rope_local_theta, dim), 1.0
    if kind == "none":
        return _base_inv_freq(cfg.rope_theta, dim), 1.0
    if kind == "linear":
        return _base_inv_freq(cfg.rope_theta, dim) / cfg.rope_factor, 1.0
    if kind == "llama3":
        return jnp.asarray(_llama3(cfg, dim)), 1.0
    if kind == "yarn":
        inv, att = _yarn(cfg, dim)
        return jnp.asarray(inv), att
    orig = cfg.rope_original_max_positions
    # the call's longest sequence: transformers' max(position_ids) + 1, padding excluded
    last = jnp.minimum(jnp.max(positions, axis=1), kv_lengths.astype(positions.dtype) - 1)
    seq_len = jnp.max(last).astype(jnp.float32) + 1
    if kind == "dynamic":
        factor = cfg.rope_factor
        seq_len = jnp.maximum(seq_len, jnp.float32(orig))
        base = cfg.rope_theta * ((factor * seq_len / orig) - (factor - 1)) ** (dim / (dim - 2))
        return _base_inv_freq(base, dim), 1.0
    # longrope
    factor = cfg.max_position_embeddings / orig
    att = cfg.rope_attention_factor
    if att is None:
        att = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(orig))
    ext = jnp.where(seq_len > orig, jnp.asarray(cfg.rope_long_factor, jnp.float32),
                    jnp.asarray(cfg.rope_short_factor, jnp.float32))
    return 1.0 / (ext * cfg.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)), att


def apply_rope(x, positions, *, theta: float = 10000.0, rotary_dim: int, interleaved: bool,
               inv_freq=None, scale=1.0):
    """Rotate the first `rotary_dim` dims of each head.

    x [B, T, ..., H], positions [B, T] int32 -> same shape and dtype as x. inv_freq
    [rotary_dim / 2] (default: plain rope of `theta`); scale multiplies cos and sin (yarn's
    and longrope's attention factor). Angles are computed in float32, as Hugging Face and
    Megatron do.
    """
    if inv_freq is None:
        inv_freq = _base_inv_freq(theta, rotary_dim)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, rot/2]
    extra = x.ndim - 3  # head axes between T and H
    angles = angles.reshape(angles.shape[:2] + (1,) * extra + angles.shape[-1:])
    cos, sin = jnp.cos(angles) * scale, jnp.sin(angles) * scale
    rot, rest = x[..., :rotary_dim].astype(jnp.float32), x[..., rotary_dim:]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(rot.shape)
    else:
        half = rotary_dim // 2
        x1, x2 = rot[..., :half], rot[..., half:]
        out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return jnp.concatenate([out.astype(x.dtype), rest], axis=-1)
