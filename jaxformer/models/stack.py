"""The layer stack: the one place that knows how the L blocks' weights are laid out.

Two layouts of the same weights (RunConfig.layer_loop):
  stacked   block weights stacked on a leading `layers` axis (nnx.vmap at construction), run
            with lax.scan: compile time does not grow with depth, and the pipeline hands each
            stage its contiguous slice of the stack. The checkpoint layout.
  unrolled  one weight array per layer position and a Python loop over layers. On GPUs XLA
            copies each layer's slice of a stacked weight out before its matmul (a contiguous
            dynamic slice becomes a device memcpy), which at decode doubles or triples the
            bytes moved per token; separate arrays have nothing to slice. With S pipeline
            stages of Ls = L / S layers, array j holds layer j of every stage, [S, ...] with S
            on `pipe` (layer l = s * Ls + j), so each stage's shard is exactly its own layer
            j; without stages S = 1.

`LayerStack` creates the blocks in a layout, runs them over (x, cache, write), converts
parameter trees between the checkpoint's stacked layout and its own, and says what the
layout implies elsewhere (which layer a parameter path belongs to, whether decode updates
the cache in place). Nothing else asks which layout is in use. With pipeline stages on the
active mesh the blocks run staged (models/stages.py).
"""
from __future__ import annotations

import dataclasses
from typing import Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxformer import sharding as shd
from jaxformer.cache import KVCache, Write
from jaxformer.config import ModelConfig
from jaxformer.layers import Block
from jaxformer.models import stages as staging

LAYERS = "layers"  # the parameter subtree of the blocks


