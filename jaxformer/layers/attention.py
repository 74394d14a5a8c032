"""Self-attention with fused, tensor-parallel QKV and an optional KV-cache path.

Fused QKV kernel [D, K, G+2, H] (docs/checkpoint_format.md): per kv group its G query heads,
then its key and value heads, so sharding kv_heads over `tensor` keeps whole groups together
(Megatron's column-parallel QKV); the output projection [N, H, D] is row-parallel.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.kernels.attention import attention, paged_attention
from jaxformer.layers import rope
from jaxformer.layers.base import Dense
from jaxformer.layers.norms import Norm
from jaxformer.sharding import shard

# The window of a "full" layer in a model that mixes sliding and full layers (the window is
# then one traced scalar per layer): wider than any cache.
NO_WINDOW = 1 << 30


def alibi_slopes(n: int) -> np.ndarray:
    """[N] float32 ALiBi head slopes (Press et al.; BLOOM's build_alibi_tensor)."""
    closest = 2 ** math.floor(math.log2(n))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
    slopes = [base ** p for p in range(1, closest + 1)]
    if closest != n:
        extra = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
        slopes += [extra ** p for p in range(1, 2 * min(closest, n - closest) + 1, 2)]
    return np.asarray(slopes, np.float32)


def layer_knobs(cfg: ModelConfig, layer_id):
    """(window, local rope?) of layer `layer_id` (an int32 scalar, the global layer number,
    or None): static where every layer is alike, else selected per layer."""
    sliding = cfg.layer_is_sliding()
    if not any(sliding):
        return None, False
    if all(sliding) and cfg.rope_local_theta is None:
        return cfg.sliding_window, False
    if layer_id is None:
        raise ValueError("layer_types mixes sliding and full layers: the block needs layer_id")
    is_sliding = jnp.asarray(sliding)[layer_id]
    local = is_sliding if cfg.rope_local_theta is not None else False
    return jnp.where(is_sliding, cfg.sliding_window, NO_WINDOW), local


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        D, N, K, G, H = (cfg.hidden_size, cfg.num_heads, cfg.kv_heads, cfg.q_per_kv,
                         cfg.dims_per_head)
        self.qkv = Dense(rngs, (D, K, G + 2, H), ("embed", "kv_heads", "qkv", "head_dim"),
                         (K, G + 2, H) if cfg.qkv_bias else None, ("kv_heads", "qkv", "head_dim"))
        if cfg.qk_norm:  # the model's norm over H, one scale shared by all heads
            qk = dict(offset=cfg.norm_offset, axis="head_dim")
            self.q_norm = Norm(H, cfg.norm, cfg.norm_eps, rngs, **qk)
            self.k_norm = Norm(H, cfg.norm, cfg.norm_eps, rngs, **qk)
        self.out = Dense(rngs, (N, H, D), ("heads", "head_dim", "embed"),
                         (D,) if cfg.linear_bias else None, ("embed",), contract=2)

    def __call__(self, x, positions, kv_lengths, cache=None, at=None, layer=None, *,
                 backend="auto", layer_id=None):
        """One attention sublayer.

        x [B, T, D]; positions [B, T] int32; kv_lengths [B] int32 valid keys after this step.
        cache: None (attend within x) or the stacked cache.KVCache (or PagedKVCache) of every
        layer, of which this is layer `layer` (an int32 scalar, required with a cache); `at`
        (cache.Write) says where the new keys go and whether the queries attend over the
        cache row (decode, chunks) or within x (prefill).
        layer_id: the global layer number (int32 scalar) where layers differ (sliding or
        full, Gemma 3's local rope).
        Returns (out [B, T, D], the new cache or None).
        """
        cfg = self.cfg
        B, T, _ = x.shape
        K, G, H = cfg.kv_heads, cfg.q_per_kv, cfg.dims_per_head
        qkv = self.qkv.add_bias(self.qkv.einsum("btd,dkch->btkch", x))
        qkv = shard(qkv, ("batch", "length", "act_kv_heads", "qkv", "head_dim"))
        q, k, v = qkv[:, :, :, :G], qkv[:, :, :, G], qkv[:, :, :, G + 1]  # q [B,T,K,G,H]
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        window, local = layer_knobs(cfg, layer_id)
        if cfg.position_embedding == "rope":
            inv_freq, factor = rope.frequencies(cfg, positions, kv_lengths)
            if local is not False:  # Gemma 3: sliding layers use their own plain rope
                inv_l, _ = rope.frequencies(cfg, positions, kv_lengths, local=True)
                inv_freq = jnp.where(local, inv_l, inv_freq)
                factor = jnp.where(local, 1.0, factor)
            kw = dict(rotary_dim=cfg.rotary_dim, interleaved=cfg.rope_interleaved,
                      inv_freq=inv_freq, scale=factor)
            q = rope.apply_rope(q, positions, **kw)
            k = rope.apply_rope(k, positions, **kw)
        q = q.reshape(B, T, K * G, H)  # head n = k * G + g
        kv_layer, scales = None, {}
        slopes = (jnp.asarray(alibi_slopes(cfg.num_heads))
                  if cfg.position_embedding == "alibi" else None)
        if cache is not None:
            # The stacked cache rides in the layer loop's carry: write only the new entries.
            cache = cache.write(layer, k, v, at)
            if at.pages is not None:  # a paged pool: attention reads each row's pages
                o = paged_attention(q, cache.k, cache.v, at.pages, positions, kv_lengths,
                                    scale=cfg.scale, layer=layer, **cache.scales(),
                                    backend=backend if backend == "xla" else "auto",
                                    window=window, softcap=cfg.attn_softcap,
                                    alibi_slopes=slopes)
                return self._out(o), cache
            if at.decode:
                # attention reads layer `layer` of the stacked cache in place; a quantized
                # cache's codes go to the Pallas decode kernel or XLA dots with the scales
                # folded into scores and probabilities ("auto" picks, kernels/attention.py)
                k, v, kv_layer, scales = cache.k, cache.v, layer, cache.scales()
                if cache.quant is not None and backend != "xla":
                    backend = "auto"
        spans = None if at is None else at.spans  # packed rows: each sequence alone
        o = attention(q, k, v, positions, kv_lengths, causal=cfg.causal, scale=cfg.scale,
                      backend=backend, layer=kv_layer, window=window,
                      softcap=cfg.attn_softcap, alibi_slopes=slopes, spans=spans, **scales)
        return self._out(o), cache

    def _out(self, o):
        """The row-parallel output projection of o [B, T, N, H] -> [B, T, D]."""
        o = shard(o, ("batch", "length", "act_heads", "head_dim"))
        out = self.out.add_bias(self.out.einsum("btnh,nhd->btd", o))
        return shard(out, ("batch", "length", "embed"))
