"""The trunk every model shares: embeddings, a stack of L blocks, the final norm.

Block weights are stacked on a leading `layers` axis (nnx.vmap at construction) and run with
lax.scan, so compile time does not grow with depth and the pipeline can hand each stage its
contiguous slice of the stack.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.layers import Block, Embeddings, Norm


def stacked_blocks(cfg: ModelConfig, rngs: nnx.Rngs) -> Block:
    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(r):
        return Block(cfg, r)

    return make(rngs)


# Layer-loop unrolling (1 = a rolled scan). A tuning knob for decode, where each scan
# iteration's dynamic slice of the stacked weights may cost a copy on some backends.
_UNROLL = int(os.environ.get("JAXFORMER_UNROLL_LAYERS", "1"))


def run_blocks(blocks: Block, x, positions, kv_lengths, cache=None, start=None, *,
               backend="auto"):
    """Scan x [B, T, D] through stacked blocks; cache is (k, v) each [L, B, S, K, H] or None.

    Returns (x [B, T, D], new (k, v) or None). The whole cache is a carry of the scan, each
    layer writing its new entries in place: as scan outputs it would be rebuilt (zero-filled
    and copied) every step, many times the bytes decode actually needs to read.
    """
    graphdef, state = nnx.split(blocks)
    L = jax.tree.leaves(state)[0].shape[0]

    def body(carry, xs):
        h, cache = carry
        layer_state, layer = xs
        block = nnx.merge(graphdef, layer_state)
        h, cache = block(h, positions, kv_lengths, cache, start,
                         None if cache is None else layer, backend=backend)
        return (h, cache), None

    cache = None if cache is None else tuple(cache)
    layers = jnp.arange(L, dtype=jnp.int32)
    (x, cache), _ = jax.lax.scan(body, (x, cache), (state, layers), unroll=_UNROLL)
    return x, cache


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = Embeddings(cfg, rngs)
        self.layers = stacked_blocks(cfg, rngs)
        if cfg.final_norm:
            self.final_norm = Norm(cfg.hidden_size, cfg.norm, cfg.norm_eps, rngs)

    def trunk(self, ids, positions, kv_lengths, cache=None, start=None, token_types=None, *,
              backend="auto", layers_fn=run_blocks):
        """ids, positions [B, T]; kv_lengths [B] -> (hidden [B, T, D], new cache or None).

        `layers_fn` runs the stack; the pipeline substitutes its staged version.
        """
        x = self.embed(ids, positions, token_types)
        if layers_fn is run_blocks:  # [pipeline] staged when the active mesh has stages
            from jaxformer import pipeline
            layers_fn = pipeline.layers_fn(run_blocks)
        x, new_cache = layers_fn(self.layers, x, positions, kv_lengths, cache, start,
                                 backend=backend)
        if self.cfg.final_norm:
            x = self.final_norm(x)
        return x, new_cache
