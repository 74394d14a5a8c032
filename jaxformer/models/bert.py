"""BERT-style encoders (Hugging Face BERT: post-LN; Megatron BERT: pre-LN), with pooler,
masked-LM head and next-sentence (binary) head."""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.layers.base import Dense, param
from jaxformer.layers.mlp import activation
from jaxformer.layers.norms import Norm
from jaxformer.models.gpt import mask_padded_vocab
from jaxformer.models.transformer import Transformer


class _MLMHead(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        D = cfg.hidden_size
        self.dense = Dense(rngs, (D, D), ("embed", None), (D,), (None,))
        self.norm = Norm(D, cfg.norm, cfg.norm_eps, rngs)
        self.bias = param(rngs, (cfg.padded_vocab_size,), ("vocab",), "zeros")


class Encoder(Transformer):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, stages: int | None = None):
        super().__init__(cfg, rngs, stages)
        D = cfg.hidden_size
        if cfg.pooler:
            self.pooler = Dense(rngs, (D, D), ("embed", None), (D,), (None,))
        if cfg.mlm_head:
            self.mlm = _MLMHead(cfg, rngs)
        if cfg.binary_head:
            self.binary_head = Dense(rngs, (D, 2), ("embed", "classes"), (2,), ("classes",))

    def __call__(self, ids, lengths, token_types=None, *, backend="auto", positions=None,
                 at=None):
        """ids [B, T], lengths [B] (right padding), token_types [B, T] ->
        (hidden [B, T, D], pooled [B, D] or None).

        Packed rows (several sequences back to back in a row, TensorRT's varseqlen):
        positions [B, T] restarting at each sequence and at = cache.Write.packed(lo, lim)
        keeping each sequence's attention to itself; pooled is then None (`pool` the
        sequences' first tokens)."""
        B, T = ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        x, _ = self.trunk(ids, positions, lengths, at=at, token_types=token_types,
                          backend=backend)
        pooled = None
        if self.cfg.pooler and at is None:
            pooled = self.pool(x[:, 0])
        return x, pooled

    def pool(self, first):
        """BERT's pooler: first [B, D] (the [CLS] states) -> tanh(dense) [B, D]."""
        return jnp.tanh(self.pooler.add_bias(self.pooler.einsum("bd,de->be", first)))

    def mlm_logits(self, x):
        """x [B, T, D] -> float32 logits [B, T, Vp] (decoder tied to the token table)."""
        h = self.mlm.dense.add_bias(self.mlm.dense.einsum("btd,de->bte", x))
        h = self.mlm.norm(activation(self.cfg.mlm_activation or self.cfg.activation, h))
        logits = self.embed.attend(h) + self.mlm.bias[...].astype(jnp.float32)
        return mask_padded_vocab(logits, self.cfg.vocab_size)

    def nsp_logits(self, pooled):
        """pooled [B, D] -> float32 [B, 2]."""
        logits = self.binary_head.add_bias(self.binary_head.einsum("bd,dc->bc", pooled))
        return logits.astype(jnp.float32)
