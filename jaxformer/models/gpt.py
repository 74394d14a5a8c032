"""Decoder-only language models: GPT-2, Megatron GPT-3, LLaMA-style (one class, config-driven)."""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.layers.base import param
from jaxformer.models.transformer import Transformer
from jaxformer.sharding import shard


class DecoderLM(Transformer):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, stages: int | None = None):
        super().__init__(cfg, rngs, stages)
        if not cfg.tie_embeddings:
            self.lm_head = _Head(cfg, rngs)

    def head(self, x):
        """x [B, T, D] -> float32 logits [B, T, Vp]; padded vocabulary rows are -inf."""
        if self.cfg.tie_embeddings:
            logits = self.embed.attend(x)
        else:
            logits = jnp.einsum("btd,dv->btv", x, self.lm_head.kernel[...],
                                preferred_element_type=jnp.float32)
            if self.cfg.lm_head_bias:
                logits = logits + self.lm_head.bias[...].astype(jnp.float32)
            logits = shard(logits, ("batch", "length", "act_vocab"))
        cap = self.cfg.final_softcap
        if cap is not None:  # Gemma 2: logits -> c * tanh(logits / c)
            logits = jnp.float32(cap) * jnp.tanh(logits / jnp.float32(cap))
        return mask_padded_vocab(logits, self.cfg.vocab_size)

    def __call__(self, ids, positions, kv_lengths, cache=None, at=None, *, backend="auto"):
        x, new_cache = self.trunk(ids, positions, kv_lengths, cache, at, backend=backend)
        return self.head(x), new_cache


class _Head(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.kernel = param(rngs, (cfg.hidden_size, cfg.padded_vocab_size), ("embed", "vocab"))
        if cfg.lm_head_bias:
            self.bias = param(rngs, (cfg.padded_vocab_size,), ("vocab",), "zeros")


def mask_padded_vocab(logits, vocab_size: int):
    if logits.shape[-1] == vocab_size:
        return logits
    ids = jnp.arange(logits.shape[-1])
    return jnp.where(ids < vocab_size, logits, -jnp.inf)
