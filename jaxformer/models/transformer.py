"""The trunk every model shares: embeddings, a stack of L blocks, the final norm.

Two layer layouts (RunConfig.layer_loop), the same weights either way:
  scan    block weights stacked on a leading `layers` axis (nnx.vmap at construction), run
          with lax.scan: compile time does not grow with depth, and the pipeline hands each
          stage its contiguous slice of the stack. The checkpoint layout.
  unroll  one weight array per layer (nnx.List of blocks) and a Python loop over layers. On
          GPUs XLA copies each layer's slice of a stacked weight out before its matmul
          (a contiguous dynamic slice becomes a device memcpy), which at decode doubles or
          triples the bytes moved per token; separate arrays have nothing to slice.
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


def unrolled_blocks(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.List:
    return nnx.List([Block(cfg, rngs) for _ in range(cfg.num_layers)])


def run_blocks(blocks, x, positions, kv_lengths, cache=None, start=None, *, backend="auto"):
    """Run x [B, T, D] through the blocks (stacked: a scan; a list: a Python loop); cache is
    (k, v) each [L, B, S, K, H] or None.

    Returns (x [B, T, D], new (k, v) or None). The whole cache is a carry of the scan, each
    layer writing its new entries in place: as scan outputs it would be rebuilt (zero-filled
    and copied) every step, many times the bytes decode actually needs to read.
    """
    cache = None if cache is None else tuple(cache)
    if isinstance(blocks, nnx.List):
        for layer, block in enumerate(blocks):
            x, cache = block(x, positions, kv_lengths, cache, start,
                             None if cache is None else jnp.int32(layer), backend=backend)
        return x, cache
    graphdef, state = nnx.split(blocks)
    L = jax.tree.leaves(state)[0].shape[0]

    def body(carry, xs):
        h, cache = carry
        layer_state, layer = xs
        block = nnx.merge(graphdef, layer_state)
        h, cache = block(h, positions, kv_lengths, cache, start,
                         None if cache is None else layer, backend=backend)
        return (h, cache), None

    layers = jnp.arange(L, dtype=jnp.int32)
    (x, cache), _ = jax.lax.scan(body, (x, cache), (state, layers), unroll=_UNROLL)
    return x, cache


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, unrolled: bool = False):
        self.cfg = cfg
        self.embed = Embeddings(cfg, rngs)
        self.layers = unrolled_blocks(cfg, rngs) if unrolled else stacked_blocks(cfg, rngs)
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
