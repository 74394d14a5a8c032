"""Self-attention with fused, tensor-parallel QKV and an optional KV-cache path.

Fused QKV kernel [D, K, G+2, H] (docs/checkpoint_format.md): per kv group its G query heads,
then its key and value heads, so sharding kv_heads over `tensor` keeps whole groups together
(Megatron's column-parallel QKV); the output projection [N, H, D] is row-parallel.
"""
from __future__ import annotations

from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.kernels.attention import attention, paged_attention
from jaxformer.layers.base import Dense
from jaxformer.layers.rope import apply_rope
from jaxformer.sharding import shard


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        D, N, K, G, H = (cfg.hidden_size, cfg.num_heads, cfg.kv_heads, cfg.q_per_kv,
                         cfg.dims_per_head)
        self.qkv = Dense(rngs, (D, K, G + 2, H), ("embed", "kv_heads", "qkv", "head_dim"),
                         (K, G + 2, H) if cfg.qkv_bias else None, ("kv_heads", "qkv", "head_dim"))
        self.out = Dense(rngs, (N, H, D), ("heads", "head_dim", "embed"),
                         (D,) if cfg.linear_bias else None, ("embed",), contract=2)

    def __call__(self, x, positions, kv_lengths, cache=None, at=None, layer=None, *,
                 backend="auto"):
        """One attention sublayer.

        x [B, T, D]; positions [B, T] int32; kv_lengths [B] int32 valid keys after this step.
        cache: None (attend within x) or the stacked cache.KVCache of every layer, of which
        this is layer `layer` (an int32 scalar, required with a cache); `at` (cache.Write)
        says where the new keys go and whether the queries attend over the cache row
        (decode) or within x (prefill).
        Returns (out [B, T, D], the new cache or None).
        """
        cfg = self.cfg
        B, T, _ = x.shape
        K, G, H = cfg.kv_heads, cfg.q_per_kv, cfg.dims_per_head
        qkv = self.qkv.add_bias(self.qkv.einsum("btd,dkch->btkch", x))
        qkv = shard(qkv, ("batch", "length", "act_kv_heads", "qkv", "head_dim"))
        q, k, v = qkv[:, :, :, :G], qkv[:, :, :, G], qkv[:, :, :, G + 1]  # q [B,T,K,G,H]
        if cfg.position_embedding == "rope":
            rope = dict(theta=cfg.rope_theta, rotary_dim=cfg.rotary_dim,
                        interleaved=cfg.rope_interleaved)
            q = apply_rope(q, positions, **rope)
            k = apply_rope(k, positions, **rope)
        q = q.reshape(B, T, K * G, H)  # head n = k * G + g
        kv_layer, scales = None, {}
        if cache is not None:
            # The stacked cache rides in the layer loop's carry: write only the new entries.
            cache = cache.write(layer, k, v, at)
            if at.pages is not None:  # a paged pool: attention reads each row's pages
                o = paged_attention(q, cache.k, cache.v, at.pages, positions, kv_lengths,
                                    scale=cfg.scale, layer=layer, **cache.scales(),
                                    backend=backend if backend == "xla" else "auto")
                return self._out(o), cache
            if at.decode:
                # attention reads layer `layer` of the stacked cache in place; a quantized
                # cache's codes go to the Pallas decode kernel or XLA dots with the scales
                # folded into scores and probabilities ("auto" picks, kernels/attention.py)
                k, v, kv_layer, scales = cache.k, cache.v, layer, cache.scales()
                if cache.quant is not None and backend != "xla":
                    backend = "auto"
        o = attention(q, k, v, positions, kv_lengths, causal=cfg.causal, scale=cfg.scale,
                      backend=backend, layer=kv_layer, **scales)
        return self._out(o), cache

    def _out(self, o):
        """The row-parallel output projection of o [B, T, N, H] -> [B, T, D]."""
        o = shard(o, ("batch", "length", "act_heads", "head_dim"))
        out = self.out.add_bias(self.out.einsum("btnh,nhd->btd", o))
        return shard(out, ("batch", "length", "embed"))
