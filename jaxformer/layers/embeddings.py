"""Token, position and token-type embeddings (vocabulary-parallel token table)."""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.layers.base import param
from jaxformer.layers.norms import Norm
from jaxformer.sharding import active_axis_size, shard


def lookup_rows(table, ids):
    """table [V, D], ids [B, T] -> table[ids] [B, T, D], written so that a table sharded
    over `tensor` on V stays where it is.

    XLA's partitioner may lower a plain take from a V-sharded table by all-gathering the
    whole table every decode step (jax 0.11.2 does; docs/benchmarks.md). As [tp, V/tp, D],
    each device looks up every id in its own block, keeps the rows it owns and the sum over
    blocks is an all-reduce of [B, T, D] (Megatron's vocabulary-parallel embedding, with no
    shard_map).
    """
    tp = active_axis_size("tensor")
    V, D = table.shape
    if tp == 1 or V % tp:
        return jnp.take(table, ids, axis=0)
    blocks = table.reshape(tp, V // tp, D)  # [tp, V/tp, D]: block j = shard j's rows
    rows = jnp.take(blocks, ids % (V // tp), axis=1)  # [tp, B, T, D]
    owner = jnp.arange(tp, dtype=ids.dtype)[:, None, None] == ids // (V // tp)
    return jnp.where(owner[..., None], rows, 0).sum(0, dtype=table.dtype)


class Table(nnx.Module):
    def __init__(self, rows: int, dim: int, row_axis: str, rngs: nnx.Rngs):
        self.embedding = param(rngs, (rows, dim), (row_axis, "embed"))


class Embeddings(nnx.Module):
    """x = token[ids] + position[positions] (+ token_type[types]), optionally normalised."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.token = Table(cfg.padded_vocab_size, cfg.hidden_size, "vocab", rngs)
        if cfg.position_embedding == "learned":
            self.position = Table(cfg.max_position_embeddings + cfg.position_offset,
                                  cfg.hidden_size, "position", rngs)
        if cfg.type_vocab_size:
            self.token_type = Table(cfg.type_vocab_size, cfg.hidden_size, "type", rngs)
        if cfg.embed_norm:
            self.norm = Norm(cfg.hidden_size, cfg.norm, cfg.norm_eps, rngs,
                             offset=cfg.norm_offset)

    def __call__(self, ids, positions, token_types=None):
        """ids, positions, token_types [B, T] int32 -> [B, T, D] in the table's dtype."""
        x = lookup_rows(self.token.embedding[...], ids)
        if self.cfg.embed_scale is not None:  # Gemma: the scale rounded to x's dtype first
            x = x * jnp.asarray(self.cfg.embed_scale, x.dtype)
        if self.cfg.position_embedding == "learned":
            x = x + jnp.take(self.position.embedding[...], positions + self.cfg.position_offset,
                             axis=0)
        if self.cfg.type_vocab_size:
            types = jnp.zeros_like(ids) if token_types is None else token_types
            x = x + jnp.take(self.token_type.embedding[...], types, axis=0)
        if self.cfg.embed_norm:
            x = self.norm(x)
        return shard(x, ("batch", "length", "embed"))

    def attend(self, x):
        """Tied LM head: x [B, T, D] -> logits [B, T, Vp] in float32."""
        logits = jnp.einsum("btd,vd->btv", x, self.token.embedding[...],
                            preferred_element_type=jnp.float32)
        return shard(logits, ("batch", "length", "act_vocab"))
