"""Rotary position embeddings (NeoX/LLaMA halves or GPT-J interleaved pairs)."""
from __future__ import annotations

import jax.numpy as jnp


def apply_rope(x, positions, *, theta: float, rotary_dim: int, interleaved: bool):
    """Rotate the first `rotary_dim` dims of each head.

    x [B, T, ..., H], positions [B, T] int32 -> same shape and dtype as x.
    Angles are computed in float32, as Hugging Face and Megatron do.
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, rot/2]
    extra = x.ndim - 3  # head axes between T and H
    angles = angles.reshape(angles.shape[:2] + (1,) * extra + angles.shape[-1:])
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    rot, rest = x[..., :rotary_dim].astype(jnp.float32), x[..., rotary_dim:]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(rot.shape)
    else:
        half = rotary_dim // 2
        x1, x2 = rot[..., :half], rot[..., half:]
        out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return jnp.concatenate([out.astype(x.dtype), rest], axis=-1)