@dataclasses.dataclass(frozen=True)
class LayerStack:
    """The layout of a model's L blocks: `stages` None for the stacked layout, S for the
    unrolled one over S pipeline stages (1: none)."""
    cfg: ModelConfig
    stages: int | None = None

    @property
    def unrolled(self) -> bool:
        return self.stages is not None

    @property
    def decode_in_place(self) -> bool:
        """Whether a decode step updates the KV cache in place: the unrolled layout without
        a pipeline. A layer scan (or the pipeline's staged loop) reads the carried cache and
        writes a new one, so decode then holds a second copy (the memory plan counts it)."""
        return self.unrolled and self.stages == 1

    # ---- weights ---------------------------------------------------------------------
    def create(self, rngs: nnx.Rngs):
        """The blocks in this layout, weights initialised from `rngs`."""
        if not self.unrolled:
            return _stacked_blocks(self.cfg, rngs)
        return nnx.List([_stacked_blocks(self.cfg, rngs, self.stages)
                         for _ in range(self.cfg.num_layers // self.stages)])

    def layer_position(self, path: tuple) -> int | None:
        """For a parameter path under the blocks (`layers/...`): the unrolled layout's
        position j, else None."""
        if self.unrolled and len(path) > 1 and path[0] == LAYERS:
            return int(path[1])
        return None

    def layer_name(self, path: tuple) -> str:
        """A block parameter's layer-independent name ("attn/qkv") from its path."""
        skip = 2 if self.layer_position(path) is not None else 1
        return "/".join(str(p) for p in path[skip:])

    def per_layer_values(self, values: np.ndarray, path: tuple) -> np.ndarray:
        """Per-layer values [L, ...] -> those of the parameter at `path`: all L when
        stacked, [S] (layers s * Ls + j) at unrolled position j."""
        j = self.layer_position(path)
        if j is None:
            return values
        Ls = self.cfg.num_layers // self.stages
        return values.reshape((-1, Ls) + values.shape[1:])[:, j]

    def from_checkpoint(self, params: dict, shardings: dict | None = None) -> dict:
        """Stacked params (leaves under `layers` are [L, ...]) -> this layout, on the device
        one leaf at a time: each stacked array is split and then deleted, so the peak is
        the model plus one leaf. With the stack's `layers` axis on `pipe`, every stage keeps
        exactly its own layers: nothing moves. shardings: this layout's shardings."""
        if not self.unrolled or _is_unrolled(params):
            return params
        flat, treedef = jax.tree.flatten(params[LAYERS])
        S = self.stages
        Ls = flat[0].shape[0] // S
        sh_flat = None
        if shardings is not None:
            sh_flat = [jax.tree.flatten(shardings[LAYERS][j])[0] for j in range(Ls)]
        per_pos = [[None] * len(flat) for _ in range(Ls)]

        def split(a):
            a = a.reshape((S, Ls) + a.shape[1:])
            return tuple(a[:, j] for j in range(Ls))

        for i, a in enumerate(flat):
            out_sh = None if sh_flat is None else tuple(sh_flat[j][i] for j in range(Ls))
            parts = jax.jit(split, out_shardings=out_sh)(a)
            for j in range(Ls):
                per_pos[j][i] = parts[j]
            if isinstance(a, jax.Array) and not a.is_deleted():
                a.delete()
        out = dict(params)
        out[LAYERS] = {j: jax.tree.unflatten(treedef, per_pos[j]) for j in range(Ls)}
        return out

    def layer_views(self, blocks, stages: int):
        """One layer at a time: (graphdef of a block, S, where) with where(i) = (state, s, j)
        such that layer i is the [s, j] entry of `state` viewed as [S, n, ...] (S the stages
        holding the stack; stacked: the whole stack, n = L / S; unrolled: position j's tree,
        n = 1), taken stage-locally."""
        L = self.cfg.num_layers
        if self.unrolled:  # position j holds layer j of every stage
            Ls = len(blocks)
            states = [nnx.split(pos)[1] for pos in blocks]
            return (nnx.split(blocks[0])[0], L // Ls,
                    lambda i: (states[i % Ls], i // Ls, 0))
        Ls = L // stages
        graphdef, state = nnx.split(blocks)
        return graphdef, stages, lambda i: (state, i // Ls, i % Ls)

    @staticmethod
    def for_run(cfg: ModelConfig, layer_loop: str, pipe: int) -> "LayerStack":
        """The layout a RunConfig's resolved layer_loop ("scan" / "unroll") implies."""
        return LayerStack(cfg, pipe if layer_loop == "unroll" else None)

    @staticmethod
    def checkpoint_leaves(params: Mapping, flatten) -> Iterator[tuple[tuple, np.ndarray]]:
        """(path, host array) of a params tree of either layout in the checkpoint's stacked
        layout, one array at a time: unrolled positions `layers/{j}` of [S, ...] (layer
        s * Ls + j at [s]) are stacked back into [L, ...]. flatten: nested dict -> {path:
        leaf}."""
        unrolled = _is_unrolled(params)
        rest = {k: v for k, v in params.items() if not (unrolled and k == LAYERS)}
        for path, leaf in flatten(rest).items():
            yield path, np.asarray(jax.device_get(leaf))
        if not unrolled:
            return
        positions = [flatten(params[LAYERS][j]) for j in range(len(params[LAYERS]))]
        for sub in positions[0]:
            # [Ls, S, ...] -> [S, Ls, ...] -> [L, ...]
            parts = np.stack([np.asarray(jax.device_get(p[sub])) for p in positions])
            parts = parts.swapaxes(0, 1)
            yield (LAYERS,) + sub, parts.reshape((-1,) + parts.shape[2:])

    # ---- running ---------------------------------------------------------------------
    def __call__(self, blocks, x, positions, kv_lengths, cache: KVCache | None = None,
                 at: Write | None = None, *, backend="auto", cache_layer=None):
        """x [B, T, D] through the blocks -> (x [B, T, D], new cache or None); staged
        (GPipe, models/stages.py) when the active mesh has pipeline stages and this is not
        already a stage's body. Arguments as run_blocks'."""
        run = staging.layers_fn(run_blocks)
        if run is run_blocks:
            return run_blocks(blocks, x, positions, kv_lengths, cache, at, backend=backend,
                              cache_layer=cache_layer)
        return run(blocks, x, positions, kv_lengths, cache, at, backend=backend,
                   layer_count=self.cfg.num_layers, run_blocks=run_blocks)


def _stacked_blocks(cfg: ModelConfig, rngs: nnx.Rngs, n: int | None = None) -> Block:
    """n (default: all L) blocks with weights stacked on a leading `layers` axis."""
    @nnx.split_rngs(splits=n or cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(r):
        return Block(cfg, r)

    return make(rngs)


def _is_unrolled(params: Mapping) -> bool:
    layers = params.get(LAYERS) if isinstance(params, Mapping) else None
    return isinstance(layers, Mapping) and 0 in layers


def _position(stacked: Block) -> Block:
    """The one block a layer position holds here: leaves [1, ...] (S = 1, or this stage's
    shard inside the pipeline) -> [...], a free reshape."""
    graphdef, state = nnx.split(stacked)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a.reshape(a.shape[1:]), state))


def _layer_offset(n_local: int):
    """Global number of this stack's first layer: inside the pipeline's shard_map (manual
    `pipe`) stage s holds layers [s * n_local, (s + 1) * n_local), else 0."""
    if "pipe" in shd.manual_axes():
        return jax.lax.axis_index("pipe") * n_local
    return jnp.int32(0)


def run_blocks(blocks, x, positions, kv_lengths, cache: KVCache | None = None,
               at: Write | None = None, *, backend="auto", cache_layer=None):
    """Run x [B, T, D] through the blocks (stacked: a scan; a list: a Python loop).

    Block l (of these blocks) uses cache layer cache_layer(l) (default l; the pipelined
    decode interleaves microbatches). Returns (x [B, T, D], new cache or None). The whole
    cache is a carry of the loop, each layer writing its new entries in place: as scan
    outputs it would be rebuilt (zero-filled and copied) every step, many times the bytes
    decode actually needs to read.
    """
    has_cache = cache is not None

    def cache_index(layer):
        if not has_cache:
            return None
        return layer if cache_layer is None else cache_layer(layer)

    if isinstance(blocks, nnx.List):  # block j: this stage's j-th layer
        offset = _layer_offset(len(blocks))
        for layer, stacked in enumerate(blocks):
            x, cache = _position(stacked)(x, positions, kv_lengths, cache, at,
                                          cache_index(jnp.int32(layer)), backend=backend,
                                          layer_id=offset + layer)
            if has_cache and x.shape[1] > 1:
                # A prefill writes each layer's keys and values into the cache before the
                # next layer runs; unordered, XLA kept fresh k/v of many layers alive to the
                # end, a prefill temporary near the prompt's cache size (docs/performance.md).
                x, cache = jax.lax.optimization_barrier((x, cache))
        return x, cache
    graphdef, state = nnx.split(blocks)
    L = jax.tree.leaves(state)[0].shape[0]
    offset = _layer_offset(L)

    def body(carry, xs):
        h, cache = carry
        layer_state, layer = xs
        block = nnx.merge(graphdef, layer_state)
        h, cache = block(h, positions, kv_lengths, cache, at, cache_index(layer),
                         backend=backend, layer_id=offset + layer)
        return (h, cache), None

    layers = jnp.arange(L, dtype=jnp.int32)
    (x, cache), _ = jax.lax.scan(body, (x, cache), (state, layers))
    return x, cache
