"""The trunk every model shares: embeddings, a stack of L blocks, the final norm.

Two layer layouts (RunConfig.layer_loop), the same weights either way:
  scan    block weights stacked on a leading `layers` axis (nnx.vmap at construction), run
          with lax.scan: compile time does not grow with depth, and the pipeline hands each
          stage its contiguous slice of the stack. The checkpoint layout.
  unroll  one weight array per layer position and a Python loop over layers. On GPUs XLA
          copies each layer's slice of a stacked weight out before its matmul (a contiguous
          dynamic slice becomes a device memcpy), which at decode doubles or triples the
          bytes moved per token; separate arrays have nothing to slice. With S pipeline
          stages of Ls = L / S layers, array j holds layer j of every stage, [S, ...] with S
          on `pipe` (layer l = s * Ls + j), so each stage's shard is exactly its own layer
          j; without stages S = 1.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.layers import Block, Embeddings, Norm


def stacked_blocks(cfg: ModelConfig, rngs: nnx.Rngs, n: int | None = None) -> Block:
    """n (default: all L) blocks with weights stacked on a leading `layers` axis."""
    @nnx.split_rngs(splits=n or cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(r):
        return Block(cfg, r)

    return make(rngs)


# Layer-loop unrolling (1 = a rolled scan). A tuning knob for decode, where each scan
# iteration's dynamic slice of the stacked weights may cost a copy on some backends.
_UNROLL = int(os.environ.get("JAXFORMER_UNROLL_LAYERS", "1"))


def unrolled_blocks(cfg: ModelConfig, rngs: nnx.Rngs, stages: int) -> nnx.List:
    """L / stages layer positions, each `stages` blocks stacked on `layers` (see above)."""
    return nnx.List([stacked_blocks(cfg, rngs, stages)
                     for _ in range(cfg.num_layers // stages)])


def _position(stacked: Block) -> Block:
    """The one block a layer position holds here: leaves [1, ...] (S = 1, or this stage's
    shard inside the pipeline) -> [...], a free reshape."""
    graphdef, state = nnx.split(stacked)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a.reshape(a.shape[1:]), state))


def _layer_offset(n_local: int):
    """Global number of this stack's first layer: inside the pipeline's shard_map (manual
    `pipe`) stage s holds layers [s * n_local, (s + 1) * n_local), else 0."""
    manual = set(getattr(jax.sharding.get_abstract_mesh(), "manual_axes", ()) or ())
    if "pipe" in manual:
        return jax.lax.axis_index("pipe") * n_local
    return jnp.int32(0)


def run_blocks(blocks, x, positions, kv_lengths, cache=None, start=None, *, backend="auto",
               cache_layer=None):
    """Run x [B, T, D] through the blocks (stacked: a scan; a list: a Python loop); cache is
    (k, v[, k_scale, v_scale]) each [L', B, S, ...] or None.

    Block l (of these blocks) uses cache layer cache_layer(l) (default l; the pipelined
    decode interleaves microbatches). Returns (x [B, T, D], new cache or None). The whole
    cache is a carry of the loop, each layer writing its new entries in place: as scan
    outputs it would be rebuilt (zero-filled and copied) every step, many times the bytes
    decode actually needs to read.
    """
    cache = None if cache is None else tuple(cache)
    has_cache = cache is not None

    def cache_index(layer):
        if not has_cache:
            return None
        return layer if cache_layer is None else cache_layer(layer)

    if isinstance(blocks, nnx.List):  # block j: this stage's j-th layer
        offset = _layer_offset(len(blocks))
        for layer, stacked in enumerate(blocks):
            x, cache = _position(stacked)(x, positions, kv_lengths, cache, start,
                                          cache_index(jnp.int32(layer)), backend=backend,
                                          layer_id=offset + layer)
            if has_cache and x.shape[1] > 1:
                # A prefill writes each layer's keys and values into the cache before the
                # next layer runs. Unordered, XLA kept fresh k/v of many layers alive to
                # the end, a prefill temporary near the prompt's cache size. On an H100,
                # 13B with 8 prompts of 1920 tokens went from out of memory (a 19.4 GiB
                # temporary) to running, and 6.7B x 256 x 128 from 25 to 16 GiB asked.
                x, cache = jax.lax.optimization_barrier((x, cache))
        return x, cache
    graphdef, state = nnx.split(blocks)
    L = jax.tree.leaves(state)[0].shape[0]
    offset = _layer_offset(L)

    def body(carry, xs):
        h, cache = carry
        layer_state, layer = xs
        block = nnx.merge(graphdef, layer_state)
        h, cache = block(h, positions, kv_lengths, cache, start, cache_index(layer),
                         backend=backend, layer_id=offset + layer)
        return (h, cache), None

    layers = jnp.arange(L, dtype=jnp.int32)
    (x, cache), _ = jax.lax.scan(body, (x, cache), (state, layers), unroll=_UNROLL)
    return x, cache


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, stages: int | None = None):
        """stages: None for the stacked (scan) layout, else the unrolled layout for that
        many pipeline stages (1: none)."""
        self.cfg = cfg
        self.embed = Embeddings(cfg, rngs)
        self.layers = (stacked_blocks(cfg, rngs) if stages is None
                       else unrolled_blocks(cfg, rngs, stages))
        if cfg.final_norm:
            self.final_norm = Norm(cfg.hidden_size, cfg.norm, cfg.norm_eps, rngs,
                                   offset=cfg.norm_offset)

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
